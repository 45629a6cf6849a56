# cython: language_level=3
"""Bounce buffers: a bounded pool of page-aligned, pinned memory in shared memory.

Ciphertext is written straight into a slot (a zero-copy memoryview) and read from it by
the device's DMA. Slots are carved from one mapping in whole pages, as large as each
message needs (first fit, neighbours merged on return), so a 4 KiB message takes a page
and a 4 MiB one a thousand. A slot goes back to the pool only after the DMA that reads
it has completed: the pool holds each sent slot with a *fence* (anything with
``done() -> bool`` and ``wait_done(timeout) -> bool``; one whose ``finished`` attribute,
if it has one, is False counts as not done without a call) and reuses it once the fence
is done.
"""

import threading
import warnings
from collections import deque
from time import monotonic

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.errno cimport errno
from libc.string cimport memset, strerror
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mlock, mmap, munlock, munmap
from posix.unistd cimport sysconf, _SC_PAGESIZE

from pipellm._ext.locks cimport Lock
from pipellm._ext.fence cimport Fence
from pipellm.errors import (
    ArgumentError,
    ArgumentTypeError,
    ChannelClosedError,
    PinningWarning,
    TransferTimeoutError,
)

cdef size_t PAGE = <size_t>sysconf(_SC_PAGESIZE)
PAGE_BYTES = PAGE
_warned_unpinned = False


def _memlock_limit():
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"


cdef class BouncePool:
    """``cap_bytes`` of bounce memory (rounded up to whole pages), mapped once.

    >>> pool = BouncePool(3 * 4096)
    >>> slot = pool.acquire(10)
    >>> view = slot.view(10); view[:2] = b"hi"
    >>> bytes(slot.view(2)), slot.capacity
    (b'hi', 4096)
    >>> pool.release(slot); pool.close()

    (Its fields are declared in ``bounce.pxd``.)
    """

    def __cinit__(self, size_t cap_bytes):
        self._base = NULL
        if cap_bytes == 0:
            raise ArgumentError("a bounce pool needs at least one byte")
        self.pages = (cap_bytes + PAGE - 1) // PAGE
        self._mapped = self.pages * PAGE
        cdef void* p = mmap(NULL, self._mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise MemoryError(f"cannot map {self._mapped} bytes of bounce buffers: {strerror(errno).decode()}")
        self._base = <char*>p
        self.pinned = mlock(p, self._mapped) == 0
        if not self.pinned:
            self._warn_unpinned(errno)
            memset(p, 0, self._mapped)  # fault the pages in now, not on the hot path
        self._free_starts = [0]
        self._free_len = {0: self.pages}
        self._inflight = deque()
        self._lock = Lock()
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
    def address(self):
        """Where the pool's memory starts (0 once unmapped): for devices that register host
        memory for DMA (the cuda device pins it)."""
        return <size_t>self._base

    @property
    def in_use(self):
        """Bytes taken (being filled, or in flight and not yet reaped)."""
        return self._in_use * PAGE

    @property
    def closed(self):
        return self._closed

    # -- extents ------------------------------------------------------------------------
    cdef object _alloc(self, size_t pages):
        """First fit; the first page, or None (lock held)."""
        cdef Py_ssize_t i
        cdef size_t start, length
        for i in range(len(self._free_starts)):
            start = self._free_starts[i]
            length = self._free_len[start]
            if length >= pages:
                del self._free_len[start]
                if length == pages:
                    del self._free_starts[i]
                else:
                    self._free_starts[i] = start + pages
                    self._free_len[start + pages] = length - pages
                self._in_use += pages
                if self._in_use * PAGE > self.high_water:
                    self.high_water = self._in_use * PAGE
                return start
        return None

    cdef _free(self, size_t start, size_t pages):
        """Give an extent back, merged with its free neighbours (lock held)."""
        self._in_use -= pages
        cdef list starts = self._free_starts
        cdef Py_ssize_t i = 0, hi = len(starts), mid
        cdef size_t prev
        while i < hi:  # bisect_left, without a call through the bisect module
            mid = (i + hi) >> 1
            if <size_t>starts[mid] < start:
                i = mid + 1
            else:
                hi = mid
        if i < len(self._free_starts) and self._free_starts[i] == start + pages:
            pages += self._free_len.pop(start + pages)
            del self._free_starts[i]
        if i > 0:
            prev = self._free_starts[i - 1]
            if prev + self._free_len[prev] == start:
                self._free_len[prev] += pages
                return
        self._free_starts.insert(i, start)
        self._free_len[start] = pages

    cdef _reap(self):
        # fences (a device's ops) are asked in C; another fence whose ``finished`` is False is
        # not done: read without calling done() (a Python call on every acquire, while
        # the head of the queue is in flight)
        inflight = self._inflight
        while inflight:
            entry = inflight[0]
            fence = entry[2]
            if isinstance(fence, Fence):
                if not (<Fence>fence).done():
                    return
            elif not getattr(fence, "finished", True) or not fence.done():
                return
            inflight.popleft()
            self._free(entry[0], entry[1])

    cdef size_t _pages_for(self, Py_ssize_t nbytes) except 0:
        if nbytes <= 0:
            raise ArgumentError(f"a slot holds at least one byte, asked for {nbytes}")
        cdef size_t pages = (nbytes + PAGE - 1) // PAGE
        if pages > self.pages:
            raise ArgumentError(f"a message of {nbytes} bytes does not fit a bounce pool of {self._mapped} bytes")
        return pages

    cdef Slot _slot(self, size_t start, size_t pages):
        cdef Slot slot = Slot.__new__(Slot)
        slot.pool = self
        slot.first = start
        slot.pages = pages
        slot.capacity = pages * PAGE
        slot.live = True
        return slot

    # -- taking and giving back ----------------------------------------------------------
    cdef object _take(self, size_t pages):
        """A slot of ``pages`` now, or None (lock held)."""
        if self._closed:
            raise ChannelClosedError("the bounce pool is closed")
        self._reap()
        start = self._alloc(pages)
        return None if start is None else self._slot(start, pages)

    def try_acquire(self, Py_ssize_t nbytes):
        """A slot of at least ``nbytes`` now, or None (never waits)."""
        cdef size_t pages = self._pages_for(nbytes)
        self._lock.enter()
        try:
            return self._take(pages)
        finally:
            self._lock.exit()

    cpdef bint could_hold(self, sizes) except -1:  # (C: a plan asks for every predicted transfer)
        """Whether slots for all of ``sizes`` fit this pool when nothing else is taken."""
        cdef size_t total = 0
        try:
            for n in sizes:
                total += self._pages_for(n)
        except ArgumentError:  # (one alone is larger than the pool, or empty)
            return False
        return total <= self.pages

    cpdef list try_acquire_many(self, sizes):
        """Slots for all of ``sizes`` now, or None and nothing taken (never waits)."""
        need = [self._pages_for(n) for n in sizes]
        self._lock.enter()
        try:
            if self._closed:
                raise ChannelClosedError("the bounce pool is closed")
            self._reap()
            taken = []
            for pages in need:
                start = self._alloc(pages)
                if start is None:
                    for s, p in taken:
                        self._free(s, p)
                    return None
                taken.append((start, pages))
            return [self._slot(s, p) for s, p in taken]
        finally:
            self._lock.exit()

    def acquire(self, Py_ssize_t nbytes, timeout=None):
        """A slot of at least ``nbytes``, waiting (up to ``timeout`` seconds) for in-flight
        slots to complete if the pool is full. Raises :class:`TransferTimeoutError`."""
        cdef size_t pages = self._pages_for(nbytes)
        self._lock.enter()
        try:  # the common case first, without the Condition's Python frames
            slot = self._take(pages)
        finally:
            self._lock.exit()
        if slot is not None:
            return slot
        deadline = None if timeout is None else monotonic() + timeout
        with self._cond:
            while True:
                slot = self._take(pages)
                if slot is not None:
                    return slot
                remaining = None if deadline is None else max(0.0, deadline - monotonic())
                if self._inflight:
                    first, count, fence = self._inflight.popleft()
                    self._cond.release()
                    try:
                        ok = fence.wait_done(remaining)
                    finally:
                        self._cond.acquire()
                    if ok:
                        self._free(first, count)
                        continue
                    self._inflight.appendleft((first, count, fence))
                elif remaining is None or remaining > 0:
                    self._waiters += 1
                    try:
                        self._cond.wait(remaining)
                    finally:
                        self._waiters -= 1
                    continue
                raise TransferTimeoutError(
                    f"no {nbytes}-byte bounce slot came free within {timeout} s: "
                    f"{self._in_use * PAGE} of {self._mapped} bytes are held by transfers "
                    f"that have not completed")

    def release(self, Slot slot not None):
        """Give back a slot no DMA will read (never sent, or already read)."""
        self._check_slot(slot)
        self._lock.enter()
        try:
            slot.live = False
            self._free(slot.first, slot.pages)
            if self._waiters:
                self._cond.notify_all()
        finally:
            self._lock.exit()

    def retire(self, Slot slot not None, fence):
        """Give back a sent slot: it is reused once ``fence.done()``."""
        self._retire((slot,), fence)

    def retire_many(self, slots, fence):
        """``retire`` for several slots read by one DMA."""
        self._retire(slots, fence)

    cdef _retire(self, slots, fence):
        cdef Slot slot
        for slot in slots:
            self._check_slot(slot)
        self._lock.enter()
        try:
            for slot in slots:
                slot.live = False
                self._inflight.append((slot.first, slot.pages, fence))
            if self._waiters:
                self._cond.notify_all()
        finally:
            self._lock.exit()

    @property
    def free_bytes(self):
        """Bytes that can be taken now without waiting (not one extent: see try_acquire)."""
        self._lock.enter()
        try:
            self._reap()
            return (self.pages - self._in_use) * PAGE
        finally:
            self._lock.exit()

    cdef _check_slot(self, Slot slot):
        if slot.pool is not self:
            raise ArgumentError("slot belongs to another pool")
        if not slot.live:
            raise ArgumentError(f"slot at page {slot.first} was already given back")

    def close(self):
        """Stop handing out slots and unmap the memory once no view of it is alive."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._exports == 0:
            self._unmap()

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        raise BufferError("take views of slots, not of the whole pool")

    cdef int _export(self, object owner, size_t offset, Py_ssize_t nbytes, Py_buffer* buffer,
                     int flags) except -1:
        """Export ``nbytes`` at byte ``offset`` of the pool as ``owner``'s buffer (a slot,
        or a span of one): the memory stays mapped until every export is released."""
        if self._base == NULL:
            raise BufferError("bounce pool memory is unmapped")
        PyBuffer_FillInfo(buffer, owner, self._base + offset, nbytes, 0, flags)
        self._exports += 1
        return 0


@cython.no_gc_clear  # (a view of it may be released by the collector after a cycle's clear)
cdef class Slot:
    """Whole pages of a bounce pool. ``view(n)`` is a writable memoryview of the first
    ``n`` bytes. (Its fields are declared in ``bounce.pxd``.)"""

    def __init__(self):
        raise ArgumentTypeError("slots come from BouncePool.acquire()")

    def view(self, Py_ssize_t nbytes):
        return self._view(0, nbytes)

    cdef object _view(self, Py_ssize_t start, Py_ssize_t stop):
        """Bytes ``start:stop`` (``view``, and in C a speculative hit's GO command after
        its chunk): one memoryview of a span of the slot (slicing a view of the whole
        slot would make two)."""
        if not self.live:
            raise ArgumentError(f"the slot at page {self.first} was given back to its pool")
        if start < 0 or stop < start or <size_t>stop > self.capacity:
            raise ArgumentError(f"a slot holds 0..{self.capacity} bytes, asked for bytes {start}..{stop}")
        cdef _Span span = _Span.__new__(_Span)
        span.slot, span.start, span.stop = self, start, stop
        return PyMemoryView_FromObject(span)

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        self.pool._export(self, self.first * PAGE, self.capacity, buffer, flags)

    def __releasebuffer__(self, Py_buffer* buffer):
        if self.pool is not None:
            self.pool._exports -= 1

    def __repr__(self):
        return f"<Slot pages {self.first}+{self.pages}{'' if self.live else ' (returned)'}>"


@cython.no_gc_clear  # (its buffer may be released by the collector after a cycle's clear)
cdef class _Span:
    """Bytes ``start:stop`` of a slot, as a buffer (what :meth:`Slot.view` returns a
    memoryview of)."""

    def __init__(self):
        raise ArgumentTypeError("spans come from Slot.view()")

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        self.slot.pool._export(self, self.slot.first * PAGE + self.start, self.stop - self.start, buffer, flags)

    def __releasebuffer__(self, Py_buffer* buffer):
        if self.slot is not None:
            self.slot.pool._exports -= 1
