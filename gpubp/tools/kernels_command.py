"""``gpubp kernels``: check, list and benchmark the CUDA C dense kernels (kernels/*.cu).

    gpubp kernels check [--arch sm_80,sm_90] [--nvrtc PATH] [--jobs N] [--json PATH] [--quiet]
        Compile every kernel instantiation with NVRTC for each architecture (no GPU, no driver)
        and print ptxas' registers, shared memory, stack frame and spills per kernel. Exits 1 on
        a compile error, or on a spill or a stack frame in a hot (default-path) kernel; 2 when
        there is no NVRTC (said once, with the fix). --nvrtc (or GPUBP_NVRTC) picks the NVRTC
        library: a libnvrtc.so.* or a folder holding one, e.g. an older release installed with
        pip install --target DIR nvidia-cuda-nvrtc==13.0.88.
    gpubp kernels list
        The instantiations and their C++ name expressions.
    gpubp kernels bench [--shape N,in,out] [--act relu] [--version 2] [--repeat 50]
        On a GPU: check the fused forward / backward against a float64 reference on a sample of
        rows, then time them with CUDA events (warm-up, median) beside cuBLAS (cupy.matmul).

Importing this module imports neither CuPy nor NVRTC.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from gpubp.backends import cuda_fused as rk
from gpubp.tools import nvrtc_check as nc
from gpubp.tools import oracles

FP32_PEAK_TFLOPS = 67.0  # H100 SXM FP32 on CUDA cores (datasheet); the floor of the bench


def _archs(text: str) -> list[str]:
    archs = [a.strip() for a in text.split(",") if a.strip()]
    if not archs:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as sm_80,sm_90")
    return archs


def _report_rows(reports: list[nc.KernelReport]) -> list[str]:
    head = f"{'arch':6} {'kernel':48} {'regs':>4} {'smem B':>7} {'stack B':>7} {'spill st/ld B':>13}  hot  status"
    rows = [head, "-" * len(head)]
    for r in reports:
        status = "ok" if not r.problems else ("ERROR" if r.error else "FAIL")
        spill = f"{r.spill_stores}/{r.spill_loads}"
        rows.append(
            f"{r.arch:6} {r.spec.label:48} {r.registers:>4} {r.shared_bytes:>7} {r.stack_bytes:>7} {spill:>13}"
            f"  {'yes' if r.spec.hot else 'no ':3}  {status}"
        )
    return rows


def cmd_check(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        reports = nc.offline_check(args.arch, jobs=args.jobs, nvrtc=args.nvrtc)
    except (RuntimeError, ValueError) as e:  # no NVRTC (NvrtcNotFoundError: said once, with the fix), bad --arch
        print(f"gpubp kernels check: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    if not args.quiet:
        print("\n".join(_report_rows(reports)))
    found = nc.problems(reports)
    lib = nc.load(args.nvrtc)
    major, minor = lib.version()
    n_kernels = len(rk.kernel_specs())
    print(
        f"{n_kernels} kernel instantiations x {len(args.arch)} architectures ({', '.join(args.arch)}): "
        f"compiled in {wall:.1f} s wall with NVRTC {major}.{minor} ({lib.path}); {len(found)} problem(s)"
    )
    for p in found:
        print(f"  {p}", file=sys.stderr)
    if args.json:
        data = {
            "nvrtc": [major, minor],
            "nvrtc_path": lib.path,
            "wall_seconds": wall,
            "reports": [
                {
                    **{k: v for k, v in asdict(r).items() if k != "spec"},
                    "name": r.name,
                    "label": r.spec.label,
                    "hot": r.spec.hot,
                    "file": r.spec.file,
                    "problems": r.problems,
                }
                for r in reports
            ],
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 1 if found else 0


def cmd_list(args: argparse.Namespace) -> int:
    for s in rk.kernel_specs():
        print(f"{s.file:18} v{s.version} {'hot' if s.hot else '   '}  {s.name:42} {s.label}")
    return 0


def _median_ms(fn, repeat: int, warmup: int) -> float:
    import cupy as cp

    for _ in range(warmup):
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    times.sort()
    return times[len(times) // 2]


def cmd_bench(args: argparse.Namespace) -> int:
    import numpy as np

    from gpubp.activations import Activation

    try:
        n, n_in, n_out = (int(v) for v in args.shape.split(","))
    except ValueError:
        print(f"gpubp kernels bench: --shape expects N,in,out, got {args.shape!r}", file=sys.stderr)
        return 2
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # no CuPy, no driver, no GPU
        print(f"gpubp kernels bench needs a GPU and CuPy: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    act = Activation(args.act)
    rng = np.random.default_rng()
    x = cp.asarray(rng.standard_normal((n, n_in), dtype=np.float32))
    w = cp.asarray((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32))
    b = cp.asarray(rng.standard_normal(n_out, dtype=np.float32))
    da = cp.asarray(rng.standard_normal((n, n_out), dtype=np.float32))
    dw = cp.empty((n_in, n_out), dtype=cp.float32)
    db = cp.empty(n_out, dtype=cp.float32)

    # Correctness first, on a sample of rows (float64 reference on the host): a and dx, within
    # the accuracy contract (gpubp.accuracy, through gpubp.tools.oracles).
    a, saved = rk.dense_forward(x, w, b, act, True, version=args.version)
    dx = rk.dense_backward(da, saved, w, act, dw, db, True, version=args.version)
    rows = min(n, 256)
    xs, ws, bs, das = (cp.asnumpy(t) for t in (x[:rows], w, b, da[:rows]))
    kept = None if saved[1] is None else cp.asnumpy(saved[1][:rows])
    want_a, bound_a = oracles.expected_forward(xs, ws, bs, act)["a"]
    want_dx, bound_dx = oracles.expected_backward(xs, ws, das, act, kept)["dx"]
    worst = 0.0
    for got, want, bound in ((a[:rows], want_a, bound_a), (dx[:rows], want_dx, bound_dx)):
        err = np.abs(cp.asnumpy(got).astype(np.float64) - want)
        worst = max(worst, float(np.max(err / (bound + 1e-30))))
    ok = worst <= 1.0
    print(f"check on {rows} rows (a, dx): worst error / allowed = {worst:.3f} ({'ok' if ok else 'FAILED'})")
    if not ok:
        return 1

    flops_f = 2.0 * n * n_in * n_out
    t_inf = _median_ms(lambda: rk.dense_forward(x, w, b, act, False, version=args.version), args.repeat, args.warmup)
    t_trn = _median_ms(lambda: rk.dense_forward(x, w, b, act, True, version=args.version), args.repeat, args.warmup)
    t_bwd = _median_ms(
        lambda: rk.dense_backward(da, saved, w, act, dw, db, True, version=args.version), args.repeat, args.warmup
    )

    def blas_fwd():
        z = x @ w
        z += b
        return z

    t_blas_f = _median_ms(blas_fwd, args.repeat, args.warmup)
    # cuBLAS backward without the activation backward (a lower bound for the unfused path)
    t_blas_b = _median_ms(lambda: (x.T @ da, da.sum(axis=0), da @ w.T), args.repeat, args.warmup)
    floor_f = flops_f / (FP32_PEAK_TFLOPS * 1e12) * 1e3
    print(
        f"shape N={n} in={n_in} out={n_out}, {act.name}, v{args.version}; floor 2*N*in*out / {FP32_PEAK_TFLOPS} TFLOP/s"
    )
    for label, ms, flops in (
        ("forward, inference", t_inf, flops_f),
        ("forward, training", t_trn, flops_f),
        ("cuBLAS x@W + b", t_blas_f, flops_f),
        ("backward (dW, db, dx)", t_bwd, 2 * flops_f),
        ("cuBLAS x^T@da, sum, da@W^T", t_blas_b, 2 * flops_f),
    ):
        print(f"  {label:28} {ms:9.4f} ms  {flops / ms / 1e9:8.2f} TFLOP/s  (floor {floor_f * flops / flops_f:.4f} ms)")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``kernels`` to the ``gpubp`` subcommands (``subparsers`` from ``add_subparsers``)."""
    parser = subparsers.add_parser(
        "kernels",
        help="check (NVRTC, no GPU), list and benchmark the CUDA C kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="kernels_command", required=True)
    p = sub.add_parser("check", help="compile every kernel with NVRTC and report resources (no GPU needed)")
    p.add_argument("--arch", type=_archs, default=list(nc.DEFAULT_ARCHS), help="e.g. sm_80,sm_90")
    p.add_argument(
        "--nvrtc",
        default=None,
        metavar="PATH",
        help=f"the NVRTC library to compile with: a libnvrtc.so.* or a folder holding one "
        f"(default: ${nc.ENV_VAR}, else the one cuda-pathfinder finds, as CuPy does)",
    )
    p.add_argument("--jobs", type=int, default=None, help="compile threads (default: CPU count)")
    p.add_argument("--json", default=None, help="also write the reports to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print the summary and problems only")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("list", help="list the kernel instantiations")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("bench", help="check, then time the kernels on a GPU")
    p.add_argument("--shape", default="4096,1024,1024", help="N,in,out")
    p.add_argument("--act", default="relu")
    p.add_argument("--version", type=int, default=rk.DEFAULT_VERSION, choices=rk.VERSIONS)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.set_defaults(func=cmd_bench)
    return parser
