"""What ``rules.py`` and ``learned.py`` use of Cython's pure-Python mode, as no-ops: the
stand-in for the ``cython`` module where Cython is not installed. Compiled, those
modules are C (Cython reads the declarations); plain, they run as written."""


class _CType:
    """A C type: ``longlong[:]`` (a memoryview) is the same no-op."""

    def __getitem__(self, dimensions):
        return self


Py_ssize_t = int
double = float
bint = bool
compiled = False
longlong = _CType()
ulonglong = _CType()


def cclass(cls):
    return cls


def cfunc(function):
    return function


ccall = cfunc


def locals(*args, **types):   # noqa: A001 - Cython's name
    """Declarations that take arguments (``locals``, ``returns``, ``boundscheck``...): the
    decorator they make changes nothing."""
    return lambda function: function


def declare(type_=None, value=None, **options):
    return value


returns = boundscheck = wraparound = locals
