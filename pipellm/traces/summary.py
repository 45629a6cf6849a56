"""What a trace asks of the machine, before any replay: its transfers, its modelled
compute, the time its bytes take on the modelled link, and from those its regime.

A trace whose transfers take longer on the link than its compute takes on the device is
*transfer-bound*: no prediction can hide encryption behind compute there, only
encryption that keeps up with the link (parallel workers) can; one that computes longer
than it transfers is *compute-bound*, and encryption ahead of time can hide under the
compute (see docs/design.md and issue 27).

>>> from pipellm.traces import Record, Trace, summarize
>>> t = Trace("demo", {}, [Record("region", "w", nbytes=1 << 20), Record("h2d", "w", 0, 1 << 20, stream=0),
...                       Record("compute", stream=0, us=100.0), Record("sync")])
>>> s = summarize(t); s["regime"], s["h2d_transfers"], round(s["link_s"] * 1e6, 1)
('compute-bound', 1, 23.0)
"""

from __future__ import annotations

from statistics import median

from ..devices.emulated import LinkModel
from .format import Trace


def summarize(trace: Trace, link: LinkModel | None = None, aes_bytes_per_s: float | None = None) -> dict:
    """A trace's demands (see the module docstring). ``aes_bytes_per_s``, where given,
    adds the time one core encrypting at that rate needs for its host-to-device bytes."""
    link = link or LinkModel()
    h2d = [r.nbytes for r in trace.records if r.op == "h2d"]
    d2h = [r.nbytes for r in trace.records if r.op == "d2h"]
    compute_s = sum(r.us for r in trace.records if r.op == "compute") * 1e-6
    link_s = (sum(h2d) / link.h2d_bytes_per_s + sum(d2h) / link.d2h_bytes_per_s
              + link.latency_s * (len(h2d) + len(d2h)))
    out = {"trace": trace.source, "workload": trace.workload,
           "h2d_transfers": len(h2d), "h2d_bytes": sum(h2d), "d2h_transfers": len(d2h), "d2h_bytes": sum(d2h),
           "h2d_bytes_min": min(h2d, default=0), "h2d_bytes_median": median(h2d) if h2d else 0,
           "h2d_bytes_max": max(h2d, default=0),
           "computes": sum(r.op == "compute" for r in trace.records), "compute_s": compute_s,
           "syncs": sum(r.op == "sync" for r in trace.records),
           "writes": sum(r.op == "write" for r in trace.records),
           "link_s": link_s, "compute_over_link": compute_s / link_s if link_s else float("inf"),
           "regime": "compute-bound" if compute_s > link_s else "transfer-bound"}
    if aes_bytes_per_s:
        out["encrypt_1_core_s"] = sum(h2d) / aes_bytes_per_s
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'workload':22} {'h2d':>6} {'h2d MB':>9} {'median KiB':>10} {'d2h MB':>8} {'compute ms':>10} "
             f"{'link ms':>8} {'enc 1 core ms':>13}  regime"]
    for r in rows:
        enc = f"{r['encrypt_1_core_s'] * 1e3:13.1f}" if "encrypt_1_core_s" in r else f"{'-':>13}"
        lines.append(f"{r['workload'][:22]:22} {r['h2d_transfers']:>6} {r['h2d_bytes'] / 1e6:>9.1f} "
                     f"{r['h2d_bytes_median'] / 1024:>10.0f} {r['d2h_bytes'] / 1e6:>8.1f} {r['compute_s'] * 1e3:>10.3f} "
                     f"{r['link_s'] * 1e3:>8.2f} {enc}  {r['regime']}")
    return "\n".join(lines)
