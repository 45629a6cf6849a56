"""Transfer traces: the version-1 format (read strictly, written exactly), the recorder,
the replayer, workload generators and a summary of what a trace asks of the machine."""

from .format import FORMAT, KINDS, OPS, VERSION, Record, Trace, TraceError, TraceWriter, read, write
from .replay import replay, replay_many
from .summary import summarize

__all__ = ["FORMAT", "KINDS", "OPS", "VERSION", "Record", "Trace", "TraceError", "TraceWriter", "read",
           "replay", "replay_many", "summarize", "write"]
