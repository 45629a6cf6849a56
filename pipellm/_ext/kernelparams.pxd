# cython: language_level=3
"""What the path modules share: the row layout the kernels read, launch sizes, and the
kernels' parameter blocks packed in numba's array ABI (per array: meminfo, parent,
nitems, itemsize, data, shape..., strides..., one 8-byte word each)."""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

# rows: one per staged message, read in place by the kernels
cdef enum:
    ROW_BYTES = 144
    ROW_IV = 0          # 3 big-endian words
    ROW_AAD = 16        # 16 words: the header, zero-padded
    ROW_TAG = 80        # 4 words
    ROW_OFF = 96        # int64: staging offset
    ROW_LEN = 104       # int64: ciphertext bytes
    ROW_DST = 112       # int64: destination address, 0 for none (yet)
    ROW_UPTO = 120      # int64: committed if messages 0..upto of the group verified
    AAD_MAX = 64
    THREADS = 128
    CHUNK_BLOCKS = 64
    MAX_PARAMS = 96     # the largest block (ctr_kernel) is 72 words


cdef struct Params:
    int64_t value[MAX_PARAMS]
    void* slot[MAX_PARAMS]
    int n


cdef inline void scalar(Params* p, int64_t x) noexcept nogil:
    p.value[p.n] = x
    p.n += 1


cdef inline void array1(Params* p, uint64_t data, int64_t n, int64_t itemsize, int64_t stride) noexcept nogil:
    scalar(p, 0)          # meminfo
    scalar(p, 0)          # parent
    scalar(p, n)          # nitems
    scalar(p, itemsize)
    scalar(p, <int64_t>data)
    scalar(p, n)          # shape
    scalar(p, stride)     # strides (bytes)


cdef inline void array2(Params* p, uint64_t data, int64_t rows, int64_t cols, int64_t itemsize,
                        int64_t row_stride) noexcept nogil:
    scalar(p, 0)
    scalar(p, 0)
    scalar(p, rows * cols)
    scalar(p, itemsize)
    scalar(p, <int64_t>data)
    scalar(p, rows)
    scalar(p, cols)
    scalar(p, row_stride)
    scalar(p, itemsize)


cdef inline void be_words(unsigned char* out, const unsigned char* data, Py_ssize_t n) noexcept nogil:
    """``data`` (``n`` bytes) as big-endian 32-bit words in native order (the kernels'
    layout), zero-padded to a whole word."""
    cdef Py_ssize_t i, j
    cdef uint32_t word
    for i in range(0, n, 4):
        word = 0
        for j in range(4):
            word <<= 8
            if i + j < n:
                word |= data[i + j]
        memcpy(out + i, &word, 4)
