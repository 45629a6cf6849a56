# cython: language_level=3
"""What a bounce pool waits on before it reuses a slot: :class:`Fence`.

A device's ops derive from it (``pipellm/devices/_submission.pyx``), so the pool asks
them in C without knowing what a device is. Any other object with ``finished`` and
``done()`` works too, through Python calls.
"""


cdef class Fence:
    """Work that finishes once: ``done()`` is true once ``finished`` is (a subclass may
    ask more, as an op does of its modelled time).

    >>> f = Fence()
    >>> f.done(), (setattr(f, "finished", True), f.done())[1]
    (False, True)
    """

    cpdef bint done(self) except -1:
        return self.finished
