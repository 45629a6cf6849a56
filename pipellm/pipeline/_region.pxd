# The C interface of _region.pyx: a registered region's fields that every request reads.

cdef class RegionBase:
    cdef public object name, incoming, device_buffer, guard, tracking
    cdef public object _owner  # a weak reference to the pipeline (it holds the region, not back)
    cdef public Py_ssize_t nbytes
    cdef public bint registered, readonly
    cdef public long long lib_seq  # library writes (device-to-host commits) so far
