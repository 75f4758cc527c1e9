"""The ``gpubp`` command: ``info``, ``demo``, ``gradcheck`` and ``bench``."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, and the GPUs seen (or why none)."""
    from gpubp import __version__
    from gpubp._resources import kernel_dir
    from gpubp.device import cuda_status

    print(f"gpubp       {__version__}")
    print(f"python      {platform.python_version()} ({platform.machine()}, {platform.system()})")
    for dist in ("numpy", "numba", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "safetensors", "tqdm"):
        print(f"{dist:<11} {_version(dist)}")
    print(f"kernels     {kernel_dir()}")
    n, why = cuda_status()
    if n == 0:
        print(f"GPUs        none: {why}")
    else:
        import cupy

        for i in range(n):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            print(f"GPU {i}       {name}, sm_{props['major']}{props['minor']}, {props['totalGlobalMem'] / 2**30:.1f} GiB")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train an MLP on generated spirals and report loss and accuracy per epoch."""
    import gpubp as gp
    from gpubp.device import auto_device_reason, parse_device

    device = parse_device(args.device)
    why = f" (auto: {auto_device_reason()})" if args.device == "auto" else ""
    print(f"device: {device}{why}")
    x, y = gp.datasets.spirals(args.samples, args.classes, seed=args.seed)
    xt, yt, xv, yv = gp.datasets.split(x, y, 0.2)
    model = gp.Sequential(
        gp.Dense(2, args.width, "relu"),
        gp.Dense(args.width, args.width, "relu"),
        gp.Dense(args.width, args.classes),
        device=str(device),
        dtype="float32",
        seed=args.seed,
    )
    print(model)
    print(f"data: spirals, {args.classes} classes, {len(xt)} training / {len(xv)} validation samples")
    opt = gp.optim.Adam(model.parameters(), lr=args.lr)
    sched = gp.schedules.CosineAnnealingLR(opt, T_max=args.epochs)
    t0 = time.perf_counter()
    hist = model.fit(xt, yt, loss="cross_entropy", optimizer=opt, epochs=args.epochs, batch_size=args.batch_size,
                     validation_data=(xv, yv), scheduler=sched, verbose=0 if args.quiet else 1)
    took = time.perf_counter() - t0
    print(f"done in {took:.1f}s on {device}: loss {hist['loss'][0]:.4f} -> {hist['loss'][-1]:.4f}, "
          f"validation accuracy {hist['val_accuracy'][-1]:.3f}")
    if args.save:
        gp.save(args.save, model, opt, sched)
        print(f"saved checkpoint to {args.save}")
    return 0


def gradcheck_cases(activations: Sequence[str], losses: Sequence[str], depths: Sequence[int],
                    dtypes: Sequence[str], seed: int = 0, device: str = "cpu"):
    """Yield (case name, Report) for every activation x loss x depth x dtype on ``device``."""
    import gpubp as gp
    from gpubp import gradcheck

    batch, width, n_in = 5, 4, 3
    for act in activations:
        for loss in losses:
            n_out = 3 if loss == "cross_entropy" else 2
            rng = np.random.default_rng(seed)
            x = rng.standard_normal((batch, n_in))
            if loss == "cross_entropy":
                y = rng.integers(0, n_out, size=batch)
            elif loss == "bce_with_logits":
                y = rng.uniform(0.0, 1.0, size=(batch, n_out))
            else:
                y = rng.standard_normal((batch, n_out))
            for depth in depths:
                widths = [n_in] + [width] * (depth - 1) + [n_out]
                for dtype in dtypes:
                    layers = [gp.Dense(widths[i], widths[i + 1], act) for i in range(depth)]
                    model = gp.Sequential(*layers, dtype=dtype, seed=seed + depth, device=device)
                    report = gradcheck.check_model(model, loss, x, y, mode="both", seed=seed)
                    yield f"{device:<7} {act:<10} {loss:<15} depth {depth} {dtype}", report


def cmd_gradcheck(args: argparse.Namespace) -> int:
    """Every activation x loss x depth x dtype against finite differences; exit 1 on any failure."""
    from gpubp import activations, losses
    from gpubp.device import cuda_status, parse_device

    if args.device == "all":
        n, why = cuda_status()
        devices = ["cpu"] + [f"cuda:{i}" for i in range(n)]
        print(f"devices: {', '.join(devices)}" + (f" (no GPU: {why})" if n == 0 else ""))
    else:
        devices = [str(parse_device(args.device))]
        print(f"device: {devices[0]}")
    acts = list(activations.NAMES) if args.activations == "all" else args.activations.split(",")
    loss_names = list(losses.NAMES) if args.losses == "all" else args.losses.split(",")
    for a in acts:
        activations.Activation(a)
    for name in loss_names:
        losses.get(name)
    depths = [int(d) for d in args.depths.split(",")]
    dtypes = args.dtypes.split(",")
    print(f"{'case':<52} {'max abs err':>12} {'max rel err':>12}  result")
    failed = 0
    total = 0
    cases = (c for d in devices for c in gradcheck_cases(acts, loss_names, depths, dtypes, args.seed, d))
    for case, report in cases:
        total += 1
        ok = report.passed
        failed += not ok
        print(f"{case:<52} {report.max_abs_err:12.3e} {report.max_rel_err:12.3e}  {'pass' if ok else 'FAIL'}")
        if not ok:
            print(str(report))
    print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpubp", description="Backpropagation for dense networks.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, and the GPUs seen (or why none)").set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="train an MLP on generated spirals")
    d.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--lr", type=float, default=1e-2)
    d.add_argument("--width", type=int, default=128)
    d.add_argument("--samples", type=int, default=6000)
    d.add_argument("--classes", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--save", default=None, help="write a checkpoint here at the end")
    d.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("gradcheck", help="check every gradient against finite differences")
    g.add_argument("--device", default="all", help="all (the CPU and every GPU, default), cpu, cuda:N")
    g.add_argument("--activations", default="all", help="comma-separated names, or all")
    g.add_argument("--losses", default="all", help="comma-separated names, or all")
    g.add_argument("--depths", default="1,2,3")
    g.add_argument("--dtypes", default="float64,float32")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_gradcheck)

    from gpubp.bench import cli as bench_cli  # argparse set-up only: the harness loads on use

    bench_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"gpubp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
