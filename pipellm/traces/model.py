"""A trace as it would run on a host of N cores with the device side in hardware
(``pipellm replay --cores N``): modelled, not run.

The emulated device's copy engine is a thread of this process, and on a small machine
the workers share its cores; on an H100 the copy engine decrypts at link rate in
hardware and a serving host has many cores. This model replays a trace's records on
modelled clocks instead of running them: the requesting thread's clock advances by each
operation's cost measured alone on this machine (:func:`pipellm.traces.explain.measure_costs`:
AES-GCM as ``fixed + bytes / rate``, the library's cost per transfer), the link and the
compute engine are booked as on the emulated device (:class:`pipellm.devices.emulated.LinkModel`,
stream order), and in pipellm mode ``cores - 1`` workers encrypt predicted chunks in
request order as soon as the speculation depth lets the transfer be predicted.

Which requests hit: a transfer of a (region, offset, bytes) the trace moved to the device
before, at least ``min_speculative_bytes`` long (the engine's threshold), and not written
since its last load (the write invalidates what was encrypted ahead), or those ``hits``
names; never one larger than ``depth_bytes`` (the engine can't hold it); everything else is
encrypted on demand, as cc does (in pipellm mode, a large one in pieces shared with the
workers idle at that moment, at most ``cores - 2`` of them, as
``pipellm/pipeline/ondemand.py`` does). A chunk no worker has started when its request
comes is encrypted by the requesting thread (as the engine's stealing does); one a
worker is on is waited for. A hit's GO command is sealed ahead by a worker; the
encryption a run threw away (``wasted_bytes``) is charged to the workers, a share before
each hit, and its SKIP commands (strict order: the candidates a request passed) to the
requesting thread. Device-to-host chunks are
decrypted by the workers idle when they arrive, several at once, and committed in channel
order (as the engine does); otherwise, and in cc, the host receives them on one thread
when it synchronizes.

>>> from pipellm.traces import Record, Trace
>>> recs = [Record("region", "w", nbytes=8 << 20)]
>>> recs += [r for _ in range(4) for r in (Record("h2d", "w", 0, 8 << 20, stream=0),
...                                       Record("compute", stream=0, us=2000.0), Record("sync"))]
>>> costs = {"seal_bytes_per_s": 10e9, "seal_fixed_s": 1e-6, "open_bytes_per_s": 10e9, "open_fixed_s": 1e-6,
...          "library_per_transfer_s": 5e-6}
>>> t = {m: simulate(Trace("demo", {}, recs), m, costs, cores=16) for m in ("plain", "cc", "pipellm")}
>>> t["cc"] > t["pipellm"] >= t["plain"]
True
"""

from __future__ import annotations

import heapq

from ..devices.emulated import LinkModel
from ..pipeline.ondemand import MIN_PIECE, pieces
from .format import Trace

#: the pipeline options the model takes (the rest do not change its clocks)
MODEL_OPTIONS = ("link", "chunk_size", "depth_bytes", "min_speculative_bytes", "workers")


def simulate(trace: Trace, mode: str, costs: dict, *, cores: int, link: LinkModel | None = None,
             chunk_size: int = 4 << 20, depth_bytes: int = 64 << 20, min_speculative_bytes: int | str = "auto",
             workers: int | None = None, hits: list[bool] | None = None, skips: list[int] | None = None,
             wasted_bytes: int = 0, timed_from: int = 0) -> float:
    """The modelled time (seconds) of ``trace`` in ``mode`` on ``cores`` host cores (see
    the module docstring). ``hits``: which h2d records a real run of the trace sent from
    speculation (else the rule of the module docstring decides). ``wasted_bytes``: what
    that run's workers encrypted and threw away (mispredictions, a fan-out's candidates
    not requested), charged to the workers spread over the hits; ``skips``: the SKIP
    commands each load of that run sent (strict order: a command sealed and submitted
    on the requesting thread: ``costs["skip_s"]`` each, else a cc request's library
    cost). ``timed_from``: the time from that record on, the host synchronized there
    first (a benchmark's clock starting
    after its warm-up: the records before it still teach the predictor and fill the
    pipeline)."""
    link = link or LinkModel()
    bandwidth = (link.h2d_bytes_per_s, link.d2h_bytes_per_s)
    # the library's cost per request: plain's, cc's (on demand), a pipellm hit's
    lib = costs["library_per_transfer_s"] if mode == "plain" else \
        costs.get("cc_library_per_transfer_s", costs["library_per_transfer_s"])
    hit_lib = costs.get("hit_library_per_transfer_s", lib)
    workers = max(1, cores - 1) if workers is None else workers
    helpers = max(0, cores - 2)  # a miss's helpers: on_demand_helpers="auto" (ondemand.spare_cores)

    def seal(n):
        return costs["seal_fixed_s"] + n / costs["seal_bytes_per_s"]

    def opened(n):
        return costs["open_fixed_s"] + n / costs["open_bytes_per_s"]

    t = 0.0                      # the requesting thread's clock
    link_free = [0.0, 0.0]
    compute_free = 0.0
    tails: dict[int, float] = {}  # stream -> end of its last op
    pending_d2h: list[tuple[float, int]] = []  # (end, bytes) the host still has to decrypt (cc)
    free_at = [0.0] * workers    # each worker's clock (a heap)
    receiver_free = 0.0          # cc: the host's receiving of device-to-host chunks, one at a time
    received_by = 0.0            # pipellm: when the workers' last device-to-host commit is
    loads = [r for r in trace.records if r.op == "h2d"]
    if hits is None:
        if min_speculative_bytes == "auto":
            from ..pipeline.threshold import speculation_threshold
            min_speculative_bytes = speculation_threshold()
        hits = _rule(trace, min_speculative_bytes)
    hits = hits if mode == "pipellm" else [False] * len(loads)
    waste = wasted_bytes / max(1, sum(hits)) if mode == "pipellm" else 0.0  # per hit
    skips = skips if mode == "pipellm" and skips is not None else [0] * len(loads)
    skip_cost = costs.get("skip_s", costs.get("cc_library_per_transfer_s", costs["library_per_transfer_s"]))
    # pipellm: a hit's chunks, as (start, done) on the worker that took each; they are
    # queued in request order as soon as the requests before leave room within the depth
    chunks: dict[int, list[tuple[float, float]]] = {}
    planned, served, window = 0, 0, 0  # items queued; requests made; bytes queued, not requested

    def plan(now):
        nonlocal planned, window
        while planned < len(loads):
            nbytes = loads[planned].nbytes
            # (a transfer larger than the depth is never encrypted ahead: the engine can't hold it)
            ahead = planned >= served and hits[planned] and nbytes <= depth_bytes
            if ahead and window + nbytes > depth_bytes:
                return
            if ahead:
                if waste:  # the encryption thrown away, a share before each hit's
                    heapq.heapreplace(free_at, max(now, free_at[0]) + waste / costs["seal_bytes_per_s"])
                mine = []
                for pos in range(0, nbytes, chunk_size):
                    begin = max(now, free_at[0])
                    done = begin + seal(min(chunk_size, nbytes - pos))
                    heapq.heapreplace(free_at, done)
                    mine.append((begin, done))
                # and its GO command, sealed ahead by a worker into private memory (a
                # request only exposes it: workers.py's "seal-go" task)
                begin = max(now, free_at[0])
                go = (begin, begin + seal(64))
                heapq.heapreplace(free_at, go[1])
                chunks[planned] = (mine, go)
                window += nbytes
            planned += 1

    def book(stream, direction, ready, nbytes):
        start = max(ready, tails.get(stream, 0.0), link_free[direction])
        link_free[direction] = start + nbytes / bandwidth[direction]
        tails[stream] = link_free[direction] + link.latency_s
        return tails[stream]

    def drain(t, streams):  # the host waits for the streams and receives what came back, in order
        nonlocal receiver_free
        t = max([t, received_by, *streams])
        for end, n in pending_d2h:
            t = max(t, end, receiver_free) + opened(n)
            receiver_free = t
        pending_d2h.clear()
        return t

    plan(0.0)
    timed = 0.0  # the clock when timing began
    for number, rec in enumerate(trace.records):
        if number == timed_from and number:
            t = timed = drain(t, tails.values())
        op = rec.op
        if op == "h2d":
            mine = chunks.pop(served, None)
            t += (lib if mine is None else hit_lib) + skips[served] * skip_cost
            if mode == "plain":
                book(rec.stream, 0, t, rec.nbytes)
            elif mine is None and mode == "pipellm" and rec.nbytes >= 2 * MIN_PIECE and free_at[0] <= t and helpers:
                # a miss, sealed in pieces by the idle workers beside the request (ondemand.py)
                idle = [w for w in free_at if w <= t][:helpers]
                parts = pieces(rec.nbytes, chunk_size, len(idle))
                ends, mine_t = [], t
                for k, (_, n) in enumerate(parts):
                    if 0 < k <= len(idle):    # a worker's piece
                        ends.append(t + seal(n))
                    else:                     # the requesting thread's (the first, and any left)
                        mine_t += seal(n)
                        ends.append(mine_t)
                busy = sorted(ends[1:len(idle) + 1])
                free_at = sorted([w for w in free_at if w > t] + busy + [t] * (len(idle) - len(busy)))
                t = max(ends)
                book(rec.stream, 0, t, rec.nbytes)
            elif mine is None:                # encrypted on demand, chunk by chunk onto the link
                for pos in range(0, rec.nbytes, chunk_size):
                    n = min(chunk_size, rec.nbytes - pos)
                    t += seal(n)
                    book(rec.stream, 0, t, n)
            else:
                window -= rec.nbytes
                mine, (go_begin, go_done) = mine
                ready = t
                for (begin, done), pos in zip(mine, range(0, rec.nbytes, chunk_size)):
                    if begin >= t:            # no worker got to it yet: the request encrypts it
                        t += seal(min(chunk_size, rec.nbytes - pos))
                        ready = max(ready, t)
                    else:
                        ready = max(ready, done)
                # the GO: exposed if a worker sealed it ahead, else sealed now (its AES)
                t = max(ready, go_done) if go_begin < t else ready + seal(64)
                book(rec.stream, 0, t, rec.nbytes)
            served += 1
            if mode == "pipellm":
                plan(t)
        elif op == "d2h":
            t += lib
            end = book(rec.stream, 1, t, rec.nbytes)
            if mode == "pipellm" and free_at[0] <= end:
                # idle workers receive it as it arrives, chunk by chunk, several at once;
                # committed in channel order (after every chunk before it). The stream goes
                # on meanwhile (its copy is done once the ciphertext is in the bounce slot);
                # the host waits for the receiving when it synchronizes
                for pos in range(0, rec.nbytes, chunk_size):
                    begin = max(end, free_at[0])
                    done = begin + opened(min(chunk_size, rec.nbytes - pos))
                    heapq.heapreplace(free_at, done)
                    received_by = max(received_by, done)
            elif mode != "plain":  # the host receives it when it synchronizes
                pending_d2h.append((end, rec.nbytes))
        elif op == "compute":
            start = max(t, tails.get(rec.stream, 0.0), compute_free)
            compute_free = tails[rec.stream] = start + rec.us * 1e-6
        elif op == "write":
            t += rec.nbytes / 10e9  # the application's own write (same in every mode)
        elif op in ("sync", "free"):
            t = drain(t, tails.values() if op == "free" or rec.stream is None else [tails.get(rec.stream, 0.0)])
    return drain(t, tails.values()) - timed


def _rule(trace: Trace, min_speculative_bytes: int) -> list[bool]:
    """Which loads hit without a run to say (see the module docstring)."""
    seen, written, out = set(), set(), []
    for rec in trace.records:
        if rec.op == "h2d":
            key = (rec.region, rec.offset, rec.nbytes)
            out.append(key in seen and rec.region not in written and rec.nbytes >= min_speculative_bytes)
            seen.add(key)
            written.discard(rec.region)
        elif rec.op in ("write", "d2h"):
            written.add(rec.region)
    return out
