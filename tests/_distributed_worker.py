"""One rank of a data-parallel test run: ``mpiexec -n P python tests/_distributed_worker.py SCENARIO OUT [ARG]``.

Each rank writes ``OUT/SCENARIO-rank<r>.json`` (status, error type and text, what it
measured) and, for training scenarios, ``OUT/<case>-rank<r>.npz`` (the parameters after
every step, the history's losses). A rank always exits 0 once its file is written, so that
the launcher never kills a rank that is still reporting; the test reads the files.

``run_case(name, comm)`` is also imported by tests/test_distributed.py to train the same
case in one process (comm=None), the reference the ranks must match.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import numpy as np

import gpubp as gp

# name -> (loss, optimizer factory, fit keyword arguments, model options)
CASES = {
    "sgd_nesterov": ("cross_entropy", lambda p: gp.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
                     {}, {}),
    "adam_amsgrad_mse": ("mse", lambda p: gp.optim.Adam(p, lr=0.01, amsgrad=True), {}, {}),
    "adamw_bce": ("bce_with_logits", lambda p: gp.optim.AdamW(p, lr=0.01, weight_decay=0.01), {}, {}),
    "rmsprop_centered": ("cross_entropy", lambda p: gp.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
                         {}, {}),
    "adagrad": ("cross_entropy", lambda p: gp.optim.Adagrad(p, lr=0.1, lr_decay=0.01), {}, {}),
    "clip": ("cross_entropy", lambda p: gp.optim.SGD(p, lr=0.5), {"clip_grad_norm": 0.05}, {}),
    "dropout": ("cross_entropy", lambda p: gp.optim.Adam(p, lr=0.01), {}, {"dropout": 0.3}),
    "last_batch_of_one": ("cross_entropy", lambda p: gp.optim.SGD(p, lr=0.1, momentum=0.5), {}, {"n": 25}),
    "sum_reduction": (gp.losses.MSE(reduction="sum"), lambda p: gp.optim.SGD(p, lr=0.002), {"shuffle": False}, {}),
    "validation_schedule": ("cross_entropy", lambda p: gp.optim.Adam(p, lr=0.02),
                            {"validation_split": 0.2, "schedule": True}, {}),
    "float32": ("cross_entropy", lambda p: gp.optim.Adam(p, lr=0.01), {}, {"dtype": "float32"}),
    "weighted_ce": ("cross_entropy", lambda p: gp.optim.Adam(p, lr=0.02),
                    {"weights": True, "class_weight": "balanced", "validation_split": 0.2,
                     "metrics": ["f1", "top_2_accuracy", "roc_auc"]}, {}),
    "weighted_mse": ("mse", lambda p: gp.optim.SGD(p, lr=0.05, momentum=0.5),
                     {"weights": True, "metrics": ["r2", "mae", "rmse"]}, {"n": 25}),
}
BATCH, EPOCHS = 8, 2


def data(n: int, loss: object, out: int = 3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5))
    name = loss if isinstance(loss, str) else loss.name
    if name == "cross_entropy":
        y = rng.integers(0, out, n)
    elif name == "bce_with_logits":
        y = (rng.random((n, out)) > 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((n, out))
    return x, y


def weights_for(n: int, seed: int = 2) -> np.ndarray:
    """Row weights in [0, 2), a third of them 0 (whole batches of weight 0 among them, over 2 ranks)."""
    w = np.random.default_rng(seed).uniform(0.0, 2.0, n)
    w[::3] = 0.0
    return w


def model_for(opts: dict, width: int = 7, seed: int = 0) -> gp.Sequential:
    layers = [gp.Dense(5, width, "tanh")]
    if opts.get("dropout"):
        layers.append(gp.Dropout(opts["dropout"]))
    layers.append(gp.Dense(width, 3))
    return gp.Sequential(*layers, dtype=opts.get("dtype", "float64"), seed=seed)


class Record(gp.callbacks.Callback):
    """The parameters after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[np.ndarray] = []

    def on_batch_end(self, step, logs):
        arena = self.run.model.arena
        self.steps.append(arena.backend.to_numpy(arena.data))


def run_case(name: str, comm=None) -> tuple[np.ndarray, dict]:
    """Train case ``name``; returns (parameters after each step (steps, P), history)."""
    loss, make_opt, fit_kw, opts = CASES[name]
    fit_kw = dict(fit_kw)
    model = model_for(opts)
    opt = make_opt(model.parameters())
    x, y = data(opts.get("n", 23), loss)
    if fit_kw.pop("schedule", False):
        fit_kw["scheduler"] = gp.schedules.StepLR(opt, step_size=1, gamma=0.5)
    if fit_kw.pop("weights", False):
        fit_kw["sample_weight"] = weights_for(x.shape[0])
    rec = Record()
    hist = model.fit(x, y, loss, opt, epochs=EPOCHS, batch_size=BATCH, verbose=0, callbacks=[rec], comm=comm,
                     **fit_kw)
    return np.stack(rec.steps), hist


# -- scenarios ---------------------------------------------------------------------------------


def equivalence(comm, out, arg):
    for name in CASES:
        steps, hist = run_case(name, comm)
        np.savez(os.path.join(out, f"{name}-rank{comm.rank}.npz"), steps=steps,
                 loss=np.array(hist["loss"]), val_loss=np.array(hist.get("val_loss", [])),
                 accuracy=np.array(hist.get("accuracy", [])),
                 **{f"record_{k}": np.array(v) for k, v in hist.items() if isinstance(v, list) and k != "time"})
    return {}


def api(comm, out, arg):
    r, p = comm.rank, comm.size
    a = np.arange(5, dtype=np.float64) + r
    res = {"rank": r, "size": p, "local_rank": comm.local_rank, "backend": comm.backend}
    res["mean"] = comm.allreduce_(a.copy(), op="mean").tolist()
    res["sum"] = comm.allreduce_(a.copy(), op="sum").tolist()
    res["max"] = comm.allreduce_(a.copy(), op="max").tolist()
    res["min"] = comm.allreduce_(a.copy(), op="min").tolist()
    res["sum_int"] = comm.allreduce_(np.array([r, 1], dtype=np.int64), op="sum").tolist()
    res["sum_2d"] = comm.allreduce_(np.ones((2, 3), dtype=np.float32) * (r + 1), op="sum").tolist()
    b = np.full(3, float(r))
    res["bcast_from_last"] = comm.broadcast_(b, root=p - 1).tolist()
    comm.barrier()
    res["allgather"] = comm.allgather(f"hello from {r}")
    res["bcast"] = comm.bcast({"from": r} if r == 0 else None, 0)
    # a value that rounds differently in different orders: every rank must get the same bits
    v = np.array([0.1 * (r + 1), 1e16 if r == 0 else 1.0, -1e16 if r == p - 1 else 3.0])
    res["rounding"] = comm.allreduce_(v, op="sum").tobytes().hex()
    for bad in (lambda: comm.allreduce_(a, op="median"), lambda: comm.allreduce_([1.0]),
                lambda: comm.broadcast_(a, root=p), lambda: comm.allreduce_(np.arange(3), op="mean")):
        try:
            bad()
            res.setdefault("bad", []).append(None)
        except (TypeError, ValueError) as e:
            res.setdefault("bad", []).append(f"{type(e).__name__}: {e}")
    return res


def _fit_small(comm, x=None, model=None, callbacks=None, check_finite=False, **kw):
    model = model or gp.Sequential(gp.Dense(5, 7, "relu"), gp.Dense(7, 3), dtype="float64", seed=0,
                                   check_finite=check_finite)
    xd, y = data(24, "cross_entropy")
    x = xd if x is None else x
    opt = gp.optim.SGD(model.parameters(), lr=0.1)
    return model.fit(x, y, "cross_entropy", opt, epochs=kw.pop("epochs", 2), batch_size=8, verbose=0,
                     callbacks=callbacks, comm=comm, **kw)


def bad_data(comm, out, arg):
    x, _ = data(24, "cross_entropy")
    if comm.rank == 1:
        x[3, 2] = np.nan
    _fit_small(comm, x=x)
    return {}


class Fault(gp.callbacks.Callback):
    """Raises (or sleeps) after step ``at_step`` of the first epoch; given to one rank only."""

    def __init__(self, at_step, sleep=None):
        self.at_step, self.sleep = at_step, sleep

    def on_batch_end(self, step, logs):
        if self.run.model.epoch == 0 and step == self.at_step:
            if self.sleep is not None:
                time.sleep(self.sleep)
            else:
                raise RuntimeError("injected fault in a callback")


def raise_midway(comm, out, arg):
    _fit_small(comm, callbacks=[Fault(2)] if comm.rank == 1 else [])
    return {}


def hang(comm, out, arg):
    comm.timeout = float(arg)
    _fit_small(comm, callbacks=[Fault(2, sleep=3 * float(arg))] if comm.rank == 1 else [])
    return {}


def nan_one_rank(comm, out, arg):
    x, _ = data(24, "cross_entropy")
    if comm.rank == 1:
        x[12, :] = 1e308  # batch 2 (no shuffle), row 4 of 8: rank 1's share on 2 ranks (rows 4-7) and 3 (2-4)
    model = gp.Sequential(gp.Dense(5, 7, "relu"), gp.Dense(7, 3), dtype="float64", seed=0,
                          check_finite=arg == "check_finite")
    hist = _fit_small(comm, x=x, model=model, shuffle=False, on_nonfinite="skip" if arg == "skip" else "raise")
    return {"skipped": hist.get("skipped"), "params": model.arena.data.tobytes().hex()}


class Interrupt(gp.callbacks.Callback):
    """Ctrl-C on this rank only, after the first step."""

    def on_batch_end(self, step, logs):
        if self.run.model.epoch == 0 and step == 1:
            os.kill(os.getpid(), signal.SIGINT)


def interrupt(comm, out, arg):
    model = gp.Sequential(gp.Dense(5, 7, "relu"), gp.Dense(7, 3), dtype="float64", seed=0)
    hist = _fit_small(comm, model=model, callbacks=[Interrupt()] if comm.rank == 1 else [], epochs=3)
    return {"stopped": hist["stopped"], "epoch": model.epoch, "params": model.arena.data.tobytes().hex()}


class RaiseOnRank1(gp.callbacks.Callback):
    """A KeyboardInterrupt from a callback on rank 1 only, after step 3 of epoch 1 (agreed at step 17)."""

    def on_batch_end(self, step, logs):
        if self.run.model.epoch == 0 and step == 3:
            raise KeyboardInterrupt


def resume_mid_epoch(comm, out, arg):
    """2 epochs of 20 steps straight; then the same interrupted inside epoch 1, saved by rank 0's
    ModelCheckpoint, loaded by every rank and resumed: the parameters and records of both."""
    loss, make_opt, _, opts = CASES["dropout"]
    x, y = data(48, loss)
    kw = dict(epochs=2, batch_size=2, verbose=0, comm=comm, validation_split=1 / 6)  # 40 training rows

    def records(hist):
        return {k: v for k, v in hist.items() if k not in ("time", "stopped")}

    model = model_for(opts)
    straight = records(model.fit(x, y, loss, make_opt(model.parameters()), **kw))
    want = model.arena.data.tobytes().hex()
    path = os.path.join(out, "mid-epoch.safetensors")
    model = model_for(opts)
    cbs = [gp.callbacks.ModelCheckpoint(path, monitor="loss")] + ([RaiseOnRank1()] if comm.rank == 1 else [])
    first = model.fit(x, y, loss, make_opt(model.parameters()), callbacks=cbs, **kw)
    comm.barrier()  # rank 0's checkpoint is written
    ck = gp.load(path)  # sets the position inside the epoch
    rest = ck.model.fit(x, y, loss, ck.optimizer, **{**kw, "epochs": 2 - ck.model.epoch})
    resumed = {k: records(first).get(k, []) + v for k, v in records(rest).items()}
    return {"stopped": first["stopped"], "progress": ck.progress, "want": want,
            "got": ck.model.arena.data.tobytes().hex(), "straight": straight, "resumed": resumed}


def mismatch(comm, out, arg):
    if arg == "architecture":
        width = 9 if comm.rank == comm.size - 1 else 7
        model = gp.Sequential(gp.Dense(5, width, "relu"), gp.Dense(width, 3), dtype="float64", seed=0)
        _fit_small(comm, model=model)
    elif arg == "length":
        x, y = data(24 if comm.rank != comm.size - 1 else 23, "cross_entropy")
        model = gp.Sequential(gp.Dense(5, 7, "relu"), gp.Dense(7, 3), dtype="float64", seed=0)
        model.fit(x, y, "cross_entropy", "sgd", batch_size=8, verbose=0, comm=comm)
    elif arg == "weights":
        w = weights_for(24)
        w[5] += comm.rank  # rank 1's weights differ
        _fit_small(comm, sample_weight=w)
    return {}


def seeds_differ(comm, out, arg):
    """Ranks built with different seeds: rank 0's parameters are broadcast, so all end equal."""
    model = gp.Sequential(gp.Dense(5, 7, "relu"), gp.Dense(7, 3), dtype="float64", seed=0)
    if comm.rank:
        model.arena.data[:] = comm.rank  # as if initialised differently
    _fit_small(comm, model=model)
    return {"params": model.arena.data.tobytes().hex()}


def callbacks(comm, out, arg):
    es = gp.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0)
    ck = gp.callbacks.ModelCheckpoint(os.path.join(out, f"ckpt-from-rank{comm.rank}-{{epoch}}.safetensors"),
                                      monitor="loss")
    log = gp.callbacks.CSVLogger(os.path.join(out, f"log-from-rank{comm.rank}.csv"))
    hist = _fit_small(comm, callbacks=[es, ck, log], epochs=5)
    return {"stopped": hist["stopped"], "epochs": len(hist["loss"]), "loss": hist["loss"]}


def checkpoint(comm, out, arg):
    """arg "start": 2 epochs, rank 0 saves; arg "resume": load, 2 more epochs, save final params."""
    path = os.path.join(out, "resume.safetensors")
    loss, make_opt, _, opts = CASES["dropout"]
    x, y = data(23, loss)
    if arg == "start":
        model = model_for(opts)
        opt = make_opt(model.parameters())
    else:
        ck = gp.load(path)
        model, opt = ck.model, ck.optimizer
    model.fit(x, y, loss, opt, epochs=2, batch_size=BATCH, verbose=0, comm=comm)
    if comm.rank == 0:
        gp.save(path, model, opt)
    comm.barrier()
    return {"params": model.arena.data.tobytes().hex(), "epoch": model.epoch}


def device_api(comm, out, arg):
    """Collectives on device arrays (NCCL): sum, mean, broadcast; the results back on the host."""
    import cupy

    r, p = comm.rank, comm.size
    res = {"backend": comm.backend}
    a = cupy.arange(5, dtype=cupy.float64) + r
    res["sum"] = cupy.asnumpy(comm.allreduce_(a.copy(), op="sum")).tolist()
    res["mean"] = cupy.asnumpy(comm.allreduce_(a.copy(), op="mean")).tolist()
    res["bcast"] = cupy.asnumpy(comm.broadcast_(cupy.full(3, float(r), dtype=cupy.float32), root=p - 1)).tolist()
    return res


def device_equivalence(comm, out, arg):
    """A few cases on this rank's GPU; the test compares them with one process on a GPU."""
    global model_for
    plain = model_for

    def on_gpu(opts, width=7, seed=0):
        m = plain(opts, width, seed)
        return m.to(f"cuda:{getattr(comm, 'device_index', comm.local_rank)}")

    model_for = on_gpu
    try:
        for name in DEVICE_CASES:
            steps, hist = run_case(name, comm)
            np.savez(os.path.join(out, f"{name}-rank{comm.rank}.npz"), steps=steps, loss=np.array(hist["loss"]))
    finally:
        model_for = plain
    return {}


DEVICE_CASES = ("sgd_nesterov", "dropout", "last_batch_of_one", "float32")

def device_buckets(comm, out, arg):
    """Bucket all-reduces on the side stream (NCCL): started tail first, as fit starts them, then
    waited for; with two ranks, also fit with and without buckets on the GPU (the same bits)."""
    import cupy

    r, p = comm.rank, comm.size
    dev = getattr(comm, "device_index", comm.local_rank)
    with cupy.cuda.Device(dev):
        a = cupy.zeros(1000, dtype=cupy.float64)
        pending = []
        for lo, hi in ((600, 1000), (300, 600), (0, 300)):
            a[lo:hi] = cupy.arange(lo, hi, dtype=cupy.float64) + r  # written on the compute stream, then started
            pending.append(comm.start_allreduce_(a[lo:hi], op="sum"))
        for q in pending:
            q.wait()
        a *= 1.0  # later work on the compute stream sees the reduced values
        res = {"backend": comm.backend, "sum": cupy.asnumpy(a).tolist()}
    if p > 1:
        for size in (0, 1):
            comm.bucket_bytes = size
            model = bucket_model("float64").to(f"cuda:{dev}")
            opt = gp.optim.Adam(model.parameters(), lr=0.01)
            x, y = data(29, "cross_entropy")
            rec = Record()
            model.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=BATCH, verbose=0, callbacks=[rec], comm=comm)
            np.savez(os.path.join(out, f"device-buckets-{size}-rank{r}.npz"), steps=np.stack(rec.steps))
    return res


# bucket_bytes tried by the "buckets" scenario: 0 = one all-reduce; 1 = a bucket per layer;
# 600 = layers grouped; 10**9 = one bucket, started after the first layer's backward
BUCKET_SIZES = (0, 1, 600, 10**9)


def bucket_model(dtype: str, dropout: bool = False) -> gp.Sequential:
    layers = [gp.Dense(5, 9, "tanh"), gp.Dense(9, 11, "relu")]
    if dropout:
        layers.append(gp.Dropout(0.2))
    layers += [gp.Dense(11, 8, "gelu"), gp.Dense(8, 3)]
    return gp.Sequential(*layers, dtype=dtype, seed=0)


def buckets(comm, out, arg):
    """Four layers trained with each of BUCKET_SIZES; the test compares the bits."""
    res = {}
    for dtype in ("float64", "float32"):
        for size in BUCKET_SIZES:
            comm.bucket_bytes = size
            model = bucket_model(dtype, dropout=dtype == "float32")
            opt = gp.optim.Adam(model.parameters(), lr=0.01)
            x, y = data(29, "cross_entropy")
            rec = Record()
            model.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=BATCH, verbose=0, callbacks=[rec], comm=comm,
                      clip_grad_norm=0.5)
            np.savez(os.path.join(out, f"buckets-{dtype}-{size}-rank{comm.rank}.npz"), steps=np.stack(rec.steps))
    return res

def accumulate(comm, out, arg):
    """accumulate=3 micro-batches of 4 rows (dropout), with one all-reduce after backward and with a
    bucket per layer: the parameters, and how many all-reduces of gradients ran (tests/test_accumulate.py:
    one per optimizer step, or one per bucket and step)."""
    x, y = data(40, "cross_entropy")
    started = comm.start_allreduce_  # MPI: every all-reduce (allreduce_ too) starts here
    res = {}
    for bucket_bytes in (0, 1):
        model = model_for({"dropout": 0.3})
        calls = []

        def counted_start(array, op="mean", model=model, calls=calls):
            if isinstance(array, np.ndarray) and np.shares_memory(array, model.arena.grad):
                calls.append(array.size)
            return started(array, op)

        comm.start_allreduce_, comm.bucket_bytes = counted_start, bucket_bytes
        model.fit(x, y, "cross_entropy", gp.optim.Adam(model.parameters(), lr=0.01), epochs=2, batch_size=4,
                  accumulate=3, verbose=0, comm=comm)
        res[f"allreduces_{bucket_bytes}"] = len(calls)
        res[f"params_{bucket_bytes}"] = model.arena.data.tolist()
    comm.start_allreduce_ = started
    return res


# cases of CASES trained with graph=True and graph=False by the "graph" scenario (and accumulate=3 with dropout)
GRAPH_CASES = ("dropout", "clip", "last_batch_of_one", "float32", "weighted_ce", "sgd_nesterov")


def graph(comm, out, arg):
    """fit(graph=True) and fit(graph=False) on every rank, per case of GRAPH_CASES plus accumulate=3 with
    buckets: the parameters after every step and the history, and how many steps were replayed
    (tests/test_step_capture.py: the same bits)."""
    from gpubp.step_capture import StepCapture

    made = []
    init = StepCapture.__init__

    def recorded(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    StepCapture.__init__ = recorded
    res = {}
    try:
        for name in (*GRAPH_CASES, "accumulate"):
            got = {}
            for mode in (False, True):
                made.clear()
                loss, make_opt, fit_kw, opts = CASES["dropout" if name == "accumulate" else name]
                fit_kw = dict(fit_kw)
                model = model_for(opts)
                opt = make_opt(model.parameters())
                x, y = data(opts.get("n", 23), loss)
                if fit_kw.pop("weights", False):
                    fit_kw["sample_weight"] = weights_for(x.shape[0])
                if name == "accumulate":
                    comm.bucket_bytes = 1  # a bucket per layer, started inside the recorded backward
                    fit_kw.update(accumulate=3, batch_size=2)
                rec = Record()
                hist = model.fit(x, y, loss, opt, **{"epochs": EPOCHS, "batch_size": BATCH, "verbose": 0,
                                                    "callbacks": [rec], "comm": comm, "graph": mode, **fit_kw})
                comm.bucket_bytes = None
                key = "graph" if mode else "eager"
                got[f"params_{key}"] = np.stack(rec.steps).tobytes().hex()
                got[f"history_{key}"] = {k: v for k, v in hist.items() if k != "time"}
                if mode:
                    got["replays"] = sum(c.replays for c in made)
                    got["reason"] = [c.reason for c in made]
            res[name] = got
    finally:
        StepCapture.__init__ = init
    return {"cases": res}


SCENARIOS = {f.__name__: f for f in (equivalence, api, bad_data, raise_midway, hang, nan_one_rank, interrupt,
                                     resume_mid_epoch, mismatch,
                                     seeds_differ, callbacks, checkpoint, device_api, device_equivalence,
                                     buckets, device_buckets, accumulate, graph)}


def main() -> int:
    scenario, out = sys.argv[1], sys.argv[2]
    arg = sys.argv[3] if len(sys.argv) > 3 else ""
    t0 = time.monotonic()
    comm = gp.distributed.init(os.environ.get("GPUBP_TEST_BACKEND", "auto"), timeout=60.0)
    report = {"rank": comm.rank, "size": comm.size, "backend": comm.backend}
    try:
        report.update(SCENARIOS[scenario](comm, out, arg) or {})
        report["status"] = "ok"
    except Exception as e:
        report.update(status="error", type=type(e).__name__, message=str(e),
                      error_rank=getattr(e, "rank", None), traceback=traceback.format_exc())
    report["seconds"] = time.monotonic() - t0
    with open(os.path.join(out, f"{scenario}-rank{comm.rank}.json"), "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
