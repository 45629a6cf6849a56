# cython: language_level=3
"""A device's clock: wall time (``perf_counter``) less the time it stood still.

Every op's modelled end is given on it. A real device's clock never stands still; the
emulated device stops it while a host thread waits only because the emulator lags its
model (its copy engine's AES on the CPU, where an H100's is hardware), and shuts the
``gate`` meanwhile, so host workers, which check the gate, do no work in time the model
does not have (see ``devices/emulated.py``).
"""

import threading
from contextlib import contextmanager
from time import perf_counter

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from pipellm import timeline


cdef double _monotonic() noexcept:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


# ``time.perf_counter()`` without its Python call where it is this clock (Linux)
cdef bint _PERF_IS_MONOTONIC = abs(perf_counter() - _monotonic()) < 1e-3


cdef double _perf_counter() except? -1:
    return _monotonic() if _PERF_IS_MONOTONIC else perf_counter()


cdef class DeviceClock:
    """A running clock, never stalled yet.

    >>> clock = DeviceClock()
    >>> clock.stall(True); frozen = clock.now(); clock.stall(False)
    >>> clock.frozen_s() > 0 and clock.now() >= frozen
    True
    """

    def __init__(self):
        self._since, self._stalled, self._stalling = -1.0, 0.0, 0
        self._lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()

    cpdef double now(self) except? -1:
        """The clock (seconds), on which ``Op.end`` times are given. (Read in C by every
        op, and by a pool reaping slots once per finished op: both fields are written
        together under the GIL, so a reader sees a consistent pair.)"""
        return (_perf_counter() if self._since < 0 else self._since) - self._stalled

    cpdef double frozen_s(self) except? -1:
        """Seconds the clock has stood still so far, the current stall included."""
        return self._stalled + (0.0 if self._since < 0 else _perf_counter() - self._since)

    def stall(self, bint begin) -> None:
        """A host thread starts (``begin``) or stops waiting only because the emulator lags
        the model. While any does, the clock stands still and the gate is shut."""
        cdef double now
        with self._lock:
            if begin:
                if self._stalling == 0:
                    self._since = _perf_counter()
                    self.gate.clear()
                self._stalling += 1
            else:
                self._stalling -= 1
                if self._stalling == 0:
                    now = _perf_counter()
                    since = self._since
                    self._since, self._stalled = -1.0, self._stalled + now - since
                    self.gate.set()
                    if timeline.recording:
                        timeline.span("stall", since, now)

    @contextmanager
    def held(self):
        """The clock stands still (and the gate is shut) inside."""
        self.stall(True)
        try:
            yield
        finally:
            self.stall(False)
