# cython: language_level=3
"""Byte copies between buffer-protocol objects with the GIL released."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.string cimport memcpy

from pipellm.errors import ArgumentError


def copy_into(dst, src) -> int:
    """Copy all of ``src`` into the start of ``dst`` (a writable buffer at least as large),
    with the GIL released. Returns the number of bytes copied.

    >>> d = bytearray(4); copy_into(d, b"ab")
    2
    >>> bytes(d)
    b'ab\\x00\\x00'
    """
    cdef Py_buffer s
    cdef Py_buffer d
    PyObject_GetBuffer(src, &s, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(dst, &d, PyBUF_SIMPLE | PyBUF_WRITABLE)
        try:
            if d.len < s.len:
                raise ArgumentError(f"destination holds {d.len} bytes, source has {s.len}")
            with nogil:
                memcpy(d.buf, s.buf, <size_t>s.len)
            return s.len
        finally:
            PyBuffer_Release(&d)
    finally:
        PyBuffer_Release(&s)
