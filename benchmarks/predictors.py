"""Predictors on generated workload traces: accuracy and cost, without a pipeline.

For each (workload, predictor): the events of the trace are fed in order; before each
host-to-device load the predictor is asked for its next ``k`` loads. Reported: how often
the load was among them (all loads, and after the first pass: from the first time the
trace loads its first region again), and the cost of observe + predict per transfer,
twice: back to back (the predictor's tables stay in the CPU caches) and ``cold``, with
EVICT_BYTES written to scratch memory between transfers (outside the timed part), as a
transfer's encryption streams its chunk through the caches inside a pipeline.
The learned predictor is trained first on traces of the same workloads generated with
other seeds and sizes (never on the evaluation traces).
"""

from __future__ import annotations

import os
import tempfile
from time import perf_counter

import numpy as np

from pipellm.predictors import LearnedPredictor, TransferEvent, get
from pipellm.traces import generate

WORKLOADS = {
    "accelerate": ("layerwise", dict(model="opt-13b", tokens=8)),
    "flexgen": ("layerwise", dict(model="opt-66b", new_tokens=8, prompt=128)),
    "lora": ("layerwise", dict(model="llama-7b", steps=4)),
    "vllm-swap": ("kvswap", dict(model="opt-30b")),
    "moe": ("experts", dict(model="mixtral-8x7b", tokens=48)),
    "mixed-accelerate": ("layerwise", dict(model="opt-13b", tokens=8)),
    "mixed-vllm-swap": ("kvswap", dict(model="opt-30b")),
}
TRAINING = [("accelerate", dict(model="opt-30b", tokens=6)), ("flexgen", dict(model="opt-30b", new_tokens=6)),
            ("lora", dict(model="opt-13b", steps=3)), ("moe", dict(seed=1, tokens=96)),
            ("vllm-swap", dict(seed=3)), ("mixed-accelerate", dict(model="opt-30b", tokens=6)),
            ("mixed-vllm-swap", dict(seed=3))]


#: the cold cost's scratch writes between transfers: the pipeline's default chunk
EVICT_BYTES = 4 << 20


def evaluate(trace, predictor, k: int = 16, evict_bytes: int = 0, flags: bool = False) -> dict:
    """The predictor's accuracy and cost on ``trace`` (see the module docstring); with
    ``flags``, also ``hits``: for each load, whether it was among the ``k`` predicted."""
    events = [TransferEvent(r.region, r.offset, r.nbytes, r.op, r.stream or 0, 0.0)
              for r in trace.records if r.op in ("h2d", "d2h")]
    scratch = np.zeros(evict_bytes, np.uint8) if evict_bytes else None
    first, warm, loads = None, False, 0
    hits = total = warm_hits = warm_total = 0
    cost = 0.0
    each = []
    for i, e in enumerate(events):
        if scratch is not None:
            scratch.fill(i & 255)
        if e.direction == "h2d":
            first = first or e.region
            warm = warm or (e.region == first and loads > 0)
            loads += 1
            start = perf_counter()
            predicted = predictor.predict(k)
            cost += perf_counter() - start
            ok = any(p[0] == e.region and p[1] == e.offset and p[2] == e.nbytes for p in predicted)
            total += 1
            hits += ok
            each.append(ok)
            if warm:
                warm_total += 1
                warm_hits += ok
        start = perf_counter()
        predictor.observe(e)
        cost += perf_counter() - start
    out = {"hit_rate": hits / total if total else 0.0,
           "hit_rate_after_first_pass": warm_hits / warm_total if warm_total else 0.0,
           "us_per_transfer": cost / max(1, len(events)) * 1e6, "transfers": len(events)}
    if flags:
        out["hits"] = each
    return out


def training_traces() -> list:
    """The generated workloads the learned predictor trains on (never the evaluation's)."""
    return [generate.generate(name, **kw) for name, kw in TRAINING]


def train(path: str) -> None:
    traces = training_traces()
    # on one BLAS thread: OpenBLAS's idle threads spin on the other cores for a while
    # after a fit, and the costs timed next rose by half on the 2-core VM
    from threadpoolctl import threadpool_limits   # (scikit-learn's dependency)
    with threadpool_limits(limits=1):
        LearnedPredictor().fit(traces).save(path)


def run(k: int = 8, progress=None, repeats: int = 1, quick: bool = False) -> dict:
    model = os.path.join(tempfile.mkdtemp(), "learned.json")
    try:
        train(model)
    except ImportError:  # scikit-learn is an optional extra: the rules are measured anyway
        model = None
    rows = []
    workloads = dict(list(WORKLOADS.items())[:2]) if quick else WORKLOADS
    for workload, (rule, options) in workloads.items():
        trace = generate.generate(workload, **options)
        for name in dict.fromkeys([rule, "layerwise", "kvswap"] + (["learned"] if model else [])):
            # hit rates are the same each time; each cost is the best of ``repeats`` runs
            def make():
                return get("learned", model=model) if name == "learned" else get(name)
            runs = [evaluate(trace, make(), k) for _ in range(repeats)]
            cold = [evaluate(trace, make(), k, EVICT_BYTES) for _ in range(repeats)]   # the same hits, dearer
            rows.append({"workload": workload, "predictor": name, "k": k,
                         **min(runs, key=lambda r: r["us_per_transfer"]),
                         "us_per_transfer_cold": min(r["us_per_transfer"] for r in cold)})
        if progress:
            progress()
    best_rule = {}
    for r in rows:
        if r["predictor"] != "learned":
            best_rule[r["workload"]] = max(best_rule.get(r["workload"], 0), r["hit_rate_after_first_pass"])
    summary = {f"{r['workload']}_{r['predictor']}_hit_rate_after_first_pass": r["hit_rate_after_first_pass"]
               for r in rows}
    if model:
        summary.update({f"{w}_learned_minus_best_rule_points": 100 * (next(
            r["hit_rate_after_first_pass"] for r in rows if r["workload"] == w and r["predictor"] == "learned") - b)
            for w, b in best_rule.items()})
    else:
        summary["learned"] = "skipped: scikit-learn is not installed (pip install 'pipellm[learned]')"
    for kind, chosen in (("rules", [r for r in rows if r["predictor"] != "learned"]),
                         ("learned", [r for r in rows if r["predictor"] == "learned"])):
        if chosen:
            summary[f"max_us_per_transfer_{kind}"] = max(r["us_per_transfer"] for r in chosen)
            summary[f"max_us_per_transfer_cold_{kind}"] = max(r["us_per_transfer_cold"] for r in chosen)
    return {"benchmark": "predictors", "k": k, "rows": rows, "summary": summary}


def points(quick: bool = False, repeats: int = 1) -> int:
    return 2 if quick else len(WORKLOADS)


def table(result: dict) -> str:
    lines = [f"predictors on generated traces (offline: is each load among the next {result['k']} predicted?)",
             f"{'workload':<12} {'predictor':<10} {'hit rate':>9} {'after 1st pass':>15} {'us/transfer':>12} "
             f"{'cold':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['workload']:<12} {r['predictor']:<10} {r['hit_rate']:>9.4f} "
                     f"{r['hit_rate_after_first_pass']:>15.4f} {r['us_per_transfer']:>12.1f} "
                     f"{r['us_per_transfer_cold']:>6.1f}")
    lines.append(f"cold: {EVICT_BYTES >> 20} MiB written between transfers, as a transfer's encryption does "
                 f"inside a pipeline")
    for key, value in result["summary"].items():
        if "minus" in key or "us_per" in key:
            lines.append(f"{key}: {value:.2f}")
        elif key == "learned":
            lines.append(f"learned predictor {value}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    predictors = list(dict.fromkeys(r["predictor"] for r in result["rows"]))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(predictors)
    for i, p in enumerate(predictors):
        values = [next((r["hit_rate_after_first_pass"] for r in result["rows"]
                        if r["workload"] == w and r["predictor"] == p), 0) for w in workloads]
        ax.bar([x + i * width for x in range(len(workloads))], values, width, label=p)
    ax.set_xticks([x + width * (len(predictors) - 1) / 2 for x in range(len(workloads))], workloads)
    ax.set_ylabel("hit rate after the first pass")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
