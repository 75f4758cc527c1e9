"""Golden bits: the final parameters of short training runs, recorded once and kept.

A restructuring of the layers, losses, optimizers, backends or the training loop must not
change a single bit of what training computes. Each run below trains a small MLP for a few
epochs (every optimizer and its variants, every activation, every loss, shuffling, clipping,
a schedule and dropout) on the CPU backends (the float64 reference, the fast CPU backend in
float32 and float64) with one BLAS and one Numba thread, and its final parameters must equal
the recorded ones bit for bit (tests/golden/final_params.npz).

    python tests/test_golden.py --record     # after a change that is MEANT to change the bits

Bits depend on the BLAS build and the CPU's vector width as well as on gpubp: the file
records the machine it was made on; on another kind of machine a mismatch is reported with
both descriptions (re-record there, or compare on a machine like CI's).
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gpubp as gp  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "final_params.npz"

# (name, optimizer factory, activation, loss, fit options). Every optimizer variant once,
# every activation and loss at least once.
OPTIMIZERS = {
    "sgd": lambda p: gp.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: gp.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "sgd_nesterov": lambda p: gp.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: gp.optim.Adam(p, lr=1e-2),
    "adam_amsgrad": lambda p: gp.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-3),
    "adamw": lambda p: gp.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "rmsprop": lambda p: gp.optim.RMSprop(p, lr=1e-3),
    "rmsprop_centered": lambda p: gp.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.5),
    "adagrad": lambda p: gp.optim.Adagrad(p, lr=5e-2),
}
RUNS = [
    ("sgd", "relu", "cross_entropy", {}),
    ("sgd_momentum", "tanh", "mse", {}),
    ("sgd_nesterov", "leaky_relu", "bce_with_logits", {"clip_grad_norm": 0.5}),
    ("adam", "gelu", "cross_entropy", {"dropout": 0.2}),
    ("adam_amsgrad", "elu", "mse", {}),
    ("adamw", "silu", "cross_entropy", {"schedule": True}),
    ("rmsprop", "sigmoid", "bce_with_logits", {}),
    ("rmsprop_centered", "softplus", "cross_entropy", {}),
    ("adagrad", "gelu_tanh", "mse", {}),
    ("adam", "identity", "cross_entropy", {"shuffle": False}),
]
BACKENDS = [("reference", "float64"), ("auto", "float32"), ("auto", "float64")]
IN, HIDDEN, OUT, N, BATCH, EPOCHS = 5, 12, 3, 96, 16, 3


def run_key(index: int, impl: str, dtype: str) -> str:
    opt, act, loss, _ = RUNS[index]
    return f"{index}-{opt}-{act}-{loss}-{impl}-{dtype}"


def train(index: int, impl: str, dtype: str) -> np.ndarray:
    """The final parameters (the arena, as float64) of run ``index`` on one backend."""
    opt_name, act, loss, opts = RUNS[index]
    rng = np.random.default_rng(100 + index)
    x = rng.standard_normal((N, IN))
    if loss == "cross_entropy":
        y = rng.integers(0, OUT, N)
    elif loss == "bce_with_logits":
        y = (rng.uniform(size=(N, OUT)) < 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((N, OUT))
    layers = [gp.Dense(IN, HIDDEN, act)]
    if opts.get("dropout"):
        layers.append(gp.Dropout(opts["dropout"]))
    layers += [gp.Dense(HIDDEN, HIDDEN, act), gp.Dense(HIDDEN, OUT)]
    model = gp.Sequential(*layers, dtype=dtype, seed=7 + index, dense_impl=impl)
    opt = OPTIMIZERS[opt_name](model.parameters())
    kw = {"epochs": EPOCHS, "batch_size": BATCH, "verbose": 0, "shuffle": opts.get("shuffle", True)}
    if "clip_grad_norm" in opts:
        kw["clip_grad_norm"] = opts["clip_grad_norm"]
    if opts.get("schedule"):
        kw["scheduler"] = gp.schedules.CosineAnnealingLR(opt, T_max=EPOCHS)
    model.fit(x.astype(dtype), y, loss, opt, **kw)
    return np.asarray(model.arena.backend.to_numpy(model.arena.data), dtype=np.float64)


def machine() -> str:
    """What the bits depend on besides gpubp: CPU, BLAS build, NumPy."""
    from threadpoolctl import threadpool_info

    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    return f"{platform.machine()} {platform.processor() or ''}; numpy {np.__version__}; blas {', '.join(blas)}"


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One BLAS thread (OpenBLAS's sums change with the thread count) and one Numba thread."""
    from threadpoolctl import threadpool_limits

    from gpubp import threads

    before = threads.policy().threads
    threads.set_policy(threads=1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        threads.set_policy(threads=before)


def record() -> None:
    out = {}
    with _one_thread():
        for i in range(len(RUNS)):
            for impl, dtype in BACKENDS:
                out[run_key(i, impl, dtype)] = train(i, impl, dtype)
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, **out, __machine__=np.array(json.dumps(machine())))
    print(f"recorded {len(out)} runs in {GOLDEN}")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing: python tests/test_golden.py --record")
    with np.load(GOLDEN) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize(("impl", "dtype"), BACKENDS, ids=[f"{i}-{d}" for i, d in BACKENDS])
@pytest.mark.parametrize("index", range(len(RUNS)), ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in RUNS])
def test_training_keeps_its_golden_bits(golden, index, impl, dtype):
    key = run_key(index, impl, dtype)
    with _one_thread():
        got = train(index, impl, dtype)
    want = golden[key]
    if not np.array_equal(got, want):
        diff = np.abs(got - want)
        recorded_on = json.loads(str(golden["__machine__"]))
        pytest.fail(
            f"{key}: {int(np.count_nonzero(got != want))} of {got.size} parameters differ (max |diff| "
            f"{diff.max():.3e}).\n  recorded on: {recorded_on}\n  this machine: {machine()}\n"
            "If the change is meant to change what training computes, re-record: python tests/test_golden.py --record"
        )


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    record()
