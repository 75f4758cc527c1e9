"""Checkpoints: round trip, bit-exact resume, crash safety, and bad files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import gpubp as gp
import gpubp.io as gio


def spiral_model(seed: int = 0) -> gp.Sequential:
    return gp.Sequential(gp.Dense(2, 16, "relu"), gp.Dense(16, 16, "elu", ), gp.Dense(16, 3), dtype="float32", seed=seed)


OPTIMIZERS = [
    lambda ps: gp.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    lambda ps: gp.optim.Adam(ps, lr=1e-2, amsgrad=True),
    lambda ps: gp.optim.AdamW(ps, lr=1e-2),
    lambda ps: gp.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
    lambda ps: gp.optim.Adagrad(ps, lr=1e-2, lr_decay=1e-3),
]


@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=["sgd", "adam", "adamw", "rmsprop", "adagrad"])
def test_resume_is_bit_identical(tmp_path, spirals_small, make_opt):
    xt, yt, _, _ = spirals_small
    fit = dict(loss="cross_entropy", batch_size=64, verbose=0)

    straight = spiral_model()
    opt = make_opt(straight.parameters())
    sched = gp.schedules.CosineAnnealingLR(opt, T_max=4)
    straight.fit(xt, yt, optimizer=opt, epochs=4, scheduler=sched, **fit)

    first = spiral_model()
    opt1 = make_opt(first.parameters())
    sched1 = gp.schedules.CosineAnnealingLR(opt1, T_max=4)
    first.fit(xt, yt, optimizer=opt1, epochs=2, scheduler=sched1, **fit)
    path = tmp_path / "ckpt.safetensors"
    gp.save(path, first, opt1, sched1)

    ck = gp.load(path)
    assert ck.model.epoch == 2 and ck.optimizer.step_count == opt1.step_count
    ck.model.fit(xt, yt, optimizer=ck.optimizer, epochs=2, scheduler=ck.scheduler, **fit)
    assert ck.model.arena.data.tobytes() == straight.arena.data.tobytes()
    assert ck.optimizer.lr == opt.lr


def test_round_trip_restores_everything(tmp_path):
    model = gp.Sequential(gp.Dense(3, 4, gp.Activation("leaky_relu", slope=0.2)), gp.Dense(4, 2, "softplus"),
                          dtype="float64", seed=11, check_finite=True)
    opt = gp.optim.Adam(model.parameters(), lr=3e-3, betas=(0.8, 0.99))
    x = np.random.default_rng(0).standard_normal((5, 3))
    model.backward(gp.losses.MSE()(model(x), np.zeros((5, 2)))[1])
    opt.step()
    gp.save(tmp_path / "m.safetensors", model, opt)
    ck = gp.load(tmp_path / "m.safetensors")
    assert ck.model.config() == model.config()
    assert ck.model.arena.data.tobytes() == model.arena.data.tobytes()
    assert ck.model.layers[0].activation.params["slope"] == 0.2
    assert isinstance(ck.optimizer, gp.optim.Adam) and ck.optimizer.betas == (0.8, 0.99)
    assert ck.scheduler is None
    m_sd, o_sd = ck.optimizer.state_dict(), opt.state_dict()
    m_meta, m_state, o_meta, o_state = m_sd["meta"], m_sd["state"], o_sd["meta"], o_sd["state"]
    assert m_meta == o_meta and all(np.array_equal(m_state[k], o_state[k]) for k in o_state)
    assert json.loads(ck.metadata["model"])["seed"] == 11


def test_model_only_and_into_existing_model(tmp_path):
    model = spiral_model(seed=1)
    gp.save(tmp_path / "a.safetensors", model)
    target = spiral_model(seed=2)
    ck = gp.load(tmp_path / "a.safetensors", model=target)
    assert ck.model is target and ck.optimizer is None
    assert target.arena.data.tobytes() == model.arena.data.tobytes()


def test_checkpoint_has_no_pickle_and_named_tensors(tmp_path):
    model = spiral_model()
    opt = gp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.backward(gp.losses.CrossEntropy()(model(np.ones((2, 2))), np.array([0, 1]))[1])
    opt.step()
    gp.save(tmp_path / "c.safetensors", model, opt)
    raw = (tmp_path / "c.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "gpubp-checkpoint"
    names = set(header) - {"__metadata__"}
    assert {"param.0.weight", "param.2.bias", "optim.0.weight.momentum_buffer"} <= names or \
        {"param.0.weight", "param.2.bias"} <= names and any(n.startswith("optim.0.weight.") for n in names)
    assert b"pickle" not in raw and b"\x80\x04" not in raw[:8 + header_len]


def _fail_midway(monkeypatch, where):
    """Make the atomic write fail at ``where`` ("write" half-way, or "fsync")."""
    if where == "write":
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                raise OSError("disk full")

            def __getattr__(self, k):
                return getattr(self.f, k)

            def __enter__(self):
                return self

            def __exit__(self, *a):
                self.f.close()

        monkeypatch.setattr(gio.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    else:
        def boom(fd):
            raise OSError("fsync failed")

        monkeypatch.setattr(gio.os, "fsync", boom)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "ckpt.safetensors"
    model = spiral_model(seed=1)
    gp.save(path, model)
    before = path.read_bytes()
    changed = spiral_model(seed=2)
    with monkeypatch.context() as m:
        _fail_midway(m, where)
        with pytest.raises(OSError):
            gp.save(path, changed)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]  # no temp file left behind
    assert gp.load(path).model.arena.data.tobytes() == model.arena.data.tobytes()


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "t.safetensors"
    gp.save(path, spiral_model())
    raw = path.read_bytes()
    for cut in (4, 100, len(raw) - 10):
        path.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="path: .*not a readable safetensors checkpoint"):
            gp.load(path)


def test_not_safetensors_is_rejected(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a checkpoint at all, just some text" * 10)
    with pytest.raises(ValueError, match="path: "):
        gp.load(path)
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, dtype=np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a gpubp checkpoint"):
        gp.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="path: "):
        gp.load(tmp_path / "missing.safetensors")


def test_different_architecture_is_rejected(tmp_path):
    path = tmp_path / "a.safetensors"
    gp.save(path, spiral_model())
    other = gp.Sequential(gp.Dense(2, 16, "relu"), gp.Dense(16, 3), dtype="float32")
    with pytest.raises(ValueError, match="model: architecture differs"):
        gp.load(path, model=other)
    same_shape_other_act = gp.Sequential(gp.Dense(2, 16, "tanh"), gp.Dense(16, 16, "elu"), gp.Dense(16, 3), dtype="float32")
    with pytest.raises(ValueError, match="architecture differs"):
        gp.load(path, model=same_shape_other_act)
    other_dtype = gp.Sequential(gp.Dense(2, 16, "relu"), gp.Dense(16, 16, "elu"), gp.Dense(16, 3), dtype="float64")
    with pytest.raises(ValueError, match="model: dtype"):
        gp.load(path, model=other_dtype)


def test_optimizer_mismatch_is_rejected(tmp_path):
    model = spiral_model()
    gp.save(tmp_path / "a.safetensors", model, gp.optim.Adam(model.parameters()))
    with pytest.raises(ValueError):
        gp.load(tmp_path / "a.safetensors", optimizer=gp.optim.SGD(spiral_model().parameters(), lr=0.1))


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model:"):
        gp.save(tmp_path / "x", object())
    with pytest.raises(TypeError, match="optimizer:"):
        gp.save(tmp_path / "x", spiral_model(), optimizer="adam")


def test_checkpoint_after_lr_annealed_to_zero(tmp_path, spirals_small):
    xt, yt, _, _ = spirals_small
    model = spiral_model()
    opt = gp.optim.Adam(model.parameters(), lr=1e-2)
    sched = gp.schedules.CosineAnnealingLR(opt, T_max=2)
    model.fit(xt, yt, "cross_entropy", opt, epochs=2, batch_size=128, scheduler=sched, verbose=0)
    assert opt.lr == 0.0
    gp.save(tmp_path / "z.safetensors", model, opt, sched)
    ck = gp.load(tmp_path / "z.safetensors")
    assert ck.optimizer.lr == 0.0 and ck.scheduler.last_epoch == 2


def test_save_into_a_missing_folder_fails_before_writing(tmp_path):
    target = tmp_path / "no" / "such" / "run.safetensors"
    with pytest.raises(FileNotFoundError, match=r"^path: the folder .*no[/\\]such.* does not exist"):
        gp.save(target, spiral_model())
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="^path: "):
        gio.check_save_path(str(target))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="^path: .*is not a folder"):
        gp.save(tmp_path / "file" / "run.safetensors", spiral_model())
    with pytest.raises(IsADirectoryError, match="^path: .*is a folder"):
        gp.save(tmp_path, spiral_model())
    with pytest.raises(ValueError, match="^path: "):
        gp.save("", spiral_model())
    with pytest.raises(TypeError, match="^path: "):
        gp.save(3, spiral_model())
    assert sorted(os.listdir(tmp_path)) == ["file"]
    assert gio.check_save_path(tmp_path / "ok.safetensors") == str(tmp_path / "ok.safetensors")


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_gets_a_plain_files_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        gp.save(tmp_path / "m.safetensors", spiral_model())
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain").stat().st_mode & 0o777 == mode


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_overwritten_checkpoint_keeps_its_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    gp.save(path, spiral_model())
    os.chmod(path, 0o640)
    gp.save(path, spiral_model(seed=3))
    assert path.stat().st_mode & 0o777 == 0o640
    assert gp.load(path).model.seed == 3


def test_architecture_mismatch_names_dropout_layers(tmp_path):
    """The refusal describes both architectures, Dropout layers included."""
    a = gp.Sequential([gp.Dense(3, 4, "relu"), gp.Dropout(0.5), gp.Dense(4, 2)], seed=0)
    b = gp.Sequential([gp.Dense(3, 4, "relu"), gp.Dense(4, 2)], seed=0)
    path = tmp_path / "m.safetensors"
    gp.save(path, a)
    with pytest.raises(ValueError, match=r"Dropout\(0\.5\)"):
        gp.load(path, b)
