"""Host memory regions registered with a pipeline."""

from __future__ import annotations

import numpy as np

from ..errors import ArgumentError, ArgumentTypeError, UnknownRegionError


class Region:
    """A block of host memory the application transfers. Comes from
    :meth:`pipellm.Pipeline.register`; it wraps the array without copying it."""

    __slots__ = ("name", "id", "array", "view", "nbytes", "dtype", "shape", "readonly",
                 "owner", "device_buffer", "registered")

    def __init__(self, owner, id: int, name: str, array: np.ndarray):
        self.owner, self.id, self.name = owner, id, name
        self.array = array
        flat = array.reshape(-1).view(np.uint8)
        self.view = memoryview(flat)  # flat bytes, zero-copy
        self.nbytes = array.nbytes
        self.dtype, self.shape = array.dtype, array.shape
        self.readonly = not array.flags.writeable
        self.device_buffer = None
        self.registered = True

    def __repr__(self) -> str:
        return f"<Region {self.name!r} {self.nbytes}B {self.dtype}{list(self.shape)}>"


def as_host_array(obj) -> np.ndarray:
    """The numpy view of an object to register, or a precise error."""
    if isinstance(obj, np.ndarray):
        array = obj
    else:
        try:
            memoryview(obj)
        except TypeError:
            raise ArgumentTypeError(
                f"register() takes a numpy array or a buffer-protocol object, got {type(obj).__name__}") from None
        array = np.frombuffer(obj, dtype=np.uint8) if memoryview(obj).c_contiguous else None
        if array is None:
            raise ArgumentError("register() needs C-contiguous memory; this buffer is strided")
    if array.dtype.hasobject:
        raise ArgumentTypeError(f"register() needs plain data; dtype {array.dtype} holds Python objects")
    if not array.flags.c_contiguous:
        raise ArgumentError(
            f"register() needs a C-contiguous array; got strides {array.strides} for shape {array.shape} "
            f"(use np.ascontiguousarray to make a contiguous copy)")
    if array.nbytes == 0:
        raise ArgumentError("register() needs at least one byte; the array is empty")
    return array


def check_int(name: str, value, *, minimum: int = 0) -> int:
    if type(value) is int and value >= minimum:  # the common case, cheaply
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_span(what: str, size: int, offset, nbytes) -> tuple[int, int]:
    """Validate (offset, nbytes) inside ``size`` bytes; nbytes None means 'to the end'."""
    offset = check_int(f"{what} offset", offset)
    if offset >= size:
        raise ArgumentError(f"{what} offset {offset} is out of range: it holds {size} bytes")
    nbytes = size - offset if nbytes is None else check_int(f"{what} nbytes", nbytes, minimum=1)
    if offset + nbytes > size:
        raise ArgumentError(f"{what} span [{offset}, {offset + nbytes}) is out of range: it holds {size} bytes")
    return offset, nbytes


def check_region(owner, region) -> Region:
    if not isinstance(region, Region):
        raise ArgumentTypeError(f"expected a Region from pipeline.register(), got {type(region).__name__}")
    if region.owner is not owner:
        raise UnknownRegionError(f"{region!r} is registered with another pipeline")
    if not region.registered:
        raise UnknownRegionError(f"{region!r} was unregistered")
    return region
