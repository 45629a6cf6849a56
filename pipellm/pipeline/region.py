"""Host memory regions registered with a pipeline."""

from __future__ import annotations

import weakref
from collections import deque
from contextlib import contextmanager

import numpy as np

from .._ext import writeguard
from ._region import RegionBase
from ..errors import ArgumentError, ArgumentTypeError, UnknownRegionError
from ..hostmem import owning_buffer


TRACKING = ("auto", "protect", "explicit", "none")
#: library writes remembered per region (older speculation is dropped conservatively)
LIBRARY_LOG = 1024


class Region(RegionBase):
    """A block of host memory the application transfers. Comes from
    :meth:`pipellm.Pipeline.register`; it wraps the array without copying it.

    How writes to it are tracked (what lets the ``pipellm`` mode send ciphertext it
    encrypted earlier without ever sending stale data):

    - ``"protect"``: memory from :func:`pipellm.empty` (library-owned pages). While
      speculatively encrypted it is write-protected; any write faults once, is recorded,
      and proceeds. Kernel writes (``readinto``, ``os.readv``) into protected pages fail
      with EFAULT instead: wrap them in ``with region.writing():``.
    - ``"explicit"``: other memory, when the caller promises to report every write with
      ``region.mark_dirty()`` after writing or ``with region.writing():`` around it.
    - ``"none"``: other memory without that promise: never speculated on (``pipellm``
      mode encrypts it on demand, like ``cc``).
    """

    # (the fields every request reads are RegionBase's, in C: see _region.pyx)
    __slots__ = ("id", "_array", "view", "dtype", "shape", "outgoing", "_alias", "_lib_log", "kind",
                 "overlaps", "_finalizer", "__weakref__")

    def __init__(self, owner, id: int, name: str, array: np.ndarray, tracking: str):
        self.id = id
        self._array = array
        flat = array.reshape(-1).view(np.uint8)
        self.view = memoryview(flat)  # flat bytes, zero-copy
        self.dtype, self.shape = array.dtype, array.shape
        guard = None if tracking == "none" else writeguard.acquire_entry(
            self.view_address(), array.nbytes, tracking == "protect")
        super().__init__(owner, name, array.nbytes, not array.flags.writeable, tracking, guard)
        # a region dropped without unregister() must not leave its guard entry behind (the
        # handler would unprotect whatever is later mapped at those addresses)
        self._finalizer = None if guard is None else weakref.finalize(self, writeguard.release_entry, guard)
        # the pipeline's other registrations sharing bytes with this one (see Pipeline.register)
        self.overlaps: list[Region] = []
        self.outgoing = None  # plain mode: the last copy still reading this region
        # library writes (device-to-host commits) are tracked by span, not by page
        # protection: they go through the buffer's writable alias where there is one
        buffer = owning_buffer(array)
        alias = None if buffer is None else buffer.alias()  # (None in a forked child)
        self._alias = None
        if alias is not None:
            start = self.view_address() - buffer.address
            self._alias = alias[start:start + self.nbytes]
        self._lib_log: deque = deque(maxlen=LIBRARY_LOG)
        self.kind = "other"

    def view_address(self) -> int:
        return self._array.__array_interface__["data"][0]

    @property
    def array(self) -> np.ndarray:
        """The host array, once every device-to-host transfer into it has landed."""
        self.wait()
        return self._array

    def __array__(self, dtype=None, copy=None):
        self.wait()
        return self._array if dtype is None else self._array.astype(dtype)

    def wait(self, timeout: float | None = None) -> None:
        """Block until device-to-host transfers into this region have landed."""
        incoming = self.incoming
        if incoming is not None:
            if not incoming.done():
                incoming.wait(timeout)
            if self.incoming is incoming:
                self.incoming = None

    # -- write tracking ------------------------------------------------------------------
    def token(self):
        """A validation token, or None where the region is not tracked. For protected
        regions this write-protects the pages first."""
        return writeguard.token(self.guard, self.tracking)

    def unchanged_since(self, token) -> bool:
        """True if nothing was written to the region since ``token`` was taken."""
        return writeguard.unchanged(self.guard, token)

    def mark_dirty(self) -> None:
        """Report a write (call it after writing): speculation on the old bytes is dropped,
        by every registration of them (an untracked region included: it reports by address)."""
        if self.guard is not None:
            writeguard.mark_written(self.guard)
        else:
            writeguard.report(self.view_address(), self.nbytes)

    def wait_outgoing(self, timeout: float | None = None) -> None:
        """Block until no plain-mode copy is still reading this region (``cc`` and
        ``pipellm`` copy at request time, so they never need it)."""
        outgoing = self.outgoing
        if outgoing is not None:
            outgoing.wait(timeout)
            self.outgoing = None

    @contextmanager
    def writing(self):
        """``with region.writing(): ...`` around writes the library cannot see (kernel I/O,
        DMA, untracked memory): transfers still reading or filling the region finish
        first, the pages are writable inside, and the write is recorded."""
        self.wait()
        self.wait_outgoing()
        self.mark_dirty()
        try:
            yield self._array
        finally:
            self.mark_dirty()

    @contextmanager
    def library_write(self, offset: int, nbytes: int):
        """The library writes ``nbytes`` at ``offset`` (a device-to-host commit): yields a
        writable view that never faults, and records the span before and after the write
        so speculation on those bytes is dropped: this region's on that span only, any
        other region's over the same memory whole."""
        self._log_write(offset, nbytes)
        try:
            base = self._alias if self._alias is not None else self.view
            yield base[offset:offset + nbytes]
        finally:
            self._log_write(offset, nbytes)

    def _log_write(self, offset: int, nbytes: int) -> None:
        self.lib_seq += 1
        self._lib_log.append((self.lib_seq, offset, offset + nbytes))
        # every other registration of these bytes (here, in another pipeline) learns too
        writeguard.written(self.view_address() + offset, nbytes, self.guard)

    def library_changed(self, since: int, offset: int, nbytes: int) -> bool:
        """True if the library wrote any of ``[offset, offset + nbytes)`` after write
        number ``since`` (conservatively True once the log no longer reaches back)."""
        if since == self.lib_seq:
            return False
        log = tuple(self._lib_log)
        if not log or log[0][0] > since + 1:
            return True
        end = offset + nbytes
        return any(seq > since and start < end and offset < stop for seq, start, stop in log)

    def release(self) -> None:
        """Stop tracking: pages writable again, the guard entry given back."""
        if self.guard is not None:
            self.guard = None
            self._finalizer()  # releases the entry, once

    def __repr__(self) -> str:
        return f"<Region {self.name!r} {self.nbytes}B {self.dtype}{list(self.shape)}>"


def tracking_for(array: np.ndarray, tracking: str) -> str:
    """Resolve the tracking mode of an array to register."""
    if not isinstance(tracking, str) or tracking not in TRACKING:
        raise ArgumentError(f"tracking must be one of {', '.join(TRACKING)}, got {tracking!r}")
    owned = owning_buffer(array) is not None
    if tracking == "auto":
        return "protect" if owned else "none"
    if tracking == "protect" and not owned:
        raise ArgumentError("tracking='protect' needs library-owned memory (pipellm.empty / pipellm.array); "
                            "use tracking='explicit' and report writes with region.writing()")
    return tracking


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


def check_span(what, size: int, offset, nbytes) -> tuple[int, int]:
    """Validate (offset, nbytes) inside ``size`` bytes; nbytes None means 'to the end'.
    ``what`` names the memory in errors (a string, or a region)."""
    what = f"region {what.name!r}" if isinstance(what, Region) else what
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
