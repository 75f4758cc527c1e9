"""Per-step cost of a training step (Adam, cross-entropy): eager against recorded and replayed.

    python bench/step_overhead.py --device cpu|cuda --out DIR [--quick] [--budget S]

What one step is, for every contender: forward, softmax cross-entropy (mean over the batch),
backward, Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8), float32, on one fixed batch already where
the step runs. Every contender starts from gpubp's initial parameters (seed 0) and computes
the same maths; the first step's loss of each is compared with gpubp eager's (``loss_agrees``).

gpubp is driven through :class:`gpubp.train_step.TrainStep`, the object ``fit`` calls once per
optimizer step, as ``fit`` drives it (``step(rows, n, s, tag, read_x, y)`` then
``step.update()``, ``tag`` = 1 + steps so far): ``capture(True)`` gives the replayed step
(``fit(graph=True)``), no capture the eager one (``fit(graph=False)``). Timing the step object
rather than whole ``fit`` calls gives a time per step (each step can be timed alone, which the
host-time figure on a GPU needs) and leaves out what ``fit`` adds per step that is not the step
(the accuracy sums, callbacks, progress), so the PyTorch and JAX loops, which are bare steps,
are compared like for like. On the CPU ``fit`` itself is also timed (``gpubp fit ...``): one fit
of several epochs per round, the first epoch (compiles, the capture) dropped, the later epochs'
``history["time"]`` over the steps per epoch; its RuntimeWarnings are kept (a fall-back to the
eager step says "graph: the training step runs eagerly: ...").

Figures (every sample is in results.json; the tables show medians):

* CPU: ``step_us``, perf_counter around each step (the CPU step is synchronous: host time is
  step time). Contenders run in interleaved blocks of steps (the order rotates every block), so a
  busy period of a shared machine falls on all of them.
* GPU: ``host_us``, perf_counter around the launch of one step with no synchronisation inside
  (the device is synchronised before each timed launch, outside the timing, so a full launch
  queue cannot stretch it); ``device_us``, CUDA events around a block of ``steps`` steps launched
  back to back, over ``steps`` (a launch-bound step shows its host time here too); the median
  over blocks. JAX exposes no CUDA events: its ``device_us`` is the wall time around the block,
  synchronised at both ends (``device_timer`` says which). Every contender also has
  ``wall_us``, that synchronised wall time, to compare across timers.

Contenders on a GPU: gpubp eager and replayed (``device="cuda"``); PyTorch eager
(``Adam(foreach)``, its default); PyTorch with the whole step captured in ``torch.cuda.graph``
(static input and target, ``Adam(capturable=True)``, as PyTorch's "whole network capture"
example); ``torch.compile(mode="reduce-overhead")`` of forward + loss (backward through the
compiled graph, CUDA graphs for both) with ``Adam(fused=True)`` eager; a ``jax.jit`` step with
Adam written in ``jax.numpy`` (``jax_default_matmul_precision="highest"``: no TF32, as the
others). Each is skipped, with the reason, when its library does not import, and
torch.compile is skipped when the time budget is short (``--budget``) or for the 2^18-row case
under ``--quick``. Goals are reported, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside CuPy and PyTorch
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
# (name, widths, batch): dense layers relu but the last (logits)
CPU_CASES = [("tiny 2-16-2", (2, 16, 2), 8), ("small 64-64-64-10", (64, 64, 64, 10), 256)]
GPU_CASES = [("small 64-64-64-10", (64, 64, 64, 10), 1024),
             ("mnist 784-1024-1024-10", (784, 1024, 1024, 10), 4096),
             ("deep 64-8x64-10", (64,) * 9 + (10,), 2**18)]
GOAL_HOST_US = 30.0  # GPU: a replayed step's host time, up to depth 8
GOAL_GPU_SMALL = 3.0  # GPU: the small MLP's step vs PyTorch eager
GOAL_CPU_TINY = 1.5  # CPU: the tiny MLP, eager / replayed


def settings(device: str, quick: bool) -> dict:
    if device == "cpu":
        # steps per block per case, blocks (interleaved), fit: rounds x epochs (the first dropped)
        return dict(steps={"tiny 2-16-2": 40 if quick else 200, "small 64-64-64-10": 10 if quick else 60},
                    warmup=5 if quick else 20, warmup_s=0.2 if quick else 0.5, blocks=3 if quick else 30, fit_rounds=1 if quick else 8,
                    fit_epochs=2 if quick else 4)
    return dict(steps=20 if quick else 50, warmup=5 if quick else 10, warmup_s=0.2 if quick else 0.5,
                blocks=3 if quick else 5)


# --- the models and their data ----------------------------------------------------------------


def gpubp_model(widths, device):
    import gpubp as gp

    n = len(widths) - 1
    layers = [gp.Dense(widths[i], widths[i + 1], "relu" if i < n - 1 else None) for i in range(n)]
    return gp.Sequential(*layers, device=device, dtype="float32", seed=0)


def initial_params(widths):
    """gpubp's initial parameters (seed 0) as float32 NumPy [(W (in, out), b (out,)), ...]."""
    m = gpubp_model(widths, "cpu")
    ps = [np.array(p.data, dtype=np.float32) for p in m.parameters()]
    return list(zip(ps[0::2], ps[1::2], strict=True))


def batch(widths, b):
    rng = np.random.default_rng(1)
    return rng.standard_normal((b, widths[0])).astype(np.float32), rng.integers(0, widths[-1], b).astype(np.int64)


def plan_info(step) -> dict:
    g = step.graphs
    if g is None:
        return {}
    info = {"captures": g.captures, "replays": g.replays, "eager_reason": g.reason}
    for c in g.plans.values():
        p = c.plan
        info.update(plan=repr(p), planned=dict(p.planned), generic=dict(p.generic),
                    backend_graph=p.graph is not None)
    return info


# --- contenders: setup(case) -> (step, sync, events, first_loss, info) ------------------------


class Skip(Exception):
    pass


def gpubp_step(widths, b, device, graph):
    from gpubp import losses
    from gpubp.optim import Adam
    from gpubp.train_step import TrainStep

    model = gpubp_model(widths, device)
    loss = losses.get("cross_entropy")
    opt = Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS)
    x, y = batch(widths, b)
    backend = model.arena.backend
    if device != "cpu":
        x = backend.asarray(x, np.float32)  # on the device, as the other contenders' batch
    xb, yb = model.prepare_data(x, y, loss)
    if device != "cpu":
        yb = backend.asarray(yb, yb.dtype)
    st = TrainStep(model, loss, opt, micro_rows=b)
    if graph:
        st.capture(True)
    rows, tag = slice(0, b), [0]

    def read_x(r):
        return model.rows(xb, r)

    def step():
        tag[0] += 1
        res = st(rows, b, 0, tag[0], read_x, yb)
        st.update()
        return res

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = float(step().value)
    info = {"warnings": [str(w.message) for w in caught]}
    return step, first, info, (lambda: plan_info(st))


def torch_mlp(torch, widths, device):
    mods = []
    for i, (w, bias) in enumerate(initial_params(widths)):
        lin = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            lin.bias.copy_(torch.from_numpy(bias))
        mods.append(lin)
        if i < len(widths) - 2:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods).to(device)


def torch_step(widths, b, device, mode):
    try:
        import torch
    except ImportError as e:
        raise Skip(f"torch does not import: {e}") from None
    F = torch.nn.functional
    dev = "cuda" if device == "cuda" else "cpu"
    net = torch_mlp(torch, widths, dev)
    xn, yn = batch(widths, b)
    x, y = torch.from_numpy(xn).to(dev), torch.from_numpy(yn).to(dev)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if mode == "eager":
        opt = torch.optim.Adam(net.parameters(), lr=LR, betas=BETAS, eps=EPS)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return loss
        first = float(step())
        return step, first, info, None
    if mode == "graph":  # PyTorch docs, CUDA Graphs, "Whole-network capture"
        opt = torch.optim.Adam(net.parameters(), lr=LR, betas=BETAS, eps=EPS, capturable=True)
        sx, sy = x.clone(), y.clone()
        first = None
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up on a side stream (these are real steps, as in the docs)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(sx), sy)
                loss.backward()
                opt.step()
                first = float(loss) if first is None else first
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            sloss = F.cross_entropy(net(sx), sy)
            sloss.backward()
            opt.step()

        def step():
            sx.copy_(x)
            sy.copy_(y)
            g.replay()
            return sloss
        info["note"] = "3 eager warm-up steps on a side stream before capture; first_loss is the first of them"
        return step, first, info, None
    if mode == "compile":
        opt = torch.optim.Adam(net.parameters(), lr=LR, betas=BETAS, eps=EPS, fused=True)
        fwd = torch.compile(lambda a, t: F.cross_entropy(net(a), t), mode="reduce-overhead")
        mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)

        def step():
            if mark is not None:
                mark()
            opt.zero_grad(set_to_none=True)
            loss = fwd(x, y)
            loss.backward()
            opt.step()
            return loss
        t0 = time.perf_counter()
        first = float(step())
        for _ in range(2):  # cudagraph trees record on a later call
            step()
        torch.cuda.synchronize()
        info.update(compile_s=round(time.perf_counter() - t0, 2),
                    note="torch.compile(mode='reduce-overhead') of forward + loss; Adam(fused=True) eager; "
                         "first_loss is before the 2 extra warm-up calls")
        return step, first, info, None
    raise ValueError(mode)


def jax_step(widths, b):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as e:
        raise Skip(f"jax does not import: {e}") from None
    if not any(d.platform == "gpu" for d in jax.devices()):
        raise Skip(f"jax sees no GPU ({jax.devices()})")
    jax.config.update("jax_default_matmul_precision", "highest")
    params = [(jnp.asarray(w), jnp.asarray(bias)) for w, bias in initial_params(widths)]
    xn, yn = batch(widths, b)
    x, y = jnp.asarray(xn), jnp.asarray(yn.astype(np.int32))
    b1, b2 = BETAS

    def loss_fn(ps, a, t):
        for i, (w, bias) in enumerate(ps):
            a = a @ w + bias
            if i < len(ps) - 1:
                a = jax.nn.relu(a)
        logp = jax.nn.log_softmax(a, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=1))

    def train(ps, m, v, k, a, t):
        loss, g = jax.value_and_grad(loss_fn)(ps, a, t)
        k = k + 1
        m = jax.tree_util.tree_map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree_util.tree_map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
        kf = k.astype(jnp.float32)
        step_size, bc2 = LR / (1 - b1**kf), jnp.sqrt(1 - b2**kf)
        ps = jax.tree_util.tree_map(lambda p, m_, v_: p - step_size * m_ / (jnp.sqrt(v_) / bc2 + EPS), ps, m, v)
        return ps, m, v, k, loss

    fn = jax.jit(train, donate_argnums=(0, 1, 2, 3))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    state = [params, zeros, jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.int32)]

    def step():
        *state[:], loss = fn(*state, x, y)
        return loss
    t0 = time.perf_counter()
    first = float(step())
    info = {"jax": jax.__version__, "compile_s": round(time.perf_counter() - t0, 2)}
    return step, first, info, None


# --- timing -----------------------------------------------------------------------------------


def med(xs):
    return statistics.median(xs) if xs else None


class Gpu:
    """Synchronisation and events on the GPU (CuPy's for gpubp, PyTorch's for PyTorch)."""

    def __init__(self, family):
        self.family = family
        if family == "torch":
            import torch

            self.sync = torch.cuda.synchronize
            self.event = lambda: torch.cuda.Event(enable_timing=True)
            self.elapsed_ms = lambda a, z: a.elapsed_time(z)
        elif family == "jax":
            self.sync, self.event = None, None
        else:
            import cupy

            self.sync = cupy.cuda.runtime.deviceSynchronize
            self.event = cupy.cuda.Event
            self.elapsed_ms = cupy.cuda.get_elapsed_time


def gpu_block(c, steps):
    """host samples (us), device us per step (events or wall), wall us per step (synchronised)."""
    step, gpu = c["step"], c["gpu"]
    last = [None]

    def sync():
        if gpu.sync is not None:
            gpu.sync()
        elif last[0] is not None:
            last[0].block_until_ready()
    host = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        last[0] = step()
        host.append((time.perf_counter() - t0) * 1e6)
    sync()
    e0 = e1 = None
    if gpu.event is not None:
        e0, e1 = gpu.event(), gpu.event()
        e0.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        last[0] = step()
    if e1 is not None:
        e1.record()
    sync()
    wall = (time.perf_counter() - t0) * 1e6 / steps
    dev = gpu.elapsed_ms(e0, e1) * 1e3 / steps if e0 is not None else wall
    return host, dev, wall


def warm_up(c, count, seconds, cap=20.0):
    """Untimed steps (compiles, captures, allocator growth, threads settling): at least ``count``
    steps and ``seconds``, then until the median of the last 5 is within 2x the fastest (a process
    that has just compiled runs its first steps slowly for a while), at most ``cap`` seconds."""
    gpu = c.get("gpu")
    times, t_start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        out = c["step"]()
        if gpu is not None:
            gpu.sync() if gpu.sync is not None else out.block_until_ready()
        times.append(time.perf_counter() - t0)
        took = time.perf_counter() - t_start
        if took > cap or (len(times) >= max(count, 5) and took >= seconds
                          and statistics.median(times[-5:]) <= 2 * min(times)):
            return {"steps": len(times), "seconds": round(took, 3), "first_ms": round(times[0] * 1e3, 3),
                    "last_ms": round(times[-1] * 1e3, 3)}


def cpu_block(c, steps):
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        c["step"]()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def fit_samples(widths, b, steps, graph, rounds_epochs):
    """CPU: per-step us of fit's epochs after the first (history['time'] / steps), and its warnings."""
    from gpubp.optim import Adam

    epochs = rounds_epochs
    model = gpubp_model(widths, "cpu")
    opt = Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((steps * b, widths[0])).astype(np.float32)
    y = rng.integers(0, widths[-1], steps * b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = model.fit(x, y, loss="cross_entropy", optimizer=opt, epochs=epochs, batch_size=b, verbose=0,
                      shuffle=False, graph=graph)
    return [t * 1e6 / steps for t in h["time"][1:]], [str(w.message) for w in caught]


# --- the run ----------------------------------------------------------------------------------


def contenders_for(device, case, quick, budget_left):
    name, widths, b = case
    out = [("gpubp eager", "gpubp", lambda: gpubp_step(widths, b, device, False)),
           ("gpubp replayed", "gpubp", lambda: gpubp_step(widths, b, device, True)),
           ("torch eager", "torch", lambda: torch_step(widths, b, device, "eager"))]
    if device == "cuda":
        out.append(("torch cuda graph", "torch", lambda: torch_step(widths, b, device, "graph")))
        if quick and b >= 2**18:
            out.append(("torch.compile", "torch", "skipped: --quick leaves torch.compile out at 2^18 rows"))
        elif budget_left() < 45:
            out.append(("torch.compile", "torch",
                        f"skipped: {budget_left():.0f} s of the time budget left (compiling takes ~20-40 s)"))
        else:
            out.append(("torch.compile", "torch", lambda: torch_step(widths, b, device, "compile")))
        out.append(("jax.jit", "jax", lambda: jax_step(widths, b)))
    return out


def run_case(device, case, cfg, quick, budget_left):
    name, widths, b = case
    rec = {"case": name, "widths": list(widths), "batch": b, "contenders": {}}
    live = []
    for cname, family, make in contenders_for(device, case, quick, budget_left):
        r = rec["contenders"][cname] = {"family": family}
        if isinstance(make, str):
            r["status"] = make
            continue
        try:
            step, first, info, finish = make()
        except Skip as e:
            r["status"] = f"skipped: {e}"
            continue
        except Exception as e:  # noqa: BLE001 - recorded, the others still run
            r.update(status=f"error: {type(e).__name__}: {e}", traceback=traceback.format_exc())
            continue
        r.update(status="ok", first_loss=first, **info)
        c = {"name": cname, "step": step, "rec": r, "finish": finish}
        if device == "cuda":
            c["gpu"] = Gpu(family)
        live.append(c)
    steps = cfg["steps"][name] if device == "cpu" else cfg["steps"]
    if device == "cuda" and b >= 2**18:
        steps = max(10, steps // 2)
    ref = rec["contenders"].get("gpubp eager", {}).get("first_loss")
    for c in live:
        fl = c["rec"]["first_loss"]
        c["rec"]["loss_agrees"] = ref is not None and abs(fl - ref) <= 1e-4 * max(abs(ref), 1e-6)
        try:
            c["rec"]["warmup"] = warm_up(c, cfg["warmup"], cfg["warmup_s"])
            c.update(host=[], dev=[], wall=[])
        except Exception as e:  # noqa: BLE001
            c["rec"].update(status=f"error: {type(e).__name__}: {e}", traceback=traceback.format_exc())
    live = [c for c in live if c["rec"]["status"] == "ok"]
    for k in range(cfg["blocks"]):
        for c in live[k % len(live):] + live[:k % len(live)] if live else []:
            try:
                if device == "cuda":
                    h, d, w = gpu_block(c, steps)
                    c["host"] += h
                    c["dev"].append(d)
                    c["wall"].append(w)
                else:
                    c["host"] += cpu_block(c, steps)
            except Exception as e:  # noqa: BLE001
                c["rec"].update(status=f"error: {type(e).__name__}: {e}", traceback=traceback.format_exc())
        live = [c for c in live if c["rec"]["status"] == "ok"]
    for c in live:
        r = c["rec"]
        key = "step_us" if device == "cpu" else "host_us"
        r.update({key: med(c["host"]), f"{key}_min": min(c["host"]), "samples_" + key: [round(v, 3) for v in c["host"]],
                  "steps_per_block": steps, "blocks": cfg["blocks"]})
        if device == "cuda":
            r.update(device_us=med(c["dev"]), samples_device_us=c["dev"], wall_us=med(c["wall"]),
                     samples_wall_us=c["wall"], device_timer="wall+sync" if c["gpu"].event is None else "cuda-events")
        if c["finish"] is not None:
            r.update(c["finish"]())
    if device == "cpu":  # fit, eager and replayed alternating per round
        fits = {g: rec["contenders"].setdefault(f"gpubp fit {'replayed' if g else 'eager'}",
                                                 {"family": "gpubp-fit", "graph": g, "samples": [], "warnings": []})
                for g in (False, True)}
        for k in range(cfg["fit_rounds"]):
            for graph in ((False, True) if k % 2 == 0 else (True, False)):
                r = fits[graph]
                if "status" in r:
                    continue
                try:
                    smp, warns = fit_samples(widths, b, steps, graph, cfg["fit_epochs"])
                    r["samples"] += smp
                    r["warnings"] += warns
                except Exception as e:  # noqa: BLE001
                    r.update(status=f"error: {type(e).__name__}: {e}", traceback=traceback.format_exc())
        for r in fits.values():
            samples = r.pop("samples")
            r["warnings"] = sorted(set(r["warnings"]))
            if "status" not in r:
                r.update(status="ok", step_us=med(samples), step_us_min=min(samples),
                         samples_step_us=[round(v, 3) for v in samples],
                         note=f"fit of {steps} steps x {cfg['fit_epochs']} epochs, first epoch dropped, "
                              f"{cfg['fit_rounds']} rounds, eager and replayed alternating")
    del live
    gc.collect()
    return rec


def environment(device):
    env = {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
           "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "platform": platform.platform()}
    try:
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu"] = platform.processor()
    try:
        env["loadavg"] = os.getloadavg()
    except OSError:
        pass
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        env["commit"] = r.stdout.strip() or None
        r = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "gpubp"],
                           capture_output=True, text=True, timeout=10)
        env["gpubp_uncommitted"] = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        env["commit"] = os.environ.get("GPUBP_COMMIT")
    if device == "cuda":
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(0)
            env["device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            env["cupy"] = cupy.__version__
        except Exception as e:  # noqa: BLE001
            env["device"] = f"unknown ({e})"
    else:
        env["device"] = env["cpu"]
    return env


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def summarize(res) -> str:
    device = res["device"]
    lines = [f"# Training step: eager vs replayed ({device}{', quick' if res['quick'] else ''})", "",
             f"device: {res['environment'].get('device')}; commit {res['environment'].get('commit')}"
             f"{' with uncommitted changes in gpubp/' if res['environment'].get('gpubp_uncommitted') else ''}; "
             f"took {res['seconds']:.0f} s", "", f"command: `{res['command']}`", ""]
    if device == "cpu":
        lines += ["Median time per step (us); `eager/this`: gpubp eager's median over this one's "
                  "(above 1: faster than eager); `fit` rows: whole fit, per step.", "",
                  "| case | contender | median us | min us | n | eager/this | notes |", "|---|---|---|---|---|---|---|"]
    else:
        lines += ["Medians per step (us): host (launch, no sync), device (CUDA events over a block); "
                  "`torch eager/this` is on device time (above 1: faster than PyTorch eager).", "",
                  "| case | contender | host us | device us | wall us | torch eager/this | gpubp eager/this | notes |",
                  "|---|---|---|---|---|---|---|---|"]
    for case in res["cases"]:
        cs = case["contenders"]
        for cname, r in cs.items():
            if r.get("status") != "ok":
                cols = 4 if device == "cpu" else 5
                lines.append(f"| {case['case']} | {cname} |" + " |" * cols + f" {r.get('status')} |")
                continue
            notes = []
            if "loss_agrees" in r and not r["loss_agrees"]:
                notes.append(f"first loss {r['first_loss']:.6g} differs from gpubp eager's")
            if r.get("warnings"):
                notes.append("warned: " + "; ".join(r["warnings"]))
            if "planned" in r:
                notes.append(f"plan: {sum(r['planned'].values())} planned, {sum(r['generic'].values())} generic entries"
                             f"{', backend graph' if r.get('backend_graph') else ''}; {r.get('replays')} replays")
            if r.get("eager_reason"):
                notes.append(f"ran eagerly: {r['eager_reason']}")
            if "compile_s" in r:
                notes.append(f"compile {r['compile_s']} s")
            if device == "cpu":
                eager = cs["gpubp fit eager" if "fit" in cname else "gpubp eager"].get("step_us")
                ratio = eager / r["step_us"] if eager else None
                lines.append(f"| {case['case']} | {cname} | {fmt(r['step_us'])} | {fmt(r['step_us_min'])} | "
                             f"{len(r['samples_step_us'])} | {fmt(ratio, 2)} | {'; '.join(notes)} |")
            else:
                te = cs.get("torch eager", {}).get("device_us")
                ge = cs.get("gpubp eager", {}).get("device_us")
                lines.append(f"| {case['case']} | {cname} | {fmt(r['host_us'])} | {fmt(r['device_us'])} | "
                             f"{fmt(r['wall_us'])} | {fmt(te / r['device_us'] if te else None, 2)} | "
                             f"{fmt(ge / r['device_us'] if ge else None, 2)} | {'; '.join(notes)} |")
    lines += ["", "Goals (reported, not asserted):", ""]
    for g in res["goals"]:
        lines.append(f"- {g['goal']}: {g['measured']} -> {g['verdict']}")
    return "\n".join(lines) + "\n"


def goals(res):
    out = []

    def get(case, cname, key):
        for c in res["cases"]:
            if c["case"].startswith(case):
                return c["contenders"].get(cname, {}).get(key)
        return None

    def add(goal, value, want, text):
        verdict = "not measured" if value is None else ("met" if value >= want else "NOT met")
        out.append({"goal": goal, "value": value, "measured": text if value is not None else "-", "verdict": verdict})

    if res["device"] == "cpu":
        e, g = get("tiny", "gpubp eager", "step_us"), get("tiny", "gpubp replayed", "step_us")
        r = e / g if e and g else None
        add(f"CPU tiny 2-16-2 (batch 8): replayed >= {GOAL_CPU_TINY}x faster than eager", r, GOAL_CPU_TINY,
            f"{fmt(e)} us eager / {fmt(g)} us replayed = {fmt(r, 2)}x")
    else:
        worst = None
        for c in res["cases"]:
            h = c["contenders"].get("gpubp replayed", {}).get("host_us")
            if h is not None:
                worst = h if worst is None else max(worst, h)
        add(f"GPU: a replayed step's host time <= {GOAL_HOST_US:.0f} us up to depth 8 (worst case)",
            None if worst is None else GOAL_HOST_US / worst, 1.0, f"worst {fmt(worst)} us")
        t, g = get("small", "torch eager", "device_us"), get("small", "gpubp replayed", "device_us")
        r = t / g if t and g else None
        add(f"GPU small 64-64-64-10 (batch 1024): replayed >= {GOAL_GPU_SMALL:.0f}x faster than PyTorch eager",
            r, GOAL_GPU_SMALL, f"{fmt(t)} us torch / {fmt(g)} us gpubp = {fmt(r, 2)}x")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer steps and blocks (a check that it runs)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: torch.compile is skipped when less than 45 s of it is left (default 80 on cuda)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    budget = args.budget if args.budget is not None else 80.0

    def budget_left():
        return budget - (time.perf_counter() - t_start)
    if args.device == "cuda":
        from gpubp.device import cuda_status

        count, why = cuda_status()
        if not count:
            print(f"step_overhead: no GPU: {why}", file=sys.stderr)
            return 2
    cfg = settings(args.device, args.quick)
    cases = CPU_CASES if args.device == "cpu" else GPU_CASES
    res = {"device": args.device, "quick": args.quick, "settings": cfg, "budget_s": budget,
           "command": " ".join(["python", "bench/step_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
           "environment": environment(args.device), "cases": []}
    for case in cases:
        print(f"step_overhead: {case[0]} at batch {case[2]} ...", flush=True)
        res["cases"].append(run_case(args.device, case, cfg, args.quick, budget_left))
    res["seconds"] = time.perf_counter() - t_start
    res["goals"] = goals(res)
    res["environment"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    text = summarize(res)
    (args.out / "summary.md").write_text(text)
    print(text)
    bad = [f"{c['case']}: {n}: {r['status']}" for c in res["cases"] for n, r in c["contenders"].items()
           if n.startswith("gpubp") and r.get("status") != "ok"]
    for b in bad:
        print(f"step_overhead: gpubp failed: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
