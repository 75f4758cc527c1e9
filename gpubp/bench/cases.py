"""The cases: sizes (N batch or rows, W width, C classes, P parameters) per tier and target (GPU grid, or a
scaled-down CPU grid), work, inputs, and the float64 reference and gate of each kind. References run the
project's float64 spec (numpy_ref, gpubp's optimizers on the NumPy backend); tolerances from gpubp.accuracy.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

import gpubp as gp
from gpubp.accuracy import kinks, near_kink, rel_err
from gpubp.activations import NAMES as ACTIVATIONS
from gpubp.activations import Activation
from gpubp.backends import numpy_ref

GROUPS = ("dense_fwd", "dense_fwd_bwd", "step", "optim", "loss", "allreduce")
TIER_ACTIVATIONS = {"smoke": ("relu",), "quick": ("relu", "gelu"), "full": ACTIVATIONS}
LAYER_GRID = {  # (tier, target) -> (widths, batches), in = out = width
    ("smoke", "cpu"): ([32, 64], [64, 256]), ("smoke", "gpu"): ([64, 1024], [256, 4096]),
    ("quick", "cpu"): ([64, 256], [256, 1024]), ("quick", "gpu"): ([64, 512, 4096], [1024, 65536]),
    ("full", "cpu"): ([64, 256, 1024, 4096], [256, 1024, 4096, 16384]),
    ("full", "gpu"): ([64, 128, 256, 512, 1024, 2048, 4096], [256, 1024, 4096, 16384, 65536]),
}
# name -> (description, widths: input first, relu hidden, identity out; stated batch; tier -> (CPU, GPU) batches)
MODELS = {
    "mnist_mlp": ("MNIST-sized MLP 784-1024-1024-10", [784, 1024, 1024, 10], 4096,
                  {"smoke": ([64], [256]), "quick": ([256], [4096]), "full": ([512, 4096], [1024, 4096, 16384])}),
    "deep_narrow": ("deep narrow MLP, 8 hidden layers of 64 (64 in, 10 out)", [64] * 9 + [10], 2**18,
                    {"smoke": ([256], [4096]), "quick": ([2048], [2**18]),
                     "full": ([4096, 2**18], [2**14, 2**16, 2**18, 2**20])}),
    "wide": ("wide MLP, 4 hidden layers of 4096 (4096 in, 10 out)", [4096] * 5 + [10], 8192,
             {"smoke": ([], []), "quick": ([], [8192]), "full": ([256], [2048, 8192, 32768])}),
}
HYPER = {"adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}, "sgd_momentum": {"lr": 0.01, "momentum": 0.9}}
STEP_OPTIM = "sgd_momentum"  # the training step's optimizer (see StepCase)
OPTIM_STATED, LOSS_STATED_ROWS = 100_000_000, 65536
OPTIM_GRID = {"smoke": ([2**16], [2**20]), "quick": ([2**22], [OPTIM_STATED]),
              "full": ([2**22, OPTIM_STATED], [2**20, 2**24, OPTIM_STATED])}  # tier -> (CPU, GPU)
LOSS_GRID = {  # tier -> ((CPU rows, classes), (GPU rows, classes))
    "smoke": ((256, [10, 100]), (4096, [10, 1000])), "quick": ((4096, [10, 1000]), (65536, [10, 1024, 32768])),
    "full": ((65536, [10, 100, 1000, 10000]), (65536, [10, 100, 1000, 4096, 10000, 32768])),
}
ALLREDUCE = {"smoke": ([2**16], 5), "quick": ([2**20, 2**24], 20), "full": ([2**16, 2**20, 2**24, 2**26], 50)}
X_LABELS = {"N": "batch N", "C": "classes C", "P": "parameters"}
_BLOCK = 16_777_259  # a prime just above 2^24


def fill(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> np.ndarray:
    """Standard normals times ``scale``; past 2^24 elements one block of prime length repeats (10^9 fresh draws
    would outlast the benchmark; the gate checks the first rows, all fresh)."""
    n, dt = math.prod(shape), np.dtype(dtype)
    out = rng.standard_normal(min(n, _BLOCK), dtype=dt)
    out = np.resize(out, n) if n > _BLOCK else out
    return (out * dt.type(scale) if scale != 1.0 else out).reshape(shape)


def fmt_count(v: int) -> str:
    if v >= 10**6 and v % 10**6 == 0:
        return f"{v // 10**6}M"
    return f"2^{v.bit_length() - 1}" if v >= 2**16 and v & (v - 1) == 0 else str(v)


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """One unit in the last place of ``values`` stored in ``dtype``: what a stored parameter cannot avoid."""
    return np.spacing(np.abs(values).astype(dtype)).astype(np.float64)


def spec_update(which: str, p0: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The first update of gpubp's optimizer ``which`` (HYPER) run in float64 on the NumPy reference backend."""
    from gpubp.parameter import Arena

    arena = Arena(p0.size, np.float64)
    p = arena.carve("p", p0.shape)
    arena.data[:], arena.grad[:] = p0, g
    (gp.optim.Adam if which == "adam" else gp.optim.SGD)([p], **HYPER[which]).step()
    return arena.data.copy()


@dataclass
class Gate:
    ok: bool
    max_err: float  # worst accuracy.rel_err over the compared arrays
    worst: str
    tol: float
    message: str = ""
    size: str = ""  # the size checked: a reduced batch when the reference would cost too much
    reduced: bool = False


def compare(result: dict[str, Any], expected: dict[str, Any], tol: float, slack: dict | None = None) -> Gate:
    """Every array of ``expected`` against the same key of ``result``; ``slack``: absolute allowances."""
    worst, where = 0.0, ""
    for key, want in expected.items():
        try:
            err = rel_err(result[key], want, (slack or {}).get(key))
        except KeyError:
            return Gate(False, math.inf, key, tol, f"no {key!r} in the result")
        except ValueError as e:
            return Gate(False, math.inf, key, tol, f"{key}: {e}")
        if not err <= worst:  # also takes the first inf
            worst, where = err, key
    ok = worst <= tol
    return Gate(ok, worst, where, tol, "" if ok else f"wrong result (max err {worst:.3g} in {where!r} > tol {tol:g})")


def chain(acts: list[Activation], ws: list, bs: list, x: np.ndarray, dout: Any, u: float, need_dx: bool) -> dict:
    """Forward and backward of dense layers in float64 (numpy_ref), with the worst-case effect of the
    pre-activations that rounding may put on either side of a kink (accuracy.near_kink): ``hs`` (inputs, output
    last), ``grads`` [(dW, db)], ``dx``, ``slack`` [(s_dW, s_db)] and ``s_dx`` (None: none). ``dout`` is the
    output gradient, or a function of the output giving (value, gradient)."""
    hs, saved, amb = [x], [], []
    for act, w, b in zip(acts, ws, bs, strict=True):
        a, sv = numpy_ref.dense_forward(hs[-1], w, b, act, True)
        z = (sv[1] if act.saves == "z" else hs[-1] @ w + b) if kinks(act)[1] else None
        amb.append(near_kink(act, z, hs[-1], w, b, u))
        saved.append(sv)
        hs.append(a)
    value, da = dout(hs[-1]) if callable(dout) else (None, dout)
    grads, slack, s_da = [], [], None
    for i in reversed(range(len(ws))):
        act, sv, want_dx = acts[i], saved[i], i > 0 or need_dx
        dw, db = np.empty_like(ws[i]), np.empty(ws[i].shape[1])
        dx = numpy_ref.dense_backward(da, sv, ws[i], act, dw, db, want_dx)
        s_dz = None
        if s_da is not None:  # allowance arriving from later layers, through |f'(z)|
            s_dz = s_da * np.abs(act.backward(np.ones_like(da), *((sv[1], None) if act.saves == "z" else (None, sv[1]))))
        if amb[i] is not None and amb[i].any():
            flip = amb[i] * (np.abs(da) + (0.0 if s_da is None else s_da)) * kinks(act)[1]
            s_dz = flip if s_dz is None else s_dz + flip
        slack.insert(0, (None, None) if s_dz is None else (np.abs(hs[i]).T @ s_dz, s_dz.sum(axis=0)))
        s_da = s_dz @ np.abs(ws[i]).T if (s_dz is not None and want_dx) else None
        grads.insert(0, (dw, db))
        da = dx
    return {"hs": hs, "value": value, "grads": grads, "dx": da, "slack": slack, "s_dx": s_da}


class Work(NamedTuple):  # one step: FLOPs (None: not counted), compulsory bytes, items (samples, parameters, rows)
    flops: float | None
    bytes: float
    items: float


class Case:
    """One row of the table of cases: what a kind runs is in its subclass (grid, work, inputs, reference,
    compare); how each contender runs it is in contenders.OPS, under the same ``kind``."""

    name = group = kind = title = unit = ""
    x_key = "N"  # the size key plotted on the x axis; the others name the line
    batched: tuple[str, ...] = ()  # inputs with N rows: cut for a reduced gate, rotated between repeats
    gate_floor = 64

    def __init__(self, dtype: str = "float32") -> None:
        self.dtype, self.itemsize = np.dtype(dtype).name, np.dtype(dtype).itemsize

    def label(self, size: dict[str, int]) -> str:
        return " ".join(f"{k}={fmt_count(v)}" for k, v in size.items())

    def plot_key(self, size: dict[str, int]) -> tuple[str, float, str]:
        return " ".join(f"{k}={v}" for k, v in size.items() if k != self.x_key), size[self.x_key], X_LABELS[self.x_key]

    def throughput(self, size: dict[str, int], seconds: float) -> float:
        w = self.work(size)
        return {"GFLOP/s": (w.flops or 0) / 1e9, "GB/s": w.bytes / 1e9}.get(self.unit, w.items) / seconds

    def restrict(self, inputs: dict[str, np.ndarray], gsize: dict[str, int]) -> dict[str, np.ndarray]:
        return {k: (v[: gsize["N"]] if k in self.batched else v) for k, v in inputs.items()}

    def gate_size(self, size: dict[str, int], budget_flops: float) -> dict[str, int]:
        """The largest power-of-two batch (at least ``gate_floor``) whose reference costs at most the budget."""
        n, (budget, per_row) = size.get("N", 0), ((budget_flops, (self.work(size).flops or 0) / max(size.get(
            "N", 1), 1)) if self.kind != "loss" else (float(1 << 24), size["C"]))  # loss: under 2^24 elements
        if not self.batched or n * per_row <= budget:
            return size
        return {**size, "N": min(n, max(1 << max(int(math.log2(max(budget / per_row, 1.0))), 0), self.gate_floor))}

    def compare(self, result: dict[str, Any], expected: dict[str, Any], tol: float) -> Gate:
        return compare(result, {k: v for k, v in expected.items() if k != "slack"}, tol, expected.get("slack"))

    def _note(self, what: str, stated: int, sizes: list[int], target: str) -> str:
        return "" if stated in sizes else (f"reduced: {what} {', '.join(map(fmt_count, sizes))} instead of "
                                           f"the stated {fmt_count(stated)} ({target} grid)")


class LayerCase(Case):
    kind, unit = "layer", "GFLOP/s"

    def __init__(self, mode: str, activation: str, dtype: str = "float32") -> None:
        super().__init__(dtype)
        if mode not in ("fwd", "fwd_bwd"):
            raise ValueError(f"mode: expected 'fwd' or 'fwd_bwd', got {mode!r}")
        self.mode, self.activation = mode, Activation(activation)
        self.group, self.batched = f"dense_{mode}", ("x",) if mode == "fwd" else ("x", "da")
        self.name = f"{self.group}:{self.activation.name}"
        self.title = f"dense layer {'forward' if mode == 'fwd' else 'forward+backward'}, {activation}, {self.dtype}"

    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        widths, batches = LAYER_GRID[(tier, target)]
        return [{"N": n, "W": w} for w in widths for n in batches], ""

    def work(self, size: dict[str, int]) -> Work:
        n, w, s = size["N"], size["W"], self.itemsize
        if self.mode == "fwd":
            return Work(2.0 * n * w * w, s * (2.0 * n * w + w * w + w), n)
        return Work(6.0 * n * w * w, s * (7.0 * n * w + 3.0 * w * w + 2.0 * w), n)

    def inputs(self, size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        x, da = _layer_data(size["N"], size["W"], self.dtype, seed)
        rng = np.random.default_rng([seed, size["W"], self.activation.id, 2])
        w = gp.Dense(size["W"], size["W"], self.activation).initial_weight(rng).astype(self.dtype)
        out = {"x": x, "w": w, "b": (0.1 * rng.standard_normal(size["W"])).astype(self.dtype)}
        return out | ({"da": da} if self.mode == "fwd_bwd" else {})

    def reference(self, inputs: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, Any]:
        x, w, b = _f64(inputs["x"]), _f64(inputs["w"]), _f64(inputs["b"])
        if self.mode == "fwd":
            return {"a": numpy_ref.dense_forward(x, w, b, self.activation, False)[0]}
        c = chain([self.activation], [w], [b], x, _f64(inputs["da"]), u, True)
        [(dw, db)], [(s_dw, s_db)] = c["grads"], c["slack"]
        return {"a": c["hs"][-1], "dx": c["dx"], "dW": dw, "db": db, "slack": {"dx": c["s_dx"], "dW": s_dw, "db": s_db}}


@functools.lru_cache(maxsize=1)
def _layer_data(n: int, w: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, n, w, 1])  # x and da, shared by the activations of one size
    return fill(rng, (n, w), dtype), fill(rng, (n, w), dtype)


def model_layers(key: str) -> list[gp.Dense]:
    widths = MODELS[key][1]
    return [gp.Dense(a, b, "relu" if i < len(widths) - 2 else None) for i, (a, b) in enumerate(
        zip(widths[:-1], widths[1:], strict=True))]


@functools.lru_cache(maxsize=2)
def _initial_params(key: str, dtype: str, seed: int) -> np.ndarray:
    return np.asarray(gp.Sequential(*model_layers(key), dtype="float64", seed=seed).arena.data, dtype=dtype)


class StepCase(Case):
    """A training step with SGD momentum 0.9 (lr 0.01), not Adam: its first update is linear in the gradient,
    so the gate on the new parameters checks the gradients. Adam's first update is lr sign(g), which float32
    legitimately flips for gradients near 0; Adam is gated alone in optim:adam."""

    kind = group = "step"
    unit, batched = "samples/s", ("x", "y")

    def __init__(self, key: str, dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.key, self.name = key, f"step:{key}"
        desc, self.widths, self.stated, self.grids = MODELS[key]
        self.pairs = list(zip(self.widths[:-1], self.widths[1:], strict=True))
        self.params = sum(a * b + b for a, b in self.pairs)
        self.title = f"training step, {desc}, {self.dtype}"

    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        sizes = self.grids[tier][target == "gpu"]
        if not sizes:
            return [], (f"not run in the {tier} suite on the {target.upper()}: {self.params / 1e6:.0f}M parameters "
                        f"at batch {self.stated} is a GPU-sized step (--full runs it)")
        return [{"N": b} for b in sizes], self._note("batch", self.stated, sizes, target)

    def work(self, size: dict[str, int]) -> Work:
        n, s = size["N"], self.itemsize
        flops = sum((4.0 if i == 0 else 6.0) * n * a * b for i, (a, b) in enumerate(self.pairs))
        traffic = sum(3.0 * n * a - (n * a if i == 0 else 0) + 4.0 * n * b + 3.0 * a * b + 2.0 * b
                      for i, (a, b) in enumerate(self.pairs))
        return Work(flops, s * (traffic + 5.0 * self.params + 2.0 * n * self.widths[-1]) + 8.0 * n, n)

    def inputs(self, size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, size["N"], 3])
        return {"x": fill(rng, (size["N"], self.widths[0]), self.dtype),
                "y": rng.integers(0, self.widths[-1], size=size["N"], dtype=np.int64),
                "params": _initial_params(self.key, self.dtype, seed)}

    def param_slices(self) -> list[tuple[str, slice]]:
        """(name, slice) of each weight (in, out) and bias in the flat vector (gpubp's arena layout)."""
        out, off = [], 0
        for i, (a, b) in enumerate(self.pairs):
            out += [(f"{i}.weight", slice(off, off + a * b)), (f"{i}.bias", slice(off + a * b, off + a * b + b))]
            off += a * b + b
        return out

    def reference(self, inputs: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, Any]:
        p0, sl, x = _f64(inputs["params"]), self.param_slices(), _f64(inputs["x"])
        ws = [p0[s].reshape(a, b) for (_, s), (a, b) in zip(sl[::2], self.pairs, strict=True)]
        c = chain([layer.activation for layer in model_layers(self.key)], ws, [p0[s] for _, s in sl[1::2]], x,
                  lambda out: numpy_ref.cross_entropy(out, inputs["y"], 1.0 / x.shape[0]), u, False)
        g = np.concatenate([t for dw, db in c["grads"] for t in (dw.ravel(), db)])
        s_g = {name: s.ravel() for (name, _), s in zip(sl, [s for pair in c["slack"] for s in pair], strict=True)
               if s is not None}
        return {"loss": np.float64(c["value"]), "grads": g, "params": spec_update(STEP_OPTIM, p0, g), "params0": p0,
                "slack": s_g}

    def compare(self, result: dict[str, Any], expected: dict[str, Any], tol: float) -> Gate:
        """Loss; each parameter's gradient (with its kink allowance); each update (new - old) within one ulp plus
        lr times that allowance (the first SGD-momentum update is -lr g)."""
        missing = [k for k in ("loss", "grads", "params") if k not in result]
        if missing:
            return Gate(False, math.inf, missing[0], tol, f"no {missing[0]!r} in the result")
        got, want, slack = {"loss": result["loss"]}, {"loss": expected["loss"]}, {}
        p0, new, grads, lr = expected["params0"], _f64(result["params"]), _f64(result["grads"]), HYPER[STEP_OPTIM]["lr"]
        for name, s in self.param_slices():
            s_g = expected["slack"].get(name)
            got[f"grad {name}"], want[f"grad {name}"], slack[f"grad {name}"] = grads[s], expected["grads"][s], s_g
            got[f"update {name}"], want[f"update {name}"] = new[s] - p0[s], expected["params"][s] - p0[s]
            slack[f"update {name}"] = _ulp(expected["params"][s], self.dtype) + (0 if s_g is None else lr * s_g)
        return compare(got, want, tol, slack)


class OptimCase(Case):
    kind, group, unit, x_key = "optimizer", "optim", "GB/s", "P"
    HYPER = HYPER
    ACCESSES = {"adam": 7, "sgd_momentum": 5}  # Adam reads p g m v, writes p m v; SGD reads p g b, writes p b

    def __init__(self, which: str, dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.which, self.name = which, f"optim:{which}"
        self.title = f"optimizer step alone, {'Adam' if which == 'adam' else 'SGD, momentum 0.9'}, {self.dtype}"

    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        sizes = OPTIM_GRID[tier][target == "gpu"]
        return [{"P": n} for n in sizes], self._note("parameters", OPTIM_STATED, sizes, target)

    def work(self, size: dict[str, int]) -> Work:
        return Work(None, float(self.ACCESSES[self.which] * self.itemsize * size["P"]), size["P"])

    def inputs(self, size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, size["P"], 4])
        return {"p": fill(rng, (size["P"],), self.dtype, 0.1), "g": fill(rng, (size["P"],), self.dtype)}

    def reference(self, inputs: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, np.ndarray]:
        """The update of a sample (elements are independent): the first and last 4096 and 65536 random ones. The
        contender still updates every element."""
        n = inputs["p"].shape[0]
        idx = np.unique(np.concatenate([np.arange(min(n, 4096)), np.arange(max(n - 4096, 0), n),
                                        np.random.default_rng([n, 5]).integers(0, n, size=min(n, 65536))]))
        p0 = _f64(inputs["p"][idx])
        return {"index": idx, "p0": p0, "p": spec_update(self.which, p0, _f64(inputs["g"][idx]))}

    def compare(self, result: dict[str, Any], expected: dict[str, Any], tol: float) -> Gate:
        if "p" not in result:
            return Gate(False, math.inf, "p", tol, "no 'p' in the result")
        got, p0, ulp = _f64(np.asarray(result["p"])[expected["index"]]), expected["p0"], _ulp(expected["p"], self.dtype)
        return compare({"update": got - p0}, {"update": expected["p"] - p0}, tol, {"update": ulp})


class LossCase(Case):
    kind = group = "loss"
    name, unit, x_key, batched, gate_floor = "loss:cross_entropy", "rows/s", "C", ("logits", "y"), 16

    def __init__(self, dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.title = f"softmax cross-entropy value + gradient, {self.dtype}"
        self.formula = "bytes: logits read and gradient written once, int64 labels read; FLOPs not counted"

    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        rows, classes = LOSS_GRID[tier][target == "gpu"]
        return [{"N": rows, "C": c} for c in classes], self._note("rows", LOSS_STATED_ROWS, [rows], target)

    def work(self, size: dict[str, int]) -> Work:
        return Work(None, 2.0 * size["N"] * size["C"] * self.itemsize + 8.0 * size["N"], size["N"])

    def inputs(self, size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, size["N"], size["C"], 6])
        return {"logits": fill(rng, (size["N"], size["C"]), self.dtype, 3.0),
                "y": rng.integers(0, size["C"], size=size["N"], dtype=np.int64)}

    def reference(self, inputs: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, np.ndarray]:
        value, grad = numpy_ref.cross_entropy(_f64(inputs["logits"]), inputs["y"], 1.0 / inputs["y"].shape[0])
        return {"value": np.float64(value), "grad": grad}


class AllreduceCase(Case):
    """The all-reduce of a gradient arena of P elements and a data-parallel training step (global batch N) over
    1, 2 processes on the CPU (MPI) and 1..N GPUs where there are several (NCCL), launched with mpiexec and
    timed by gpubp.distributed.benchmark (median, p10, p90 of the slowest rank). Each median is also given
    over the same measurement's with 1 process: the scaling."""

    kind = group = name = "allreduce"
    unit, x_key = "s", "P"
    title = "all-reduce of the arena and data-parallel training step, by processes"

    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        if importlib.util.find_spec("gpubp.distributed.benchmark") is None:
            return [], "gpubp.distributed.benchmark is not in this installation"
        from gpubp.distributed.benchmark import mpiexec

        if mpiexec() is None or importlib.util.find_spec("mpi4py") is None:
            return [], "needs mpiexec and mpi4py: pip install 'gpubp[mpi]'"
        return [{"P": p} for p in ALLREDUCE[tier][0]], ""

    def measure(self, sizes: list[dict[str, int]], tier: str) -> list[dict[str, Any]]:
        """The records of gpubp.distributed.benchmark.measure, each with ``vs_1_process``."""
        from gpubp.device import cuda_status
        from gpubp.distributed.benchmark import measure

        gpus, out = cuda_status()[0], []
        for device, procs in [("cpu", (1, 2))] + ([("cuda", tuple(range(1, gpus + 1)))] if gpus > 1 else []):
            out += measure(procs, [s["P"] for s in sizes], device, ALLREDUCE[tier][1], dtype=self.dtype)
        one = {(r["what"], r["device"], r["size"]): r["median_s"] for r in out if r["procs"] == 1}
        return [r | {"vs_1_process": r["median_s"] / one[k] if one.get(k := (r["what"], r["device"], r["size"]))
                     else None} for r in out]


def select_cases(tier: str, dtype: str = "float32", patterns: Sequence[str] | None = None) -> list[Case]:
    """The tier's cases, or those matching ``patterns``: names (``dense_fwd:silu``), groups (``step``) or globs
    (``dense_*:relu``). Groups and the default take the tier's activations (and allreduce with --full only)."""
    cases = [LayerCase(m, a, dtype) for m in ("fwd", "fwd_bwd") for a in ACTIVATIONS] + [
        StepCase(k, dtype) for k in MODELS] + [OptimCase(w, dtype) for w in HYPER] + [LossCase(dtype),
                                                                                     AllreduceCase(dtype)]
    in_tier = [c for c in cases if (c.activation.name in TIER_ACTIVATIONS[tier] if isinstance(c, LayerCase) else
                                    tier == "full" or c.kind != "allreduce")]
    if not patterns:
        return in_tier
    hits = {p: [c for c in cases if c.name == p or fnmatch.fnmatch(c.name, p) or (c.group == p and c in in_tier)]
            for p in patterns}
    unmatched = [p for p, h in hits.items() if not h]
    if unmatched:
        raise ValueError(f"--cases: no case matches {', '.join(map(repr, unmatched))}; groups are "
                         f"{', '.join(GROUPS)} (gpubp bench --list shows every case)")
    return [c for c in cases if any(c in h for h in hits.values())]
