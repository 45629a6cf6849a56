"""The cuda device's host cost per message on the driver path, without a GPU
(``pipellm bench gpu-host``): the copy-engine thread's CPU time per message, plain / cc /
pipellm, for 4 KiB transfers and for 4 MiB chunks.

The device is ``open_device("cuda", path="driver")`` on the fake driver in its threaded
form: the "GPU" (copies, the kernels' references) runs on a thread of its own, so the
copy-engine thread spends no CPU on it. The thread's CPU is read from its own clock
(``time.pthread_getcpuclockid``); the CPU it spent inside the fake's calls (the fake's
Python, which a real driver call does in a few microseconds of C) is counted apart and
taken out, and the driver calls per message are reported beside it, so the host's own
cost is what is left. The numba path (the old one) cannot run without a GPU: its figure
is the H100 measurement in docs/figures.md.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

CASES = {"4 KiB transfers": (4096, 4096, 64), "4 MiB chunks": (4 << 20, 16 << 20, 4)}
QUICK_CASES = {"4 KiB transfers": (4096, 4096, 32), "4 MiB chunks": (4 << 20, 8 << 20, 2)}
MODES = ("plain", "cc", "pipellm")


def points(quick: bool = False, repeats: int = 3) -> int:
    return len(CASES) * len(MODES)


def _measure(dev, fake, mode: str, chunk: int, nbytes: int, transfers: int, repeats: int) -> dict:
    import pipellm
    kw = {"min_speculative_bytes": 0} if mode == "pipellm" else {}
    with pipellm.Pipeline(device=dev, mode=mode, chunk_size=chunk, bounce_bytes=max(64 << 20, 4 * nbytes),
                          **kw) as pipe:
        regions = [pipe.register(pipellm.array(np.full(nbytes, i, np.uint8)), name=f"r{i}")
                   for i in range(transfers)]

        def one_pass():
            for region in regions:
                pipe.to_device(region)
                if mode == "pipellm":
                    pipe.wait_speculation()
            pipe.synchronize()
        for _ in range(2):  # keys' tables grown, pipellm's order learnt
            one_pass()
        engine = dev._thread.ident
        clock = time.pthread_getcpuclockid(engine)
        runs = []
        for _ in range(repeats):
            fake_before = fake.cpu_in_fake(engine)
            calls_before = dict(dev.stats()["driver_calls"])
            cpu, wall = time.clock_gettime(clock), time.perf_counter()
            one_pass()
            cpu, wall = time.clock_gettime(clock) - cpu, time.perf_counter() - wall
            in_fake = fake.cpu_in_fake(engine) - fake_before
            messages = transfers * -(-nbytes // chunk)
            calls = {k: (v - calls_before.get(k, 0)) / messages for k, v in dev.stats()["driver_calls"].items()}
            runs.append({"engine_us": cpu * 1e6 / messages, "fake_us": in_fake * 1e6 / messages,
                         "host_us": (cpu - in_fake) * 1e6 / messages, "wall_s": wall, "calls": calls})
        hits = pipe.stats().get("hits")
    best = min(runs, key=lambda r: r["host_us"])
    return {"mode": mode, "messages": messages, "host_us_per_message": statistics.median(r["host_us"] for r in runs),
            "engine_us_per_message": statistics.median(r["engine_us"] for r in runs),
            "fake_us_per_message": statistics.median(r["fake_us"] for r in runs),
            "driver_calls_per_message": best["calls"], "wall_s": statistics.median(r["wall_s"] for r in runs),
            "hits": hits}


def key_setup_ms(message_bytes: int = 4 << 20, repeats: int = 3) -> dict:
    """Milliseconds the copy-engine thread spends on a new key (each session's, each
    rotation's) before the GPU can use it: its tables, and the powers of H for messages
    of ``message_bytes`` (best of ``repeats``)."""
    import os

    from pipellm._ext.gpupath import chunks_needed
    from pipellm.kernels.tables import GcmKey
    chunks = chunks_needed(message_bytes)  # (what the driver path grows a key to)
    init = powers = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        key = GcmKey(os.urandom(32))
        mid = time.perf_counter()
        key.ensure_chunks(chunks)
        init, powers = min(init, mid - start), min(powers, time.perf_counter() - mid)
    return {"tables_ms": init * 1e3, "powers_ms": powers * 1e3, "message_bytes": message_bytes}


def run(quick: bool = False, repeats: int = 3, progress=lambda n=1: None) -> dict:
    import pipellm
    from pipellm.devices.fakedriver import FakeDriver

    fake = FakeDriver(threaded=True)
    rows = []
    dev = pipellm.open_device("cuda", path="driver", driver=fake, staging_bytes=64 << 20)
    try:
        for case, (chunk, nbytes, transfers) in (QUICK_CASES if quick else CASES).items():
            for mode in MODES:
                row = _measure(dev, fake, mode, chunk, nbytes, transfers, max(1, repeats))
                rows.append({"case": case, "chunk": chunk, "transfer_bytes": nbytes, **row})
                progress(1)
    finally:
        dev.close()
        fake.close()
    return {"benchmark": "gpu-host", "repeats": repeats, "device": "cuda, driver path, fake driver (threaded)",
            "rows": rows, "key_setup": key_setup_ms(repeats=max(1, repeats)),
            "old_path": "the numba path needs a GPU: see docs/figures.md, 'The cuda device on an H100'"}


def table(result: dict) -> str:
    lines = [f"{'case':<16} {'mode':<8} {'host us/msg':>12} {'engine us':>10} {'in fake us':>11} "
             f"{'calls/msg':>9} {'groups/msg':>10} {'waits/msg':>9}"]
    for r in result["rows"]:
        c = r["driver_calls_per_message"]
        lines.append(f"{r['case']:<16} {r['mode']:<8} {r['host_us_per_message']:>12.1f} "
                     f"{r['engine_us_per_message']:>10.1f} {r['fake_us_per_message']:>11.1f} "
                     f"{c.get('message', 0):>9.2f} {c.get('group', 0) / 9:>10.3f} {c.get('wait', 0):>9.3f}")
    lines.append("host us/msg: the copy-engine thread's CPU per message less what it spent inside the fake "
                 f"driver (median of {result['repeats']}); calls/msg: driver calls on the per-message path; "
                 "groups/msg: verification groups launched (9 calls each with one key) per message; "
                 f"{result['old_path']}")
    key = result.get("key_setup")
    if key:
        lines.append(f"a new key: its tables {key['tables_ms']:.1f} ms, the powers of H for "
                     f"{key['message_bytes'] >> 20} MiB messages {key['powers_ms']:.1f} ms (copy-engine thread)")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.25
    for i, mode in enumerate(MODES):
        values = [next(r["host_us_per_message"] for r in result["rows"] if r["case"] == c and r["mode"] == mode)
                  for c in cases]
        ax.bar([x + (i - 1) * width for x in range(len(cases))], values, width, label=mode)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases)
    ax.set_ylabel("copy-engine host us per message")
    ax.set_title("pipellm bench gpu-host (driver path, fake driver)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
