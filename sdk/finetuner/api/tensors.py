"""Pixel tensors: how a dataset stores them, and how their layout and scale are read.

Used by the SDK (before anything is uploaded) and by the trainer (which turns a tensor into an
image), so both read a tensor the same way. numpy is imported where a tensor is handled: ``import
finetuner`` never loads it.

**Storage.** A record's ``tensor`` is either nested lists of numbers (hand-written JSONL) or, as the
SDK writes it, a data URI holding the array in numpy's ``.npy`` format, base64-encoded:
``data:application/x-npy;base64,...`` (``;framework=torch`` when it was a torch tensor). ``.npy``
keeps the dtype and the shape, so a dataset pushed and pulled again gives back the same array bit for
bit, in about a quarter of the bytes of JSON lists for ``uint8`` pixels.

**Layout.** docarray loads an image as height x width x channels ``uint8`` (``ImageUrl.load()``,
``ImageBytes.load()``); torch and torchvision use channels x height x width floats in 0-1. Both are
accepted, with 1 (grey), 3 (RGB) or 4 (RGBA) channels, and plain height x width for grey. The
channel axis is the first or the last axis of size 1, 3 or 4; a tensor where both are (``3 x 64 x
4``) or neither is cannot be told apart and is refused with the accepted layouts.

**Scale.** ``uint8`` is 0-255, ``uint16`` 0-65535 (16-bit images), ``bool`` black and white; other
integers must lie in 0-255; floats in 0-1 (the largest value at most 1) or 0-255. A tensor outside
these (negative values: already normalised for a model) is refused: give pixels, the model's own
preprocessing is applied to every image.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

NPY_PREFIX = 'data:application/x-npy'
NPY_URI = NPY_PREFIX + ';base64,'
TORCH_NPY_URI = NPY_PREFIX + ';framework=torch;base64,'
CHANNELS = (1, 3, 4)
ACCEPTED_LAYOUTS = (
    'height x width (grey), height x width x channels (docarray, PIL, numpy) or channels x height x width '
    '(torch, torchvision), with 1, 3 or 4 channels'
)


class TensorError(ValueError):
    """A tensor that is not an image this project can read; the message says what is accepted."""


def to_numpy(tensor: Any) -> Any:
    """A numpy array of a numpy array, a torch tensor (any device, bfloat16 as float32), a docarray
    tensor type or nested lists."""
    import numpy as np

    if hasattr(tensor, 'detach'):  # torch (and docarray's TorchTensor, a torch.Tensor subclass)
        tensor = tensor.detach().cpu()
        if str(tensor.dtype) == 'torch.bfloat16':  # numpy has no bfloat16
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(tensor)


def encode_tensor(tensor: Any) -> str:
    """The data URI of a tensor in ``.npy`` format (dtype and shape kept exactly)."""
    import numpy as np

    array = to_numpy(tensor)
    if array.dtype == object or array.dtype.kind not in 'biuf':
        raise TensorError(f'a tensor of {array.dtype} is not pixels; give numbers (uint8, float, ...)')
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    prefix = TORCH_NPY_URI if hasattr(tensor, 'detach') else NPY_URI
    return prefix + base64.b64encode(buffer.getvalue()).decode('ascii')


def check_encoded(value: str) -> str:
    """``value`` if it is a tensor data URI this module writes (for the Record's validator)."""
    if not value.startswith(NPY_PREFIX) or ';base64,' not in value:
        raise ValueError(
            f'a tensor given as a string must be a {NPY_URI}... data URI (numpy .npy bytes, base64); '
            f'got {value[:40]!r}; give nested lists of numbers or let the SDK encode the array'
        )
    return value


def is_torch(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(TORCH_NPY_URI)


def decode_tensor(value: Any) -> Any:
    """The numpy array of a record's ``tensor`` (a data URI or nested lists)."""
    import numpy as np

    if not isinstance(value, str):
        return np.asarray(value)
    check_encoded(value)
    try:
        raw = base64.b64decode(value.split(';base64,', 1)[1], validate=True)
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (binascii.Error, ValueError, OSError, EOFError) as e:
        raise TensorError(f'the tensor data URI does not hold .npy bytes ({e})') from e


def image_layout(shape: tuple[int, ...]) -> str:
    """'HW', 'HWC' or 'CHW' for an image tensor of this shape; TensorError when it is none or both."""
    if len(shape) == 2 and min(shape) > 0:
        return 'HW'
    if len(shape) == 3 and min(shape) > 0:
        last, first = shape[2] in CHANNELS, shape[0] in CHANNELS
        if last and not first:
            return 'HWC'
        if first and not last:
            return 'CHW'
        if first and last:
            raise TensorError(
                f'a tensor of shape {tuple(shape)} could be channels first or channels last; '
                f'accepted layouts: {ACCEPTED_LAYOUTS}. Give it channels last with a height and width other '
                'than 1, 3 or 4, or its encoded bytes (a PNG) as blob'
            )
    raise TensorError(f'a tensor of shape {tuple(shape)} is not an image; accepted layouts: {ACCEPTED_LAYOUTS}')


def pixel_scale(array: Any) -> float:
    """What multiplies the tensor's values into 0-255 pixels; TensorError for values that are not pixels."""
    import numpy as np

    kind = array.dtype.kind
    if kind == 'b':
        return 255.0
    if array.dtype == np.uint8:
        return 1.0
    if array.dtype == np.uint16:
        return 255.0 / 65535.0
    if array.size == 0:
        raise TensorError('an empty tensor is not an image')
    if kind == 'f' and not np.isfinite(array).all():
        raise TensorError('the tensor holds NaN or infinite values; give pixel values')
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise TensorError(
            f'the tensor values run from {low:g} to {high:g}, not pixels in 0-1 or 0-255 (normalised for a '
            "model?); give the image's pixels: each model applies its own preprocessing"
        )
    if kind == 'f' and high <= 1.0:
        return 255.0
    return 1.0


def to_hwc_uint8(tensor: Any) -> Any:
    """A ``height x width x channels`` uint8 array (1, 3 or 4 channels) of an image tensor."""
    import numpy as np

    array = to_numpy(tensor)
    if array.dtype == object or array.dtype.kind not in 'biuf':
        raise TensorError(f'a tensor of {array.dtype} is not pixels; give numbers (uint8, float, ...)')
    layout = image_layout(array.shape)
    scale = pixel_scale(array)
    if layout == 'HW':
        array = array[:, :, None]
    elif layout == 'CHW':
        array = np.moveaxis(array, 0, -1)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    return np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def check_image_tensor(tensor: Any) -> str:
    """The layout of an image tensor (with its values checked), or TensorError."""
    array = to_numpy(tensor)
    if array.dtype == object or array.dtype.kind not in 'biuf':
        raise TensorError(f'a tensor of {array.dtype} is not pixels; give numbers (uint8, float, ...)')
    layout = image_layout(array.shape)
    pixel_scale(array)
    return layout
