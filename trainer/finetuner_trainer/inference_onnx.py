"""Embedding with the ONNX graphs of an artifact (``get_model(..., is_onnx=True).encode(...)``).

The artifact folder holds the model in its library's format plus ``onnx/`` (see
:mod:`finetuner_trainer.onnx_export`). Preprocessing follows the embedder's own, read from the same
folder, without torch tensors in between:

- text: the artifact's (fast) tokenizer with dynamic padding, returning int64 numpy arrays. Texts are
  batched longest first by token count, in the batches the torch embedder uses
  (:func:`~finetuner_trainer.models.plan_batches`), so that a batch pads to a length close to its
  texts' own (embeddings are returned in input order);
- timm images: decoding, the PIL steps of the timm transform (resize, centre crop) and a vectorised
  ``(pixels / 255 - mean) / std`` per image into a reused batch buffer (the same float32 operations as
  torchvision's ``ToTensor`` + ``Normalize``), the images of a batch side by side on as many threads as
  ONNX Runtime gets (Pillow and numpy release the GIL);
- anything else (CLIP images, tensors, an unfamiliar transform): the embedder's own ``collate``.

The network itself runs in ONNX Runtime with all graph optimisations on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from finetuner.api.layout import Record
from finetuner_trainer.onnx_export import EXPORT_MANIFEST, ONNX_DIR, OUTPUT_NAME, ort_session


class NumpyImageTransform:
    """The timm eval transform (PIL steps, then ``ToTensor`` + ``Normalize``) as PIL + numpy on a batch.

    Built only from a transform whose tail is exactly ``ToTensor``/``MaybeToTensor`` then ``Normalize``
    (see :meth:`from_transform`); the PIL steps before it are the transform's own objects, so the pixels
    are identical to the torch path's."""

    def __init__(
        self, pil_steps: Sequence[Any], mean: Sequence[float], std: Sequence[float], threads: int | None = None
    ):
        self.pil_steps = list(pil_steps)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self.threads = max(1, threads or available_cpus())
        self._pool: ThreadPoolExecutor | None = None  # made on the first batch of more than one image
        self._out: np.ndarray | None = None  # (n, 3, h, w) float32, reused while the batch shape repeats

    @classmethod
    def from_transform(cls, transform: Any, threads: int | None = None) -> NumpyImageTransform | None:
        """The numpy version of a torchvision ``Compose``, or None when its steps are not the familiar ones."""
        from torchvision import transforms as T

        steps = list(getattr(transform, 'transforms', []))
        if len(steps) < 2:
            return None
        to_tensor, normalize = steps[-2], steps[-1]
        # timm's MaybeToTensor subclasses ToTensor; a ToTensor subclass with its own logic would not match.
        if not isinstance(to_tensor, T.ToTensor) or type(to_tensor).__name__ not in ('ToTensor', 'MaybeToTensor'):
            return None
        if type(normalize) is not T.Normalize:
            return None
        pil_steps = steps[:-2]
        if not all(type(step) in (T.Resize, T.CenterCrop) for step in pil_steps):
            return None
        mean = [float(v) for v in np.asarray(normalize.mean, dtype=np.float32).reshape(-1)]
        std = [float(v) for v in np.asarray(normalize.std, dtype=np.float32).reshape(-1)]
        return cls(pil_steps, mean, std, threads)

    def pil_image(self, data: bytes) -> Any:
        from finetuner_trainer.models import decode_image

        image = decode_image(data)
        for step in self.pil_steps:
            image = step(image)
        return image

    def map(self, work: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``work`` over ``items`` on the transform's threads (Pillow's decoders and resampling and
        numpy's arithmetic release the GIL, so images are prepared side by side)."""
        if self.threads == 1 or len(items) < 2:
            return [work(item) for item in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix='finetuner-image')
        return list(self._pool.map(work, items))

    def __call__(self, images: Sequence[bytes]) -> np.ndarray:
        """(n, 3, h, w) float32 pixel values of encoded images, ready for the graph."""
        pil = self.map(self.pil_image, images)
        shape = (len(pil), 3, pil[0].height, pil[0].width) if pil else (0, 3, 0, 0)
        if any((image.height, image.width) != shape[2:] for image in pil):
            raise ValueError(f'the image transform made images of different sizes: {[image.size for image in pil]}')
        if self._out is None or self._out.shape != shape:
            self._out = np.empty(shape, dtype=np.float32)
        out = self._out

        def normalise(i: int) -> None:
            # The float32 operations of torchvision's to_tensor (x / 255) and normalize ((x - mean) / std),
            # one image at a time (element-wise: the same values as over the whole batch).
            pixels = np.asarray(pil[i], dtype=np.uint8).transpose(2, 0, 1)
            np.divide(pixels, np.float32(255), out=out[i], dtype=np.float32)
            out[i] -= self.mean
            out[i] /= self.std

        self.map(normalise, range(len(pil)))
        return out


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OnnxEmbedder:
    """ONNX Runtime sessions for each kind of content (image, text) and the preprocessing that feeds them."""

    def __init__(
        self,
        preprocessor: Any,
        sessions: dict[str, Any],
        inputs: dict[str, list[str]],
        threads: int | None = None,
    ):
        self.preprocessor = preprocessor
        self.sessions = sessions
        self.inputs = inputs
        family = getattr(preprocessor, 'family', '')
        transform = getattr(preprocessor, 'transform', None) if family == 'timm' else None
        self.image_transform = NumpyImageTransform.from_transform(transform, threads) if transform is not None else None
        self.tokenizer = getattr(preprocessor, 'tokenizer', None) if family == 'text' else None

    @classmethod
    def load(cls, directory: Path | str, threads: int | None = None) -> OnnxEmbedder:
        """Open an artifact folder that contains ``onnx/export.json`` (a run with ``toOnnx: true``)."""
        directory = Path(directory)
        manifest_path = directory / ONNX_DIR / EXPORT_MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(
                f'{directory} has no ONNX model ({ONNX_DIR}/{EXPORT_MANIFEST}); fine-tune with to_onnx=True '
                'to get one, or load the model without is_onnx'
            )
        manifest = json.loads(manifest_path.read_text())
        from finetuner_trainer.models import load_embedder

        preprocessor = load_embedder(directory)
        sessions = {
            kind: ort_session(directory / ONNX_DIR / graph['file'], threads)
            for kind, graph in manifest['graphs'].items()
        }
        inputs = {kind: list(graph['inputs']) for kind, graph in manifest['graphs'].items()}
        return cls(preprocessor, sessions, inputs, threads)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.sessions)

    def graph_kind(self, kind: str) -> str:
        graph_kind = 'image' if kind == 'tensor' and 'image' in self.sessions else kind
        if graph_kind not in self.sessions:
            raise ValueError(f'this ONNX model embeds {", ".join(self.kinds)}, not {kind}')
        return graph_kind

    def feeds(self, kind: str, items: Sequence[Any]) -> dict[str, np.ndarray]:
        """The graph inputs (numpy) for items of one kind, made by the artifact's preprocessing.

        Image pixels are written into a buffer that the next call reuses: copy them to keep them."""
        graph_kind = self.graph_kind(kind)
        names = self.inputs[graph_kind]
        if kind == 'text' and self.tokenizer is not None:
            encoded = self.tokenizer(
                [item.text or '' for item in items],
                padding=True,
                truncation=True,
                max_length=self.preprocessor.max_length,
                return_tensors='np',
            )
            return {name: np.asarray(encoded[name], dtype=np.int64) for name in names}
        if kind == 'image' and self.image_transform is not None and names == ['pixel_values']:
            return {'pixel_values': self.image_transform([item.image for item in items])}
        inputs = self.preprocessor.collate_kind(kind, list(items))
        return {name: inputs[name].cpu().numpy() for name in names}

    def run(self, kind: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        (embeddings,) = self.sessions[self.graph_kind(kind)].run([OUTPUT_NAME], feeds)
        return embeddings

    def plan(self, items: Sequence[Any], batch_size: int) -> list[tuple[str, list[int]]]:
        """The batches :meth:`encode` runs: (kind, positions of its items), at most ``batch_size`` each.

        Items are grouped by kind; within a kind the batches are the torch embedder's
        (:func:`~finetuner_trainer.models.plan_batches` over the tokenizer's counts): texts longest
        first, cut where padding would cost more than another batch; images in input order."""
        from finetuner_trainer.models import plan_batches

        if batch_size < 1:
            raise ValueError(f'batch_size must be at least 1, got {batch_size}')
        batches = []
        for kind in sorted({item.kind for item in items}):
            positions = [i for i, item in enumerate(items) if item.kind == kind]
            lengths = self.preprocessor.token_lengths([items[i] for i in positions]) if kind == 'text' else None
            for chosen in plan_batches(lengths or [0] * len(positions), batch_size):
                batches.append((kind, [positions[i] for i in chosen]))
        return batches

    def encode(self, records: Sequence[Record | Any], batch_size: int = 32) -> np.ndarray:
        """(n, dim) float32 embeddings of records (or items), in input order (batches: :meth:`plan`)."""
        from finetuner_trainer.models import as_item

        items = [as_item(record) for record in records]
        out: np.ndarray | None = None
        for kind, chosen in self.plan(items, batch_size):
            embeddings = self.run(kind, self.feeds(kind, [items[i] for i in chosen]))
            if out is None:
                out = np.zeros((len(items), embeddings.shape[-1]), dtype=np.float32)
            out[np.asarray(chosen)] = embeddings
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)
