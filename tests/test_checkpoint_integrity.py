"""Checkpoints that detect damage: digests, malformed and hostile files, foreign optimizers, progress."""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
import warnings

import numpy as np
import pytest
from _checkpoint_bytes import build, edit, join, meaning, small_checkpoint, split, tensors
from safetensors.numpy import save as st_save

import gpubp as gp
import gpubp.io as gio

ADAM = small_checkpoint("adam")
SGD = small_checkpoint("sgd")


def write(tmp_path, raw: bytes, name: str = "c.safetensors"):
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def reference(tmp_path, raw: bytes) -> tuple:
    return meaning(gp.load(write(tmp_path, raw, "ref.safetensors")))


# --- digests ----------------------------------------------------------------------------------


def test_every_tensor_and_the_metadata_carry_a_sha256_digest():
    header, _ = split(ADAM)
    md = header["__metadata__"]
    assert md["format_version"] == "2"
    d = json.loads(md["digests"])
    table = tensors(ADAM)
    assert d["algorithm"] == "sha256" and set(d["tensors"]) == set(table)
    for name, (code, shape, data) in table.items():  # recomputed here from the definition
        want = hashlib.sha256(json.dumps([code, shape], separators=(",", ":")).encode() + data).hexdigest()
        assert d["tensors"][name] == want, name
    covered = {k: v for k, v in md.items() if k != "digests"}
    text = json.dumps({"algorithm": "sha256", "metadata": covered, "tensors": d["tensors"]},
                      sort_keys=True, separators=(",", ":"))
    assert d["metadata"] == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("name", ["param.0.weight", "param.2.bias", "optim.0.weight.exp_avg_sq",
                                  "optim.2.bias.max_exp_avg_sq"])
def test_a_flipped_bit_in_a_tensor_is_named(tmp_path, name):
    header, data = split(ADAM)
    begin, end = header[name]["data_offsets"]
    n = len(ADAM) - len(data)
    raw = bytearray(ADAM)
    raw[n + (begin + end) // 2] ^= 0x01  # one bit of one float
    path = write(tmp_path, bytes(raw))
    with pytest.raises(ValueError, match=rf"^path: .*c\.safetensors.*: tensor '{name}' is damaged"):
        gp.load(path)
    unchecked = meaning(gp.load(path, verify=False))  # the check skipped: it loads, with the flipped bit
    assert unchecked != reference(tmp_path, ADAM)


@pytest.mark.parametrize("entry, old, new", [
    ("model", '"seed": 1', '"seed": 3'),
    ("optimizer", '"lr": 0.01', '"lr": 0.02'),
    ("scheduler", '"last_epoch": 1', '"last_epoch": 0'),
    ("progress", '"step_in_epoch": 3', '"step_in_epoch": 4'),
    ("format", "gpubp-checkpoint", "gpubp-checkpoint"),  # unchanged: must load
])
def test_changed_metadata_is_named(tmp_path, entry, old, new):
    md = split(ADAM)[0]["__metadata__"]
    assert old in md[entry]
    raw = edit(ADAM, sign=False, **{entry: md[entry].replace(old, new)})
    path = write(tmp_path, raw)
    if old == new:
        assert meaning(gp.load(path)) == reference(tmp_path, ADAM)
        return
    with pytest.raises(ValueError, match=r"^path: .*: the metadata is damaged: it does not match its digest"):
        gp.load(path)
    gp.load(path, verify=False)  # well-formed, only different


def test_a_changed_digest_or_a_changed_dtype_is_found(tmp_path):
    md = split(ADAM)[0]["__metadata__"]
    d = json.loads(md["digests"])
    first = next(iter(d["tensors"]))
    d["tensors"][first] = ("0" if d["tensors"][first][0] != "0" else "1") + d["tensors"][first][1:]
    with pytest.raises(ValueError, match="metadata is damaged"):
        gp.load(write(tmp_path, edit(ADAM, sign=False, digests=d)))
    d = json.loads(md["digests"])
    d["algorithm"] = "md5"
    with pytest.raises(ValueError, match="metadata is damaged: digest algorithm 'md5'"):
        gp.load(write(tmp_path, edit(ADAM, sign=False, digests=d)))
    # F32 -> I32 keeps every size and offset; the tensor is named (by the dtype check, which
    # runs before any tensor is read, and by its digest, which covers dtype and shape too).
    header, data = split(ADAM)
    header["optim.0.bias.exp_avg"]["dtype"] = "I32"
    with pytest.raises(ValueError, match="tensor 'optim.0.bias.exp_avg' is I32"):
        gp.load(write(tmp_path, join(header, data)))


def test_verification_can_be_skipped_and_is_checked(tmp_path):
    path = write(tmp_path, ADAM)
    assert meaning(gp.load(path, verify=False)) == meaning(gp.load(path))
    with pytest.raises(TypeError, match="^verify: expected True or False"):
        gp.load(path, verify="no")


# --- checkpoints from before digests (format version 1) -----------------------------------------


def version_1(raw: bytes) -> bytes:
    """``raw`` as the save of format version 1 wrote it: same tensors and entries, no digests."""
    md = dict(split(raw)[0]["__metadata__"])
    del md["digests"]
    md.pop("progress", None)
    md["format_version"] = "1"
    arrays = {k: np.frombuffer(b, dtype={"F32": "<f4", "F64": "<f8"}[c]).reshape(s)
              for k, (c, s, b) in tensors(raw).items()}
    return st_save(arrays, metadata=md)


def test_a_version_1_checkpoint_loads_with_a_warning(tmp_path):
    path = write(tmp_path, version_1(ADAM))
    with pytest.warns(gio.UnverifiedCheckpointWarning, match=r"format version 1 .*cannot be checked") as rec:
        ck = gp.load(path)
    assert rec[0].filename == __file__  # pointed at the caller of load
    want = reference(tmp_path, ADAM)
    assert meaning(ck)[:6] == want[:6] and ck.progress is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gp.load(path, verify=False)  # asked not to check: nothing to warn about
    # A version 1 file never held digests or progress: one that does is damaged, not old.
    with pytest.raises(ValueError, match=r"format version 1 checkpoint: unexpected entries \['digests'\]"):
        gp.load(write(tmp_path, edit(ADAM, sign=False, format_version="1", progress=None)))


def test_a_version_2_checkpoint_without_digests_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^path: .*format version 2 checkpoint: no 'digests' entry"):
        gp.load(write(tmp_path, edit(ADAM, sign=False, digests=None)))


# --- malformed and hostile files -------------------------------------------------------------------


def model_cfg(raw: bytes) -> dict:
    return json.loads(split(raw)[0]["__metadata__"]["model"])


def with_model(raw: bytes, change) -> bytes:
    cfg = model_cfg(raw)
    change(cfg)
    return edit(raw, model=cfg)


def with_tensors(raw: bytes, change, sign: bool = True) -> bytes:
    table = tensors(raw)
    change(table)
    return build(split(raw)[0]["__metadata__"], table, sign=sign)


def header_text(raw: bytes, change) -> bytes:
    header, data = split(raw)
    return join(change(json.dumps(header, separators=(",", ":"))), data)


MALFORMED = {
    # the metadata, re-signed: well-formed digests over bad contents
    "no model entry": (lambda r: edit(r, model=None), r"no 'model' entry"),
    "model not JSON": (lambda r: edit(r, model="{'layers': []"), r"'model' metadata entry is not valid JSON"),
    "model a list": (lambda r: edit(r, model=[1, 2]), r"'model' metadata entry is JSON list, expected an object"),
    "no layers": (lambda r: with_model(r, lambda c: c.pop("layers")), r"expected a non-empty 'layers' list"),
    "layer not an object": (lambda r: with_model(r, lambda c: c["layers"].__setitem__(0, 3)),
                            r"layers\[0\]: unknown layer type"),
    "activation without params": (lambda r: with_model(r, lambda c: c["layers"][0]["activation"].pop("params")),
                                  r"layers\[0\]\['activation'\] .*expected an object with 'name' and 'params'"),
    "Dense without in_features": (lambda r: with_model(r, lambda c: c["layers"][2].pop("in_features")),
                                  r"layers\[2\] \(Dense\) has no 'in_features'"),
    "unknown activation": (lambda r: with_model(r, lambda c: c["layers"][0]["activation"].update(name="swish")),
                           r"layers\[0\]: activation: unknown name 'swish'"),
    "huge activation parameter": (lambda r: with_model(
        r, lambda c: c["layers"][0]["activation"].update(name="leaky_relu", params={"slope": 10**400})),
        r"layers\[0\]: .*int too large"),
    "bad dtype": (lambda r: with_model(r, lambda c: c.update(dtype="float16")), r"'dtype' is 'float16'"),
    "seed a string": (lambda r: with_model(r, lambda c: c.update(seed="1")), r"'seed' is '1', expected an integer"),
    "negative epoch": (lambda r: with_model(r, lambda c: c.update(epoch=-1)), r"'epoch' is -1"),
    "widths do not chain": (lambda r: with_model(r, lambda c: c["layers"][2].update(in_features=5)),
                            r"layers\[2\]: in_features=5 does not match layers\[0\]'s out_features=4"),
    "architecture wider than tensors": (lambda r: with_model(r, lambda c: c["layers"][0].update(out_features=5)),
                                        r"in_features=4 does not match|tensor 'param.0.weight' has shape"),
    "optimizer unknown": (lambda r: edit(r, optimizer={"type": "Optimizer"}), r"unknown Optimizer type 'Optimizer'"),
    "optimizer lr huge": (lambda r: edit(r, optimizer=json.loads(split(r)[0]["__metadata__"]["optimizer"])
                                         | {"lr": 10**400}), r"'optimizer' entry: int too large"),
    "optimizer not JSON": (lambda r: edit(r, optimizer="[1,"), r"'optimizer' metadata entry is not valid JSON"),
    "optimizer NaN": (lambda r: edit(r, optimizer='{"type": "Adam", "lr": NaN}'), r"NaN is not a JSON number"),
    "optimizer foreign names": (lambda r: edit(r, optimizer=json.loads(split(r)[0]["__metadata__"]["optimizer"])
                                               | {"param_names": ["9.weight"]}), r"'param_names'"),
    "scheduler without optimizer": (lambda r: with_tensors(edit(r, optimizer=None), lambda t: [
        t.pop(k) for k in list(t) if k.startswith("optim.")]), r"'scheduler' entry without an 'optimizer' entry"),
    "scheduler bad": (lambda r: edit(r, scheduler={"type": "StepLR", "step_size": 0}), r"'scheduler' entry: "),
    "progress a list": (lambda r: edit(r, progress=[1]), r"'progress' metadata entry is JSON list"),
    "progress a dict": (lambda r: edit(r, progress={"a": {"b": 1}}), r"progress\['a'\]: expected None"),
    "unknown entry": (lambda r: edit(r, comment="hi"), r"unexpected entries \['comment'\]"),
    "unknown version": (lambda r: edit(r, format_version="3"), r"format version '3'; this gpubp reads versions 1, 2"),
    # the tensor set, re-signed
    "missing tensor": (lambda r: with_tensors(r, lambda t: t.pop("param.2.bias")), r"tensor 'param.2.bias' is missing"),
    "extra tensor": (lambda r: with_tensors(r, lambda t: t.update(extra=("F32", [1], b"\0" * 4))),
                     r"unexpected tensor 'extra' \(not in the architecture\)"),
    "stray optimizer tensor": (lambda r: with_tensors(r, lambda t: t.update(
        {"optim.7.weight.exp_avg": ("F32", [1], b"\0" * 4)})), r"optimizer state of '7.weight'"),
    "optimizer buffer missing": (lambda r: with_tensors(r, lambda t: t.pop("optim.0.bias.exp_avg")),
                                 r"'optimizer' entry: .*missing \['0.bias.exp_avg'\]"),
    "transposed shape": (lambda r: with_tensors(r, lambda t: t.update(
        {"param.0.weight": ("F32", [4, 3], t["param.0.weight"][2])})),
        r"tensor 'param.0.weight' has shape \(4, 3\), the architecture needs \(3, 4\)"),
    "wrong dtype": (lambda r: with_tensors(r, lambda t: t.update(
        {"param.0.bias": ("I32", [4], t["param.0.bias"][2])})), r"'param.0.bias' is I32, the model's dtype float32"),
    "float64 tensor": (lambda r: with_tensors(r, lambda t: t.update(
        {"param.0.bias": ("F64", [4], t["param.0.bias"][2] * 2)})), r"'param.0.bias' is F64"),
    # the header itself
    "empty file": (lambda r: b"", r"has 0 bytes, fewer than the 8"),
    "header length past the end": (lambda r: struct.pack("<Q", len(r)) + r[8:],
                                   r"header length is \d+ bytes, larger than the \d+ bytes after it"),
    "header length 2**64-1": (lambda r: b"\xff" * 8 + r[8:], r"header length is 18446744073709551615 bytes"),
    "truncated data": (lambda r: r[:-3], r"its bytes end at \d+ but the data section holds"),
    "trailing bytes": (lambda r: r + b"\0" * 8, r"8 bytes after the last tensor"),
    "header not UTF-8": (lambda r: header_text(r, lambda h: h.encode()[:-1] + b"\xff"), r"not UTF-8"),
    "header not JSON": (lambda r: header_text(r, lambda h: h[:-1]), r"header is not valid JSON"),
    "header a list": (lambda r: join("[]", split(r)[1]), r"header is JSON list, expected an object"),
    "header nested deep": (lambda r: join("[" * 100_000 + "]" * 100_000, split(r)[1]), r"header is not valid JSON"),
    "duplicate key": (lambda r: header_text(r, lambda h: h[:-1] + ',"param.0.bias":{}}'),
                      r"duplicate key 'param.0.bias'"),
    "metadata not strings": (lambda r: header_text(r, lambda h: h.replace('"format_version":"2"',
                                                                          '"format_version":2')),
                             r"__metadata__ is not an object of strings"),
    "unknown dtype": (lambda r: header_text(r, lambda h: h.replace('"F32"', '"F8_E4M3"', 1)),
                      r"unknown or unsupported dtype 'F8_E4M3'"),
    "negative dimension": (lambda r: header_text(r, lambda h: h.replace('"shape":[4]', '"shape":[-4]', 1)),
                           r"shape \[-4\] is not a list of integers >= 0"),
    "float dimension": (lambda r: header_text(r, lambda h: h.replace('"shape":[4]', '"shape":[4.0]', 1)),
                        r"is not a list of integers"),
    "missing data_offsets": (lambda r: header_text(r, lambda h: h.replace('"data_offsets"', '"offsets"', 1)),
                             r"expected an object with dtype, shape and data_offsets"),
    "shape needs other size": (lambda r: header_text(r, lambda h: h.replace('"shape":[4]', '"shape":[5]', 1)),
                               r"shape \(5,\) of F32 needs 20 bytes, its data_offsets span 16"),
    "overlapping tensors": (lambda r: header_text(r, lambda h: h.replace('"data_offsets":[16,32]',
                                                                         '"data_offsets":[0,16]', 1)),
                            r"overlaps or leaves a gap"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_is_refused_naming_the_problem(tmp_path, case):
    mutate, why = MALFORMED[case]
    path = write(tmp_path, mutate(ADAM), "bad.safetensors")
    with pytest.raises(ValueError, match=r"^path: .*bad\.safetensors") as info:
        gp.load(path)
    assert info.match(why), str(info.value)


def test_sizes_are_checked_before_anything_is_allocated(tmp_path):
    """Headers that declare tens of GB: refused with the allocations a small file needs."""
    cfg = model_cfg(ADAM)
    cfg["layers"][0]["out_features"] = cfg["layers"][2]["in_features"] = 100_000
    md = dict(split(ADAM)[0]["__metadata__"], model=json.dumps(cfg), optimizer="{}", scheduler="{}")
    huge = {
        # An architecture of 10**5 x 10**5 with tensors that claim those shapes and sizes.
        "architecture": join({"__metadata__": md,
                              "param.0.weight": {"dtype": "F32", "shape": [3, 100_000], "data_offsets": [0, 1_200_000]}},
                             b"\0" * 16),
        "one tensor of 2**80 elements": join({"param.0.weight": {"dtype": "F64", "shape": [2**40, 2**40],
                                                                 "data_offsets": [0, 2**83]}}, b""),
        "header of 2**62 bytes": struct.pack("<Q", 2**62) + b"{}",
    }
    for name, raw in huge.items():
        path = write(tmp_path, raw)
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=r"^path: "):
                gp.load(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, f"{name}: {peak} bytes allocated"


def test_load_leaves_a_given_model_and_optimizer_alone_when_it_fails(tmp_path):
    header, data = split(ADAM)
    n = len(ADAM) - len(data)
    raw = bytearray(ADAM)
    raw[n + header["param.2.bias"]["data_offsets"][0]] ^= 0x80
    model = gp.Sequential(gp.Dense(3, 4, "relu"), gp.Dropout(0.25), gp.Dense(4, 2), seed=5)
    before = model.arena.data.copy()
    with pytest.raises(ValueError, match="param.2.bias"):
        gp.load(write(tmp_path, bytes(raw)), model=model)
    assert np.array_equal(model.arena.data, before)
    # A bad schedule entry after a good optimizer entry: the given optimizer is put back.
    opt = gp.optim.Adam(model.parameters(), lr=0.5)
    sched = gp.schedules.StepLR(opt, step_size=9)
    snapshot = json.dumps(opt.state_dict()["meta"])
    bad = edit(ADAM, scheduler={"type": "StepLR", "step_size": 2, "gamma": 0.1, "base_lr": 0.01, "last_epoch": -1})
    with pytest.raises(ValueError, match=r"^scheduler: does not match the checkpoint .*last_epoch"):
        gp.load(write(tmp_path, bad), model=model, optimizer=opt, scheduler=sched)
    assert json.dumps(opt.state_dict()["meta"]) == snapshot and np.array_equal(model.arena.data, before)
    ck = gp.load(write(tmp_path, ADAM), model=model, optimizer=opt, scheduler=sched)  # the good file fills them
    assert ck.model is model and ck.optimizer is opt and ck.scheduler is sched and sched.last_epoch == 1


# --- saving with the wrong optimizer or schedule -------------------------------------------------


def spiral(seed: int = 0) -> gp.Sequential:
    return gp.Sequential(gp.Dense(2, 8, "relu"), gp.Dense(8, 3), seed=seed)


def test_save_refuses_an_optimizer_of_another_model_at_once(tmp_path):
    model, twin = spiral(), spiral()
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=r"^optimizer: it was built for parameters of another model \(its '0.weight'"):
        gp.save(path, model, gp.optim.Adam(twin.parameters()))
    opt = gp.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="^scheduler: it belongs to another optimizer"):
        gp.save(path, model, opt, gp.schedules.StepLR(gp.optim.Adam(model.parameters()), step_size=2))
    with pytest.raises(ValueError, match="^scheduler: given without its optimizer"):
        gp.save(path, model, None, gp.schedules.StepLR(opt, step_size=2))
    with pytest.raises(TypeError, match="^scheduler: expected a gpubp.schedules.LRSchedule"):
        gp.save(path, model, opt, "cosine")
    assert not path.exists()
    with pytest.raises(ValueError, match="^optimizer: it was built for parameters of another model"):
        gp.load(write(tmp_path, ADAM), model=model, optimizer=gp.optim.Adam(twin.parameters()))
    with pytest.raises(ValueError, match="^optimizer: given without its model"):
        gp.load(write(tmp_path, ADAM), optimizer=opt)


def test_an_optimizer_over_some_parameters_round_trips(tmp_path):
    """Fine-tuning the last layer only: the optimizer is rebuilt over the parameters it had."""
    model = spiral()
    opt = gp.optim.SGD(model.parameters()[2:], lr=0.1, momentum=0.9)
    model.backward(gp.losses.CrossEntropy()(model(np.ones((4, 2))), np.array([0, 1, 2, 0]))[1])
    opt.step()
    gp.save(tmp_path / "m.safetensors", model, opt)
    ck = gp.load(tmp_path / "m.safetensors")
    assert [p.name for p in ck.optimizer.params] == ["1.weight", "1.bias"]
    assert all(p is q for p, q in zip(ck.optimizer.params, ck.model.parameters()[2:], strict=True))
    want = opt.state_dict()["state"]
    assert all(np.array_equal(ck.optimizer.state_dict()["state"][k], want[k]) for k in want)


# --- progress --------------------------------------------------------------------------------------


def test_progress_round_trips_and_is_covered_by_the_digest(tmp_path):
    model = spiral()
    opt = gp.optim.Adam(model.parameters())
    progress = {"epoch": 4, "step_in_epoch": 17, "rng": [1, 2, [3]], "loss": 0.25, "tag": "a", "done": False,
                "none": None, "np": np.int64(3)}
    gp.save(tmp_path / "p.safetensors", model, opt, progress=progress)
    ck = gp.load(tmp_path / "p.safetensors")
    assert ck.progress == {**progress, "np": 3} and type(ck.progress["np"]) is int
    gp.save(tmp_path / "n.safetensors", model)
    assert gp.load(tmp_path / "n.safetensors").progress is None
    raw = (tmp_path / "p.safetensors").read_bytes()
    changed = edit(raw, sign=False, progress={**progress, "np": 3, "step_in_epoch": 18})
    with pytest.raises(ValueError, match="metadata is damaged"):
        gp.load(write(tmp_path, changed))


@pytest.mark.parametrize("progress, exc, why", [
    ([1, 2], TypeError, r"^progress: expected a dict"),
    ({1: 2}, TypeError, r"^progress: expected str keys, got int 1"),
    ({"loss": float("nan")}, ValueError, r"^progress\['loss'\]: expected a finite number"),
    ({"x": {"nested": 1}}, TypeError, r"^progress\['x'\]: expected None, a bool, number, str or list, got dict"),
    ({"x": [1, object()]}, TypeError, r"^progress\['x'\]\[1\]: expected None"),
    ({"x": "y" * 70_000}, ValueError, r"^progress: \d+ bytes of JSON, more than the 65536"),
])
def test_save_refuses_progress_that_is_not_small_json(tmp_path, progress, exc, why):
    with pytest.raises(exc, match=why):
        gp.save(tmp_path / "p.safetensors", spiral(), progress=progress)
    assert not (tmp_path / "p.safetensors").exists()
