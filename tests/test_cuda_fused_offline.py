"""Offline tests of the CUDA C dense kernels (kernels/*.cu): no GPU, no driver, no CuPy needed.

1. NVRTC. ``python -m gpubp kernels check --json`` runs once per NVRTC, in a subprocess as a user
   runs it, and compiles every instantiation for sm_80 and sm_90; the tests read its report: every
   kernel compiled, has registers and shared memory, no spill or stack frame in a hot kernel, every
   activation id of gpubp.activations.TABLE has its instantiations, exit status 0. It runs under
   the NVRTC cuda-pathfinder finds (the newest supported, from the cuda13 extra) and under the
   oldest supported, 13.0, which $GPUBP_NVRTC_OLDEST names (.ci/run installs it with
   pip install --target); without it those tests skip, saying so. A missing NVRTC is said once.
2. Sources. Each .cu opens with the header comment sections; ids and tile constants in the C
   headers mirror the Python side; ``import gpubp`` imports neither CuPy nor NVRTC.
3. Launchers. Argument checks that fail before any device call (dtype, shape, version, split).
4. Host emulation. The kernels compiled as plain C++ by g++ (kernels/host_emulation.h: each
   CUDA thread a std::thread, barriers for __syncthreads and warp shuffles) and run on the CPU
   through the launch code the GPU uses (cuda_fused.queue_forward / queue_backward; the driver is
   gpubp.tools.host_emulation, the references and bounds gpubp.tools.oracles), against
   the NumPy float64 reference, outputs poisoned with NaN inside guard regions. This checks
   indexing, edge tiles, the vector / scalar paths, masks, split-K and summation order; not
   what only hardware shows (the device libm's last bits, memory ordering, speed): the GPU
   tests (test_cuda_fused_gpu.py) do that where a GPU exists.

Inputs are fresh random numbers on every run; the seed is in every failure message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpubp import kernel_dir
from gpubp.activations import TABLE, Activation
from gpubp.backends import cuda_fused as rk
from gpubp.cli import main as cli_main
from gpubp.tools import host_emulation, oracles
from gpubp.tools import nvrtc_check as nc
from tests.conftest import GPUS

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")


# The oldest NVRTC the project supports (pyproject.toml: nvidia-cuda-nvrtc>=13.0), as a library or
# a folder holding one; .ci/run installs nvidia-cuda-nvrtc==13.0.88 with pip --target and sets it.
OLDEST_ENV = "GPUBP_NVRTC_OLDEST"


def _nvrtc_missing(path: str | None = None) -> str:
    try:
        nc.nvrtc_version(path)
    except Exception as e:  # no NVRTC library
        return f"NVRTC unavailable: {e}"
    return ""


NVRTC_MISSING = _nvrtc_missing()
needs_nvrtc = pytest.mark.skipif(bool(NVRTC_MISSING), reason=NVRTC_MISSING or "ok")
needs_gxx = pytest.mark.skipif(host_emulation.compiler() is None, reason="g++ not found: host emulation skipped")


# =================================================================================================
# 1. NVRTC: the CLI compiles everything once; the tests read its report
# =================================================================================================


def _nvrtc_under_test(which: str) -> str | None:
    """None: the default NVRTC; else the oldest supported one's path (skips where it is absent)."""
    if which == "default":
        if NVRTC_MISSING:
            pytest.skip(NVRTC_MISSING)
        return None
    path = os.environ.get(OLDEST_ENV)
    if not path:
        pytest.skip(f"${OLDEST_ENV} is not set: the check under NVRTC 13.0 is skipped (.ci/run sets it)")
    missing = _nvrtc_missing(path)
    if missing:
        pytest.fail(f"${OLDEST_ENV}={path}: {missing}")
    return path


@pytest.fixture(scope="module", params=["default", "oldest"])
def check_run(request, tmp_path_factory):
    path = _nvrtc_under_test(request.param)
    out = tmp_path_factory.mktemp("kernel_check") / "report.json"
    cmd = [sys.executable, "-m", "gpubp", "kernels", "check", "--arch", ",".join(ARCHS), "--json", str(out)]
    if path is not None:
        cmd += ["--nvrtc", path]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    data = json.loads(out.read_text()) if out.exists() else None
    if path is not None and data is not None:  # the library asked for is the one that compiled
        assert tuple(data["nvrtc"]) == nc.load(path).version() and data["nvrtc_path"] == nc.load(path).path
    return proc, data


@pytest.fixture(scope="module")
def reports(check_run):
    proc, data = check_run
    assert data is not None, f"no JSON report; stderr:\n{proc.stderr[-4000:]}"
    return {(r["arch"], r["name"]): r for r in data["reports"]}


def test_cli_check_exits_zero(check_run):
    proc, data = check_run
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout tail:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    assert "0 problem(s)" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith(" ok")]
    assert len(rows) == len(rk.kernel_specs()) * len(ARCHS)  # one row per kernel and architecture


def test_every_instantiation_compiles_for_each_arch(reports):
    want = {(a, s.name) for a in ARCHS for s in rk.kernel_specs()}
    assert set(reports) == want
    errors = [f"{k}: {r['error']}" for k, r in reports.items() if r["error"]]
    assert not errors, "\n".join(errors[:10])


def test_no_spill_and_no_stack_in_hot_kernels(reports):
    bad = [
        f"{a} {r['label']}: {r['spill_stores']}/{r['spill_loads']} B spilled, {r['stack_bytes']} B stack"
        for (a, _), r in reports.items()
        if r["hot"] and (r["spill_stores"] or r["spill_loads"] or r["stack_bytes"])
    ]
    assert not bad, "\n".join(bad)


def test_report_has_registers_and_shared_memory(reports):
    for (arch, name), r in reports.items():
        assert 1 <= r["registers"] <= 255, (arch, name, r["registers"])
        assert r["shared_bytes"] >= 0 and r["stack_bytes"] >= 0, (arch, name)
        if "splitk_reduce" not in name:
            assert r["shared_bytes"] > 0, f"{arch} {name}: a tiled GEMM without shared memory?"
        if r["hot"] and "splitk_reduce" not in name:
            # __launch_bounds__(256, 2): two blocks per SM must fit (registers and shared memory)
            assert r["registers"] <= 128, (arch, name, r["registers"])
            assert 2 * r["shared_bytes"] <= 96 * 1024, (arch, name, r["shared_bytes"])


def test_every_activation_id_has_instantiations(reports):
    names = {name for (_, name) in reports}
    for act, spec in TABLE.items():
        for mode in rk.forward_modes(act):
            assert f"gpubp::dense_forward_v1<{spec.id}, {mode}>" in names, act
            for vec in ("true", "false"):
                assert f"gpubp::dense_forward_v2<{spec.id}, {mode}, {vec}>" in names, act
        for src in rk.backward_sources(act):
            for k in ("dense_dx", "dense_dw"):
                assert f"gpubp::{k}_v1<{spec.id}, {src}>" in names, act
                for vec in ("true", "false"):
                    assert f"gpubp::{k}_v2<{spec.id}, {src}, {vec}>" in names, act
    # training saves what the table says: z for the "z" activations (and the mask for relu /
    # leaky_relu), nothing extra for identity / sigmoid / tanh
    for act, spec in TABLE.items():
        modes = rk.forward_modes(act)
        assert rk.SAVED_NONE in modes
        assert (rk.SAVED_Z in modes) == (spec.saves == "z")
        assert (rk.SAVED_MASK in modes) == (act in rk.MASK_ACTIVATIONS)


@needs_nvrtc
def test_offline_check_function_on_a_subset():
    relu = TABLE["relu"].id
    subset = [s for s in rk.kernel_specs() if s.act == relu and s.version == 2 and s.vec]
    out = nc.offline_check(["sm_90"], specs=subset)
    assert [r.spec for r in out] == sorted(subset, key=lambda s: rk.SOURCES.index(s.file))
    for r in out:
        assert isinstance(r, nc.KernelReport) and r.arch == "sm_90" and not r.problems
        assert r.registers > 0 and r.shared_bytes > 0 and r.lowered.startswith("_Z")


@needs_nvrtc
def test_compile_error_is_reported_not_raised():
    bad = rk.KernelSpec(rk.FORWARD_FILE, "dense_forward_v2", 2, 42, 0, True, True)  # no activation 42
    out = nc.check_program(rk.FORWARD_FILE, "sm_80", [bad])
    assert len(out) == 1 and out[0].error and nc.problems(out)


def test_check_cli_rejects_a_bad_arch(capsys):
    assert cli_main(["kernels", "check", "--arch", "compute_xx"]) == 2
    assert "arch" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["option", "env"])
def test_check_without_nvrtc_says_once_what_is_missing(how, tmp_path):
    """No NVRTC: one message naming what is missing and the fix; no rows, no traceback, exit 2."""
    missing = str(tmp_path / "no-such-libnvrtc.so.13")
    cmd = [sys.executable, "-m", "gpubp", "kernels", "check", "--arch", "sm_80,sm_90"]
    env = {k: v for k, v in os.environ.items() if k != nc.ENV_VAR}
    if how == "option":
        cmd += ["--nvrtc", missing]
    else:
        env[nc.ENV_VAR] = missing
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc
    assert proc.stdout == "", proc.stdout[:2000]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr[-3000:]
    assert "NVRTC was not found" in err[0] and missing in err[0]
    assert "pip install 'gpubp[cuda13]'" in err[0]
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr


def test_nvrtc_location_by_folder_file_or_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(nc.ENV_VAR, raising=False)
    lib = tmp_path / "pkg" / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libnvrtc.alt.so.13"):
        (lib / name).write_bytes(b"")
    assert nc.locate(tmp_path / "pkg")[0] == str((lib / "libnvrtc.so.13").resolve())
    assert nc.locate(lib / "libnvrtc.so.13")[0] == str((lib / "libnvrtc.so.13").resolve())
    monkeypatch.setenv(nc.ENV_VAR, str(lib))
    assert nc.locate()[1].startswith(f"${nc.ENV_VAR}")
    with pytest.raises(nc.NvrtcNotFoundError, match=r"pip install 'gpubp\[cuda13\]'"):
        nc.locate(tmp_path / "empty-folder-that-is-missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(nc.NvrtcNotFoundError, match="no libnvrtc"):
        nc.locate(tmp_path / "empty")
    with pytest.raises(nc.NvrtcNotFoundError, match="would not load"):
        nc.Nvrtc(str(lib / "libnvrtc.so.13"))  # an empty file is no library
    assert nc.describe(tmp_path / "empty").startswith("not found: ")


def test_supported_nvrtc_range_is_declared():
    """pyproject.toml's cuda13 extra pins NVRTC to the range the kernels are checked under."""
    (line,) = [ln for ln in (REPO / "pyproject.toml").read_text().splitlines() if ln.startswith("cuda13 = [")]
    (req,) = [r for r in re.findall(r'"([^"]+)"', line) if r.startswith("nvidia-cuda-nvrtc")]
    (lo_major, lo_minor), (hi_major, _) = nc.SUPPORTED
    assert req.replace(" ", "") == f"nvidia-cuda-nvrtc>={lo_major}.{lo_minor},<{hi_major}"


def test_info_names_the_nvrtc_of_cupy_and_of_the_check():
    proc = subprocess.run([sys.executable, "-m", "gpubp", "info"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line[:11].strip(): line[12:] for line in proc.stdout.splitlines()}
    assert "NVRTC CuPy" in lines and "NVRTC check" in lines, proc.stdout
    if not NVRTC_MISSING:
        major, minor = nc.nvrtc_version()
        assert lines["NVRTC check"].startswith(f"{major}.{minor} at ")


def test_parse_ptxas_report():
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1gv\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 8 registers, used 0 barriers, 360 bytes cmem[0]\n"
    )
    got = nc.parse_ptxas(log)
    assert got["_Z1kv"] == dict(registers=40, shared_bytes=1024, stack_bytes=16, spill_stores=8, spill_loads=4)
    assert got["_Z1gv"] == dict(registers=8, shared_bytes=0, stack_bytes=0, spill_stores=0, spill_loads=0)


# =================================================================================================
# 2. Sources
# =================================================================================================


def test_kernel_files_exist():
    for name in ("activations.cuh", "gemm_tile.cuh", "dense_forward.cu", "dense_backward.cu", "README.md"):
        assert (kernel_dir() / name).is_file(), name


@pytest.mark.parametrize("name", rk.SOURCES)
def test_cu_file_opens_with_its_header_comment(name):
    text = (kernel_dir() / name).read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("//"):
            break
        header.append(line)
    head = "\n".join(header)
    assert len(header) > 20, f"{name}: the header comment is missing or short"
    for section in ("Computes", "Fused, and why", "Versions", "Benchmark", "Launch"):
        assert re.search(rf"^// {section}", head, re.M), f"{name}: no '{section}' section in the header"
    assert re.search(r"^//   v1 ", head, re.M) and re.search(r"^//   v2 ", head, re.M), f"{name}: versions v1, v2"
    assert "(N, in)" in head and "(in, out)" in head, f"{name}: shapes"


def test_activation_ids_mirror_the_table():
    text = (kernel_dir() / "activations.cuh").read_text()
    ids = {m.group(1).lower(): int(m.group(2)) for m in re.finditer(r"ACT_([A-Z_]+) = (\d+)", text)}
    assert ids == {name: spec.id for name, spec in TABLE.items()}
    kinds = dict(re.findall(r"(SAVED_[A-Z]+) = (\d+)", text))
    assert {k: int(v) for k, v in kinds.items()} == {
        "SAVED_NONE": rk.SAVED_NONE,
        "SAVED_Z": rk.SAVED_Z,
        "SAVED_A": rk.SAVED_A,
        "SAVED_MASK": rk.SAVED_MASK,
    }


def test_tile_constants_match_the_launchers():
    text = (kernel_dir() / "gemm_tile.cuh").read_text()
    consts = {k: int(v) for k, v in re.findall(r"constexpr int (\w+) = (\d+);", text)}
    assert consts["BM"] == consts["BN"] == rk.V2_TILE
    assert consts["BK"] == rk.V2_BK
    assert consts["THREADS"] == rk.V2_BLOCK[0]
    fwd = (kernel_dir() / "dense_forward.cu").read_text()
    assert "constexpr int T = 32;" in fwd and rk.V1_TILE == 32 and rk.V1_BLOCK == (32, 8, 1)


def test_module_source_carries_the_headers_digest():
    src = rk.module_source(rk.FORWARD_FILE)
    assert src.startswith((kernel_dir() / rk.FORWARD_FILE).read_text())
    assert rk.headers_digest() in src
    assert any(o.startswith("-I") and Path(o[2:]) == kernel_dir() for o in rk.compile_options())


def test_import_gpubp_imports_neither_cupy_nor_nvrtc():
    code = (
        "import sys, gpubp, gpubp.cli, gpubp.tools.kernels_command, gpubp.backends.cuda_fused\n"
        "gpubp.cli.build_parser()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'cupy' or m.startswith('cuda.bindings')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# =================================================================================================
# 3. Launcher argument checks (they fail before any device call)
# =================================================================================================


def _f32(*shape):
    return np.zeros(shape, np.float32)


def test_forward_args_dtype_and_shape():
    x, w, b = _f32(5, 3), _f32(3, 4), _f32(4)
    with pytest.raises(TypeError, match="^x: expected dtype float32"):
        rk.dense_forward(x.astype(np.float64), w, b, "relu")
    with pytest.raises(TypeError, match="^w: expected dtype float32"):
        rk.dense_forward(x, w.astype(np.float16), b, "relu")
    with pytest.raises(ValueError, match="^x: expected a 2-d array"):
        rk.dense_forward(_f32(5), w, b, "relu")
    with pytest.raises(ValueError, match="^w: expected shape"):
        rk.dense_forward(x, _f32(4, 4), b, "relu")
    with pytest.raises(ValueError, match="^b: expected shape"):
        rk.dense_forward(x, w, _f32(5), "relu")
    with pytest.raises(ValueError, match="^w: in and out must be >= 1"):
        rk.dense_forward(_f32(5, 0), _f32(0, 4), b, "relu")
    with pytest.raises(ValueError, match="unknown name"):
        rk.dense_forward(x, w, b, "swish")
    with pytest.raises(ValueError, match="^version"):
        rk.dense_forward(x, w, b, "relu", version=3)
    with pytest.raises(ValueError, match="^out_z: this call saves no z"):
        rk.dense_forward(x, w, b, "relu", False, out_z=_f32(5, 4))
    with pytest.raises(TypeError, match="^x: expected a CuPy array on the GPU, got a NumPy array"):
        rk.dense_forward(x, w, b, "relu")  # all checks pass; host arrays are refused before CuPy


def test_backward_args_dtype_and_shape():
    x, w, da, z = _f32(5, 3), _f32(3, 4), _f32(5, 4), _f32(5, 4)
    dw, db = _f32(3, 4), _f32(4)
    with pytest.raises(ValueError, match="^saved: expected"):
        rk.dense_backward(da, (x,), w, "gelu", dw, db, True)
    with pytest.raises(ValueError, match="needs z"):
        rk.dense_backward(da, (x, None), w, "gelu", dw, db, True)
    with pytest.raises(TypeError, match="mask is only valid for relu"):
        rk.dense_backward(da, (x, np.zeros((5, 1), np.uint32)), w, "gelu", dw, db, True)
    with pytest.raises(ValueError, match="^saved mask: expected shape"):
        rk.dense_backward(da, (x, np.zeros((5, 2), np.uint32)), w, "relu", dw, db, True)
    with pytest.raises(ValueError, match="^saved z: expected shape"):
        rk.dense_backward(da, (x, _f32(5, 5)), w, "gelu", dw, db, True)
    with pytest.raises(ValueError, match="^saved x: expected shape"):
        rk.dense_backward(da, (_f32(6, 3), z), w, "gelu", dw, db, True)
    with pytest.raises(TypeError, match="^da: expected dtype float32"):
        rk.dense_backward(da.astype(np.float64), (x, z), w, "gelu", dw, db, True)
    with pytest.raises(ValueError, match="^dw: expected shape"):
        rk.dense_backward(da, (x, z), w, "gelu", _f32(4, 3), db, True)
    with pytest.raises(ValueError, match="^db: expected shape"):
        rk.dense_backward(da, (x, z), w, "gelu", dw, _f32(3), True)
    with pytest.raises(ValueError, match="^split_k"):
        rk.dense_backward(da, (x, z), w, "gelu", dw, db, True, split_k=0)
    with pytest.raises(ValueError, match="^split_k: version 1"):
        rk.dense_backward(da, (x, z), w, "gelu", dw, db, True, version=1, split_k=2)
    with pytest.raises(TypeError, match="^da: expected a CuPy array on the GPU"):
        rk.dense_backward(da, (x, z), w, "gelu", dw, db, True)


def test_backward_refuses_a_mask_of_2_31_words():
    """The backward kernels index mask words with 32-bit ints: a larger mask is refused, by name."""

    class Big:  # shape and dtype are all the checks read
        def __init__(self, shape, dtype=np.float32):
            self.shape, self.dtype = shape, np.dtype(dtype)

    n = 2**31 // 2 + 1
    with pytest.raises(ValueError, match="^saved mask: .* words exceed"):
        rk.check_backward_args(Big((n, 64)), (Big((n, 8)), Big((n, 2), np.uint32)), Big((8, 64)), "relu",
                               Big((8, 64)), Big((64,)))


def test_split_plan_depends_on_the_shape_alone():
    for n, i, o in [(65536, 64, 64), (600, 20, 40), (17, 33, 65), (1, 4096, 4096), (10**6, 7, 3), (4096, 4096, 4096)]:
        s, chunk = rk.split_plan(n, i, o)
        assert chunk % rk.V2_BK == 0 and s * chunk >= n and (s - 1) * chunk < n
        assert (s, chunk) == rk.split_plan(n, i, o)
        assert 1 <= s <= rk.SPLIT_MAX
    assert rk.split_plan(65536, 64, 64) == (64, 1024)
    assert rk.split_plan(4096, 4096, 4096)[0] == 1  # 1024 tiles fill the GPU already
    assert rk.split_plan(600, 20, 40, split_k=3) == (3, 200)


def test_forward_mode_and_backward_source():
    relu, gelu, sig = Activation("relu"), Activation("gelu"), Activation("sigmoid")
    assert rk.forward_mode(relu, False) == rk.SAVED_NONE  # inference writes a alone
    assert rk.forward_mode(relu, True) == rk.SAVED_MASK
    assert rk.forward_mode(relu, True, mask=False) == rk.SAVED_Z
    assert rk.forward_mode(gelu, True) == rk.SAVED_Z
    assert rk.forward_mode(sig, True) == rk.SAVED_NONE  # a is the output already
    assert rk.backward_source(relu, np.zeros((1, 1), np.uint32)) == rk.SAVED_MASK
    assert rk.backward_source(relu, _f32(1, 1)) == rk.SAVED_Z
    assert rk.backward_source(sig, _f32(1, 1)) == rk.SAVED_A
    assert rk.backward_source(Activation("identity"), None) == rk.SAVED_NONE


# =================================================================================================
# 4. Host emulation: the kernels on the CPU through the GPU's launch code
# =================================================================================================


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if host_emulation.compiler() is None:
        pytest.skip("g++ not found")
    return host_emulation.Emulator(tmp_path_factory.mktemp("emu"))


GUARD = 16  # elements of sentinel before and after every output


def _guarded(shape, dtype, fill):
    """An output array inside a larger buffer whose margins hold a sentinel (NaN / 0xDEADBEEF)."""
    size = int(np.prod(shape))
    buf = np.full(size + 2 * GUARD, fill, dtype=dtype)
    return buf[GUARD : GUARD + size].reshape(shape), buf


def _margins_intact(buf, fill, what):
    m = np.concatenate([buf[:GUARD], buf[-GUARD:]])
    ok = np.all(np.isnan(m)) if np.isnan(fill) else np.all(m == fill)
    assert ok, f"{what}: a kernel wrote outside its output"


POISON_U32 = np.uint32(0xDEADBEEF)


def emu_forward(emu, x, w, b, act, training, version, mask=True):
    n, n_out = x.shape[0], w.shape[1]
    mode = rk.forward_mode(act, training, mask)
    a, abuf = _guarded((n, n_out), np.float32, np.nan)
    z = zbuf = m = mbuf = None
    if mode == rk.SAVED_Z:
        z, zbuf = _guarded((n, n_out), np.float32, np.nan)
    if mode == rk.SAVED_MASK:
        m, mbuf = _guarded((n, rk.mask_words(n_out)), np.uint32, POISON_U32)
    rk.queue_forward(x, w, b, a, z, m, act, mode, version, emu.launch)
    _margins_intact(abuf, np.nan, "a")
    if zbuf is not None:
        _margins_intact(zbuf, np.nan, "z")
    if mbuf is not None:
        _margins_intact(mbuf, POISON_U32, "mask")
    kept = {rk.SAVED_Z: z, rk.SAVED_MASK: m}.get(mode)
    if kept is None and act.saves == "a" and training:
        kept = a
    return a, ((x, kept) if training else ())


def emu_backward(emu, da, saved, w, act, version, need_dx=True, split_k=None):
    x, kept = saved
    n, n_in = x.shape
    n_out = w.shape[1]
    src = rk.backward_source(act, kept)
    dw, dwbuf = _guarded((n_in, n_out), np.float32, np.nan)
    db, dbbuf = _guarded((n_out,), np.float32, np.nan)
    dx = dxbuf = None
    if need_dx:
        dx, dxbuf = _guarded((n, n_in), np.float32, np.nan)
    rk.queue_backward(
        x, da, kept, w, dw, db, dx, act, src, version, split_k, emu.launch, lambda k: np.full(k, np.nan, np.float32)
    )
    for buf, what in ((dwbuf, "dw"), (dbbuf, "db"), (dxbuf, "dx")):
        if buf is not None:
            _margins_intact(buf, np.nan, what)
    return dw, db, dx


# --- reference and error bounds --------------------------------------------------------------------


def assert_within(name, got, want, bound, seed):
    got64 = np.asarray(got, dtype=np.float64)
    err = np.abs(got64 - want)
    bad = ~(err <= bound)  # NaN (an unwritten, poisoned element) counts as bad
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} elements off; first at {idx}: got {got64[idx]!r}, "
            f"want {want[idx]!r}, |err| {err[idx]:.3e} > bound {bound[idx]:.3e} (seed {seed})"
        )


def check_forward(x, w, b, act, training, a, saved, seed):
    """a (and z or the mask) against float64; bounds from the K-long dot product of z (oracles)."""
    want = oracles.expected_forward(x, w, b, act)
    z_ref, bound_z = want["z"]
    assert_within(f"{act.name} a", a, *want["a"], seed)
    if not training:
        assert saved == ()
        return
    kept = saved[1]
    mode = rk.forward_mode(act, True, kept is not None and kept.dtype == np.uint32)
    if mode == rk.SAVED_Z:
        assert_within(f"{act.name} z", kept, z_ref, bound_z, seed)
    elif mode == rk.SAVED_MASK:
        n_out = w.shape[1]
        bits = oracles.unpack_mask(kept, n_out)
        sure = np.abs(z_ref) > bound_z  # where float32 rounding cannot flip the sign of z
        wrong = sure & (bits != (z_ref > 0))
        assert not wrong.any(), f"{act.name} mask: {int(wrong.sum())} bits differ from z > 0 (seed {seed})"
        pad = (kept[:, -1] >> np.uint32(n_out % 32)) if n_out % 32 else np.zeros(1, np.uint32)
        assert not pad.any(), f"{act.name} mask: bits past column out are set (seed {seed})"


def check_backward(x, w, da, act, saved, dw, db, dx, seed):
    """dW, db (and dx) against float64 from what the kernels saved; bounds from oracles."""
    want = oracles.expected_backward(x, w, da, act, saved[1])
    assert_within(f"{act.name} dW", dw, *want["dW"], seed)
    assert_within(f"{act.name} db", db, *want["db"], seed)
    if dx is not None:
        assert_within(f"{act.name} dx", dx, *want["dx"], seed)


def make_inputs(n, n_in, n_out, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((n, n_in))).astype(np.float32)
    w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    da = rng.standard_normal((n, n_out)).astype(np.float32)
    return x, w, b, da


def new_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


ACTIVATIONS = [
    Activation("identity"),
    Activation("relu"),
    Activation("leaky_relu", slope=0.1),
    Activation("elu", alpha=0.7),
    Activation("sigmoid"),
    Activation("tanh"),
    Activation("gelu"),
    Activation("gelu_tanh"),
    Activation("silu"),
    Activation("softplus", beta=2.0, threshold=10.0),
]


def _run_pair(emu, shape, act, version, seed, mask=True, scale=1.0, split_k=None, need_dx=True):
    x, w, b, da = make_inputs(*shape, seed, scale)
    a, saved = emu_forward(emu, x, w, b, act, True, version, mask)
    check_forward(x, w, b, act, True, a, saved, seed)
    dw, db, dx = emu_backward(emu, da, saved, w, act, version, need_dx, split_k)
    check_backward(x, w, da, act, saved, dw, db, dx, seed)
    return (x, w, b, da), a, saved, (dw, db, dx)


@needs_gxx
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("shape", [(17, 33, 65), (20, 36, 44)], ids=["scalar-17x33x65", "vec-20x36x44"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.name)
def test_emulated_kernels_match_reference(emu, act, shape, version):
    seed = new_seed()
    emu.launched.clear()
    _run_pair(emu, shape, act, version, seed)
    if version == 2:  # the launcher chose the 16-byte path exactly when the shape allows it
        vec = shape[1] % 4 == 0 and shape[2] % 4 == 0
        assert {s.vec for s in emu.launched if s.vec is not None} == {vec}


@needs_gxx
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (1, 4, 4), (3, 1, 129), (130, 131, 260), (129, 12, 36)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid"])
def test_emulated_edge_shapes(emu, shape, name):
    seed = new_seed()
    for version in (1, 2):
        _run_pair(emu, shape, Activation(name), version, seed)


@needs_gxx
def test_emulated_relu_z_instead_of_mask(emu):
    seed = new_seed()
    for version in (1, 2):
        _, _, saved, _ = _run_pair(emu, (33, 20, 70), Activation("leaky_relu", slope=0.2), version, seed, mask=False)
        assert saved[1].dtype == np.float32


@needs_gxx
@pytest.mark.parametrize("name", ["relu", "sigmoid", "softplus", "gelu_tanh", "elu", "silu"])
def test_emulated_large_inputs_stay_finite(emu, name):
    seed = new_seed()
    act = Activation(name)
    _, a, saved, grads = _run_pair(emu, (40, 24, 36), act, 2, seed, scale=60.0)
    assert np.isfinite(a).all() and all(np.isfinite(g).all() for g in grads), f"seed {seed}"


@needs_gxx
@pytest.mark.parametrize("split_k", [None, 1, 3, 7])
def test_emulated_split_k(emu, split_k):
    seed = new_seed()
    shape = (600, 20, 40)  # one 128 x 128 tile of dW: the automatic plan splits the batch
    emu.launched.clear()
    _run_pair(emu, shape, Activation("elu"), 2, seed, split_k=split_k)
    s, _ = rk.split_plan(*shape, split_k)
    reduced = any(sp.kernel == "splitk_reduce" for sp in emu.launched)
    assert reduced == (s > 1)


@needs_gxx
def test_emulated_results_are_deterministic(emu):
    seed = new_seed()
    act = Activation("gelu")
    x, w, b, da = make_inputs(300, 40, 72, seed)
    runs = []
    for _ in range(2):
        a, saved = emu_forward(emu, x, w, b, act, True, 2)
        grads = emu_backward(emu, da, saved, w, act, 2, split_k=3)
        runs.append([a, saved[1], *grads])
    for first, second in zip(*runs, strict=True):
        assert first.tobytes() == second.tobytes(), f"two runs differ (seed {seed})"


@needs_gxx
def test_emulated_v1_and_v2_sum_in_the_same_order(emu):
    """Identity: a, dx and (unsplit) dW are the same chains of fmaf in both versions: equal values."""
    seed = new_seed()
    act = Activation("identity")
    x, w, b, da = make_inputs(70, 45, 50, seed)
    out = {}
    for version in (1, 2):
        a, saved = emu_forward(emu, x, w, b, act, True, version)
        dw, db, dx = emu_backward(emu, da, saved, w, act, version, split_k=1 if version == 2 else None)
        out[version] = (a, dw, dx)
    for name, v1, v2 in zip(("a", "dW", "dx"), out[1], out[2], strict=True):
        assert np.array_equal(v1, v2), f"{name}: v1 and v2 differ (seed {seed})"


@needs_gxx
def test_emulated_inference_writes_a_alone(emu):
    seed = new_seed()
    for name in ("relu", "gelu", "sigmoid", "identity"):
        act = Activation(name)
        x, w, b, _ = make_inputs(9, 8, 12, seed)
        emu.launched.clear()
        a, saved = emu_forward(emu, x, w, b, act, False, 2)
        assert saved == ()
        assert [s.mode for s in emu.launched] == [rk.SAVED_NONE]
        check_forward(x, w, b, act, False, a, saved, seed)


@needs_gxx
def test_emulated_unaligned_views_take_the_scalar_path(emu):
    seed = new_seed()
    act = Activation("relu")
    x, w, b, da = make_inputs(24, 16, 20, seed)
    big = np.empty(x.size + 1, np.float32)
    xv = big[1:].reshape(x.shape)  # C-contiguous, but 4 bytes past a 16-byte boundary
    xv[...] = x
    emu.launched.clear()
    a, saved = emu_forward(emu, xv, w, b, act, True, 2)
    assert [s.vec for s in emu.launched] == [False]
    check_forward(x, w, b, act, True, a, saved, seed)
    dw, db, dx = emu_backward(emu, da, saved, w, act, 2)
    check_backward(x, w, da, act, saved, dw, db, dx, seed)


@needs_gxx
def test_emulated_first_layer_skips_dx(emu):
    seed = new_seed()
    emu.launched.clear()
    _run_pair(emu, (10, 6, 9), Activation("tanh"), 2, seed, need_dx=False)
    assert not any(s.kernel.startswith("dense_dx") for s in emu.launched)


@pytest.mark.skipif(bool(GPUS), reason="checks the no-GPU message")
def test_bench_without_a_gpu_says_so(capsys):
    assert cli_main(["kernels", "bench", "--shape", "8,8,8"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
