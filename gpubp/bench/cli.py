"""``gpubp bench``: ``add_parser(subparsers)`` adds the subcommand; ``run(args)`` runs it and returns the exit
status: 0, or 1 when a gpubp contender gave a wrong result (refused by the gate) or failed."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Benchmark gpubp against its unfused path, NumPy and PyTorch on this machine. Every result is first
checked against the float64 NumPy reference (a wrong one is refused, never timed); GPU work is timed
with CUDA events, CPU work with perf_counter; copy bandwidth and matmul FLOP/s are measured in the
same run. Without a GPU the CPU cases run. Results go to a new folder under $GPUBP_BENCH_DIR, else
$XDG_DATA_HOME/gpubp/bench (~/.local/share/gpubp/bench), unless --out says otherwise.
"""
EPILOG = """\
cases: dense_fwd:<act>, dense_fwd_bwd:<act>, step:mnist_mlp, step:deep_narrow, step:wide,
       optim:adam, optim:sgd_momentum, loss:cross_entropy, allreduce (names, groups or globs)
contenders: gpubp, gpubp-unfused, torch-cuda, torch-compile, numpy, torch-cpu
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to the ``gpubp`` subcommands (``subparsers`` from ``add_subparsers``)."""
    p = subparsers.add_parser("bench", help="benchmark gpubp against NumPy and PyTorch on this machine", epilog=EPILOG,
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(tier="quick", func=run)
    tier, comp = p.add_mutually_exclusive_group(), p.add_mutually_exclusive_group()
    tier.add_argument("--full", dest="tier", action="store_const", const="full",
                      help="the full grid: every width, batch and activation, allreduce; torch.compile on (long)")
    tier.add_argument("--smoke", dest="tier", action="store_const", const="smoke",
                      help="tiny sizes and few repeats: checks that the suite runs (seconds)")
    p.add_argument("--cases", default=None, help="comma-separated case names, groups, prefixes or globs")
    p.add_argument("--contenders", default=None, help="comma-separated contender names (default: all that can run)")
    p.add_argument("--out", default=None, help="folder for results.json, summary.md and the plots "
                   "(default: a new folder under $GPUBP_BENCH_DIR or the user data folder, outside the checkout)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--tf32", action="store_true",
                   help="let float32 GEMMs use TF32 tensor cores (CUPY_TF32=1, torch allow_tf32); default off")
    comp.add_argument("--compile", dest="compile", action="store_true", default=None,
                      help="include torch.compile (on by default only with --full)")
    comp.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--cpu-budget", type=float, default=None, metavar="SECONDS",
                   help="CPU contenders skip sizes estimated to take longer per step (default 0.25, 5 with --full)")
    p.add_argument("--gate-flops", type=float, default=2e10, metavar="FLOPS",
                   help="above this float64 reference cost the gate checks a reduced batch (default 2e10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--warmup-time", type=float, default=None, metavar="SECONDS",
                   help="untimed seconds before CPU timing (default 0.15: lets other threads settle)")
    p.add_argument("--repeats", type=int, default=None, help="minimum timed repeats per figure")
    p.add_argument("--min-time", type=float, default=None, metavar="SECONDS", help="minimum timed seconds per figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the cases and contenders this run would use, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def default_folder(results: dict[str, Any]) -> Path:
    """<root>/<date>-<gpu or cpu name>, root $GPUBP_BENCH_DIR, else $XDG_DATA_HOME/gpubp/bench
    (~/.local/share/gpubp/bench): outside the checkout. A -2, -3, ... suffix keeps an earlier run of the day."""
    from gpubp.bench.run import slug, where

    base = Path(os.environ.get("GPUBP_BENCH_DIR") or Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local"
                                                              / "share") / "gpubp" / "bench")
    name = f"{results['environment']['date'][:10]}-{slug(where(results))}"
    folder, k = base / name, 2
    while folder.exists():
        folder, k = base / f"{name}-{k}", k + 1
    return folder


def run(args: argparse.Namespace) -> int:
    """Run ``gpubp bench`` with parsed ``args``; returns the exit status."""
    if args.tf32:
        os.environ["CUPY_TF32"] = "1"  # read when CuPy is imported: set before anything imports it
    from gpubp.bench.cases import select_cases
    from gpubp.bench.contenders import make_contenders
    from gpubp.bench.run import Options, Runner, report_text, write_all

    split, tier = (lambda s: [t.strip() for t in s.split(",") if t.strip()] if s else None), args.tier
    cases = select_cases(tier, args.dtype, split(args.cases))
    contenders = make_contenders(split(args.contenders), args.compile if args.compile is not None else tier == "full",
                                 args.tf32, f"off in the {tier} suite: compiling takes longer than the suite "
                                 "(--compile turns it on)")
    if args.list:
        print("cases:\n" + "\n".join(f"  {c.name:<24} {c.title}" for c in cases))
        print("contenders:\n" + "\n".join(f"  {c.name:<24} {c.description}" for c in contenders))
        return 0
    runner = Runner(cases, contenders, Options(
        tier=tier, dtype=args.dtype, tf32=args.tf32, seed=args.seed, cpu_budget=args.cpu_budget,
        gate_flops=args.gate_flops, warmup=args.warmup, warmup_time=args.warmup_time, min_repeats=args.repeats,
        min_time=args.min_time, progress=not args.quiet))
    plan = runner.prepare()
    print(f"gpubp bench ({tier}): {len(cases)} cases, {plan['runs']} runs on the {plan['target'].upper()} grid",
          flush=True)
    if not any(c["available"] for c in plan["contenders"]) and not any(c is None for *_, c in runner.tasks):
        print("gpubp bench: no contender can run here")
        return 1
    started = time.perf_counter()
    results = runner.run()
    print(f"\n{report_text(results)}")
    folder = Path(args.out) if args.out else default_folder(results)
    try:
        written = write_all(results, folder, plots=not args.no_plots)
    except OSError as e:  # the user data folder is not writable: the temp folder then
        if args.out:
            raise
        print(f"cannot write {folder} ({e}); writing to the temp folder instead")
        folder = Path(tempfile.mkdtemp(prefix=f"gpubp-bench-{folder.name}-"))
        written = write_all(results, folder, plots=not args.no_plots)
    n_plots = sum(k.startswith("plot:") for k in written)
    print(f"\nwrote {folder}/: results.json, summary.md, {n_plots} plot(s)  ({time.perf_counter() - started:.1f} s)")
    if "plots_skipped" in results:
        print(f"plots skipped: {results['plots_skipped']}")
    bad = [r for r in results["records"] if r["status"] == "refused" or
           (r["status"] == "error" and r["contender"] in ("gpubp", "gpubp-unfused", "numpy"))]
    if bad:
        print(f"gpubp bench: {len(bad)} run(s) refused or failed (see above)")
    return 1 if bad else 0
