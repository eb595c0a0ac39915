"""Images as every model family gets them: 8-bit RGB, whatever the file or the tensor held.

PIL's ``convert('RGB')`` is right for the usual modes (L, P, RGBA, LA, CMYK, YCbCr, 1) and wrong
for the high-bit-depth ones: a 16-bit PNG (mode ``I;16``) is clipped at 255, so an ordinary photo
becomes almost all white, and a float image (``F``) in 0-1 becomes black. Here:

- ``I;16*``: 0-65535 scaled to 0-255 (``round(v / 257)``, the inverse of how 8 bits widen to 16);
- ``I`` (32-bit integers: 16-bit PNGs in older Pillow, integer TIFFs): 0-255 as is, 0-65535 as 16-bit,
  any other range stretched from its minimum to its maximum;
- ``F`` (32-bit floats): 0-1 times 255, 0-255 as is, any other range stretched;
- a palette image with a transparent colour goes through RGBA, as Pillow asks; RGBA, LA and PA
  lose their alpha channel as in ``convert('RGB')`` (what timm, CLIP's processor and
  sentence-transformers do, so a model trained here sees what it will see elsewhere);
- everything else: Pillow's ``convert('RGB')``.

A pixel tensor (see :mod:`finetuner.api.tensors` for its layouts and scales) becomes the same kind
of image, stored as lossless PNG bytes so that it travels through the data loader like any image.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from finetuner.api.tensors import to_hwc_uint8

SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _eight_bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Grey values of a high-bit-depth image (mode I;16*, I or F) as 0-255 (see the module's docstring)."""
    if mode in SIXTEEN_BIT_MODES:
        return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    values = values.astype(np.float64)
    values = np.where(np.isfinite(values), values, 0.0)
    low, high = float(values.min(initial=0)), float(values.max(initial=0))
    if mode == 'F' and low >= 0 and high <= 1:
        return np.rint(values * 255).astype(np.uint8)
    if low >= 0 and high <= 255:
        return np.rint(values).astype(np.uint8)
    if mode == 'I' and low >= 0 and high <= 65535:
        return np.rint(values / 257.0).astype(np.uint8)
    return _stretch(values)


def to_rgb(image: Any) -> Any:
    """An 8-bit RGB ``PIL.Image`` of any Pillow image (see the module's docstring)."""
    from PIL import Image  # Pillow is loaded where images are handled: text-only runs never need it

    mode = image.mode
    if mode == 'RGB':
        return image
    if mode in SIXTEEN_BIT_MODES or mode in ('I', 'F'):
        return Image.fromarray(_eight_bit(np.asarray(image), mode)).convert('RGB')
    if mode == 'P' and 'transparency' in image.info:
        return image.convert('RGBA').convert('RGB')
    return image.convert('RGB')


def decode_image(data: bytes) -> Any:
    """The 8-bit RGB ``PIL.Image`` of encoded image bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def tensor_image(tensor: Any) -> Any:
    """The 8-bit RGB ``PIL.Image`` of a pixel tensor (TensorError when it is not an image)."""
    from PIL import Image

    pixels = to_hwc_uint8(tensor)
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)  # L, RGB or RGBA
    return to_rgb(image)


def tensor_png(tensor: Any) -> bytes:
    """Lossless PNG bytes of a pixel tensor's RGB image (fast compression: it is decoded again soon)."""
    out = io.BytesIO()
    tensor_image(tensor).save(out, format='PNG', compress_level=1)
    return out.getvalue()
