"""Transfer traces: the version-1 format (read strictly, written exactly), the recorder,
the replayer and workload generators."""

from .format import FORMAT, KINDS, OPS, VERSION, Record, Trace, TraceError, TraceWriter, read, write
from .replay import replay, replay_many

__all__ = ["FORMAT", "KINDS", "OPS", "VERSION", "Record", "Trace", "TraceError", "TraceWriter", "read",
           "replay", "replay_many", "write"]
