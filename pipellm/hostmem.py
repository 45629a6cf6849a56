"""Host memory the library owns: page-aligned, never sharing a page with other objects,
so pipellm can write-protect it and catch writes (the ``pipellm`` mode's validation)."""

from __future__ import annotations

import numpy as np

from ._ext.writeguard import HostBuffer
from .errors import ArgumentError, ArgumentTypeError


def empty(shape, dtype=np.float32) -> np.ndarray:
    """A numpy array in library-owned host memory (zero-filled, like ``np.zeros``).

    Regions registered from such arrays are write-protected while speculatively
    encrypted, so any later write (numpy, any thread) is caught and nothing stale is sent.

    >>> import pipellm
    >>> a = pipellm.empty((2, 3), dtype="float16"); a.shape, a.dtype.name, float(a.sum())
    ((2, 3), 'float16', 0.0)
    """
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise ArgumentTypeError(f"dtype {dtype} holds Python objects; host memory holds plain data")
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count <= 0 or dtype.itemsize == 0:
        raise ArgumentError(f"host memory needs at least one byte; shape {shape} of {dtype} has none")
    buffer = HostBuffer(count * dtype.itemsize)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


zeros = empty


def array(obj, dtype=None) -> np.ndarray:
    """A copy of ``obj`` in library-owned host memory."""
    src = np.asarray(obj, dtype=dtype)
    out = empty(src.shape, src.dtype)
    np.copyto(out, src)
    return out


def owning_buffer(arr: np.ndarray) -> HostBuffer | None:
    """The library buffer ``arr``'s memory lies in, if any."""
    base = arr
    while base is not None:
        if isinstance(base, HostBuffer):
            start = arr.__array_interface__["data"][0]
            return base if base.address <= start and start + arr.nbytes <= base.address + base.nbytes else None
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return None
