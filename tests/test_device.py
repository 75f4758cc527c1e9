"""gpubp.device.cuda_status: "no NVIDIA GPU found" told apart from "driver too old for this CuPy",
probed once per process; device "auto" says once per process why it runs on the CPU.

The probes (CuPy, libcuda, /dev/nvidia*, cuInit, the driver's version) are replaced by fakes, so
every machine runs every case."""

from __future__ import annotations

import sys
import types
import warnings

import pytest

from gpubp import device


class CudaRuntimeError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status


INSUFFICIENT = CudaRuntimeError(35, "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA "
                                    "runtime version")
NO_DEVICE = CudaRuntimeError(100, "cudaErrorNoDevice: no CUDA-capable device is detected")


def fake_cupy(count=None, error=None, runtime=13020):
    def get_count():
        if error is not None:
            raise error
        return count

    rt = types.SimpleNamespace(getDeviceCount=get_count, runtimeGetVersion=lambda: runtime)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt))


class FakeLib:
    def __init__(self, init=0, version=12040):
        self.init, self.version = init, version

    def cuInit(self, flags):
        return self.init

    def cuDriverGetVersion(self, ref):
        ref._obj.value = self.version
        return 0


@pytest.fixture
def machine(monkeypatch):
    """Set up a fake machine: machine(cupy=..., lib=..., nodes=...) then read cuda_status()."""
    monkeypatch.setattr(device, "_STATUS", None)
    monkeypatch.setattr(device, "_TOLD", False)

    def setup(cupy=None, lib=None, nodes=True):
        monkeypatch.setitem(sys.modules, "cupy", cupy)  # None: "import cupy" raises ImportError
        monkeypatch.setattr(device, "_libcuda", lambda: (lib, "libcuda.so.1 not found") if lib is None else (lib, ""))
        monkeypatch.setattr(device, "_device_nodes", lambda: nodes)
        return device.cuda_status(refresh=True)

    return setup


def test_no_driver_library_and_no_cupy_is_no_gpu(machine):
    n, why = machine(cupy=None, lib=None, nodes=False)
    assert n == 0 and why.startswith("no NVIDIA GPU found") and "libcuda.so.1 not found" in why
    assert "/dev/nvidia" in why
    assert "cupy" not in why.lower() and "insufficient" not in why.lower()


def test_no_driver_library_with_cupy_is_no_gpu_not_an_old_driver(machine):
    # what this kind of machine shows: CuPy installed, no driver at all, and the runtime says "insufficient"
    n, why = machine(cupy=fake_cupy(error=INSUFFICIENT), lib=None, nodes=False)
    assert n == 0 and why.startswith("no NVIDIA GPU found")
    assert "insufficient" not in why.lower() and "cupy-cuda12x" not in why and "cuda12" not in why


def test_driver_library_but_no_device_nodes_is_no_gpu(machine):
    n, why = machine(cupy=fake_cupy(error=INSUFFICIENT), lib=FakeLib(), nodes=False)
    assert why.startswith("no NVIDIA GPU found (no /dev/nvidia* device")


def test_cuinit_no_device_is_no_gpu(machine):
    n, why = machine(cupy=fake_cupy(error=NO_DEVICE), lib=FakeLib(init=100), nodes=None)  # WSL: nodes unknown
    assert n == 0 and why.startswith("no NVIDIA GPU found") and "cuInit returned 100" in why


def test_driver_too_old_for_cupy_names_both_versions_and_the_cuda12_build(machine):
    n, why = machine(cupy=fake_cupy(error=INSUFFICIENT, runtime=13020), lib=FakeLib(version=12040), nodes=True)
    assert n == 0 and why.startswith("the NVIDIA driver is too old for this CuPy")
    assert "CUDA 12.4" in why and "CUDA 13.2" in why and "gpubp[cuda12]" in why
    assert "no NVIDIA GPU" not in why


def test_driver_older_than_cuda12_says_update_the_driver(machine):
    n, why = machine(cupy=fake_cupy(error=INSUFFICIENT, runtime=12080), lib=FakeLib(version=11080), nodes=True)
    assert "too old" in why and "CUDA 11.8" in why and "update the NVIDIA driver" in why and "cuda12]" not in why


def test_cupy_missing_on_a_gpu_machine_says_install_cupy(machine):
    n, why = machine(cupy=None, lib=FakeLib(), nodes=True)
    assert why.startswith("CuPy is not installed") and "gpubp[cuda13]" in why


def test_gpus_seen(machine):
    assert machine(cupy=fake_cupy(count=2), lib=FakeLib(), nodes=True) == (2, "")
    assert machine(cupy=fake_cupy(count=0), lib=FakeLib(), nodes=True)[1].startswith("the NVIDIA driver reports no GPU")


def test_probed_once_per_process(machine, monkeypatch):
    machine(cupy=None, lib=None, nodes=False)
    calls = []
    monkeypatch.setattr(device, "_probe", lambda: calls.append(1) or (0, "x"))
    monkeypatch.setattr(device, "_STATUS", None)
    for _ in range(3):
        device.cuda_status()
    assert calls == [1]
    device.cuda_status(refresh=True)
    assert calls == [1, 1]


def test_auto_says_once_per_process_why_it_runs_on_the_cpu(machine):
    _, why = machine(cupy=None, lib=None, nodes=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert str(device.parse_device("auto")) == "cpu"
        assert str(device.parse_device("auto")) == "cpu"
    assert len(seen) == 1 and issubclass(seen[0].category, UserWarning)
    assert str(seen[0].message) == f"device 'auto' runs on the CPU: {why}"
    assert seen[0].filename == __file__  # points at the caller, not inside gpubp


def test_a_program_that_shows_the_reason_is_not_warned(machine):
    machine(cupy=None, lib=None, nodes=False)
    assert device.auto_device_reason().startswith("no GPU: no NVIDIA GPU found")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        device.parse_device("auto")
    assert seen == []


def test_cuda_asked_for_on_a_machine_without_one_says_so(machine):
    machine(cupy=None, lib=None, nodes=False)
    with pytest.raises(RuntimeError, match="device 'cuda' asked for, but no GPU can be used: no NVIDIA GPU found"):
        device.parse_device("cuda")
