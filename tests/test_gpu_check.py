"""bench/gpu_check.sh rehearsed without a GPU, and the suite's GPU / simulator report (conftest).

The rehearsal runs every stage of the script through the same code as a GPU run (simulator,
skipped GPU tests, CPU benchmark, reduced selections) into a tmp folder; the tests check what a
GPU run would bring back: one log per stage, a summary line per stage, at most 8 files no deeper
than 2 folders, and an exit status that agrees with the summary. A GPU run on a machine without
a GPU must fail at stage 0 with the reason, and a stage that hangs must lose only itself.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import GPUS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
LOGS = ["0-environment.txt", "1-fused-kernels.txt", "2-numba-backend.txt", "3-large-cli-bench.txt",
        "4-kernels-check.txt", "5-bench.txt"]
STATUSES = {"ok", "FAIL", "TIMEOUT", "SKIP", "xfail", "off"}
no_gpu_only = pytest.mark.skipif(GPUS > 0, reason="a GPU is present: the rehearsal is for machines without one")


def run_script(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUBP_CHECK_", "GPUBP_REHEARSE"))}
    full_env.pop("GPUBP_REQUIRE_GPU", None)
    full_env["PYTHON"] = full_env.get("PYTHON", sys.executable)
    full_env.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)


def stage_lines(summary: str) -> dict[int, tuple[str, str]]:
    """{stage: (status, rest of the line)} from summary.txt."""
    rows = {}
    for line in summary.splitlines():
        m = re.match(r"^(\d)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\S+)\s*(.*)$", line)
        if m:
            rows[int(m.group(1))] = (m.group(3), line)
    return rows


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_old_script_is_gone():
    assert not (REPO / "bench" / "gpu_run.sh").exists(), "bench/gpu_check.sh replaces bench/gpu_run.sh"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """(the script's CompletedProcess, its output folder, seconds): a rehearsal made here, or the one
    .ci/run's image twin made (GPUBP_REHEARSAL_OUT: its folder, beside it .stdout and .seconds;
    it passed there, or CI stopped)."""
    done = os.environ.get("GPUBP_REHEARSAL_OUT")
    if done:
        out = Path(done)
        stdout = Path(f"{done}.stdout").read_text()
        r = subprocess.CompletedProcess(["bash", str(SCRIPT), "--rehearse", done], 0, stdout, "")
        return r, out, float(Path(f"{done}.seconds").read_text())
    out = tmp_path_factory.mktemp("rehearsal") / "out"
    t0 = time.perf_counter()
    r = run_script("--rehearse", str(out))
    return r, out, time.perf_counter() - t0


@no_gpu_only
def test_rehearsal_brings_back_a_log_per_stage_and_a_summary(rehearsal):
    r, out, took = rehearsal
    summary = (out / "summary.txt").read_text()
    assert "REHEARSAL" in summary.splitlines()[0]
    rows = stage_lines(summary)
    assert sorted(rows) == [0, 1, 2, 3, 4, 5], summary
    for n, log in enumerate(LOGS):
        status, line = rows[n]
        assert status in STATUSES and log in line, line
        text = (out / log).read_text()
        if status == "off":
            assert text.startswith(f"stage {n} not run: "), text[:200]
            continue
        assert text.startswith(f"== stage {n}: "), text[:200]
        assert re.search(rf"^== stage {n}: {re.escape(status)} \(\d+\) after \d+ s$", text, re.M), text[-500:]
    assert re.search(r"^total +\d+ s; \d+ files; result: (PASS|FAIL)$", summary, re.M), summary
    assert r.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert took < 180


@no_gpu_only
def test_rehearsal_exit_status_agrees_with_the_summary_and_every_stage_passes(rehearsal):
    r, out, _ = rehearsal
    summary = (out / "summary.txt").read_text()
    rows = stage_lines(summary)
    passed = "result: PASS" in summary
    assert r.returncode == (0 if passed else 1), r.stdout + r.stderr
    assert passed == all(s in ("ok", "xfail", "off") for s, _ in rows.values())
    # Stage 0 fails its "the suite ran on the GPU" check, as a rehearsal must; stage 4 (the compile
    # report) is off unless asked for, as on the device; the others pass.
    assert rows[0][0] == "xfail", rows[0][1]
    assert rows[4][0] == "off" and "GPUBP_CHECK_STAGES" in rows[4][1], rows[4][1]
    for n in (1, 2, 3, 5):
        status, line = rows[n]
        assert status == "ok", f"{line}\n--- {LOGS[n]} (end) ---\n{(out / LOGS[n]).read_text()[-3000:]}"


@no_gpu_only
def test_rehearsal_stage_0_reports_the_environment_and_the_simulator_guard(rehearsal):
    _, out, _ = rehearsal
    env = (out / "0-environment.txt").read_text()
    for word in ("git commit", "numba-cuda", "cupy NVRTC (run time)", "NVRTC (offline check)",
                 "check numba-on-cupy: ok", "check fused-rawmodule: skipped: rehearsal",
                 "check numba-ptx: ok", "TOTAL compiled 3 of 3",
                 "check step-launches: ok: cudasim", "launches per step"):
        assert word in env, word
    assert "numba cuda kernels: simulator (" in env  # the header says why
    assert "GPUBP_REQUIRE_GPU=1: refused to start" in env
    assert "suite: simulator (" in stage_lines((out / "summary.txt").read_text())[0][1]


@no_gpu_only
def test_rehearsal_per_test_limits_sit_below_the_stage_limit(rehearsal):
    """A hang must leave a stack: pytest-timeout's per-test limit (which prints every thread's stack)
    and faulthandler_timeout (earlier, printing only) are below the time the stage has left."""
    _, out, _ = rehearsal
    text = (out / "2-numba-backend.txt").read_text()
    limit = int(re.search(r"^== stage 2: numba-backend \(limit (\d+) s\)", text, re.M).group(1))
    runs = re.findall(r"^\$ .* -m pytest .*$", text, re.M)
    # the Numba / backend tests, the GPU backends' conformance, the CUDA graph and native precision GPU tests
    assert len(runs) == 3, text[:3000]
    for run in runs:
        dump = int(re.search(r"faulthandler_timeout=(\d+)", run).group(1))
        per_test = re.search(r"--timeout (\d+)", run)
        assert 0 < dump < limit, run
        if per_test:
            assert dump < int(per_test.group(1)) < limit, run
    assert "test_conformance.py" in runs[1] and " -k cuda" in runs[1], runs[1]  # the GPU backends' cases
    assert "test_cuda_graph.py" in runs[2] and "test_cuda_precision.py" in runs[2] and " -k gpu" in runs[2], runs[2]


@no_gpu_only
def test_rehearsal_fits_what_comes_back(rehearsal):
    _, out, _ = rehearsal
    files = files_under(out)
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)  # at most 2 folders down
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for p in files for part in p.relative_to(out).parts)
    with tarfile.open(out / "raw.tgz") as tar:
        names = tar.getnames()
    assert any(n.startswith("junit/") and n.endswith(".xml") for n in names), names
    assert "bench/results.json" in names, names
    assert "step_overhead/results.json" in names and "step_overhead/summary.md" in names, names


@no_gpu_only
def test_rehearsal_stage_5_runs_the_step_overhead_benchmark_on_the_cpu(rehearsal):
    """Stage 5's part b (bench/step_overhead.py) runs its CPU side, --quick, and its table is in the log."""
    _, out, _ = rehearsal
    text = (out / "5-bench.txt").read_text()
    assert re.search(r"^\$ .*bench/step_overhead\.py --device cpu --quick --out ", text, re.M), text[-3000:]
    assert "(bench/step_overhead.py exit status 0)" in text, text[-3000:]
    assert "| tiny 2-16-2 | gpubp replayed |" in text, text[-3000:]


@no_gpu_only
def test_rehearsal_stage_5_benches_a_mixed_precision_case(rehearsal):
    """Stage 5's part a (gpubp bench) names the bf16-mixed training step beside the float32 cases, and in the
    rehearsal gpubp's CPU emulation of it passes the gate and is timed (its block is in the log)."""
    _, out, _ = rehearsal
    text = (out / "5-bench.txt").read_text()
    cmd = re.search(r"^\$ .*-m gpubp bench .*--cases (\S+)", text, re.M)
    assert cmd and cmd.group(1).split(",") == ["dense_fwd_bwd:relu", "step:mnist_mlp", "step:mnist_mlp@bf16-mixed"], (
        text[:3000])
    block = re.search(r"^step:mnist_mlp@bf16-mixed: training step.*?(?=\n\n)", text, re.M | re.S)
    assert block and re.search(r"^  N=\d+ +gpubp-cpu +\d", block.group(0), re.M), text[-4000:]


@no_gpu_only
def test_a_gpu_run_without_a_gpu_stops_at_stage_0_with_the_reason(tmp_path):
    r = run_script(str(tmp_path / "out"), env={"GPUBP_CHECK_STAGES": "0 1"})
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    rows = stage_lines(summary)
    assert rows[0][0] == "FAIL" and "GPUBP_REQUIRE_GPU=1 but no GPU can be used" in rows[0][1], summary
    assert conftest.CUDA_MODE_REASON in rows[0][1]
    assert rows[1][0] == "SKIP" and "no GPU" in rows[1][1], summary
    assert "result: FAIL" in summary


@no_gpu_only
def test_a_hanging_stage_is_killed_and_the_next_stage_still_runs(tmp_path):
    # A python3 that hangs in stage 2's first pytest run (the only command naming test_numba_cuda_optim.py),
    # beyond the reach of pytest's own limits (it is `sleep`): the stage's timeout must end it.
    pids = tmp_path / "pids"
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$*" == *test_numba_cuda_optim.py* ]]; then echo $$ >> {pids}; echo "hanging"; exec sleep 600; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    t0 = time.perf_counter()
    r = run_script(str(tmp_path / "out"), "--rehearse",
                   env={"PYTHON": str(fake), "GPUBP_CHECK_STAGES": "2 4", "GPUBP_CHECK_LIMITS": "75 150 20 75 40 75"})
    took = time.perf_counter() - t0
    out = tmp_path / "out"
    rows = stage_lines((out / "summary.txt").read_text())
    assert rows[2][0] == "TIMEOUT" and "killed at the 20 s limit" in rows[2][1], rows
    assert rows[4][0] == "ok", (out / "4-kernels-check.txt").read_text()[-2000:]
    assert "hanging" in (out / "2-numba-backend.txt").read_text()  # the log written so far stays
    assert r.returncode == 1 and took < 60
    for pid in pids.read_text().split():
        assert not Path(f"/proc/{pid}").exists() or "sleep" not in Path(f"/proc/{pid}/cmdline").read_text(), pid


def test_the_script_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    r = run_script("--rehearse", str(tmp_path))
    assert r.returncode == 2 and "not empty" in r.stderr


# --- the suite's own report: GPU or simulator, and why ------------------------------------------


class FakeLib:
    """Stands in for libcuda: cuInit / cuDeviceGetCount return codes, cuGetErrorName names them."""

    NAMES = {100: b"CUDA_ERROR_NO_DEVICE", 999: b"CUDA_ERROR_UNKNOWN"}

    def __init__(self, init_rc: int = 0, count: int = 1, count_rc: int = 0):
        self.init_rc, self.count, self.count_rc = init_rc, count, count_rc

    def cuInit(self, flags):  # noqa: N802 - the driver's name
        return self.init_rc

    def cuDeviceGetCount(self, ref):  # noqa: N802
        ref._obj.value = self.count
        return self.count_rc

    def cuGetErrorName(self, rc, ref):  # noqa: N802
        if rc not in self.NAMES:
            return 1
        ref._obj.value = self.NAMES[rc]
        return 0


@pytest.mark.parametrize(("lib", "want"), [
    (OSError("libcuda.so.1: cannot open shared object file: No such file or directory"),
     (0, "libcuda.so.1 not found (no NVIDIA driver on the library path)")),
    (OSError("libcuda.so.1: wrong ELF class"), (0, "libcuda.so.1 could not be loaded: libcuda.so.1: wrong ELF class")),
    (FakeLib(init_rc=100), (0, "cuInit returned 100 (CUDA_ERROR_NO_DEVICE)")),
    (FakeLib(init_rc=3), (0, "cuInit returned 3")),
    (FakeLib(count_rc=999), (0, "cuDeviceGetCount returned 999 (CUDA_ERROR_UNKNOWN)")),
    (FakeLib(count=0), (0, "the CUDA driver reports 0 GPUs (check CUDA_VISIBLE_DEVICES)")),
    (FakeLib(count=2), (2, "")),
], ids=["missing", "unloadable", "no-device", "unnamed", "count-fails", "zero", "two"])
def test_driver_status_says_why_there_is_no_gpu(monkeypatch, lib, want):
    def cdll(name):
        assert name == "libcuda.so.1"
        if isinstance(lib, Exception):
            raise lib
        return lib

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert conftest.driver_gpu_status() == want


def _pytest_on_a_dummy_test(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """pytest on one trivial test in tmp_path, with tests/conftest.py loaded as a plugin."""
    (tmp_path / "test_dummy.py").write_text("def test_nothing():\n    pass\n")
    full = {k: v for k, v in os.environ.items() if k not in ("GPUBP_REQUIRE_GPU", "NUMBA_ENABLE_CUDASIM")}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full.get("PYTHONPATH", "")) if p)
    full.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "test_dummy.py"], capture_output=True, text=True, env=full, cwd=tmp_path, timeout=120)


def test_the_header_and_summary_say_where_the_kernels_ran_and_why(tmp_path):
    r = _pytest_on_a_dummy_test(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    if GPUS:
        assert f"numba cuda kernels: GPU ({GPUS} seen)\n" in r.stdout
        assert f"numba cuda kernels ran on: GPU ({GPUS} seen)\n" in r.stdout
    else:
        reason = conftest.driver_gpu_status()[1]
        assert reason and f"numba cuda kernels: simulator ({reason})\n" in r.stdout, r.stdout
        assert f"numba cuda kernels ran on: simulator ({reason})\n" in r.stdout


def test_require_gpu_stops_a_session_that_would_use_the_simulator(tmp_path):
    r = _pytest_on_a_dummy_test(tmp_path, GPUBP_REQUIRE_GPU="1")
    if GPUS:
        assert r.returncode == 0 and "numba cuda kernels: GPU (" in r.stdout, r.stdout + r.stderr
        return
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, r.stdout + r.stderr
    reason = conftest.driver_gpu_status()[1]
    assert "GPUBP_REQUIRE_GPU=1 but no GPU can be used" in r.stderr and reason in r.stderr, r.stderr
    assert "test_nothing" not in r.stdout and "passed" not in r.stdout


def test_require_gpu_also_refuses_a_simulator_asked_for_by_hand(tmp_path):
    r = _pytest_on_a_dummy_test(tmp_path, GPUBP_REQUIRE_GPU="1", NUMBA_ENABLE_CUDASIM="1")
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, r.stdout + r.stderr
    assert "NUMBA_ENABLE_CUDASIM=1" in r.stderr, r.stderr
