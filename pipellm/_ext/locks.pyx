# cython: language_level=3
"""A mutex the extensions take and give back in C: :class:`Lock`.

It behaves as ``threading.Lock`` for Python code (``with``, ``acquire(blocking,
timeout)``, ``release``, ``locked``; ``threading.Condition`` accepts it), and the
extensions call its ``enter``/``exit`` directly. A ``with`` block on a
``threading.Lock`` in Cython looks up ``__enter__`` and ``__exit__`` and calls them
(bound methods made and freed, argument parsing), and a speculative hit takes five
locks (figures in docs/figures.md).

Every caller holds the GIL (the extensions' C and Python code alike), so the lock's
state is a flag the GIL protects: taking a free lock is a test and a store, less than
an OS lock's try-acquire, five times per hit. Only a thread that
finds it taken waits, without the GIL, on an OS lock used as a wake-up signal. (A
free-threaded Python build would need atomics here; pipellm targets GIL builds. On a
free-threaded build importing pipellm's extensions turns the GIL back on, as for any
extension that does not declare itself free-threading compatible; one forced off with
``PYTHON_GIL=0`` or ``-X gil=0`` is refused at import: see :func:`_require_gil`.)
"""

from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (NOWAIT_LOCK, PY_LOCK_ACQUIRED, PyLockStatus, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock, PyThread_release_lock)
import sys
from time import monotonic

cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock, long long microseconds, int intr_flag) nogil


def _require_gil():
    """Refuse to run without the GIL: this lock, and the C fields of the request path it
    guards, rely on it (without it two threads could take one lock, and an IV be sealed
    twice)."""
    gil_enabled = getattr(sys, "_is_gil_enabled", None)  # (3.13+)
    if gil_enabled is not None and not gil_enabled():
        raise ImportError("pipellm needs the GIL, and this free-threaded Python runs without it "
                          "(PYTHON_GIL=0 or -X gil=0): run it without that setting, so that "
                          "importing pipellm's extensions turns the GIL back on")


_require_gil()

# a blocked acquire wakes this often (us) to run signal handlers: Ctrl-C still works
cdef long long _SLICE_US = 50_000


cdef class Lock:
    """A non-reentrant mutex, as ``threading.Lock``.

    >>> lock = Lock()
    >>> with lock:
    ...     lock.locked()
    True
    >>> lock.acquire(timeout=0.01), lock.acquire(timeout=0.01)
    (True, False)
    >>> lock.release(); lock.locked()
    False
    """

    def __cinit__(self):
        # the wake-up signal: held, except from an exit that had waiters until one of
        # them takes it (``_signalled``)
        self._wake = PyThread_allocate_lock()
        if self._wake is NULL:
            raise MemoryError("could not allocate a lock")
        PyThread_acquire_lock(self._wake, NOWAIT_LOCK)

    def __dealloc__(self):
        if self._wake is not NULL:
            if not self._signalled:  # (freeing a held lock is undefined on some platforms)
                PyThread_release_lock(self._wake)
            PyThread_free_lock(self._wake)

    cdef int enter(self) except -1:
        """Take the lock, waiting as long as it takes (GIL released while waiting)."""
        if self._held:
            self._acquire_blocking(-1.0)
        self._held = True
        return 0

    cdef bint try_enter(self) noexcept:
        """Take the lock if it is free; False (not taken) otherwise."""
        if self._held:
            return False
        self._held = True
        return True

    cdef void exit(self) noexcept:
        self._held = False
        if self._waiters and not self._signalled:
            self._signalled = True
            PyThread_release_lock(self._wake)

    cdef bint _acquire_blocking(self, double timeout) except -1:
        """Wait for the lock without the GIL, in slices between which signal handlers
        run (and may raise); True once it is free (the caller takes it, GIL held all the
        way), False once ``timeout`` seconds (>= 0) have passed."""
        cdef long long wait_us
        cdef PyLockStatus status
        cdef double deadline = monotonic() + timeout if timeout >= 0 else 0.0
        self._waiters += 1
        try:
            while self._held:
                wait_us = _SLICE_US
                if timeout >= 0:
                    wait_us = min(wait_us, max(0, <long long>((deadline - monotonic()) * 1e6)))
                with nogil:
                    status = PyThread_acquire_lock_timed(self._wake, wait_us, 0)
                if status == PY_LOCK_ACQUIRED:
                    self._signalled = False
                if not self._held:
                    return True
                PyErr_CheckSignals()
                if timeout >= 0 and monotonic() >= deadline:
                    return False
            return True
        finally:
            self._waiters -= 1

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock; as ``threading.Lock.acquire``: False if ``blocking`` is false
        and it is taken, or once ``timeout`` seconds (-1: none) have passed."""
        if timeout != -1 and (not blocking or timeout < 0):
            raise ValueError("timeout must be -1 (none) or >= 0, and needs blocking=True")
        if self._held:
            if not blocking or not self._acquire_blocking(timeout):
                return False
        self._held = True
        return True

    def release(self) -> None:
        """Give the lock back; RuntimeError if it is not taken."""
        if not self._held:
            raise RuntimeError("release unlocked lock")
        self.exit()

    def locked(self) -> bool:
        return self._held

    def __enter__(self):
        self.enter()
        return True

    def __exit__(self, exc_type, exc, tb):
        self.exit()

    def __repr__(self):
        return f"<{'locked' if self._held else 'unlocked'} pipellm Lock>"
