"""The NCCL communicator's initialisation is bounded by the timeout: a rank that never joins is
reported with DistributedError, never waited for. Runs without a GPU: a fake ``cupy`` /
``cupy.cuda.nccl`` stands in for CuPy, its ``NcclCommunicator`` blocking or returning at once.

In one process the MPI world is a singleton (no mpiexec). The two-process case starts
``mpiexec -n 2`` on this file (see ``_two_ranks``), where rank 1 never comes to the NCCL
initialisation. Every wait has a limit, so that the old behaviour (a hang) fails the tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HANG_LIMIT = 15.0  # seconds a construction may take before the test calls it a hang
LAUNCH_TIMEOUT = 30.0  # seconds for the whole mpiexec run


def fake_cupy(construct: Any) -> dict[str, types.ModuleType]:
    """Modules ``cupy``, ``cupy.cuda``, ``cupy.cuda.nccl`` whose ``NcclCommunicator(size, uid, rank)``
    calls ``construct(size, uid, rank)``; one GPU; the current device is recorded per thread."""
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    nccl = types.ModuleType("cupy.cuda.nccl")
    cupy.cuda, cuda.nccl = cuda, nccl
    cupy.ndarray = type("ndarray", (), {})
    cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    current = threading.local()

    class Device:
        def __init__(self, index: int = 0) -> None:
            self.id = index

        def use(self) -> None:
            current.index = self.id

        def __enter__(self) -> Device:
            self.previous, current.index = getattr(current, "index", None), self.id
            return self

        def __exit__(self, *exc: Any) -> None:
            current.index = self.previous

    class NcclCommunicator:
        def __init__(self, size: int, uid: bytes, rank: int) -> None:
            self.device = getattr(current, "index", None)  # the device current in the creating thread
            construct(size, uid, rank)

        def destroy(self) -> None:
            pass

    cuda.Device = Device
    nccl.available = True
    nccl.get_unique_id = lambda: bytes(range(128))
    nccl.NcclCommunicator = NcclCommunicator
    for value, name in enumerate(("NCCL_FLOAT32", "NCCL_FLOAT64", "NCCL_INT32", "NCCL_INT64",
                                  "NCCL_SUM", "NCCL_MAX", "NCCL_MIN")):
        setattr(nccl, name, value)
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": nccl}


def _install(patch: Any, construct: Any) -> None:
    """Put the fake CuPy in place (``patch``: a pytest monkeypatch)."""
    from gpubp.distributed import nccl as nccl_module

    for name, module in fake_cupy(construct).items():
        patch.setitem(sys.modules, name, module)
    patch.setattr(nccl_module, "nccl_unavailable_reason", lambda: None)


@pytest.fixture
def release():
    """An event the blocking fake waits on; set at teardown so that no thread stays blocked."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def one_rank():
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'gpubp[mpi]')")


def _construct(timeout: float | None) -> tuple[Any, BaseException | None, float]:
    """``NCCLCommunicator(timeout=timeout)`` on a thread of its own; fails the test after HANG_LIMIT s."""
    from gpubp.distributed import NCCLCommunicator

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["comm"] = NCCLCommunicator(timeout=timeout)
        except BaseException as e:
            result["error"] = e

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_LIMIT)
    seconds = time.monotonic() - t0
    if thread.is_alive():
        pytest.fail(f"NCCLCommunicator(timeout={timeout}) still waiting after {HANG_LIMIT:g} s (a hang)")
    return result.get("comm"), result.get("error"), seconds


def test_nccl_init_that_never_returns_raises_distributed_error_after_the_timeout(monkeypatch, one_rank, release):
    from gpubp.distributed import DistributedError

    _install(monkeypatch, lambda size, uid, rank: release.wait())
    comm, error, seconds = _construct(timeout=0.5)
    assert comm is None and isinstance(error, DistributedError), error
    assert "NCCL initialisation" in str(error) and "did not complete within 0.5 s" in str(error), error
    assert "gp.distributed.init(timeout=...)" in str(error) and error.cause == "NCCL initialisation timed out"
    assert seconds < 5.0


@pytest.mark.parametrize("timeout", [5.0, None])
def test_nccl_init_that_returns_promptly_gives_the_communicator(monkeypatch, one_rank, timeout):
    calls = []
    _install(monkeypatch, lambda size, uid, rank: calls.append((size, uid, rank)))
    comm, error, seconds = _construct(timeout)
    assert error is None, error
    try:
        assert (comm.backend, comm.rank, comm.size, comm.device_index, comm.broken) == ("nccl", 0, 1, 0, None)
        assert calls == [(1, bytes(range(128)), 0)]
        assert comm._nccl.device == 0  # created with the rank's GPU current, also on the helper thread
        assert seconds < 5.0
    finally:
        comm.close()


def test_nccl_init_error_reaches_the_caller(monkeypatch, one_rank):
    def fail(size, uid, rank):
        raise RuntimeError("NCCL_ERROR_SYSTEM_ERROR: unhandled system error")

    _install(monkeypatch, fail)
    comm, error, _ = _construct(timeout=5.0)
    assert comm is None and type(error) is RuntimeError and "NCCL_ERROR_SYSTEM_ERROR" in str(error), error


# --- two processes ------------------------------------------------------------------------------


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel installs it next to python
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def test_a_rank_that_never_reaches_nccl_init_is_reported_on_the_others(tmp_path):
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'gpubp[mpi]')")
    exe = _mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found (pip install mpich, or a system MPI)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [exe, "-n", "2", sys.executable, __file__, str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and the ranks it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {LAUNCH_TIMEOUT:g} s (a hang):\n{stdout}\n{stderr}")
    path = tmp_path / "rank0.json"
    assert path.exists(), f"rank 0 wrote no report (exit {proc.returncode}):\n{stdout}\n{stderr}"
    rep = json.loads(path.read_text())
    assert rep["type"] == "DistributedError", rep
    assert "rank 0: the rendezvous of the NCCL initialisation did not complete within 1 s" in rep["message"], rep
    assert "gp.distributed.init(timeout=...)" in rep["message"] and not rep["nccl_called"], rep
    assert rep["seconds"] < 10.0, rep


def _two_ranks(out: str) -> None:
    """One rank of the two-process test: rank 0 creates the NCCL communicator (timeout 1 s);
    rank 1 takes part in the MPI set-up (an MPI communicator) but never comes to NCCL's."""
    import gpubp.distributed as dist
    from gpubp.distributed import nccl as nccl_module

    called = threading.Event()
    for name, module in fake_cupy(lambda size, uid, rank: (called.set(), threading.Event().wait())).items():
        sys.modules[name] = module
    nccl_module.nccl_unavailable_reason = lambda: None
    from mpi4py import MPI

    report = Path(out) / "rank0.json"
    if MPI.COMM_WORLD.Get_rank() == 0:
        t0 = time.monotonic()
        try:
            dist.NCCLCommunicator(timeout=1.0)
            rep = {"type": None, "message": "constructed"}
        except Exception as e:
            rep = {"type": type(e).__name__, "message": str(e)}
        rep.update(seconds=time.monotonic() - t0, nccl_called=called.is_set())
        report.write_text(json.dumps(rep))
    else:
        dist.MPICommunicator(timeout=1.0)  # the same MPI set-up (communicator duplicates) as rank 0's
        deadline = time.monotonic() + LAUNCH_TIMEOUT / 2
        while not report.exists() and time.monotonic() < deadline:  # stay until rank 0 has reported
            time.sleep(0.05)


if __name__ == "__main__":
    _two_ranks(sys.argv[1])
