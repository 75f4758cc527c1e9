"""The contenders, one row each of ``make_contenders``' table (name, device, family: which of a case's ``ops``
it runs, the case kinds it skips and why), at the same shapes, dtype and TF32 setting. ``setup`` moves the inputs
to the device (batched ones in ``copies`` copies that steps rotate over) and wraps the case's operation.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import gpubp as gp
from gpubp.bench.cases import Case
from gpubp.bench.timing import Settings, time_host, timer

CONTENDER_NAMES = ("gpubp", "gpubp-unfused", "torch-cuda", "torch-compile", "jax-jit", "gpubp-cpu", "torch-cpu")
# Names a contender had before: old name -> the name today.
RENAMED = {"numpy": "gpubp-cpu"}  # it always ran gpubp's CPU backend (CpuBackend), never plain NumPy


@dataclass
class Prepared:
    """``step(i)`` runs one call on input copy ``i % copies``; ``result()`` gives host arrays for the gate;
    ``launches()`` the kernel launches of one step (gpubp steps, where the backend has ``launch_count()``)."""

    step: Callable[[int], Any]
    result: Callable[[], dict[str, Any]]
    launches: Callable[[], int] | None = None


def to_host(a: Any) -> np.ndarray:
    """A host copy of a NumPy, CuPy, PyTorch or JAX array (or a number); 16-bit floats (bfloat16 has no NumPy
    dtype) as float32."""
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        a = a.detach().float().cpu().numpy() if a.is_floating_point() and a.element_size() < 4 else a.detach().cpu().numpy()
    out = np.array(a.get() if mod == "cupy" else a, copy=True)  # JAX (jaxlib) arrays convert by __array__
    return out.astype(np.float32) if out.dtype.kind == "V" or str(out.dtype) in ("bfloat16", "float16") else out


def short(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[0][:300]


@dataclass(eq=False)
class Contender:
    name: str
    device: str
    family: str = "gpubp"  # the case.ops column
    description: str = ""
    skip: dict[str, str] = field(default_factory=dict)  # case kind -> why not
    impl: str = "fused"  # gpubp's dense_impl on the GPU
    compile: bool = False  # torch.compile(dynamic=True)
    off: str = ""  # why it is switched off
    tf32: bool = False

    def __post_init__(self) -> None:
        self.usable, self.broken, self._fns = False, "", {}
        self.fatal = self.compile  # after one error every later run would fail too: say it once, then skip

    def available(self) -> tuple[bool, str]:
        if self.off:
            return False, self.off
        if self.family == "gpubp":
            from gpubp.device import cuda_status

            n, why = (1, "") if self.device == "cpu" else cuda_status()
            if n == 0:
                return False, f"no GPU: {why}"
            try:
                self.model([gp.Dense(4, 4, "relu")], "float32")
            except Exception as e:
                return False, f"gpubp cannot run this here: {short(e)}"
            return True, ""
        if self.family == "jax":
            if importlib.util.find_spec("jax") is None:
                return False, "JAX is not installed"
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # not 75% of the GPU: CuPy and
            import jax  # PyTorch share the process

            try:
                jax.devices("gpu")
            except RuntimeError as e:
                return False, f"JAX sees no GPU (jax {jax.__version__}): {short(e)}"
            return True, ""
        if importlib.util.find_spec("torch") is None:
            return False, "PyTorch is not installed"
        import torch

        if self.device == "cuda":
            if not torch.cuda.is_available():
                build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
                return False, f"PyTorch sees no GPU (torch {torch.__version__}, {build})"
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
            if self.compile and importlib.util.find_spec("triton") is None:
                return False, "torch.compile on the GPU needs Triton, which is not installed"
        return True, ""

    def supports(self, case: Case) -> tuple[bool, str]:
        """False and why for the case kinds in ``skip``, a case without this family's operation (JAX: the -mixed
        training steps) and TF32 on the CPU (PyTorch's CPU matmul would run float32)."""
        if self.family not in case.ops and case.ops:
            return False, f"{self.name} runs only {'the -mixed training steps' if self.family == 'jax' else 'its cases'}"
        if case.precision == "tf32" and self.family == "torch" and self.device == "cpu":
            return False, "TF32 is a GPU tensor-core format: PyTorch's CPU matmul would run float32"
        return case.kind not in self.skip, self.skip.get(case.kind, "")

    def backend(self) -> Any:
        from gpubp.backends import get_backend
        from gpubp.device import parse_device

        return get_backend(parse_device(self.device))

    def array(self, a: np.ndarray) -> Any:
        if self.family == "jax":
            import jax

            return jax.device_put(np.array(a, copy=True), jax.devices("gpu" if self.device == "cuda" else "cpu")[0])
        if self.family == "torch":
            return __import__("torch").from_numpy(np.array(a, copy=True)).to(self.device)
        return self.backend().asarray(np.array(a, copy=True) if self.device == "cpu" else a, a.dtype)

    def model(self, layers: list[gp.Dense], dtype: str, flat: np.ndarray | None = None,
              precision: str = "fp32") -> gp.Sequential:
        impl = {} if self.device == "cpu" else {"dense_impl": self.impl}  # one CPU implementation
        impl |= {} if precision == "fp32" else {"precision": precision}
        model = gp.Sequential(*layers, device=self.device, dtype=dtype, seed=0, **impl)
        if flat is not None:
            model.arena.backend.assign_(model.arena.data, np.asarray(flat, dtype=model.dtype))
        return model

    def compiled(self, key: str | None, fn: Callable) -> Callable:
        """fn, or its compiled form: one dynamic-shape compile per case (``key``) reused across sizes; None
        compiles afresh (the function holds a network)."""
        if not self.compile:
            return fn
        if key is None or key not in self._fns:
            self._fns[key or ""] = __import__("torch").compile(fn, dynamic=True)
        return self._fns[key or ""]

    def setup(self, case: Case, size: dict[str, int], inputs: dict[str, np.ndarray], copies: int) -> Prepared:
        A = {k: [self.array(inputs[k]) for _ in range(copies if k in case.batched else 1)]  # gpubp sets its
             for k in (case.batched if self.family == "gpubp" else inputs)}  # parameters from the host
        call, last = case.ops[self.family](self, inputs, A), {}
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
        """GPU timing on the current stream, but JAX (its own streams): on the host, each step waiting for its result."""
        return time_host(step, settings) if self.family == "jax" else timer(self.device)(step, settings)

    def release(self) -> None:
        """Give cached device memory back between runs."""
        if self.device == "cuda" and "cupy" in sys.modules:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
        if self.device == "cuda" and "torch" in sys.modules:
            sys.modules["torch"].cuda.empty_cache()


def make_contenders(names: Sequence[str] | None = None, compile_: bool = False, tf32: bool = False,
                    compile_reason: str = "") -> list[Contender]:
    """The contenders in table order; ``names`` keeps those listed."""
    renamed = [n for n in names or () if n in RENAMED]
    if renamed:
        raise ValueError("--contenders: " + "; ".join(
            f"{n!r} is now called {RENAMED[n]!r} ({RENAMED[n]}: gpubp's CPU backend)" for n in renamed))
    unknown = [n for n in names or () if n not in CONTENDER_NAMES]
    if unknown:
        raise ValueError(f"--contenders: unknown {', '.join(map(repr, unknown))}; expected names from "
                         f"{', '.join(CONTENDER_NAMES)}")
    why = "the unfused variant differs from gpubp only in its dense layers"
    every = [
        Contender("gpubp", "cuda", "gpubp", "gpubp on the GPU: its fused kernels (dense_impl='fused')"),
        Contender("gpubp-unfused", "cuda", "gpubp", "gpubp on the GPU, dense_impl='unfused'",
                  {"optimizer": why, "loss": why}, impl="unfused"),
        Contender("torch-cuda", "cuda", "torch", "PyTorch eager on the GPU", tf32=tf32),
        Contender("torch-compile", "cuda", "torch", "PyTorch, torch.compile(dynamic=True), on the GPU",
                  {"optimizer": "an optimizer step alone is not compiled; torch-cuda shows PyTorch's optimizer"},
                  compile=True, off="" if compile_ else compile_reason or "off (--compile turns it on)", tf32=tf32),
        Contender("jax-jit", "cuda", "jax", "JAX, a jax.jit training step in bf16 (the -mixed steps only), "
                  "host-timed"),
        Contender("gpubp-cpu", "cpu", "gpubp", "gpubp on the CPU: its CPU backend (CpuBackend, the default)"),
        Contender("torch-cpu", "cpu", "torch", "PyTorch eager on the CPU", tf32=tf32),
    ]
    return [c for c in every if not names or c.name in names]
