# cython: language_level=3
"""The driver table's owner (see driver.pyx), for the path modules to cimport."""

from libc.stdint cimport int64_t

from pipellm._ext.drivertable cimport DriverTable
from pipellm._ext.kernelparams cimport Params


cdef int check(DriverTable* t, int result, str what) except -1
cdef int launch(DriverTable* t, void* function, int64_t gx, int64_t gy, int64_t bx, Params* p, void* stream,
                str what) except -1
cdef int record_and_wait(DriverTable* t, void* event, void* stream, str what) except -1


cdef class Driver:
    cdef DriverTable* t
    cdef object _owner
    cdef readonly str kind
    cdef readonly int device
