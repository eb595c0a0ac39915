"""The plain-PyTorch side of the image benchmark: what a person writes with timm and
pytorch-metric-learning in an afternoon. A ``Dataset`` that decodes the same JPEG bytes with timm's
own transform, a ``DataLoader``, ``TripletMarginLoss``, Adam, fp32, no tricks."""

from __future__ import annotations

import io
import random
import time
from collections import defaultdict
from collections.abc import Iterator

from bench.data import decode_blob
from bench.profiling import StepProfiler
from finetuner.api.layout import Record


class _ImageDataset:
    def __init__(self, records: list[Record], transform, label_ids: dict[object, int]):  # type: ignore[no-untyped-def]
        self.blobs = [decode_blob(r) for r in records]
        self.labels = [label_ids[r.label] for r in records]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        from PIL import Image

        with Image.open(io.BytesIO(self.blobs[index])) as image:
            return self.transform(image.convert('RGB')), self.labels[index]


class _ClassBatches:
    """Batches of ``per_class`` items from each of ``batch_size / per_class`` classes."""

    def __init__(self, labels: list[int], batch_size: int, per_class: int, steps: int, seed: int):
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            self.by_label[label].append(i)
        self.batch_size, self.per_class, self.steps = batch_size, per_class, steps
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        labels = sorted(self.by_label)
        for _ in range(self.steps):
            chosen = self.rng.sample(labels, min(len(labels), self.batch_size // self.per_class))
            yield [i for label in chosen for i in self.rng.choices(self.by_label[label], k=self.per_class)]


def train_steps(
    architecture: str,
    records: list[Record],
    *,
    image_size: int,
    batch_size: int,
    steps: int,
    per_class: int = 4,
    num_workers: int = 0,
    learning_rate: float = 1e-4,
    device: str = 'cpu',
    seed: int = 42,
    profiler: StepProfiler | None = None,
) -> list[float]:
    """Train ``steps`` optimizer steps; the time of every step's end (after ``optimizer.step()``)."""
    import timm
    import torch
    from pytorch_metric_learning.losses import TripletMarginLoss
    from timm.data import create_transform, resolve_model_data_config

    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=0).to(device)
    config = resolve_model_data_config(model)
    config['input_size'] = (3, image_size, image_size)
    transform = create_transform(**config, is_training=False)
    label_ids: dict[object, int] = {}
    for record in records:
        label_ids.setdefault(record.label, len(label_ids))
    dataset = _ImageDataset(records, transform, label_ids)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_ClassBatches(dataset.labels, batch_size, per_class, steps, seed),
        num_workers=num_workers,
    )
    loss_fn = TripletMarginLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    step_ends: list[float] = []
    for pixels, labels in loader:
        pixels, labels = pixels.to(device), labels.to(device)
        loss = loss_fn(model(pixels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == 'cuda':
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        if profiler is not None:
            profiler.step_end()
    return step_ends
