"""What the contenders other than gpubp do to run a case in a mixed precision (gpubp.precision): PyTorch's modes
(``torch_modes``: allow_tf32 for tf32, ``torch.autocast`` to bfloat16 / float16 for the -mixed ones) and a JAX
training step under ``jax.jit`` (``jax_step_op``: GEMM inputs cast to bfloat16 / float16, float32 accumulation by
``preferred_element_type``, activations stored in the 16-bit type, float32 master parameters, loss and update).
PyTorch and JAX are imported only when an operation is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from gpubp.precision import get as get_precision

TORCH_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}  # the GEMM kind -> the autocast dtype (torch attribute)


@contextlib.contextmanager
def _allow_tf32(on: bool) -> Iterator[None]:
    """torch.backends.cuda.matmul.allow_tf32 set to ``on`` for the block, then put back."""
    import torch

    matmul = torch.backends.cuda.matmul
    before, matmul.allow_tf32 = matmul.allow_tf32, on
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def torch_modes(precision: str, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(around the whole call, around the forward) for PyTorch on ``device`` ("cuda" or "cpu"): tf32 sets allow_tf32
    for forward and backward (cuBLAS rounds the GEMM inputs to TF32; nothing else changes); bf16-mixed and
    fp16-mixed run the forward (the loss included: autocast keeps cross-entropy in float32) under
    ``torch.autocast(device, dtype)``, backward outside it as PyTorch recommends; fp32 changes nothing."""
    kind = get_precision(precision).gemm
    if kind is None:
        return contextlib.nullcontext, contextlib.nullcontext
    if kind == "tf32":
        return (lambda: _allow_tf32(True)), contextlib.nullcontext
    import torch

    dtype = getattr(torch, TORCH_AUTOCAST[kind])
    return contextlib.nullcontext, lambda: torch.autocast(device, dtype=dtype)


def torch_half(precision: str) -> Any:
    """The torch dtype autocast gives a -mixed precision's outputs (None for fp32 and tf32)."""
    kind = get_precision(precision).gemm
    return getattr(__import__("torch"), TORCH_AUTOCAST[kind]) if kind in TORCH_AUTOCAST else None


def jax_step_op(precision: str, widths: list[int], lr: float, momentum: float) -> Callable[..., Callable[[int], dict]]:
    """op(contender, host inputs, device copies) -> call(i) of a training step of the relu MLP ``widths`` (identity
    output, mean softmax cross-entropy, SGD with momentum as torch.optim.SGD: the first step's buffer is the
    gradient) under ``jax.jit``: x W in ``precision``'s GEMM kind with float32 accumulation
    (``preferred_element_type=float32``), the bias and activation in float32, each layer's output stored in the 16-bit
    type, the loss in float32. Parameters come from the flat float32 arena (gpubp's layout: weight (in, out), then
    bias, per layer). Each call waits for its result (``block_until_ready``): JAX runs on its own streams, so the
    step is timed on the host."""
    kind = get_precision(precision).gemm
    pairs = list(zip(widths[:-1], widths[1:], strict=True))

    def op(c: Any, inp: dict, A: dict) -> Callable[[int], dict]:
        import jax
        import jax.numpy as jnp

        low = {"bf16": jnp.bfloat16, "fp16": jnp.float16}.get(kind, jnp.float32)
        flat, params, off = A["params"][0], [], 0
        for a, b in pairs:
            params.append((flat[off:off + a * b].reshape(a, b), flat[off + a * b:off + a * b + b]))
            off += a * b + b

        def loss_fn(ps: list, x: Any, y: Any) -> Any:
            h = x.astype(low)
            for i, (w, b) in enumerate(ps):
                z = jnp.dot(h.astype(low), w.astype(low), preferred_element_type=jnp.float32) + b
                h = (jax.nn.relu(z) if i < len(ps) - 1 else z).astype(low)
            logits = h.astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

        @jax.jit
        def step(ps: list, buf: list, x: Any, y: Any, first: Any) -> tuple:
            loss, grads = jax.value_and_grad(loss_fn)(ps, x, y)
            buf = jax.tree_util.tree_map(lambda m, g: jnp.where(first, g, momentum * m + g), buf, grads)
            ps = jax.tree_util.tree_map(lambda p, m: p - lr * m, ps, buf)
            return ps, buf, loss, grads

        state = {"ps": params, "buf": jax.tree_util.tree_map(jnp.zeros_like, params), "first": True}

        def flat_of(tree: list) -> Callable[[], Any]:
            return lambda: jnp.concatenate([t for w, b in tree for t in (w.reshape(-1), b)])

        def call(i: int) -> dict:
            ps, buf, loss, grads = step(state["ps"], state["buf"], A["x"][i % len(A["x"])], A["y"][i % len(A["y"])],
                                        jnp.asarray(state["first"]))
            jax.block_until_ready(ps)
            state.update(ps=ps, buf=buf, first=False)
            return {"loss": loss, "grads": flat_of(grads), "params": flat_of(ps)}
        return call

    return op
