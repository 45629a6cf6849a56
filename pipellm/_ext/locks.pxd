from cpython.pythread cimport PyThread_type_lock


cdef class Lock:
    cdef PyThread_type_lock _handle
    cdef bint _held
    cdef int enter(self) except -1
    cdef bint try_enter(self) noexcept
    cdef void exit(self) noexcept
    cdef bint _acquire_blocking(self, double timeout) except -1
