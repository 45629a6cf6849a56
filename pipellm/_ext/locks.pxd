from cpython.pythread cimport PyThread_type_lock


cdef class Lock:
    cdef PyThread_type_lock _wake  # waiters block on it; an exit releases it for them
    cdef bint _held                # the lock's state (the GIL guards it)
    cdef bint _signalled           # _wake is free: a waiter has yet to take the news
    cdef Py_ssize_t _waiters
    cdef int enter(self) except -1
    cdef bint try_enter(self) noexcept
    cdef void exit(self) noexcept
    cdef bint _acquire_blocking(self, double timeout) except -1
