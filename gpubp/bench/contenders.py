"""The contenders, at the same shapes, dtype and TF32 setting: gpubp (fused kernels) and gpubp-unfused
(cupy.matmul + separate kernels) on the GPU, gpubp's NumPy path (numpy), PyTorch eager on the GPU and the
CPU, torch.compile(dynamic=True) on the GPU.

``setup(case, size, inputs, copies)`` gives a :class:`Prepared`: ``step(i)`` runs one call on input copy
``i % copies``; ``result()`` gives host arrays for the gate; ``launches()`` (gpubp, when its backend has
``launch_count()``) the kernel launches of one step.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import gpubp as gp
from gpubp.bench.cases import STEP_LR, STEP_MOMENTUM, Case, model_layers
from gpubp.bench.timing import Settings, time_gpu, time_host

CONTENDER_NAMES = ("gpubp", "gpubp-unfused", "torch-cuda", "torch-compile", "numpy", "torch-cpu")


@dataclass
class Prepared:
    step: Callable[[int], Any]
    result: Callable[[], dict[str, Any]]
    launches: Callable[[], int] | None = None


def to_host(a: Any) -> np.ndarray:
    """A host copy of a NumPy, CuPy or PyTorch array (or a number)."""
    mod = type(a).__module__.split(".")[0]
    return np.array(a.detach().cpu().numpy() if mod == "torch" else a.get() if mod == "cupy" else a, copy=True)


def _scalar(v: Any) -> np.float64:
    return np.float64(to_host(v).reshape(-1)[0])


def short(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0][:300]


class Contender:
    fatal = False  # after one error every later run would fail too: say it once, then skip

    def __init__(self, name: str, device: str, description: str = "", skip: dict[str, str] | None = None) -> None:
        self.name, self.device, self.description, self.skip = name, device, description, skip or {}
        self.usable, self.broken = False, ""

    def available(self) -> tuple[bool, str]:
        return True, ""

    def supports(self, case: Case) -> tuple[bool, str]:
        """False and why for the case kinds in ``skip``."""
        return case.kind not in self.skip, self.skip.get(case.kind, "")

    def setup(self, case: Case, size: dict[str, int], inputs: dict[str, np.ndarray], copies: int) -> Prepared:
        return getattr(self, f"setup_{case.kind}")(case, size, inputs, copies)

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

    def __init__(self, name: str, device: str, impl: str = "fused", description: str = "") -> None:
        why = "the unfused variant differs from gpubp only in its dense layers"
        super().__init__(name, device, description, {"optimizer": why, "loss": why} if impl == "unfused" else {})
        self.impl = impl

    def backend(self) -> Any:
        from gpubp.backends import get_backend
        from gpubp.device import parse_device

        return get_backend(parse_device(self.device))

    def model(self, layers: list[gp.Dense], dtype: str) -> gp.Sequential:
        impl = {} if self.device == "cpu" else {"dense_impl": self.impl}  # the CPU has the reference only
        return gp.Sequential(*layers, device=self.device, dtype=dtype, seed=0, **impl)

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

    def _copies(self, be: Any, a: np.ndarray, dtype: Any, copies: int) -> list[Any]:
        return [be.asarray(np.array(a, copy=True) if self.device == "cpu" else a, dtype) for _ in range(copies)]

    def _model(self, layers: list[gp.Dense], dtype: str, flat: np.ndarray) -> tuple[gp.Sequential, Any]:
        model = self.model(layers, dtype)
        model.arena.backend.assign_(model.arena.data, np.asarray(flat, dtype=model.dtype))
        return model, model.arena.backend

    def setup_layer(self, case: Any, size: dict, inputs: dict, copies: int) -> Prepared:
        layer, fwd, last = gp.Dense(size["W"], size["W"], case.activation), case.mode == "fwd", {}
        model, be = self._model([layer], case.dtype, np.concatenate([inputs["w"].ravel(), inputs["b"]]))
        xs = self._copies(be, inputs["x"], case.dtype, copies)
        das = [] if fwd else self._copies(be, inputs["da"], case.dtype, copies)

        def step(i: int) -> None:
            last["a"] = model.forward(xs[i % copies], training=not fwd)
            if not fwd:
                last["dx"] = model.backward(das[i % copies], input_grad=True)

        def result() -> dict[str, Any]:
            grads = {} if fwd else {"dW": to_host(layer.weight.grad), "db": to_host(layer.bias.grad)}
            return {k: to_host(v) for k, v in last.items()} | grads

        return Prepared(step, result)

    def setup_step(self, case: Any, size: dict, inputs: dict, copies: int) -> Prepared:
        model, be = self._model(model_layers(case.key), case.dtype, inputs["params"])
        opt = gp.optim.SGD(model.parameters(), lr=STEP_LR, momentum=STEP_MOMENTUM)
        loss, last = gp.losses.CrossEntropy(), {}
        xs, ys = self._copies(be, inputs["x"], case.dtype, copies), self._copies(be, inputs["y"], np.int64, copies)

        def step(i: int) -> None:
            last["loss"], dout = loss.compute(model.forward(xs[i % copies], training=True), ys[i % copies], be)
            model.backward(dout)
            opt.step()

        def launches() -> int:
            n0 = be.launch_count()
            step(0)
            return int(be.launch_count() - n0)

        return Prepared(step, lambda: {"loss": _scalar(last["loss"]), "grads": to_host(model.arena.grad),
                                       "params": to_host(model.arena.data)},
                        launches if callable(getattr(be, "launch_count", None)) else None)

    def setup_optimizer(self, case: Any, size: dict, inputs: dict, copies: int) -> Prepared:
        from gpubp.parameter import Arena

        arena = Arena(size["P"], case.dtype, self.backend())
        p = arena.carve("p", (size["P"],))
        arena.backend.assign_(arena.data, inputs["p"])
        arena.backend.assign_(arena.grad, inputs["g"])
        opt = (gp.optim.Adam if case.which == "adam" else gp.optim.SGD)([p], **case.HYPER[case.which])
        return Prepared(lambda i: opt.step(), lambda: {"p": to_host(arena.data)})

    def setup_loss(self, case: Any, size: dict, inputs: dict, copies: int) -> Prepared:
        be, loss, last = self.backend(), gp.losses.CrossEntropy(), {}
        zs, y = self._copies(be, inputs["logits"], case.dtype, copies), self._copies(be, inputs["y"], np.int64, 1)[0]

        def step(i: int) -> None:
            last["out"] = loss.compute(zs[i % copies], y, be)

        return Prepared(step, lambda: {"value": _scalar(last["out"][0]), "grad": to_host(last["out"][1])})


class TorchContender(Contender):
    """PyTorch eager or torch.compile(dynamic=True), nn.Linear's layout (weight (out, in))."""

    def __init__(self, name: str, device: str, compiled: bool = False, enabled: bool = True,
                 disabled_reason: str = "", tf32: bool = False, description: str = "") -> None:
        super().__init__(name, device, description, {"optimizer": "an optimizer step alone is not compiled; "
                                                     "torch-cuda shows PyTorch's optimizer"} if compiled else {})
        self.compiled, self.enabled, self.disabled_reason, self.tf32 = compiled, enabled, disabled_reason, tf32
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
            if self.compiled and importlib.util.find_spec("triton") is None:
                return False, "torch.compile on the GPU needs Triton, which is not installed"
        return True, ""

    def _t(self, a: np.ndarray, grad: bool = False) -> Any:
        import torch

        return torch.from_numpy(np.array(a, copy=True)).to(self.device).requires_grad_(grad)

    def _fn(self, key: str | None, fn: Callable) -> Callable:
        """fn, or its compiled form: one dynamic-shape compile per case (``key``) reused across sizes; None
        compiles afresh (the function holds a network)."""
        import torch

        if not self.compiled:
            return fn
        if key is None or key not in self._fns:
            self._fns[key or ""] = torch.compile(fn, dynamic=True)
        return self._fns[key or ""]

    def setup_layer(self, case: Any, size: dict, inputs: dict, copies: int) -> Prepared:
        import torch
        import torch.nn.functional as F

        p, fwd, last = case.activation.params, case.mode == "fwd", {}
        act = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, p.get("slope")),
               "elu": lambda z: F.elu(z, p.get("alpha")), "sigmoid": torch.sigmoid, "tanh": torch.tanh,
               "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu,
               "softplus": lambda z: F.softplus(z, p.get("beta"), p.get("threshold"))}[case.activation.name]
        wt, b = self._t(inputs["w"].T, not fwd), self._t(inputs["b"], not fwd)  # (out, in), as nn.Linear
        fn = self._fn(case.name, lambda x, w, bias: act(F.linear(x, w, bias)))
        xs = [self._t(inputs["x"], not fwd) for _ in range(copies)]
        das = [] if fwd else [self._t(inputs["da"]) for _ in range(copies)]

        def step(i: int) -> None:
            with torch.set_grad_enabled(not fwd):
                last["a"] = a = fn(xs[i % copies], wt, b)
            if not fwd:
                last["g"] = torch.autograd.grad(a, (xs[i % copies], wt, b), grad_outputs=das[i % copies])

        def result() -> dict[str, Any]:
            g = last.get("g")
            return {"a": to_host(last["a"])} | ({} if fwd else {"dx": to_host(g[0]), "dW": to_host(g[1]).T,
                                                               "db": to_host(g[2])})

        return Prepared(step, result)

    def setup_step(self, case: Any, size: dict, inputs: dict, copies: int) -> Prepared:
        import torch
        import torch.nn.functional as F

        flat, sl, mods, last = inputs["params"], case.param_slices(), [], {}
        for i, ((a, b), (_, sw), (_, sb)) in enumerate(zip(case.pairs, sl[::2], sl[1::2], strict=True)):
            lin = torch.nn.Linear(a, b, dtype=getattr(torch, case.dtype), device=self.device)
            with torch.no_grad():
                lin.weight.copy_(self._t(flat[sw].reshape(a, b).T))
                lin.bias.copy_(self._t(flat[sb]))
            mods += [lin, torch.nn.ReLU()] if i < len(case.pairs) - 1 else [lin]
        net = torch.nn.Sequential(*mods)
        opt = torch.optim.SGD(net.parameters(), lr=STEP_LR, momentum=STEP_MOMENTUM)
        fn = self._fn(None, lambda x, y: F.cross_entropy(net(x), y))
        xs, ys = [self._t(inputs["x"]) for _ in range(copies)], [self._t(inputs["y"]) for _ in range(copies)]

        def step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            last["loss"] = loss = fn(xs[i % copies], ys[i % copies])
            loss.backward()
            opt.step()

        def flat_of(get: Callable[[Any], Any]) -> np.ndarray:
            lins = [m for m in net if isinstance(m, torch.nn.Linear)]
            return np.concatenate([t for m in lins for t in (to_host(get(m.weight)).T.ravel(), to_host(get(m.bias)))])

        return Prepared(step, lambda: {"loss": _scalar(last["loss"]), "grads": flat_of(lambda p: p.grad),
                                       "params": flat_of(lambda p: p)})

    def setup_optimizer(self, case: Any, size: dict, inputs: dict, copies: int) -> Prepared:
        import torch

        p = torch.nn.Parameter(self._t(inputs["p"]))
        p.grad = self._t(inputs["g"])
        opt = (torch.optim.Adam if case.which == "adam" else torch.optim.SGD)([p], **case.HYPER[case.which])
        return Prepared(lambda i: opt.step(), lambda: {"p": to_host(p)})

    def setup_loss(self, case: Any, size: dict, inputs: dict, copies: int) -> Prepared:
        import torch
        import torch.nn.functional as F

        fn = self._fn(case.name, F.cross_entropy)
        zs, y, last = [self._t(inputs["logits"], True) for _ in range(copies)], self._t(inputs["y"]), {}

        def step(i: int) -> None:
            value = fn(zs[i % copies], y)
            last["out"] = (value.detach(), torch.autograd.grad(value, zs[i % copies])[0])

        return Prepared(step, lambda: {"value": _scalar(last["out"][0]), "grad": to_host(last["out"][1])})


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
        GpubpContender("numpy", "cpu", "fused", "gpubp's NumPy reference path on the CPU"),
        TorchContender("torch-cpu", "cpu", tf32=tf32, description="PyTorch eager on the CPU"),
    ]
    return [c for c in every if not names or c.name in names]
