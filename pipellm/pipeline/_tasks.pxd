# The C interface of _tasks.pyx: the request path and the planner post work here in C.
cimport cython

from pipellm._ext.locks cimport Lock


@cython.final
cdef class TaskBoard:
    cdef readonly object tasks      # deque: what the workers do next, in order
    cdef object _wake               # SimpleQueue: a token wakes one blocked worker (in C)
    cdef readonly Py_ssize_t idle   # workers blocked, waiting for a token
    cdef readonly Py_ssize_t napping
    cdef long long _news            # bumped whenever workers have new tasks
    cdef public double nap_window_s
    cdef Lock _lock                 # the engine's lock: every method runs with it held
    cpdef wake(self, Py_ssize_t n)
