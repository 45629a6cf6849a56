cimport cython

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, const pthread_mutexattr_t*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_trylock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    ctypedef unsigned long pthread_t  # (opaque: only stored, and compared with pthread_equal)
    pthread_t pthread_self()
    int pthread_equal(pthread_t, pthread_t)


@cython.final  # (its methods called directly from C, not through a table)
cdef class Lock:
    cdef pthread_mutex_t _mutex  # the lock itself
    cdef pthread_t _owner        # the thread holding it, while _owned (set by that thread)
    cdef bint _owned
    cdef void _took(self) noexcept
    cdef bint _mine(self) noexcept
    cdef int enter(self) except -1
    cdef bint try_enter(self) noexcept
    cdef void exit(self) noexcept
    cdef bint _acquire_blocking(self, double timeout) except -1
