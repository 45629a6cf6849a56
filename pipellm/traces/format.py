"""Transfer traces, format version 1 (``shared/spec/trace-format.md``): read strictly,
write exactly.

>>> import io
>>> text = '{"format": "pipellm-trace", "version": 1, "workload": "demo"}\\n' \\
...        '{"op": "region", "id": "w0", "nbytes": 4096, "kind": "weight"}\\n' \\
...        '{"op": "h2d", "region": "w0", "offset": 0, "nbytes": 4096}\\n'
>>> trace = parse(io.StringIO(text), "demo.jsonl")
>>> trace.workload, [r.op for r in trace.records]
('demo', ['region', 'h2d'])
"""

from __future__ import annotations

import gzip
import io
import json
import os
from typing import Iterable, Iterator, NamedTuple

from ..errors import TraceError  # (importable from here too)

FORMAT = "pipellm-trace"
VERSION = 1
OPS = ("region", "h2d", "d2h", "write", "compute", "sync", "free")
KINDS = ("weight", "kv", "activation", "other")


class Record(NamedTuple):
    """One trace record, normalized. Fields an op does not use are None."""

    op: str
    region: str | None = None
    offset: int | None = None
    nbytes: int | None = None
    stream: int | None = None
    us: float | None = None
    kind: str | None = None
    t: float | None = None

    def to_json(self) -> dict:
        out = {"op": self.op}
        if self.op == "region":
            out.update(id=self.region, nbytes=self.nbytes, kind=self.kind)
        elif self.op in ("h2d", "d2h", "write"):
            out.update(region=self.region, offset=self.offset, nbytes=self.nbytes)
            if self.op != "write" and self.stream:
                out["stream"] = self.stream
        elif self.op == "compute":
            out["us"] = self.us
            if self.stream:
                out["stream"] = self.stream
        elif self.op == "sync":
            if self.stream is not None:
                out["stream"] = self.stream
        elif self.op == "free":
            out["region"] = self.region
        if self.t is not None:
            out["t"] = self.t
        return out


class Trace(NamedTuple):
    workload: str
    meta: dict
    records: list[Record]
    source: str = "<trace>"

    @property
    def regions(self) -> dict[str, Record]:
        return {r.region: r for r in self.records if r.op == "region"}

    def transfers(self, direction: str = "h2d") -> list[Record]:
        return [r for r in self.records if r.op == direction]


def _open_text(path, mode: str):
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read(path) -> Trace:
    """Read and validate a trace file (``.gz`` for gzip); :class:`TraceError` names the
    line of anything malformed."""
    try:
        with _open_text(path, "r") as f:
            return parse(f, os.fspath(path))
    except (OSError, EOFError) as exc:
        if isinstance(exc, TraceError):
            raise
        raise TraceError(f"{os.fspath(path)}: cannot read the trace: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{os.fspath(path)}: not UTF-8 text: {exc}") from exc


def parse(lines: Iterable[str], source: str = "<trace>") -> Trace:
    """Validate JSON Lines of a trace (the first data line is the header)."""
    header, records = None, []
    sizes: dict[str, int] = {}
    freed: set[str] = set()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue

        def fail(message: str):
            raise TraceError(f"{source}:{number}: {message}")

        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            fail(f"not JSON ({exc.msg})")
        if not isinstance(obj, dict):
            fail("each line must be a JSON object")
        if header is None:
            if obj.get("format") != FORMAT:
                fail(f'the first line must be the header with "format": "{FORMAT}", got {obj.get("format")!r}')
            if obj.get("version") != VERSION or isinstance(obj.get("version"), bool):
                fail(f"unsupported trace version {obj.get('version')!r}; this reader knows version {VERSION}")
            workload = obj.get("workload", "")
            meta = obj.get("meta", {})
            if not isinstance(workload, str):
                fail('"workload" must be a string')
            if not isinstance(meta, dict):
                fail('"meta" must be an object')
            header = (workload, meta)
            continue
        records.append(_record(obj, sizes, freed, fail))
    if header is None:
        raise TraceError(f"{source}: empty trace: no header line")
    return Trace(header[0], header[1], records, source)


def _int(obj, field, fail, *, minimum=0, required=True):
    value = obj.get(field)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        fail(f'"{field}" must be an integer, got {value!r}')
    if value < minimum:
        fail(f'"{field}" must be >= {minimum}, got {value}')
    return value


def _record(obj: dict, sizes: dict, freed: set, fail) -> Record:
    op = obj.get("op")
    if op not in OPS:
        fail(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    t = obj.get("t")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
        fail(f'"t" must be a number, got {t!r}')
    if op == "region":
        rid = obj.get("id")
        if not isinstance(rid, str) or not rid:
            fail(f'"id" must be a non-empty string, got {rid!r}')
        if rid in sizes:
            fail(f"region {rid!r} is declared twice")
        nbytes = _int(obj, "nbytes", fail, minimum=1)
        kind = obj.get("kind")
        if kind not in KINDS:
            fail(f"region kind must be one of {', '.join(KINDS)}, got {kind!r}")
        sizes[rid] = nbytes
        return Record("region", rid, None, nbytes, None, None, kind, t)
    if op in ("h2d", "d2h", "write", "free"):
        rid = obj.get("region")
        if rid not in sizes:
            fail(f"{op} of region {rid!r}, which was not declared before")
        if rid in freed:
            fail(f"{op} of region {rid!r} after it was freed")
        if op == "free":
            freed.add(rid)
            return Record("free", rid, t=t)
        offset = _int(obj, "offset", fail)
        nbytes = _int(obj, "nbytes", fail, minimum=1)
        if offset + nbytes > sizes[rid]:
            fail(f"{op} [{offset}, {offset + nbytes}) is outside region {rid!r} of {sizes[rid]} bytes")
        stream = None if op == "write" else _int(obj, "stream", fail, required=False) or 0
        return Record(op, rid, offset, nbytes, stream, None, None, t)
    if op == "compute":
        us = obj.get("us")
        if isinstance(us, bool) or not isinstance(us, (int, float)) or us < 0:
            fail(f'"us" must be a number >= 0, got {us!r}')
        return Record("compute", None, None, None, _int(obj, "stream", fail, required=False) or 0, float(us), t=t)
    return Record("sync", stream=_int(obj, "stream", fail, required=False), t=t)  # sync


class TraceWriter:
    """Writes a trace line by line (``.gz`` for gzip).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.jsonl")
    >>> with TraceWriter(path, "demo") as w:
    ...     w.write(Record("region", "a", nbytes=10, kind="other"))
    >>> read(path).records[0].nbytes
    10
    """

    def __init__(self, path, workload: str = "", meta: dict | None = None):
        self._f = _open_text(path, "w")
        self._f.write(json.dumps({"format": FORMAT, "version": VERSION, "workload": workload,
                                  "meta": meta or {}}) + "\n")

    def write(self, record: Record) -> None:
        self._f.write(json.dumps(record.to_json()) + "\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write(path, workload: str, records: Iterable[Record], meta: dict | None = None) -> None:
    """Write a whole trace."""
    with TraceWriter(path, workload, meta) as w:
        for r in records:
            w.write(r)


def iter_lines(trace: Trace) -> Iterator[str]:
    """The trace as JSON Lines (header first)."""
    yield json.dumps({"format": FORMAT, "version": VERSION, "workload": trace.workload, "meta": trace.meta})
    for r in trace.records:
        yield json.dumps(r.to_json())


def dumps(trace: Trace) -> str:
    return "\n".join(iter_lines(trace)) + "\n"


def loads(text: str, source: str = "<string>") -> Trace:
    return parse(io.StringIO(text), source)
