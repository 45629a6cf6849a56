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
its cost per op). With ``C`` cores, ``n`` host threads able to do the host work (the
requesting thread and the workers), the run's emulation stall ``S`` (device work the
model excludes) and plain's time on the same trace ``P``::

    bound = max(P, host / min(C, n), (host + device - S) / C)

computed twice: from each operation's cost measured alone on an idle machine
(:func:`measure_costs`), and from the CPU times the run's threads spent on the same work
(the gap is contention: shared cores, memory bandwidth). ``hardware`` bounds take the
device side as an H100's (its copy engine decrypts at link rate: no device CPU work, no
stall) and the workers a host of ``C`` cores has (``C - 1``): ``max(P, host / C)``.
"""

from __future__ import annotations

import threading
import time
from time import perf_counter

import numpy as np

from .. import timeline
from .intervals import Union

#: the causes of the requesting thread's modelled time, in report order
CAUSES = ("encrypting", "decrypting", "waiting_worker", "worker_starved", "predictor", "link", "compute",
          "device_other", "library", "application")

LABELS = {"encrypting": "requesting thread encrypting", "decrypting": "requesting thread decrypting",
          "waiting_worker": "waiting for a worker", "worker_starved": "worker CPU starved",
          "predictor": "predictor", "link": "link (modelled)", "compute": "compute (modelled)",
          "device_other": "device latency/order (modelled)", "library": "library per transfer",
          "application": "application writes"}

_CHILD = {"encrypt": "encrypting", "decrypt": "decrypting", "wait-worker": "waiting_worker",
          "predictor": "predictor", "wait-device": "device"}


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
    AES-GCM seal and open as ``fixed + bytes / rate``, memcpy's rate, a plain transfer's
    cost on the host (the library's least per-transfer cost) and on the emulated copy
    engine (per op), and a cc transfer's cost on the host less its AES. Rates are over ``footprint`` bytes of distinct memory,
    chunk by chunk, as a run streams its regions (cache-hot chunks would run 2-4x faster
    than any replay can).

    >>> c = measure_costs(1 << 20, footprint=8 << 20)
    >>> c["seal_bytes_per_s"] > 1e8 and c["library_per_transfer_s"] > 0
    True
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from .. import hostmem
    from .._ext import copy_into
    from ..channel.cipher import open_into, seal_into
    from ..devices import open_device
    from ..pipeline import Pipeline

    aead, iv, aad = AESGCM(bytes(32)), bytes(12), bytes(64)
    small, big = 4096, max(chunk_size, 1 << 20)
    n = max(2, footprint // big)
    src = np.frombuffer(np.random.default_rng(0).bytes(n * big), np.uint8)
    sealed = np.empty(n * (big + 16), np.uint8)
    plain = np.empty(n * big, np.uint8)
    s_views = [memoryview(src)[i * big:(i + 1) * big] for i in range(n)]
    c_views = [memoryview(sealed)[i * (big + 16):(i + 1) * (big + 16)] for i in range(n)]
    p_views = [memoryview(plain)[i * big:(i + 1) * big] for i in range(n)]
    for i in range(n):
        seal_into(aead, iv, s_views[i], aad, c_views[i])
    t_big = {
        "seal": _cost(lambda: [seal_into(aead, iv, s_views[i], aad, c_views[i]) for i in range(n)], 3) / n,
        "open": _cost(lambda: [open_into(aead, iv, c_views[i], aad, p_views[i]) for i in range(n)], 3) / n}
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
    out["memcpy_bytes_per_s"] = big / (_cost(lambda: [copy_into(p_views[i], s_views[i]) for i in range(n)], 3) / n)
    del src, sealed, plain, s_views, c_views, p_views
    # a 4 KiB transfer, 400 times, plain and cc: the host's call (less its AES) and the
    # copy engine's op
    seal_small = out["seal_fixed_s"] + small / out["seal_bytes_per_s"]
    for mode in ("plain", "cc"):
        with open_device("emulated") as dev, Pipeline(device=dev, mode=mode) as pipe:
            region = pipe.register(hostmem.empty(small, np.uint8), name="calibrate")
            calls = 400
            best_host = best_device = float("inf")
            for _ in range(3):
                busy = dev.stats()["device_busy_s"]
                start = perf_counter()
                for _ in range(calls):
                    pipe.to_device(region)
                best_host = min(best_host, perf_counter() - start)
                pipe.synchronize()
                best_device = min(best_device, dev.stats()["device_busy_s"] - busy)
        if mode == "plain":
            out["library_per_transfer_s"] = best_host / calls
            out["device_per_op_s"] = max(0.0, best_device / calls - small / out["memcpy_bytes_per_s"])
        else:
            out["cc_library_per_transfer_s"] = max(out["library_per_transfer_s"], best_host / calls - seal_small)
    return out


def breakdown(spans: list, main: int, cpu_before: dict, cpu_after: dict, stats: dict, device_thread: str) -> dict:
    """The requesting thread's modelled time by cause, per-thread CPU, and the run's work
    (see the module docstring). ``spans``: the run's timeline; ``main``: the requesting
    thread's ident; ``cpu_*``: :func:`thread_cpu` before and after the run."""
    stall = Union((s[2], s[3]) for s in spans if s[1] == "stall")
    held = Union((s[2], s[3]) for s in spans if s[0] == main and s[1] == "held")

    def model(t: float) -> float:
        return t - stall.before(t)

    compute = Union((s[2], s[3]) for s in spans if s[0] == timeline.MODEL and s[1] == "compute")
    busy = Union((s[2], s[3]) for s in spans if s[0] == timeline.MODEL)

    tasks = [s for s in spans if s[1].startswith("task:")]
    task_wall = sum(s[3] - s[2] for s in tasks)
    task_cpu = sum(s[4] for s in tasks)
    worker_share = min(1.0, task_cpu / task_wall) if task_wall else 1.0

    causes = dict.fromkeys(CAUSES, 0.0)
    mine = sorted((s for s in spans if s[0] == main), key=lambda s: s[2])
    apps = [s for s in mine if s[1].startswith("app:")]
    children = [s for s in mine if s[1] in _CHILD]
    wait_cpu = sum(s[4] for s in children if s[1] == "wait-device")
    device_stall = 0.0
    j = 0
    for _, kind, a, b, _ in apps:
        inside = 0.0
        cursor = a
        while j < len(children) and children[j][2] < b:
            _, ckind, c0, c1, _ = children[j]
            j += 1
            c0, c1 = max(c0, cursor), min(c1, b)
            if c1 <= c0:
                continue
            cursor = c1
            stalled = stall.overlap(c0, c1) - held.overlap(c0, c1)
            wall = c1 - c0
            modelled = wall - stall.overlap(c0, c1)
            inside += modelled
            cause = _CHILD[ckind]
            if cause == "device":
                device_stall += stalled
                m0, m1 = model(c0), model(c1)
                on_compute = compute.overlap(m0, m1)
                on_any = busy.overlap(m0, m1)
                causes["compute"] += on_compute
                causes["link"] += on_any - on_compute
                causes["device_other"] += max(0.0, modelled - on_any)
            elif cause == "waiting_worker":
                causes["waiting_worker"] += modelled * worker_share
                causes["worker_starved"] += modelled * (1 - worker_share)
            else:
                causes[cause] += modelled
        rest = (b - a) - stall.overlap(a, b) - inside
        causes["application" if kind == "app:write" else "library"] += max(0.0, rest)

    threads = {}
    for ident, (name, after) in cpu_after.items():
        before = cpu_before.get(ident, (name, 0.0))[1]
        label = "requesting (replay)" if ident == main else name
        threads[label] = after - before
    main_cpu = threads.get("requesting (replay)", 0.0)
    held_wall = held.total
    host_cpu = max(0.0, main_cpu - held_wall - wait_cpu) + task_cpu
    device_cpu = sum(s[4] for s in spans if s[1].startswith("device:"))
    return {"causes_s": causes, "emulated_device_stall_s": device_stall,
            "worker_cpu_share": worker_share, "thread_cpu_s": threads,
            "run_host_cpu_s": host_cpu, "run_device_cpu_s": device_cpu,
            "stall_s": stall.total - held_wall, "bookkeeping_s": held_wall, "clock_stopped_s": stall.total}


def work_alone(row: dict, costs: dict) -> tuple[float, float]:
    """The run's host and device CPU work priced at the idle machine's costs."""
    host = (row.get("encrypt_bytes", 0) / costs["seal_bytes_per_s"]
            + row.get("messages_h2d", 0) * costs["seal_fixed_s"] * (row["mode"] != "plain")
            + row.get("decrypt_bytes", 0) / costs["open_bytes_per_s"]
            + row.get("messages_d2h", 0) * costs["open_fixed_s"] * (row["mode"] != "plain")
            + (row["transfers_h2d"] + row["transfers_d2h"]) * costs["library_per_transfer_s"]
            + row.get("predictor_s", 0.0))
    device = (row.get("device_aes_bytes", 0) / min(costs["seal_bytes_per_s"], costs["open_bytes_per_s"])
              + row.get("device_copy_bytes", 0) / costs["memcpy_bytes_per_s"]
              + row.get("device_ops", 0) * costs["device_per_op_s"])
    return host, device


def bound(plain_s: float, host: float, device: float, stall: float, cores: int, threads: int) -> float:
    """The least modelled time: see the module docstring."""
    return max(plain_s, host / max(1, min(cores, threads)), (host + device - stall) / cores)


def bounds(row: dict, plain_s: float, costs: dict, cores: int, hardware_cores=(16,)) -> dict:
    """Both bounds on this machine, and the hardware-device bounds, for one explained row."""
    ex = row["explain"]
    threads = 1 + row.get("workers", 0) if row["mode"] == "pipellm" else 1
    host, device = work_alone(row, costs)
    out = {"plain_s": plain_s, "cores": cores, "host_threads": threads,
           "work_alone_s": {"host": host, "device": device},
           "work_run_s": {"host": ex["run_host_cpu_s"], "device": ex["run_device_cpu_s"]},
           "bound_alone_s": bound(plain_s, host, device, ex["clock_stopped_s"], cores, threads),
           "bound_run_s": bound(plain_s, ex["run_host_cpu_s"], ex["run_device_cpu_s"], ex["clock_stopped_s"], cores,
                                threads)}
    out["hardware_bound_s"] = {str(c): max(plain_s, host / c) if row["mode"] == "pipellm" else max(plain_s, host)
                               for c in sorted({cores, *hardware_cores})}
    out["time_over_bound_run"] = row["time_s"] / out["bound_run_s"] if out["bound_run_s"] else None
    return out


def table(rows: list[dict]) -> str:
    """The explanation as text: one block per trace, a column per mode."""
    lines = []
    for source in dict.fromkeys(r["trace"] for r in rows):
        group = [r for r in rows if r["trace"] == source and "explain" in r]
        if not group:
            continue
        heads = [f"{r['mode']}" + (f":{r['predictor']}" if r["mode"] == "pipellm" else "") for r in group]
        lines.append(f"\n{group[0]['workload']}: where the requesting thread's modelled time goes (ms)")
        lines.append(f"  {'':34}" + "".join(f"{h:>16}" for h in heads))

        def row(label, values):
            lines.append(f"  {label:34}" + "".join(f"{v:>16}" for v in values))
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
            row("work alone: host / device", [f"{x['work_alone_s']['host'] * 1e3:.0f}/{x['work_alone_s']['device'] * 1e3:.0f}" for x in b])
            row("work in run: host / device", [f"{x['work_run_s']['host'] * 1e3:.0f}/{x['work_run_s']['device'] * 1e3:.0f}" for x in b])
            row(f"bound, costs alone ({b[0]['cores']} cores)", [f"{x['bound_alone_s'] * 1e3:.1f}" for x in b])
            row(f"bound, run's CPU ({b[0]['cores']} cores)", [f"{x['bound_run_s'] * 1e3:.1f}" for x in b])
            row("time / bound (run's CPU)", [f"{x['time_over_bound_run']:.2f}x" for x in b])
            for c in b[0]["hardware_bound_s"]:
                row(f"bound, H100 device, {c} cores", [f"{x['hardware_bound_s'][c] * 1e3:.1f}" for x in b])
    return "\n".join(lines)


def pass_window(spans: list, main: int, marks: list[float], stall: Union, names: dict) -> list:
    """The spans of one pass (the second, where the trace has one: the first warms the
    predictor) on the modelled clock, as ``[lane, kind, start, end]``."""
    if len(marks) >= 2:
        a, b = marks[1], (marks[2] if len(marks) > 2 else float("inf"))
    else:
        a, b = (marks[0] if marks else float("-inf")), float("inf")
    ma, mb = a - stall.before(a), (b - stall.before(b)) if b != float("inf") else float("inf")
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


_COLORS = {"encrypt": "tab:red", "decrypt": "tab:pink", "wait-worker": "tab:orange", "predictor": "tab:purple",
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
        ax.set_title(f"{row['workload']} - {row['mode']}: one pass, modelled ms (khaki: library; red: AES; "
                     f"gray: waiting for the device; orange: waiting for a worker)", fontsize=8)
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
             f"{'workload':<28} {'mode':<8}" + "".join(f"{c + ' cores ms':>16} {'vs plain':>9}" for c in cores)]
    for r in rows:
        plain = next((p for p in rows if p["trace"] == r["trace"] and p["mode"] == "plain"), None)
        cells = ""
        for c in cores:
            t = r["modelled"][c]
            over = f"{t / plain['modelled'][c] - 1:+.1%}" if plain else ""
            cells += f"{t * 1e3:>16.1f} {over:>9}"
        lines.append(f"{r['workload'][:28]:<28} {r['mode']:<8}" + cells)
    return "\n".join(lines)
