# cython: language_level=3
"""The driver table's owner (see driver.pyx), for the path modules to cimport."""

from pipellm._ext.drivertable cimport DriverTable


cdef int check(DriverTable* t, int result, str what) except -1


cdef class Driver:
    cdef DriverTable* t
    cdef object _owner
    cdef readonly str kind
    cdef readonly int device

    cdef int current(self) except -1
