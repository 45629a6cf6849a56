cimport cython


cdef inline long long key(long long a, long long b) noexcept nogil:
    """A non-zero 63-bit key for the pair (a, b), chained for longer sequences (splitmix64's
    finalizer). Distinct sequences collide with probability about 2**-63; a collision
    costs a predictor one wrong guess, never wrong data (the pipeline validates what it
    sends)."""
    cdef unsigned long long x = <unsigned long long>a * 0x9E3779B97F4A7C15ULL + <unsigned long long>b
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    x = (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFFULL
    return <long long>x if x != 0 else 1


cdef inline long long pair(long long a, long long b) noexcept nogil:
    """The key of the pair (a, b) in one table: every site that looks a pair up or stores
    it calls this."""
    return key(key(0, a), b)


@cython.final  # (its methods called directly from C, not through a table)
cdef class IntMap:
    cdef object _array
    cdef long long[:] _slots
    cdef readonly Py_ssize_t mask, size
    cpdef long long get(self, long long key, long long default)
    cpdef put(self, long long key, long long value)
    cpdef long long add(self, long long key, long long delta) except? -1
    cdef Py_ssize_t _slot(self, long long key) noexcept
    cdef Py_ssize_t _claim(self, long long key) except -1
    cdef int _grow(self) except -1
