"""``gpubp bench``: ``add_parser(subparsers)`` adds the subcommand; ``run(args)`` runs it and returns the exit
status: 0, or 1 when a gpubp contender gave a wrong result (refused by the gate) or failed."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Benchmark gpubp (on the GPU and on the CPU) against its unfused path and PyTorch on this machine; every
result is checked against the float64 reference before it is timed. bench/README.md says how to read a run."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` to the ``gpubp`` subcommands (``subparsers`` from ``add_subparsers``)."""
    p = subparsers.add_parser("bench", help="benchmark gpubp against PyTorch on this machine",
                              description=DESCRIPTION, epilog="gpubp bench --list: the cases and contenders")
    p.set_defaults(tier="quick", func=run)
    tier, comp = p.add_mutually_exclusive_group(), p.add_mutually_exclusive_group()
    tier.add_argument("--full", dest="tier", action="store_const", const="full", help="the full grid (long)")
    tier.add_argument("--smoke", dest="tier", action="store_const", const="smoke", help="tiny sizes, few repeats")
    p.add_argument("--cases", help="comma-separated case names, groups or globs")
    p.add_argument("--contenders", help="comma-separated contender names (default: all that can run)")
    p.add_argument("--out", help="results folder (default: a new one outside the checkout)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--tf32", action="store_true", help="let float32 GEMMs use TF32")
    comp.add_argument("--compile", dest="compile", action="store_true", default=None,
                      help="include torch.compile (default: with --full)")
    comp.add_argument("--no-compile", dest="compile", action="store_false")
    for flag, dest, kind, default, what in [  # dest: the field of run.Options
            ("--cpu-budget", "cpu_budget", float, None, "CPU contenders skip sizes estimated slower (s)"),
            ("--gate-flops", "gate_flops", float, 2e10, "reference FLOPs above which the gate checks a reduced batch"),
            ("--warmup", "warmup", int, None, "untimed calls"),
            ("--warmup-time", "warmup_time", float, None, "untimed seconds before CPU timing"),
            ("--repeats", "min_repeats", int, None, "minimum timed repeats"),
            ("--min-time", "min_time", float, None, "minimum timed seconds"), ("--seed", "seed", int, 0, "input seed")]:
        p.add_argument(flag, dest=dest, type=kind, default=default, metavar=kind.__name__.upper(), help=what)
    p.add_argument("--list", action="store_true", help="list the cases and contenders a run would use, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def default_folder(results: dict[str, Any]) -> Path:
    """<root>/<date>-<gpu or cpu name>, root $GPUBP_BENCH_DIR, else $XDG_DATA_HOME/gpubp/bench
    (~/.local/share/gpubp/bench): outside the checkout. A -2, -3, ... suffix keeps an earlier run of the day."""
    from gpubp.bench.run import slug, where

    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    base = Path(os.environ.get("GPUBP_BENCH_DIR") or Path(data) / "gpubp" / "bench")
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
    fields = {f.name for f in dataclasses.fields(Options)} - {"progress"}
    runner = Runner(cases, contenders, Options(**{k: getattr(args, k) for k in fields}, progress=not args.quiet))
    plan = runner.prepare()
    print(f"gpubp bench ({tier}): {len(cases)} cases, {plan['runs']} runs on the {plan['target'].upper()} grid",
          flush=True)
    if not any(c["available"] for c in plan["contenders"]) and not any(c is None for *_, c in runner.tasks):
        print("gpubp bench: no contender can run here")
        return 1
    started, results = time.perf_counter(), runner.run()
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
           (r["status"] == "error" and r["contender"] in ("gpubp", "gpubp-unfused", "gpubp-cpu"))]
    if bad:
        print(f"gpubp bench: {len(bad)} run(s) refused or failed (see above)")
    return 1 if bad else 0
