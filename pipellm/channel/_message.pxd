# The C interface of _message.pyx, for the other extensions' request paths (a submission
# sizes and owns its messages without a Python call).

from pipellm._ext.locks cimport Lock


cdef class Message:
    cdef public object direction, iv, aad, payload
    cdef public object _owner  # the host's bookkeeping of which transfer this is; not on the wire


cdef class Ticket:
    cdef public long long index, epoch, counter
    cdef public object key  # the epoch's EpochKey
    cdef public bint used

    cdef _set(self, long long index, long long epoch, long long counter, key)


cdef class Endpoint:
    cdef public object label     # "h2d" / "d2h"
    cdef public object failure   # why the channel closed, or None
    cdef public Lock _lock
    cdef public long long messages
    cdef public long long _next, rotate_after
    cdef public list _run_key


cdef list _ticket_run(long long first, Py_ssize_t count, long long rotate_after, key_at, list cache)
cdef list _reserve_run(Endpoint sealer, Py_ssize_t count)
cdef Message _expose(Endpoint sealer, Ticket ticket, Message private, out)
cdef Message _exposed(Endpoint sealer, Message private, out)
cdef int _expose_into(Endpoint sealer, Ticket ticket, Message private, Message public) except -1
