"""The simulator's shared arrays are shared by every thread of a block, even when threads race."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.conftest import CUDA_MODE

pytestmark = pytest.mark.skipif(CUDA_MODE != "simulator", reason="simulator only")


def test_threads_arriving_together_get_one_shared_array():
    """Without the lock, about 1 block in 13 split its array here (16 threads, 1 us switch interval)."""
    import sys

    from numba.cuda.simulator import kernelapi

    import gpubp.backends.numba_cuda  # noqa: F401  (installs the locked allocator)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows if it is there
    try:
        _race(kernelapi)
    finally:
        sys.setswitchinterval(old)


def _race(kernelapi):
    for _ in range(100):
        shared = kernelapi.FakeCUDAShared(0)
        start = threading.Barrier(16)
        got = []

        def thread(shared=shared, start=start, got=got):
            start.wait()
            got.append(shared.array(8, np.float64))  # one call site: one array per block

        threads = [threading.Thread(target=thread) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len({id(a) for a in got}) == 1


def test_two_call_sites_get_two_arrays():
    from numba.cuda.simulator import kernelapi

    import gpubp.backends.numba_cuda  # noqa: F401

    shared = kernelapi.FakeCUDAShared(0)
    a = shared.array(4, np.float64)
    b = shared.array(4, np.float64)
    assert a is not b


def test_active_is_the_mode_the_kernels_run_in():
    from gpubp.backends import _cudasim, numba_cuda, numba_cuda_optim

    assert _cudasim.active() is True
    assert numba_cuda.SIMULATOR is True and numba_cuda_optim.SIMULATOR is True
    assert _cudasim._installed


def test_install_changes_nothing_outside_the_simulator():
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = "from gpubp.backends import _cudasim; _cudasim.install(); print(_cudasim.active(), _cudasim._installed)"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=repo)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
