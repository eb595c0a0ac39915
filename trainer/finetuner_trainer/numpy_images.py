"""Image preprocessing in numpy for ONNX inference: the timm eval transform without torch tensors.

Decoding, the PIL steps of the transform (resize, centre crop) and a vectorised
``(pixels / 255 - mean) / std`` per image into a reused batch buffer (the same float32 operations as
torchvision's ``ToTensor`` + ``Normalize``), the images of a batch side by side on as many threads
as ONNX Runtime gets (Pillow and numpy release the GIL).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from finetuner_trainer.embedder import decode_image


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
        from torchvision import transforms as T  # heavy: loaded only when a timm transform is converted

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
