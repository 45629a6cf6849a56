# What a bounce pool waits on before it reuses a slot (fence.pyx).

cdef class Fence:
    cdef public bint finished  # the work really finished (or failed)
    cpdef bint done(self) except -1
