"""The table of cases. A case is data: its grid (sizes per tier and target, the GPU grid or a scaled-down CPU
grid; N batch or rows, W width, C classes, P parameters), its work (FLOPs, compulsory bytes, items, and the
GEMMs (m, k, n) it contains), its input builder, its float64 reference and its gate. References run the project's
float64 spec (numpy_ref, gpubp's optimizers on the NumPy backend); tolerances come from gpubp.accuracy. ``ops``:
contender family -> op(contender, host inputs, device copies) -> call(i) -> {name: array, or a function giving it}.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

import gpubp as gp
from gpubp.activations import NAMES as ACTIVATIONS
from gpubp.activations import Activation
from gpubp.backends import numpy_ref
from gpubp.bench.gate import Gate, _f64, _ulp, chain, compare  # noqa: F401  (Gate and compare: cases' API)
from gpubp.bench.mixed import jax_step_op, torch_half, torch_modes
from gpubp.precision import get as get_precision

TIER_ACTIVATIONS = {"smoke": ("relu",), "quick": ("relu", "gelu"), "full": ACTIVATIONS}
# The mixed-precision cases (group "precision", named <case>@<precision>): precision -> tier -> the cases it takes.
# Not in the smoke suite (name them); on the CPU they run the smoke sizes: gpubp's float32 emulation, no tensor cores.
PRECISION_CASES = {p: {"quick": ("dense_fwd_bwd:relu", "step:mnist_mlp"),
                       "full": ("dense_fwd_bwd:relu", "dense_fwd_bwd:gelu", "step:mnist_mlp", "step:deep_narrow",
                                "step:wide")} for p in ("tf32", "bf16-mixed")}
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
ACCESSES = {"adam": 7, "sgd_momentum": 5}  # Adam reads p g m v, writes p m v; SGD reads p g b, writes p b
STEP_OPTIM = "sgd_momentum"  # the training step's optimizer (see step_case)
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


def _optimizer(which: str, params: list, torch: bool = False) -> Any:
    """gpubp's (or PyTorch's) optimizer ``which`` with the HYPER settings."""
    cls = gp.optim.OPTIMIZERS["adam" if which == "adam" else "sgd"]
    if torch:  # its torch.optim twin: the class the optimizer names, the keyword arguments it maps
        return getattr(__import__("torch").optim, cls.torch_name)(params, **cls.torch_kwargs(HYPER[which]))
    return cls(params, **HYPER[which])


def spec_update(which: str, p0: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The first update of gpubp's optimizer ``which`` (HYPER) run in float64 on the NumPy reference backend."""
    from gpubp.parameter import Arena

    arena = Arena(p0.size, np.float64)
    p = arena.carve("p", p0.shape)
    arena.data[:], arena.grad[:] = p0, g
    _optimizer(which, [p]).step()
    return arena.data.copy()


class Work(NamedTuple):
    """One call's work: FLOPs (None: not counted), compulsory bytes (each array read or written once), items
    (samples, parameters, rows) and the GEMMs it contains, (m, k, n) each: 2 m k n of the FLOPs."""

    flops: float | None
    bytes: float
    items: float
    gemms: tuple[tuple[int, int, int], ...] = ()


Grid = Callable[[str, str], tuple[list[dict[str, int]], str]]  # (tier, target) -> (sizes, note)


@dataclass(eq=False)
class Case:
    """One row of the table. ``ops``: contender family -> operation; ``check`` replaces the default gate (every
    array of the reference, its ``slack`` as allowances); ``measure`` marks a case that times itself (allreduce)
    instead of running contenders."""

    name: str
    kind: str  # layer, step, optimizer, loss, allreduce
    title: str
    unit: str
    grid: Grid
    work: Callable[[dict[str, int]], Work] = lambda size: Work(None, 0.0, 0.0)
    inputs: Callable[[dict[str, int], int], dict[str, np.ndarray]] | None = None
    reference: Callable[..., dict[str, Any]] | None = None
    check: Callable[[dict[str, Any], dict[str, Any], float], Gate] | None = None
    measure: Callable[[list[dict[str, int]], str], list[dict[str, Any]]] | None = None
    x_key: str = "N"  # the size key plotted on the x axis; the others name the line
    batched: tuple[str, ...] = ()  # inputs with N rows: cut for a reduced gate, rotated between repeats
    row_cost: Callable[[dict[str, int]], float] | None = None  # reference cost of one row (default: FLOPs)
    gate_budget: float | None = None  # the budget of that cost (default: --gate-flops)
    dtype: str = "float32"
    act: str | None = None  # the activation of a layer case
    precision: str = "fp32"  # gpubp.precision's name; others: group "precision", their own tiers
    tiers: tuple[str, ...] | None = None  # the tiers that take the case by default (None: by act and kind)
    ops: dict[str, Callable[..., Callable[[int], dict]]] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return "precision" if self.precision != "fp32" else self.name.split(":")[0]

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
        """The largest power-of-two batch (at least 64, 16 for the loss) whose reference costs at most the budget."""
        n = size.get("N", 0)
        budget = self.gate_budget or budget_flops
        per_row = self.row_cost(size) if self.row_cost else (self.work(size).flops or 0) / max(n, 1)
        if not self.batched or n * per_row <= budget:
            return size
        floor = 16 if self.kind == "loss" else 64
        return {**size, "N": min(n, max(1 << max(int(math.log2(max(budget / per_row, 1.0))), 0), floor))}

    def compare(self, result: dict[str, Any], expected: dict[str, Any], tol: float) -> Gate:
        if self.check:
            return self.check(result, expected, tol)
        return compare(result, {k: v for k, v in expected.items() if k != "slack"}, tol, expected.get("slack"))


def pick(A: dict[str, list], key: str, i: int) -> Any:
    """Input ``key``'s copy for call ``i``: the copies rotate."""
    return A[key][i % len(A[key])]


def _sized(key: str, sizes: list[int], what: str, stated: int, target: str) -> tuple[list[dict[str, int]], str]:
    """One size per value of ``key``, and a note when the stated size is not among them."""
    return [{key: n} for n in sizes], "" if stated in sizes else (
        f"reduced: {what} {', '.join(map(fmt_count, sizes))} instead of the stated {fmt_count(stated)} ({target} grid)")


# --- the kinds: each function gives one row of the table, its operations included ------------------------


@functools.lru_cache(maxsize=1)
def _layer_data(n: int, w: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, n, w, 1])  # x and da, shared by the activations of one size
    return fill(rng, (n, w), dtype), fill(rng, (n, w), dtype)


def torch_activation(act: Activation) -> Callable:
    """The activation's PyTorch twin (its row in gpubp.activations), as a callable on tensors."""
    import torch

    module = act.to_torch(torch.nn)
    return (lambda z: z) if module is None else module


def _in_precision(name: str, precision: str, grid: Grid) -> dict[str, Any]:
    """Case fields of ``name`` run in ``precision``: fp32 changes nothing; another precision names the case
    <name>@<precision>, takes it into the tiers PRECISION_CASES says and runs the smoke sizes on the CPU."""
    if get_precision(precision).is_fp32:
        return {"name": name, "grid": grid}

    def small(tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        if target == "gpu":
            return grid(tier, target)
        sizes, note = grid("smoke", target)
        return sizes, ("precision cases on the CPU run the smoke sizes (gpubp's float32 emulation, no tensor cores)"
                       + (f"; {note}" if sizes and note else "" if sizes else ": none for this case"))
    tiers = tuple(t for t, names in PRECISION_CASES.get(precision, {}).items() if name in names)
    return {"name": f"{name}@{precision}", "grid": small, "precision": get_precision(precision).name, "tiers": tiers}


def layer_case(mode: str, activation: str, dtype: str = "float32", precision: str = "fp32") -> Case:
    """One Dense(W, W): a = f(x W + b) with x (N, W). Forward: 2 N W^2 FLOPs; x, W, b read, a written.
    Forward+backward also writes the saved tensor, then reads da, it, x, W and writes dx, dW, db: 6 N W^2.
    ``precision``: gpubp with precision=..., PyTorch under torch_modes (allow_tf32, autocast); bytes as float32."""
    if mode not in ("fwd", "fwd_bwd"):
        raise ValueError(f"mode: expected 'fwd' or 'fwd_bwd', got {mode!r}")
    act, fwd, s = Activation(activation), mode == "fwd", np.dtype(dtype).itemsize
    name, pkw = f"dense_{mode}:{act.name}", {} if get_precision(precision).is_fp32 else {"precision": precision}

    def work(size: dict[str, int]) -> Work:
        n, w = size["N"], size["W"]
        if fwd:
            return Work(2.0 * n * w * w, s * (2.0 * n * w + w * w + w), n, ((n, w, w),))
        return Work(6.0 * n * w * w, s * (7.0 * n * w + 3.0 * w * w + 2.0 * w), n, ((n, w, w), (w, n, w), (n, w, w)))

    def inputs(size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        x, da = _layer_data(size["N"], size["W"], dtype, seed)
        rng = np.random.default_rng([seed, size["W"], act.id, 2])
        w = gp.Dense(size["W"], size["W"], act).initial_weight(rng).astype(dtype)
        out = {"x": x, "w": w, "b": (0.1 * rng.standard_normal(size["W"])).astype(dtype)}
        return out | ({} if fwd else {"da": da})

    def reference(inp: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, Any]:
        x, w, b = _f64(inp["x"]), _f64(inp["w"]), _f64(inp["b"])
        if fwd:
            return {"a": numpy_ref.dense_forward(x, w, b, act, False)[0]}
        c = chain([act], [w], [b], x, _f64(inp["da"]), u, True)
        [(dw, db)], [(s_dw, s_db)] = c["grads"], c["slack"]
        return {"a": c["hs"][-1], "dx": c["dx"], "dW": dw, "db": db, "slack": {"dx": c["s_dx"], "dW": s_dw, "db": s_db}}

    def gpubp_op(c: Any, inp: dict, A: dict) -> Callable:
        layer = gp.Dense(*inp["w"].shape, act)
        model = c.model([layer], dtype, np.concatenate([inp["w"].ravel(), inp["b"]]), **pkw)

        def call(i: int) -> dict:
            a = model.forward(pick(A, "x", i), training=not fwd)
            return {"a": a} if fwd else {"a": a, "dx": model.backward(pick(A, "da", i), input_grad=True),
                                         "dW": layer.weight.grad, "db": layer.bias.grad}
        return call

    def torch_op(c: Any, inp: dict, A: dict) -> Callable:
        import torch
        import torch.nn.functional as F

        f, (whole, fwd_mode), half = torch_activation(act), torch_modes(precision, A["w"][0].device.type), torch_half(precision)
        wt, b = A["w"][0].T.contiguous().requires_grad_(not fwd), A["b"][0].requires_grad_(not fwd)  # nn.Linear's
        das = {"da": [d.to(half) if half else d for d in A.get("da", ())]}  # as autocast's output: 16 bits

        def forward(x: Any, w: Any, bias: Any) -> Any:  # layout: weight (out, in)
            with fwd_mode():
                return f(F.linear(x, w, bias))
        fn = c.compiled(f"{name}@{precision}", forward)
        for x in A["x"]:
            x.requires_grad_(not fwd)

        def call(i: int) -> dict:
            with whole():
                with torch.set_grad_enabled(not fwd):
                    a = fn(pick(A, "x", i), wt, b)
                if fwd:
                    return {"a": a}
                g = torch.autograd.grad(a, (pick(A, "x", i), wt, b), grad_outputs=pick(das, "da", i))
            return {"a": a, "dx": g[0], "dW": g[1].T, "db": g[2]}
        return call

    title = (f"dense layer {'forward' if fwd else 'forward+backward'}, {activation}, {np.dtype(dtype).name}"
             + ("" if not pkw else f", precision {precision}"))
    grid = lambda tier, target: ([{"N": n, "W": w} for w, n in itertools.product(*LAYER_GRID[(tier, target)])], "")  # noqa: E731
    return Case(kind="layer", title=title, unit="GFLOP/s", work=work, inputs=inputs, reference=reference,
                batched=("x",) if fwd else ("x", "da"), dtype=np.dtype(dtype).name, act=act.name,
                ops={"gpubp": gpubp_op, "torch": torch_op}, **_in_precision(name, precision, grid))


def model_layers(key: str) -> list[gp.Dense]:
    widths = MODELS[key][1]
    pairs = zip(widths[:-1], widths[1:], strict=True)
    return [gp.Dense(a, b, "relu" if i < len(widths) - 2 else None) for i, (a, b) in enumerate(pairs)]


@functools.lru_cache(maxsize=2)
def _initial_params(key: str, dtype: str, seed: int) -> np.ndarray:
    return np.asarray(gp.Sequential(*model_layers(key), dtype="float64", seed=seed).arena.data, dtype=dtype)


def step_case(key: str, dtype: str = "float32", precision: str = "fp32") -> Case:
    """A training step: forward, cross-entropy, backward, SGD momentum 0.9 (lr 0.01), not Adam: its first update
    is linear in the gradient, so the gate on the new parameters checks the gradients (Adam's first update is
    lr sign(g), which float32 legitimately flips for gradients near 0; Adam is gated alone in optim:adam).
    GEMMs per layer (in a, out b): x W (N, a, b), dW = x^T dz (a, N, b) and, but for the first, dx = dz W^T
    (N, b, a). Bytes: each layer's x, W, b, a, saved z, da, dx, dW, db once, 5 accesses per parameter for SGD
    momentum, the logits read and their gradient written, the int64 labels. ``precision``: gpubp with precision=...,
    PyTorch under torch_modes, and for the -mixed ones a jax.jit step (mixed.jax_step_op); bytes as float32."""
    desc, widths, stated, grids = MODELS[key]
    pkw = {} if get_precision(precision).is_fp32 else {"precision": precision}
    pairs, s, dtype = list(zip(widths[:-1], widths[1:], strict=True)), np.dtype(dtype).itemsize, np.dtype(dtype).name
    params, slices, off = sum(a * b + b for a, b in pairs), [], 0
    for i, (a, b) in enumerate(pairs):  # (name, slice) of each weight (in, out) and bias: gpubp's arena layout
        slices += [(f"{i}.weight", slice(off, off + a * b)), (f"{i}.bias", slice(off + a * b, off + a * b + b))]
        off += a * b + b

    def grid(tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        sizes = grids[tier][target == "gpu"]
        if not sizes:
            return [], (f"not run in the {tier} suite on the {target.upper()}: {params / 1e6:.0f}M parameters "
                        f"at batch {stated} is a GPU-sized step (--full runs it)")
        return _sized("N", sizes, "batch", stated, target)

    def work(size: dict[str, int]) -> Work:
        n = size["N"]
        gemms = tuple(g for i, (a, b) in enumerate(pairs) for g in [(n, a, b), (a, n, b)] + [(n, b, a)] * (i > 0))
        traffic = sum(3.0 * n * a - (n * a if i == 0 else 0) + 4.0 * n * b + 3.0 * a * b + 2.0 * b
                      for i, (a, b) in enumerate(pairs))
        flops = sum(2.0 * m * k * q for m, k, q in gemms)
        return Work(flops, s * (traffic + 5.0 * params + 2.0 * n * widths[-1]) + 8.0 * n, n, gemms)

    def inputs(size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, size["N"], 3])
        return {"x": fill(rng, (size["N"], widths[0]), dtype), "params": _initial_params(key, dtype, seed),
                "y": rng.integers(0, widths[-1], size=size["N"], dtype=np.int64)}

    def reference(inp: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, Any]:
        p0, x = _f64(inp["params"]), _f64(inp["x"])
        ws = [p0[sl].reshape(a, b) for (_, sl), (a, b) in zip(slices[::2], pairs, strict=True)]
        c = chain([layer.activation for layer in model_layers(key)], ws, [p0[sl] for _, sl in slices[1::2]], x,
                  lambda out: gp.losses.CrossEntropy.rule.spec(out, inp["y"], 1.0 / x.shape[0]), u, False)
        g = np.concatenate([t for dw, db in c["grads"] for t in (dw.ravel(), db)])
        flat = [sl for pair in c["slack"] for sl in pair]
        s_g = {name: sg.ravel() for (name, _), sg in zip(slices, flat, strict=True) if sg is not None}
        return {"loss": np.float64(c["value"]), "grads": g, "params": spec_update(STEP_OPTIM, p0, g), "params0": p0,
                "slack": s_g}

    def check(result: dict[str, Any], expected: dict[str, Any], tol: float) -> Gate:
        """Loss; each parameter's gradient (with its kink allowance); each update (new - old) within one ulp plus
        lr times that allowance (the first SGD-momentum update is -lr g)."""
        missing = [k for k in ("loss", "grads", "params") if k not in result]
        if missing:
            return Gate(False, math.inf, missing[0], tol, f"no {missing[0]!r} in the result")
        got, want, slack = {"loss": result["loss"]}, {"loss": expected["loss"]}, {}
        p0, new, grads, lr = expected["params0"], _f64(result["params"]), _f64(result["grads"]), HYPER[STEP_OPTIM]["lr"]
        for name, sl in slices:
            s_g = expected["slack"].get(name)
            got[f"grad {name}"], want[f"grad {name}"], slack[f"grad {name}"] = grads[sl], expected["grads"][sl], s_g
            got[f"update {name}"], want[f"update {name}"] = new[sl] - p0[sl], expected["params"][sl] - p0[sl]
            slack[f"update {name}"] = _ulp(expected["params"][sl], dtype) + (0 if s_g is None else lr * s_g)
        return compare(got, want, tol, slack)

    def gpubp_op(c: Any, inp: dict, A: dict) -> Callable:
        """Driven as fit drives it: inputs on the device, loss.compute (value left there), backward, step()."""
        model = c.model(model_layers(key), dtype, inp["params"], **pkw)
        be, loss, opt = model.arena.backend, gp.losses.CrossEntropy(), _optimizer(STEP_OPTIM, model.parameters())

        def call(i: int) -> dict:
            value, dout = loss.compute(model.forward(pick(A, "x", i), training=True), pick(A, "y", i), be)
            model.backward(dout)
            opt.step()
            return {"loss": value, "grads": model.arena.grad, "params": model.arena.data}
        call.launch_count = getattr(be, "launch_count", None)
        return call

    def torch_op(c: Any, inp: dict, A: dict) -> Callable:
        import torch

        flat = A["params"][0]
        lins = [torch.nn.Linear(a, b, dtype=flat.dtype, device=flat.device) for a, b in pairs]
        with torch.no_grad():
            for lin, (a, b), (_, sw), (_, sb) in zip(lins, pairs, slices[::2], slices[1::2], strict=True):
                lin.weight.copy_(flat[sw].reshape(a, b).T)
                lin.bias.copy_(flat[sb])
        net = torch.nn.Sequential(*[m for lin in lins for m in (lin, torch.nn.ReLU())][:-1])  # relu between layers
        opt = _optimizer(STEP_OPTIM, net.parameters(), torch=True)
        loss_fn = gp.losses.CrossEntropy().torch_loss()  # the row's PyTorch twin, F.cross_entropy
        whole, fwd_mode = torch_modes(precision, flat.device.type)

        def forward(x: Any, y: Any) -> Any:
            with fwd_mode():
                return loss_fn(net(x), y)
        fn = c.compiled(None, forward)

        def flat_of(get: Callable) -> Any:  # gpubp's arena layout: weight (in, out), then bias, per layer
            return torch.cat([t for m in lins for t in (get(m.weight).T.reshape(-1), get(m.bias))])

        def call(i: int) -> dict:
            with whole():
                opt.zero_grad(set_to_none=True)
                loss = fn(pick(A, "x", i), pick(A, "y", i))
                loss.backward()
                opt.step()
            return {"loss": loss, "grads": lambda: flat_of(lambda t: t.grad), "params": lambda: flat_of(lambda t: t)}
        return call

    ops = {"gpubp": gpubp_op, "torch": torch_op} | ({"jax": jax_step_op(precision, widths, **HYPER[STEP_OPTIM])}
                                                    if get_precision(precision).store else {})
    return Case(kind="step", title=f"training step, {desc}, {dtype}" + (f", precision {precision}" if pkw else ""),
                unit="samples/s", work=work, inputs=inputs, reference=reference, check=check, batched=("x", "y"),
                dtype=dtype, ops=ops, **_in_precision(f"step:{key}", precision, grid))


def optim_case(which: str, dtype: str = "float32") -> Case:
    """One optimizer update of a flat array of P parameters: ACCESSES[which] x itemsize bytes per parameter."""
    dtype = np.dtype(dtype).name

    def inputs(size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, size["P"], 4])
        return {"p": fill(rng, (size["P"],), dtype, 0.1), "g": fill(rng, (size["P"],), dtype)}

    def reference(inp: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, np.ndarray]:
        """The update of a sample (elements are independent): the first and last 4096 and 65536 random ones.
        The contender still updates every element."""
        n = inp["p"].shape[0]
        idx = np.unique(np.concatenate([np.arange(min(n, 4096)), np.arange(max(n - 4096, 0), n),
                                        np.random.default_rng([n, 5]).integers(0, n, size=min(n, 65536))]))
        p0 = _f64(inp["p"][idx])
        return {"index": idx, "p0": p0, "p": spec_update(which, p0, _f64(inp["g"][idx]))}

    def check(result: dict[str, Any], expected: dict[str, Any], tol: float) -> Gate:
        """The update (new - old) of the sampled elements, within one ulp of the stored parameter."""
        if "p" not in result:
            return Gate(False, math.inf, "p", tol, "no 'p' in the result")
        got, p0, ulp = _f64(np.asarray(result["p"])[expected["index"]]), expected["p0"], _ulp(expected["p"], dtype)
        return compare({"update": got - p0}, {"update": expected["p"] - p0}, tol, {"update": ulp})

    def gpubp_op(c: Any, inp: dict, A: dict) -> Callable:
        from gpubp.parameter import Arena

        arena = Arena(inp["p"].size, dtype, c.backend())
        p = arena.carve("p", inp["p"].shape)
        arena.backend.assign_(arena.data, inp["p"])
        arena.backend.assign_(arena.grad, inp["g"])
        opt = _optimizer(which, [p])
        return lambda i: opt.step() or {"p": arena.data}

    def torch_op(c: Any, inp: dict, A: dict) -> Callable:
        p = __import__("torch").nn.Parameter(A["p"][0])
        p.grad, opt = A["g"][0], _optimizer(which, [p], torch=True)
        return lambda i: opt.step() or {"p": p}

    title = f"optimizer step alone, {'Adam' if which == 'adam' else 'SGD, momentum 0.9'}, {dtype}"
    work = lambda size: Work(None, float(ACCESSES[which] * np.dtype(dtype).itemsize * size["P"]), size["P"])  # noqa: E731
    grid = lambda tier, target: _sized("P", OPTIM_GRID[tier][target == "gpu"], "parameters", OPTIM_STATED, target)  # noqa: E731
    return Case(f"optim:{which}", "optimizer", title, "GB/s", grid, work, inputs, reference, check, x_key="P",
                dtype=dtype, ops={"gpubp": gpubp_op, "torch": torch_op})


def loss_case(dtype: str = "float32") -> Case:
    """Softmax cross-entropy value and gradient of (N, C) logits and N int64 labels: logits read and gradient
    written once, labels read. The gate keeps the float64 reference under 2^24 elements."""
    dtype = np.dtype(dtype).name

    def inputs(size: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, size["N"], size["C"], 6])
        return {"logits": fill(rng, (size["N"], size["C"]), dtype, 3.0),
                "y": rng.integers(0, size["C"], size=size["N"], dtype=np.int64)}

    def reference(inp: dict[str, np.ndarray], u: float = 2.0**-24) -> dict[str, np.ndarray]:
        value, grad = gp.losses.CrossEntropy.rule.spec(_f64(inp["logits"]), inp["y"], 1.0 / inp["y"].shape[0])
        return {"value": np.float64(value), "grad": grad}

    def grid(tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        rows, classes = LOSS_GRID[tier][target == "gpu"]
        return [{"N": rows, "C": c} for c in classes], _sized("N", [rows], "rows", LOSS_STATED_ROWS, target)[1]

    def gpubp_op(c: Any, inp: dict, A: dict) -> Callable:
        be, loss = c.backend(), gp.losses.CrossEntropy()
        return lambda i: dict(zip(("value", "grad"), loss.compute(pick(A, "logits", i), pick(A, "y", i), be),
                                  strict=True))

    def torch_op(c: Any, inp: dict, A: dict) -> Callable:
        import torch

        loss = gp.losses.CrossEntropy()
        fn = c.compiled(f"loss:{loss.name}", loss.torch_loss())  # the row's PyTorch twin
        for z in A["logits"]:
            z.requires_grad_(True)

        def call(i: int) -> dict:
            value = fn(pick(A, "logits", i), pick(A, "y", i))
            return {"value": value, "grad": torch.autograd.grad(value, pick(A, "logits", i))[0]}
        return call

    work = lambda size: Work(None, 2.0 * size["N"] * size["C"] * np.dtype(dtype).itemsize + 8.0 * size["N"], size["N"])  # noqa: E731
    return Case("loss:cross_entropy", "loss", f"softmax cross-entropy value + gradient, {dtype}", "rows/s", grid,
                work, inputs, reference, x_key="C", batched=("logits", "y"), row_cost=lambda size: size["C"],
                gate_budget=float(1 << 24), dtype=dtype, ops={"gpubp": gpubp_op, "torch": torch_op})


def allreduce_case(dtype: str = "float32") -> Case:
    """The all-reduce of a gradient arena of P elements and a data-parallel training step (global batch N) over
    1, 2 processes on the CPU (MPI) and 1..N GPUs where there are several (NCCL), launched with mpiexec and
    timed by gpubp.distributed.benchmark (median, p10, p90 of the slowest rank). Each median is also given
    over the same measurement's with 1 process: the scaling."""

    def grid(tier: str, target: str) -> tuple[list[dict[str, int]], str]:
        if importlib.util.find_spec("gpubp.distributed.benchmark") is None:
            return [], "gpubp.distributed.benchmark is not in this installation"
        from gpubp.distributed.benchmark import mpiexec

        if mpiexec() is None or importlib.util.find_spec("mpi4py") is None:
            return [], "needs mpiexec and mpi4py: pip install 'gpubp[mpi]'"
        return [{"P": p} for p in ALLREDUCE[tier][0]], ""

    def measure(sizes: list[dict[str, int]], tier: str) -> list[dict[str, Any]]:
        from gpubp.device import cuda_status
        from gpubp.distributed.benchmark import measure

        gpus, out = cuda_status()[0], []
        for device, procs in [("cpu", (1, 2))] + ([("cuda", tuple(range(1, gpus + 1)))] if gpus > 1 else []):
            out += measure(procs, [s["P"] for s in sizes], device, ALLREDUCE[tier][1], dtype=dtype)
        one = {(r["what"], r["device"], r["size"]): r["median_s"] for r in out if r["procs"] == 1}
        return [r | {"vs_1_process": r["median_s"] / one[k] if one.get(k := (r["what"], r["device"], r["size"]))
                     else None} for r in out]

    return Case("allreduce", "allreduce", "all-reduce of the arena and data-parallel training step, by processes",
                "s", grid, measure=measure, x_key="P", dtype=np.dtype(dtype).name)


def precision_cases(dtype: str = "float32") -> list[Case]:
    """The mixed-precision cases (float32 only): every case PRECISION_CASES names in some tier, per precision."""
    if np.dtype(dtype) != np.float32:
        return []
    names = {p: dict.fromkeys(n for tier in t.values() for n in tier) for p, t in PRECISION_CASES.items()}
    return [layer_case(n.split(":")[0][6:], n.split(":")[1], dtype, p) if n.startswith("dense_")
            else step_case(n.split(":")[1], dtype, p) for p, ns in names.items() for n in ns]


def all_cases(dtype: str = "float32") -> list[Case]:
    """Every case, in table order."""
    return ([layer_case(m, a, dtype) for m in ("fwd", "fwd_bwd") for a in ACTIVATIONS]
            + [step_case(k, dtype) for k in MODELS] + [optim_case(w, dtype) for w in HYPER]
            + [loss_case(dtype)] + precision_cases(dtype) + [allreduce_case(dtype)])


def select_cases(tier: str, dtype: str = "float32", patterns: Sequence[str] | None = None) -> list[Case]:
    """The tier's cases, or those matching ``patterns``: names (``dense_fwd:silu``), groups (``step``) or globs
    (``dense_*:relu``). Groups and the default take the tier's activations (and allreduce with --full only)."""
    cases = all_cases(dtype)
    in_tier = [c for c in cases if (tier in c.tiers if c.tiers is not None else c.act in TIER_ACTIVATIONS[tier]
                                    if c.act else tier == "full" or c.kind != "allreduce")]
    if not patterns:
        return in_tier
    hits = {p: [c for c in cases if c.name == p or fnmatch.fnmatch(c.name, p) or (c.group == p and c in in_tier)]
            for p in patterns}
    unmatched = [p for p, h in hits.items() if not h]
    if unmatched:
        raise ValueError(f"--cases: no case matches {', '.join(map(repr, unmatched))}; groups are "
                         f"{', '.join(dict.fromkeys(c.group for c in cases))} (gpubp bench --list shows every case)")
    return [c for c in cases if any(c in h for h in hits.values())]
