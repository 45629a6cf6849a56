# The C interface of _request.pyx: the engines' base, whose host-to-device entry a request
# calls in C (the speculative engine's queue overrides it).


cdef class Engine:
    cdef public tuple failure_sources  # each has a ``failure``, None while all is well
    cdef public long long transfers_h2d, transfers_d2h, bytes_h2d, bytes_d2h

    cdef int _to_device(self, region, Py_ssize_t offset, Py_ssize_t nbytes, dst, Py_ssize_t dst_offset,
                        stream) except -1
