"""The contenders, at the same shapes, dtype and TF32 setting: gpubp (fused kernels) and gpubp-unfused
(cupy.matmul + separate kernels) on the GPU, gpubp on the CPU (numpy), PyTorch eager on the GPU and the CPU,
torch.compile(dynamic=True) on the GPU.

One table, ``OPS``: case kind -> contender family (gpubp, torch) -> the operation, built from the case, the
host inputs and their device copies. Each contender's one ``setup`` moves the inputs to its device (batched
ones in ``copies`` copies that steps rotate over) and wraps the operation in a :class:`Prepared`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import gpubp as gp
from gpubp.bench.cases import HYPER, STEP_OPTIM, Case, model_layers
from gpubp.bench.timing import Settings, time_gpu, time_host

CONTENDER_NAMES = ("gpubp", "gpubp-unfused", "torch-cuda", "torch-compile", "numpy", "torch-cpu")


@dataclass
class Prepared:
    """``step(i)`` runs one call on input copy ``i % copies``; ``result()`` gives host arrays for the gate;
    ``launches()`` the kernel launches of one step (gpubp steps, where the backend has ``launch_count()``)."""

    step: Callable[[int], Any]
    result: Callable[[], dict[str, Any]]
    launches: Callable[[], int] | None = None


def to_host(a: Any) -> np.ndarray:
    """A host copy of a NumPy, CuPy or PyTorch array (or a number)."""
    mod = type(a).__module__.split(".")[0]
    return np.array(a.detach().cpu().numpy() if mod == "torch" else a.get() if mod == "cupy" else a, copy=True)


def short(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0][:300]


# --- the operations: each returns call(i) -> {name: array, or a function giving it when the gate reads it} ---


def gpubp_layer(c: Any, case: Any, inp: dict, A: dict) -> Callable:
    fwd, layer = case.spec["mode"] == "fwd", gp.Dense(*inp["w"].shape, case.spec["act"])
    model = c.model([layer], case.dtype, np.concatenate([inp["w"].ravel(), inp["b"]]))

    def call(i: int) -> dict:
        a = model.forward(pick(A, "x", i), training=not fwd)
        return {"a": a} if fwd else {"a": a, "dx": model.backward(pick(A, "da", i), input_grad=True),
                                     "dW": layer.weight.grad, "db": layer.bias.grad}
    return call


def gpubp_step(c: Any, case: Any, inp: dict, A: dict) -> Callable:
    model = c.model(model_layers(case.spec["key"]), case.dtype, inp["params"])
    be, loss, opt = model.arena.backend, gp.losses.CrossEntropy(), gp.optim.SGD(model.parameters(), **HYPER[STEP_OPTIM])

    def call(i: int) -> dict:
        value, dout = loss.compute(model.forward(pick(A, "x", i), training=True), pick(A, "y", i), be)
        model.backward(dout)
        opt.step()
        return {"loss": value, "grads": model.arena.grad, "params": model.arena.data}
    call.launch_count = getattr(be, "launch_count", None)
    return call


def gpubp_optimizer(c: Any, case: Any, inp: dict, A: dict) -> Callable:
    from gpubp.parameter import Arena

    arena = Arena(inp["p"].size, case.dtype, c.backend())
    p = arena.carve("p", inp["p"].shape)
    arena.backend.assign_(arena.data, inp["p"])
    arena.backend.assign_(arena.grad, inp["g"])
    which = case.spec["which"]
    opt = (gp.optim.Adam if which == "adam" else gp.optim.SGD)([p], **HYPER[which])
    return lambda i: opt.step() or {"p": arena.data}


def gpubp_loss(c: Any, case: Any, inp: dict, A: dict) -> Callable:
    be, loss = c.backend(), gp.losses.CrossEntropy()
    return lambda i: dict(zip(("value", "grad"), loss.compute(pick(A, "logits", i), pick(A, "y", i), be), strict=True))


def torch_layer(c: Any, case: Any, inp: dict, A: dict) -> Callable:
    import torch
    import torch.nn.functional as F

    p, fwd = case.spec["act"].params, case.spec["mode"] == "fwd"
    act = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, p.get("slope")),
           "elu": lambda z: F.elu(z, p.get("alpha")), "sigmoid": torch.sigmoid, "tanh": torch.tanh,
           "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu,
           "softplus": lambda z: F.softplus(z, p.get("beta"), p.get("threshold"))}[case.spec["act"].name]
    wt, b = A["w"][0].T.contiguous().requires_grad_(not fwd), A["b"][0].requires_grad_(not fwd)  # nn.Linear layout
    fn = c.compiled(case.name, lambda x, w, bias: act(F.linear(x, w, bias)))
    for x in A["x"]:
        x.requires_grad_(not fwd)

    def call(i: int) -> dict:
        with torch.set_grad_enabled(not fwd):
            a = fn(pick(A, "x", i), wt, b)
        if fwd:
            return {"a": a}
        g = torch.autograd.grad(a, (pick(A, "x", i), wt, b), grad_outputs=pick(A, "da", i))
        return {"a": a, "dx": g[0], "dW": g[1].T, "db": g[2]}
    return call


def torch_step(c: Any, case: Any, inp: dict, A: dict) -> Callable:
    import torch
    import torch.nn.functional as F

    flat, sl, pairs, mods = A["params"][0], case.spec["slices"], case.spec["pairs"], []
    for i, ((a, b), (_, sw), (_, sb)) in enumerate(zip(pairs, sl[::2], sl[1::2], strict=True)):
        lin = torch.nn.Linear(a, b, dtype=flat.dtype, device=flat.device)
        with torch.no_grad():
            lin.weight.copy_(flat[sw].reshape(a, b).T)
            lin.bias.copy_(flat[sb])
        mods += [lin, torch.nn.ReLU()] if i < len(pairs) - 1 else [lin]
    net = torch.nn.Sequential(*mods)
    opt, fn = torch.optim.SGD(net.parameters(), **HYPER[STEP_OPTIM]), c.compiled(None, lambda x, y: F.cross_entropy(
        net(x), y))
    lins = [m for m in net if isinstance(m, torch.nn.Linear)]

    def flat_of(get: Callable) -> Any:  # gpubp's arena layout: weight (in, out), then bias, per layer
        return torch.cat([t for m in lins for t in (get(m.weight).T.reshape(-1), get(m.bias))])

    def call(i: int) -> dict:
        opt.zero_grad(set_to_none=True)
        loss = fn(pick(A, "x", i), pick(A, "y", i))
        loss.backward()
        opt.step()
        return {"loss": loss, "grads": lambda: flat_of(lambda t: t.grad), "params": lambda: flat_of(lambda t: t)}
    return call


def torch_optimizer(c: Any, case: Any, inp: dict, A: dict) -> Callable:
    import torch

    p = torch.nn.Parameter(A["p"][0])
    p.grad = A["g"][0]
    opt = (torch.optim.Adam if case.spec["which"] == "adam" else torch.optim.SGD)([p], **HYPER[case.spec["which"]])
    return lambda i: opt.step() or {"p": p}


def torch_loss(c: Any, case: Any, inp: dict, A: dict) -> Callable:
    import torch
    import torch.nn.functional as F

    fn = c.compiled(case.name, F.cross_entropy)
    for z in A["logits"]:
        z.requires_grad_(True)

    def call(i: int) -> dict:
        value = fn(pick(A, "logits", i), pick(A, "y", i))
        return {"value": value, "grad": torch.autograd.grad(value, pick(A, "logits", i))[0]}
    return call


OPS = {"layer": {"gpubp": gpubp_layer, "torch": torch_layer}, "step": {"gpubp": gpubp_step, "torch": torch_step},
       "optimizer": {"gpubp": gpubp_optimizer, "torch": torch_optimizer},
       "loss": {"gpubp": gpubp_loss, "torch": torch_loss}}


def pick(A: dict[str, list], key: str, i: int) -> Any:
    return A[key][i % len(A[key])]


class Contender:
    family = ""  # the OPS column
    fatal = False  # after one error every later run would fail too: say it once, then skip

    def __init__(self, name: str, device: str, description: str = "", skip: dict[str, str] | None = None) -> None:
        self.name, self.device, self.description, self.skip = name, device, description, skip or {}
        self.usable, self.broken = False, ""

    def available(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, case: Case) -> tuple[bool, str]:
        """False and why for the case kinds in ``skip``."""
        return case.kind not in self.skip, self.skip.get(case.kind, "")

    def array(self, a: np.ndarray) -> Any:
        raise NotImplementedError

    def setup(self, case: Case, size: dict[str, int], inputs: dict[str, np.ndarray], copies: int) -> Prepared:
        A = {k: [self.array(inputs[k]) for _ in range(copies if k in case.batched else 1)]  # gpubp sets its
             for k in (inputs if self.family == "torch" else case.batched)}  # parameters from the host
        call, last = OPS[case.kind][self.family](self, case, inputs, A), {}
        count = getattr(call, "launch_count", None)

        def result() -> dict[str, np.ndarray]:
            out = {k: to_host(v() if callable(v) else v) for k, v in last.items()}
            return {k: v.reshape(()) if k in ("loss", "value") else v for k, v in out.items()}

        def launches() -> int:
            n0 = count()
            call(0)
            return int(count() - n0)

        return Prepared(lambda i: last.update(call(i)), result, launches if callable(count) else None)

    def timer(self, step: Callable[[int], Any], settings: Settings) -> dict[str, Any]:
        return time_host(step, settings) if self.device == "cpu" else time_gpu(step, settings)

    def release(self) -> None:
        """Give cached device memory back between runs."""
        if self.device == "cuda" and "cupy" in sys.modules:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
        if self.device == "cuda" and "torch" in sys.modules:
            sys.modules["torch"].cuda.empty_cache()


class GpubpContender(Contender):
    """gpubp's public API, driven as fit drives it: inputs on the device, loss.compute (value left on the
    device), model.backward, optimizer.step()."""

    family = "gpubp"

    def __init__(self, name: str, device: str, impl: str = "fused", description: str = "") -> None:
        why = "the unfused variant differs from gpubp only in its dense layers"
        super().__init__(name, device, description, {"optimizer": why, "loss": why} if impl == "unfused" else {})
        self.impl = impl

    def backend(self) -> Any:
        from gpubp.backends import get_backend
        from gpubp.device import parse_device

        return get_backend(parse_device(self.device))

    def array(self, a: np.ndarray) -> Any:
        return self.backend().asarray(np.array(a, copy=True) if self.device == "cpu" else a, a.dtype)

    def model(self, layers: list[gp.Dense], dtype: str, flat: np.ndarray | None = None) -> gp.Sequential:
        impl = {} if self.device == "cpu" else {"dense_impl": self.impl}  # one CPU implementation
        model = gp.Sequential(*layers, device=self.device, dtype=dtype, seed=0, **impl)
        if flat is not None:
            model.arena.backend.assign_(model.arena.data, np.asarray(flat, dtype=model.dtype))
        return model

    def available(self) -> tuple[bool, str]:
        from gpubp.device import cuda_status

        n, why = (1, "") if self.device == "cpu" else cuda_status()
        if n == 0:
            return False, f"no GPU: {why}"
        try:
            self.model([gp.Dense(4, 4, "relu")], "float32")
        except Exception as e:
            return False, f"gpubp cannot run this here: {short(e)}"
        return True, ""


class TorchContender(Contender):
    """PyTorch eager or torch.compile(dynamic=True), nn.Linear's layout (weight (out, in))."""

    family = "torch"

    def __init__(self, name: str, device: str, compiled: bool = False, enabled: bool = True,
                 disabled_reason: str = "", tf32: bool = False, description: str = "") -> None:
        super().__init__(name, device, description, {"optimizer": "an optimizer step alone is not compiled; "
                                                     "torch-cuda shows PyTorch's optimizer"} if compiled else {})
        self.compiled_on, self.enabled, self.disabled_reason, self.tf32 = compiled, enabled, disabled_reason, tf32
        self.fatal, self._fns = compiled, {}

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
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
            if self.compiled_on and importlib.util.find_spec("triton") is None:
                return False, "torch.compile on the GPU needs Triton, which is not installed"
        return True, ""

    def array(self, a: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.array(a, copy=True)).to(self.device)

    def compiled(self, key: str | None, fn: Callable) -> Callable:
        """fn, or its compiled form: one dynamic-shape compile per case (``key``) reused across sizes; None
        compiles afresh (the function holds a network)."""
        import torch

        if not self.compiled_on:
            return fn
        if key is None or key not in self._fns:
            self._fns[key or ""] = torch.compile(fn, dynamic=True)
        return self._fns[key or ""]


def make_contenders(names: Sequence[str] | None = None, compile_: bool = False, tf32: bool = False,
                    compile_reason: str = "") -> list[Contender]:
    """The contenders in table order; ``names`` keeps those listed."""
    unknown = [n for n in names or () if n not in CONTENDER_NAMES]
    if unknown:
        raise ValueError(f"--contenders: unknown {', '.join(map(repr, unknown))}; expected names from "
                         f"{', '.join(CONTENDER_NAMES)}")
    every: list[Contender] = [
        GpubpContender("gpubp", "cuda", "fused", "gpubp on the GPU: its fused kernels (dense_impl='fused')"),
        GpubpContender("gpubp-unfused", "cuda", "unfused", "gpubp on the GPU, dense_impl='unfused'"),
        TorchContender("torch-cuda", "cuda", tf32=tf32, description="PyTorch eager on the GPU"),
        TorchContender("torch-compile", "cuda", True, compile_, compile_reason or "off (--compile turns it on)", tf32,
                       "PyTorch, torch.compile(dynamic=True), on the GPU"),
        GpubpContender("numpy", "cpu", "fused", "gpubp on the CPU"),
        TorchContender("torch-cpu", "cpu", tf32=tf32, description="PyTorch eager on the CPU"),
    ]
    return [c for c in every if not names or c.name in names]
