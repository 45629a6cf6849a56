# The C interface of _clock.pyx: every op and every pool reap reads a device's clock in C.
cimport cython

cdef double _perf_counter() except? -1  # time.perf_counter(), without a Python call on Linux


@cython.final
cdef class DeviceClock:
    cdef double _since           # perf_counter when the current stall began (-1: running)
    cdef double _stalled         # seconds stood still before it
    cdef Py_ssize_t _stalling    # threads stalled now
    cdef object _lock            # (threading.Lock) stall begin and end
    cdef readonly object gate    # threading.Event: set while host work may proceed
    cpdef double now(self) except? -1
    cpdef double frozen_s(self) except? -1
