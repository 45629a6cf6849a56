# cython: language_level=3
"""The speculative engine's task board: what its workers do next (``tasks``, a deque the
request path, the planner and a miss's pieces fill), and how an idle worker learns of
new work. A worker with nothing to do naps (``NAP_US`` at a time, without the GIL) for up
to ``nap_window_s`` after its last task, then blocks on a token: a request hands a napping
worker work by bumping a counter, where waking a blocked thread is a system call (and,
in a VM, an interrupt to an idle core) on the request path. One worker naps at a time
(the others block): napping costs a few percent of a core (docs/design.md).

Every method runs under the engine's lock (given at construction); ``nap`` and ``block``
release it while they wait.
"""

from queue import SimpleQueue
from collections import deque

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec

NAP_US = 200
NAP_WINDOW_S = 0.02
cdef long _NAP_NS = NAP_US * 1000

#: the tasks that are not a chunk to seal ((item, chunk), (item, None) for a GO command
#: ahead) nor a piece of a miss (ondemand.Piece)
RECEIVE = object()    # receive the oldest device-to-host chunks
REPLENISH = object()  # ask the predictor and queue new speculation


cdef extern from *:
    """
    static inline long long pl_load_news(long long *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    """
    long long pl_load_news(long long *p) nogil


cdef double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef class TaskBoard:
    """``TaskBoard(lock)``: an empty board whose methods run under ``lock``."""

    def __init__(self, Lock lock not None):
        self.tasks = deque()
        self._wake = SimpleQueue()
        self.idle = self.napping = 0
        self._news = 0
        self.nap_window_s = NAP_WINDOW_S
        self._lock = lock

    cpdef wake(self, Py_ssize_t n):
        """Wake up to ``n`` idle workers for new tasks: napping ones see the news, blocked
        ones are woken."""
        self._news += 1
        n -= self.napping
        while n > 0 and self.idle:
            self.idle -= 1
            n -= 1
            self._wake.put(None)

    def nap_until(self) -> float:
        """When a worker that has just run out of tasks stops napping (see nap)."""
        return _now() + self.nap_window_s

    def nap(self, double until) -> bool:
        """Nap until there is news for workers or the monotonic clock passes ``until``
        (the lock and the GIL released meanwhile). False, without napping, once ``until``
        has passed or while another worker naps: block."""
        cdef long long seen = self._news
        cdef timespec nap
        if self.napping or _now() >= until:
            return False
        nap.tv_sec, nap.tv_nsec = 0, _NAP_NS
        self.napping += 1
        self._lock.exit()
        try:
            with nogil:
                while pl_load_news(&self._news) == seen and _now() < until:
                    nanosleep(&nap, NULL)
        finally:
            self._lock.enter()
            self.napping -= 1
        return True

    def block(self) -> None:
        """Wait for a token (the lock released meanwhile): ``wake`` puts one, having
        counted this worker out of ``idle``."""
        self.idle += 1
        self._lock.exit()
        try:
            self._wake.get()
        finally:
            self._lock.enter()
