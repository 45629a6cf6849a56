# cython: language_level=3
"""A mutex the extensions take and give back in C: :class:`Lock`.

It behaves as ``threading.Lock`` for Python code (``with``, ``acquire(blocking,
timeout)``, ``release``, ``locked``; ``threading.Condition`` accepts it), and the
extensions call its ``enter``/``exit`` directly. A ``with`` block on a
``threading.Lock`` in Cython looks up ``__enter__`` and ``__exit__`` and calls them
(bound methods made and freed, argument parsing): ~1k instructions, and a speculative
hit takes five locks (callgrind, docs/figures.md).
"""

from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (NOWAIT_LOCK, PY_LOCK_ACQUIRED, PyLockStatus, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock, PyThread_release_lock)
from time import monotonic

cdef extern from "pythread.h":
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock, long long microseconds, int intr_flag) nogil

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
        self._handle = PyThread_allocate_lock()
        if self._handle is NULL:
            raise MemoryError("could not allocate a lock")

    def __dealloc__(self):
        if self._handle is not NULL:
            if self._held:  # (freeing a held lock is undefined on some platforms)
                PyThread_release_lock(self._handle)
            PyThread_free_lock(self._handle)

    cdef int enter(self) except -1:
        """Take the lock, waiting as long as it takes (GIL released while waiting)."""
        if not PyThread_acquire_lock(self._handle, NOWAIT_LOCK):
            self._acquire_blocking(-1.0)
        self._held = True
        return 0

    cdef bint try_enter(self) noexcept:
        """Take the lock if it is free; False (not taken) otherwise."""
        if PyThread_acquire_lock(self._handle, NOWAIT_LOCK):
            self._held = True
            return True
        return False

    cdef void exit(self) noexcept:
        self._held = False
        PyThread_release_lock(self._handle)

    cdef bint _acquire_blocking(self, double timeout) except -1:
        """Wait for the lock without the GIL, in slices between which signal handlers
        run (and may raise); False once ``timeout`` seconds (>= 0) have passed."""
        cdef PyLockStatus status
        cdef long long wait_us
        cdef double deadline = monotonic() + timeout if timeout >= 0 else 0.0
        while True:
            wait_us = _SLICE_US
            if timeout >= 0:
                wait_us = min(wait_us, max(0, <long long>((deadline - monotonic()) * 1e6)))
            with nogil:
                status = PyThread_acquire_lock_timed(self._handle, wait_us, 0)
            if status == PY_LOCK_ACQUIRED:
                return True
            PyErr_CheckSignals()
            if timeout >= 0 and monotonic() >= deadline:
                return False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock; as ``threading.Lock.acquire``: False if ``blocking`` is false
        and it is taken, or once ``timeout`` seconds (-1: none) have passed."""
        if timeout != -1 and (not blocking or timeout < 0):
            raise ValueError("timeout must be -1 (none) or >= 0, and needs blocking=True")
        if not PyThread_acquire_lock(self._handle, NOWAIT_LOCK):
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
