# cython: language_level=3
"""The fields of a registered region that every request reads, in C.

``pipeline/region.py``'s ``Region`` derives from :class:`RegionBase` (its ``__init__``
sets the fields; they are declared in ``_region.pxd``), so the request path in
``_request.pyx`` and ``_speculation.pyx`` reads them as struct members: a request reads
about ten of them, each a type lookup and a descriptor call from C otherwise.
"""

from pipellm.errors import ArgumentTypeError


cdef class RegionBase:
    """Base of :class:`pipellm.Region`; not made on its own."""

    def __cinit__(self, *args, **kwargs):
        if type(self) is RegionBase:
            raise ArgumentTypeError("RegionBase is the C base of Region: use Pipeline.register")

    @property
    def owner(self):
        """The pipeline the region was registered with; None once that was collected."""
        return self._owner()
