"""Host<->device transfer rate on the emulated device, plain vs cc, by copy size.

For each size and direction, each mode gets a fresh pipeline on a fresh emulated device
(default link model: PCIe Gen5 x16, 50 GB/s, 2 us per copy) and issues back-to-back
copies of one region, then synchronizes; best of ``repeats`` runs.

How the emulated device's own CPU work is accounted for: on an H100 the copy engine
decrypts (cc) or copies (plain) in hardware at line rate; here a device thread does it
on this machine's CPUs. Whenever the host waits only because that thread lags the
modelled link, the device counts the wait as *emulation stall*. ``wall`` figures include
it; ``modelled`` figures (wall minus stall) are what the modelled hardware would give
for the host work measured here. Both are reported; the device thread's CPU time is
reported too, since it competes with the host for this machine's cores.
"""

from __future__ import annotations

import os
from time import perf_counter

import numpy as np

import pipellm

KiB, MiB = 1 << 10, 1 << 20
SIZES = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]
QUICK_SIZES = [4 * KiB, 64 * KiB, 1 * MiB]
MODES = ("plain", "cc")
ACCOUNTING = ("emulated copy engine runs on host CPU threads; 'modelled' = wall minus emulation "
              "stall (time the host waited only because the emulator's CPU work lagged the "
              "modelled PCIe Gen5 x16 link)")


def _copies(size: int, budget_bytes: int) -> int:
    return int(min(2000, max(3, budget_bytes // size)))


def measure(mode: str, size: int, direction: str, copies: int) -> dict:
    host = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    with pipellm.Pipeline(device="emulated", mode=mode, bounce_bytes=64 * MiB) as pipe:
        region = pipe.register(host)
        dbuf = pipe.to_device(region)
        back = pipe.register(np.empty_like(host))
        pipe.to_host(dbuf, back)  # warm-up: fault in the destination's pages
        pipe.synchronize()
        before = pipe.stats()
        call_s = 0.0
        start = perf_counter()
        for _ in range(copies):
            t = perf_counter()
            if direction == "h2d":
                pipe.to_device(region)
            else:
                pipe.to_host(dbuf, back)
            call_s += perf_counter() - t
        pipe.synchronize()
        wall = perf_counter() - start
        after = pipe.stats()
    stall = after["emulation_stall_s"] - before["emulation_stall_s"]
    aes = (after.get("encrypt_s", 0) - before.get("encrypt_s", 0)) if direction == "h2d" else \
          (after.get("decrypt_s", 0) - before.get("decrypt_s", 0))
    modelled = max(wall - stall, 1e-12)
    return {
        "wall_s": wall,
        "modelled_s": modelled,
        "wall_GBps": copies * size / wall / 1e9,
        "modelled_GBps": copies * size / modelled / 1e9,
        "us_per_copy": wall / copies * 1e6,
        "modelled_us_per_copy": modelled / copies * 1e6,
        # the library's own host-side time per copy: inside the transfer call, minus AES
        "host_call_us_per_copy": call_s / copies * 1e6,
        "aes_us_per_copy": aes / copies * 1e6,
        "device_cpu_us_per_copy": (after["device_busy_s"] - before["device_busy_s"]) / copies * 1e6,
    }


def run(sizes=None, repeats: int = 3, budget_bytes: int = 512 * MiB, directions=("h2d", "d2h"),
        progress=None) -> dict:
    sizes = sizes or SIZES
    rows = []
    for direction in directions:
        for size in sizes:
            copies = _copies(size, budget_bytes)
            best: dict[str, dict] = {}
            for _ in range(repeats):  # interleave modes so drift hits both alike
                for mode in MODES:
                    m = measure(mode, size, direction, copies)
                    if mode not in best or m["modelled_s"] < best[mode]["modelled_s"]:
                        best[mode] = m
                if progress:
                    progress()
            row = {"direction": direction, "size": size, "copies": copies, **{m: best[m] for m in MODES}}
            row["cc_over_plain_modelled_us_per_copy"] = best["cc"]["modelled_us_per_copy"] - best["plain"]["modelled_us_per_copy"]
            row["cc_over_plain_wall_us_per_copy"] = best["cc"]["us_per_copy"] - best["plain"]["us_per_copy"]
            rows.append(row)
    summary = {}
    small = next((r for r in rows if r["direction"] == "h2d" and r["size"] == 4 * KiB), None)
    if small:
        summary["h2d_4KiB_cc_over_plain_us_per_copy_modelled"] = small["cc_over_plain_modelled_us_per_copy"]
        summary["h2d_4KiB_cc_over_plain_us_per_copy_wall"] = small["cc_over_plain_wall_us_per_copy"]
    host = {mode: min((host_path(mode) for _ in range(max(repeats, 5))), key=lambda h: h["us_per_copy"])
            for mode in MODES}
    summary["h2d_4KiB_host_path_plain_us_per_copy"] = host["plain"]["us_per_copy"]
    summary["h2d_4KiB_host_path_cc_us_per_copy"] = host["cc"]["us_per_copy"]
    summary["h2d_4KiB_cc_aes_us_per_copy"] = host["cc"]["aes_us_per_copy"]
    summary["h2d_4KiB_cc_library_share_us_per_copy"] = host["cc"]["us_per_copy"] - host["cc"]["aes_us_per_copy"]
    return {"benchmark": "transfer", "device": "emulated", "accounting": ACCOUNTING,
            "link": pipellm.LinkModel().__dict__, "repeats": repeats, "rows": rows,
            "summary": summary, "memory": memory_check()}


def host_path(mode: str, size: int = 4 * KiB, copies: int = 2000) -> dict:
    """The host's own time per ``to_device`` with the emulated copy engine paused, so that
    its thread does not compete for the CPU and the GIL: what the library costs the
    calling thread (validation, bounce slot, header and IV, AES-GCM, submission)."""
    chunk = max(size, 4 * KiB)
    with pipellm.Pipeline(device="emulated", mode=mode, chunk_size=chunk,
                          bounce_bytes=(copies + 2) * (chunk + 4 * KiB)) as pipe:
        region = pipe.register(np.ones(size, np.uint8))
        pipe.to_device(region)
        pipe.synchronize()
        with pipe.device.paused():
            before = pipe.stats()
            start = perf_counter()
            for _ in range(copies):
                pipe.to_device(region)
            elapsed = perf_counter() - start
            after = pipe.stats()
        pipe.synchronize()
    aes = after.get("encrypt_s", 0.0) - before.get("encrypt_s", 0.0)
    return {"us_per_copy": elapsed / copies * 1e6, "aes_us_per_copy": aes / copies * 1e6}


def memory_check(transfers: int = 10_000, size: int = 64 * KiB) -> dict:
    """RSS before/after ``transfers`` cc copies, and the bounce pool's cap/high water."""
    def rss() -> int:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    cap = 8 * MiB
    with pipellm.Pipeline(device="emulated", mode="cc", bounce_bytes=cap, chunk_size=size) as pipe:
        region = pipe.register(np.ones(size, np.uint8))
        for _ in range(1000):
            pipe.to_device(region)
        pipe.synchronize()
        before = rss()
        for _ in range(transfers):
            pipe.to_device(region)
        pipe.synchronize()
        after = rss()
        bounce = pipe.stats()["bounce"]
    return {"transfers": transfers, "size": size, "rss_before": before, "rss_after": after,
            "rss_growth_bytes": after - before, "bounce_cap_bytes_requested": cap,
            "bounce_cap_bytes": bounce["cap_bytes"], "bounce_high_water_bytes": bounce["high_water_bytes"]}


def points(sizes=None, repeats: int = 3, directions=("h2d", "d2h")) -> int:
    return len(sizes or SIZES) * repeats * len(directions)


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def table(result: dict) -> str:
    lines = [f"transfers on the emulated device ({result['accounting']})",
             f"{'dir':>4} {'size':>8} {'copies':>6} | {'plain GB/s':>10} {'cc GB/s':>8} | "
             f"{'plain us':>9} {'cc us':>9} {'cc-plain':>9} | {'dev cpu us':>10} | wall GB/s plain/cc"]
    for r in result["rows"]:
        p, c = r["plain"], r["cc"]
        lines.append(
            f"{r['direction']:>4} {_size(r['size']):>8} {r['copies']:>6} | {p['modelled_GBps']:>10.2f} "
            f"{c['modelled_GBps']:>8.2f} | {p['modelled_us_per_copy']:>9.1f} {c['modelled_us_per_copy']:>9.1f} "
            f"{r['cc_over_plain_modelled_us_per_copy']:>9.1f} | {c['device_cpu_us_per_copy']:>10.1f} | "
            f"{p['wall_GBps']:.2f}/{c['wall_GBps']:.2f}")
    for key, value in result["summary"].items():
        lines.append(f"{key}: {value:.2f}")
    m = result["memory"]
    lines.append(f"memory: RSS grew {m['rss_growth_bytes'] / MiB:.2f} MiB over {m['transfers']} cc transfers of "
                 f"{_size(m['size'])}; bounce cap {m['bounce_cap_bytes']} B (asked {m['bounce_cap_bytes_requested']}), "
                 f"high water {m['bounce_high_water_bytes']} B")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, direction in zip(axes, ("h2d", "d2h")):
        rows = [r for r in result["rows"] if r["direction"] == direction]
        if not rows:
            continue
        sizes = [r["size"] for r in rows]
        for mode, style, color in (("plain", "-o", "tab:blue"), ("cc", "-s", "tab:red")):
            ax.plot(sizes, [r[mode]["modelled_GBps"] for r in rows], style, color=color, label=f"{mode} (modelled)")
            ax.plot(sizes, [r[mode]["wall_GBps"] for r in rows], style, color=color, alpha=0.3, label=f"{mode} (wall)")
        ax.axhline(result["link"][f"{direction}_bytes_per_s"] / 1e9, color="grey", ls=":", label="modelled link")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{direction} on the emulated device")
        ax.set_xlabel("copy size, bytes")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
