"""The ``gpubp`` command: ``info``, ``demo``, ``gradcheck``, ``bench`` and ``kernels``."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
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
    from gpubp.backends.numba_setup import describe as compiler_libraries

    for lib, where in compiler_libraries().items():  # what Numba compiles kernels with
        print(f"{lib:<11} {where}")
    from gpubp import threads

    for key, value in threads.describe().items():  # how BLAS and Numba share the cores
        print(f"{'cpu ' + key:<11} {value}")
    from gpubp.tools import nvrtc_check

    print(f"NVRTC CuPy  {nvrtc_check.cupy_nvrtc()}")  # compiles kernels/*.cu at run time
    print(f"NVRTC check {nvrtc_check.describe()}")  # `gpubp kernels check` ($GPUBP_NVRTC picks another)
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


DEMO_LR = 1e-2  # Adam's learning rate in the demo, unless --lr or --lr-find says otherwise


def cmd_demo(args: argparse.Namespace) -> int:
    """Train an MLP on generated spirals and report loss and accuracy per epoch.

    ``--distributed`` (under mpiexec / srun): data-parallel over the launched processes; rank 0
    prints, saves and plots, the other ranks train silently.
    """
    if not getattr(args, "distributed", False):
        return _demo(args, None)
    import contextlib

    import gpubp as gp

    comm = gp.distributed.init()
    if comm.rank == 0:
        return _demo(args, comm)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return _demo(args, comm)


def _demo(args: argparse.Namespace, comm) -> int:
    import gpubp as gp
    from gpubp.device import auto_device_reason, parse_device
    from gpubp.io import check_save_path

    if args.save:  # fail before training, not after
        try:
            check_save_path(args.save)
        except (OSError, ValueError, TypeError) as e:
            print(f"gpubp demo: error: --save: {str(e).removeprefix('path: ')}", file=sys.stderr)
            return 2
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            print("gpubp demo: error: --plot: matplotlib is not installed (pip install 'gpubp[plot]')", file=sys.stderr)
            return 2
        try:
            os.makedirs(args.plot, exist_ok=True)
        except OSError as e:
            print(f"gpubp demo: error: --plot: cannot create the folder {args.plot!r}: {e.strerror}", file=sys.stderr)
            return 2
    why = f" (auto: {auto_device_reason()})" if args.device == "auto" else ""
    device = parse_device(args.device)
    if comm is not None and device.kind == "cuda":  # one GPU per process
        device = parse_device(f"cuda:{getattr(comm, 'device_index', comm.local_rank)}")
    print(f"device: {device}{why}")
    if comm is not None:
        print(f"distributed: {comm.size} processes ({comm.backend}); the batch of {args.batch_size} is split across them")
    x, y = gp.datasets.spirals(args.samples, args.classes, seed=args.seed)
    xt, yt, xv, yv = gp.datasets.split(x, y, 0.2)
    model = gp.Sequential(
        gp.Dense(2, args.width, "relu"),
        gp.Dense(args.width, args.width, "relu"),
        gp.Dense(args.width, args.classes),
        device=str(device),
        dtype="float32",
        seed=args.seed,
        dense_impl=args.dense_impl,
    )
    print(model)
    print(f"data: spirals, {args.classes} classes, {len(xt)} training / {len(xv)} validation samples")
    lr = DEMO_LR if args.lr is None else args.lr
    opt = gp.optim.Adam(model.parameters(), lr=lr)
    if args.lr_find:
        found = gp.lr_find(model, xt, yt, "cross_entropy", opt, batch_size=args.batch_size, seed=args.seed)
        print(found)
        if args.lr is None:
            lr = found.suggestion
            print(f"lr: {lr:.3g}, the suggestion (--lr overrides it)")
        else:
            print(f"lr: {lr:g} (--lr), not the suggestion {found.suggestion:.3g}")
        opt.lr = lr
        if args.plot:
            _write_figure(gp.plot.lr_find(found), args.plot, "lr_find.png")
    sched = gp.schedules.CosineAnnealingLR(opt, T_max=args.epochs)
    fit = dict(loss="cross_entropy", optimizer=opt, epochs=args.epochs, batch_size=args.batch_size,
               validation_data=(xv, yv), scheduler=sched, verbose=0 if args.quiet else 1, comm=comm)
    t0 = time.perf_counter()
    # Gradient statistics (one step's, once an epoch) feed gradient_flow.png and the dead-unit line.
    hist = model.fit(xt, yt, gradient_stats=True, **fit)
    took = time.perf_counter() - t0
    print(f"done in {took:.1f}s on {device}: loss {hist['loss'][0]:.4f} -> {hist['loss'][-1]:.4f}, "
          f"validation accuracy {hist['val_accuracy'][-1]:.3f}")
    dead = [f"{r['name'].split('.')[0]}: {r['dead']:.0%}" for r in hist["gradient_stats"][-1] if "dead" in r]
    if dead:  # units whose ReLU output was 0 on every row of the last batch: they no longer learn
        print(f"dead ReLU units (last batch), layer {', layer '.join(dead)}")
    if args.save and (comm is None or comm.rank == 0):
        gp.save(args.save, model, opt, sched)
        print(f"saved checkpoint to {args.save}")
    if args.plot and (comm is None or comm.rank == 0):
        _write_figure(gp.plot.history(hist), args.plot, "history.png")
        if hist.get("gradient_stats"):
            _write_figure(gp.plot.gradient_flow(hist), args.plot, "gradient_flow.png")
    return 0


def _write_figure(fig, folder: str, name: str) -> None:
    path = os.path.join(folder, name)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


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
    """Every activation x loss x depth x dtype against finite differences; exit 1 on any failure.

    When the reader of stdout goes away (``gpubp gradcheck | head``) the checks still all run,
    silently, so that the exit status still says whether a gradient failed."""
    from gpubp import activations, losses
    from gpubp.device import cuda_status, parse_device

    reading = True

    def say(line: str) -> None:
        nonlocal reading
        if reading:
            try:
                print(line)
            except BrokenPipeError:
                reading = False
                _stdout_gone()

    if args.device == "all":
        n, why = cuda_status()
        devices = ["cpu"] + [f"cuda:{i}" for i in range(n)]
        say(f"devices: {', '.join(devices)}" + (f" (no GPU: {why})" if n == 0 else ""))
    else:
        devices = [str(parse_device(args.device))]
        say(f"device: {devices[0]}")
    acts = list(activations.NAMES) if args.activations == "all" else args.activations.split(",")
    loss_names = list(losses.NAMES) if args.losses == "all" else args.losses.split(",")
    depths = [int(d) for d in args.depths.split(",")]
    dtypes = args.dtypes.split(",")
    say(f"{'case':<52} {'max abs err':>12} {'max rel err':>12}  result")
    failed = 0
    total = 0
    cases = (c for d in devices for c in gradcheck_cases(acts, loss_names, depths, dtypes, args.seed, d))
    for case, report in cases:
        total += 1
        ok = report.passed
        failed += not ok
        say(f"{case:<52} {report.max_abs_err:12.3e} {report.max_rel_err:12.3e}  {'pass' if ok else 'FAIL'}")
        if not ok:
            say(str(report))
    say(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0


def _stdout_gone() -> None:
    """The reader of stdout has gone (a closed pipe): send the rest of the output nowhere."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(fd, sys.stdout.fileno())
        finally:
            os.close(fd)
    except (OSError, ValueError, AttributeError):  # no file descriptor behind sys.stdout
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115


# -- argument types: a bad value is an argparse error naming the option ------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _device(allow_all: bool):
    def parse(text: str) -> str:
        d = text.strip().lower()
        if (allow_all and d == "all") or d in ("cpu", "auto", "cuda", "cudasim"):
            return d
        if d.startswith("cuda:") and d[5:].isdigit():  # the form only: whether the GPU exists is checked on use
            return d
        raise argparse.ArgumentTypeError(
            f"expected {'all, ' if allow_all else ''}cpu, cuda, cuda:N or auto, got {text!r}")

    parse.__name__ = "device"
    return parse


def _names(kind: str):
    """A comma-separated list of known ``kind`` names ("activations", "losses", "dtypes"), or all."""

    def parse(text: str) -> str:
        if kind != "dtypes" and text == "all":
            return text
        if kind == "activations":
            from gpubp.activations import NAMES as known
        elif kind == "losses":
            from gpubp.losses import NAMES as known
        else:
            known = ("float64", "float32")
        names = [n.strip() for n in text.split(",")]
        for n in names:
            if n not in known:
                raise argparse.ArgumentTypeError(
                    f"unknown name {n!r}; expected {'all or ' if kind != 'dtypes' else ''}a comma-separated "
                    f"list of {', '.join(known)}")
        return ",".join(names)

    parse.__name__ = kind
    return parse


def _depths(text: str) -> str:
    parts = text.split(",")
    for part in parts:
        try:
            ok = int(part) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 (depths), got {text!r}")
    return ",".join(str(int(p)) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpubp", description="Backpropagation for dense networks.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, and the GPUs seen (or why none)").set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="train an MLP on generated spirals")
    d.add_argument("--device", type=_device(False), default="auto", help="cpu, cuda, cuda:N or auto (default)")
    d.add_argument("--dense-impl", choices=("auto", "reference", "unfused", "fused"), default="auto",
                   help="auto (default); reference: the NumPy spec for every operation; unfused/fused: on a GPU")
    d.add_argument("--epochs", type=_int_at_least(1), default=30)
    d.add_argument("--batch-size", type=_int_at_least(1), default=64)
    d.add_argument("--lr", type=_positive_float, default=None,
                   help=f"Adam's learning rate (default {DEMO_LR:g}, or the --lr-find suggestion)")
    d.add_argument("--lr-find", action="store_true",
                   help="run the learning-rate range test first and train with its suggestion unless --lr is given")
    d.add_argument("--width", type=_int_at_least(1), default=128)
    d.add_argument("--samples", type=_int_at_least(2), default=6000)
    d.add_argument("--classes", type=_int_at_least(2), default=4)
    d.add_argument("--seed", type=_int_at_least(0), default=0)
    d.add_argument("--save", default=None, metavar="PATH", help="write a checkpoint here at the end (its folder must exist)")
    d.add_argument("--plot", default=None, metavar="DIR",
                   help="write history.png and gradient_flow.png (and lr_find.png) into DIR (needs matplotlib)")
    d.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    d.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes mpiexec or srun started (gpubp[mpi]); rank 0 reports")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("gradcheck", help="check every gradient against finite differences")
    g.add_argument("--device", type=_device(True), default="all",
                   help="all (the CPU and every GPU, default), cpu, cuda:N")
    g.add_argument("--activations", type=_names("activations"), default="all",
                   help="comma-separated names, or all")
    g.add_argument("--losses", type=_names("losses"), default="all", help="comma-separated names, or all")
    g.add_argument("--depths", type=_depths, default="1,2,3", help="comma-separated layer counts")
    g.add_argument("--dtypes", type=_names("dtypes"), default="float64,float32")
    g.add_argument("--seed", type=_int_at_least(0), default=0)
    g.set_defaults(func=cmd_gradcheck)

    from gpubp.bench import cli as bench_cli  # argparse set-up only: the harness loads on use

    bench_cli.add_parser(sub)
    from gpubp.tools import kernels_command  # argparse set-up only: NVRTC and CuPy load on use

    kernels_command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gpubp command; returns its exit status (2 for a bad argument, with the option named).

    A reader that stops reading (``gpubp demo | head -1``) is not an error: the rest of the
    output goes nowhere and the status is the command's own (0, or gradcheck's 1 on a failure).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad argument (2): argparse has said why
        return e.code if isinstance(e.code, int) else 2
    status = None
    try:
        status = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()
        return 0 if status is None else status
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"gpubp {args.command}: error: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
