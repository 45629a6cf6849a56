# cython: language_level=3, annotation_typing=False
"""The pipeline's transfer requests in C: :class:`Requests` checks the arguments of
``to_device`` and ``to_host`` and hands the request to the mode's engine.

``pipeline/pipeline.py``'s ``Pipeline`` derives from :class:`Requests`, which owns the
fields a request reads. Every request of every mode starts here, and in Python the same checks
were most of a plain request's cost on the requesting thread (``pipellm bench hotpath``;
figures in docs/figures.md). Anything that is not the common case goes to the Python
helpers (``Pipeline._check``, ``region.check_region``, ``check_span``, ``check_int``),
which raise the precise error.
"""

from cpython.object cimport PyObject
from cpython.weakref cimport PyWeakref_GetObject

from pipellm.channel._message cimport Endpoint
from pipellm.pipeline._region cimport RegionBase
from pipellm.devices._submission cimport SessionBase, Submitter, _forked_since
from pipellm import _fork
from pipellm.errors import ArgumentError, ArgumentTypeError
from pipellm.pipeline.region import Region, check_int, check_region, check_span


cdef class Engine:
    """The base of the modes' engines (``pipeline/plain.py``, ``cc.py``,
    ``speculative.py``): a request hands its host-to-device transfer to
    ``_to_device`` in C, which calls the engine's ``to_device`` unless the engine
    overrides it in C (the speculative queue does: a hit has no Python call in it).
    It keeps the transfer counters every mode reports."""

    def __cinit__(self, *args, **kwargs):
        if type(self) is Engine:
            raise ArgumentTypeError("Engine is the C base of the modes' engines: a Pipeline makes its engine")

    def __init__(self, tuple failure_sources):
        """``failure_sources``: what the engine's ``failure()`` reads, each with a
        ``failure`` that is None while all is well (a request reads them in C)."""
        self.failure_sources = failure_sources

    cdef int _to_device(self, region, Py_ssize_t offset, Py_ssize_t nbytes, dst, Py_ssize_t dst_offset,
                        stream) except -1:
        self.to_device(region, offset, nbytes, dst, dst_offset, stream)
        return 0


cdef class Requests:
    """What a request reads, in C: the ``device``, the mode's ``_engine`` (set once the
    Pipeline has built it), the trace ``_recorder`` (None unless recording), the fork
    generation the pipeline was made in, and whether it was closed."""

    def __cinit__(self, *args, **kwargs):
        if type(self) is Requests:
            raise ArgumentTypeError("Requests is the C base of Pipeline: use pipellm.Pipeline")

    def __init__(self, device):
        self.device, self._engine, self._recorder = device, None, None
        self._fork_generation, self._closed = _fork.generation, False

    cdef public object device, _engine, _recorder, _fork_generation
    cdef public bint _closed

    cdef _open(self, region):
        """The pipeline is open and ``region`` is one of its registered regions (else the
        Python helpers raise the error that fits)."""
        if self._closed or _forked_since(self._fork_generation) or _failed(<Engine?>self._engine):
            self._check()
        if not (isinstance(region, Region) and PyWeakref_GetObject((<RegionBase>region)._owner) == <PyObject*>self
                and (<RegionBase>region).registered):
            check_region(self, region)

    def to_device(self, region: Region, offset: int = 0, nbytes: int | None = None, *,
                  dst=None, dst_offset: int | None = None, stream=None):
        """Copy ``region[offset:offset+nbytes]`` to the device; returns the device buffer.

        Without ``dst`` the bytes go to the region's own device copy (allocated on first
        use) at the same offset; with ``dst`` they go to ``dst`` at ``dst_offset`` (0).
        Asynchronous like ``cudaMemcpyAsync``: ordered on ``stream``; in ``cc`` mode it
        returns once the data is encrypted (later host writes can't change what lands).
        """
        cdef RegionBase r
        self._open(region)
        r = region  # (a Region: _open checked)
        offset, nbytes = _span(r, offset, nbytes)
        device = self.device
        stream = device.default_stream if stream is None else device.check_stream(stream)
        if r.incoming is not None:
            region.wait()  # an earlier device-to-host transfer into it lands first
        if dst is None:
            if dst_offset is not None:
                raise ArgumentError("dst_offset needs dst; without dst the region's own device copy is used")
            dst = r.device_buffer
            if dst is None:
                dst = self._device_copy(region)
            dst_offset = offset
        else:
            device.check_buffer(dst)
            dst_offset = 0 if dst_offset is None else check_int("dst_offset", dst_offset)
            if dst_offset + nbytes > dst.nbytes:
                raise ArgumentError(f"{nbytes} bytes at dst_offset {dst_offset} do not fit in {dst!r}")
        if self._recorder is not None:
            self._recorder.h2d(region, offset, nbytes, stream)
        (<Engine?>self._engine)._to_device(region, offset, nbytes, dst, dst_offset, stream)
        return dst

    def to_host(self, src, region: Region, *, src_offset: int = 0, offset: int = 0,
                nbytes: int | None = None, stream=None):
        """Copy device memory back into ``region[offset:offset+nbytes]``; returns a
        :class:`~pipellm.pipeline.transfer.Transfer` to ``wait()`` on. ``nbytes``
        defaults to the rest of the region."""
        self._open(region)
        device = self.device
        device.check_buffer(src)
        if (<RegionBase>region).readonly:
            raise ArgumentError(f"{region!r} is read-only; device-to-host transfers need a writable array")
        offset, nbytes = _span(region, offset, nbytes)
        src_offset = check_int("src_offset", src_offset)
        if src_offset + nbytes > src.nbytes:
            raise ArgumentError(f"{nbytes} bytes at src_offset {src_offset} are out of range of {src!r}")
        stream = device.default_stream if stream is None else device.check_stream(stream)
        if self._recorder is not None:
            self._recorder.d2h(region, offset, nbytes, stream)
        transfer = self._engine.to_host(src, src_offset, region, offset, nbytes, stream)
        overlaps = region.overlaps
        if overlaps:  # other registrations of these bytes: a transfer from them waits for it too
            for other in overlaps:
                (<RegionBase>other).incoming = (<RegionBase>region).incoming
        return transfer


cdef bint _failed(Engine engine) except -1:
    """``engine.failure() is not None``, without its Python frames while none of the
    ``engine.failure_sources`` has failed (the common case, on every request). Sealers,
    openers and our devices hold ``failure`` in C."""
    for source in engine.failure_sources:
        if isinstance(source, Endpoint):
            failure = (<Endpoint>source).failure
        elif isinstance(source, Submitter):
            failure = (<Submitter>source).failure
        elif isinstance(source, SessionBase):
            failure = (<SessionBase>source).failure
        else:
            failure = source.failure
        if failure is not None:
            return engine.failure() is not None
    return False


cdef tuple _span(RegionBase region, offset, nbytes):
    """(offset, nbytes) of a request inside ``region``; ``nbytes`` None means to its end.
    The common case here; anything else (other int types, errors) in ``check_span``."""
    cdef Py_ssize_t size = region.nbytes
    if type(offset) is int and 0 <= offset < size and (
            nbytes is None or (type(nbytes) is int and 0 < nbytes <= size - offset)):
        return offset, (size - offset if nbytes is None else nbytes)
    return check_span(region, size, offset, nbytes)
