"""The CPU threading policy's default when a launcher started several processes on one machine:
the usable cores shared among them, from the launchers' environment variables (faked here), said
once by local rank 0; GPUBP_CPU_THREADS still decides. One real ``mpiexec -n 2`` run checks what
each rank chose."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gpubp import threads

ROOT = Path(__file__).resolve().parents[1]
SRUN = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}  # a task started by srun


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, (1, None)),
        ({"MPI_LOCALNRANKS": "2"}, (2, "MPI_LOCALNRANKS")),  # MPICH / Intel MPI (Hydra)
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, (4, "OMPI_COMM_WORLD_LOCAL_SIZE")),  # Open MPI
        ({"MV2_COMM_WORLD_LOCAL_SIZE": "3"}, (3, "MV2_COMM_WORLD_LOCAL_SIZE")),  # MVAPICH
        ({"LOCAL_WORLD_SIZE": "8"}, (8, "LOCAL_WORLD_SIZE")),  # torchrun
        ({"MPI_LOCALNRANKS": "1"}, (1, None)),  # alone on this machine
        ({"MPI_LOCALNRANKS": "two", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (2, "OMPI_COMM_WORLD_LOCAL_SIZE")),
        ({"MPI_LOCALNRANKS": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (3, "MPI_LOCALNRANKS")),  # in order
        # Slurm: this node's entry of "2(x3),1" (2 tasks on each of three nodes, then 1)
        ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "1"}, (2, "SLURM_STEP_TASKS_PER_NODE")),
        ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "1,4", "SLURM_NODEID": "1"}, (4, "SLURM_STEP_TASKS_PER_NODE")),
        ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, (1, None)),
        ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2(x3),5"}, (5, "SLURM_STEP_TASKS_PER_NODE")),  # node unknown: max
        ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2(x"}, (1, None)),  # malformed: ignored
        ({"SLURM_STEP_TASKS_PER_NODE": "4"}, (1, None)),  # inside an allocation, not started by srun
    ],
)
def test_processes_on_this_machine_from_the_launchers_variables(env, want):
    assert threads.local_processes(env) == want


@pytest.mark.parametrize(
    "env, cores, want",
    [
        ({}, 8, 8),
        ({"MPI_LOCALNRANKS": "2"}, 2, 1),  # 2 processes on 2 cores: one thread each
        ({"MPI_LOCALNRANKS": "3"}, 8, 2),  # 8 // 3
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "16"}, 8, 1),  # more processes than cores: still 1
        ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "6"}, 32, 6),  # Slurm's own share
        ({**SRUN, "SLURM_CPUS_PER_TASK": "6"}, 4, 4),  # ... at most the usable cores
        ({"SLURM_CPUS_PER_TASK": "6", "MPI_LOCALNRANKS": "2"}, 8, 4),  # not under srun: ignored
    ],
)
def test_default_threads_share_the_cores(env, cores, want):
    n, why, shared = threads.default_threads(env, cores)
    assert n == want and str(cores) in why
    assert shared == (want != cores or "SLURM_CPUS_PER_TASK" in why or "MPI_LOCALNRANKS" in env)


@pytest.fixture
def fresh_policy(monkeypatch):
    """policy() read anew from a faked environment; the process's own policy put back after."""
    monkeypatch.setattr(threads, "_POLICY", None)
    for key in (*threads.LOCAL_SIZE_VARIABLES, *threads.LOCAL_RANK_VARIABLES, "GPUBP_CPU_THREADS",
                "GPUBP_CPU_THREADS_POLICY", "SLURM_CPUS_PER_TASK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    return monkeypatch


def test_policy_divides_and_says_so_once_from_local_rank_0(fresh_policy):
    fresh_policy.setenv("MPI_LOCALNRANKS", "4")
    fresh_policy.setenv("MPI_LOCALRANKID", "0")
    p = threads.policy()
    assert p.threads == 2 and p.shared and "8 usable cores / 4 processes on this machine (MPI_LOCALNRANKS)" in p.source
    assert "2 BLAS + 2 Numba threads (8 usable cores / 4 processes" in threads.describe()["policy"]
    with pytest.warns(UserWarning, match=r"2 BLAS \+ 2 Numba thread\(s\) per process: 8 usable cores / 4 proc"):
        said = threads._announce(p)
    assert "GPUBP_CPU_THREADS=N" in said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert threads._announce(p, {"MPI_LOCALRANKID": "1"}) is None  # the other ranks keep quiet


def test_gpubp_cpu_threads_still_decides(fresh_policy):
    fresh_policy.setenv("MPI_LOCALNRANKS", "4")
    fresh_policy.setenv("GPUBP_CPU_THREADS", "3")
    p = threads.policy()
    assert p.threads == 3 and p.source == "GPUBP_CPU_THREADS" and not p.shared
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert threads._announce(p) is None  # nothing to say: the user chose


def test_alone_nothing_is_said(fresh_policy):
    p = threads.policy()
    assert p.threads == 8 and p.source == "8 usable cores" and not p.shared
    assert threads._announce(p) is None


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel installs it next to python
    return str(beside) if beside.exists() else shutil.which("mpiexec")


_RANK = """
import json, warnings
warnings.simplefilter("always")
from gpubp import threads
from gpubp.backends.cpu import CpuBackend
with warnings.catch_warnings(record=True) as said:
    CpuBackend.instance()
import numba
from threadpoolctl import threadpool_info
print(json.dumps({"threads": threads.policy().threads, "cores": threads.usable_cores(),
                  "numba": numba.get_num_threads(),
                  "blas": [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"],
                  "said": [str(w.message) for w in said]}))
"""


def test_two_ranks_under_mpiexec_share_the_cores(tmp_path):
    launcher = _mpiexec()
    if launcher is None:
        pytest.skip("mpiexec not found (pip install mpich, or a system MPI)")
    (tmp_path / "rank.py").write_text(_RANK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUBP_CPU", "NUMBA_ENABLE_CUDASIM"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([launcher, "-n", "2", sys.executable, str(tmp_path / "rank.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ranks = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(ranks) == 2, r.stdout
    for got in ranks:
        want = max(1, got["cores"] // 2)
        assert got["threads"] == got["numba"] == want and set(got["blas"]) <= {want}, got
    said = [m for got in ranks for m in got["said"] if "per process" in m]
    assert len(said) == 1 and "/ 2 processes on this machine" in said[0], ranks  # once, by local rank 0


def test_the_policy_is_reachable_from_the_package():
    # gp.threads after `import gpubp as gp`, without applying the policy or loading threadpoolctl/Numba's pools.
    code = ("import sys, gpubp as gp; assert gp.threads is sys.modules['gpubp.threads']; "
            "assert 'threads' in gp.__all__ and callable(gp.threads.set_policy) and callable(gp.threads.describe); "
            "print('threadpoolctl' in sys.modules, gp.threads._POLICY is None)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBP_CPU")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"], r.stdout
