"""The CUDA backend against the NumPy reference: whole models, every gradient, optimizer steps.

On a GPU these run on device="cuda" in float32 against the float64 reference, over
every activation and loss. Without a GPU the same code runs on device="cudasim":
the backend's own logic with host arrays and its Numba kernels in the simulator,
on a reduced grid (the simulator runs every GPU thread as a Python thread).
Inputs are fresh random numbers on every run; the seed is in each failure message.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubp as gp
from gpubp.activations import NAMES
from tests.conftest import GPUS

ON_GPU = GPUS > 0
DEVICE = "cuda" if ON_GPU else "cudasim"
# float32 on the GPU, as users train; float64 under the simulator, so that any
# disagreement with the reference is a logic error, not rounding.
DTYPE = "float32" if ON_GPU else "float64"
TOL = gp.accuracy.MODEL[DTYPE].kw()
ACTS = list(NAMES) if ON_GPU else ["identity", "relu", "sigmoid", "gelu", "softplus"]
LOSSES = ["mse", "cross_entropy", "bce_with_logits"]
WIDTHS = (17, 33, 13, 5) if ON_GPU else (3, 5, 4)
BATCH = 33 if ON_GPU else 7
STEPS = 20 if ON_GPU else 3


@pytest.fixture
def seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


def targets(loss: str, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    if loss == "cross_entropy":
        return rng.integers(0, k, size=n)
    if loss == "bce_with_logits":
        return rng.uniform(0, 1, size=(n, k))
    return rng.standard_normal((n, k))


def pair(act: str, seed: int) -> tuple[gp.Sequential, gp.Sequential]:
    """The same network on the device (DTYPE) and as the float64 CPU reference."""

    def build(device: str, dtype: str) -> gp.Sequential:
        layers = [gp.Dense(WIDTHS[i], WIDTHS[i + 1], act) for i in range(len(WIDTHS) - 1)]
        return gp.Sequential(*layers, device=device, dtype=dtype, seed=seed % 1000)

    return build(DEVICE, DTYPE), build("cpu", "float64")


def host(model: gp.Sequential, arr) -> np.ndarray:
    return np.asarray(model.arena.backend.to_numpy(arr), dtype=np.float64)


def poison_grads(model: gp.Sequential) -> None:
    model.arena.backend.assign_(model.arena.grad, np.full(model.arena.size, np.nan, dtype=model.dtype))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
def test_forward_gradients_and_steps_match_reference(act, loss, seed):
    """Each step checked from the device's own state, so rounding cannot accumulate into a verdict.

    Forward, loss and gradients: against the float64 reference holding the device's current
    parameters (MODEL tolerance). The Adam step: against the same update computed by the
    reference in the device's dtype, from the device's parameters, gradients and optimizer
    state (a few ulp). Comparing 20 float32 Adam steps with a float64 run instead is unsound:
    Adam's first update is lr * sign(g), which float32 rounding legitimately flips for g ~ 0.
    """
    rng = np.random.default_rng(seed)
    dev, ref = pair(act, seed)
    np.testing.assert_allclose(host(dev, dev.arena.data), ref.arena.data, rtol=1e-7, err_msg=f"seed {seed}")
    same = dev.clone(device="cpu")  # the reference in the device's dtype
    opt_d = gp.optim.Adam(dev.parameters(), lr=1e-2)
    opt_s = gp.optim.Adam(same.parameters(), lr=1e-2)
    lf = gp.losses.get(loss)
    ulp = 4 * np.finfo(DTYPE).eps
    for step in range(STEPS):
        ref.arena.data[...] = host(dev, dev.arena.data)
        x = rng.standard_normal((BATCH, WIDTHS[0]))
        y = targets(loss, rng, BATCH, WIDTHS[-1])
        out_d, out_r = dev(x), ref(x)
        msg = f"seed {seed}, step {step}"
        np.testing.assert_allclose(host(dev, out_d), out_r, **TOL, err_msg=f"forward, {msg}")
        val_d, g_d = lf(out_d, y)
        val_r, g_r = lf(out_r, y)
        assert val_d == pytest.approx(val_r, rel=TOL["rtol"], abs=TOL["atol"]), msg
        poison_grads(dev)  # backward writes every gradient: none may stay NaN
        dev.backward(g_d)
        ref.backward(g_r)
        for p_d, p_r in zip(dev.parameters(), ref.parameters(), strict=True):
            np.testing.assert_allclose(host(dev, p_d.grad), p_r.grad, **TOL, err_msg=f"{p_d.name} grad, {msg}")
        same.arena.data[...] = dev.arena.backend.to_numpy(dev.arena.data)
        same.arena.grad[...] = dev.arena.backend.to_numpy(dev.arena.grad)
        opt_s.load_state_dict(opt_d.state_dict())
        opt_d.step()
        opt_s.step()
        want = same.arena.data.astype(np.float64)
        np.testing.assert_allclose(host(dev, dev.arena.data), want, rtol=ulp, atol=ulp * 1e-2,
                                   err_msg=f"Adam step, {msg}")


OPTIMIZERS = {
    "sgd": lambda ps: gp.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda ps: gp.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "rmsprop": lambda ps: gp.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda ps: gp.optim.Adagrad(ps, lr=1e-2, lr_decay=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fit_matches_reference(name, seed):
    rng = np.random.default_rng(seed)
    dev, ref = pair("tanh", seed)
    x = rng.standard_normal((2 * BATCH + 3, WIDTHS[0]))  # a last partial batch
    y = rng.integers(0, WIDTHS[-1], size=len(x))
    kw = dict(loss="cross_entropy", epochs=2, batch_size=BATCH, verbose=0, clip_grad_norm=0.5)
    h_d = dev.fit(x, y, optimizer=OPTIMIZERS[name](dev.parameters()), **kw)
    h_r = ref.fit(x, y, optimizer=OPTIMIZERS[name](ref.parameters()), **kw)
    np.testing.assert_allclose(h_d["loss"], h_r["loss"], **TOL, err_msg=f"seed {seed}")
    assert h_d["accuracy"] == h_r["accuracy"]
    np.testing.assert_allclose(host(dev, dev.arena.data), ref.arena.data, **TOL, err_msg=f"seed {seed}")
    e_d, e_r = dev.evaluate(x, y, "cross_entropy"), ref.evaluate(x, y, "cross_entropy")
    assert e_d["loss"] == pytest.approx(e_r["loss"], rel=TOL["rtol"])
    np.testing.assert_allclose(dev.predict(x), ref.predict(x), **TOL)


def test_model_moves_between_devices_and_back(seed):
    model = gp.Sequential(gp.Dense(3, 4, "relu"), gp.Dense(4, 2), dtype=DTYPE, seed=seed % 1000)
    before = model.arena.data.copy()
    x = np.random.default_rng(seed).standard_normal((5, 3))
    want = model.predict(x)
    model.to(DEVICE)
    assert str(model.device) == ("cuda:0" if ON_GPU else "cudasim")
    assert not isinstance(model.arena.data, np.ndarray) or not ON_GPU
    np.testing.assert_allclose(model.predict(x), want, **TOL)
    model.to("cpu")
    assert model.arena.data.tobytes() == before.tobytes()


def test_checkpoint_of_a_device_model(tmp_path, seed):
    dev, _ = pair("relu", seed)
    opt = gp.optim.Adam(dev.parameters())
    rng = np.random.default_rng(seed)
    dev.fit(rng.standard_normal((10, WIDTHS[0])), rng.integers(0, WIDTHS[-1], 10), "cross_entropy", opt,
            epochs=1, batch_size=5, verbose=0)
    gp.save(tmp_path / "d.safetensors", dev, opt)
    ck = gp.load(tmp_path / "d.safetensors")  # rebuilt on the CPU
    assert ck.model.arena.data.tobytes() == host(dev, dev.arena.data).astype(ck.model.dtype).tobytes()
    ck_dev = gp.load(tmp_path / "d.safetensors", device=DEVICE)
    assert host(ck_dev.model, ck_dev.model.arena.data).tobytes() == host(dev, dev.arena.data).tobytes()
    assert ck_dev.optimizer.step_count == opt.step_count


def test_check_finite_on_the_device():
    model = gp.Sequential(gp.Dense(2, 3), gp.Dense(3, 2), dtype=DTYPE, device=DEVICE, check_finite=True)
    host_data = host(model, model.arena.data)
    host_data[8] = np.nan  # layer 0 holds W (2, 3) at 0..5 and b (3,) at 6..8: a NaN bias
    model.arena.backend.assign_(model.arena.data, host_data.astype(model.dtype))
    with pytest.raises(gp.NonFiniteError, match="layer 0"):
        model(np.ones((2, 2)))


def test_gradcheck_command_on_the_device(capsys):
    from gpubp import cli

    code = cli.main(["gradcheck", "--device", DEVICE, "--activations", "tanh", "--losses", "cross_entropy",
                     "--depths", "2", "--dtypes", DTYPE])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "1 passed, 0 failed" in out


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_device_inputs_are_taken_without_a_copy():
    import cupy

    model = gp.Sequential(gp.Dense(4, 3), device="cuda", dtype="float32")
    x = cupy.random.standard_normal((6, 4), dtype=cupy.float32)
    assert model.arena.backend.asarray(x, np.float32) is x
    np.testing.assert_allclose(cupy.asnumpy(model(x)), model.predict(cupy.asnumpy(x)), rtol=1e-6)
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        t = torch.randn(6, 4, device="cuda")
        got = model.arena.backend.asarray(t, np.float32)
        assert got.data.ptr == t.data_ptr()


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_device_memory_does_not_grow_over_1000_steps():
    import cupy

    rng = np.random.default_rng(0)
    model = gp.Sequential(gp.Dense(32, 64, "relu"), gp.Dense(64, 10), device="cuda", seed=0)
    x = cupy.asarray(rng.standard_normal((256, 32)), dtype=cupy.float32)
    y = cupy.asarray(rng.integers(0, 10, 256))
    opt = gp.optim.Adam(model.parameters())
    loss = gp.losses.CrossEntropy()
    pool = cupy.get_default_memory_pool()
    used = []
    for step in range(1000):
        out = model(x)
        value, g = loss.compute(out, y, model.arena.backend)
        model.backward(g)
        opt.step()
        if step in (10, 999):
            cupy.cuda.get_current_stream().synchronize()
            used.append(pool.used_bytes())
    assert used[1] <= used[0], used


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_out_of_memory_says_how_much():
    model = gp.Sequential(gp.Dense(4, 3), device="cuda")
    with pytest.raises(MemoryError, match=r"MiB asked for; .* MiB free of"):
        model.arena.backend.zeros((1 << 46,), np.float32)


def test_no_gpu_error_says_why_and_how_to_fix():
    if ON_GPU:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match=r"no GPU can be used: .*fix"):
        gp.Sequential(gp.Dense(2, 2), device="cuda")
    with pytest.raises(RuntimeError, match="no GPU"):
        gp.Sequential(gp.Dense(2, 2), device="cuda:1")


def test_fused_dense_needs_float32_and_a_real_gpu():
    with pytest.raises(ValueError, match="float32 only"):
        gp.Sequential(gp.Dense(2, 2), device=DEVICE, dtype="float64", dense_impl="fused")
    if not ON_GPU:
        with pytest.raises(ValueError, match="real GPU only"):
            gp.Sequential(gp.Dense(2, 2), device=DEVICE, dtype="float32", dense_impl="fused")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: the CUDA C kernels run only there")
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "identity"])
def test_fused_model_matches_reference(act, seed):
    rng = np.random.default_rng(seed)
    layers = lambda: [gp.Dense(17, 33, act), gp.Dense(33, 5, act)]  # noqa: E731
    dev = gp.Sequential(*layers(), device="cuda", dtype="float32", seed=seed % 1000, dense_impl="fused")
    ref = gp.Sequential(*layers(), device="cpu", dtype="float64", seed=seed % 1000)
    opt_d, opt_r = gp.optim.SGD(dev.parameters(), lr=0.05, momentum=0.9), gp.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        x = rng.standard_normal((BATCH, 17))
        y = rng.integers(0, 5, BATCH)
        out_d, out_r = dev(x), ref(x)
        np.testing.assert_allclose(host(dev, out_d), out_r, **TOL, err_msg=f"seed {seed}, step {step}")
        dev.backward(gp.losses.CrossEntropy()(out_d, y)[1])
        ref.backward(gp.losses.CrossEntropy()(out_r, y)[1])
        for p_d, p_r in zip(dev.parameters(), ref.parameters(), strict=True):
            np.testing.assert_allclose(host(dev, p_d.grad), p_r.grad, **TOL, err_msg=f"{p_d.name}, seed {seed}")
        opt_d.step()
        opt_r.step()


def test_a_guarded_optimizer_step_does_not_wait_for_the_device(monkeypatch):
    """fit's non-finite guard reaches the optimizer kernels as a device flag: an update with the
    flag set changes nothing, and nothing is read back to the host to decide it."""
    model = gp.Sequential(gp.Dense(5, 4, "relu"), gp.Dense(4, 3), device=DEVICE, dtype="float32", seed=1)
    b = model.arena.backend
    b.assign_(model.arena.grad, np.linspace(-1, 1, model.arena.size, dtype=np.float32))
    before = host(model, model.arena.data)
    flag = b.asarray(np.array([2], np.int64), np.int64)
    for opt in (gp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gp.optim.Adam(model.parameters(), lr=0.1),
                gp.optim.RMSprop(model.parameters(), lr=0.1), gp.optim.Adagrad(model.parameters(), lr=0.1)):
        with monkeypatch.context() as m:
            def no_reads(*a, **k):
                raise AssertionError("the guarded step read the device")

            m.setattr(type(b), "to_numpy", no_reads)
            m.setattr(b.nbo, "_read_scalar", no_reads)
            opt.step(guard=flag)
        np.testing.assert_array_equal(host(model, model.arena.data), before, err_msg=type(opt).__name__)
    gp.optim.SGD(model.parameters(), lr=0.1).step(guard=b.asarray(np.array([0], np.int64), np.int64))
    assert not np.array_equal(host(model, model.arena.data), before)


def _step_launches(dense_impl: str) -> float:
    """Launches per training step of a 6-8-8-3 relu MLP (batch 16, Adam, cross-entropy), warmed up."""
    model = gp.Sequential(gp.Dense(6, 8, "relu"), gp.Dense(8, 8, "relu"), gp.Dense(8, 3), device=DEVICE,
                          dtype="float32", seed=0, dense_impl=dense_impl)
    b = model.arena.backend
    assert b.fused == (dense_impl == "fused")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 6)).astype(np.float32), rng.integers(0, 3, 64)
    opt = gp.optim.Adam(model.parameters(), lr=1e-3)
    # graph=False: the eager step's launches, one by one (a recorded step is one graph launch on a GPU)
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=16, shuffle=False, verbose=0, graph=False)  # warm
    before = b.launch_count()
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=16, shuffle=False, verbose=0, graph=False)  # 4 steps
    return (b.launch_count() - before) / 4


def test_kernel_launches_of_one_training_step():
    """One Adam step of a 3-layer relu MLP with cross-entropy and the non-finite guard, counted
    launch by launch: per layer forward GEMM + bias/activation (2 each: 6), the loss (2),
    backward per layer activation' (relu layers: 2), bias gradient (2 each: 6), dW GEMM (3) and
    dx GEMM (not the first layer: 2), the guard (3), one optimizer update over the arena (1)."""
    assert _step_launches("unfused") == 6 + 2 + 2 + 6 + 3 + 2 + 3 + 1


@pytest.mark.skipif(not ON_GPU, reason="the fused CUDA C kernels run on a GPU only (CI runs them in the host emulation)")
def test_kernel_launches_of_one_fused_training_step():
    """The same step on the fused CUDA C kernels: per layer one forward kernel (GEMM + bias +
    activation: 3), the loss (2), per layer one dW + db kernel (activation' fused in; plus a
    split-K reduction where split_plan cuts the batch), dx (not the first layer: 2), the guard (3),
    the update (1)."""
    from gpubp.backends import cuda_fused

    dw = sum(1 + (cuda_fused.split_plan(16, i, o)[0] > 1) for i, o in ((6, 8), (8, 8), (8, 3)))
    assert _step_launches("fused") == 3 + 2 + dw + 2 + 3 + 1


def test_fused_launches_are_counted(monkeypatch):
    """Every kernel the fused launcher queues adds one to cuda_fused.launch_count() (no GPU needed:
    the compiled kernel is replaced by a recorder)."""
    from gpubp.activations import Activation
    from gpubp.backends import cuda_fused

    queued = []
    monkeypatch.setattr(cuda_fused.launch, "get_kernel", lambda spec, act_id: lambda *a: queued.append(spec.name))
    act = Activation("relu")
    launch = cuda_fused._cupy_launcher(act)
    spec = cuda_fused.kernel_specs()[0]
    before = cuda_fused.launch_count()
    for _ in range(3):
        launch(spec, (1, 1, 1), (1, 1, 1), ())
    assert cuda_fused.launch_count() - before == 3 and queued == [spec.name] * 3
