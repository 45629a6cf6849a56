"""The requesting thread's own cost per request, less its AES, by transfer size: a plain
copy, a cc request (encrypted on demand, chunk by chunk) and a pipellm hit (its chunks
encrypted ahead: the GO command and the submission are what is left). The harness the
hot path's comments refer to (``pipellm bench hotpath``).

Each is :func:`pipellm.traces.explain.request_costs`: eight regions requested in turn
with the emulated copy engine paused (its thread competes for neither a core nor the
GIL), the best of several passes, the AES seconds the pipeline counted taken out.
"""

from __future__ import annotations

from pipellm._ext.locks import round_trip_ns
from pipellm.traces.explain import request_costs

SIZES = [4096, 64 << 10, 1 << 20]
QUICK_SIZES = [4096, 64 << 10]
MODES = {"plain": "library_per_transfer_s", "cc": "cc_library_per_transfer_s", "pipellm hit": "hit_library_per_transfer_s"}


def points(sizes=None, repeats: int = 3) -> int:
    return len(sizes or SIZES)


def run(sizes=None, repeats: int = 3, progress=lambda n=1: None) -> dict:
    rows = []
    for size in sizes or SIZES:
        costs = request_costs(layers=8, nbytes=size, passes=10 * max(1, repeats))
        rows.append({"size": size, "us_per_request": {mode: costs[key] * 1e6 for mode, key in MODES.items()}})
        progress(1)
    # the request path's lock against Python's own, taken and given back in C (best of 3)
    trips = [round_trip_ns(200_000) for _ in range(3)]
    lock = {name: min(t[name] for t in trips) for name in trips[0]}
    return {"benchmark": "hotpath", "repeats": repeats, "rows": rows, "lock_round_trip_ns": lock}


def table(result: dict) -> str:
    lines = [f"{'size':>9} " + " ".join(f"{m + ' us':>15}" for m in MODES)]
    for row in result["rows"]:
        lines.append(f"{row['size']:>9} " + " ".join(f"{row['us_per_request'][m]:>15.2f}" for m in MODES))
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
