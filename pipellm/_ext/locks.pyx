# cython: language_level=3
"""A mutex the extensions take and give back in C: :class:`Lock`.

It behaves as ``threading.Lock`` for Python code (``with``, ``acquire(blocking,
timeout)``, ``release``, ``locked``; ``threading.Condition`` accepts it), and the
extensions call its ``enter``/``try_enter``/``exit`` directly: a ``with`` block on a
``threading.Lock`` in Cython looks up ``__enter__`` and ``__exit__`` and calls them
(bound methods made and freed, argument parsing) on every hit.

The lock is a POSIX mutex: taking a free one is a try-lock, and a thread that finds it
taken waits without the GIL. (Python's own ``PyThread`` lock is a semaphore on Linux,
several times the cost of a mutex per round trip: :func:`round_trip_ns`.) As a mutex it
is given back only by the thread that took it. It excludes threads whether or not a GIL
runs, but the request path's other C state still counts on the GIL: on a free-threaded
build importing pipellm's extensions turns the GIL back on (none declares itself
free-threading compatible), and a GIL forced off with ``PYTHON_GIL=0`` or ``-X gil=0``
is refused at import (:func:`_require_gil`).
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (NOWAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, PyThread_type_lock)
import sys
from time import monotonic, perf_counter

from pipellm.errors import ArgumentError, UsageError

cdef extern from *:
    """
    #include <errno.h>
    #include <time.h>
    /* Wait up to `us` microseconds for `m`: 0 once taken, else ETIMEDOUT. (macOS has no
       pthread_mutex_timedlock: there a waiter retries every 50 us.) */
    static int pl_mutex_wait(pthread_mutex_t *m, long long us) {
    #if defined(__APPLE__)
        struct timespec nap = {0, 50000};
        for (long long waited = 0; pthread_mutex_trylock(m) != 0; waited += 50) {
            if (waited >= us) return ETIMEDOUT;
            nanosleep(&nap, NULL);
        }
        return 0;
    #else
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_sec += us / 1000000;
        t.tv_nsec += (us % 1000000) * 1000;
        if (t.tv_nsec >= 1000000000) { t.tv_sec += 1; t.tv_nsec -= 1000000000; }
        return pthread_mutex_timedlock(m, &t);
    #endif
    }
    """
    int pl_mutex_wait(pthread_mutex_t* m, long long us) nogil


def _require_gil():
    """Refuse to run without the GIL: the C fields of the request path rely on it
    (without it two threads could take one IV, and seal it twice)."""
    gil_enabled = getattr(sys, "_is_gil_enabled", None)  # (3.13+)
    if gil_enabled is not None and not gil_enabled():
        raise ImportError("pipellm needs the GIL, and this free-threaded Python runs without it "
                          "(PYTHON_GIL=0 or -X gil=0): run it without that setting, so that "
                          "importing pipellm's extensions turns the GIL back on")


_require_gil()

# a blocked acquire wakes this often (us) to run signal handlers: Ctrl-C still works
cdef long long _SLICE_US = 50_000


@cython.final
cdef class Lock:
    """A non-reentrant mutex, as ``threading.Lock``, except that only the thread holding
    it gives it back (a mutex's rule): ``release()`` elsewhere raises, and ``exit()``
    elsewhere does nothing (a ``with`` block whose re-acquire a signal interrupted, as in
    ``Condition.wait``, must not unlock a lock another thread holds).

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
        if pthread_mutex_init(&self._mutex, NULL) != 0:
            raise MemoryError("could not initialise a mutex")

    def __dealloc__(self):
        # destroyed only unlocked (destroying a held mutex is undefined, and only its
        # holder may unlock it): one a thread died holding, or a forked child inherited
        # held, is left as it is (a process-private mutex holds no other resource)
        if pthread_mutex_trylock(&self._mutex) == 0:
            pthread_mutex_unlock(&self._mutex)
            pthread_mutex_destroy(&self._mutex)

    cdef void _took(self) noexcept:
        self._owner = pthread_self()
        self._owned = True

    cdef bint _mine(self) noexcept:
        return self._owned and pthread_equal(self._owner, pthread_self())

    cdef int enter(self) except -1:
        """Take the lock, waiting as long as it takes (GIL released while waiting)."""
        if not self.try_enter():
            self._acquire_blocking(-1.0)
        return 0

    cdef bint try_enter(self) noexcept:
        """Take the lock if it is free; False (not taken) otherwise."""
        if pthread_mutex_trylock(&self._mutex) != 0:
            return False
        self._took()
        return True

    cdef void exit(self) noexcept:
        """Give the lock back if this thread holds it (else nothing: see the class)."""
        if self._mine():
            self._owned = False
            pthread_mutex_unlock(&self._mutex)

    cdef bint _acquire_blocking(self, double timeout) except -1:
        """Wait for the lock without the GIL, in slices between which signal handlers
        run (and may raise); True once taken, False once ``timeout`` seconds (>= 0) have
        passed."""
        cdef long long wait_us
        cdef int status
        cdef double deadline = monotonic() + timeout if timeout >= 0 else 0.0
        while True:
            wait_us = _SLICE_US
            if timeout >= 0:
                wait_us = min(wait_us, max(0, <long long>((deadline - monotonic()) * 1e6)))
            with nogil:
                status = pl_mutex_wait(&self._mutex, wait_us)
            if status == 0:
                self._took()
                return True
            PyErr_CheckSignals()
            if timeout >= 0 and monotonic() >= deadline:
                return False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock; as ``threading.Lock.acquire``: False if ``blocking`` is false
        and it is taken, or once ``timeout`` seconds (-1: none) have passed."""
        if timeout != -1 and (not blocking or timeout < 0):
            raise ArgumentError("timeout must be -1 (none) or >= 0, and needs blocking=True")
        if self.try_enter():
            return True
        return bool(blocking) and self._acquire_blocking(timeout)

    def release(self) -> None:
        """Give the lock back; UsageError (a RuntimeError, as ``threading.Lock`` raises)
        if this thread does not hold it."""
        if not self._mine():
            raise UsageError("release unlocked lock" if not self.locked() else
                               "release of a lock another thread holds (only its holder gives it back)")
        self.exit()

    def locked(self) -> bool:
        if pthread_mutex_trylock(&self._mutex) == 0:
            pthread_mutex_unlock(&self._mutex)
            return False
        return True

    def __enter__(self):
        self.enter()
        return True

    def __exit__(self, exc_type, exc, tb):
        self.exit()

    def __repr__(self):
        return f"<{'locked' if self.locked() else 'unlocked'} pipellm Lock>"


def round_trip_ns(int n=1_000_000) -> dict:
    """Nanoseconds per uncontended take-and-give-back, in C: this lock's mutex and
    Python's own lock (``PyThread``, a semaphore on Linux), the reason for the first
    (a speculative hit takes about six). ``pipellm bench hotpath`` reports it.

    >>> sorted(round_trip_ns(1000))
    ['pipellm', 'pythread']
    """
    cdef Lock lock = Lock()
    cdef PyThread_type_lock other = PyThread_allocate_lock()
    cdef int i
    if other is NULL:
        raise MemoryError("could not allocate a lock")
    try:
        start = perf_counter()
        for i in range(n):
            lock.enter()
            lock.exit()
        mine = perf_counter() - start
        start = perf_counter()
        for i in range(n):
            PyThread_acquire_lock(other, NOWAIT_LOCK)
            PyThread_release_lock(other)
        theirs = perf_counter() - start
    finally:
        PyThread_free_lock(other)
    return {"pipellm": mine / n * 1e9, "pythread": theirs / n * 1e9}
