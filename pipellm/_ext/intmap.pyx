"""Integer tables for the predictors' hot state: non-zero 63-bit keys (``key``, ``pair``)
to 64-bit values, open addressing with linear probing over one array of (key, value)
pairs. Inside a pipeline each call to a predictor follows a transfer's encryption, which
flushes the CPU caches: a dict keyed by tuples of names costs three or four cache misses
per lookup where these tables cost one, and those misses were most of the predictors'
cost. Compiled predictors cimport the class and the key functions (``intmap.pxd``);
their plain-Python fallbacks call the same class and ``py_key``/``py_pair``."""

cimport cython

import numpy as np

from pipellm.errors import ArgumentError


@cython.final
cdef class IntMap:
    """``IntMap(capacity=64)``: keys from ``key``/``pair`` (never 0) to values; a
    missing key reads as the default given.

    >>> m = IntMap()
    >>> m.put(py_key(1, 2), 7); m.add(py_key(1, 2), 1), m.get(py_key(2, 1), -1)
    (8, -1)
    """

    def __init__(self, Py_ssize_t capacity=64):
        if capacity < 2 or capacity & (capacity - 1):
            raise ArgumentError(f"IntMap capacity must be a power of two >= 2, not {capacity}")
        self._array = np.zeros(2 * capacity, np.int64)
        self._slots = self._array
        self.mask, self.size = capacity - 1, 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _slot(self, long long key) noexcept:
        cdef Py_ssize_t i = key & self.mask
        cdef long long found = self._slots[2 * i]
        while found != key and found != 0:
            i = (i + 1) & self.mask
            found = self._slots[2 * i]
        return i

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cpdef long long get(self, long long key, long long default):
        cdef Py_ssize_t i = self._slot(key)
        return self._slots[2 * i + 1] if self._slots[2 * i] == key else default

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef Py_ssize_t _claim(self, long long key) except -1:
        """The key's slot, the key inserted (value 0) where absent."""
        cdef Py_ssize_t i = self._slot(key)
        if self._slots[2 * i] != key:
            if 2 * (self.size + 1) > self.mask + 1:   # at most half full
                self._grow()
                i = self._slot(key)
            self._slots[2 * i], self._slots[2 * i + 1] = key, 0
            self.size += 1
        return i

    cpdef put(self, long long key, long long value):
        cdef Py_ssize_t i = self._claim(key)   # (first: it may grow the table, a new array)
        self._slots[2 * i + 1] = value

    cpdef long long add(self, long long key, long long delta) except? -1:
        """Add ``delta`` to the key's value (0 if absent); the new value."""
        cdef Py_ssize_t i = self._claim(key)
        self._slots[2 * i + 1] += delta
        return self._slots[2 * i + 1]

    cdef int _grow(self) except -1:
        cdef long long[:] old = self._array
        cdef Py_ssize_t j
        self._array = np.zeros(2 * len(self._array), np.int64)
        self._slots = self._array
        self.mask, self.size = old.shape[0] - 1, 0   # (twice the capacity: len(old) slots)
        for j in range(0, old.shape[0], 2):
            if old[j] != 0:
                self.put(old[j], old[j + 1])
        return 0


def py_key(long long a, long long b) -> int:
    """``key`` for Python callers (the predictors' plain modules)."""
    return key(a, b)


def py_pair(long long a, long long b) -> int:
    """``pair`` for Python callers."""
    return pair(a, b)


def int64s(Py_ssize_t n, bint compiled):
    """An array of n 64-bit integers for a predictor's own rows: numpy's for a compiled
    caller (its typed memoryviews read it as C), a list for a plain one (its elements
    Python integers, as the compiled code's arithmetic gives)."""
    return np.zeros(n, np.int64) if compiled else [0] * n


def doubled(array):
    """``array`` (from ``int64s``) twice as long, the new half zeros."""
    return np.concatenate([array, np.zeros_like(array)]) if isinstance(array, np.ndarray) else array + [0] * len(array)
