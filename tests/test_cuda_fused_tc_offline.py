"""Offline tests of the tensor-core kernels (kernels/dense_forward_tc.cu, dense_backward_tc.cu): no GPU.

1. Sources and tables: header sections, the C constants (Precision ids, the 64 x 64 x 32 tile, 128
   threads) in step with cuda_fused's, an instantiation per precision, activation and saved kind.
   (Their NVRTC compile and ptxas report, no spill for sm_80 / sm_90 under both NVRTCs, run with
   every other kernel in test_cuda_fused_offline.py's `gpubp kernels check`.)
2. Launchers: argument errors (dtype per precision, shapes, precision names) before any device call.
3. Host emulation (kernels/host_emulation.h: mma.sync m16n8k16 / m16n8k8, ldmatrix.x4 and the cvt
   roundings lane by lane from the PTX fragment layouts): odd shapes, no multiple of the tile, in
   tf32, bf16-mixed and fp16-mixed, through the GPU's launch plans (queue_forward_tc /
   queue_backward_tc), outputs NaN-poisoned inside guard regions, against
     - the float64 oracle under the spec's rounding (gpubp.tools.oracles_tc): every activation kind
       tested within the dot-product bound plus one rounding of the store type;
     - a float32 replica of what the emulation computes (one fmaf per k ascending, split-K slices
       in order, R_s to nearest even, tf32 by cvt.rna): bit for bit where no libm call is involved
       (z, the mask, identity / relu outputs and gradients).
   One emulator build per session holds only the instantiations these tests run.

Inputs are fresh random numbers on every run; the seed is in every failure message.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from gpubp import kernel_dir
from gpubp.activations import Activation
from gpubp.backends import cuda_fused as rk
from gpubp.tools import host_emulation
from gpubp.tools import oracles_tc as ot

PRECS = {"tf32": 0, "bf16-mixed": 1, "fp16-mixed": 2}
ACTS = [Activation("identity"), Activation("relu"), Activation("sigmoid"), Activation("gelu")]
SHAPES = [(37, 45, 70), (70, 19, 33)]  # (N, in, out): none a multiple of the 64 x 64 x 32 tile
GUARD = 16


def new_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


# =================================================================================================
# 1. Sources and tables
# =================================================================================================


@pytest.mark.parametrize("name", rk.TC_SOURCES)
def test_tc_file_opens_with_its_header_comment(name):
    text = (kernel_dir() / name).read_text()
    head = "\n".join(line for line in text.split("\n#include")[0].splitlines() if line.startswith("//"))
    for section in ("Computes", "Fused, and why", "Versions", "Benchmark", "Launch"):
        assert re.search(rf"^// {section}", head, re.M), f"{name}: no '{section}' section"
    assert re.search(r"^//   tc1 ", head, re.M) and "(N, in)" in head and "(in, out)" in head


def test_tc_constants_match_the_launchers():
    mma = (kernel_dir() / "mma.cuh").read_text()
    consts = {k: int(v) for k, v in re.findall(r"constexpr int (\w+) = (\d+);", mma)}
    assert consts["BM"] == consts["BN"] == rk.TC_TILE and consts["BK"] == rk.TC_BK
    assert consts["THREADS"] == rk.TC_BLOCK[0]
    ids = {m.group(1).lower(): int(m.group(2)) for m in re.finditer(r"PREC_([A-Z0-9]+) = (\d+)", mma)}
    assert ids == rk.PRECISIONS
    assert "why mma.sync" in mma.lower() and "cvt.rna" in mma  # the design and the rounding are documented


def test_every_precision_activation_and_saved_kind_has_a_tc_kernel():
    from gpubp.activations import TABLE

    names = {s.name for s in rk.kernel_specs()}
    for prec in rk.PRECISIONS.values():
        for act, spec in TABLE.items():
            for mode in rk.forward_modes(act):
                assert f"gpubp::dense_forward_tc1<{prec}, {spec.id}, {mode}>" in names
            for src in rk.backward_sources(act):
                for k in ("dense_dx_tc1", "dense_dw_tc1"):
                    assert f"gpubp::{k}<{prec}, {spec.id}, {src}>" in names
    assert all(s.hot for s in rk.kernel_specs() if s.file in rk.TC_SOURCES)  # spill-free is enforced


def test_split_plan_tc_depends_on_the_shape_alone():
    assert rk.split_plan_tc(65536, 64, 64) == (64, 1024)
    assert rk.split_plan_tc(4096, 4096, 4096)[0] == 1
    assert rk.split_plan_tc(70, 45, 37, split_k=2) == (2, 64)
    with pytest.raises(ValueError, match="^split_k"):
        rk.split_plan_tc(70, 45, 37, split_k=0)


# =================================================================================================
# 2. Launcher argument checks (before any device call)
# =================================================================================================


def test_tc_forward_args_dtype_per_precision():
    x16, w16, b = np.zeros((5, 3), np.float16), np.zeros((3, 4), np.float16), np.zeros(4, np.float32)
    rk.check_forward_tc_args(x16, w16, b, "relu", "fp16-mixed")
    rk.check_forward_tc_args(x16.view(np.uint16), w16.view(np.uint16), b, "relu", "bf16-mixed")
    rk.check_forward_tc_args(x16.astype(np.float32), w16.astype(np.float32), b, "relu", "tf32")
    with pytest.raises(TypeError, match="^x: expected bfloat16"):
        rk.check_forward_tc_args(x16.astype(np.float32), w16, b, "relu", "bf16-mixed")
    with pytest.raises(TypeError, match="^w: expected float16"):
        rk.check_forward_tc_args(x16, w16.astype(np.float32), b, "relu", "fp16-mixed")
    with pytest.raises(TypeError, match="^b: expected dtype float32"):
        rk.check_forward_tc_args(x16, w16, b.astype(np.float16), "relu", "fp16-mixed")
    with pytest.raises(ValueError, match="^precision"):
        rk.check_forward_tc_args(x16, w16, b, "relu", "fp32")
    with pytest.raises(ValueError, match="^w: expected shape"):
        rk.check_forward_tc_args(x16, np.zeros((4, 4), np.float16), b, "relu", "fp16-mixed")
    with pytest.raises(TypeError, match="^x: expected a CuPy array on the GPU"):
        rk.dense_forward_tc(x16, w16, b, "relu", True, "fp16-mixed")


def test_tc_backward_args():
    x, w, da = np.zeros((5, 3), np.float16), np.zeros((3, 4), np.float16), np.zeros((5, 4), np.float16)
    dw, db = np.zeros((3, 4), np.float32), np.zeros(4, np.float32)
    rk.check_backward_tc_args(da, (x, np.zeros((5, 1), np.uint32)), w, "relu", dw, db, "fp16-mixed")
    with pytest.raises(ValueError, match="needs z"):
        rk.check_backward_tc_args(da, (x, None), w, "gelu", dw, db, "fp16-mixed")
    with pytest.raises(TypeError, match="^saved z: expected float16"):
        rk.check_backward_tc_args(da, (x, da.astype(np.float32)), w, "gelu", dw, db, "fp16-mixed")
    with pytest.raises(TypeError, match="^dw: expected dtype float32"):
        rk.check_backward_tc_args(da, (x, da), w, "gelu", dw.astype(np.float16), db, "fp16-mixed")
    with pytest.raises(ValueError, match="^split_k"):
        rk.check_backward_tc_args(da, (x, da), w, "gelu", dw, db, "fp16-mixed", split_k=-1)


# =================================================================================================
# 3. Host emulation
# =================================================================================================

EMU_FORWARD = {"identity": (0,), "relu": (0, 1, 3), "sigmoid": (0,), "gelu": (1,)}
EMU_BACKWARD = {"identity": (0,), "relu": (1, 3), "sigmoid": (2,), "gelu": (1,)}


@pytest.fixture(scope="session")
def tc_emu(tmp_path_factory):
    if host_emulation.compiler() is None:
        pytest.skip("g++ not found: host emulation skipped")
    want = []
    for s in rk.kernel_specs():
        if s.file not in rk.TC_SOURCES:
            continue
        name = next((a.name for a in ACTS if a.id == s.act), None)
        if s.act is None or (s.kernel == "dense_forward_tc1" and name and s.mode in EMU_FORWARD[name]):
            want.append(s)
        elif s.kernel != "dense_forward_tc1" and name and s.mode in EMU_BACKWARD[name]:
            want.append(s)
    return host_emulation.Emulator(tmp_path_factory.mktemp("tc_emu"), specs=want)


def _poison(dtype):
    return np.array(np.nan, np.float32).astype(dtype) if np.dtype(dtype).kind == "f" else np.array(0xFFFF, dtype)


def _guarded(shape, dtype, fill):
    size = int(np.prod(shape))
    buf = np.full(size + 2 * GUARD, fill, dtype=dtype)
    return buf[GUARD : GUARD + size].reshape(shape), buf


def _intact(buf, what):
    m = np.concatenate([buf[:GUARD], buf[-GUARD:]])
    raw = m.view(np.uint32 if m.itemsize == 4 else np.uint16)
    ref = np.asarray(_poison(buf.dtype)).view(raw.dtype) if buf.dtype != np.uint32 else np.uint32(0xDEADBEEF)
    assert np.all(raw == ref), f"{what}: a kernel wrote outside its output"


def storage_dtype(prec):
    return {0: np.float32, 1: np.uint16, 2: np.float16}[prec]


def make_inputs(n, n_in, n_out, prec, seed):
    rng = np.random.default_rng(seed)
    x = ot.from_f32(rng.standard_normal((n, n_in)), prec)
    w = ot.from_f32(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), prec)
    b = rng.standard_normal(n_out).astype(np.float32)
    da = ot.from_f32(rng.standard_normal((n, n_out)), prec)
    return x, w, b, da


def emu_forward(emu, x, w, b, act, prec, training=True, mask=True):
    n, n_out = x.shape[0], w.shape[1]
    mode = rk.forward_mode(act, training, mask)
    dt = storage_dtype(prec)
    a, abuf = _guarded((n, n_out), dt, _poison(dt))
    z = zbuf = m = mbuf = None
    if mode == rk.SAVED_Z:
        z, zbuf = _guarded((n, n_out), dt, _poison(dt))
    if mode == rk.SAVED_MASK:
        m, mbuf = _guarded((n, rk.mask_words(n_out)), np.uint32, np.uint32(0xDEADBEEF))
    rk.queue_forward_tc(x, w, b, a, z, m, act, mode, prec, emu.launch)
    for buf, what in ((abuf, "a"), (zbuf, "z"), (mbuf, "mask")):
        if buf is not None:
            _intact(buf, what)
    kept = {rk.SAVED_Z: z, rk.SAVED_MASK: m}.get(mode)
    if kept is None and act.saves == "a":
        kept = a
    return a, kept


def emu_backward(emu, x, da, kept, w, act, prec, need_dx=True, split_k=None):
    n, n_in = x.shape
    n_out = w.shape[1]
    src = rk.backward_source(act, kept)
    dw, dwbuf = _guarded((n_in, n_out), np.float32, np.float32(np.nan))
    db, dbbuf = _guarded((n_out,), np.float32, np.float32(np.nan))
    dx = dxbuf = None
    if need_dx:
        dt = storage_dtype(prec)
        dx, dxbuf = _guarded((n, n_in), dt, _poison(dt))
    rk.queue_backward_tc(
        x, da, kept, w, dw, db, dx, act, src, prec, split_k, emu.launch, lambda k: np.full(k, np.nan, np.float32)
    )
    for buf, what in ((dwbuf, "dw"), (dbbuf, "db"), (dxbuf, "dx")):
        if buf is not None:
            _intact(buf, what)
    return dw, db, dx


def assert_within(name, got, want, bound, seed):
    got64 = np.asarray(got, dtype=np.float64)
    err = np.abs(got64 - want)
    bad = ~(err <= bound)  # NaN (an unwritten, poisoned element) counts as bad
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} off; first at {i}: got {got64[i]!r}, want {want[i]!r}, "
            f"|err| {err[i]:.3e} > bound {np.broadcast_to(bound, err.shape)[i]:.3e} (seed {seed})"
        )
    return float(np.max(err)) if err.size else 0.0


def check_against_oracle(x, w, b, da, act, prec, a, kept, dw, db, dx, seed):
    """Every output within its float64 bound; returns the largest |error| of each."""
    tag = f"{ot.KIND[prec]} {act.name}"
    fwd = ot.expected_forward_tc(x, w, b, act, prec)
    errs = {"a": assert_within(f"{tag} a", ot.to_f32(a, prec), *fwd["a"], seed)}
    if kept is not None and kept.dtype == np.uint32:
        z, bz = fwd["z32"]
        bits = ((kept[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(len(kept), -1)[:, : z.shape[1]]
        wrong = (np.abs(z) > bz) & (bits.astype(bool) != (z > 0))
        assert not wrong.any(), f"{tag} mask: {int(wrong.sum())} bits differ from z > 0 (seed {seed})"
    elif kept is not None and act.saves == "z":
        errs["z"] = assert_within(f"{tag} z", ot.to_f32(kept, prec), *fwd["z"], seed)
    bwd = ot.expected_backward_tc(x, w, da, act, kept, prec)
    errs["dW"] = assert_within(f"{tag} dW", dw, *bwd["dW"], seed)
    errs["db"] = assert_within(f"{tag} db", db, *bwd["db"], seed)
    if dx is not None:
        errs["dx"] = assert_within(f"{tag} dx", ot.to_f32(dx, prec), *bwd["dx"], seed)
    return errs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
@pytest.mark.parametrize("precision", list(PRECS))
def test_emulated_tc_kernels_match_the_float64_oracle(tc_emu, precision, act, shape):
    seed, prec = new_seed(), PRECS[precision]
    x, w, b, da = make_inputs(*shape, prec, seed)
    a, kept = emu_forward(tc_emu, x, w, b, act, prec)
    dw, db, dx = emu_backward(tc_emu, x, da, kept, w, act, prec)
    check_against_oracle(x, w, b, da, act, prec, a, kept, dw, db, dx, seed)


# --- bit for bit: a float32 replica of the emulated arithmetic -------------------------------------


def _chain(a_t, b_mat):
    """sum_k a_t[:, k] b_mat[k, :] in float32, k ascending, one rounding per term (exact products)."""
    acc = np.zeros((a_t.shape[0], b_mat.shape[1]), np.float32)
    for k in range(a_t.shape[1]):
        acc = acc + a_t[:, k : k + 1] * b_mat[k : k + 1, :]
    return acc


def _rows_sum(dz):
    """db as dense_dw_tc1's db blocks add: even rows, odd rows (ascending), then even + odd."""
    even = np.zeros(dz.shape[1], np.float32)
    odd = np.zeros(dz.shape[1], np.float32)
    for k in range(0, dz.shape[0], 2):
        even = even + dz[k]
    for k in range(1, dz.shape[0], 2):
        odd = odd + dz[k]
    return even + odd


@pytest.mark.parametrize("split_k", [None, 2])
@pytest.mark.parametrize("mode", ["identity", "relu-mask", "relu-z"])
@pytest.mark.parametrize("precision", list(PRECS))
def test_emulated_tc_bit_exact_where_the_rounding_is_the_same(tc_emu, precision, mode, split_k):
    seed, prec = new_seed(), PRECS[precision]
    act = Activation(mode.split("-")[0])
    x, w, b, da = make_inputs(70, 45, 37, prec, seed)
    a, kept = emu_forward(tc_emu, x, w, b, act, prec, mask=mode.endswith("mask"))
    dw, db, dx = emu_backward(tc_emu, x, da, kept, w, act, prec, split_k=split_k)
    xr, wr = ot.round_g(ot.to_f32(x, prec), prec), ot.round_g(ot.to_f32(w, prec), prec)
    z = _chain(xr, wr) + b
    a_ref = z if act.name == "identity" else np.where(z < 0, np.float32(0), z)
    msg = f"{precision} {mode} split {split_k} (seed {seed})"
    np.testing.assert_array_equal(ot.to_f32(a, prec), ot.to_f32(ot.from_f32(a_ref, prec), prec), err_msg=f"a {msg}")
    if mode == "relu-mask":
        bits = (kept[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
        np.testing.assert_array_equal(bits.reshape(70, -1)[:, :37].astype(bool), z > 0, err_msg=f"mask {msg}")
        assert not (kept[:, -1] >> np.uint32(5)).any(), f"mask bits past column 37 {msg}"
        dz = np.where(z > 0, ot.to_f32(da, prec), np.float32(0))
    elif mode == "relu-z":
        np.testing.assert_array_equal(ot.to_f32(kept, prec), ot.to_f32(ot.from_f32(z, prec), prec), err_msg=f"z {msg}")
        dz = np.where(ot.to_f32(kept, prec) > 0, ot.to_f32(da, prec), np.float32(0))
    else:
        dz = ot.to_f32(da, prec)
    dzr = ot.round_g(dz, prec)
    s, chunk = rk.split_plan_tc(70, 45, 37, split_k)
    parts = [(_chain(xr[i : i + chunk].T.copy(), dzr[i : i + chunk]), _rows_sum(dz[i : i + chunk])) for i in range(0, 70, chunk)]
    dw_ref, db_ref = parts[0]
    if s > 1:
        dw_ref, db_ref = np.float32(0) + parts[0][0], np.float32(0) + parts[0][1]
        for pw, pb in parts[1:]:
            dw_ref, db_ref = dw_ref + pw, db_ref + pb
    np.testing.assert_array_equal(dw, dw_ref, err_msg=f"dW {msg}")
    np.testing.assert_array_equal(db, db_ref, err_msg=f"db {msg}")
    dx_ref = ot.from_f32(_chain(dzr, wr.T.copy()), prec)
    np.testing.assert_array_equal(ot.to_f32(dx, prec), ot.to_f32(dx_ref, prec), err_msg=f"dx {msg}")


def test_emulated_tc_inference_writes_a_alone_and_a_first_layer_skips_dx(tc_emu):
    x, w, b, da = make_inputs(9, 5, 40, 1, new_seed())
    a, kept = emu_forward(tc_emu, x, w, b, Activation("relu"), 1, training=False)
    assert kept is None and [s.kernel for s in tc_emu.launched[-1:]] == ["dense_forward_tc1"]
    assert tc_emu.launched[-1].mode == rk.SAVED_NONE
    _, kept = emu_forward(tc_emu, x, w, b, Activation("relu"), 1)
    emu_backward(tc_emu, x, da, kept, w, Activation("relu"), 1, need_dx=False)
    assert "dense_dx_tc1" not in [s.kernel for s in tc_emu.launched[-1:]]


def test_tf32_rounding_of_the_kernels_differs_from_the_spec_only_on_ties(tc_emu):
    """cvt.rna (ties away) vs precision.round_to (ties to even): one tf32 ulp apart, on exact ties only."""
    rng = np.random.default_rng(new_seed())
    v = rng.standard_normal(4096).astype(np.float32)
    ties = ((v.view(np.uint32) & np.uint32(0xFFFFE000)) | np.uint32(0x1000)).view(np.float32)
    both = np.concatenate([v, ties])
    diff = ot.tie_difference(both)
    assert not diff[:4096].any() or np.all((v.view(np.uint32)[diff[:4096]] & np.uint32(0x1FFF)) == 0x1000)
    spec = ot.round_to(np, both, "tf32")
    rna = ot.round_tf32_rna(both)
    ulp = np.abs(spec.view(np.uint32).astype(np.int64) - rna.view(np.uint32).astype(np.int64))
    assert set(np.unique(ulp[diff])) <= {0x2000} and diff[4096:].sum() > 1000  # about half the ties: odd ones
    # the kernel rounds as cvt.rna does: x on an exact tie, W = 1, in = 1, b = 0
    x = ties[:64].reshape(64, 1)
    a, _ = emu_forward(tc_emu, x, np.ones((1, 1), np.float32), np.zeros(1, np.float32), Activation("identity"), 0, False)
    np.testing.assert_array_equal(a, ot.round_tf32_rna(x))
