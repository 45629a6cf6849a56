# cython: language_level=3
"""Bounce buffers: a bounded pool of page-aligned, pinned slots in shared memory.

Ciphertext is written straight into a slot (a zero-copy memoryview) and read from it by
the device's DMA. A slot goes back to the pool only after that DMA has completed: the
pool holds each sent slot with a *fence* (anything with ``done() -> bool`` and
``wait_done(timeout) -> bool``) and reuses the slot once the fence is done.
"""

import threading
import warnings
from collections import deque
from time import monotonic

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.errno cimport errno
from libc.string cimport memset, strerror
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mlock, mmap, munlock, munmap
from posix.unistd cimport sysconf, _SC_PAGESIZE

from pipellm.errors import ArgumentError, ChannelClosedError, PinningWarning, TransferTimeoutError

PAGE_BYTES = sysconf(_SC_PAGESIZE)
_warned_unpinned = False


def _memlock_limit():
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"


cdef class BouncePool:
    """``slots`` slots of ``slot_bytes`` each (rounded up to whole pages), mapped once.

    >>> pool = BouncePool(4096, 2)
    >>> slot = pool.acquire()
    >>> view = slot.view(10); view[:2] = b"hi"
    >>> bytes(slot.view(2))
    b'hi'
    >>> pool.release(slot); pool.close()
    """

    cdef char* _base
    cdef size_t _mapped
    cdef readonly size_t slot_bytes
    cdef readonly size_t slots
    cdef readonly bint pinned
    cdef readonly size_t high_water
    cdef size_t _in_use
    cdef Py_ssize_t _exports
    cdef bint _closed
    cdef object _free
    cdef object _inflight
    cdef object _lock
    cdef object _cond
    cdef int _waiters

    def __cinit__(self, size_t slot_bytes, size_t slots):
        self._base = NULL
        if slot_bytes == 0 or slots == 0:
            raise ArgumentError(f"a bounce pool needs at least one slot of at least one byte, "
                                f"got {slots} slots of {slot_bytes} bytes")
        page = PAGE_BYTES
        self.slot_bytes = (slot_bytes + page - 1) // page * page
        self.slots = slots
        self._mapped = self.slot_bytes * slots
        cdef void* p = mmap(NULL, self._mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise MemoryError(f"cannot map {self._mapped} bytes of bounce buffers: {strerror(errno).decode()}")
        self._base = <char*>p
        self.pinned = mlock(p, self._mapped) == 0
        if not self.pinned:
            self._warn_unpinned(errno)
            memset(p, 0, self._mapped)  # fault the pages in now, not on the hot path
        self._free = list(range(slots - 1, -1, -1))
        self._inflight = deque()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0
        self._in_use = 0
        self.high_water = 0
        self._exports = 0
        self._closed = False

    def _warn_unpinned(self, int err):
        global _warned_unpinned
        if not _warned_unpinned:
            _warned_unpinned = True
            warnings.warn(
                f"could not pin {self._mapped} bytes of bounce buffers with mlock "
                f"({strerror(err).decode()}; RLIMIT_MEMLOCK is {_memlock_limit()}); going on unpinned. "
                f"Raise the limit (ulimit -l) or use a smaller pool to pin them.",
                PinningWarning, stacklevel=3)

    def __dealloc__(self):
        self._unmap()

    cdef void _unmap(self) noexcept:
        if self._base != NULL:
            if self.pinned:
                munlock(self._base, self._mapped)
            munmap(self._base, self._mapped)
            self._base = NULL

    @property
    def cap_bytes(self):
        """Bytes of bounce memory this pool maps: it never maps more."""
        return self._mapped

    @property
    def in_use(self):
        """Slots acquired and not yet back in the pool (being filled or in flight)."""
        return self._in_use

    @property
    def closed(self):
        return self._closed

    def acquire(self, timeout=None):
        """A free slot, waiting (up to ``timeout`` seconds) for an in-flight one to
        complete if none is free. Raises :class:`TransferTimeoutError` on timeout."""
        slot = self.try_acquire()
        if slot is not None:
            return slot
        deadline = None if timeout is None else monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise ChannelClosedError("the bounce pool is closed")
                self._reap()
                if self._free:
                    return self._take(self._free.pop())
                remaining = None if deadline is None else max(0.0, deadline - monotonic())
                if self._inflight:
                    index, fence = self._inflight.popleft()
                    self._cond.release()
                    try:
                        ok = fence.wait_done(remaining)
                    finally:
                        self._cond.acquire()
                    if ok:
                        self._in_use -= 1
                        return self._take(index)
                    self._inflight.appendleft((index, fence))
                elif remaining is None or remaining > 0:
                    self._waiters += 1
                    try:
                        self._cond.wait(remaining)
                    finally:
                        self._waiters -= 1
                    continue
                raise TransferTimeoutError(
                    f"no bounce slot came free within {timeout} s: all {self.slots} slots "
                    f"({self._mapped} bytes) are held by transfers that have not completed")

    def try_acquire(self):
        """A free slot now, or None (never waits)."""
        self._lock.acquire()
        try:
            if self._closed:
                raise ChannelClosedError("the bounce pool is closed")
            self._reap()
            return self._take(self._free.pop()) if self._free else None
        finally:
            self._lock.release()

    def try_acquire_many(self, Py_ssize_t count):
        """``count`` free slots now, or None if fewer are free (never waits)."""
        self._lock.acquire()
        try:
            if self._closed:
                raise ChannelClosedError("the bounce pool is closed")
            self._reap()
            if len(self._free) < count:
                return None
            return [self._take(self._free.pop()) for _ in range(count)]
        finally:
            self._lock.release()

    def retire_many(self, slots, fence):
        """``retire`` for several slots read by one DMA."""
        cdef Slot slot
        for slot in slots:
            self._check_slot(slot)
        self._lock.acquire()
        try:
            for slot in slots:
                slot.live = False
                self._inflight.append((slot.index, fence))
            if self._waiters:
                self._cond.notify_all()
        finally:
            self._lock.release()

    @property
    def free_slots(self):
        """Slots that can be acquired now without waiting."""
        self._lock.acquire()
        try:
            self._reap()
            return len(self._free)
        finally:
            self._lock.release()

    cdef _reap(self):
        while self._inflight and self._inflight[0][1].done():
            self._free.append(self._inflight.popleft()[0])
            self._in_use -= 1

    cdef Slot _take(self, Py_ssize_t index):
        self._in_use += 1
        if self._in_use * self.slot_bytes > self.high_water:
            self.high_water = self._in_use * self.slot_bytes
        cdef Slot slot = Slot.__new__(Slot)
        slot.pool = self
        slot.index = index
        slot.capacity = self.slot_bytes
        slot.live = True
        return slot

    def release(self, Slot slot not None):
        """Give back a slot no DMA will read (never sent, or already read)."""
        self._check_slot(slot)
        self._lock.acquire()
        try:
            slot.live = False
            self._free.append(slot.index)
            self._in_use -= 1
            if self._waiters:
                self._cond.notify()
        finally:
            self._lock.release()

    def retire(self, Slot slot not None, fence):
        """Give back a sent slot: it is reused once ``fence.done()``."""
        self._check_slot(slot)
        self._lock.acquire()
        try:
            slot.live = False
            self._inflight.append((slot.index, fence))
            if self._waiters:
                self._cond.notify()
        finally:
            self._lock.release()

    cdef _check_slot(self, Slot slot):
        if slot.pool is not self:
            raise ArgumentError("slot belongs to another pool")
        if not slot.live:
            raise ArgumentError(f"slot {slot.index} was already given back")

    def close(self):
        """Stop handing out slots and unmap the memory once no view of it is alive."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._exports == 0:
            self._unmap()

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        raise BufferError("take views of slots, not of the whole pool")

    cdef int _export(self, Slot slot, Py_buffer* buffer, int flags) except -1:
        if self._base == NULL:
            raise BufferError("bounce pool memory is unmapped")
        PyBuffer_FillInfo(buffer, slot, self._base + slot.index * self.slot_bytes,
                          <Py_ssize_t>self.slot_bytes, 0, flags)
        self._exports += 1
        return 0


cdef class Slot:
    """One bounce slot. ``view(n)`` is a writable memoryview of its first ``n`` bytes."""

    cdef readonly BouncePool pool
    cdef readonly Py_ssize_t index
    cdef readonly size_t capacity
    cdef readonly bint live

    def __init__(self):
        raise TypeError("slots come from BouncePool.acquire()")

    def view(self, Py_ssize_t nbytes):
        if not self.live:
            raise ArgumentError(f"slot {self.index} was given back to its pool")
        if nbytes < 0 or <size_t>nbytes > self.capacity:
            raise ArgumentError(f"a slot holds 0..{self.capacity} bytes, asked for {nbytes}")
        return memoryview(self)[:nbytes]

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        self.pool._export(self, buffer, flags)

    def __releasebuffer__(self, Py_buffer* buffer):
        self.pool._exports -= 1

    def __repr__(self):
        return f"<Slot {self.index} of {self.capacity} bytes{'' if self.live else ' (returned)'}>"
