"""The ``clip`` family: a transformers ``CLIPModel``, its text and vision towers in one embedder.

A batch of mixed content is split by kind: texts go through the text tower, images through the
vision tower, both into the shared projection space. Saved as a transformers folder (model,
tokenizer, image processor); ONNX: ``text.onnx`` and ``image.onnx``, one graph per tower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from finetuner_trainer.data import Item
from finetuner_trainer.embedder import Embedder, decode_image, register_family
from finetuner_trainer.errors import ConfigError


@register_family
class ClipEmbedder(Embedder):
    family: ClassVar[str] = 'clip'
    kinds: ClassVar[tuple[str, ...]] = ('text', 'image')
    onnx_graphs: ClassVar[dict[str, str]] = {'text': 'text.onnx', 'image': 'image.onnx'}
    select_models: ClassVar[dict[str, str]] = {'clip-text': 'text', 'clip-vision': 'image'}
    cpu_batch_size: ClassVar[int] = 32
    find_unused_parameters: ClassVar[bool] = True  # label data of one kind runs one tower

    def __init__(self, name: str, path: str, options: dict[str, Any]):
        super().__init__(name, options)
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel  # heavy: loaded when built

        if options.get('pretrained', True) is False:  # the architecture with random weights
            self.clip = CLIPModel(CLIPConfig.from_pretrained(path))
        else:
            self.clip = CLIPModel.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        limit = int(self.clip.config.text_config.max_position_embeddings)
        self.max_length = int(min(options.get('max_length') or limit, limit))
        if options.get('image_size'):
            raise ConfigError('modelOptions.image_size', 'CLIP has a fixed image size; remove image_size')

    # --- finding and building ------------------------------------------------------------------
    @classmethod
    def claims(cls, config: dict[str, Any]) -> bool:
        return config.get('model_type') == 'clip'

    @classmethod
    def build(cls, name: str, source: str, options: dict[str, Any]) -> ClipEmbedder:
        return cls(name, source, options)

    @classmethod
    def load(cls, directory: Path, description: dict[str, Any]) -> ClipEmbedder:
        options = dict(description.get('options') or {})
        options.pop('pretrained', None)  # the folder's weights are the model, whatever the run started from
        return cls(description['name'], str(directory), options)

    # --- the model -----------------------------------------------------------------------------
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
