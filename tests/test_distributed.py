"""Data-parallel training (gpubp.distributed): the communicators, fit(comm=) against one process,
and what a bad run gets. Multi-process cases start ``mpiexec -n 2`` / ``-n 3`` themselves, with a
timeout, running tests/_distributed_worker.py; they skip where mpiexec or mpi4py is missing. NCCL
cases skip without a GPU and NCCL."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpubp as gp
from gpubp.accuracy import MODEL

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "_distributed_worker.py"
LAUNCH_TIMEOUT = 120  # seconds for a whole mpiexec run: a hang fails the test instead of CI


def _load_worker():
    spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


worker = _load_worker()


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel installs it next to python
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _skip_without_mpi() -> str:
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'gpubp[mpi]')")
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found (pip install mpich, or a system MPI)")
    return exe


def launch(n: int, scenario: str, out: Path, arg: str = "", backend: str = "auto",
           timeout: float = LAUNCH_TIMEOUT) -> list[dict]:
    """Run the worker on ``n`` processes; return each rank's report (rank order)."""
    exe = _skip_without_mpi()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               GPUBP_TEST_BACKEND=backend, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [exe, "-n", str(n), sys.executable, str(WORKER), scenario, str(out)] + ([arg] if arg else [])
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s (a hang):\n{e.stdout}\n{e.stderr}")
    reports = []
    for r in range(n):
        path = out / f"{scenario}-rank{r}.json"
        assert path.exists(), f"rank {r} wrote no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        reports.append(json.loads(path.read_text()))
    return reports


def _ok(reports: list[dict]) -> None:
    for rep in reports:
        assert rep["status"] == "ok", f"rank {rep['rank']}: {rep.get('type')}: {rep.get('message')}\n{rep.get('traceback')}"


# --- in one process -----------------------------------------------------------------------------


def test_single_process_communicator_collectives_are_identities():
    comm = gp.distributed.SingleProcess()
    assert (comm.rank, comm.size, comm.local_rank, comm.backend) == (0, 1, 0, "single")
    a = np.arange(4.0)
    assert comm.allreduce_(a, op="mean") is a and a.tolist() == [0, 1, 2, 3]
    assert comm.broadcast_(a, root=0) is a
    comm.barrier()
    assert comm.allgather("x") == ["x"] and comm.bcast(3) == 3


@pytest.mark.parametrize("call, kind, names", [
    (lambda c: c.allreduce_(np.zeros(2), op="avg"), ValueError, "op"),
    (lambda c: c.allreduce_([1.0, 2.0]), TypeError, "array"),
    (lambda c: c.allreduce_(np.zeros(2, dtype=np.int8)), TypeError, "array"),
    (lambda c: c.allreduce_(np.zeros(2, dtype=np.int64), op="mean"), TypeError, "array"),
    (lambda c: c.allreduce_(np.zeros((3, 3))[:, 0]), ValueError, "array"),
    (lambda c: c.broadcast_(np.zeros(2), root=1), ValueError, "root"),
    (lambda c: c.bcast(1, root=-1), ValueError, "root"),
])
def test_collective_arguments_are_checked(call, kind, names):
    with pytest.raises(kind, match=f"^{names}:"):
        call(gp.distributed.SingleProcess())


def test_init_arguments_are_checked():
    with pytest.raises(ValueError, match="^backend: expected one of 'auto', 'mpi', 'nccl', got 'gloo'"):
        gp.distributed.init("gloo")
    for bad in (0, -1.0, "10", True):
        with pytest.raises(ValueError, match="^timeout:"):
            gp.distributed.init(timeout=bad)


def test_without_mpi4py_a_lone_process_gets_the_single_process_communicator(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert isinstance(gp.distributed.init(), gp.distributed.SingleProcess)
    assert isinstance(gp.distributed.init("mpi"), gp.distributed.SingleProcess)
    with pytest.raises(RuntimeError, match="NCCL id travels over MPI"):
        gp.distributed.init("nccl")
    monkeypatch.setenv("PMI_SIZE", "4")  # started by a launcher with three others: refuse to train alone
    with pytest.raises(RuntimeError, match="one of 4 started together.*gpubp\\[mpi\\]"):
        gp.distributed.init()


def test_init_under_plain_python_is_a_world_of_one():
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed")
    code = ("import gpubp as gp; c = gp.distributed.init(); m = gp.distributed.init('mpi'); "
            "print(c.backend, c.rank, c.size, m.backend, m.size)")
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "PMI_RANK", "PMI_FD", "SLURM_NTASKS")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["single", "0", "1", "mpi", "1"]


def test_fit_with_a_world_of_one_is_fit_without_comm():
    a, hist_a = worker.run_case("dropout")
    b, hist_b = worker.run_case("dropout", comm=gp.distributed.SingleProcess())
    assert np.array_equal(a, b) and hist_a["loss"] == hist_b["loss"]


def test_fit_refuses_a_comm_that_is_not_a_communicator():
    model = gp.Sequential(gp.Dense(2, 2), seed=0)
    with pytest.raises(TypeError, match="^comm: expected a communicator"):
        model.fit(np.zeros((4, 2)), np.zeros((4, 2)), "mse", "sgd", verbose=0, comm="world")


def test_fixed_split_covers_the_batch_once():
    from gpubp.distributed.data_parallel import DataParallel

    for size in (1, 2, 3, 5):
        for nb in (1, 2, 7, 8):
            parts = []
            for rank in range(size):
                dp = DataParallel.__new__(DataParallel)
                dp.rank, dp.size = rank, size
                rows, row0, got = dp.split(np.arange(10, 10 + nb), 100)
                assert got == nb and (len(rows) == 0 or rows[0] == 10 + row0)
                sl, row0_s, _ = dp.split(slice(10, 10 + nb), 100)
                assert list(range(100)[sl]) == list(rows) and row0_s == row0
                parts.extend(rows)
            assert parts == list(range(10, 10 + nb))


# --- several processes: the same training as one process ----------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_collectives_across_ranks(n, tmp_path):
    reports = launch(n, "api", tmp_path)
    _ok(reports)
    ranks = np.arange(n)
    for rep in reports:
        assert rep["size"] == n and rep["backend"] == "mpi"
        want = np.arange(5.0)[None, :] + ranks[:, None]
        assert rep["sum"] == want.sum(0).tolist() and rep["mean"] == (want.sum(0) / n).tolist()
        assert rep["max"] == want.max(0).tolist() and rep["min"] == want.min(0).tolist()
        assert rep["sum_int"] == [int(ranks.sum()), n]
        assert rep["sum_2d"] == np.full((2, 3), ranks.sum() + n).tolist()
        assert rep["bcast_from_last"] == [n - 1.0] * 3
        assert rep["allgather"] == [f"hello from {r}" for r in range(n)] and rep["bcast"] == {"from": 0}
        assert rep["bad"][0].startswith("ValueError: op:") and rep["bad"][1].startswith("TypeError: array:")
        assert rep["bad"][2].startswith("ValueError: root:") and rep["bad"][3].startswith("TypeError: array:")
    assert len({rep["rounding"] for rep in reports}) == 1  # the same bits on every rank
    assert sorted(rep["local_rank"] for rep in reports) == list(range(n))  # one machine


@pytest.mark.parametrize("n", [2, 3])
def test_training_on_n_processes_equals_one_process(n, tmp_path):
    """Every optimizer, clipping, dropout, uneven and one-row last batches, sum reduction,
    validation and a schedule, row weights (zeros, class_weight) with metrics: parameters after
    every step equal one process's to float64 rounding (float32: the model tolerance), and are the
    same bits on every rank; so is every number of the record."""
    _ok(launch(n, "equivalence", tmp_path))
    for name in worker.CASES:
        ref, hist = worker.run_case(name)
        runs = [np.load(tmp_path / f"{name}-rank{r}.npz") for r in range(n)]
        for r in range(1, n):
            assert np.array_equal(runs[r]["steps"], runs[0]["steps"]), f"{name}: rank {r} differs from rank 0"
            assert np.array_equal(runs[r]["loss"], runs[0]["loss"]), f"{name}: rank {r}'s history differs"
        got = runs[0]["steps"]
        assert got.shape == ref.shape, name
        if ref.dtype == np.float64:
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15, err_msg=name)
            np.testing.assert_allclose(runs[0]["loss"], hist["loss"], rtol=1e-12, err_msg=name)
            if "val_loss" in hist:
                np.testing.assert_allclose(runs[0]["val_loss"], hist["val_loss"], rtol=1e-12, err_msg=name)
            if "accuracy" in hist and not worker.CASES[name][2].get("weights"):  # counts: exact
                assert runs[0]["accuracy"].tolist() == hist["accuracy"], name
            for key, values in hist.items():
                if isinstance(values, list) and key != "time":
                    np.testing.assert_allclose(runs[0][f"record_{key}"], values, rtol=1e-12, err_msg=f"{name} {key}")
                    for r in range(1, n):
                        assert np.array_equal(runs[r][f"record_{key}"], runs[0][f"record_{key}"], equal_nan=True), \
                            f"{name} {key}"
        else:
            np.testing.assert_allclose(got, ref, **MODEL["float32"].kw(), err_msg=name)


# --- gradient buckets: all-reduces started while backward runs ---------------------------------


def test_buckets_are_whole_layers_cut_from_the_end_of_the_arena():
    from gpubp.distributed.data_parallel import plan_buckets

    model = worker.bucket_model("float64", dropout=True)  # Dense 54, Dense 110, Dropout, Dense 96, Dense 27
    assert plan_buckets(model, 0) == []
    spans = [(b.start, b.stop, b.first_layer, b.last_layer) for b in plan_buckets(model, 1)]
    assert spans == [(260, 287, 4, 4), (164, 260, 3, 3), (54, 164, 1, 1), (0, 54, 0, 0)]
    spans = [(b.start, b.stop, b.first_layer, b.last_layer) for b in plan_buckets(model, 600)]
    assert spans == [(164, 287, 3, 4), (54, 164, 1, 1), (0, 54, 0, 0)]  # >= 600 bytes but the head
    assert [(b.start, b.stop) for b in plan_buckets(model, 10**9)] == [(0, 287)]


def test_bucket_bytes_is_checked():
    from gpubp.distributed.data_parallel import plan_buckets

    for bad in (-1, True, 1.5, "1k"):
        with pytest.raises(ValueError, match="^bucket_bytes: expected a number of bytes >= 0"):
            gp.distributed.init(bucket_bytes=bad)
        with pytest.raises(ValueError, match="^bucket_bytes:"):
            gp.distributed.SingleProcess().bucket_bytes = bad
        with pytest.raises(ValueError, match="^bucket_bytes:"):
            plan_buckets(worker.bucket_model("float64"), bad)
    comm = gp.distributed.init(bucket_bytes=4096)
    assert comm.bucket_bytes == 4096
    comm.bucket_bytes = None
    assert comm.bucket_bytes is None


class _Recording(gp.distributed.Communicator):
    """Rank 0 of a pretend world of two whose peer contributes nothing; logs when all-reduces start and end."""

    backend = "mpi"

    def __init__(self, log: list, arena) -> None:
        super().__init__()
        self.size, self.log, self.arena = 2, log, arena

    def allgather(self, obj):
        return [obj, obj]

    def start_allreduce_(self, array, op="mean"):
        start = (array.ctypes.data - self.arena.grad.ctypes.data) // array.itemsize
        self.log.append(("start", start))
        log = self.log

        class Logged(gp.distributed.Pending):
            def wait(self):
                log.append(("wait", start))
                return self.array

        return Logged(array)


@pytest.mark.parametrize("bucket_bytes", [1, 600, 10**9])
def test_a_bucket_all_reduce_starts_before_the_backward_of_the_layer_before_it(bucket_bytes):
    from gpubp.distributed.data_parallel import plan_buckets

    log: list = []
    model = worker.bucket_model("float64", dropout=True)
    for i, layer in enumerate(model.layers):
        def logged(da, need_dx=True, i=i, backward=layer.backward):
            log.append(("backward", i))
            return backward(da, need_dx)
        layer.backward = logged
    opt = gp.optim.SGD(model.parameters(), lr=0.1)
    step = opt.step

    def logged_step(*a, **k):
        log.append(("step", None))
        return step(*a, **k)

    opt.step = logged_step
    comm = _Recording(log, model.arena)
    comm.bucket_bytes = bucket_bytes
    buckets = plan_buckets(model, bucket_bytes)
    x, y = worker.data(16, "cross_entropy")
    model.fit(x, y, "cross_entropy", opt, epochs=1, batch_size=8, verbose=0, comm=comm)
    steps = [i for i, e in enumerate(log) if e[0] == "step"]
    assert len(steps) == 2
    begin = 0
    for end in steps:  # one training step's events
        events = log[begin:end + 1]
        begin = end + 1
        at = {e: k for k, e in enumerate(events)}
        assert [e[1] for e in events if e[0] == "start"] == [b.start for b in buckets]  # tail first
        for b in buckets:
            started = at[("start", b.start)]
            assert started > at[("backward", b.first_layer)]
            if b.first_layer > 0:  # started before the layer before it runs its backward
                assert started < at[("backward", b.first_layer - 1)]
            assert at[("backward", 0)] < at[("wait", b.start)] < at[("step", None)]


@pytest.mark.parametrize("n", [2, 3])
def test_buckets_give_the_bits_of_one_allreduce(n, tmp_path):
    """Any bucket size gives the same bits as one all-reduce of the arena (float64 and float32,
    dropout, clipping, an uneven last batch), on every rank; and equals one process to rounding."""
    _ok(launch(n, "buckets", tmp_path))
    for dtype in ("float64", "float32"):
        want = np.load(tmp_path / f"buckets-{dtype}-0-rank0.npz")["steps"]
        for size in worker.BUCKET_SIZES:
            for r in range(n):
                got = np.load(tmp_path / f"buckets-{dtype}-{size}-rank{r}.npz")["steps"]
                assert np.array_equal(got, want), f"{dtype}, bucket_bytes={size}, rank {r}"
    model = worker.bucket_model("float64")
    opt = gp.optim.Adam(model.parameters(), lr=0.01)
    x, y = worker.data(29, "cross_entropy")
    rec = worker.Record()
    model.fit(x, y, "cross_entropy", opt, epochs=2, batch_size=worker.BATCH, verbose=0, callbacks=[rec],
              clip_grad_norm=0.5)
    np.testing.assert_allclose(np.load(tmp_path / "buckets-float64-1-rank0.npz")["steps"], np.stack(rec.steps),
                               rtol=1e-12, atol=1e-15)


def test_rank_zero_parameters_are_broadcast_at_the_start(tmp_path):
    reports = launch(3, "seeds_differ", tmp_path)
    _ok(reports)
    assert len({rep["params"] for rep in reports}) == 1


def test_checkpoint_saved_on_two_processes_resumes_on_three(tmp_path):
    """2 epochs on 2 processes, saved by rank 0; 2 more on 3 processes: as 4 epochs in one process."""
    first = launch(2, "checkpoint", tmp_path, "start")
    _ok(first)
    second = launch(3, "checkpoint", tmp_path, "resume")
    _ok(second)
    assert len({rep["params"] for rep in second}) == 1 and second[0]["epoch"] == 4
    loss, make_opt, _, opts = worker.CASES["dropout"]
    model = worker.model_for(opts)
    x, y = worker.data(23, loss)
    model.fit(x, y, loss, make_opt(model.parameters()), epochs=4, batch_size=worker.BATCH, verbose=0)
    got = np.frombuffer(bytes.fromhex(second[0]["params"]), dtype=np.float64)
    np.testing.assert_allclose(got, model.arena.data, rtol=1e-12, atol=1e-15)


def test_callbacks_write_on_rank_zero_and_stop_together(tmp_path):
    reports = launch(2, "callbacks", tmp_path)
    _ok(reports)
    assert {rep["stopped"] for rep in reports} == {"early_stopping"}
    assert reports[0]["loss"] == reports[1]["loss"] and reports[0]["epochs"] == 2
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".json"))
    assert files == ["ckpt-from-rank0-1.safetensors", "ckpt-from-rank0-2.safetensors", "log-from-rank0.csv"]


# --- several processes: what a bad run gets -------------------------------------------------------


def _stopped_by(reports: list[dict], bad_rank: int, kind: str, text: str) -> None:
    for rep in reports:
        assert rep["status"] == "error", rep
        if rep["rank"] == bad_rank:
            assert rep["type"] == kind and text in rep["message"], rep
        else:
            assert rep["type"] == "DistributedError" and rep["error_rank"] == bad_rank, rep
            assert f"rank {bad_rank} stopped with {kind}: " in rep["message"] and text in rep["message"], rep
        assert rep["seconds"] < 30, rep  # bounded: nobody waited for a timeout


def test_bad_data_on_one_rank_stops_every_rank_naming_it(tmp_path):
    _stopped_by(launch(3, "bad_data", tmp_path), 1, "ValueError", "x: contains NaN or Inf")


def test_an_exception_on_one_rank_midway_stops_every_rank_naming_it(tmp_path):
    _stopped_by(launch(3, "raise_midway", tmp_path), 1, "RuntimeError", "injected fault in a callback")


def test_a_rank_that_hangs_is_reported_after_the_timeout(tmp_path):
    reports = launch(3, "hang", tmp_path, "2")
    for rep in reports:
        assert rep["status"] == "error" and rep["type"] == "DistributedError", rep
        assert "did not complete within 2 s" in rep["message"], rep
    assert min(rep["seconds"] for rep in reports if rep["rank"] != 1) < 15


@pytest.mark.parametrize("n", [2, 3])
def test_nan_on_one_rank_stops_every_rank_naming_it(n, tmp_path):
    """Rows only rank 1 holds overflow: the reduced gradients are non-finite on every rank, all
    raise NonFiniteError together, and its message names the rank whose replay found it."""
    reports = launch(n, "nan_one_rank", tmp_path)
    for rep in reports:
        assert rep["status"] == "error" and rep["type"] == "NonFiniteError", rep
        assert "at epoch 1, step 2: on rank 1: the output of layer 0" in rep["message"], rep
        assert "on rank 0" not in rep["message"], rep
    assert len({rep["message"] for rep in reports}) == 1


def test_nan_on_one_rank_with_skip_skips_the_same_steps_everywhere(tmp_path):
    reports = launch(3, "nan_one_rank", tmp_path, "skip")
    _ok(reports)
    assert [rep["skipped"] for rep in reports] == [[1, 1]] * 3
    assert len({rep["params"] for rep in reports}) == 1


def test_ctrl_c_on_one_rank_ends_training_on_every_rank_at_the_same_step(tmp_path):
    reports = launch(2, "interrupt", tmp_path)
    _ok(reports)
    assert {rep["stopped"] for rep in reports} == {"interrupted"} and {rep["epoch"] for rep in reports} == {0}
    assert len({rep["params"] for rep in reports}) == 1


def test_interrupted_inside_an_epoch_and_resumed_from_its_checkpoint_equals_uninterrupted(tmp_path):
    reports = launch(2, "resume_mid_epoch", tmp_path)
    _ok(reports)
    for rep in reports:
        assert rep["stopped"] == "interrupted"
        pos = rep["progress"]
        assert (pos["epoch"], pos["step"], pos["steps"], pos["world"]) == (0, 17, 20, 2)  # agreed at step 17
        assert len(pos["sums"]) == 2  # each rank's own running sums
        assert rep["got"] == rep["want"]
        assert rep["resumed"] == rep["straight"]


def test_nan_on_one_rank_with_check_finite_stops_every_rank_naming_it(tmp_path):
    _stopped_by(launch(3, "nan_one_rank", tmp_path, "check_finite"), 1, "NonFiniteError", "layer 0")


@pytest.mark.parametrize("n, what, text", [
    (3, "architecture", "rank 2 disagrees with rank 0 on the model architecture"),
    (2, "length", "rank 1 disagrees with rank 0 on the number of training samples: 23 != 24"),
    (2, "weights", "rank 1 disagrees with rank 0 on the sample weights (sha256)"),
])
def test_ranks_that_disagree_are_refused_at_the_start(n, what, text, tmp_path):
    for rep in launch(n, "mismatch", tmp_path, what):
        assert rep["status"] == "error" and rep["type"] == "ValueError" and text in rep["message"], rep


def test_demo_distributed_trains_on_two_processes(tmp_path):
    exe = _skip_without_mpi()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [exe, "-n", "2", sys.executable, "-m", "gpubp", "demo", "--distributed", "--device", "cpu",
           "--epochs", "2", "--samples", "400", "--width", "16", "--save", str(tmp_path / "demo.safetensors")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert "distributed: 2 processes (mpi)" in out.stdout and out.stdout.count("done in") == 1
    assert (tmp_path / "demo.safetensors").exists()


# --- NCCL (a GPU and the NCCL library) --------------------------------------------------------------


def _skip_without_nccl() -> None:
    why = gp.distributed.nccl_unavailable_reason()
    if why is not None:
        pytest.skip(f"NCCL path: {why}")


def _gpus() -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


def test_nccl_collectives_on_device_arrays(tmp_path):
    _skip_without_nccl()
    n = min(2, _gpus())  # one rank per GPU; a world of one still runs the NCCL path
    reports = launch(n, "device_api", tmp_path, backend="nccl")
    _ok(reports)
    for rep in reports:
        want = np.arange(5.0)[None, :] + np.arange(n)[:, None]
        assert rep["backend"] == "nccl" and rep["sum"] == want.sum(0).tolist()
        np.testing.assert_allclose(rep["mean"], want.sum(0) / n, rtol=1e-15)
        assert rep["bcast"] == [n - 1.0] * 3


def test_nccl_training_equals_one_process_on_a_gpu(tmp_path):
    _skip_without_nccl()
    n = min(2, _gpus())
    _ok(launch(n, "device_equivalence", tmp_path, backend="nccl"))
    plain = worker.model_for
    try:
        worker.model_for = lambda opts, width=7, seed=0: plain(opts, width, seed).to("cuda:0")
        for name in worker.DEVICE_CASES:
            ref, _ = worker.run_case(name)
            runs = [np.load(tmp_path / f"{name}-rank{r}.npz") for r in range(n)]
            for r in range(1, n):
                assert np.array_equal(runs[r]["steps"], runs[0]["steps"]), f"{name}: rank {r} differs"
            tol = {"rtol": 1e-12, "atol": 1e-14} if ref.dtype == np.float64 else MODEL["float32"].kw()
            np.testing.assert_allclose(runs[0]["steps"], ref, err_msg=name, **tol)
    finally:
        worker.model_for = plain


def test_nccl_bucket_all_reduces_on_the_side_stream(tmp_path):
    """Stream and event order of bucket all-reduces; with two GPUs, fit with and without buckets
    gives the same bits (with two ranks every order of the sum does)."""
    _skip_without_nccl()
    n = min(2, _gpus())
    reports = launch(n, "device_buckets", tmp_path, backend="nccl")
    _ok(reports)
    for rep in reports:
        assert rep["backend"] == "nccl"
        assert rep["sum"] == (n * np.arange(1000.0) + sum(range(n))).tolist()
    if n > 1:
        for r in range(n):
            got = np.load(tmp_path / f"device-buckets-1-rank{r}.npz")["steps"]
            assert np.array_equal(got, np.load(tmp_path / "device-buckets-0-rank0.npz")["steps"]), f"rank {r}"


# --- gpubp.distributed.benchmark ------------------------------------------------------------------


def test_benchmark_measures_allreduce_and_step_on_one_and_two_processes():
    _skip_without_mpi()
    from gpubp.distributed.benchmark import measure, table

    records = measure(procs=(1, 2), sizes=(8, 100), rounds=2, warmup=1, batch=32, threads=1, timeout=LAUNCH_TIMEOUT)
    assert [(r["what"], r["procs"], r["size"]) for r in records] == [
        ("allreduce", 1, 8), ("allreduce", 1, 100), ("step", 1, 32),
        ("allreduce", 2, 8), ("allreduce", 2, 100), ("step", 2, 32)]
    for r in records:
        assert {"median_s", "p10_s", "p90_s", "device", "backend", "rounds", "dtype", "threads"} <= r.keys()
        assert 0 <= r["p10_s"] <= r["median_s"] <= r["p90_s"] and r["device"] == "cpu" and r["threads"] == 1
        assert r["backend"] == "mpi" and r["rounds"] == 2
    assert [r["bytes"] for r in records if r["what"] == "allreduce"] == [64, 800, 64, 800]
    assert all(r["bytes_per_s"] > 0 for r in records if r["what"] == "allreduce")
    assert all(r["model"] == "64-256-256-10" and r["samples_per_s"] > 0 for r in records if r["what"] == "step")
    text = table(records)
    assert text.splitlines()[0].split()[:4] == ["what", "procs", "size", "median"] and "samples/s" in text


@pytest.mark.parametrize("kw, name", [({"procs": (0,)}, "procs"), ({"procs": ()}, "procs"), ({"sizes": (-1,)}, "sizes"),
                                      ({"rounds": 0}, "rounds"), ({"device": "tpu"}, "device"),
                                      ({"threads": 0}, "threads"), ({"bucket_bytes": -1}, "bucket_bytes"),
                                      ({"dtype": "int8"}, "dtype"), ({"timeout": 0}, "timeout")])
def test_benchmark_arguments_are_checked(kw, name):
    from gpubp.distributed.benchmark import measure

    with pytest.raises(ValueError, match=f"^{name}:"):
        measure(**kw)


def test_benchmark_module_prints_a_table():
    _skip_without_mpi()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "gpubp.distributed.benchmark", "--procs", "2", "--sizes", "16",
                           "--rounds", "2", "--warmup", "0", "--no-steps", "--threads", "1"],
                          env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device cpu, float64, 1 thread(s) per process")
    assert lines[2].split()[:3] == ["allreduce", "2", "16"] and "GB/s" in lines[2]
