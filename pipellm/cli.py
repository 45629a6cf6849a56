"""The ``pipellm`` command: ``info`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from tqdm import tqdm

from . import __version__, sysinfo
from .errors import PinningWarning


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


BENCHES = ("crypto", "transfer", "offload")


def _bench_module(name: str):
    from .benchmarks import crypto, offload, transfer
    return {"crypto": crypto, "transfer": transfer, "offload": offload}[name]


def _run_bench(name: str, args) -> dict:
    module = _bench_module(name)
    kwargs = {"repeats": args.repeats}
    if name == "offload":
        kwargs.update(quick=args.quick, workers=args.workers)
        total = module.points(args.quick, args.repeats)
    elif name == "crypto":
        if args.quick:
            kwargs["sizes"] = module.QUICK_SIZES
        kwargs["max_workers"] = args.workers
        total = module.points(kwargs.get("sizes"), args.workers)
    else:
        if args.quick:
            kwargs["sizes"] = module.QUICK_SIZES
        total = module.points(kwargs.get("sizes"), args.repeats)
    with tqdm(total=total, desc=f"bench {name}", unit="point", disable=args.no_progress,
              file=sys.stderr, leave=False) as bar:
        result = module.run(progress=bar.update, **kwargs)
    result["machine"] = sysinfo.machine()
    return result


def _emit(name: str, result: dict, args, out: str | None, plot: str | None) -> None:
    module = _bench_module(name)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(module.table(result))
        print()
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}", file=sys.stderr)
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
        result = _run_bench(name, args)
        if args.which == "all":
            out = os.path.join(args.results, f"{name}.json") if args.results else None
            plot = os.path.join(args.results, f"{name}.png") if args.results else None
        else:
            out, plot = args.out, args.plot
        _emit(name, result, args, out, plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipellm", description="Fast confidential host<->GPU transfers.")
    parser.add_argument("--version", action="version", version=f"pipellm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="devices, library versions, CPU crypto features")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)

    bench = sub.add_parser("bench", help="run benchmarks (crypto, transfer, offload, or all)")
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
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        parser.error("--repeats must be at least 1")
    if getattr(args, "workers", None) is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
