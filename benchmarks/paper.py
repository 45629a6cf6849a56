"""``pipellm eval paper``: the PipeLLM paper's headline experiments, one command, one report.

The paper (ASPLOS 2025, arXiv 2411.03357) reports that confidential computing costs up to
52.8% of throughput on OPT-30B and 88.2% on OPT-66B, and that PipeLLM brings the cost
under 19.6% on vLLM, FlexGen and PEFT. Its set-ups, as the first author's scripts have
them (``shared/research/paper.md``, section 4.3), are generated here as traces
(:mod:`pipellm.traces.generate`) and timed on modelled clocks
(:func:`pipellm.traces.model.simulate`): the link (PCIe Gen5, 50 GB/s each way) and the
GPU's compute (a roofline at 400 TFLOPS, and the HBM rate where decoding is memory-bound)
at H100 speeds, the copy engine decrypting in hardware, and the host's AES-GCM at the rate
measured on this machine, one core per encryption thread. A second column puts every
encryption thread at the rate of a CC driver thread (4.9 GiB/s: the bounce-buffer path
of pinned copies on a CC H200, vLLM issue #55428; the paper's own microbenchmark was not
recoverable). cc is one thread encrypting each copy as it is made (the CUDA driver under
CC); pipellm is 1, 2, 4 or 8 workers encrypting ahead what the set-up's predictor names
(the predictor's hits over the trace, run offline), each run timed after a warm-up pass
(as FlexGen's benchmark generates once before it measures).

Bytes. The modelled runs move the full models' bytes (they allocate nothing). The same
set-ups are also replayed for real on the emulated device, scaled down to fit this
machine (weights to tens of MiB, keeping layers and tensor structure; vLLM keeps its
224 KiB blocks and fewer layers), to check that every byte verifies and that the
engine's hit rate is the offline one; and traces recorded from real transformers models
(:mod:`pipellm.integrations.accelerate`) are replayed beside them.

Throughput drop, as the paper counts it: ``1 - throughput / throughput without CC``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

from pipellm.traces import generate as gen
from pipellm.traces.model import simulate

#: encryption threads of pipellm's columns
WORKERS = (1, 2, 4, 8)
#: one CC driver thread's rate: the bounce-buffer path of pinned copies on a CC H200
#: (vLLM issue #55428: ~4.9 GiB/s), the paper's machine's own not being recoverable
DRIVER_BYTES_PER_S = 4.9 * 2**30
#: the paper's bound on PipeLLM's throughput drop
PAPER_PIPELLM = 0.196
#: H100 SXM HBM3
HBM_BYTES_PER_S = 3.35e12
#: the engine's default speculation depth (``Pipeline(depth_bytes=...)``)
DEPTH_BYTES = 64 << 20
#: a full-size model's bytes: ``weight_budget`` large enough that nothing is scaled down
FULL = 1 << 50


@dataclass(frozen=True)
class Setup:
    name: str
    title: str
    config: str                      # the paper's set-up, as modelled
    predictor: str
    unit: str                        # of throughput
    work: Callable[[bool], float]     # units of work in the timed part (quick?)
    trace: Callable[[bool, bool], "gen.Trace"]   # (full size?, quick?) -> trace incl. warm-up
    warmup: Callable[[bool, bool], "gen.Trace"] | None  # the warm-up part alone (None: no warm-up)
    paper_cc: float | None           # the paper's cc throughput drop
    paper_note: str


def _flexgen(tokens: int, full: bool):
    return gen.flexgen("opt-66b", gpu_batches=8, batch=4, prompt=512, new_tokens=tokens, gpu_weight_fraction=0.2,
                       weight_budget=FULL if full else 48 << 20)


def _vllm(requests: int, full: bool):
    # 480 GPU blocks: an H100's 80 GB x 0.9 less OPT-30B's 60 GB of weights leaves ~12 GB,
    # ~550 blocks of 16 tokens x 48 layers x K and V (21 MiB each), less activations
    return gen.vllm_swap("opt-30b", requests=requests, best_of=4, block_tokens=16, gpu_blocks=480 if full else 48,
                         arrival_rate=100.0, prompt=32, output=64, kv_budget=30 << 30 if full else 96 << 20,
                         hbm_bytes_per_s=HBM_BYTES_PER_S)


def _lora(steps: int, full: bool):
    return gen.lora("opt-13b", steps=steps, batch=4, seq=256, weight_budget=FULL if full else 48 << 20)


def _tokens(quick):
    return 4 if quick else 32


def _requests(quick):
    return 64 if quick else 200


def _steps(quick):
    return 2 if quick else 4


SETUPS = (
    Setup("flexgen", "FlexGen, OPT-66B",
          "weights 20% GPU / 80% CPU, KV cache on the CPU, 8 GPU batches x 4, prompt 512, 32 new tokens "
          "(decode steps; one more step first as the warm-up)",
          "layerwise", "tokens/s", lambda q: 32 * _tokens(q),
          lambda full, q: _flexgen(1 + _tokens(q), full), lambda full, q: _flexgen(1, full),
          0.882, "88.2% (abstract: 'up to', OPT-66B; FlexGen by the eval scripts)"),
    Setup("vllm", "vLLM, OPT-30B swapping KV blocks",
          "block size 16, best_of 4, requests at rate 100/s (the paper's saturating throughput runs), "
          "prompt 32 and 64 output tokens (about Alpaca's lengths), 480 GPU blocks, 960 CPU blocks",
          "kvswap", "requests/s", lambda q: _requests(q),
          lambda full, q: _vllm(_requests(q), full), None,
          0.528, "52.8% (abstract: 'up to', OPT-30B; vLLM by the eval scripts)"),
    Setup("peft", "PEFT LoRA fine-tuning, OPT-13B",
          "frozen base weights offloaded, loaded forward and backward each step, batch 4 x 256 tokens, "
          "adapters on the GPU (the paper's PEFT set-up was not recovered: an assumption); "
          "one step first as the warm-up",
          "layerwise", "samples/s", lambda q: 4 * _steps(q),
          lambda full, q: _lora(1 + _steps(q), full), lambda full, q: _lora(1, full),
          None, "not recovered"),
)


def points(quick: bool = False) -> int:
    return len(SETUPS) * (2 + (0 if quick else 1)) + 1


def _hits(trace, predictor: str, threshold: int) -> list[bool]:
    """For each load of ``trace``: named by the predictor ahead of it (offline, as
    :mod:`pipellm.benchmarks.predictors` evaluates it) and at least the engine's
    speculation threshold long."""
    from pipellm.predictors import get

    from .predictors import evaluate
    flags = evaluate(trace, get(predictor), flags=True)["hits"]
    return [hit and r.nbytes >= threshold for hit, r in zip(flags, trace.transfers("h2d"))]


def _with_warmup(setup: Setup, full: bool, quick: bool):
    """The set-up's trace, the record its timed part starts at, and the loads before it."""
    trace = setup.trace(full, quick)
    timed_from = len(setup.warmup(full, quick).records) if setup.warmup else 0
    return trace, timed_from, sum(1 for r in trace.records[:timed_from] if r.op == "h2d")


def _rate_after(hits: list, warm: int) -> float:
    """The share of the loads after the first ``warm`` that hit."""
    return sum(hits[warm:]) / max(1, len(hits) - warm)


def _implied_rate(trace, target: float, costs: dict, timed_from: int, plain: float) -> float:
    """The encryption rate (bytes/s, one thread) at which cc loses ``target`` of
    ``plain``'s throughput on ``trace`` (bisection, in log space)."""
    lo, hi = 1e8, 1e12
    for _ in range(24):
        mid = math.sqrt(lo * hi)
        drop = 1 - plain / simulate(trace, "cc", _at_rate(costs, mid), cores=2, timed_from=timed_from)
        lo, hi = (mid, hi) if drop > target else (lo, mid)
    return math.sqrt(lo * hi)


def _at_rate(costs: dict, rate: float) -> dict:
    return dict(costs, seal_bytes_per_s=rate, open_bytes_per_s=rate)


def _modelled(setup: Setup, costs: dict, threshold: int, quick: bool, progress) -> dict:
    trace, timed_from, timed = _with_warmup(setup, True, quick)
    loads = trace.transfers("h2d")
    hits = _hits(trace, setup.predictor, threshold)
    # the engine never speculates a transfer past its depth: at least twice the largest load
    depth = max(DEPTH_BYTES, 2 * max(r.nbytes for r in loads))
    work = setup.work(quick)
    out = {"h2d_bytes": sum(r.nbytes for r in loads), "d2h_bytes": sum(r.nbytes for r in trace.transfers("d2h")),
           "loads": len(loads), "hit_rate": _rate_after(hits, timed),
           "depth_bytes": depth, "threshold_bytes": threshold, "compute_s": sum(
               r.us for r in trace.records[timed_from:] if r.op == "compute") * 1e-6, "rates": {}}
    # what bounds pipellm where the link does not: the host's AES of the timed bytes, to
    # the GPU on 8 workers, and back on one thread (as cc receives it)
    timed_h2d = sum(r.nbytes for r in trace.records[timed_from:] if r.op == "h2d")
    timed_d2h = sum(r.nbytes for r in trace.records[timed_from:] if r.op == "d2h")
    plains = {}
    for label, rate in (("here", None), ("driver", DRIVER_BYTES_PER_S)):
        c = costs if rate is None else _at_rate(costs, rate)
        plain = plains[label] = simulate(trace, "plain", c, cores=2, timed_from=timed_from)
        cc = simulate(trace, "cc", c, cores=2, timed_from=timed_from)
        row = {"seal_bytes_per_s": c["seal_bytes_per_s"], "plain_s": plain, "cc_s": cc,
               "link_s": timed_h2d / 50e9, "seal_8_workers_s": timed_h2d / (8 * c["seal_bytes_per_s"]),
               "receive_one_thread_s": timed_d2h / c["open_bytes_per_s"],
               "throughput": {"plain": work / plain, "cc": work / cc}, "drop": {"cc": 1 - plain / cc}}
        for w in WORKERS:
            t = simulate(trace, "pipellm", c, cores=w + 1, workers=w, hits=hits, depth_bytes=depth,
                         timed_from=timed_from)
            row["throughput"][f"pipellm-{w}"] = work / t
            row["drop"][f"pipellm-{w}"] = 1 - plain / t
        under = [w for w in WORKERS if row["drop"][f"pipellm-{w}"] < PAPER_PIPELLM]
        row["fewest_workers_under_paper"] = under[0] if under else None
        out["rates"][label] = row
        progress(1)
    if setup.paper_cc is not None and not quick:
        out["implied_driver_bytes_per_s"] = _implied_rate(trace, setup.paper_cc, costs, timed_from, plains["here"])
        progress(1)
    return out


def _replay(replay, trace, mode: str, predictor: str | None) -> dict:
    """One real replay; pipellm with speculation always on and on every size, so that
    its hit rate measures the prediction (on 2 cores the controller may turn it off)."""
    if mode == "pipellm":
        return replay(trace, "pipellm", predictor, adaptive=False, min_speculative_bytes=0)
    return replay(trace, mode)


def _replayed(setup: Setup, quick: bool) -> dict:
    """The scaled-down set-up replayed for real on the emulated device: plain, cc, pipellm."""
    from pipellm.traces import replay

    trace, _, warm = _with_warmup(setup, False, quick)
    out = {"h2d_bytes": sum(r.nbytes for r in trace.transfers("h2d")),
           "offline_hit_rate": _rate_after(_hits(trace, setup.predictor, 0), warm), "modes": {}}
    for mode in ("plain", "cc", "pipellm"):
        row = _replay(replay, trace, mode, setup.predictor)
        out["modes"][mode] = {"time_s": row["time_s"], "verified": row["verified"], "hit_rate": row["hit_rate"]}
        if mode == "pipellm":
            out["engine_hit_rate"] = _rate_after(row["_h2d_hits"], warm)
    return out


def _recorded(quick: bool) -> dict:
    """Traces recorded from transformers models under accelerate's hooks, replayed."""
    import tempfile

    try:
        import accelerate  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "needs PyTorch, transformers and accelerate: pip install 'pipellm[accelerate]'"}
    import pipellm
    from pipellm.integrations.accelerate import cpu_offload
    from pipellm.integrations.models import build
    from pipellm.traces import read, replay

    from .demo import _generate

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("opt", "llama"):
            model = build(family, "tiny" if quick else "small")
            ids = torch.arange(4, 4 + 16).reshape(2, 8)
            path = os.path.join(tmp, f"{family}.jsonl")
            with pipellm.Pipeline(device="emulated", mode="plain") as pipe:
                weights = cpu_offload(model, pipe)
                with weights.record(path, workload=f"{family}-generate"):
                    _generate(model, ids, 8, lambda n: None)
            trace = read(path)
            loads = trace.transfers("h2d")
            rows = {mode: _replay(replay, trace, mode, None) for mode in ("plain", "cc", "pipellm")}
            out[family] = {"loads": len(loads), "h2d_bytes": sum(r.nbytes for r in loads),
                           "modes": {m: {"time_s": r["time_s"], "verified": r["verified"]} for m, r in rows.items()},
                           "predictor": rows["pipellm"]["predictor"],
                           "hit_rate_after_first_pass": rows["pipellm"]["hit_rate_after_first_pass"]}
    return out


def run(progress=lambda n: None, quick: bool = False) -> dict:
    """The whole evaluation: modelled set-ups, their scaled-down replays, recorded traces."""
    from pipellm.pipeline.threshold import speculation_threshold
    from pipellm.traces.explain import measure_costs

    costs = measure_costs()
    threshold = speculation_threshold()
    result = {"benchmark": "paper", "quick": quick, "costs": costs, "driver_bytes_per_s": DRIVER_BYTES_PER_S,
              "paper_pipellm_drop": PAPER_PIPELLM, "workers": list(WORKERS), "setups": {}}
    for s in SETUPS:
        entry = {"title": s.title, "config": s.config, "predictor": s.predictor, "unit": s.unit,
                 "paper_cc_drop": s.paper_cc, "paper_note": s.paper_note}
        entry["modelled"] = _modelled(s, costs, threshold, quick, progress)
        entry["replayed"] = _replayed(s, quick)
        progress(1)
        result["setups"][s.name] = entry
    result["recorded"] = _recorded(quick)
    progress(1)
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _rate(x) -> str:
    return f"{x / 1e9:.1f} GB/s"


def table(result: dict) -> str:
    """The report in Markdown."""
    c = result["costs"]
    lines = ["# The PipeLLM paper's headline experiments, modelled at H100 speeds", "",
             f"Host AES-GCM measured here (one core, alone): seal {_rate(c['seal_bytes_per_s'])}, "
             f"open {_rate(c['open_bytes_per_s'])}; a CC driver thread's rate: {_rate(result['driver_bytes_per_s'])} "
             "(vLLM issue #55428). Link 50 GB/s each way, compute 400 TFLOPS / 3.35 TB/s HBM: modelled "
             "(`pipellm.traces.model`), not run. Throughput drop = 1 - throughput / throughput without CC; "
             f"the paper's bound on PipeLLM: {_pct(result['paper_pipellm_drop'])}.", ""]
    workers = result["workers"]
    for label, title in (("here", "encryption threads at this machine's per-core rate"),
                         ("driver", "encryption threads at a CC driver thread's rate")):
        lines += [f"## Throughput, {title}", "",
                  "| set-up | unit | plain | cc | " + " | ".join(f"pipellm {w}w" for w in workers)
                  + " | fewest workers under 19.6% | paper's cc drop |",
                  "|---|---|---|---|" + "---|" * len(workers) + "---|---|"]
        for name, s in result["setups"].items():
            row = s["modelled"]["rates"][label]
            thr, drop = row["throughput"], row["drop"]
            cells = [f"{thr['plain']:.3g}", f"{thr['cc']:.3g} ({_pct(-drop['cc'])})"]
            cells += [f"{thr[f'pipellm-{w}']:.3g} ({_pct(-drop[f'pipellm-{w}'])})" for w in workers]
            fewest = row["fewest_workers_under_paper"]
            lines.append(f"| {s['title']} | {s['unit']} | " + " | ".join(cells)
                         + f" | {fewest if fewest else 'none of ' + str(workers[-1])} | {_pct(s['paper_cc_drop'])} |")
        lines.append("")
    lines += ["## The set-ups", ""]
    for name, s in result["setups"].items():
        m = s["modelled"]
        implied = m.get("implied_driver_bytes_per_s")
        lines.append(f"- **{s['title']}**: {s['config']}. Moves {m['h2d_bytes'] / 1e9:.1f} GB to the GPU in "
                     f"{m['loads']} loads and {m['d2h_bytes'] / 1e9:.1f} GB back; {m['compute_s']:.2f} s of GPU "
                     f"compute timed. Predictor `{s['predictor']}`: {m['hit_rate']:.1%} of the timed loads named "
                     f"ahead; depth {m['depth_bytes'] / 2**20:.0f} MiB (the default 64 MiB, or twice the "
                     "largest load). "
                     f"Paper's cc drop: {s['paper_note']}"
                     + (f"; cc loses that much here with one thread at {_rate(implied)}." if implied else "."))
    lines += ["", "## Where pipellm's time goes beyond plain's (8 workers)", "",
              "| set-up | rate | plain s | pipellm s | link to the GPU s | AES to the GPU on 8 workers s "
              "| AES back on one thread s |", "|---|---|---|---|---|---|---|"]
    for name, s in result["setups"].items():
        for label, row in s["modelled"]["rates"].items():
            t8 = row["plain_s"] / (1 - row["drop"][f"pipellm-{result['workers'][-1]}"])
            lines.append(f"| {s['title']} | {_rate(row['seal_bytes_per_s'])} | {row['plain_s']:.2f} | {t8:.2f} | "
                         f"{row['link_s']:.2f} | {row['seal_8_workers_s']:.2f} | {row['receive_one_thread_s']:.2f} |")
    lines += ["", "Data coming back (vLLM's swap-outs): cc decrypts it on one thread; pipellm's workers "
              "decrypt it as it arrives, several at once, and commit it in channel order."]
    lines += ["", "Left out of the model: FlexGen's prefill (one pass over the weights with the prompt's "
              "compute), vLLM's latency sweep at 3.6-4.8 requests/s (one schedule replayed in every mode: "
              "a slower mode cannot queue or preempt more here), the paper's PEFT configuration (not recovered), and "
              "memory bandwidth shared by many encryption threads (each worker is a core at the rate "
              "measured alone)."]
    lines += ["", "## Replayed for real on the emulated device (scaled down, this machine's cores)", "",
              "| set-up | GB to the GPU | plain s | cc s | pipellm s (always on) | verified | engine's hit rate "
              "| offline |",
              "|---|---|---|---|---|---|---|---|"]
    for name, s in result["setups"].items():
        r = s["replayed"]
        modes = r["modes"]
        lines.append(f"| {s['title']} | {r['h2d_bytes'] / 1e9:.2f} | " + " | ".join(
            f"{modes[m]['time_s']:.3f}" for m in ("plain", "cc", "pipellm"))
            + f" | {all(v['verified'] for v in modes.values())} | {r['engine_hit_rate']:.1%} | "
              f"{r['offline_hit_rate']:.1%} |")
    rec = result["recorded"]
    lines += ["", "## Traces recorded from transformers models (accelerate's hooks), replayed", ""]
    if "skipped" in rec:
        lines.append(f"skipped: {rec['skipped']}")
    else:
        lines += ["| model | loads | MB | plain s | cc s | pipellm s (always on) | verified "
                  "| hit rate after the first pass |",
                  "|---|---|---|---|---|---|---|---|"]
        for family, r in rec.items():
            modes = r["modes"]
            lines.append(f"| {family} | {r['loads']} | {r['h2d_bytes'] / 1e6:.1f} | " + " | ".join(
                f"{modes[m]['time_s']:.3f}" for m in ("plain", "cc", "pipellm"))
                + f" | {all(v['verified'] for v in modes.values())} | {r['hit_rate_after_first_pass']:.1%} "
                  f"(`{r['predictor']}`) |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Throughput drop per set-up: cc and pipellm by workers, both encryption rates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["setups"])
    series = ["cc"] + [f"pipellm-{w}" for w in result["workers"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (label, title) in zip(axes, (("here", "this machine's per-core AES rate"),
                                         ("driver", "a CC driver thread's rate (4.9 GiB/s)"))):
        width = 0.8 / len(series)
        for k, key in enumerate(series):
            values = [100 * result["setups"][n]["modelled"]["rates"][label]["drop"][key] for n in names]
            ax.bar([i + (k - len(series) / 2 + 0.5) * width for i in range(len(names))], values, width,
                   label=key.replace("pipellm-", "pipellm ") + ("w" if key != "cc" else ""))
        for i, n in enumerate(names):
            paper = result["setups"][n]["paper_cc_drop"]
            if paper is not None:
                ax.plot([i - 0.4, i + 0.4], [100 * paper] * 2, "k--", lw=1)
        ax.axhline(100 * result["paper_pipellm_drop"], color="tab:red", lw=1, ls=":")
        ax.set_xticks(range(len(names)), [result["setups"][n]["title"].split(",")[0] for n in names])
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("throughput drop vs no CC (%)")
    axes[1].legend(fontsize=8, title="dashed: paper's cc; dotted: 19.6%", title_fontsize=7)
    fig.suptitle("PipeLLM's set-ups, modelled at H100 speeds (pipellm eval paper)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
