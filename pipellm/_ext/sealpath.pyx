# cython: language_level=3, boundscheck=False, wraparound=False
"""The cuda device's device-to-host path in C: device memory sealed by the GPU for the
host, over the same table of driver calls and kernels as the host-to-device path."""

from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

from pipellm._ext.driver cimport Driver, check, launch, record_and_wait
from pipellm._ext.drivertable cimport DriverTable
from pipellm._ext.gpupath cimport KeyTables
from pipellm._ext.kernelparams cimport (AAD_MAX, ROW_AAD, ROW_BYTES, ROW_IV, ROW_LEN, ROW_TAG, THREADS, Params,
                                        be_words, chunks_for, ctr_params, ghash_params, tag_params)

from pipellm.errors import ArgumentError, DeviceError


cdef class D2HSealer:
    """Device memory sealed for the host, one message at a time, on the kernel stream
    (behind every commit queued before it): the bytes copied to aligned staging, CTR,
    GHASH over the ciphertext, the tag; ciphertext and tag copied into host memory; one
    wait at the end (the host needs the bytes). Shares its kernels and stream with an
    :class:`H2DPath`."""

    cdef Driver driver
    cdef DriverTable* t
    cdef void* ghash
    cdef void* tag
    cdef void* ctr
    cdef void* stream
    cdef void* done
    cdef uint64_t te, plain, sealed, row_d, acc, ones
    cdef unsigned char* row_h
    cdef readonly size_t capacity

    def __cinit__(self):
        self.t = NULL
        self.row_h = NULL

    def __init__(self, Driver driver not None, tuple functions not None, uintptr_t stream, uint64_t te,
                 size_t capacity, bytes init not None):
        """``functions``: (ghash, tag, ctr) handles; ``init``: 16 zero bytes then a uint32
        1 (kept alive by the caller until the stream passed it)."""
        if len(init) != 20:
            raise ArgumentError(f"init must be 20 bytes (16 zeros, then uint32 1), got {len(init)}")
        cdef uintptr_t f0 = functions[0], f1 = functions[1], f2 = functions[2]
        self.driver, self.t = driver, driver.t
        self.ghash, self.tag, self.ctr = <void*>f0, <void*>f1, <void*>f2
        self.stream, self.te, self.capacity = <void*>stream, te, capacity
        self.plain = driver.alloc(capacity + 16)
        self.sealed = driver.alloc(capacity + 16)
        self.row_d = driver.alloc(ROW_BYTES)
        self.acc = driver.alloc(16)
        self.ones = driver.alloc(16)
        self.row_h = <unsigned char*><uintptr_t>driver.host_alloc(ROW_BYTES)
        self.done = <void*><uintptr_t>driver.event()
        check(self.t, self.t.copy_htod(self.acc, <const char*>init, 16, self.stream), "cuMemcpyHtoDAsync")
        check(self.t, self.t.copy_htod(self.ones, (<const char*>init) + 16, 4, self.stream), "cuMemcpyHtoDAsync")

    def seal(self, KeyTables key not None, const unsigned char[::1] iv not None,
             const unsigned char[::1] aad not None, uint64_t src, size_t nbytes,
             unsigned char[::1] out not None) -> None:
        """Seal ``nbytes`` of device memory at ``src`` into ``out`` (ciphertext || tag)."""
        cdef Params p
        cdef int64_t chunks = chunks_for(AAD_MAX, nbytes), buffer = self.capacity + 16
        cdef uint32_t word
        cdef int i
        if iv.shape[0] != 12 or aad.shape[0] > AAD_MAX or <size_t>out.shape[0] != nbytes + 16:
            raise ArgumentError(f"sealing needs a 12-byte IV (got {iv.shape[0]}), an AAD of at most {AAD_MAX} "
                                f"bytes (got {aad.shape[0]}) and room for the ciphertext and tag "
                                f"({nbytes + 16} bytes, got {out.shape[0]})")
        if nbytes > self.capacity:
            raise ArgumentError(f"a {nbytes}-byte message is larger than the sealer's {self.capacity} bytes")
        if chunks > key.chunks:
            raise DeviceError(f"the key's powers cover {key.chunks} chunks, sealing needs {chunks}")
        t = self.t
        memset(self.row_h, 0, ROW_BYTES)
        be_words(self.row_h + ROW_IV, &iv[0], 12)
        if aad.shape[0]:
            be_words(self.row_h + ROW_AAD, &aad[0], aad.shape[0])
        (<int64_t*>(self.row_h + ROW_LEN))[0] = nbytes
        if nbytes:
            check(t, t.copy_dtod(self.plain, src, nbytes, self.stream), "cuMemcpyDtoDAsync")
        check(t, t.copy_htod(self.row_d, self.row_h, ROW_BYTES, self.stream), "cuMemcpyHtoDAsync")
        ctr_params(&p, self.te, key.round_keys, self.row_d, 1, self.plain, self.sealed, buffer, self.ones)
        launch(t, self.ctr, max(1, ((<int64_t>nbytes + 15) // 16 + THREADS - 1) // THREADS), 1, THREADS, &p,
               self.stream, "ctr_kernel")
        ghash_params(&p, key.h_table, key.powers, key.chunks, self.sealed, buffer, self.row_d, 1, aad.shape[0],
                     self.acc)
        launch(t, self.ghash, (chunks + THREADS - 1) // THREADS, 1, THREADS, &p, self.stream, "ghash_kernel")
        tag_params(&p, self.te, key.round_keys, self.row_d, 1, self.acc, self.ones, 0)
        launch(t, self.tag, 1, 1, THREADS, &p, self.stream, "tag_kernel")
        if nbytes:
            check(t, t.copy_dtoh(&out[0], self.sealed, nbytes, self.stream), "cuMemcpyDtoHAsync")
        check(t, t.copy_dtoh(self.row_h + ROW_TAG, self.row_d + ROW_TAG, 16, self.stream), "cuMemcpyDtoHAsync")
        record_and_wait(t, self.done, self.stream, "waiting for a sealed read")
        for i in range(4):  # the tag's words, big-endian on the wire
            memcpy(&word, self.row_h + ROW_TAG + 4 * i, 4)
            out[nbytes + 4 * i] = (word >> 24) & 0xFF
            out[nbytes + 4 * i + 1] = (word >> 16) & 0xFF
            out[nbytes + 4 * i + 2] = (word >> 8) & 0xFF
            out[nbytes + 4 * i + 3] = word & 0xFF

    def close(self) -> None:
        if self.t == NULL:
            return
        driver = self.driver
        self.t = NULL
        for address in (self.plain, self.sealed, self.row_d, self.acc, self.ones):
            driver.free(address)
        driver.host_free(<uintptr_t>self.row_h)
        driver.event_destroy(<uintptr_t>self.done)
