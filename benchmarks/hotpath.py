"""The requesting thread's own cost per request, less its AES, by transfer size: a plain
copy, a cc request (encrypted on demand, chunk by chunk) and a pipellm hit (its chunks
encrypted ahead: the GO command and the submission are what is left). The harness the
hot path's comments refer to (``pipellm bench hotpath``).

Each is :func:`pipellm.traces.explain.request_costs`: eight regions requested in turn
with the emulated copy engine paused (its thread competes for neither a core nor the
GIL), the best of several passes, the AES seconds the pipeline counted taken out.

With ``instructions=True`` (``pipellm bench hotpath --instructions``, where valgrind is
installed) it also counts the requesting thread's instructions per request under
callgrind, which do not move with the machine's load as times do: a plain request, a cc
request (its AES included), a pipellm request (planning on the requesting thread
included, which depends on the threads' timing: the median of ``runs``) and the hit
itself (``Queue._hit``: claim, GO, submission). Each is the difference between runs of
``passes[1]`` and ``passes[0]`` passes, per request: setup and learning cancel out. And
a plan (``Queue._replenish``: the predictor told and asked, what it names admitted), on
whichever thread made it: the same difference per plan made.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from pipellm._ext.locks import round_trip_ns
from pipellm.traces.explain import request_costs, request_passes

#: what callgrind counts in, per kind of request: (mode, the C functions that switch counting on)
COUNTED = {"plain": ("plain", "*Requests*to_device*"), "cc (AES included)": ("cc", "*Requests*to_device*"),
           "pipellm request": ("pipellm", "*Requests*to_device*"), "pipellm hit": ("pipellm", "*5Queue__hit"),
           "pipellm plan": ("pipellm", "*5Queue__replenish")}
#: what is counted per plan, not per request, and on every thread (plans run on workers too)
PER_PLAN = ("pipellm plan",)

SIZES = [4096, 64 << 10, 1 << 20]
QUICK_SIZES = [4096, 64 << 10]
MODES = {"plain": "library_per_transfer_s", "cc": "cc_library_per_transfer_s", "pipellm hit": "hit_library_per_transfer_s"}


def points(sizes=None, repeats: int = 3) -> int:
    return len(sizes or SIZES)


def run(sizes=None, repeats: int = 3, progress=lambda n=1: None, instructions: bool = False) -> dict:
    rows = []
    for size in sizes or SIZES:
        costs = request_costs(layers=8, nbytes=size, passes=10 * max(1, repeats))
        row = {"size": size, "us_per_request": {mode: costs[key] * 1e6 for mode, key in MODES.items()}}
        if instructions:
            row["instructions_per_request"] = count_instructions(size)
        rows.append(row)
        progress(1)
    # the request path's lock against Python's own, taken and given back in C (best of 3)
    trips = [round_trip_ns(200_000) for _ in range(3)]
    lock = {name: min(t[name] for t in trips) for name in trips[0]}
    return {"benchmark": "hotpath", "repeats": repeats, "rows": rows, "lock_round_trip_ns": lock}


def count_instructions(size: int, layers: int = 8, passes=(2, 8), runs: int = 3) -> dict:
    """Instructions per request on the requesting thread, and per plan (see the module
    docstring), by kind: {kind: {"median": n, "runs": [...]}}."""
    if shutil.which("valgrind") is None:
        raise FileNotFoundError("counting instructions needs valgrind (e.g. apt install valgrind)")
    out = {}
    for kind, (mode, toggle) in COUNTED.items():
        per = []
        for _ in range(runs if mode == "pipellm" else 1):
            if kind in PER_PLAN:
                (few, a), (more, b) = (_callgrind(mode, toggle, size, layers, n, per_plan=True) for n in passes)
                per.append((more - few) / max(1, b - a))
            else:
                totals = [_callgrind(mode, toggle, size, layers, n) for n in passes]
                per.append((totals[1] - totals[0]) / ((passes[1] - passes[0]) * layers))
        out[kind] = {"median": statistics.median(per), "runs": per}
    return out


def _callgrind(mode: str, toggle: str, size: int, layers: int, passes: int, per_plan: bool = False):
    """The instructions callgrind counts on the main thread of one child run; with
    ``per_plan``, on all its threads (plans run on workers too), and the plans the run
    made: (instructions, plans)."""
    with tempfile.TemporaryDirectory() as folder:
        cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--toggle-collect={toggle}",
               f"--callgrind-out-file={os.path.join(folder, 'cg.%p')}", sys.executable, "-m",
               "pipellm.benchmarks.hotpath", mode, str(size), str(layers), str(passes)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"the counted run failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        counted = json.loads(done.stdout.strip().splitlines()[-1])
        if mode == "pipellm" and counted["hits"] != counted["requests"]:
            raise RuntimeError(f"only {counted['hits']} of {counted['requests']} pipellm requests hit: not counted")
        files = [f for f in os.listdir(folder) if "-" in f and (per_plan or f.endswith("-01"))]  # (-01: main)
        total = 0
        for name in files:
            with open(os.path.join(folder, name)) as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("totals:"))
        return (total, counted["plans"]) if per_plan else total


def _requests(mode: str, size: int, layers: int, passes: int) -> dict:
    """The counted child: :func:`~pipellm.traces.explain.request_passes` (under valgrind
    the workers are slow too: speculation is given long to settle); how many requests the
    counted passes made, how many hit, and how many plans the run made."""
    hits, stats = 0, {}
    for _, _, h, stats in request_passes(mode, layers, size, passes, settle_s=600.0):
        hits += h
    return {"requests": passes * layers, "hits": hits, "plans": stats.get("plans", 0)}


def table(result: dict) -> str:
    lines = [f"{'size':>9} " + " ".join(f"{m + ' us':>15}" for m in MODES)]
    for row in result["rows"]:
        lines.append(f"{row['size']:>9} " + " ".join(f"{row['us_per_request'][m]:>15.2f}" for m in MODES))
    if any("instructions_per_request" in row for row in result["rows"]):
        lines.append(f"{'size':>9} " + " ".join(f"{k:>18}" for k in COUNTED) + "   (instructions per request; "
                     "per plan for the plan)")
        for row in result["rows"]:
            counted = row.get("instructions_per_request", {})
            lines.append(f"{row['size']:>9} " + " ".join(
                f"{counted[k]['median']:>18,.0f}" if k in counted else f"{'-':>18}" for k in COUNTED))
    lines.append("the requesting thread's time per request less its AES, the copy engine paused (best of "
                 f"{10 * max(1, result['repeats'])} passes of 8 requests)")
    lock = result.get("lock_round_trip_ns")
    if lock:
        lines.append(f"a lock taken and given back in C: pipellm's mutex {lock['pipellm']:.1f} ns, "
                     f"Python's PyThread lock {lock['pythread']:.1f} ns")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["size"] for r in result["rows"]]
    for mode in MODES:
        ax.plot(sizes, [r["us_per_request"][mode] for r in result["rows"]], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("transfer bytes")
    ax.set_ylabel("us per request, less AES")
    ax.legend()
    ax.set_title("pipellm bench hotpath")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # (the counted child: python -m pipellm.benchmarks.hotpath MODE SIZE LAYERS PASSES)
    mode_, size_, layers_, passes_ = sys.argv[1], *map(int, sys.argv[2:5])
    print(json.dumps(_requests(mode_, size_, layers_, passes_)))
