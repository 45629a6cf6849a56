# The C interface of bounce.pyx, for the other extensions' request paths (a speculative
# hit takes its GO command's view of a slot and retires the slots it sent without a
# Python call).

from cpython.buffer cimport Py_buffer

from pipellm._ext.locks cimport Lock


cdef class BouncePool:
    cdef char* _base
    cdef size_t _mapped
    cdef readonly size_t pages
    cdef readonly bint pinned
    cdef readonly size_t high_water
    cdef size_t _in_use           # pages taken (being filled, or in flight)
    cdef Py_ssize_t _exports
    cdef bint _closed
    cdef list _free_starts         # sorted first pages of free extents
    cdef dict _free_len            # first page -> pages
    cdef object _inflight          # (first page, pages, fence), in the order sent
    cdef Lock _lock
    cdef object _cond
    cdef int _waiters

    cdef void _unmap(self) noexcept
    cdef object _alloc(self, size_t pages)
    cdef _free(self, size_t start, size_t pages)
    cdef _reap(self)
    cdef size_t _pages_for(self, Py_ssize_t nbytes) except 0
    cdef Slot _slot(self, size_t start, size_t pages)
    cdef object _take(self, size_t pages)
    cdef _retire(self, slots, fence)
    cdef _check_slot(self, Slot slot)
    cpdef bint could_hold(self, sizes) except -1
    cpdef list try_acquire_many(self, sizes)
    cdef int _export(self, object owner, size_t offset, Py_ssize_t nbytes, Py_buffer* buffer,
                     int flags) except -1


cdef class Slot:
    cdef readonly BouncePool pool
    cdef readonly size_t first
    cdef readonly size_t pages
    cdef readonly size_t capacity
    cdef readonly bint live

    cdef object _view(self, Py_ssize_t start, Py_ssize_t stop)


cdef class _Span:
    cdef Slot slot                 # (keeps the slot, and with it the pool, alive)
    cdef Py_ssize_t start, stop    # the bytes of the slot its buffer covers
