"""The benchmark cases (what is computed, at which sizes) and the contenders (who computes it).

Cases, each with its work in FLOPs and bytes and a float64 reference from
``gpubp.backends.numpy_ref`` (the spec):

    dense_fwd:<act>       one Dense(W, W) layer, a = f(x @ W + b), inference; 2 N W^2 FLOPs
    dense_fwd_bwd:<act>   forward (keeping what backward needs) + backward with dx; 6 N W^2 FLOPs
    step:mnist_mlp        a training step of 784-1024-1024-10 at batch 4096
    step:deep_narrow      8 hidden layers of 64 (64 in, 10 out) at batch 2^18
    step:wide             4 hidden layers of 4096 (4096 in, 10 out) at batch 8192
    optim:adam            one Adam step over 100M parameters
    optim:sgd_momentum    one SGD step with momentum 0.9 over 100M parameters
    loss:cross_entropy    softmax cross-entropy value + gradient, 65536 rows x 10..32768 classes

Sizes come in grids per tier (smoke, quick, full) and target (the GPU grid when a
GPU contender can run, else the CPU grid, which is scaled down and says so).

Contenders, all at the same shapes and dtype:

    gpubp           gpubp.Sequential(device="cuda"): the fused kernels
    gpubp-unfused   the same with dense_impl="unfused": cupy.matmul + separate kernels
    torch-cuda      PyTorch eager on the GPU
    torch-compile   torch.compile(dynamic=True) on the GPU (--compile or --full)
    numpy           gpubp.Sequential(device="cpu"): gpubp's NumPy reference path
    torch-cpu       PyTorch eager on the CPU

A contender's ``setup(case, size, inputs, copies)`` returns a :class:`Prepared`:
``step(i)`` runs one call (rotating over ``copies`` input buffers), ``result()``
returns host arrays for the correctness gate, ``close()`` frees what it holds.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import gpubp as gp
from gpubp.activations import NAMES as ACTIVATIONS
from gpubp.activations import Activation
from gpubp.bench import harness

# --- the one place that knows how gpubp picks its dense implementation ------------------------
# Sequential(..., dense_impl=...) selects the fused CUDA C kernels ("fused") or the unfused path
# (cupy.matmul + separate activation / bias kernels). Adapt here if that keyword changes.
GPUBP_IMPLS: dict[str, dict[str, Any]] = {"fused": {"dense_impl": "fused"}, "unfused": {"dense_impl": "unfused"}}

GROUPS = ("dense_fwd", "dense_fwd_bwd", "step", "optim", "loss")

# Activations per tier when no --cases pattern names them.
TIER_ACTIVATIONS = {"smoke": ("relu",), "quick": ("relu", "gelu"), "full": ACTIVATIONS}

# (tier, target) -> (widths, batches) of the dense-layer grid (in = out = width).
LAYER_GRID: dict[tuple[str, str], tuple[list[int], list[int]]] = {
    ("smoke", "cpu"): ([32, 64], [64, 256]),
    ("smoke", "gpu"): ([64, 1024], [256, 4096]),
    ("quick", "cpu"): ([64, 256], [256, 1024]),
    ("quick", "gpu"): ([64, 512, 4096], [1024, 65536]),
    ("full", "cpu"): ([64, 256, 1024, 4096], [256, 1024, 4096, 16384]),
    ("full", "gpu"): ([64, 128, 256, 512, 1024, 2048, 4096], [256, 1024, 4096, 16384, 65536]),
}

# The training-step models: layer widths (input first), hidden activation relu, identity output,
# cross-entropy over 10 classes, SGD with momentum; and the batch the benchmark is stated at.
MODELS: dict[str, tuple[str, list[int], int]] = {
    "mnist_mlp": ("MNIST-sized MLP 784-1024-1024-10", [784, 1024, 1024, 10], 4096),
    "deep_narrow": ("deep narrow MLP, 8 hidden layers of 64 (64 in, 10 out)", [64] * 9 + [10], 2**18),
    "wide": ("wide MLP, 4 hidden layers of 4096 (4096 in, 10 out)", [4096] * 5 + [10], 8192),
}
SKIP = "skip"
STEP_GRID: dict[str, dict[tuple[str, str], Any]] = {
    "mnist_mlp": {
        ("smoke", "cpu"): [64], ("smoke", "gpu"): [256],
        ("quick", "cpu"): [256], ("quick", "gpu"): [4096],
        ("full", "cpu"): [512, 4096], ("full", "gpu"): [1024, 4096, 16384],
    },
    "deep_narrow": {
        ("smoke", "cpu"): [256], ("smoke", "gpu"): [4096],
        ("quick", "cpu"): [2048], ("quick", "gpu"): [2**18],
        ("full", "cpu"): [4096, 2**18], ("full", "gpu"): [2**14, 2**16, 2**18, 2**20],
    },
    "wide": {
        ("smoke", "cpu"): SKIP, ("smoke", "gpu"): SKIP,
        ("quick", "cpu"): SKIP, ("quick", "gpu"): [8192],
        ("full", "cpu"): [256], ("full", "gpu"): [2048, 8192, 32768],
    },
}
STEP_LR, STEP_MOMENTUM = 0.01, 0.9

OPTIM_STATED = 100_000_000
OPTIM_GRID: dict[tuple[str, str], list[int]] = {
    ("smoke", "cpu"): [2**16], ("smoke", "gpu"): [2**20],
    ("quick", "cpu"): [2**22], ("quick", "gpu"): [OPTIM_STATED],
    ("full", "cpu"): [2**22, OPTIM_STATED], ("full", "gpu"): [2**20, 2**24, OPTIM_STATED],
}

LOSS_STATED_ROWS = 65536
LOSS_GRID: dict[tuple[str, str], tuple[int, list[int]]] = {
    ("smoke", "cpu"): (256, [10, 100]), ("smoke", "gpu"): (4096, [10, 1000]),
    ("quick", "cpu"): (4096, [10, 1000]), ("quick", "gpu"): (LOSS_STATED_ROWS, [10, 1024, 32768]),
    ("full", "cpu"): (LOSS_STATED_ROWS, [10, 100, 1000, 10000]),
    ("full", "gpu"): (LOSS_STATED_ROWS, [10, 100, 1000, 4096, 10000, 32768]),
}


# --- inputs ----------------------------------------------------------------------------------

_BLOCK = 16_777_259  # a prime just above 2^24: tiled blocks never line up with rows


def fill(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> np.ndarray:
    """Standard normal values of ``dtype`` times ``scale``.

    Arrays of more than 2^24 elements repeat one random block of a prime length
    (so no two rows are equal): drawing 10^9 normals would take longer than the
    benchmark, and the values do not change the work of these kernels. The
    correctness gate runs on the first rows, which are all fresh draws.
    """
    dt = np.dtype(dtype)
    n = math.prod(shape)
    if n <= _BLOCK:
        out = rng.standard_normal(n, dtype=dt)
    else:
        out = np.resize(rng.standard_normal(_BLOCK, dtype=dt), n)
    if scale != 1.0:
        out *= dt.type(scale)
    return out.reshape(shape)


@functools.lru_cache(maxsize=1)
def _layer_data(n: int, w: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x and da (N, W), shared by the activations of one size (the runner visits them together)."""
    rng = np.random.default_rng([seed, n, w, 1])
    return fill(rng, (n, w), dtype), fill(rng, (n, w), dtype)


@functools.lru_cache(maxsize=2)
def _initial_params(key: str, dtype: str, seed: int) -> np.ndarray:
    """The flat parameters of a model as gpubp initialises them (seeded), rounded to ``dtype``."""
    model = gp.Sequential(*_model_layers(key), dtype="float64", seed=seed)
    return np.asarray(model.arena.data, dtype=dtype)


def _model_layers(key: str) -> list[gp.Dense]:
    widths = MODELS[key][1]
    last = len(widths) - 2
    return [gp.Dense(widths[i], widths[i + 1], "relu" if i < last else None) for i in range(len(widths) - 1)]


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """One unit in the last place of ``values`` stored in ``dtype``: the rounding a stored parameter cannot avoid."""
    return np.spacing(np.abs(values).astype(dtype)).astype(np.float64)


# --- the float64 reference of a dense chain, with slack at activation kinks ---------------------
#
# ReLU-like activations have a derivative that jumps at a kink (relu, leaky_relu: at 0). Where a
# pre-activation z lies within rounding distance of the kink, float32 (or TF32) may put it on the
# other side than float64 does, and then dz differs by |da| * jump there: a correct result that a
# plain tolerance would refuse (seen: z = -1.1e-8 in float64, +1.6e-7 in float32). The reference
# therefore marks such z (|z - kink| <= KINK_C * u * (|h| @ |W| + |b|), u the unit roundoff) and
# carries the worst-case effect of flipping them through backward as an absolute slack on dW, db
# and dx. The radius is far above the rounding any summation order gives (that is ~u sqrt(K) times
# the terms), and far below typical |z|: ambiguous z are rare (~1e-6 of them in float32), and
# everywhere else the gate keeps its full tolerance.
KINK_C = 16.0


def kinks(act: Activation) -> tuple[tuple[float, ...], float]:
    """Where f' jumps, and by how much; ((), 0) when f' is continuous.

    softplus switches to the identity at beta z = threshold, where f' jumps by
    1 - sigmoid(threshold) (2e-9 at the default 20): below any tolerance, ignored.
    """
    p = act.params
    if act.name == "relu":
        return (0.0,), 1.0
    if act.name == "leaky_relu" and p["slope"] != 1.0:
        return (0.0,), abs(1.0 - p["slope"])
    if act.name == "elu" and p["alpha"] != 1.0:
        return (0.0,), abs(1.0 - p["alpha"])
    return (), 0.0


def unit_roundoff(dtype: str, tf32: bool) -> float:
    """u of the arithmetic a contender may use: 2^-24 float32, 2^-11 TF32 (10-bit mantissa), 2^-53 float64."""
    if dtype == "float64":
        return 2.0**-53
    return 2.0**-11 if tf32 else 2.0**-24


@dataclass
class Chain:
    """A float64 forward pass through dense layers, keeping what backward and the slack need."""

    acts: list[Activation]
    ws: list[np.ndarray]
    hs: list[np.ndarray]  # hs[l]: input of layer l; hs[-1]: the output
    saved: list[tuple]
    ambiguous: list[np.ndarray | None]  # per layer: z within rounding distance of a kink


def chain_forward(acts: list[Activation], ws: list[np.ndarray], bs: list[np.ndarray], x: np.ndarray,
                  u: float) -> Chain:
    from gpubp.backends import numpy_ref

    hs, saved, amb = [x], [], []
    for act, w, b in zip(acts, ws, bs, strict=True):
        h = hs[-1]
        a, sv = numpy_ref.dense_forward(h, w, b, act, True)
        points, jump = kinks(act)
        mask = None
        if jump:
            z = sv[1]  # the ReLU family keeps z for backward
            radius = KINK_C * u * (np.abs(h) @ np.abs(w) + np.abs(b))
            mask = np.zeros(z.shape, dtype=bool)
            for k in points:
                mask |= np.abs(z - k) <= radius
        saved.append(sv)
        amb.append(mask)
        hs.append(a)
    return Chain(list(acts), list(ws), hs, saved, amb)


def chain_backward(c: Chain, dout: np.ndarray, need_dx: bool) -> tuple[list[tuple], np.ndarray | None,
                                                                       list[tuple], np.ndarray | None]:
    """Gradients [(dW, db)], dx, and their kink slack [(s_dW, s_db)], s_dx (None where zero)."""
    from gpubp.backends import numpy_ref

    grads: list[tuple] = []
    slack: list[tuple] = []
    da, s_da = dout, None
    for layer in reversed(range(len(c.ws))):
        act, w, sv, amb = c.acts[layer], c.ws[layer], c.saved[layer], c.ambiguous[layer]
        want_dx = layer > 0 or need_dx
        dw, db = np.empty_like(w), np.empty(w.shape[1])
        dx = numpy_ref.dense_backward(da, sv, w, act, dw, db, want_dx)
        s_dz = None
        if s_da is not None:  # slack arriving from later layers, through |f'(z)|
            kept = sv[1]
            fprime = act.backward(np.ones_like(da), kept if act.saves == "z" else None,
                                  kept if act.saves == "a" else None)
            s_dz = s_da * np.abs(fprime)
        if amb is not None and amb.any():
            flip = amb * (np.abs(da) + (0.0 if s_da is None else s_da)) * kinks(act)[1]
            s_dz = flip if s_dz is None else s_dz + flip
        if s_dz is not None:
            slack.append((np.abs(c.hs[layer]).T @ s_dz, s_dz.sum(axis=0)))
            s_da = s_dz @ np.abs(w).T if want_dx else None
        else:
            slack.append((None, None))
            s_da = None
        grads.append((dw, db))
        da = dx
    return grads[::-1], da, slack[::-1], s_da


# --- cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """What one step does: FLOPs (None: not FLOP-bound, not counted), compulsory bytes, and items."""

    flops: float | None
    bytes: float | None
    items: float
    item: str


class Case(ABC):
    """Base class; see the module docstring for the cases."""

    name = ""
    group = ""
    kind = ""
    title = ""
    unit = ""
    formula = ""  # how FLOPs and bytes are counted, in words
    rotate = True  # host steps may rotate over copies of their inputs

    def __init__(self, dtype: str = "float32") -> None:
        self.dtype = np.dtype(dtype).name
        self.itemsize = np.dtype(dtype).itemsize

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "kind": self.kind, "title": self.title,
                "unit": self.unit, "dtype": self.dtype, "counting": self.formula}

    @abstractmethod
    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        """See the subclasses."""

    def label(self, size: dict[str, int]) -> str:
        return " ".join(f"{k}={v}" for k, v in size.items())

    @abstractmethod
    def work(self, size: dict[str, int]) -> Work:
        """See the subclasses."""

    def throughput(self, size: dict[str, int], seconds: float) -> float:
        w = self.work(size)
        return w.items / seconds

    def input_key(self, size: dict[str, int], seed: int) -> tuple:
        return (self.name, self.label(size), seed)

    def input_bytes(self, size: dict[str, int]) -> int:
        return 0

    def restrict(self, inputs: dict[str, np.ndarray], gsize: dict[str, int]) -> dict[str, np.ndarray]:
        return inputs

    def gate_size(self, size: dict[str, int], budget_flops: float) -> dict[str, int]:
        return size

    def cpu_seconds(self, size: dict[str, int], ceilings: dict[str, Any]) -> float | None:
        """A rough time per step on the CPU from the CPU ceilings (NumPy makes ~4 passes per compulsory one)."""
        peak, bw = ceilings.get("flops"), ceilings.get("bandwidth_Bps")
        if not peak or not bw:
            return None
        w = self.work(size)
        return max((w.flops or 0) / peak, 4 * (w.bytes or 0) / bw)

    def memory(self, size: dict[str, int], device: str) -> float:
        return 0.0

    @abstractmethod
    def plot_key(self, size: dict[str, int]) -> tuple[str, float, str]:
        """(panel title, x value, x label) of this size in the plots."""


def _binary_batch(batch: int, cost_per_row: float, budget: float, floor: int) -> int:
    """The largest power of two <= batch whose reference costs at most ``budget`` (at least ``floor``)."""
    if batch * cost_per_row <= budget:
        return batch
    g = 1 << max(int(math.floor(math.log2(max(budget / cost_per_row, 1.0)))), 0)
    return min(batch, max(g, floor))


class LayerCase(Case):
    """One Dense(W, W) layer: forward (inference) or forward + backward (with dx)."""

    kind = "layer"
    unit = "GFLOP/s"

    def __init__(self, mode: str, activation: str, dtype: str = "float32") -> None:
        super().__init__(dtype)
        if mode not in ("fwd", "fwd_bwd"):
            raise ValueError(f"mode: expected 'fwd' or 'fwd_bwd', got {mode!r}")
        self.mode = mode
        self.activation = Activation(activation)
        self.group = f"dense_{mode}"
        self.name = f"{self.group}:{self.activation.name}"
        what = "forward" if mode == "fwd" else "forward+backward"
        self.title = f"dense layer {what}, {self.activation.name}, {self.dtype}"
        if mode == "fwd":
            self.formula = ("2 N W^2 FLOPs; bytes: x, W, b read and a written once "
                            "(inference: nothing kept for backward)")
        else:
            self.formula = ("6 N W^2 FLOPs (z, dW, dx); bytes: x, W, b read, a and the saved tensor written "
                            "by forward; da, saved tensor, x, W read and dx, dW, db written by backward")

    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        widths, batches = LAYER_GRID[(tier, target)]
        return [{"batch": n, "width": w} for w in widths for n in batches], ""

    def label(self, size: dict[str, int]) -> str:
        return f"N={size['batch']} W={size['width']}"

    def work(self, size: dict[str, int]) -> Work:
        n, w, s = size["batch"], size["width"], self.itemsize
        if self.mode == "fwd":
            return Work(2.0 * n * w * w, s * (2.0 * n * w + w * w + w), n, "samples")
        return Work(6.0 * n * w * w, s * (3.0 * n * w + 4.0 * n * w + 3.0 * w * w + 2.0 * w), n, "samples")

    def throughput(self, size: dict[str, int], seconds: float) -> float:
        return self.work(size).flops / seconds / 1e9

    def input_key(self, size: dict[str, int], seed: int) -> tuple:
        return (self.name, size["batch"], size["width"], seed)

    def input_bytes(self, size: dict[str, int]) -> int:
        k = 1 if self.mode == "fwd" else 2
        return k * size["batch"] * size["width"] * self.itemsize

    def inputs(self, size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        n, w = size["batch"], size["width"]
        x, da = _layer_data(n, w, self.dtype, seed)
        rng = np.random.default_rng([seed, w, self.activation.id, 2])
        layer = gp.Dense(w, w, self.activation)
        weight = layer.initial_weight(rng).astype(self.dtype)
        bias = (0.1 * rng.standard_normal(w)).astype(self.dtype)
        out = {"x": x, "w": weight, "b": bias}
        if self.mode == "fwd_bwd":
            out["da"] = da
        return out

    def restrict(self, inputs: dict[str, np.ndarray], gsize: dict[str, int]) -> dict[str, np.ndarray]:
        g = gsize["batch"]
        return {k: (v[:g] if k in ("x", "da") else v) for k, v in inputs.items()}

    def gate_size(self, size: dict[str, int], budget_flops: float) -> dict[str, int]:
        per_row = self.work({"batch": 1, "width": size["width"]}).flops
        return {"batch": _binary_batch(size["batch"], per_row, budget_flops, 64), "width": size["width"]}

    def reference(self, inputs: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, Any]:
        from gpubp.backends import numpy_ref

        x, w, b = _f64(inputs["x"]), _f64(inputs["w"]), _f64(inputs["b"])
        if self.mode == "fwd":
            return {"a": numpy_ref.dense_forward(x, w, b, self.activation, False)[0]}
        chain = chain_forward([self.activation], [w], [b], x, u)
        [(dw, db)], dx, [(s_dw, s_db)], s_dx = chain_backward(chain, _f64(inputs["da"]), True)
        return {"a": chain.hs[-1], "dx": dx, "dW": dw, "db": db,
                "slack": {"dx": s_dx, "dW": s_dw, "db": s_db}}

    def compare(self, result: dict[str, Any], expected: dict[str, Any], tol: float) -> harness.Gate:
        want = {k: v for k, v in expected.items() if k != "slack"}
        return harness.compare(result, want, tol, expected.get("slack"))

    def memory(self, size: dict[str, int], device: str) -> float:
        n, w = size["batch"], size["width"]
        return self.itemsize * (5.0 * n * w + 2.0 * w * w) * 1.5  # x, a, z, da, dx; W, dW; +50%

    def plot_key(self, size: dict[str, int]) -> tuple[str, float, str]:
        return f"W={size['width']}", size["batch"], "batch N"


class StepCase(Case):
    """A whole training step: forward, cross-entropy value + gradient, backward, SGD-momentum update.

    SGD with momentum 0.9 (lr 0.01), not Adam: its first update is linear in the
    gradient, so the gate on the new parameters checks the gradients themselves.
    Adam's first update is lr * sign(g), which float32 rounding legitimately flips
    for gradients near 0; the Adam update is checked and timed alone in optim:adam.
    """

    kind = "step"
    group = "step"
    unit = "samples/s"

    def __init__(self, key: str, dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.key = key
        self.name = f"step:{key}"
        desc, self.widths, self.stated = MODELS[key]
        self.title = f"training step, {desc}, {self.dtype}"
        self.formula = (
            "FLOPs: 2 N in out per layer forward, 2 N in out for dW, 2 N in out for dx (not for the first "
            "layer); bytes: each layer's x, W, b, a, saved z, da, dx, dW, db once, 5 accesses per parameter "
            "for SGD momentum, the logits read and their gradient written"
        )

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.widths[:-1], self.widths[1:], strict=True))

    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        sizes = STEP_GRID[self.key][(tier, target)]
        params = sum(i * o + o for i, o in self.pairs)
        if sizes == SKIP:
            return [], (f"not run in the {tier} suite on the {target.upper()}: {params / 1e6:.0f}M parameters "
                        f"at batch {self.stated} is a GPU-sized step ({'--full runs it' if tier != 'full' else ''})")
        note = ""
        if self.stated not in sizes:
            note = f"reduced: batch {', '.join(map(str, sizes))} instead of the stated {self.stated} ({target} grid)"
        return [{"batch": b} for b in sizes], note

    def label(self, size: dict[str, int]) -> str:
        return f"N={size['batch']}"

    def work(self, size: dict[str, int]) -> Work:
        n, s = size["batch"], self.itemsize
        flops = sum((4.0 if i == 0 else 6.0) * n * a * b for i, (a, b) in enumerate(self.pairs))
        params = sum(a * b + b for a, b in self.pairs)
        traffic = 0.0
        for i, (a, b) in enumerate(self.pairs):
            traffic += 3.0 * n * a - (n * a if i == 0 else 0) + 4.0 * n * b + 3.0 * a * b + 2.0 * b
        traffic += 5.0 * params + 2.0 * n * self.widths[-1]
        return Work(flops, s * traffic + 8.0 * n, n, "samples")

    def input_key(self, size: dict[str, int], seed: int) -> tuple:
        return (self.name, size["batch"], seed)

    def input_bytes(self, size: dict[str, int]) -> int:
        return size["batch"] * (self.widths[0] * self.itemsize + 8)

    def inputs(self, size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        n = size["batch"]
        rng = np.random.default_rng([seed, n, 3])
        x = fill(rng, (n, self.widths[0]), self.dtype)
        y = rng.integers(0, self.widths[-1], size=n, dtype=np.int64)
        return {"x": x, "y": y, "params": _initial_params(self.key, self.dtype, seed)}

    def restrict(self, inputs: dict[str, np.ndarray], gsize: dict[str, int]) -> dict[str, np.ndarray]:
        g = gsize["batch"]
        return {"x": inputs["x"][:g], "y": inputs["y"][:g], "params": inputs["params"]}

    def gate_size(self, size: dict[str, int], budget_flops: float) -> dict[str, int]:
        per_row = self.work({"batch": 1}).flops
        return {"batch": _binary_batch(size["batch"], per_row, budget_flops, 64)}

    def param_slices(self) -> list[tuple[str, slice]]:
        out, off = [], 0
        for i, (a, b) in enumerate(self.pairs):
            out.append((f"{i}.weight", slice(off, off + a * b)))
            out.append((f"{i}.bias", slice(off + a * b, off + a * b + b)))
            off += a * b + b
        return out

    def unpack(self, flat: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Weights (in, out) and biases of the flat parameter vector (gpubp's arena layout)."""
        sl = self.param_slices()
        ws = [flat[s].reshape(a, b) for (_, s), (a, b) in zip(sl[::2], self.pairs, strict=True)]
        return ws, [flat[s] for _, s in sl[1::2]]

    def reference(self, inputs: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, Any]:
        """One step in float64 with gpubp's reference maths: numpy_ref dense pairs and loss, numpy_optim SGD."""
        from gpubp.backends import numpy_optim, numpy_ref

        p0 = _f64(inputs["params"])
        ws, bs = self.unpack(p0)
        acts = [layer.activation for layer in _model_layers(self.key)]
        x = _f64(inputs["x"])
        chain = chain_forward(acts, ws, bs, x, u)
        value, dout = numpy_ref.cross_entropy(chain.hs[-1], inputs["y"], 1.0 / x.shape[0])
        grads, _, slack, _ = chain_backward(chain, dout, False)
        g = np.concatenate([t for dw, db in grads for t in (dw.ravel(), db)])
        p = p0.copy()
        numpy_optim.sgd_update(p, g, np.zeros_like(p), lr=STEP_LR, momentum=STEP_MOMENTUM, dampening=0.0,
                               nesterov=False, weight_decay=0.0, first_step=True)
        s_g = {}
        for (name, _), s_arr in zip(self.param_slices(), [t for pair in slack for t in pair], strict=True):
            if s_arr is not None:
                s_g[name] = s_arr.ravel()
        return {"loss": np.float64(value), "grads": g, "params": p, "params0": p0, "slack": s_g}

    def compare(self, result: dict[str, Any], expected: dict[str, Any], tol: float) -> harness.Gate:
        """Loss value; each parameter's gradient; each parameter's update (new - old), within one ulp.

        Kink slack (see :func:`chain_backward`) widens the gradient check, and lr times it the update
        check (the first SGD-momentum update is -lr * g).
        """
        missing = [k for k in ("loss", "grads", "params") if k not in result]
        if missing:
            return harness.Gate(False, math.inf, missing[0], tol, f"no {missing[0]!r} in the result")
        got: dict[str, Any] = {"loss": result["loss"]}
        want: dict[str, Any] = {"loss": expected["loss"]}
        slack: dict[str, Any] = {}
        p0 = expected["params0"]
        for name, sl in self.param_slices():
            s_g = expected["slack"].get(name)
            got[f"grad {name}"] = _f64(result["grads"])[sl]
            want[f"grad {name}"] = expected["grads"][sl]
            slack[f"grad {name}"] = s_g
            got[f"update {name}"] = _f64(result["params"])[sl] - p0[sl]
            want[f"update {name}"] = expected["params"][sl] - p0[sl]
            slack[f"update {name}"] = _ulp(expected["params"][sl], self.dtype) + (0.0 if s_g is None else STEP_LR * s_g)
        return harness.compare(got, want, tol, slack)

    def memory(self, size: dict[str, int], device: str) -> float:
        params = sum(a * b + b for a, b in self.pairs)
        acts = size["batch"] * sum(self.widths)
        return self.itemsize * (4.0 * params + 4.0 * acts) * 1.5

    def plot_key(self, size: dict[str, int]) -> tuple[str, float, str]:
        return "", size["batch"], "batch N"


class OptimCase(Case):
    """One optimizer step over one flat parameter array: Adam, or SGD with momentum 0.9."""

    kind = "optimizer"
    group = "optim"
    unit = "GB/s"
    rotate = False

    HYPER = {"adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}, "sgd_momentum": {"lr": 0.01, "momentum": 0.9}}
    ACCESSES = {"adam": 7, "sgd_momentum": 5}  # per parameter: Adam reads p g m v, writes p m v; SGD reads p g b, writes p b

    def __init__(self, which: str, dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.which = which
        self.name = f"optim:{which}"
        label = "Adam" if which == "adam" else "SGD, momentum 0.9"
        self.title = f"optimizer step alone, {label}, {self.dtype}"
        reads = "p, g, m, v read; p, m, v written" if which == "adam" else "p, g, buffer read; p, buffer written"
        self.formula = f"{self.ACCESSES[which]} x {self.itemsize} bytes per parameter ({reads}); FLOPs not counted"

    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        sizes = OPTIM_GRID[(tier, target)]
        note = ""
        if OPTIM_STATED not in sizes:
            note = f"reduced: {', '.join(f'{n:,}' for n in sizes)} parameters instead of the stated 100M ({target} grid)"
        return [{"params": n} for n in sizes], note

    def label(self, size: dict[str, int]) -> str:
        n = size["params"]
        return f"P={n // 10**6}M" if n % 10**6 == 0 else f"P=2^{int(math.log2(n))}" if n & (n - 1) == 0 else f"P={n}"

    def work(self, size: dict[str, int]) -> Work:
        n = size["params"]
        return Work(None, float(self.ACCESSES[self.which] * self.itemsize * n), n, "parameters")

    def throughput(self, size: dict[str, int], seconds: float) -> float:
        return self.work(size).bytes / seconds / 1e9

    def input_bytes(self, size: dict[str, int]) -> int:
        return 2 * size["params"] * self.itemsize

    def inputs(self, size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        n = size["params"]
        rng = np.random.default_rng([seed, n, 4])
        return {"p": fill(rng, (n,), self.dtype, 0.1), "g": fill(rng, (n,), self.dtype)}

    def reference(self, inputs: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, np.ndarray]:
        """The update in float64 on a sample of indices (every element is independent): the first and
        last 4096 and 65536 random ones. The contender still updates all of them."""
        from gpubp.backends import numpy_optim

        n = inputs["p"].shape[0]
        rng = np.random.default_rng([n, 5])
        idx = np.unique(np.concatenate([np.arange(min(n, 4096)), np.arange(max(n - 4096, 0), n),
                                        rng.integers(0, n, size=min(n, 65536))]))
        p0, g = _f64(inputs["p"][idx]), _f64(inputs["g"][idx])
        p = p0.copy()
        h = self.HYPER[self.which]
        if self.which == "adam":
            m, v = np.zeros_like(p), np.zeros_like(p)
            numpy_optim.adam_update(p, g, m, v, None, lr=h["lr"], beta1=h["betas"][0], beta2=h["betas"][1],
                                    eps=h["eps"], weight_decay=0.0, decoupled=False, step=1, amsgrad=False)
        else:
            buf = np.zeros_like(p)
            numpy_optim.sgd_update(p, g, buf, lr=h["lr"], momentum=h["momentum"], dampening=0.0, nesterov=False,
                                   weight_decay=0.0, first_step=True)
        return {"index": idx, "p0": p0, "p": p}

    def compare(self, result: dict[str, Any], expected: dict[str, Any], tol: float) -> harness.Gate:
        if "p" not in result:
            return harness.Gate(False, math.inf, "p", tol, "no 'p' in the result")
        idx, p0 = expected["index"], expected["p0"]
        got = {"update": _f64(np.asarray(result["p"])[idx]) - p0}
        want = {"update": expected["p"] - p0}
        return harness.compare(got, want, tol, {"update": _ulp(expected["p"], self.dtype)})

    def cpu_seconds(self, size: dict[str, int], ceilings: dict[str, Any]) -> float | None:
        # NumPy's Adam makes ~12 passes with temporaries where a fused kernel makes one: ~8x the bytes
        bw = ceilings.get("bandwidth_Bps")
        return 8 * self.work(size).bytes / bw if bw else None

    def memory(self, size: dict[str, int], device: str) -> float:
        return self.itemsize * size["params"] * (8.0 if device == "cpu" else 5.0)

    def plot_key(self, size: dict[str, int]) -> tuple[str, float, str]:
        return "", size["params"], "parameters"


class LossCase(Case):
    """Softmax cross-entropy over logits (N, C) with integer labels: mean value and gradient."""

    kind = "loss"
    group = "loss"
    name = "loss:cross_entropy"
    unit = "rows/s"

    def __init__(self, dtype: str = "float32") -> None:
        super().__init__(dtype)
        self.title = f"softmax cross-entropy value + gradient, {self.dtype}"
        self.formula = "bytes: logits read and gradient written once, int64 labels read; FLOPs not counted"

    def grid(self, tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        rows, classes = LOSS_GRID[(tier, target)]
        note = "" if rows == LOSS_STATED_ROWS else f"reduced: {rows} rows instead of the stated {LOSS_STATED_ROWS} ({target} grid)"
        return [{"rows": rows, "classes": c} for c in classes], note

    def label(self, size: dict[str, int]) -> str:
        return f"N={size['rows']} C={size['classes']}"

    def work(self, size: dict[str, int]) -> Work:
        n, c = size["rows"], size["classes"]
        return Work(None, 2.0 * n * c * self.itemsize + 8.0 * n, n, "rows")

    def input_bytes(self, size: dict[str, int]) -> int:
        return size["rows"] * (size["classes"] * self.itemsize + 8)

    def inputs(self, size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        n, c = size["rows"], size["classes"]
        rng = np.random.default_rng([seed, n, c, 6])
        return {"logits": fill(rng, (n, c), self.dtype, 3.0), "y": rng.integers(0, c, size=n, dtype=np.int64)}

    def restrict(self, inputs: dict[str, np.ndarray], gsize: dict[str, int]) -> dict[str, np.ndarray]:
        g = gsize["rows"]
        return {"logits": inputs["logits"][:g], "y": inputs["y"][:g]}

    def gate_size(self, size: dict[str, int], budget_flops: float) -> dict[str, int]:
        # rows are independent; keep the float64 reference under 2^24 elements (128 MiB per array)
        g = _binary_batch(size["rows"], size["classes"], float(1 << 24), 16)
        return {"rows": g, "classes": size["classes"]}

    def reference(self, inputs: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, np.ndarray]:
        from gpubp.backends import numpy_ref

        logits = _f64(inputs["logits"])
        value, grad = numpy_ref.cross_entropy(logits, inputs["y"], 1.0 / logits.shape[0])
        return {"value": np.float64(value), "grad": grad}

    def compare(self, result: dict[str, Any], expected: dict[str, Any], tol: float) -> harness.Gate:
        return harness.compare(result, expected, tol)

    def cpu_seconds(self, size: dict[str, int], ceilings: dict[str, Any]) -> float | None:
        # log-softmax and its gradient in NumPy: ~10 passes over (N, C) for the compulsory 2
        bw = ceilings.get("bandwidth_Bps")
        return 5 * self.work(size).bytes / bw if bw else None

    def memory(self, size: dict[str, int], device: str) -> float:
        return self.itemsize * size["rows"] * size["classes"] * (6.0 if device == "cpu" else 4.0)

    def plot_key(self, size: dict[str, int]) -> tuple[str, float, str]:
        return f"N={size['rows']}", size["classes"], "classes C"


def all_cases(dtype: str = "float32") -> list[Case]:
    out: list[Case] = []
    for mode in ("fwd", "fwd_bwd"):
        out += [LayerCase(mode, a, dtype) for a in ACTIVATIONS]
    out += [StepCase(k, dtype) for k in MODELS]
    out += [OptimCase(w, dtype) for w in ("adam", "sgd_momentum")]
    out.append(LossCase(dtype))
    return out


def select_cases(tier: str, dtype: str = "float32", patterns: Sequence[str] | None = None) -> list[Case]:
    """The tier's default cases, or those matching ``patterns``.

    A pattern is a case name (``dense_fwd:silu``), a group (``dense_fwd``, ``step``,
    ...) or a glob over names (``dense_*:relu``, ``step:*``). A group, and the
    default (no patterns), give the dense cases for the tier's activations (relu,
    gelu in the quick suite; all of them with --full); names and globs give
    exactly what they match.
    """
    cases = all_cases(dtype)
    acts = TIER_ACTIVATIONS[tier]

    def in_tier(c: Case) -> bool:
        return not isinstance(c, LayerCase) or c.activation.name in acts

    if not patterns:
        return [c for c in cases if in_tier(c)]
    chosen, unmatched = [], []
    for p in patterns:
        hits = [c for c in cases if c.name == p or fnmatch.fnmatch(c.name, p) or (c.group == p and in_tier(c))]
        if not hits:
            unmatched.append(p)
        chosen += [c for c in hits if c not in chosen]
    if unmatched:
        names = ", ".join(GROUPS)
        raise ValueError(f"--cases: no case matches {', '.join(map(repr, unmatched))}; groups are {names} "
                         "(gpubp bench --list shows every case)")
    order = {c.name: i for i, c in enumerate(cases)}
    return sorted(chosen, key=lambda c: order[c.name])


# --- contenders ------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A contender set up for one case and size."""

    step: Callable[[int], Any]
    result: Callable[[], dict[str, Any]]
    close: Callable[[], None] = lambda: None


def to_host(a: Any) -> np.ndarray:
    """A host copy of a NumPy, CuPy or PyTorch array (or a Python number)."""
    if type(a).__module__.split(".")[0] == "torch":
        return np.array(a.detach().cpu().numpy(), copy=True)
    if hasattr(a, "get") and type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.array(a, copy=True)


def _scalar(v: Any) -> np.float64:
    return np.float64(to_host(v).reshape(-1)[0])


class Contender:
    """Base class: ``name``, ``device`` ("cpu" or "cuda"), a one-line ``description``."""

    name = ""
    device = "cpu"
    description = ""
    memory_factor = 1.0  # multiplies a case's memory estimate (frameworks keep extra buffers)

    def __init__(self) -> None:
        self.usable = False
        self.broken = ""  # set after an error that makes further runs pointless

    def available(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, case: Case) -> tuple[bool, str]:
        return True, ""

    def setup(self, case: Case, size: dict[str, int], inputs: dict[str, np.ndarray], copies: int) -> Prepared:
        return getattr(self, f"setup_{case.kind}")(case, size, inputs, copies)

    def events(self) -> Any:
        """The CUDA timing events of a GPU contender (host contenders are timed with perf_counter)."""
        raise TypeError(f"{self.name}: runs on the host; it has no CUDA events")

    def release(self) -> None:
        """Give cached device memory back between runs."""

    def fatal(self, error: BaseException) -> bool:
        return False


class GpubpContender(Contender):
    """gpubp through its public API: Sequential, losses, optimizers, on the CPU (NumPy) or the GPU."""

    def __init__(self, name: str, device: str, impl: str = "fused", description: str = "") -> None:
        super().__init__()
        self.name, self.device, self.impl, self.description = name, device, impl, description
        self._be: Any = None

    def backend(self) -> Any:
        if self._be is None:
            from gpubp.backends import get_backend
            from gpubp.device import parse_device

            self._be = get_backend(parse_device("cpu" if self.device == "cpu" else "cuda"))
        return self._be

    def model(self, layers: list[gp.Dense], dtype: str) -> gp.Sequential:
        impl = GPUBP_IMPLS[self.impl] if self.device != "cpu" else {}  # the CPU has the reference only
        return gp.Sequential(*layers, device=self.device, dtype=dtype, seed=0, **impl)

    def available(self) -> tuple[bool, str]:
        if self.device == "cpu":
            return True, ""
        from gpubp.device import cuda_status

        n, why = cuda_status()
        if n == 0:
            return False, f"no GPU: {why}"
        try:
            self.model([gp.Dense(4, 4, "relu")], "float32")
        except Exception as e:
            return False, f"gpubp cannot run this on the GPU: {harness._short(e)}"
        return True, ""

    def supports(self, case: Case) -> tuple[bool, str]:
        if self.impl == "unfused" and case.kind not in ("layer", "step"):
            return False, "the unfused variant differs from gpubp only in its dense layers"
        return True, ""

    def _dev(self, a: np.ndarray, dtype: Any) -> Any:
        """``a`` on this contender's device, in a buffer of its own."""
        be = self.backend()
        return be.asarray(np.array(a, copy=True) if self.device == "cpu" else a, dtype)

    def _load(self, model: gp.Sequential, flat: np.ndarray) -> None:
        model.arena.ops.assign_(model.arena.data, np.asarray(flat, dtype=model.dtype))

    def events(self) -> Any:
        """Events on the stream gpubp's CUDA backend launches on (``backend.stream`` when it is a CuPy
        stream), else on CuPy's current stream."""
        import cupy

        stream = getattr(self.backend(), "stream", None)
        return harness.CupyEvents(stream=stream if isinstance(stream, cupy.cuda.Stream) else None)

    def release(self) -> None:
        if self.device == "cuda":
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()

    def setup_layer(self, case: LayerCase, size, inputs, copies) -> Prepared:
        w = size["width"]
        model = self.model([gp.Dense(w, w, case.activation)], case.dtype)
        layer = model.layers[0]
        self._load(model, np.concatenate([inputs["w"].ravel(), inputs["b"]]))
        xs = [self._dev(inputs["x"], case.dtype) for _ in range(copies)]
        last: dict[str, Any] = {}
        if case.mode == "fwd":
            def step(i: int) -> None:
                last["a"] = model.forward(xs[i % copies], training=False)

            return Prepared(step, lambda: {"a": to_host(last["a"])})
        das = [self._dev(inputs["da"], case.dtype) for _ in range(copies)]

        def step_bwd(i: int) -> None:
            last["a"] = model.forward(xs[i % copies], training=True)
            last["dx"] = model.backward(das[i % copies], input_grad=True)

        def result() -> dict[str, Any]:
            return {"a": to_host(last["a"]), "dx": to_host(last["dx"]),
                    "dW": to_host(layer.weight.grad), "db": to_host(layer.bias.grad)}

        return Prepared(step_bwd, result)

    def setup_step(self, case: StepCase, size, inputs, copies) -> Prepared:
        from gpubp.backends import backend_of

        model = self.model(_model_layers(case.key), case.dtype)
        self._load(model, inputs["params"])
        be = backend_of(model.arena.data)
        opt = gp.optim.SGD(model.parameters(), lr=STEP_LR, momentum=STEP_MOMENTUM)
        loss = gp.losses.CrossEntropy()
        xs = [self._dev(inputs["x"], case.dtype) for _ in range(copies)]
        ys = [self._dev(inputs["y"], np.int64) for _ in range(copies)]
        last: dict[str, Any] = {}

        def step(i: int) -> None:
            # What fit() does per batch: no validation, the loss value stays on the device.
            out = model.forward(xs[i % copies], training=True)
            value, dout = loss.compute(out, ys[i % copies], be)
            model.backward(dout)
            opt.step()
            last["loss"] = value

        return Prepared(step, lambda: {"loss": _scalar(last["loss"]), "grads": to_host(model.arena.grad),
                                       "params": to_host(model.arena.data)})

    def setup_optimizer(self, case: OptimCase, size, inputs, copies) -> Prepared:
        from gpubp.parameter import Arena

        n = size["params"]
        arena = Arena(n, case.dtype, self.backend())
        p = arena.carve("p", (n,))
        arena.ops.assign_(arena.data, inputs["p"])
        arena.ops.assign_(arena.grad, inputs["g"])
        h = case.HYPER[case.which]
        opt = gp.optim.Adam([p], **h) if case.which == "adam" else gp.optim.SGD([p], **h)
        return Prepared(lambda i: opt.step(), lambda: {"p": to_host(arena.data)})

    def setup_loss(self, case: LossCase, size, inputs, copies) -> Prepared:
        be = self.backend()
        loss = gp.losses.CrossEntropy()
        zs = [self._dev(inputs["logits"], case.dtype) for _ in range(copies)]
        y = self._dev(inputs["y"], np.int64)
        last: dict[str, Any] = {}

        def step(i: int) -> None:
            # loss.compute: the call fit() makes (targets already checked, value left on the device)
            last["out"] = loss.compute(zs[i % copies], y, be)

        return Prepared(step, lambda: {"value": _scalar(last["out"][0]), "grad": to_host(last["out"][1])})


_TORCH_ACTS: dict[str, Callable[[Any, Any, dict[str, float]], Callable[[Any], Any]]] = {
    "identity": lambda F, t, p: lambda z: z,
    "relu": lambda F, t, p: F.relu,
    "leaky_relu": lambda F, t, p: lambda z: F.leaky_relu(z, p["slope"]),
    "elu": lambda F, t, p: lambda z: F.elu(z, p["alpha"]),
    "sigmoid": lambda F, t, p: t.sigmoid,
    "tanh": lambda F, t, p: t.tanh,
    "gelu": lambda F, t, p: F.gelu,
    "gelu_tanh": lambda F, t, p: lambda z: F.gelu(z, approximate="tanh"),
    "silu": lambda F, t, p: F.silu,
    "softplus": lambda F, t, p: lambda z: F.softplus(z, p["beta"], p["threshold"]),
}


class TorchContender(Contender):
    """PyTorch, eager or torch.compile(dynamic=True), with nn.Linear's layout (weight (out, in))."""

    memory_factor = 1.5

    def __init__(self, name: str, device: str, compiled: bool = False, enabled: bool = True,
                 disabled_reason: str = "", tf32: bool = False, description: str = "") -> None:
        super().__init__()
        self.name, self.device, self.compiled, self.description = name, device, compiled, description
        self.enabled, self.disabled_reason, self.tf32 = enabled, disabled_reason, tf32
        self._compiled: dict[str, Any] = {}

    def available(self) -> tuple[bool, str]:
        if not self.enabled:
            return False, self.disabled_reason
        if importlib.util.find_spec("torch") is None:
            return False, "PyTorch is not installed"
        import torch

        if self.device == "cuda":
            if not torch.cuda.is_available():
                build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
                return False, f"PyTorch sees no GPU (torch {torch.__version__}, {build})"
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
            if self.compiled and importlib.util.find_spec("triton") is None:
                return False, "torch.compile on the GPU needs Triton, which is not installed"
        return True, ""

    def supports(self, case: Case) -> tuple[bool, str]:
        if self.compiled and case.kind == "optimizer":
            return False, "an optimizer step alone is not compiled; torch-cuda shows PyTorch's optimizer"
        return True, ""

    def fatal(self, error: BaseException) -> bool:
        return self.compiled  # a failed compile will fail again: say so once, then skip

    def events(self) -> Any:
        return harness.TorchEvents()

    def release(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _t(self, a: np.ndarray, requires_grad: bool = False) -> Any:
        import torch

        t = torch.from_numpy(np.array(a, copy=True)).to(self.device)
        return t.requires_grad_(True) if requires_grad else t

    def _maybe_compile(self, key: str, fn: Callable) -> Callable:
        """fn, or its compiled form, kept per case so that every size reuses one dynamic-shape compile."""
        if not self.compiled:
            return fn
        if key not in self._compiled:
            self._compiled[key] = self._compile(fn)
        return self._compiled[key]

    @staticmethod
    def _compile(fn: Callable) -> Callable:
        import torch

        return torch.compile(fn, dynamic=True)

    def setup_layer(self, case: LayerCase, size, inputs, copies) -> Prepared:
        import torch
        import torch.nn.functional as F

        act = _TORCH_ACTS[case.activation.name](F, torch, case.activation.params)
        wt = self._t(inputs["w"].T)  # (out, in), as nn.Linear stores it
        b = self._t(inputs["b"])

        def dense(x, w, bias):
            return act(F.linear(x, w, bias))

        fn = self._maybe_compile(case.name, dense)
        last: dict[str, Any] = {}
        if case.mode == "fwd":
            xs = [self._t(inputs["x"]) for _ in range(copies)]

            def step(i: int) -> None:
                with torch.no_grad():
                    last["a"] = fn(xs[i % copies], wt, b)

            return Prepared(step, lambda: {"a": to_host(last["a"])})
        wt.requires_grad_(True)
        b.requires_grad_(True)
        xs = [self._t(inputs["x"], True) for _ in range(copies)]
        das = [self._t(inputs["da"]) for _ in range(copies)]

        def step_bwd(i: int) -> None:
            x = xs[i % copies]
            a = fn(x, wt, b)
            last["a"] = a
            last["grads"] = torch.autograd.grad(a, (x, wt, b), grad_outputs=das[i % copies])

        def result() -> dict[str, Any]:
            dx, dwt, db = last["grads"]
            return {"a": to_host(last["a"]), "dx": to_host(dx), "dW": to_host(dwt).T, "db": to_host(db)}

        return Prepared(step_bwd, result)

    def _torch_model(self, case: StepCase, flat: np.ndarray) -> Any:
        import torch

        mods: list[Any] = []
        last = len(case.pairs) - 1
        for i, ((a, b), (_, sl_w), (_, sl_b)) in enumerate(
            zip(case.pairs, case.param_slices()[::2], case.param_slices()[1::2], strict=True)
        ):
            lin = torch.nn.Linear(a, b, dtype=getattr(torch, case.dtype), device=self.device)
            with torch.no_grad():
                lin.weight.copy_(self._t(flat[sl_w].reshape(a, b).T))
                lin.bias.copy_(self._t(flat[sl_b]))
            mods.append(lin)
            if i < last:
                mods.append(torch.nn.ReLU())
        return torch.nn.Sequential(*mods)

    def setup_step(self, case: StepCase, size, inputs, copies) -> Prepared:
        import torch
        import torch.nn.functional as F

        net = self._torch_model(case, inputs["params"])
        opt = torch.optim.SGD(net.parameters(), lr=STEP_LR, momentum=STEP_MOMENTUM)

        def forward_loss(x, y):
            return F.cross_entropy(net(x), y)

        # compiled afresh for each network (the compiled function holds it)
        fn = self._compile(forward_loss) if self.compiled else forward_loss
        xs = [self._t(inputs["x"]) for _ in range(copies)]
        ys = [self._t(inputs["y"]) for _ in range(copies)]
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        last: dict[str, Any] = {}

        def step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            loss = fn(xs[i % copies], ys[i % copies])
            loss.backward()
            opt.step()
            last["loss"] = loss.detach()

        def flat(get: Callable[[Any], Any]) -> np.ndarray:
            parts = []
            for lin in linears:
                parts += [to_host(get(lin.weight)).T.ravel(), to_host(get(lin.bias))]
            return np.concatenate(parts)

        def result() -> dict[str, Any]:
            return {"loss": _scalar(last["loss"]), "grads": flat(lambda p: p.grad), "params": flat(lambda p: p)}

        return Prepared(step, result)

    def setup_optimizer(self, case: OptimCase, size, inputs, copies) -> Prepared:
        import torch

        p = torch.nn.Parameter(self._t(inputs["p"]))
        p.grad = self._t(inputs["g"])
        h = case.HYPER[case.which]
        opt = torch.optim.Adam([p], **h) if case.which == "adam" else torch.optim.SGD([p], **h)
        return Prepared(lambda i: opt.step(), lambda: {"p": to_host(p)})

    def setup_loss(self, case: LossCase, size, inputs, copies) -> Prepared:
        import torch
        import torch.nn.functional as F

        fn = self._maybe_compile(case.name, F.cross_entropy)
        zs = [self._t(inputs["logits"], True) for _ in range(copies)]
        y = self._t(inputs["y"])
        last: dict[str, Any] = {}

        def step(i: int) -> None:
            z = zs[i % copies]
            value = fn(z, y)
            (grad,) = torch.autograd.grad(value, z)
            last["out"] = (value.detach(), grad)

        return Prepared(step, lambda: {"value": _scalar(last["out"][0]), "grad": to_host(last["out"][1])})


CONTENDER_NAMES = ("gpubp", "gpubp-unfused", "torch-cuda", "torch-compile", "numpy", "torch-cpu")


def make_contenders(names: Sequence[str] | None = None, compile_: bool = False, tf32: bool = False,
                    compile_reason: str = "") -> list[Contender]:
    """The contenders, in table order; ``names`` keeps only those listed."""
    every: list[Contender] = [
        GpubpContender("gpubp", "cuda", "fused", "gpubp on the GPU: its fused kernels (the default path)"),
        GpubpContender("gpubp-unfused", "cuda", "unfused",
                       "gpubp on the GPU, dense_impl='unfused': cupy.matmul + separate kernels"),
        TorchContender("torch-cuda", "cuda", tf32=tf32, description="PyTorch eager on the GPU"),
        TorchContender("torch-compile", "cuda", compiled=True, enabled=compile_, tf32=tf32,
                       disabled_reason=compile_reason or "off (--compile turns it on)",
                       description="PyTorch, torch.compile(dynamic=True), on the GPU"),
        GpubpContender("numpy", "cpu", "fused", "gpubp's NumPy reference path on the CPU"),
        TorchContender("torch-cpu", "cpu", tf32=tf32, description="PyTorch eager on the CPU"),
    ]
    if names:
        unknown = [n for n in names if n not in CONTENDER_NAMES]
        if unknown:
            raise ValueError(f"--contenders: unknown {', '.join(map(repr, unknown))}; "
                             f"expected names from {', '.join(CONTENDER_NAMES)}")
        every = [c for c in every if c.name in names]
    return every
