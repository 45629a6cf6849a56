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
import traceback
from functools import partial
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
    """Decrypt and encrypt GB/s by size; each size's GPU ciphertext and tag are compared
    with the CPU's (``cryptography``'s AES-GCM, as the channel seals) byte for byte."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from numba import cuda

    from pipellm.kernels import KernelKey, Scratch, _batch_arrays, open_into, seal_into
    scratch = Scratch()  # as the cuda device launches them: no allocation per launch
    secret = os.urandom(32)
    key = KernelKey(secret)
    iv, aad = os.urandom(12), os.urandom(56)
    ivs, aads = _batch_arrays([iv], [aad])
    zero = cuda.to_device(np.zeros(1, np.int64))
    rows = []
    for size in sizes:
        lens = np.array([size], np.int64)
        host = np.random.default_rng(size).integers(0, 256, (size + 15) // 16 * 16, dtype=np.uint8)
        plain, sealed, out = cuda.to_device(host), cuda.to_device(np.zeros_like(host)), cuda.to_device(np.zeros_like(host))
        tags = cuda.to_device(np.zeros((1, 4), np.uint32))
        seal = partial(seal_into, key, ivs, aads, len(aad), plain, zero, lens, sealed, zero, tags, scratch=scratch)
        seal()  # warm-up (compiles, or loads the cached kernels)
        enc = _events_seconds(cuda, seal, repeats)
        cpu = AESGCM(secret).encrypt(iv, host[:size].tobytes(), aad)
        gpu = sealed.copy_to_host()[:size].tobytes() + tags.copy_to_host()[0].astype(">u4").tobytes()
        opened = partial(open_into, key, ivs, aads, len(aad), sealed, zero, lens, tags, out, zero, scratch=scratch)
        assert opened().copy_to_host()[0] == 1 and np.array_equal(out.copy_to_host()[:size], host[:size])
        dec = _events_seconds(cuda, opened, repeats)
        rows.append({"bytes": size, "decrypt_GBps": size / dec / 1e9, "encrypt_GBps": size / enc / 1e9,
                     "matches_cpu": gpu == cpu})
        print(f"kernels {size:>11} B: decrypt {rows[-1]['decrypt_GBps']:8.2f} GB/s, "
              f"encrypt {rows[-1]['encrypt_GBps']:8.2f} GB/s, same bytes as the CPU: {gpu == cpu}", flush=True)
    return rows


def kernel_parts(size: int = 64 * MiB, repeats: int = 5, threads=(64, 128, 256, 512)) -> dict:
    """Where a decrypt's time goes (GHASH, tag, CTR kernels alone) and how the whole
    decrypt's GB/s depends on threads per block, at ``size``."""
    from numba import cuda

    from pipellm.kernels import KernelKey, Scratch, _batch_arrays, _ctr, _ghash, open_into, seal_into
    from pipellm.kernels.aesgcm import THREADS, tag_kernel
    key, scratch = KernelKey(os.urandom(32)), Scratch()
    ivs, aads = _batch_arrays([os.urandom(12)], [os.urandom(56)])
    zero = cuda.to_device(np.zeros(1, np.int64))
    lens = np.array([size], np.int64)
    lens_d = cuda.to_device(lens)
    rng = np.random.default_rng(0)  # random ciphertext: GHASH's table lookups depend on it
    plain, data = cuda.to_device(rng.integers(0, 256, size, dtype=np.uint8)), cuda.device_array(size, np.uint8)
    out, tags = cuda.device_array(size, np.uint8), cuda.to_device(np.zeros((1, 4), np.uint32))
    seal_into(key, ivs, aads, 56, plain, zero, lens, data, zero, tags, scratch=scratch)  # a message that verifies
    ok, checked = cuda.to_device(np.ones(1, np.uint32)), cuda.to_device(np.ones(1, np.uint32))
    acc = cuda.to_device(np.zeros((1, 4), np.uint32))
    parts = {
        "ghash": lambda: _ghash(key, data, zero, lens, lens_d, aads, 56, THREADS, 0, acc),
        "tag": lambda: tag_kernel[1, THREADS](key.te, key.round_keys, ivs, acc, tags, checked, 1),
        "ctr": lambda: _ctr(key, ivs, data, zero, out, zero, lens, lens_d, ok, THREADS, 0),
    }
    result = {"bytes": size, "ms": {}, "decrypt_GBps_by_threads": {}}
    for name, run in parts.items():
        run()
        result["ms"][name] = _events_seconds(cuda, run, repeats) * 1e3
    for t in threads:
        run = partial(open_into, key, ivs, aads, 56, data, zero, lens, tags, out, zero, threads=t, scratch=scratch)
        assert run().copy_to_host()[0] == 1  # verified: the CTR kernel decrypts (timed with it)
        result["decrypt_GBps_by_threads"][t] = size / _events_seconds(cuda, run, repeats) / 1e9
    print(f"kernel parts at {size} B: {result}", flush=True)
    return result


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


def encrypted_h2d(sizes, workers, repeats: int = 3, chunk_size: int = 4 * MiB, copies: str = "numba",
                  modes=("cc", "pipellm"), staging_bytes: int = 64 * MiB, path: str = "numba") -> list[dict]:
    """``Pipeline(mode=cc|pipellm, device="cuda")`` H2D GB/s: cc seals on the critical
    path; pipellm is timed after ``wait_speculation()``, so its messages were sealed ahead.
    ``path="driver"``: the device's driver path (``open_device("cuda", path="driver")``)."""
    import pipellm
    rows = []
    options = {"path": "driver"} if path == "driver" else {"copies": copies}
    copies = "driver path" if path == "driver" else copies
    with pipellm.open_device("cuda", staging_bytes=staging_bytes, **options) as dev:
        for size in sizes:
            chunk = min(chunk_size, size)
            for mode in modes:
                for n in (workers if mode == "pipellm" else [1]):
                    # pipellm may seal the whole transfer ahead (depth for all its messages)
                    extra = ({"workers": n, "min_speculative_bytes": 0, "adaptive": False,
                              "depth_bytes": max(64 * MiB, 2 * (size + chunk))}
                             if mode == "pipellm" else {})
                    with pipellm.Pipeline(device=dev, mode=mode, chunk_size=chunk, timeout=600,
                                          bounce_bytes=max(2 * (chunk + 4096), min(4 * size, 1 << 30)),
                                          **extra) as pipe:
                        region = pipe.register(pipellm.array(np.ones(size, np.uint8)))
                        pipe.to_device(region)
                        pipe.synchronize()
                        best, busy = float("inf"), 0.0
                        for _ in range(repeats):
                            if mode == "pipellm":
                                pipe.wait_speculation()
                            busy_before, start = dev.stats()["device_busy_s"], perf_counter()
                            pipe.to_device(region)
                            pipe.synchronize()
                            if perf_counter() - start < best:
                                best, busy = perf_counter() - start, dev.stats()["device_busy_s"] - busy_before
                        assert np.array_equal(dev.read(region.device_buffer), region.array)
                        hits = pipe.stats().get("hits")
                    rows.append({"bytes": size, "mode": mode, "workers": n, "GBps": size / best / 1e9, "hits": hits,
                                 "copies": copies, "chunk_bytes": chunk, "staging_bytes": staging_bytes, "seconds": best,
                                 "device_busy_s": busy})
                    print(f"{mode:>8} h2d {size:>11} B, {n} worker(s), {copies} copies, {chunk} B chunks, "
                          f"{staging_bytes >> 20} MiB staging: "
                          f"{rows[-1]['GBps']:8.3f} GB/s (hits {hits})", flush=True)
    return rows


def profile_summary(path: str, thread: str = "copy-engine", top: int = 25) -> list[tuple[float, str]]:
    """The functions a thread spent its samples in (inclusive share, best first), from a
    ``py-spy record --threads --format raw`` file, leaving out numba's compiling (a
    one-time cost). gpu_check.sh prints it for the copy-engine thread."""
    import collections
    import re
    inclusive, total = collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if not count.isdigit() or thread not in frames[0]:
                continue
            if any("_compile_for_args" in frame or "load_overload" in frame for frame in frames):
                continue
            total += int(count)
            for name in {re.sub(r" \(.*?([\w.]+\.py):\d+\)$", r" (\1)", frame) for frame in frames[1:]}:
                inclusive[name] += int(count)
    return [(n / total, name) for name, n in inclusive.most_common(top)] if total else []


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    k = result.get("kernels", [])
    a.plot([r["bytes"] for r in k], [r["decrypt_GBps"] for r in k], "o-", label="decrypt kernel")
    a.plot([r["bytes"] for r in k], [r["encrypt_GBps"] for r in k], "s-", label="encrypt kernel")
    a.set(xscale="log", xlabel="message bytes", ylabel="GB/s", title="AES-256-GCM kernels")
    a.legend()
    link = result.get("pinned_h2d", [])
    b.plot([r["bytes"] for r in link], [r["GBps"] for r in link], "k--", label="plain pinned h2d")
    encrypted = result.get("encrypted_h2d", []) + result.get("driver_copies", []) + result.get("driver_path", [])
    for mode, workers, copies in sorted({(r["mode"], r["workers"], r["copies"]) for r in encrypted}):
        rows = [r for r in encrypted
                if (r["mode"], r["workers"], r["copies"]) == (mode, workers, copies)]
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
    parser.add_argument("--part", choices=("all", "new", "old"), default="all",
                        help="new: kernels, pinned copies and the driver path; old: the numba path's figures")
    parser.add_argument("--transfers-only", action="store_true",
                        help="only pipellm 256 MiB transfers, 8 workers, 10 times (a target for a profiler)")
    parser.add_argument("--summarize", metavar="PROFILE", help="print where the copy-engine thread spent its "
                        "samples in a py-spy raw profile, and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        for share, name in profile_summary(args.summarize):
            print(f"{100 * share:5.1f}%  {name}")
        return 0
    from numba import config, cuda
    if not (config.ENABLE_CUDASIM or cuda.is_available()):
        print("no CUDA GPU here (NUMBA_ENABLE_CUDASIM=1 runs this on the simulator)", file=sys.stderr)
        return 2
    name = "CUDA simulator" if config.ENABLE_CUDASIM else str(cuda.get_current_device().name)
    q = args.quick
    repeats = 1 if q else 5
    result = {"device": name, "cpu_count": os.cpu_count(), "errors": {}}
    if args.transfers_only:
        rows = encrypted_h2d(QUICK["pipe"] if q else [256 * MiB], [8], 10, modes=("pipellm",))
        with open(args.out, "w") as f:
            json.dump(dict(result, encrypted_h2d=rows), f, indent=2)
        return 0

    def section(key, run):
        """One part of the figures; a failure is recorded and the others still run. The
        JSON is rewritten after each part, so a run cut short keeps what it measured."""
        try:
            result[key] = run()
        except Exception:  # noqa: BLE001 - reported in the JSON and on stderr
            result["errors"][key] = traceback.format_exc()
            print(f"{key} failed:\n{result['errors'][key]}", file=sys.stderr, flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    new, old = args.part in ("all", "new"), args.part in ("all", "old")
    if new:
        section("kernels", lambda: kernels(QUICK["kernel"] if q else KERNEL_SIZES, repeats))
        section("pinned_h2d", lambda: pinned_h2d(QUICK["link"] if q else LINK_SIZES, repeats))
    from pipellm.devices.cuda import driver_layer
    if new and not config.ENABLE_CUDASIM and driver_layer() == "built":  # the new path first: GPU time is rare
        section("driver_path", lambda: encrypted_h2d(QUICK["pipe"] if q else [4096, MiB, 16 * MiB, 256 * MiB],
                                                     [1, 4, 8], 1 if q else 3, path="driver",
                                                     modes=("plain", "cc", "pipellm")))
    if not old:
        return _finish(result, args.out)
    section("encrypted_h2d", lambda: encrypted_h2d(QUICK["pipe"] if q else PIPE_SIZES,
                                                   QUICK["workers"] if q else WORKERS, 1 if q else 3))
    if not config.ENABLE_CUDASIM and not q:
        section("kernel_parts", kernel_parts)
        # pipellm at 256 MiB with other chunk sizes (8 workers)
        section("chunk_sizes", lambda: [row for c in (1 * MiB, 16 * MiB, 64 * MiB)
                                        for row in encrypted_h2d([256 * MiB], [8], 3, chunk_size=c,
                                                                 modes=("pipellm",))])
        # the same with a device staging area as large as the transfer (one batch, one wait)
        section("staging_256MiB", lambda: [row for c in (4 * MiB, 16 * MiB)
                                           for row in encrypted_h2d([256 * MiB], [8], 3, chunk_size=c,
                                                                    modes=("pipellm",), staging_bytes=256 * MiB)])
        if driver_layer() == "built":  # the same through the Cython cydriver layer's copies
            section("driver_copies", lambda: encrypted_h2d([16 * MiB, 256 * MiB], [8], 3, copies="driver"))
    return _finish(result, args.out)


def _finish(result: dict, out: str) -> int:
    try:
        plot(result, os.path.splitext(out)[0] + ".png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
