# The C interface of writeguard.pyx: the validation tokens speculation takes when it
# plans an item and checks on every hit, without a Python call.

cpdef token(guard, tracking)
cpdef bint unchanged(guard, token) except -1
