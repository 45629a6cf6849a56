"""The ``pipellm`` command: ``info`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from tqdm import tqdm

from . import __version__, sysinfo
from .errors import PinningWarning, PipellmError


def _info(args) -> int:
    from .devices import cuda_unavailable_reason

    info = sysinfo.machine()
    reason = cuda_unavailable_reason()
    info["devices"] = {"emulated": "available (embedded)",
                       "cuda": "available" if reason is None else f"unavailable: {reason}"}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"pipellm {__version__}")
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0


BENCHES = ("crypto", "transfer", "offload", "predictors", "tracking", "hotpath", "gpu-host", "demo", "paper")


def _bench_module(name: str):
    from .benchmarks import crypto, demo, gpuhost, hotpath, offload, paper, predictors, tracking, transfer
    return {"crypto": crypto, "transfer": transfer, "offload": offload, "predictors": predictors,
            "tracking": tracking, "hotpath": hotpath, "gpu-host": gpuhost, "demo": demo, "paper": paper}[name]


def _run_bench(name: str, args) -> dict:
    module = _bench_module(name)
    kwargs = {"repeats": args.repeats} if name != "paper" else {}  # (the paper's runs are modelled)
    if name in ("predictors", "paper"):
        kwargs.update(quick=args.quick)
        total = module.points(args.quick)
    elif name == "demo":  # (bench's --repeats is per point: the demo runs once there)
        kwargs.update(quick=args.quick, repeats=args.repeats if args.command == "demo" else 1,
                      adaptive=not getattr(args, "no_adaptive", False),
                      options=_pipeline_options(getattr(args, "pipeline_option", None)))
        total = module.points(args.quick, kwargs["repeats"])
    elif name == "offload":
        kwargs.update(quick=args.quick, workers=args.workers, device=getattr(args, "device", "emulated"))
        total = module.points(args.quick, args.repeats)
    elif name == "gpu-host":
        kwargs.update(quick=args.quick)
        total = module.points(args.quick, args.repeats)
    elif name == "crypto":
        if args.quick:
            kwargs["sizes"] = module.QUICK_SIZES
        kwargs["max_workers"] = args.workers
        total = module.points(kwargs.get("sizes"), args.workers)
    else:
        if args.quick:
            kwargs["sizes"] = module.QUICK_SIZES
        if name == "hotpath" and getattr(args, "instructions", False):
            kwargs["instructions"] = True
        total = module.points(kwargs.get("sizes"), args.repeats)
    with tqdm(total=total, desc=f"bench {name}", unit="point", disable=args.no_progress,
              file=sys.stderr, leave=False) as bar:
        result = module.run(progress=bar.update, **kwargs)
    result["machine"] = sysinfo.machine()
    return result


def _emit(name: str, result: dict, args, out: str | None, plot: str | None) -> None:
    module = _bench_module(name)
    text = module.table(result)
    print(json.dumps(result, indent=2) if args.json else text + "\n")
    if out:
        _write_json(out, result)
    if out and name == "paper":  # the report beside its JSON
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(text)
    if plot:
        try:
            module.plot(result, plot)
            print(f"wrote {plot}", file=sys.stderr)
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'pipellm[plot]')", file=sys.stderr)


def _bench(args) -> int:
    warnings.simplefilter("once", PinningWarning)
    names = BENCHES if args.which == "all" else (args.which,)
    for name in names:
        missing = _demo_missing() if name == "demo" and args.which == "all" else None
        if missing:
            print(f"bench demo skipped: {missing}", file=sys.stderr)
            continue
        result = _run_bench(name, args)
        if args.which == "all":
            out = os.path.join(args.results, f"{name}.json") if args.results else None
            plot = os.path.join(args.results, f"{name}.png") if args.results else None
        else:
            out, plot = args.out, args.plot
        _emit(name, result, args, out, plot)
    return 0


def _eval_paper(args) -> int:
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    result = _run_bench("paper", args)
    out = os.path.join(args.out, "paper.json") if args.out else None
    _emit("paper", result, args, out, os.path.join(args.out, "paper.png") if args.out else None)
    return 0


def _plot_missing() -> str | None:
    """Why --plot can't draw here, or None (asked before the runs, not after them)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'pipellm[plot]'"
    return None


def _demo_missing() -> str | None:
    """Why the demo can't run here, or None."""
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return "the demo needs PyTorch, transformers and accelerate: pip install 'pipellm[accelerate]'"
    return None


def _demo(args) -> int:
    missing = _demo_missing() or (args.plot and _plot_missing())
    if missing:
        print(missing, file=sys.stderr)
        return 2
    module = _bench_module("demo")
    result = _run_bench("demo", args)
    print(json.dumps(result["rows"], indent=2) if args.json else module.table(result))
    if args.out:
        _write_json(args.out, result)
    if args.plot:
        module.plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _write_json(path: str, result) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}", file=sys.stderr)


def _bytes_or_auto(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of bytes >= 0, got {value}")
    return value


def _key_values(items, flag: str) -> dict:
    """``KEY=VALUE`` arguments as a dict, each value read as JSON where it parses."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _pipeline_options(items) -> dict:
    """``--pipeline-option`` arguments, refused where Pipeline has no such option."""
    import inspect

    from .pipeline import Pipeline
    out = _key_values(items, "--pipeline-option")
    known = set(inspect.signature(Pipeline).parameters) - {"device", "mode", "predictor"}
    for key in out:
        if key not in known:
            raise SystemExit(f"--pipeline-option: Pipeline has no option {key!r}; it takes {', '.join(sorted(known))}")
    return out


def _replay(args) -> int:
    from .traces import read, replay_many

    traces = [read(path) for path in args.traces]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    predictors = [p.strip() for p in args.predictor.split(",") if p.strip()]
    options = {"iv_order": args.iv_order}
    if args.workers:
        options["workers"] = args.workers
    if args.min_speculative_bytes is not None:
        options["min_speculative_bytes"] = args.min_speculative_bytes
    if args.no_adaptive:
        options["adaptive"] = False
    options.update(_pipeline_options(args.pipeline_option))
    options["predictor_options"] = _key_values(args.predictor_option, "--predictor-option")
    total = len(traces) * sum(len(predictors) if m.startswith("pipellm") else 1 for m in modes)
    if args.cores is not None and args.cores < 1:
        raise SystemExit(f"--cores must be >= 1, got {args.cores}")
    if args.plot and (missing := _plot_missing()):
        raise SystemExit(missing)
    explain = args.explain or args.plot is not None or args.cores is not None
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be >= 1, got {args.repeat}")
    total *= args.repeat
    with tqdm(total=total, desc="replay", unit="run", disable=args.no_progress, file=sys.stderr, leave=False) as bar:
        rows = replay_many(traces, modes, predictors, progress=bar.update, explain=explain,
                           model_cores=args.cores, timeline_of=0 if args.plot else None, repeat=args.repeat,
                           **options)
    if args.plot:
        from .traces.explain import plot_timeline
        plot_timeline(rows, args.plot)
        for row in rows:
            row.pop("timeline", None)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0 if all(r["verified"] for r in rows) else 1
    print(f"{'workload':<28} {'mode':<14} {'predictor':<10} {'time ms':>9} {'vs plain':>9} {'hit rate':>9} "
          f"{'warm':>7} {'NOPs':>6} {'relinq':>7} {'re-enc MiB':>10} {'pred us':>7} verified")
    for r in rows:
        over = "" if r.get("overhead_vs_plain") is None else f"{r['overhead_vs_plain']:+.1%}"
        print(f"{r['workload']:<28} {r['mode']:<14} {r['predictor']:<10} {r['time_s'] * 1e3:>9.1f} {over:>9} "
              f"{r['hit_rate']:>9.3f} {r['hit_rate_after_first_pass']:>7.3f} {r['nops']:>6} {r['relinquishes']:>7} "
              f"{r['reencrypted_bytes'] / 2**20:>10.1f} {r['predictor_us_per_transfer']:>7.1f} {r['verified']}")
    print("time: the emulated device's modelled time (wall minus emulation stall)"
          + (f", the median of {args.repeat} runs" if args.repeat > 1 else "")
          + "; warm: hit rate after the first pass; pred us: the predictor's observe + predict per transfer, "
            "as the pipeline used it")
    if explain:
        from .traces.explain import table
        print(table(rows))
    if args.cores is not None:
        from .traces.explain import model_table
        print(model_table(rows))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0 if all(r["verified"] for r in rows) else 1


def _predictors(args) -> int:
    from .predictors import available

    for name, origin in sorted(available().items()):
        print(f"{name:<12} {origin}")
    return 0


def _train(args) -> int:
    from .predictors import LearnedPredictor
    from .traces import read

    if args.traces:
        traces = [read(path) for path in args.traces]
    else:  # the generated workloads the shipped model is trained on
        from .benchmarks.predictors import training_traces
        traces = training_traces()
    model = LearnedPredictor().fit(traces)
    model.save(args.out)
    from .predictors.learned import FEATURES
    weights = ", ".join(f"{n}={w:+.2f}" for n, w in zip(FEATURES, model.coef_))
    print(f"wrote {args.out}: {weights}, intercept={model.intercept_:+.2f}", file=sys.stderr)
    return 0


def _summary(args) -> int:
    from .traces import read, summarize
    from .traces.summary import table

    rows = [summarize(read(path), aes_bytes_per_s=args.aes_gbps * 1e9 if args.aes_gbps else None)
            for path in args.traces]
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return 0


def _generate(args) -> int:
    from .traces import generate, write

    names = list(generate.WORKLOADS) + [f"mixed-{w}" for w in ("accelerate", "vllm-swap")] \
        if args.workload == "all" else [args.workload]
    if args.workload == "all":
        os.makedirs(args.out, exist_ok=True)
    for name in names:
        trace = generate.generate(name, args.model) if args.model else generate.generate(name)
        path = os.path.join(args.out, f"{trace.workload}.jsonl.gz") if args.workload == "all" else args.out
        write(path, trace.workload, trace.records, trace.meta)
        print(f"wrote {path}: {len(trace.records)} records", file=sys.stderr)
    return 0


def _soak(args) -> int:
    from .soak import soak

    reports = []
    for seed in range(args.seed, args.seed + args.seeds):
        for iv_order in (["strict", "window"] if args.iv_order == "both" else [args.iv_order]):
            with tqdm(total=args.transfers, desc=f"soak seed {seed} {iv_order}", unit="transfer",
                      disable=args.no_progress, file=sys.stderr, leave=False) as bar:
                report = soak(args.transfers, seed=seed, iv_order=iv_order, workers=args.workers,
                              progress=bar.update)
            reports.append(report)
            if not args.json:
                r = report
                print(f"seed {r.seed} {r.iv_order:<6}: {r.transfers_h2d} h2d + {r.transfers_d2h} d2h transfers, "
                      f"{r.host_writes} host writes, {r.key_rotations} key rotations, {r.ciphertexts} ciphertexts; "
                      f"stale bytes {r.stale_bytes}, wrong d2h bytes {r.wrong_d2h_bytes}, IV reuse {r.iv_reuse}; "
                      f"hits {r.hits}, misses {r.misses}; RSS {r.rss_growth_bytes / 2**20:+.1f} MiB, "
                      f"fds {r.fd_growth:+d}; {r.seconds:.1f} s {'ok' if r.ok else 'FAILED'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([r.as_dict() for r in reports], f, indent=2)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    return 0 if all(r.ok for r in reports) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipellm", description="Fast confidential host<->GPU transfers.")
    parser.add_argument("--version", action="version", version=f"pipellm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="devices, library versions, CPU crypto features")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)

    bench = sub.add_parser("bench", help="run benchmarks (crypto, transfer, offload, predictors, tracking, "
                                                "hotpath, gpu-host, demo, paper, or all)")
    bench.add_argument("which", nargs="?", choices=(*BENCHES, "all"), default="all")
    bench.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    bench.add_argument("--out", metavar="FILE", help="write the results as JSON to FILE")
    bench.add_argument("--plot", metavar="FILE", help="write a PNG plot to FILE (needs matplotlib)")
    bench.add_argument("--results", metavar="DIR", default=None,
                       help="with 'all': write DIR/<bench>.json and DIR/<bench>.png")
    bench.add_argument("--quick", action="store_true", help="a few sizes only (a smoke run)")
    bench.add_argument("--repeats", type=int, default=3, help="runs per point; the best counts (default 3)")
    bench.add_argument("--workers", type=int, default=None,
                       help="crypto: most worker threads (default: cores); offload: pipellm workers (default: cores - 1)")
    bench.add_argument("--device", choices=("emulated", "cuda", "cuda-driver"), default="emulated",
                       help="offload: the device the layers go to (cuda: the numba path; cuda-driver: the driver "
                            "path; both need a GPU)")
    bench.add_argument("--instructions", action="store_true",
                       help="hotpath: also count instructions per request under valgrind's callgrind (minutes)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    demo = sub.add_parser("demo", help="an OPT model generating text with offloaded weights, plain / cc / pipellm "
                                       "(needs pipellm[accelerate])")
    demo.add_argument("--quick", action="store_true", help="a tiny model and a few tokens (a smoke run)")
    demo.add_argument("--repeats", type=int, default=1, help="runs per mode, interleaved; the median counts")
    demo.add_argument("--no-adaptive", action="store_true",
                      help="pipellm: speculate always, not only while it pays (see pipellm.pipeline.payoff)")
    demo.add_argument("--pipeline-option", action="append", metavar="KEY=VALUE",
                      help="an option of pipellm's Pipeline (e.g. depth_bytes=16777216)")
    demo.add_argument("--json", action="store_true", help="print one JSON object per mode instead of the table")
    demo.add_argument("--out", metavar="FILE", help="write the whole result as JSON to FILE")
    demo.add_argument("--plot", metavar="PNG", help="write a PNG plot to PNG (needs matplotlib)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    evals = sub.add_parser("eval", help="evaluations: 'paper', the PipeLLM paper's headline experiments")
    evals_sub = evals.add_subparsers(dest="which", required=True)
    paper = evals_sub.add_parser("paper", help="FlexGen OPT-66B, vLLM OPT-30B, PEFT LoRA 13B: plain / cc / pipellm "
                                               "at H100 speeds (modelled), and replayed here")
    paper.add_argument("--quick", action="store_true", help="shorter runs (a smoke run)")
    paper.add_argument("--out", metavar="DIR", help="write DIR/paper.md, DIR/paper.json and DIR/paper.png")
    paper.add_argument("--json", action="store_true", help="print the result as JSON instead of the report")
    paper.add_argument("--no-progress", action="store_true", help="no progress bar")
    paper.set_defaults(run=_eval_paper)

    replay = sub.add_parser("replay", help="replay traces on the emulated device, modes side by side")
    replay.add_argument("traces", nargs="+", metavar="TRACE")
    replay.add_argument("--modes", default="plain,cc,pipellm",
                        help="comma-separated (default plain,cc,pipellm; pipellm-always: pipellm with speculation "
                             "always on, to compare with the default's in one run)")
    replay.add_argument("--predictor", default="layerwise", help="pipellm predictor(s), comma-separated")
    replay.add_argument("--iv-order", choices=("strict", "window"), default="strict")
    replay.add_argument("--workers", type=int, default=None)
    replay.add_argument("--min-speculative-bytes", type=_bytes_or_auto, default=None, metavar="N",
                        help="encrypt ahead predicted transfers of at least N bytes (default 'auto': from this "
                             "machine's measured costs; 0 speculates on every transfer)")
    replay.add_argument("--predictor-option", action="append", metavar="KEY=VALUE",
                        help="an option for the predictors that take it (e.g. width=3 for learned)")
    replay.add_argument("--no-adaptive", action="store_true",
                        help="pipellm: speculate always, not only while it pays (see pipellm.pipeline.payoff)")
    replay.add_argument("--pipeline-option", action="append", metavar="KEY=VALUE",
                        help="an option of every mode's Pipeline (e.g. lookahead=400)")
    replay.add_argument("--explain", action="store_true",
                        help="where each run's time goes, per-thread CPU, and the bounds (see pipellm.traces.explain)")
    replay.add_argument("--plot", metavar="PNG", help="the timeline of one pass of the first trace, per mode (implies --explain)")
    replay.add_argument("--cores", type=int, metavar="N",
                        help="also model each run on N host cores with the device side in hardware (implies --explain)")
    replay.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run each trace and mode N times, interleaved; report the median run (default 1)")
    replay.add_argument("--json", action="store_true", help="print a JSON list, one object per run")
    replay.add_argument("--out", metavar="FILE", help="write the rows as JSON to FILE")
    replay.add_argument("--no-progress", action="store_true")
    replay.set_defaults(run=_replay)

    soak = sub.add_parser("soak", help="a seeded soak of the pipellm mode: stale bytes and IV reuse must stay 0")
    soak.add_argument("--transfers", type=int, default=100_000, help="host-to-device transfers per run (100000)")
    soak.add_argument("--seed", type=int, default=0, help="the first seed (0)")
    soak.add_argument("--seeds", type=int, default=1, help="how many seeds, from --seed on (1)")
    soak.add_argument("--iv-order", choices=("strict", "window", "both"), default="both")
    soak.add_argument("--workers", type=int, default=None)
    soak.add_argument("--json", action="store_true", help="print a JSON list, one object per run")
    soak.add_argument("--out", metavar="FILE", help="write the reports as JSON to FILE")
    soak.add_argument("--no-progress", action="store_true")
    soak.set_defaults(run=_soak)

    preds = sub.add_parser("predictors", help="list the predictors (built-in and plugins) and where they come from")
    preds.set_defaults(run=_predictors)
    preds_sub = preds.add_subparsers(dest="predictors_command")
    train = preds_sub.add_parser("train", help="train the learned predictor on traces")
    train.add_argument("traces", nargs="*", metavar="TRACE",
                       help="traces to learn from (default: the generated workloads, as the shipped model)")
    train.add_argument("-o", "--out", required=True, help="the model file to write (JSON)")
    train.set_defaults(run=_train)

    traces = sub.add_parser("traces", help="trace tools")
    traces_sub = traces.add_subparsers(dest="traces_command", required=True)
    gen = traces_sub.add_parser("generate", help="generate a workload trace (or 'all' into a folder)")
    gen.add_argument("workload", help="accelerate, flexgen, lora, moe, vllm-swap, mixed-<name>, or all")
    gen.add_argument("-o", "--out", required=True, help="output file (.jsonl or .jsonl.gz), or folder for 'all'")
    gen.add_argument("--model", default=None, help="model shape (opt-13b, opt-30b, opt-66b, opt-175b, llama-7b, "
                                                   "mixtral-8x7b)")
    gen.set_defaults(run=_generate)
    summary = traces_sub.add_parser("summary", help="what traces ask of the machine: bytes, compute, link time, regime")
    summary.add_argument("traces", nargs="+", metavar="TRACE")
    summary.add_argument("--aes-gbps", type=float, default=None, metavar="R",
                         help="also the time one core encrypting at R GB/s needs for the host-to-device bytes")
    summary.add_argument("--json", action="store_true", help="print a JSON list, one object per trace")
    summary.set_defaults(run=_summary)

    args = parser.parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        parser.error("--repeats must be at least 1")
    if getattr(args, "workers", None) is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    for name in ("transfers", "seeds"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1")
    if getattr(args, "seed", 0) < 0:
        parser.error("--seed must be >= 0")
    try:
        return args.run(args)
    except (PipellmError, OSError) as exc:  # the user's input or machine, not a bug: one line
        print(f"pipellm {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
