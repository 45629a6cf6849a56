"""What write tracking costs where it follows the memory rather than the registration.

- ``fork``: ``os.fork()`` + the child's exit + ``waitpid``, with N library buffers
  (:func:`pipellm.empty`, 1 MiB each, every page touched) against the same memory as
  plain numpy arrays. A forked child remaps each library buffer private (copy-on-write:
  it can never change the parent's bytes behind the write guard): one ``mmap`` per
  buffer in the child, no copy.
- ``notify``: one library write's notice to every registration over its bytes (a
  device-to-host commit calls it before and after), with N guard entries registered:
  a scan of the guard table.
"""

from __future__ import annotations

import os
from time import perf_counter

import numpy as np

import pipellm
from pipellm._ext import writeguard

MiB = 1 << 20
SIZES = [0, 16, 256, 1024]       # buffers (fork) / guard entries (notify)
QUICK_SIZES = [0, 16, 128]


def _fork_s() -> float:
    start = perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return perf_counter() - start


def fork_cost(buffers: int, library: bool, repeats: int) -> float:
    """Best seconds of a fork round trip with ``buffers`` MiB-sized arrays alive."""
    make = pipellm.empty if library else (lambda n, dtype: np.empty(n, dtype))
    arrays = [make(MiB, np.uint8) for _ in range(buffers)]
    for a in arrays:
        a[::4096] = 1  # every page present (and in the parent's page tables)
    return min(_fork_s() for _ in range(repeats))


def notify_cost(entries: int, calls: int = 2000) -> float:
    """Seconds per ``writeguard.written`` with ``entries`` guard entries registered."""
    memory = pipellm.empty(max(entries, 1) * 4096, np.uint8)
    start_address = memory.__array_interface__["data"][0]
    held = [writeguard.acquire_entry(start_address + i * 4096, 4096, False) for i in range(entries)]
    try:
        start = perf_counter()
        for _ in range(calls):
            writeguard.written(start_address, 64)
        return (perf_counter() - start) / calls
    finally:
        for entry in held:
            writeguard.release_entry(entry)


def points(sizes=None, repeats: int = 3) -> int:
    return len(sizes or SIZES) * 3


def run(sizes=None, repeats: int = 3, progress=lambda n=1: None) -> dict:
    rows = []
    for n in sizes or SIZES:
        row = {"count": n}
        row["fork_numpy_us"] = fork_cost(n, False, max(repeats, 3)) * 1e6
        progress(1)
        row["fork_library_us"] = fork_cost(n, True, max(repeats, 3)) * 1e6
        progress(1)
        row["notify_us"] = notify_cost(n) * 1e6
        progress(1)
        rows.append(row)
    return {"benchmark": "tracking", "buffer_bytes": MiB, "rows": rows,
            "what": "fork: fork + child exit + waitpid with N 1 MiB buffers alive (best of repeats); "
                    "notify: one library write's notice with N guard entries registered"}


def table(result: dict) -> str:
    lines = ["write tracking: fork round trip (N x 1 MiB buffers) and a library write's notice (N entries)",
             f"{'N':>6} {'fork numpy us':>14} {'fork library us':>16} {'extra us/buffer':>16} {'notify us':>10}"]
    for r in result["rows"]:
        extra = (r["fork_library_us"] - r["fork_numpy_us"]) / r["count"] if r["count"] else 0.0
        lines.append(f"{r['count']:>6} {r['fork_numpy_us']:>14.0f} {r['fork_library_us']:>16.0f} "
                     f"{extra:>16.1f} {r['notify_us']:>10.2f}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    counts = [r["count"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(counts, [r["fork_numpy_us"] for r in rows], "-o", label="numpy arrays")
    left.plot(counts, [r["fork_library_us"] for r in rows], "-s", label="library memory (child remapped private)")
    left.set_xlabel("1 MiB buffers alive")
    left.set_ylabel("fork + exit + wait, us")
    left.legend(fontsize=8)
    right.plot(counts, [r["notify_us"] for r in rows], "-o")
    right.set_xlabel("guard entries registered")
    right.set_ylabel("library write notice, us")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
