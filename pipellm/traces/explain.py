"""Where a replay's time goes, and the best time it could have had (``pipellm replay --explain``).

The replayer runs a trace's records on one host thread (the *requesting thread*); with
the timeline recording (:mod:`pipellm.timeline`) every part of that thread's time is
attributed to one cause, on the emulated device's modelled clock (wall time less the
emulation stall, as the replay's ``time_s``):

- ``encrypting`` / ``decrypting``: AES-GCM on the requesting thread (cc's on-demand path,
  a pipellm miss, a chunk it took from the workers, device-to-host chunks);
- ``waiting_worker`` / ``worker_starved``: a request waiting for a worker's chunk, split
  by the workers' CPU share while they were busy (the rest of their wall time they were
  runnable without a core: starved);
- ``waiting_receive``: waiting for device-to-host data another thread is receiving (a
  worker in the background; in cc, with no workers, it is ``library``);
- ``predictor``: the predictor's calls made on the requesting thread;
- ``link`` / ``compute`` / ``device_other``: waiting for the device, split by what the
  modelled device was doing meanwhile (compute first, else a link direction, else
  latency and stream order);
- ``library``: everything else inside the library's calls (bookkeeping, submission);
- ``application``: the trace's own host writes.

``emulated_device_stall_s`` is the time the requesting thread waited for the emulated
copy engine's CPU work beyond the model: not modelled time, shown for what it costs.

**Bounds.** The run had work to do: host AES (bytes and messages), the library's cost
per transfer, the predictor, and the emulated device's own CPU work (its AES, its copies,
its cost per op). The modelled clock stands still while a host thread waits for the
emulator beyond the model (and for the replayer's bookkeeping), so only the device work
done while it ran competed with the host for the cores in modelled time: ``device`` is
that share (each device op's CPU in proportion to its wall time outside the clock's
stops). With ``C`` cores, ``n`` host threads able to do the host work (the requesting
thread and the workers) and plain's time on the same trace ``P``::

    bound = max(P, host / min(C, n), (host + device) / C, machine)

computed twice: from each operation's cost measured alone on an idle machine
(:func:`measure_costs`; the device's share inside the model as the run had it), and from
the CPU times the run's threads spent on the same work (the gap is contention: shared
cores, memory bandwidth). ``machine`` (costs alone only) is the work at the rates every
core of this machine reaches at once: streaming AES and copies share the memory
bandwidth, and on a small VM two threads at once may move fewer bytes than one alone.
``hardware`` bounds take the device side as an H100's (its copy engine decrypts at link rate: no device CPU work, no
stall) and the workers a host of ``C`` cores has (``C - 1``): ``max(P, host / C)``.
"""

from __future__ import annotations

import os
import threading
import time
from time import perf_counter

import numpy as np

from .. import timeline
from ..predictors import Prediction, Predictor
from .intervals import Union

#: the causes of the requesting thread's modelled time, in report order
CAUSES = ("encrypting", "decrypting", "waiting_worker", "worker_starved", "waiting_receive", "predictor", "link",
          "compute", "device_other", "library", "application")

LABELS = {"encrypting": "requesting thread encrypting", "decrypting": "requesting thread decrypting",
          "waiting_worker": "waiting for a worker", "worker_starved": "worker CPU starved",
          "waiting_receive": "waiting for device-to-host data",
          "predictor": "predictor", "link": "link (modelled)", "compute": "compute (modelled)",
          "device_other": "device latency/order (modelled)", "library": "library per transfer",
          "application": "application writes"}

_CHILD = {"encrypt": "encrypting", "decrypt": "decrypting", "wait-worker": "waiting_worker",
          "wait-receive": "waiting_receive", "predictor": "predictor", "wait-device": "device"}


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every live thread of this process: ident -> (name, seconds)."""
    out = {}
    for t in threading.enumerate():
        try:
            out[t.ident] = (t.name, time.clock_gettime(time.pthread_getcpuclockid(t.ident)))
        except (OSError, AttributeError, TypeError):
            pass  # a thread that ended meanwhile, or a platform without per-thread clocks
    return out


def _cost(fn, repeat: int) -> float:
    """Least time of ``fn()`` over ``repeat`` tries (the idle machine's cost)."""
    best = float("inf")
    for _ in range(repeat):
        start = perf_counter()
        fn()
        best = min(best, perf_counter() - start)
    return best


def measure_costs(chunk_size: int = 4 << 20, footprint: int = 128 << 20) -> dict:
    """Each operation's cost alone on this machine, as now (best of several passes):
    AES-GCM seal and open as ``fixed + bytes / rate``, memcpy's rate, the host's cost
    per request less its AES (:func:`request_costs`: plain, cc, a pipellm hit), and the
    emulated copy engine's per op. Rates are over ``footprint`` bytes of distinct memory,
    chunk by chunk, as a run streams its regions (cache-hot chunks would run 2-4x faster
    than any replay can).

    >>> c = measure_costs(1 << 20, footprint=8 << 20)
    >>> c["seal_bytes_per_s"] > 1e8 and c["library_per_transfer_s"] > 0
    True
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from .._ext import copy_into
    from ..channel.cipher import open_into, seal_into

    aead, iv, aad = AESGCM(bytes(32)), bytes(12), bytes(64)
    small, big = 4096, max(chunk_size, 1 << 20)
    n = max(2, footprint // big)
    src = np.frombuffer(np.random.default_rng(0).bytes(n * big), np.uint8)
    sealed = np.empty(n * (big + 16), np.uint8)
    plain = np.empty(n * big, np.uint8)
    s_views = [memoryview(src)[i * big:(i + 1) * big] for i in range(n)]
    c_views = [memoryview(sealed)[i * (big + 16):(i + 1) * (big + 16)] for i in range(n)]
    p_views = [memoryview(plain)[i * big:(i + 1) * big] for i in range(n)]
    ops = {"seal": lambda i: seal_into(aead, iv, s_views[i], aad, c_views[i]),
           "open": lambda i: open_into(aead, iv, c_views[i], aad, p_views[i]),
           "memcpy": lambda i: copy_into(p_views[i], s_views[i])}
    for i in range(n):
        ops["seal"](i)
    # one thread alone, then the machine's capacity: every core at once on its own share
    # of the footprint (streaming AES and copies share memory bandwidth: two at once on a
    # small VM may not even add up to one alone)
    cores = os.cpu_count() or 1
    alone = {name: _aggregate(op, n, big, 1) for name, op in ops.items()}
    t_big = {name: big / alone[name] for name in ("seal", "open")}
    small_sealed = bytearray(small + 16)
    seal_into(aead, iv, s_views[0][:small], aad, small_sealed)
    small_plain = bytearray(small)
    t_small = {"seal": _cost(lambda: seal_into(aead, iv, s_views[0][:small], aad, small_sealed), 200),
               "open": _cost(lambda: open_into(aead, iv, small_sealed, aad, small_plain), 200)}
    out = {}
    for name in ("seal", "open"):
        rate = (big - small) / max(t_big[name] - t_small[name], 1e-9)
        out[f"{name}_bytes_per_s"] = rate
        out[f"{name}_fixed_s"] = max(0.0, t_small[name] - small / rate)
    out["memcpy_bytes_per_s"] = alone["memcpy"]
    for name, op in ops.items():
        out[f"{name}_all_cores_bytes_per_s"] = _aggregate(op, n, big, cores)
    out["cores"] = cores
    del src, sealed, plain, s_views, c_views, p_views, ops
    out.update(request_costs())
    out["device_per_op_s"] = _device_op_cost(small, out["memcpy_bytes_per_s"])
    return out


def best_costs(a: dict | None, b: dict) -> dict:
    """The better of two :func:`measure_costs` results, key by key (rates the higher,
    times the lower): an idle machine's costs, when some measurements met a busy one.

    >>> best_costs({"seal_bytes_per_s": 1e9, "seal_fixed_s": 2e-6}, {"seal_bytes_per_s": 2e9, "seal_fixed_s": 3e-6})
    {'seal_bytes_per_s': 2000000000.0, 'seal_fixed_s': 2e-06}
    """
    if a is None:
        return dict(b)
    return {k: (max if k.endswith("_per_s") else min)(a[k], v) if isinstance(v, float) and k in a else v
            for k, v in b.items()}


def _aggregate(op, n: int, nbytes: int, threads: int, passes: int = 3) -> float:
    """Bytes per second of ``threads`` threads running ``op(i)`` at once over the ``n``
    chunks (thread k takes every chunk i with i % threads == k; best of ``passes``)."""
    best = 0.0
    for _ in range(passes):
        barrier = threading.Barrier(threads + 1)

        def run(k):
            barrier.wait()
            for i in range(k, n, threads):
                op(i)
        workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        barrier.wait()
        start = perf_counter()
        for w in workers:
            w.join()
        best = max(best, n * nbytes / (perf_counter() - start))
    return best


class _Decoyed(Predictor):
    """Round robin over ``names``, each one preceded by a decoy that is never requested
    (a fan-out's candidate the router did not pick): in strict order every request then
    passes one queued item, with one SKIP command."""

    name = "decoyed"
    uses_d2h = False

    def __init__(self, names=(), nbytes: int = 0):
        self.names, self.nbytes = list(names), nbytes
        self.last = None

    def observe(self, event) -> None:
        self.last = event.region

    def predict(self, k: int) -> list:
        n = len(self.names)
        at = self.names.index(self.last) + 1 if self.last in self.names else 0
        out = []
        for j in range(at, at + k // 2):
            out += [Prediction(f"decoy{j % n}", 0, self.nbytes), Prediction(self.names[j % n], 0, self.nbytes)]
        return out


def request_passes(mode: str, layers: int, nbytes: int, passes: int, settle_s: float = 10.0,
                   decoys: bool = False):
    """``layers`` regions of ``nbytes`` requested in turn by a pipeline in ``mode``: two
    passes to learn (and allocate the device's copies), then ``passes`` passes with the
    emulated copy engine paused (its thread competes for neither a core nor the GIL), a
    pipellm pass once speculation has settled (within ``settle_s``). With ``decoys``
    (pipellm), a region never requested is predicted before each one (:class:`_Decoyed`).
    Yields each of those passes' (seconds on the requesting thread, AES seconds the
    pipeline counted, hits, the pipeline's stats after it)."""
    from .. import hostmem
    from ..pipeline import Pipeline

    options = {"min_speculative_bytes": 0, "depth_bytes": 8 * layers * (nbytes + (8 << 10)), "adaptive": False} \
        if mode == "pipellm" else {"bounce_bytes": (layers + 4) * (nbytes + (8 << 10))}
    if decoys:
        options.update(predictor=_Decoyed([f"layer{i}" for i in range(layers)], nbytes), lookahead=2 * layers)
    with Pipeline(device="emulated", mode=mode, chunk_size=nbytes, **options) as pipe:
        regions = [pipe.register(hostmem.empty(nbytes, np.uint8), name=f"layer{i}") for i in range(layers)]
        for i in range(layers if decoys else 0):
            pipe.register(hostmem.empty(nbytes, np.uint8), name=f"decoy{i}").array[:] = 2
        for r in regions:
            r.array[:] = 1
        for attempt in range(passes + 2):
            if mode == "pipellm":
                pipe.wait_speculation(settle_s)
            before = pipe.stats()
            with pipe.device.paused():
                start = perf_counter()
                for r in regions:
                    pipe.to_device(r)
                elapsed = perf_counter() - start
            after = pipe.stats()
            pipe.synchronize()
            if attempt >= 2:
                yield (elapsed, after.get("encrypt_s", 0.0) - before.get("encrypt_s", 0.0),
                       after.get("hits", 0) - before.get("hits", 0), after)


def request_costs(layers: int = 8, nbytes: int = 64 << 10, passes: int = 20) -> dict:
    """The host's own cost per request, less its AES, with the emulated copy engine
    paused: a plain copy, a cc request (encrypted on demand), a pipellm hit (its chunk
    encrypted ahead; the GO command and the submission are what is left), and what a
    SKIP adds to a hit (strict order: the hit passes one queued item): the best of
    ``passes`` passes of :func:`request_passes` (pipellm: those whose requests all hit).

    >>> c = request_costs(layers=2, passes=1)
    >>> sorted(c)
    ['cc_library_per_transfer_s', 'hit_library_per_transfer_s', 'library_per_transfer_s', 'skip_s']
    """
    out = {}
    for mode, key, decoys in (("plain", "library_per_transfer_s", False), ("cc", "cc_library_per_transfer_s", False),
                              ("pipellm", "hit_library_per_transfer_s", False), ("pipellm", "skip_s", True)):
        best = min(((elapsed - aes) / layers for elapsed, aes, hits, _ in
                    request_passes(mode, layers, nbytes, passes, decoys=decoys)
                    if mode != "pipellm" or hits >= layers), default=float("nan"))
        out[key] = best
    out["skip_s"] = max(0.0, out["skip_s"] - out["hit_library_per_transfer_s"])
    return out


def _device_op_cost(nbytes: int, memcpy_rate: float, calls: int = 400) -> float:
    """The emulated copy engine's cost per plain copy op, less the copy."""
    from .. import hostmem
    from ..devices import open_device
    from ..pipeline import Pipeline

    best = float("inf")
    with open_device("emulated") as dev, Pipeline(device=dev, mode="plain") as pipe:
        region = pipe.register(hostmem.empty(nbytes, np.uint8), name="calibrate")
        for _ in range(3):
            busy = dev.stats()["device_busy_s"]
            for _ in range(calls):
                pipe.to_device(region)
            pipe.synchronize()
            best = min(best, dev.stats()["device_busy_s"] - busy)
    return max(0.0, best / calls - nbytes / memcpy_rate)


def breakdown(spans: list, main: int, cpu_before: dict, cpu_after: dict, run: tuple[float, float]) -> dict:
    """The requesting thread's modelled time by cause, per-thread CPU, and the run's work
    (see the module docstring). ``spans``: the run's timeline; ``main``: the requesting
    thread's ident; ``cpu_*``: :func:`thread_cpu` before and after the run; ``run``: when
    it began and ended (the pipeline's set-up and close are outside)."""
    stall = Union((s[2], s[3]) for s in spans if s[1] == "stall")
    held = Union((s[2], s[3]) for s in spans if s[0] == main and s[1] == "held")

    def model(t: float) -> float:
        return t - stall.before(t)

    compute = Union((s[2], s[3]) for s in spans if s[0] == timeline.MODEL and s[1] == "compute")
    busy = Union((s[2], s[3]) for s in spans if s[0] == timeline.MODEL)

    inside = [s for s in spans if run[0] <= s[2] and s[3] <= run[1]]
    tasks = [s for s in inside if s[1].startswith("task:")]
    task_wall = sum(s[3] - s[2] for s in tasks)
    task_cpu = sum(s[4] for s in tasks)
    worker_share = min(1.0, task_cpu / task_wall) if task_wall else 1.0

    causes = dict.fromkeys(CAUSES, 0.0)
    mine = sorted((s for s in inside if s[0] == main and (s[1].startswith("app:") or s[1] in _CHILD)),
                  key=lambda s: (s[2], s[2] - s[3]))  # by start, the enclosing span first
    wait_cpu = sum(s[4] for s in mine if s[1] == "wait-device")
    device_stall = 0.0

    def settle(kind, a, b, inner):
        """Attribute span [a, b)'s own modelled time (less its nested spans') to its cause."""
        nonlocal device_stall
        own = max(0.0, (b - a) - stall.overlap(a, b) - inner)
        cause = _CHILD.get(kind)
        if cause == "device":
            device_stall += stall.overlap(a, b) - held.overlap(a, b)
            m0, m1 = model(a), model(b)
            span_model = max(m1 - m0, 1e-12)
            on_compute, on_any = compute.overlap(m0, m1), busy.overlap(m0, m1)
            scale = own / span_model
            causes["compute"] += on_compute * scale
            causes["link"] += (on_any - on_compute) * scale
            causes["device_other"] += max(0.0, span_model - on_any) * scale
        elif cause == "waiting_receive" and not tasks:  # no workers: the wait is the library's own
            causes["library"] += own
        elif cause == "waiting_worker":
            causes["waiting_worker"] += own * worker_share
            causes["worker_starved"] += own * (1 - worker_share)
        elif cause is not None:
            causes[cause] += own
        else:
            causes["application" if kind == "app:write" else "library"] += own

    stack: list[list] = []  # [kind, start, end, modelled time of nested spans]
    for _, kind, a, b, _ in mine:
        while stack and stack[-1][2] <= a:
            done = stack.pop()
            settle(*done)
        if stack:
            b = min(b, stack[-1][2])
            stack[-1][3] += (b - a) - stall.overlap(a, b)
        stack.append([kind, a, b, 0.0])
    while stack:
        settle(*stack.pop())

    threads = {}
    for ident, (name, after) in cpu_after.items():
        before = cpu_before.get(ident, (name, 0.0))[1]
        label = "requesting (replay)" if ident == main else name
        threads[label] = after - before
    main_cpu = threads.get("requesting (replay)", 0.0)
    held_wall = held.total
    host_cpu = max(0.0, main_cpu - held_wall - wait_cpu) + task_cpu
    device = [s for s in inside if s[1].startswith("device:")]
    device_cpu = sum(s[4] for s in device)
    # what the modelled clock saw of it: each op's CPU in proportion to its wall time
    # outside the clock's stops (device work inside them is excluded from modelled time)
    device_modelled = sum(s[4] * (1.0 - stall.overlap(s[2], s[3]) / (s[3] - s[2])) for s in device if s[3] > s[2])
    return {"causes_s": causes, "emulated_device_stall_s": device_stall,
            "worker_cpu_share": worker_share, "thread_cpu_s": threads,
            "run_host_cpu_s": host_cpu, "run_device_cpu_s": device_cpu,
            "run_device_cpu_modelled_s": device_modelled,
            "stall_s": stall.total - held_wall, "bookkeeping_s": held_wall, "clock_stopped_s": stall.total}


def work_alone(row: dict, costs: dict) -> dict:
    """The run's work priced at the idle machine's costs: ``host`` and ``device`` as one
    thread would take them, ``machine`` as every core of this machine at once would
    (each operation's bytes at its all-cores rate, its fixed costs spread over the
    cores), ``machine_host`` the same without the emulated device's share."""
    encrypted = row["mode"] != "plain"
    h_fixed = (row.get("messages_h2d", 0) * costs["seal_fixed_s"] * encrypted
               + row.get("messages_d2h", 0) * costs["open_fixed_s"] * encrypted
               + row["transfers_h2d"] * costs[_LIBRARY[row["mode"].partition("-")[0]]]
               + row["transfers_d2h"] * costs[_LIBRARY["cc" if encrypted else "plain"]]
               + row.get("predictor_s", 0.0))
    h_bytes = {"seal": row.get("encrypt_bytes", 0), "open": row.get("decrypt_bytes", 0)}
    d_fixed = row.get("device_ops", 0) * costs["device_per_op_s"]
    d_bytes = {"open": row.get("device_aes_bytes", 0), "memcpy": row.get("device_copy_bytes", 0)}

    def one(bytes_):
        return sum(n / costs[f"{k}_bytes_per_s"] for k, n in bytes_.items())

    def every(bytes_):
        return sum(n / costs[f"{k}_all_cores_bytes_per_s"] for k, n in bytes_.items())
    cores = costs.get("cores", 1)
    return {"host": h_fixed + one(h_bytes), "device": d_fixed + one(d_bytes),
            "machine": every(h_bytes) + every(d_bytes) + (h_fixed + d_fixed) / cores,
            "machine_host": every(h_bytes) + h_fixed / cores}


#: which measured request cost a mode's host-to-device requests pay (a hit's is pipellm's
#: least; the work counts every pipellm request at it: a bound)
_LIBRARY = {"plain": "library_per_transfer_s", "cc": "cc_library_per_transfer_s",
            "pipellm": "hit_library_per_transfer_s"}


def bound(plain_s: float, host: float, device: float, cores: int, threads: int, machine: float = 0.0) -> float:
    """The least modelled time (see the module docstring): ``device`` is the device's CPU
    work inside modelled time.

    >>> bound(0.1, host=2.0, device=1.0, cores=2, threads=4)   # the device shares the cores
    1.5
    """
    return max(plain_s, host / max(1, min(cores, threads)), (host + device) / cores, machine)


def bounds(row: dict, plain_s: float, costs: dict, cores: int, hardware_cores=(16,)) -> dict:
    """Both bounds on this machine, and the hardware-device bounds, for one explained row."""
    ex = row["explain"]
    speculative = row["mode"].startswith("pipellm")
    threads = 1 + row.get("workers", 0) if speculative else 1
    work = work_alone(row, costs)
    # the share of the device's work the modelled clock saw, as this run had it
    seen = ex["run_device_cpu_modelled_s"] / ex["run_device_cpu_s"] if ex["run_device_cpu_s"] else 0.0
    machine = work["machine_host"] + (work["machine"] - work["machine_host"]) * seen
    out = {"plain_s": plain_s, "cores": cores, "host_threads": threads, "work_alone_s": work,
           "work_run_s": {"host": ex["run_host_cpu_s"], "device": ex["run_device_cpu_s"],
                          "device_modelled": ex["run_device_cpu_modelled_s"]},
           "device_share_modelled": seen,
           "bound_alone_s": bound(plain_s, work["host"], work["device"] * seen, cores, threads, machine),
           "bound_run_s": bound(plain_s, ex["run_host_cpu_s"], ex["run_device_cpu_modelled_s"], cores, threads)}
    # the device side in hardware, a host of c cores (c - 1 workers), each core as fast as
    # one here alone (a server's memory bandwidth feeds its cores; this VM's does not)
    out["hardware_bound_s"] = {str(c): max(plain_s, work["host"] / (c if speculative else 1))
                               for c in sorted({cores, *hardware_cores})}
    out["time_over_bound_run"] = row["time_s"] / out["bound_run_s"] if out["bound_run_s"] else None
    out["time_over_bound_alone"] = row["time_s"] / out["bound_alone_s"] if out["bound_alone_s"] else None
    return out


def table(rows: list[dict]) -> str:
    """The explanation as text: one block per trace, a column per mode."""
    lines = []
    for source in dict.fromkeys(r["trace"] for r in rows):
        group = [r for r in rows if r["trace"] == source and "explain" in r]
        if not group:
            continue
        heads = [f"{r['mode']}" + (f":{r['predictor']}" if r["mode"] == "pipellm" else "") for r in group]
        heads = [h.replace("pipellm-always", "always") for h in heads]
        lines.append(f"\n{group[0]['workload']}: where the requesting thread's modelled time goes (ms)")
        lines.append(f"  {'':34}" + "".join(f"{h:>18}" for h in heads))

        def row(label, values):
            lines.append(f"  {label:34}" + "".join(f"{v:>18}" for v in values))
        row("time (modelled)", [f"{r['time_s'] * 1e3:.1f}" for r in group])
        for cause in CAUSES:
            vals = [r["explain"]["causes_s"][cause] * 1e3 for r in group]
            if any(v >= 0.05 for v in vals):
                row("  " + LABELS[cause], [f"{v:.1f}" for v in vals])
        row("emulated device stall (excluded)", [f"{r['explain']['emulated_device_stall_s'] * 1e3:.1f}" for r in group])
        row("CPU: requesting thread", [f"{r['explain']['thread_cpu_s'].get('requesting (replay)', 0) * 1e3:.1f}"
                                        for r in group])
        row("CPU: workers", [f"{sum(v for k, v in r['explain']['thread_cpu_s'].items() if 'worker' in k) * 1e3:.1f}"
                             for r in group])
        row("CPU: emulated copy engine", [f"{sum(v for k, v in r['explain']['thread_cpu_s'].items() if 'copy-engine' in k) * 1e3:.1f}"
                                          for r in group])
        if all("bounds" in r for r in group):
            b = [r["bounds"] for r in group]
            row("work alone: host / device / machine", [
                f"{x['work_alone_s']['host'] * 1e3:.0f}/{x['work_alone_s']['device'] * 1e3:.0f}/"
                f"{x['work_alone_s']['machine'] * 1e3:.0f}" for x in b])
            row("work in run: host / device (modelled)", [
                f"{x['work_run_s']['host'] * 1e3:.0f}/{x['work_run_s']['device'] * 1e3:.0f} "
                f"({x['work_run_s']['device_modelled'] * 1e3:.0f})" for x in b])
            row(f"bound, costs alone ({b[0]['cores']} cores)", [f"{x['bound_alone_s'] * 1e3:.1f}" for x in b])
            row(f"bound, run's CPU ({b[0]['cores']} cores)", [f"{x['bound_run_s'] * 1e3:.1f}" for x in b])
            row("time / bound (costs alone)", [f"{x['time_over_bound_alone']:.2f}x" for x in b])
            row("time / bound (run's CPU)", [f"{x['time_over_bound_run']:.2f}x" for x in b])
            for c in b[0]["hardware_bound_s"]:
                row(f"bound, H100 device, {c} cores", [f"{x['hardware_bound_s'][c] * 1e3:.1f}" for x in b])
    return "\n".join(lines)


def pass_window(spans: list, main: int, marks: list[float], names: dict, run: tuple) -> list:
    """The spans of one pass (the second, where the trace has one: the first warms the
    predictor; where passes are under 2% of the ``run``, its middle tenth) on the
    modelled clock, as ``[lane, kind, start, end]``."""
    stall = Union((s[2], s[3]) for s in spans if s[1] == "stall")
    a, b = marks[1] if len(marks) > 1 else run[0], marks[2] if len(marks) > 2 else run[1]
    if b - a < 0.02 * (run[1] - run[0]):
        middle = (run[0] + run[1]) / 2
        a, b = middle - 0.05 * (run[1] - run[0]), middle + 0.05 * (run[1] - run[0])
    ma, mb = a - stall.before(a), b - stall.before(b)
    out = []
    for ident, kind, s0, s1, _ in spans:
        if kind in ("stall", "held"):
            continue
        if ident == timeline.MODEL:
            lane, m0, m1 = kind.replace("-", " "), s0, s1
        else:
            if s1 < a or s0 > b:
                continue
            lane = "requesting" if ident == main else names.get(ident, str(ident))
            m0, m1 = s0 - stall.before(s0), s1 - stall.before(s1)
        if m1 >= ma and m0 <= mb and m1 > m0:
            out.append([lane, kind, m0 - ma, m1 - ma])
    return out


_COLORS = {"encrypt": "tab:red", "decrypt": "tab:pink", "wait-worker": "tab:orange", "wait-receive": "moccasin",
           "predictor": "tab:purple",
           "wait-device": "tab:gray", "task:encrypt": "tab:red", "task:plan": "tab:purple",
           "task:receive": "tab:pink", "task:seal-go": "tab:brown", "gated": "lightgray",
           "link h2d": "tab:blue", "link d2h": "tab:cyan", "compute": "tab:green"}


def plot_timeline(rows: list[dict], path: str) -> None:
    """One pass of each explained run with a timeline (``row['timeline']``) as lanes:
    the requesting thread, the workers, the emulated copy engine, the link and compute."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("timeline")]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.2 + 1.6 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        spans = row["timeline"]
        lanes = sorted({s[0] for s in spans}, key=lambda n: (
            0 if n == "requesting" else 1 if "worker" in n else 2 if "copy-engine" in n else 3, n))
        y = {lane: i for i, lane in enumerate(lanes)}
        for lane, kind, m0, m1 in sorted(spans, key=lambda s: not s[1].startswith("app:")):  # library below
            if kind.startswith("app:"):
                color, h = "khaki", 0.8
            elif kind.startswith("device:"):
                color, h = "tab:olive", 0.6
            else:
                color, h = _COLORS.get(kind, _COLORS.get(lane, "black")), 0.6
            ax.barh(y[lane], (m1 - m0) * 1e3, left=m0 * 1e3, height=h, color=color, linewidth=0)
        ax.set_yticks(range(len(lanes)), [n.replace("pipellm-", "") for n in lanes], fontsize=7)
        ax.invert_yaxis()
        end = max((s[3] for s in spans if not s[0].startswith(("link", "compute"))), default=0)
        ax.set_xlim(0, end * 1e3 * 1.02 or 1)
        ax.set_title(f"{row['workload']} - {row['mode']}: one pass, modelled ms (khaki: library; red: encrypt; "
                     f"pink: decrypt; gray: waiting for the device; orange: for a worker; moccasin: for "
                     f"device-to-host data; purple: predictor; light gray: worker held)", fontsize=7)
    axes[-1, 0].set_xlabel("modelled time (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_table(rows: list[dict]) -> str:
    """Each run modelled on this machine's cores and on more (``row['modelled']``), the
    device side in hardware: time and overhead against plain's modelled time."""
    rows = [r for r in rows if "modelled" in r]
    if not rows:
        return ""
    cores = list(rows[0]["modelled"])
    lines = ["\nmodelled (not run): the same runs on N host cores, the device side in hardware (an H100's copy "
             "engine), from the costs measured alone; pipellm hits as in the run",
             f"{'workload':<28} {'mode':<14}" + "".join(f"{c + ' cores ms':>16} {'vs plain':>9}" for c in cores)]
    for r in rows:
        plain = next((p for p in rows if p["trace"] == r["trace"] and p["mode"] == "plain"), None)
        cells = ""
        for c in cores:
            t = r["modelled"][c]
            over = f"{t / plain['modelled'][c] - 1:+.1%}" if plain else ""
            cells += f"{t * 1e3:>16.1f} {over:>9}"
        lines.append(f"{r['workload'][:28]:<28} {r['mode']:<14}" + cells)
    return "\n".join(lines)
