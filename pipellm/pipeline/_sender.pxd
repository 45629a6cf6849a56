# The C interface of _sender.pyx: the speculative queue's request path reads and bumps
# these in C.
cimport cython

from pipellm._ext.locks cimport Lock


@cython.final
cdef class Sender:
    cdef readonly object channel, sealer, device, session, pool, timeout
    cdef readonly Py_ssize_t chunk_size
    cdef readonly long long window   # 0: strict order
    cdef readonly Lock lock          # one request at a time in the host-to-device channel
    cdef public long long order      # the number of the current request (see the protocol)
    cdef public int abandon          # flags of the next transfer's first message
