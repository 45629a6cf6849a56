"""Record what a pipeline moves, as a version-1 trace (``Pipeline.record``)."""

from __future__ import annotations

from time import perf_counter

from .._ext import writeguard
from .format import Record, TraceWriter

_KINDS = {"weight", "kv", "activation", "other"}


class TraceRecorder:
    """Writes every transfer, compute and synchronize of a pipeline to a trace file.

    CPU writes are recorded as ``write`` records of the whole region, just before the
    region's next host-to-device transfer, when the region's write tracking saw one
    (page protection or ``region.writing()``; writes to untracked regions are not seen).
    Use ``pipe.record(path)`` as a context manager, or call ``close()``.
    """

    def __init__(self, pipeline, path, workload: str = "", meta: dict | None = None):
        self._pipe = pipeline
        self._writer = TraceWriter(path, workload, meta)
        self._start = perf_counter()
        self._generation: dict[int, int] = {}
        self.records = 0
        for region in list(pipeline._regions.values()):
            self.region(region)

    def _t(self) -> float:
        return round((perf_counter() - self._start) * 1e6, 1)

    def _write(self, record: Record) -> None:
        self._writer.write(record._replace(t=self._t()))
        self.records += 1

    @staticmethod
    def _written(region) -> int:
        """The region's write generation, write-protecting it so the next write is seen."""
        if region.guard is None:
            return -1
        region.token()
        return writeguard.state(region.guard) >> 1

    def region(self, region) -> None:
        kind = getattr(region, "kind", None) or "other"
        self._write(Record("region", region.name, None, region.nbytes, None, None,
                           kind if kind in _KINDS else "other"))
        self._generation[region.id] = self._written(region)

    def h2d(self, region, offset: int, nbytes: int, stream) -> None:
        generation = self._written(region)
        if generation != self._generation.get(region.id, generation):
            self._write(Record("write", region.name, 0, region.nbytes))
        self._generation[region.id] = generation
        self._write(Record("h2d", region.name, offset, nbytes, stream.id))

    def d2h(self, region, offset: int, nbytes: int, stream) -> None:
        self._write(Record("d2h", region.name, offset, nbytes, stream.id))

    def compute(self, us: float, stream) -> None:
        self._write(Record("compute", None, None, None, stream.id, float(us)))

    def sync(self, stream) -> None:
        self._write(Record("sync", stream=None if stream is None else stream.id))

    def free(self, region) -> None:
        self._write(Record("free", region.name))

    def close(self) -> None:
        if self._pipe._recorder is self:
            self._pipe._recorder = None
        self._writer.close()

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
