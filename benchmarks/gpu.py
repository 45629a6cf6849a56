"""GPU figures for the cuda device (``python -m pipellm.benchmarks.gpu``; run by
``benchmarks/gpu_check.sh`` on a lent GPU machine).

Measures, in one run on one GPU:

- ``kernels``: the AES-256-GCM kernels' decrypt (verify + decrypt) and encrypt GB/s by
  message size, one message per launch, timed with CUDA events around the launches only
  (the ciphertext is already in device memory);
- ``pinned_h2d``: plain host-to-device copies from pinned memory, GB/s by size: the
  link's own rate, the baseline every encrypted figure is compared with;
- ``encrypted_h2d``: ``Pipeline(mode=cc|pipellm, device="cuda")`` host-to-device
  transfers, GB/s by size and worker count, each with the plain pinned figure of the
  same size beside it.

Under the CUDA simulator (``--quick``, for tests) the numbers mean nothing; the code path
is what is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from time import perf_counter

import numpy as np

KiB, MiB = 1 << 10, 1 << 20
KERNEL_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
LINK_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 256 * MiB, 1024 * MiB]
PIPE_SIZES = [4 * KiB, 1 * MiB, 16 * MiB, 256 * MiB]
WORKERS = [1, 2, 4, 8]
QUICK = {"kernel": [64, 1000], "link": [4 * KiB], "pipe": [700], "workers": [1, 2]}


def _events_seconds(cuda, run, repeats: int) -> float:
    """Best time of ``repeats`` runs of ``run()``, between CUDA events."""
    best = float("inf")
    for _ in range(repeats):
        start, stop = cuda.event(), cuda.event()
        start.record()
        run()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)  # milliseconds
    return best


def kernels(sizes, repeats: int = 5) -> list[dict]:
    from numba import cuda

    from pipellm.kernels import KernelKey, _batch_arrays, open_into, seal_into
    key = KernelKey(os.urandom(32))
    iv, aad = os.urandom(12), os.urandom(56)
    ivs, aads = _batch_arrays([iv], [aad])
    zero = cuda.to_device(np.zeros(1, np.int64))
    rows = []
    for size in sizes:
        lens = np.array([size], np.int64)
        host = np.random.default_rng(size).integers(0, 256, (size + 15) // 16 * 16, dtype=np.uint8)
        plain, sealed, out = cuda.to_device(host), cuda.to_device(np.zeros_like(host)), cuda.to_device(np.zeros_like(host))
        tags = cuda.to_device(np.zeros((1, 4), np.uint32))
        seal_into(key, ivs, aads, len(aad), plain, zero, lens, sealed, zero, tags)  # warm-up, compiles
        enc = _events_seconds(cuda, lambda: seal_into(key, ivs, aads, len(aad), plain, zero, lens, sealed, zero,
                                                      tags), repeats)
        ok = open_into(key, ivs, aads, len(aad), sealed, zero, lens, tags, out, zero)
        assert ok.copy_to_host()[0] == 1 and np.array_equal(out.copy_to_host()[:size], host[:size])
        dec = _events_seconds(cuda, lambda: open_into(key, ivs, aads, len(aad), sealed, zero, lens, tags, out, zero),
                              repeats)
        rows.append({"bytes": size, "decrypt_GBps": size / dec / 1e9, "encrypt_GBps": size / enc / 1e9})
        print(f"kernels {size:>11} B: decrypt {rows[-1]['decrypt_GBps']:8.2f} GB/s, "
              f"encrypt {rows[-1]['encrypt_GBps']:8.2f} GB/s", flush=True)
    return rows


def pinned_h2d(sizes, repeats: int = 5) -> list[dict]:
    from numba import cuda
    rows = []
    for size in sizes:
        host = cuda.pinned_array(size, np.uint8)
        host[:] = 1
        dev = cuda.device_array(size, np.uint8)
        seconds = _events_seconds(cuda, lambda: dev.copy_to_device(host), repeats)
        rows.append({"bytes": size, "GBps": size / seconds / 1e9})
        print(f"pinned h2d {size:>11} B: {rows[-1]['GBps']:8.2f} GB/s", flush=True)
    return rows


def encrypted_h2d(sizes, workers, repeats: int = 3, chunk_size: int = 4 * MiB, copies: str = "numba") -> list[dict]:
    import pipellm
    rows = []
    with pipellm.open_device("cuda", copies=copies) as dev:
        for size in sizes:
            chunk = min(chunk_size, size)
            for mode in ("cc", "pipellm"):
                for n in (workers if mode == "pipellm" else [1]):
                    extra = {"workers": n, "min_speculative_bytes": 0} if mode == "pipellm" else {}
                    with pipellm.Pipeline(device=dev, mode=mode, chunk_size=chunk, timeout=600,
                                          bounce_bytes=max(2 * (chunk + 4096), min(4 * size, 1 << 30)),
                                          **extra) as pipe:
                        region = pipe.register(pipellm.array(np.ones(size, np.uint8)))
                        pipe.to_device(region)
                        pipe.synchronize()
                        best = float("inf")
                        for _ in range(repeats):
                            if mode == "pipellm":
                                pipe.wait_speculation()
                            start = perf_counter()
                            pipe.to_device(region)
                            pipe.synchronize()
                            best = min(best, perf_counter() - start)
                        assert np.array_equal(dev.read(region.device_buffer), region.array)
                        hits = pipe.stats().get("hits")
                    rows.append({"bytes": size, "mode": mode, "workers": n, "GBps": size / best / 1e9, "hits": hits,
                                 "copies": copies})
                    print(f"{mode:>8} h2d {size:>11} B, {n} worker(s), {copies} copies: {rows[-1]['GBps']:8.3f} GB/s",
                          flush=True)
    return rows


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    k = result["kernels"]
    a.plot([r["bytes"] for r in k], [r["decrypt_GBps"] for r in k], "o-", label="decrypt kernel")
    a.plot([r["bytes"] for r in k], [r["encrypt_GBps"] for r in k], "s-", label="encrypt kernel")
    a.set(xscale="log", xlabel="message bytes", ylabel="GB/s", title="AES-256-GCM kernels")
    a.legend()
    link = result["pinned_h2d"]
    b.plot([r["bytes"] for r in link], [r["GBps"] for r in link], "k--", label="plain pinned h2d")
    for mode, workers, copies in sorted({(r["mode"], r["workers"], r.get("copies", "numba"))
                                         for r in result["encrypted_h2d"]}):
        rows = [r for r in result["encrypted_h2d"]
                if (r["mode"], r["workers"], r.get("copies", "numba")) == (mode, workers, copies)]
        b.plot([r["bytes"] for r in rows], [r["GBps"] for r in rows], "o-" if copies == "numba" else "x--",
               label=f"{mode}, {workers} worker(s), {copies} copies")
    b.set(xscale="log", xlabel="transfer bytes", ylabel="GB/s", title="host to device")
    b.legend(fontsize=8)
    fig.suptitle(result["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipellm.benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu.json", help="JSON results (a .png plot beside it)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the simulator tests)")
    args = parser.parse_args(argv)
    from numba import config, cuda
    if not (config.ENABLE_CUDASIM or cuda.is_available()):
        print("no CUDA GPU here (NUMBA_ENABLE_CUDASIM=1 runs this on the simulator)", file=sys.stderr)
        return 2
    name = "CUDA simulator" if config.ENABLE_CUDASIM else str(cuda.get_current_device().name)
    q = args.quick
    repeats = 1 if q else 5
    result = {"device": name, "cpu_count": os.cpu_count(),
              "kernels": kernels(QUICK["kernel"] if q else KERNEL_SIZES, repeats),
              "pinned_h2d": pinned_h2d(QUICK["link"] if q else LINK_SIZES, repeats),
              "encrypted_h2d": encrypted_h2d(QUICK["pipe"] if q else PIPE_SIZES, QUICK["workers"] if q else WORKERS,
                                             1 if q else 3)}
    if not config.ENABLE_CUDASIM and not q:
        from pipellm.devices.cuda import driver_layer
        if driver_layer() == "built":  # the same through the Cython cydriver layer's copies
            try:
                result["encrypted_h2d"] += encrypted_h2d([16 * MiB, 256 * MiB], [8], 3, copies="driver")
            except Exception as exc:  # noqa: BLE001 - reported, the numba figures still stand
                result["driver_copies_error"] = repr(exc)
                print(f"copies='driver' failed: {exc!r}", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    try:
        plot(result, os.path.splitext(args.out)[0] + ".png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
