# The C interface of _submission.pyx, for the other extensions' request paths (a speculative
# hit submits its messages, a pool reaps finished ops, without a Python call).

from pipellm._ext.fence cimport Fence
from pipellm.devices._clock cimport DeviceClock
from pipellm._ext.locks cimport Lock

cdef bint _forked_since(generation) except -1  # generation != _fork.generation, in C


cdef class Stream:
    cdef readonly object device
    cdef readonly Py_ssize_t id
    cdef public Op _last               # the newest op submitted on it
    cdef public object _pending        # deque of its ops not yet dropped as finished
    cdef public Lock _lock


cdef class SessionBase:
    cdef public set pending            # its ops not yet finished
    cdef public object failure         # why the session failed, or None


cdef class Op(Fence):
    cdef public object device, kind, stream, session, prev, error, args, on_delivered
    cdef public long long seq
    cdef public Py_ssize_t nbytes
    cdef public Py_ssize_t remaining  # messages of it not yet committed
    cdef public double submit_t
    cdef public double end            # modelled completion time (on the device's clock)

    cdef _set(self, device, kind, stream, Py_ssize_t nbytes, session, tuple args, on_delivered)
    cpdef bint done(self) except -1


cdef class Submitter:
    cdef public object _queue          # SimpleQueue: the copy engine takes ops from it
    cdef public object _put            # its put (bound once: every submission calls it)
    cdef public Lock _submit_lock
    cdef public dict _sessions         # session id -> the device's end of a channel
    cdef public long long _seq         # ops submitted so far
    cdef public bint _closed           # (Device's state, read here without a Python call)
    cdef public object failure
    cdef public object _fork_generation
    cdef readonly DeviceClock clock    # the device's clock (its stalls: the emulated device's)

    cpdef double now(self) except? -1
    cpdef double frozen_s(self) except? -1
    cpdef Op _submit(self, Op op)
    cpdef _session(self, session)
    cpdef Op submit_messages(self, stream, session, msgs)
