"""AES-256-GCM throughput through the library's sealing path, by chunk size and workers.

Each point seals messages with the channel's :class:`~pipellm.channel.Sealer` (header,
IV from a reserved counter, AAD, AES-GCM) straight into bounce slots, on 1..N threads,
next to the rate of ``cryptography``'s own ``AESGCM.encrypt_into`` on one thread,
measured in the same run. Best of ``repeats`` runs per point.
"""

from __future__ import annotations

import os
import threading
from time import perf_counter

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipellm._ext import BouncePool
from pipellm.channel import Direction, KeyAgreement, Kind, Sealer
from pipellm.channel.protocol import TAG_BYTES

KiB, MiB = 1 << 10, 1 << 20
SIZES = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB]
QUICK_SIZES = [4 * KiB, 64 * KiB, 1 * MiB]


def _calls(size: int, budget_bytes: int) -> int:
    return max(3, budget_bytes // size)


def cryptography_rate(data: memoryview, size: int, budget_bytes: int) -> float:
    """Bytes/s of one thread calling AESGCM.encrypt_into on ``size`` bytes."""
    aead = AESGCM(os.urandom(32))
    out = bytearray(size + TAG_BYTES)
    aad, iv, plain = bytes(48), os.urandom(12), data[:size]
    calls = _calls(size, budget_bytes)
    start = perf_counter()
    for _ in range(calls):
        aead.encrypt_into(iv, plain, aad, out)
    return calls * size / (perf_counter() - start)


def memcpy_rate(data: memoryview, size: int, budget_bytes: int) -> float:
    """Bytes/s of one thread copying ``size`` bytes: the memory system's reference rate
    (AES-GCM reads and writes as much; large messages on several threads hit this bound)."""
    src = np.frombuffer(data[:size], dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    calls = _calls(size, budget_bytes)
    start = perf_counter()
    for _ in range(calls):
        np.copyto(dst, src)
    return calls * size / (perf_counter() - start)


def sealer() -> Sealer:
    """A sealer of a fresh session's host-to-device keys (for measurements)."""
    host, device = KeyAgreement(), KeyAgreement()
    keys = host.derive(device.public_bytes, session=1, host_public=host.public_bytes,
                       device_public=device.public_bytes)
    return Sealer(keys, Direction.H2D, 1 << 32)


def library_rate(data: memoryview, size: int, workers: int, budget_bytes: int) -> float:
    """Bytes/s of ``workers`` threads sealing ``size``-byte messages into bounce slots."""
    seal = sealer()
    pool = BouncePool(workers * (size + TAG_BYTES + 8192))
    slots = [pool.acquire(size + TAG_BYTES) for _ in range(workers)]
    calls = max(3, _calls(size, budget_bytes) // workers)
    plain = data[:size]
    barrier = threading.Barrier(workers + 1, timeout=600)

    def work(slot):
        out = slot.view(size + TAG_BYTES)
        barrier.wait()
        for i in range(calls):
            seal.seal_into(seal.reserve(), Kind.DATA, 1, i * size, plain, out)
        barrier.wait()

    threads = [threading.Thread(target=work, args=(s,)) for s in slots]
    for t in threads:
        t.start()
    barrier.wait()
    start = perf_counter()
    barrier.wait()
    elapsed = perf_counter() - start
    for t in threads:
        t.join()
    for s in slots:
        pool.release(s)
    pool.close()
    return workers * calls * size / elapsed


def run(sizes=None, max_workers: int | None = None, repeats: int = 3, budget_bytes: int = 256 * MiB,
        progress=None) -> dict:
    sizes = sizes or SIZES
    max_workers = max_workers or os.cpu_count() or 1
    data = memoryview(np.random.default_rng(0).integers(0, 256, max(sizes), dtype=np.uint8))
    rows = []
    for size in sizes:
        reference = max(cryptography_rate(data, size, budget_bytes) for _ in range(repeats))
        library = {}
        for workers in range(1, max_workers + 1):
            library[workers] = max(library_rate(data, size, workers, budget_bytes) for _ in range(repeats))
            if progress:
                progress()
        memcpy = max(memcpy_rate(data, size, budget_bytes) for _ in range(repeats))
        rows.append({"size": size, "cryptography_GBps": reference / 1e9, "memcpy_GBps": memcpy / 1e9,
                     "library_GBps": {str(w): r / 1e9 for w, r in library.items()}})
    big = [r for r in rows if r["size"] >= MiB]
    summary = {}
    if big:
        summary["library_1_worker_vs_cryptography_min_at_1MiB_plus"] = min(
            r["library_GBps"]["1"] / r["cryptography_GBps"] for r in big)
        if max_workers >= 2:
            summary["speedup_2_vs_1_workers_min_at_1MiB_plus"] = min(
                r["library_GBps"]["2"] / r["library_GBps"]["1"] for r in big)
            for r in big:
                summary[f"speedup_2_vs_1_workers_at_{_size(r['size']).replace(' ', '')}"] = (
                    r["library_GBps"]["2"] / r["library_GBps"]["1"])
    return {"benchmark": "crypto", "repeats": repeats, "max_workers": max_workers,
            "rows": rows, "summary": summary}


def points(sizes=None, max_workers: int | None = None) -> int:
    """How many progress steps ``run`` takes."""
    return len(sizes or SIZES) * (max_workers or os.cpu_count() or 1)


def table(result: dict) -> str:
    workers = range(1, result["max_workers"] + 1)
    head = f"{'chunk':>8} {'memcpy':>7} {'cryptography':>13} " + " ".join(f"{f'{w} worker' + ('s' if w > 1 else ''):>10}" for w in workers)
    lines = ["AES-256-GCM seal rate, GB/s (library path: header + IV + AAD + AES-GCM into a bounce slot)",
             head]
    for r in result["rows"]:
        lines.append(f"{_size(r['size']):>8} {r['memcpy_GBps']:>7.2f} {r['cryptography_GBps']:>13.2f} "
                     + " ".join(f"{r['library_GBps'][str(w)]:>10.2f}" for w in workers))
    for key, value in result["summary"].items():
        lines.append(f"{key}: {value:.2f}")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(sizes, [r["cryptography_GBps"] for r in result["rows"]], "k--o", label="cryptography, 1 thread")
    for w in range(1, result["max_workers"] + 1):
        ax.plot(sizes, [r["library_GBps"][str(w)] for r in result["rows"]], "-o", label=f"pipellm seal, {w} worker(s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message (chunk) size, bytes")
    ax.set_ylabel("GB/s")
    ax.set_title("AES-256-GCM encryption rate")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
