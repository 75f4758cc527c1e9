"""What checking the digests costs: ``gp.load`` with and without ``verify``, median of runs.

    python tests/checkpoint_digest_cost.py [--runs 15] [--optimizer]

Models of about 1M and 10M float32 parameters (with ``--optimizer`` an Adam state too, three
times the bytes). The file is read once first, so every timed load reads from the page cache:
the figures are the CPU cost of parsing, hashing and copying, not of the disk. Not a test
(pytest does not collect it); the README quotes its output.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time

import gpubp as gp

SIZES = {"1M": (500, 1000), "10M": (1000, 5000)}  # Dense(a, b) -> Dense(b, a): 2ab + a + b parameters


def median_ms(fn, runs: int) -> float:
    fn()  # warm: page cache, first-call imports
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--optimizer", action="store_true", help="save an Adam state too")
    args = ap.parse_args()
    print(f"runs {args.runs}, median; CPU: {os.cpu_count()} cores")
    print(f"{'model':>6} {'params':>10} {'file MB':>8} {'verify ms':>10} {'no-verify ms':>13} "
          f"{'extra ms/MB':>12} {'sha256 ms/MB':>13}")
    with tempfile.TemporaryDirectory() as d:
        for label, (a, b) in SIZES.items():
            model = gp.Sequential(gp.Dense(a, b, "relu"), gp.Dense(b, a), dtype="float32", seed=0)
            opt = gp.optim.Adam(model.parameters()) if args.optimizer else None
            path = os.path.join(d, f"{label}.safetensors")
            gp.save(path, model, opt)
            mb = os.path.getsize(path) / 2**20
            on = median_ms(lambda p=path: gp.load(p), args.runs)
            off = median_ms(lambda p=path: gp.load(p, verify=False), args.runs)
            with open(path, "rb") as f:
                payload = f.read()
            sha = median_ms(lambda b=payload: hashlib.sha256(b).digest(), args.runs)
            print(f"{label:>6} {model.num_parameters:>10,} {mb:>8.1f} {on:>10.1f} {off:>13.1f} "
                  f"{(on - off) / mb:>12.2f} {sha / mb:>13.2f}")
            del payload


if __name__ == "__main__":
    main()
