# cython: language_level=3
"""The fields of a registered region that every request reads, in C.

``pipeline/region.py``'s ``Region`` derives from :class:`RegionBase`, which declares
(``_region.pxd``) and initialises these fields; the request path in ``_request.pyx`` and
``_speculation.pyx`` reads them as struct members: a request reads about ten of them,
each a type lookup and a descriptor call from C otherwise.
"""

import weakref

from pipellm.errors import ArgumentTypeError


cdef class RegionBase:
    """Base of :class:`pipellm.Region`; not made on its own.

    ``name``, ``nbytes``, ``readonly``: what was registered. ``tracking`` and ``guard``:
    how writes to it are seen (see Region). ``_owner``: the pipeline, held weakly (its
    engine's threads hold the region, and a pipeline dropped unclosed must still be
    collectable). ``registered``: until ``Pipeline.unregister``. ``device_buffer``: its
    device copy once allocated. ``incoming``: the last device-to-host chunk still
    landing in it. ``lib_seq``: library writes (device-to-host commits) so far."""

    def __cinit__(self, *args, **kwargs):
        if type(self) is RegionBase:
            raise ArgumentTypeError("RegionBase is the C base of Region: use Pipeline.register")

    def __init__(self, owner, name, Py_ssize_t nbytes, bint readonly, tracking, guard):
        self._owner, self.name, self.nbytes, self.readonly = weakref.ref(owner), name, nbytes, readonly
        self.tracking, self.guard = tracking, guard
        self.registered, self.device_buffer, self.incoming, self.lib_seq = True, None, None, 0

    @property
    def owner(self):
        """The pipeline the region was registered with; None once that was collected."""
        return self._owner()
