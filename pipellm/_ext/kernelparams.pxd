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


cdef inline int64_t chunks_for(int64_t aad_bytes, int64_t nbytes) noexcept nogil:
    """GHASH chunks (CHUNK_BLOCKS blocks each) of a message: its AAD, its ciphertext and
    the length block; the key's powers of H must cover that many."""
    return ((aad_bytes + 15) // 16 + (nbytes + 15) // 16 + 1 + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS


# The three AES-GCM kernels' blocks over ``n`` messages whose rows start at ``rows``
# (device memory laid out as above): the fields are strided views of the rows.

cdef inline void ghash_params(Params* p, uint64_t h_table, uint64_t powers, int64_t chunks, uint64_t data,
                              int64_t data_bytes, uint64_t rows, int64_t n, int64_t aad_bytes,
                              uint64_t acc) noexcept nogil:
    """ghash_kernel(h_table, powers, data32, offs, lens, aad32, aad_len, acc)"""
    p.n = 0
    array1(p, h_table, 2048, 4, 4)
    array2(p, powers, chunks, 4, 4, 16)
    array1(p, data, data_bytes // 4, 4, 4)
    array1(p, rows + ROW_OFF, n, 8, ROW_BYTES)
    array1(p, rows + ROW_LEN, n, 8, ROW_BYTES)
    array2(p, rows + ROW_AAD, n, AAD_MAX // 4, 4, ROW_BYTES)
    scalar(p, aad_bytes)
    array2(p, acc, n, 4, 4, 16)


cdef inline void tag_params(Params* p, uint64_t te, uint64_t round_keys, uint64_t rows, int64_t n, uint64_t acc,
                            uint64_t ok, int64_t verify) noexcept nogil:
    """tag_kernel(te, rk, ivs, acc, tags, ok, check): ``verify`` compares with the rows'
    tags into ``ok``, else writes the tags there"""
    p.n = 0
    array1(p, te, 256, 4, 4)
    array1(p, round_keys, 60, 4, 4)
    array2(p, rows + ROW_IV, n, 3, 4, ROW_BYTES)
    array2(p, acc, n, 4, 4, 16)
    array2(p, rows + ROW_TAG, n, 4, 4, ROW_BYTES)
    array1(p, ok, n, 4, 4)
    scalar(p, verify)


cdef inline void ctr_params(Params* p, uint64_t te, uint64_t round_keys, uint64_t rows, int64_t n, uint64_t src,
                            uint64_t dst, int64_t buffer_bytes, uint64_t ok) noexcept nogil:
    """ctr_kernel(te, rk, ivs, src32, src_offs, dst8, dst32, dst_offs, lens, ok): each
    message from ``src`` to ``dst`` at its row's offset (both ``buffer_bytes`` long)"""
    p.n = 0
    array1(p, te, 256, 4, 4)
    array1(p, round_keys, 60, 4, 4)
    array2(p, rows + ROW_IV, n, 3, 4, ROW_BYTES)
    array1(p, src, buffer_bytes // 4, 4, 4)
    array1(p, rows + ROW_OFF, n, 8, ROW_BYTES)
    array1(p, dst, buffer_bytes, 1, 1)
    array1(p, dst, buffer_bytes // 4, 4, 4)
    array1(p, rows + ROW_OFF, n, 8, ROW_BYTES)
    array1(p, rows + ROW_LEN, n, 8, ROW_BYTES)
    array1(p, ok, n, 4, 4)
