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

from pipellm._ext import PAGE_BYTES, BouncePool
from pipellm.channel import Direction, KeyAgreement, Kind, Sealer
from pipellm.channel.protocol import TAG_BYTES
from pipellm.pipeline.secure import slot_bytes_for

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


def seal_rate(data: memoryview, size: int, calls: int, *, workers: int = 1, ring_bytes: int = 0,
              repeats: int = 1) -> float:
    """Bytes/s of ``workers`` threads, each sealing ``calls`` messages of ``size`` bytes
    into bounce slots of its own, as the library's workers do (the best of ``repeats``
    timed rounds).

    By default each thread seals ``data[:size]`` into one slot again and again (from
    cache: the cipher's rate). With ``ring_bytes`` the i-th message is ``data``'s i-th
    ``size``-byte chunk (wrapping around) and goes to the next of a ring of slots
    filling ``ring_bytes``: the pipeline's access pattern, plaintext read from memory
    and ciphertext written to memory. Slots are written once before the clock starts.
    """
    seal = sealer()
    sources = [data[i:i + size] for i in range(0, len(data) - size + 1, size)] if ring_bytes else [data[:size]]
    slot_bytes = size + TAG_BYTES
    per_worker = max(1, ring_bytes // slot_bytes_for(size)) if ring_bytes else 1
    pool = BouncePool(workers * per_worker * (slot_bytes + PAGE_BYTES))
    rings = [[pool.acquire(slot_bytes) for _ in range(per_worker)] for _ in range(workers)]
    for ring in rings:
        for slot in ring:
            slot.view(slot_bytes)[:] = bytes(slot_bytes)
    barrier = threading.Barrier(workers + 1, timeout=600)

    def work(ring):
        outs = [slot.view(slot_bytes) for slot in ring]
        for r in range(repeats):  # (the ring goes on where the last round left it)
            barrier.wait()
            for i in range(r * calls, (r + 1) * calls):
                seal.seal_into(seal.reserve(), Kind.DATA, 1, i * size, sources[i % len(sources)], outs[i % len(outs)])
            barrier.wait()

    threads = [threading.Thread(target=work, args=(ring,)) for ring in rings]
    for t in threads:
        t.start()
    elapsed = float("inf")
    for _ in range(repeats):
        barrier.wait()
        start = perf_counter()
        barrier.wait()
        elapsed = min(elapsed, perf_counter() - start)
    for t in threads:
        t.join()
    for ring in rings:
        for slot in ring:
            pool.release(slot)
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
            calls = max(3, _calls(size, budget_bytes) // workers)
            library[workers] = max(seal_rate(data, size, calls, workers=workers) for _ in range(repeats))
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
