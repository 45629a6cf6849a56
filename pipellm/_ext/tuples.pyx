# cython: language_level=3
"""NamedTuples built in C: :func:`new_tuple`.

A NamedTuple's own constructor is a Python frame, and ``tuple.__new__`` called as a
function builds two argument tuples and a temporary copy. A plan makes
one per prediction and one per transfer event, often on the requesting thread.
"""

from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_SET_ITEM

cdef extern from "Python.h":
    ctypedef PyObject* (*allocfunc)(PyTypeObject*, Py_ssize_t)
    ctypedef struct TypeAlloc "PyTypeObject":  # (the one slot used here)
        allocfunc tp_alloc


def new_tuple(type cls, fields):
    """``tuple.__new__(cls, fields)``: an instance of ``cls`` (a tuple subclass, such as
    a NamedTuple) holding ``fields``, with no Python frame.

    >>> from typing import NamedTuple
    >>> class Point(NamedTuple):
    ...     x: int
    ...     y: int
    >>> new_tuple(Point, (1, 2))
    Point(x=1, y=2)
    """
    cdef Py_ssize_t i, n
    cdef PyObject* made
    if type(fields) is not tuple or cls is tuple or not issubclass(cls, tuple):
        return tuple.__new__(cls, fields)  # (it raises what fits, or copies an iterable)
    n = len(fields)
    made = (<TypeAlloc*><PyObject*>cls).tp_alloc(<PyTypeObject*>cls, n)
    if made == NULL:
        raise MemoryError()
    out = <object>made
    Py_DECREF(out)  # (the cast took a second reference to the new object)
    for i in range(n):
        item = <object>PyTuple_GET_ITEM(fields, i)
        Py_INCREF(item)  # (SET_ITEM steals one)
        PyTuple_SET_ITEM(out, i, item)
    return out
