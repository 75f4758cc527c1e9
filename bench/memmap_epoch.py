"""Training from a float32 np.memmap on disk against the same data in memory: peak RSS and epoch time.

    .venv/bin/python bench/memmap_epoch.py --rows 8200000 --dir /tmp

writes x (rows, 64) float32 (2.1 GB at 8.2M rows) and y (rows,) int64 to --dir, then runs, each in a
fresh process (so that each peak RSS is its own), one epoch of a 64-64-10 MLP (batch 4096, shuffled;
small, so that the measure is about data movement) after a warm-up epoch:
  memmap: fit on the np.memmap (read batch by batch; the file is in the page cache: just written,
          and read once by the warm-up epoch);
  memory: fit on np.fromfile of the same file (the whole x in RAM);
and prints the peak RSS (resource.getrusage ru_maxrss) and the epoch time of each, then deletes the
files (--keep to keep them). ``--rows`` smaller: the same comparison on a slice.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

F, CLASSES, BATCH = 64, 10, 4096


def make(d: Path, rows: int) -> None:
    """x (rows, F) float32 and y (rows,) int64, written in chunks of 1M rows (never whole in memory)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((F, CLASSES)).astype(np.float32)
    with open(d / "x.f32", "wb") as fx, open(d / "y.i64", "wb") as fy:
        for lo in range(0, rows, 1 << 20):
            x = rng.standard_normal((min(1 << 20, rows - lo), F), dtype=np.float32)
            x.tofile(fx)
            np.argmax(x @ w, axis=1).astype(np.int64).tofile(fy)


def child(d: Path, rows: int, mode: str, shuffle: bool) -> None:
    import gpubp as gp

    x = np.memmap(d / "x.f32", dtype=np.float32, mode="r", shape=(rows, F))
    if mode == "memory":
        x = np.fromfile(d / "x.f32", dtype=np.float32).reshape(rows, F)
    y = np.fromfile(d / "y.i64", dtype=np.int64)  # 8 bytes a row: in memory both ways
    m = gp.Sequential(gp.Dense(F, 64, "relu"), gp.Dense(64, CLASSES), dtype="float32", seed=0)
    opt = gp.optim.Adam(m.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    h = m.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=BATCH, shuffle=shuffle, verbose=0)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    print(f"{mode:6s}  shuffle {shuffle!s:5s}  rows {rows}  x {rows * F * 4 / 1e9:.2f} GB  peak RSS {rss:7.0f} MiB  "
          f"warm-up epoch {h['time'][0]:6.2f} s  epoch {h['time'][1]:6.2f} s  (fit {wall:.1f} s, "
          f"loss {h['loss'][1]:.4f})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8_200_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp"))
    p.add_argument("--keep", action="store_true", help="keep the data files")
    p.add_argument("--no-shuffle", action="store_true", help="batches in file order (sequential reads)")
    p.add_argument("--child", choices=["memmap", "memory"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.dir, a.rows, a.child, not a.no_shuffle)
        return
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    make(a.dir, a.rows)
    print(f"wrote {a.dir / 'x.f32'} ({(a.dir / 'x.f32').stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    try:
        for mode in ("memmap", "memory"):
            subprocess.run([sys.executable, __file__, "--rows", str(a.rows), "--dir", str(a.dir), "--child", mode]
                           + (["--no-shuffle"] if a.no_shuffle else []),
                           check=True)
    finally:
        if not a.keep:
            for name in ("x.f32", "y.i64"):
                (a.dir / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
