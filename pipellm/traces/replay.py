"""Replay a trace through the public ``Pipeline`` on the emulated device.

Records run in file order on one host thread. Regions live in library-owned memory
(``pipellm.empty``) filled with a per-region pattern, so the pipellm mode may speculate
on them and every transfer can be verified: the replayer keeps a model of what each
device copy must hold (the host bytes at the time of each transfer) and compares at the
end (and when a region is freed). ``write`` records change the host bytes with plain
numpy writes (the pipellm mode's fault handler sees them).

Time is the emulated device's modelled time: wall time minus emulation stall; the
replayer's own bookkeeping (allocating regions, copying transferred bytes into its model)
runs with the device clock held, so it is not counted either.
"""

from __future__ import annotations

import contextlib
import os
import threading
from time import perf_counter

import numpy as np

from .. import hostmem, timeline
from ..devices import open_device
from ..pipeline import Pipeline
from .explain import best_costs, bounds, breakdown, measure_costs, pass_window, thread_cpu
from .format import Trace
from .model import MODEL_OPTIONS, simulate
from .summary import summarize

#: a replay mode: pipellm with speculation always on (``adaptive=False``), beside pipellm
ALWAYS = "pipellm-always"

#: pipellm stats copied into each result
SPEC_STATS = ("hits", "misses", "nops", "skipped_messages", "relinquishes", "stale", "reencrypted_bytes",
              "wasted_bytes", "stolen_chunks", "shadow_hits")
#: what the run's work was (for the bounds of --explain)
WORK_STATS = ("messages_d2h", "encrypt_bytes", "decrypt_bytes", "decrypt_s", "predictor_s", "workers",
              "min_speculative_bytes", "idle_plans", "helped_pieces", "payoff_switches", "speculating",
              "worker_cpu_s", "worker_busy_s", "hit_wait_s", "device_aes_bytes", "device_copy_bytes", "device_ops")


_PATTERN = (np.arange(1 << 16, dtype=np.uint32) * 2654435761 >> 13).astype(np.uint8)


def _fill(nbytes: int, salt: int) -> np.ndarray:
    """Library-owned host memory holding a position- and region-dependent pattern."""
    host = hostmem.empty(nbytes, np.uint8)
    step = len(_PATTERN)
    for start in range(0, nbytes, step):
        span = host[start:start + step]
        np.add(_PATTERN[:len(span)], salt, out=span)
    return host


def _predictor(name, trace: Trace, options: dict):
    """A predictor for this trace: the oracle reads its future; ``options`` go to the
    predictors whose constructor takes them."""
    import inspect

    from ..predictors import OraclePredictor, get
    if name == "oracle":
        return OraclePredictor(future=[(r.region, r.offset, r.nbytes) for r in trace.transfers("h2d")])
    if not isinstance(name, str) or not options:
        return name
    base = name.partition(":")[0]
    from ..predictors import _load
    cls = _load(base)
    accepted = set(inspect.signature(cls).parameters) if cls is not None else set()
    return get(name, **{k: v for k, v in options.items() if k in accepted})


def replay(trace: Trace, mode: str, predictor=None, *, predictor_options: dict | None = None,
           explain: bool = False, keep_timeline: bool = False, **options) -> dict:
    """Replay ``trace`` in ``mode`` (a Pipeline mode, or :data:`ALWAYS`); options go to
    :class:`pipellm.Pipeline` (and ``link`` to the emulated device). Returns the result row; with ``explain``, its
    ``explain`` entry says where the time went (:func:`pipellm.traces.explain.breakdown`)."""
    link = options.pop("link", None)
    label = predictor if isinstance(predictor, str) or predictor is None else getattr(predictor, "name", "custom")
    row_mode = mode
    if mode == ALWAYS:  # pipellm with speculation always on, to compare in one run
        mode, options = "pipellm", dict(options, adaptive=False)
    if mode == "pipellm":
        predictor = _predictor(predictor or "sequence", trace, predictor_options or {})
        label = label or "sequence"
    else:
        predictor, label = None, "-"
    with (timeline.recorded() if explain else contextlib.nullcontext()) as spans:
        device = open_device("emulated", **({"link": link} if link is not None else {}))
        try:
            with Pipeline(device=device, mode=mode, predictor=predictor, **options) as pipe:
                result = _run(pipe, trace, explain)
        finally:
            device.close()
    if explain:
        main, before, after, marks = result.pop("_threads")
        result["explain"] = breakdown(spans, main, before, after, tuple(marks[-2:]))
        if keep_timeline:
            names = {ident: name for ident, (name, _) in after.items()}
            result["timeline"] = pass_window(spans, main, marks[:-2], names, tuple(marks[-2:]))
    result.update(trace=trace.source, workload=trace.workload, mode=row_mode, predictor=label)
    return result


def _run(pipe: Pipeline, trace: Trace, explain: bool = False) -> dict:
    regions, model, streams = {}, {}, {}
    verified = True

    def stream(s):
        if s not in streams:
            streams[s] = pipe.device.default_stream if s == 0 else pipe.stream()
        return streams[s]

    def check(rid) -> bool:
        r = regions[rid]
        return r.device_buffer is None or np.array_equal(pipe.device.read(r.device_buffer), model[rid])

    # the replayer's own bookkeeping is not modelled time: the device clock stands still
    clock_held = pipe.device.clock_held
    if explain:
        @contextlib.contextmanager
        def held():
            t0 = perf_counter()
            with clock_held():
                yield
            timeline.span("held", t0, perf_counter())
    else:
        held = clock_held
    stall0 = pipe.stats()["emulation_stall_s"]
    cpu_before = thread_cpu() if explain else None
    start = perf_counter()
    # "after the first pass": from the first time the trace loads its first region again
    first_region, warm, marks = None, None, []  # marks: when each pass began
    engine = pipe._engine
    hit_flags = []  # per h2d: a hit (speculation sent)

    def engine_hits():
        return getattr(engine, "hits", 0)

    def engine_skips():  # strict order: SKIP commands sent (each a command sealed on demand)
        return getattr(engine, "counts", {}).get("nops", 0)
    skip_counts = []  # per h2d: the SKIPs it sent
    for rec in trace.records:
        op = rec.op
        if explain:
            t0 = perf_counter()
        if op == "h2d":
            if first_region is None:
                first_region = rec.region
                marks.append(perf_counter())
            elif rec.region == first_region:
                marks.append(perf_counter())
                if warm is None:
                    warm = pipe.stats()
            r = regions[rec.region]
            before, skips = engine_hits(), engine_skips()
            pipe.to_device(r, rec.offset, rec.nbytes, stream=stream(rec.stream))
            hit_flags.append(engine_hits() > before)
            skip_counts.append(engine_skips() - skips)
            with held():
                model[rec.region][rec.offset:rec.offset + rec.nbytes] = r._array[rec.offset:rec.offset + rec.nbytes]
        elif op == "compute":
            pipe.compute(rec.us, stream=stream(rec.stream))
        elif op == "d2h":
            r = regions[rec.region]
            if r.device_buffer is None:  # nothing on the device yet: it holds zeros
                pipe._device_copy(r)
            pipe.to_host(r.device_buffer, r, src_offset=rec.offset, offset=rec.offset, nbytes=rec.nbytes,
                         stream=stream(rec.stream))
        elif op == "write":
            r = regions[rec.region]
            r.wait()
            r.wait_outgoing()
            span = r._array[rec.offset:rec.offset + rec.nbytes]
            span += 1  # a plain numpy write: the fault handler sees it in pipellm mode
        elif op == "sync":
            pipe.synchronize(None if rec.stream is None else stream(rec.stream))
        elif op == "region":  # the application allocating memory: not the library's time
            with held():
                regions[rec.region] = pipe.register(_fill(rec.nbytes, (len(regions) * 7 + 1) % 256), name=rec.region,
                                                    kind=rec.kind)
                model[rec.region] = np.zeros(rec.nbytes, np.uint8)
        elif op == "free":
            pipe.synchronize()
            with held():
                verified &= check(rec.region)
            pipe.unregister(regions.pop(rec.region))
            del model[rec.region]
        if explain:
            timeline.span("app:" + op, t0, perf_counter())
    if explain:
        t0 = perf_counter()
    pipe.synchronize()
    wall = perf_counter() - start
    if explain:
        timeline.span("app:sync", t0, perf_counter())
        threads = (threading.get_ident(), cpu_before, thread_cpu(), marks + [start, start + wall])
    stats = pipe.stats()
    for rid in regions:
        verified &= check(rid)
    out = {"time_s": wall - (stats["emulation_stall_s"] - stall0), "wall_s": wall,
           "verified": bool(verified),
           "transfers_h2d": stats["transfers_h2d"], "transfers_d2h": stats["transfers_d2h"],
           "bytes_h2d": stats["bytes_h2d"], "bytes_d2h": stats["bytes_d2h"],
           # where the time goes: channel messages (GO/SKIP commands included), host AES
           # seconds, the device's own busy time (the emulated copy engine's AES)
           "messages_h2d": stats.get("messages_h2d", 0), "encrypt_s": stats.get("encrypt_s", 0.0),
           "device_busy_s": stats.get("device_busy_s", 0.0)}
    hits, misses = stats.get("hits", 0), stats.get("misses", 0)
    out["hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
    if warm is not None:
        hits, misses = hits - warm.get("hits", 0), misses - warm.get("misses", 0)
    out["hit_rate_after_first_pass"] = hits / (hits + misses) if hits + misses else 0.0
    for key in SPEC_STATS + WORK_STATS:
        out[key] = stats.get(key, 0)
    out["_h2d_hits"] = hit_flags
    out["_h2d_skips"] = skip_counts
    if explain:
        out["_threads"] = threads
    # what the predictor cost as the pipeline used it (observe every transfer, predict when planning)
    transfers = stats["transfers_h2d"] + stats["transfers_d2h"]
    out["predictor_us_per_transfer"] = stats.get("predictor_s", 0.0) / transfers * 1e6 if transfers else 0.0
    return out


def replay_many(traces: list[Trace], modes, predictors, progress=None, *, explain: bool = False,
                cores: int | None = None, model_cores: int | None = None, timeline_of: int | None = None,
                repeat: int = 1, **options) -> list[dict]:
    """Every (trace, mode, predictor) in one run, each ``repeat`` times (the row is the
    median run, ``runs_s`` every run's time); ``overhead_vs_plain`` against the same
    trace's plain time (when plain is among the modes). With ``explain``, each row also
    gets ``bounds`` (:func:`pipellm.traces.explain.bounds`) from costs measured alone
    before each trace (the best of them), for ``cores`` cores (default: this machine's),
    and the runs of trace number ``timeline_of`` keep one pass of their timeline (for the
    plot). With
    ``model_cores``, each row also gets ``modelled`` (:func:`pipellm.traces.model.simulate`):
    its time modelled on this machine's cores and on ``model_cores``, the device side in
    hardware, from the same costs."""
    cores = cores or os.cpu_count() or 1
    runs = [(mode, name) for mode in modes for name in (predictors if mode.startswith("pipellm") else [None])]
    costs, done = None, []
    for number, trace in enumerate(traces):
        if explain:  # before each trace, the best kept: one slow spell of a shared machine is not alone
            costs = best_costs(costs, measure_costs(options.get("chunk_size", 4 << 20)))
        tries: dict[tuple, list[dict]] = {run: [] for run in runs}
        for _ in range(repeat):  # the modes interleaved, so the machine's drift meets them alike
            for mode, name in runs:
                tries[(mode, name)].append(replay(
                    trace, mode, name, explain=explain, keep_timeline=explain and number == timeline_of,
                    **dict(options)))
                if progress:
                    progress()
        mine = []
        for run in runs:
            ranked = sorted(tries[run], key=lambda r: r["time_s"])
            row = ranked[(len(ranked) - 1) // 2]  # the median run (the lower one of an even count)
            row["runs_s"] = [r["time_s"] for r in tries[run]]
            mine.append(row)
        done.append((trace, mine))
    rows = []
    for trace, mine in done:  # the bounds and the model, from the best costs measured
        plain = next((r["time_s"] for r in mine if r["mode"] == "plain"), None)
        # per row, what the model takes from its run: which loads hit, and the bytes the
        # workers encrypted for nothing (dropped speculation: the model charges them too)
        hits_of = {id(row): (row.pop("_h2d_hits"), row.pop("_h2d_skips"), row.get("wasted_bytes", 0)) for row in mine}
        always = {row["predictor"]: hits_of[id(row)] for row in mine if row["mode"] == ALWAYS}
        for row in mine:
            hits, skips, wasted = hits_of[id(row)]
            row["overhead_vs_plain"] = row["time_s"] / plain - 1 if plain else None
            if explain:
                floor = plain if plain is not None else summarize(trace)["link_s"]
                row["bounds"] = bounds(row, floor, costs, cores)
                row["costs_alone"] = costs
            if model_cores is not None:
                if row["mode"].startswith("pipellm") and row.get("payoff_switches"):
                    # the controller turned speculation off on this machine; the model's
                    # machines have the cores for it: the predictor's hits with it always on
                    # (from this trace's pipellm-always run where there is one)
                    if row["predictor"] in always:
                        hits, skips, wasted = always[row["predictor"]]
                    else:
                        run = replay(trace, ALWAYS, row["predictor"], **dict(options))
                        hits, skips, wasted = run["_h2d_hits"], run["_h2d_skips"], run["wasted_bytes"]
                    row["modelled_hits"] = "a run with speculation always on"
                row["modelled"] = {str(c): simulate(trace, row["mode"].partition("-")[0], costs, cores=c, hits=hits,
                                                    skips=skips, wasted_bytes=wasted,
                                                    **{k: options[k] for k in MODEL_OPTIONS if k in options})
                                   for c in sorted({cores, model_cores})}
        rows += mine
    return rows
