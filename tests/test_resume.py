"""Mid-epoch resume: a fit interrupted inside an epoch and resumed (in the same process, or
from the checkpoint ModelCheckpoint writes on the interrupt) ends with the parameters and
the epoch records of an uninterrupted fit, bit for bit.

Interrupts come at steps drawn from a seeded generator, as a KeyboardInterrupt raised by a
callback's on_batch_end or as a real SIGINT sent to this process (Ctrl-C), on the fast CPU
backend, the NumPy reference backend and, where the simulator runs, the CUDA backend.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import gpubp as gp
from tests.conftest import CUDA_MODE

SIM = CUDA_MODE.startswith("simulator")


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    return rng.standard_normal((n, 4)) + 1.5 * np.eye(3, 4)[y], y


def build(device: str = "cpu", impl: str = "auto", dtype: str = "float64") -> tuple:
    model = gp.Sequential(gp.Dense(4, 6, "relu"), gp.Dropout(0.25), gp.Dense(6, 3), device=device,
                          dense_impl=impl, dtype=dtype, seed=3)
    opt = gp.optim.Adam(model.parameters(), lr=0.02)
    return model, opt, gp.schedules.StepLR(opt, step_size=1, gamma=0.7)


class InterruptAt(gp.callbacks.Callback):
    """Ctrl-C after global step ``at`` (the optimizer's step count): a raised KeyboardInterrupt,
    or a SIGINT to this process as the terminal would send."""

    def __init__(self, at: int, how: str) -> None:
        self.at, self.how = at, how

    def on_batch_end(self, step, logs):
        if self.run.optimizer.step_count == self.at:
            if self.how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)


def epochs_of(history: dict) -> dict:
    """The records of completed epochs (wall time aside)."""
    return {k: v for k, v in history.items() if k not in ("time", "stopped")}


def host(model) -> bytes:
    return model.arena.backend.to_numpy(model.arena.data).tobytes()


def train(device, impl, dtype, n, batch, epochs, stops, tmp_path=None, **fit_kw):
    """Fit ``epochs`` epochs, interrupted after each global step in ``stops``; after each interrupt
    go on with the same objects, or (``tmp_path``) from the checkpoint written on the interrupt.
    Returns (final parameter bytes, the completed epochs' records, the progress seen at each stop)."""
    x, y = data(n)
    model, opt, sched = build(device, impl, dtype)
    records: dict = {}
    seen = []
    for k, at in enumerate([*stops, None]):
        cbs = [] if at is None else [InterruptAt(at, "raise" if k % 2 == 0 else "signal")]
        if tmp_path is not None:
            cbs.append(gp.callbacks.ModelCheckpoint(tmp_path / "ck.safetensors", monitor="loss"))
        hist = model.fit(x, y, "cross_entropy", opt, epochs=epochs - model.epoch, batch_size=batch, verbose=0,
                         scheduler=sched, validation_split=0.2, callbacks=cbs, **fit_kw)
        for key, v in epochs_of(hist).items():
            records.setdefault(key, []).extend(v)
        if at is None:
            assert hist["stopped"] == "completed"
            break
        assert hist["stopped"] == "interrupted", (at, hist)
        assert opt.step_count == at  # the step in flight finished, no more
        seen.append(model.progress())
        if tmp_path is not None:
            ck = gp.load(tmp_path / "ck.safetensors", device=device)
            assert ck.progress == model.progress()
            assert ck.model.progress() == ck.progress  # gp.load sets the position: the next fit continues there
            assert host(ck.model) == host(model)
            model, opt, sched = ck.model, ck.optimizer, ck.scheduler
    return host(model), records, seen


def stops_for(seed: int, total: int, count: int) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(np.arange(1, total), size=count, replace=False).tolist())


CPU_CASES = [("auto", "float32"), ("auto", "float64"), ("reference", "float64")]


@pytest.mark.parametrize("impl,dtype", CPU_CASES)
@pytest.mark.parametrize("seed", [None, 0, 1])
def test_interrupted_and_resumed_in_process_equals_uninterrupted_on_cpu(impl, dtype, seed):
    n, batch, epochs = 37, 4, 3  # 30 training rows: 8 steps per epoch, the last of 2 rows
    want, want_records, _ = train("cpu", impl, dtype, n, batch, epochs, [])
    # None: the edges (the first step, an epoch's last step and the next one's first, the very last)
    stops = [1, 8, 9, 23] if seed is None else stops_for(seed, 8 * epochs, 4)
    got, records, seen = train("cpu", impl, dtype, n, batch, epochs, stops)
    assert got == want, f"stops {stops}"
    assert records == want_records, f"stops {stops}"
    for at, pos in zip(stops, seen, strict=True):
        if at % 8:  # inside an epoch
            assert (pos["epoch"], pos["step"], pos["steps"]) == (at // 8, at % 8, 8)
        else:  # after an epoch's last step, before its end (validation, schedule, record)
            assert (pos["epoch"], pos["step"]) == (at // 8 - 1, 8)


@pytest.mark.parametrize("impl,dtype", CPU_CASES)
def test_interrupted_and_resumed_from_checkpoints_equals_uninterrupted_on_cpu(impl, dtype, tmp_path):
    n, batch, epochs = 37, 4, 3
    want, want_records, _ = train("cpu", impl, dtype, n, batch, epochs, [], gradient_stats=True)
    for seed in (2, 3):
        stops = stops_for(seed, 8 * epochs, 3)
        got, records, _ = train("cpu", impl, dtype, n, batch, epochs, stops, tmp_path, gradient_stats=True)
        assert got == want, f"stops {stops}"
        assert records == want_records, f"stops {stops}"


@pytest.mark.skipif(not SIM, reason="needs the Numba CUDA simulator")
def test_interrupted_and_resumed_equals_uninterrupted_on_cudasim(tmp_path):
    n, batch, epochs = 12, 4, 2  # 10 training rows: 3 steps per epoch
    want, want_records, _ = train("cudasim", "auto", "float32", n, batch, epochs, [])
    stops = stops_for(4, 3 * epochs, 2)
    got, records, _ = train("cudasim", "auto", "float32", n, batch, epochs, stops, tmp_path)
    assert got == want, f"stops {stops}"
    assert records == want_records, f"stops {stops}"


def test_progress_is_none_at_epoch_boundaries_and_json_inside_an_epoch():
    import json

    x, y = data(20)
    model, opt, _ = build()
    assert model.progress() is None
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0)
    assert model.progress() is None  # a completed epoch
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0, callbacks=[InterruptAt(4, "raise")])
    pos = model.progress()
    assert json.loads(json.dumps(pos)) == pos
    assert {k: v for k, v in pos.items() if k != "sums"} == {
        "epoch": 1, "step": 1, "steps": 3, "samples": 20, "batch_size": 8, "shuffle": True, "world": 1,
        "optimizer_steps": 4, "applied": 8, "skipped": 0}
    assert len(pos["sums"]) == 1 and pos["sums"][0][2] == 8  # loss sum, correct, counted over 8 rows
    twin = model.clone()
    assert twin.progress() == pos


def test_resume_with_other_batch_size_or_data_is_refused_and_can_be_dropped():
    x, y = data(20)
    model, opt, _ = build()
    model.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=8, verbose=0, callbacks=[InterruptAt(2, "raise")])
    before = host(model)
    with pytest.raises(ValueError, match=r"model: it stopped after step 2 of 3 of epoch 1 \(batch_size 8, 20 "
                                         r"training samples, shuffle=True\); this fit has batch_size 4.*"
                                         r"model.load_progress\(None\)"):
        model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=4, verbose=0)
    with pytest.raises(ValueError, match="this fit has training samples 19"):
        model.fit(x[:19], y[:19], "cross_entropy", opt, epochs=1, batch_size=8, verbose=0)
    with pytest.raises(ValueError, match="this fit has shuffle False"):
        model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, shuffle=False, verbose=0)
    assert host(model) == before and opt.step_count == 2
    model.load_progress(None)  # start epoch 1 again
    hist = model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=4, verbose=0)
    assert opt.step_count == 2 + 5 and model.epoch == 1 and len(hist["loss"]) == 1


def test_resume_with_another_optimizer_or_parameters_is_refused(tmp_path):
    x, y = data(20)
    model, opt, _ = build()
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0)
    gp.save(tmp_path / "epoch1.safetensors", model, opt)
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0, callbacks=[InterruptAt(5, "raise")])
    with pytest.raises(ValueError, match=r"optimizer: it has taken 0 steps, but the model stopped after step 2 of 3 "
                                         r"of epoch 2 .* after its optimizer's step 5"):
        model.fit(x, y, "cross_entropy", gp.optim.Adam(model.parameters()), epochs=1, batch_size=8, verbose=0)
    # The optimizer put back to another step by hand, behind the position's back: refused.
    model.load_progress(None)
    gp.load(tmp_path / "epoch1.safetensors", model, opt)
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0, callbacks=[InterruptAt(5, "raise")])
    state = opt.state_dict()
    opt.load_state_dict({"meta": {**state["meta"], "step": 3}, "state": state["state"]})
    with pytest.raises(ValueError, match="optimizer: it has taken 3 steps"):
        model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0)
    # gp.load of a checkpoint taken at an epoch's end drops the stale position: the epoch starts at step 1
    gp.load(tmp_path / "epoch1.safetensors", model, opt)
    assert model.progress() is None
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0)
    assert opt.step_count == 6 and model.epoch == 2


def test_load_progress_checks_its_argument():
    x, y = data(20)
    model, opt, _ = build()
    model.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=8, verbose=0, callbacks=[InterruptAt(4, "raise")])
    pos = model.progress()
    other, _, _ = build()
    with pytest.raises(ValueError, match=r"progress\['epoch'\]: the position is inside epoch 2, but this model has "
                                         r"trained 0 epochs"):
        other.load_progress(pos)
    other.epoch = 1
    other.load_progress(pos)
    assert other.progress() == pos
    with pytest.raises(TypeError, match="progress: expected a dict"):
        other.load_progress([1, 2])
    with pytest.raises(ValueError, match=r"progress: missing keys \['sums'\]"):
        other.load_progress({k: v for k, v in pos.items() if k != "sums"})
    with pytest.raises(ValueError, match=r"progress\['step'\]: expected an integer in \[0, 3\], got 9"):
        other.load_progress({**pos, "step": 9})
    with pytest.raises(ValueError, match=r"progress\['sums'\]: expected one \[loss_sum, correct, counted\] per rank"):
        other.load_progress({**pos, "sums": [pos["sums"][0]] * 2})
    assert other.progress() == pos  # nothing changed
    other.load_progress({**pos, "sums": [["nan", 3, 8]]})  # on_nonfinite="ignore" may sum NaN: JSON-safe text
    assert other.progress()["sums"] == [["nan", 3, 8]]


def test_after_divergence_the_next_fit_starts_the_epoch_again():
    x, y = data(28)
    model, _, _ = build()
    opt = gp.optim.SGD(model.parameters(), lr=0.1)
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0, shuffle=False)
    xbad = x.copy()
    xbad[8:16] = 1e308  # step 2 of 4 (no shuffle) overflows
    with pytest.raises(gp.NonFiniteError, match="epoch 2, step 2"):
        model.fit(xbad, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0, shuffle=False)
    assert model.progress() is None and opt.step_count == 4 + 1  # step 1 of epoch 2 applied, no position kept
    hist = model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0)  # other settings: fine
    assert opt.step_count == 4 + 1 + 4 and model.epoch == 2 and np.isfinite(hist["loss"][0])


def test_load_sets_a_saved_position_and_drops_a_stale_one(tmp_path):
    """gp.load applies a position saved mid-epoch to the model it returns or fills; a checkpoint
    without one (or with a progress dict of the caller's own) leaves the model at an epoch boundary."""
    x, y = gp.datasets.spirals(64, 2, seed=0)
    model = gp.Sequential(gp.Dense(2, 8, "relu"), gp.Dense(8, 2), seed=0)
    opt = gp.optim.SGD(model.parameters(), lr=0.1)

    class Stop(gp.callbacks.Callback):
        def on_batch_end(self, step, logs):
            if step == 2:
                raise KeyboardInterrupt

    path = tmp_path / "ck.safetensors"
    hist = model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0,
                     callbacks=[Stop(), gp.callbacks.ModelCheckpoint(path, monitor="loss")])
    assert hist["stopped"] == "interrupted" and model.progress() is not None
    ck = gp.load(path)
    assert ck.model.progress() == model.progress() == ck.progress
    other = gp.Sequential(gp.Dense(2, 8, "relu"), gp.Dense(8, 2), seed=1)
    gp.load(path, model=other)
    assert other.progress() == ck.progress
    plain = tmp_path / "plain.safetensors"
    gp.save(plain, gp.Sequential(gp.Dense(2, 8, "relu"), gp.Dense(8, 2), seed=2), progress={"note": 1})
    gp.load(plain, model=other)  # a stale position is dropped; the caller's own dict is not a position
    assert other.progress() is None
