# cython: language_level=3
"""One key's tables on the device (see gpupath.pyx), for sealpath to cimport."""

from libc.stdint cimport int64_t, uint64_t


cdef class KeyTables:
    cdef readonly uint64_t round_keys, h_table, powers
    cdef readonly int64_t chunks
