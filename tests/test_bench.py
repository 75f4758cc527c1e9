"""The benchmark, tested on the CPU: statistics, timing, the correctness gate, outputs, CLI, module layering.

The GPU contenders cannot run here; what is tested of them is that they say why, and the GPU flow runs
with a fake CUDA contender (gpubp's NumPy path timed through a stand-in for cupyx.profiler.benchmark).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gpubp import accuracy
from gpubp.bench import cases as bc
from gpubp.bench import cli, timing
from gpubp.bench import contenders as bk
from gpubp.bench import run as br
from gpubp.device import cuda_status

FAST = dict(warmup=1, warmup_time=0.0, min_repeats=3, min_time=0.0, progress=False)
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "gpubp" / "bench"


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpubp")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


# --- statistics and timing --------------------------------------------------------------


def test_summarize_gives_median_min_max_mean_count():
    s = timing.summarize([3.0, 1.0, 2.0, 5.0, 4.0], warmup=2)
    assert [s[k] for k in ("median_s", "min_s", "max_s", "mean_s", "count", "warmup")] == [3.0, 1.0, 5.0, 3.0, 5, 2]
    assert timing.summarize([4.0, 1.0, 2.0, 3.0])["median_s"] == 2.5
    assert s["samples_s"] == [3.0, 1.0, 2.0, 5.0, 4.0] and "wall_median_s" not in s
    assert s["noisy"] and not timing.summarize([1.0, 1.1, 1.2])["noisy"]  # noisy: median > 1.5x the fastest repeat
    with pytest.raises(ValueError):
        timing.summarize([])


class FakeClock:
    """A clock that only moves when a step says so: timings are exact."""

    def __init__(self, durations):
        self.t, self.durations, self.calls = 0.0, list(durations), []

    def __call__(self) -> float:
        return self.t

    def step(self, i: int) -> None:
        self.calls.append(i)
        self.t += self.durations[i]


def test_time_host_leaves_warmup_out_and_counts_repeats():
    clock = FakeClock([9.0, 8.0, 0.3, 0.1, 0.2, 0.4, 7.0])
    s = timing.Settings(warmup=2, min_repeats=4, max_repeats=4, min_time=0.0)
    st = timing.time_host(clock.step, s, clock=clock)
    assert clock.calls == [0, 1, 2, 3, 4, 5]  # i counts every call: steps can rotate inputs
    assert st["samples_s"] == pytest.approx([0.3, 0.1, 0.2, 0.4])
    assert (st["count"], st["warmup"]) == (4, 2)
    assert st["median_s"] == pytest.approx(0.25) and st["min_s"] == pytest.approx(0.1)
    assert st["max_s"] == pytest.approx(0.4)


def test_time_host_repeats_until_min_time_but_not_past_max_repeats():
    clock = FakeClock([0.1] * 100)
    st = timing.time_host(clock.step, timing.Settings(1, 2, 50, min_time=0.35), clock=clock)
    assert st["count"] == 4  # 0.1 s each: the 4th repeat reaches 0.35 s
    clock = FakeClock([0.1] * 100)
    st = timing.time_host(clock.step, timing.Settings(1, 2, 3, min_time=10.0), clock=clock)
    assert st["count"] == 3
    clock = FakeClock([0.01] * 100)
    st = timing.time_host(clock.step, timing.Settings(1, 1, 1, min_time=0.0, warmup_time=0.05), clock=clock)
    assert st["warmup"] == 5 and st["count"] == 1  # warm-up runs for its time as well as its count


class FakeBenchmark:
    """Stands in for cupyx.profiler.benchmark: same call, same result fields (seconds per repeat);
    stops after ``stop_after`` repeats when max_duration is finite, as a time limit would."""

    def __init__(self, stop_after=None):
        self.calls, self.stop_after = [], stop_after

    def __call__(self, func, n_repeat, n_warmup=10, max_duration=math.inf):
        self.calls.append((n_repeat, n_warmup, max_duration))
        for _ in range(n_warmup):
            func()
        n = min(n_repeat, self.stop_after) if self.stop_after and math.isfinite(max_duration) else n_repeat
        for _ in range(n):
            func()
        gpu = np.linspace(1e-3, 2e-3, n)
        return SimpleNamespace(gpu_times=gpu[None, :], cpu_times=gpu / 10)


def test_time_gpu_uses_events_after_warmup_and_keeps_the_minimum_count():
    calls, fake = [], FakeBenchmark()
    st = timing.time_gpu(calls.append, timing.Settings(warmup=2, min_repeats=3, max_repeats=3, min_time=0), fake)
    assert calls == [0, 1, 2, 3, 4] and st["count"] == 3 and st["warmup"] == 2  # i counts every call: inputs rotate
    assert fake.calls == [(3, 2, 0)] and st["median_s"] == pytest.approx(1.5e-3)
    assert st["wall_median_s"] == pytest.approx(1.5e-4)
    fake = FakeBenchmark(stop_after=2)  # max_duration ends the first call after 2 repeats
    st = timing.time_gpu(lambda i: None, timing.Settings(warmup=1, min_repeats=5, max_repeats=100, min_time=0.1), fake)
    assert st["count"] == 5 and fake.calls == [(100, 1, 0.1), (3, 0, math.inf)]


def test_inputs_rotate_past_the_caches():
    assert timing.rotation("cuda", 1 << 20, 50 << 20) == 100  # copies spanning twice the L2 size
    assert timing.rotation("cuda", 1 << 10, 50 << 20) == 256 and timing.rotation("cuda", 1 << 30, 50 << 20) == 1
    assert timing.rotation("cuda", 1 << 20, None) == 1  # L2 unknown
    assert timing.rotation("cpu", 1 << 20, None) == 4 and timing.rotation("cpu", 64 << 20, None) == 1


class FakeCudaContender(bk.Contender):
    """gpubp's NumPy path dressed as a GPU contender, to run the GPU-target flow on the CPU."""

    def __init__(self):
        super().__init__("fake-cuda", "cpu")
        self.device = "cuda"

    def available(self):
        return True, ""

    def backend(self):
        from gpubp.backends.numpy_ref import BACKEND

        return BACKEND

    def model(self, layers, dtype, flat=None):
        import gpubp as gp

        model = gp.Sequential(*layers, device="cpu", dtype=dtype, seed=0, dense_impl="reference")
        if flat is not None:
            model.arena.backend.assign_(model.arena.data, np.asarray(flat, dtype=model.dtype))
        return model

    def array(self, a):
        return np.array(a, copy=True)

    def timer(self, step, settings):
        return timing.time_gpu(step, settings, FakeBenchmark())

    def release(self):
        pass


def run_suite(cases, contenders, **opts):
    return br.Runner(cases, contenders, br.Options(tier="smoke", **{**FAST, **opts})).run()


def test_the_gpu_grid_runs_when_a_gpu_contender_can_run():
    res = run_suite(bc.select_cases("smoke", patterns=["loss:cross_entropy"]), [FakeCudaContender()])
    assert res["target"] == "gpu"
    assert [r["size_label"] for r in res["records"]] == ["N=4096 C=10", "N=4096 C=1000"]
    assert all(r["status"] == "ok" and r["stats"]["wall_median_s"] > 0 for r in res["records"]), res["records"]
    if cuda_status()[0] == 0:  # the GPU ceilings cannot be measured: said, not fatal
        assert "error" in res["ceilings"]["cuda"]


def test_a_backend_that_counts_launches_gives_launches_per_step(monkeypatch):
    from gpubp.backends.numpy_ref import BACKEND

    counter = itertools.count(0, 7)  # 7 launches between any two readings
    monkeypatch.setattr(BACKEND, "launch_count", lambda: next(counter), raising=False)
    res = run_suite(bc.select_cases("smoke", patterns=["step:deep_narrow", "loss:*"]), [FakeCudaContender()])
    step = [r for r in res["records"] if r["case"] == "step:deep_narrow"]
    assert step and all(r["status"] == "ok" and r["launches_per_step"] == 7 for r in step)
    assert all("launches_per_step" not in r for r in res["records"] if r["case"] == "loss:cross_entropy")
    assert "7 kernel launches per step" in br.table(res)
    monkeypatch.delattr(BACKEND, "launch_count")
    res = run_suite(bc.select_cases("smoke", patterns=["step:deep_narrow"]), [FakeCudaContender()])
    assert all("launches_per_step" not in r for r in res["records"])  # absent: skipped silently


# --- the gate -----------------------------------------------------------------------------


def test_rel_err_is_relative_to_the_largest_reference_value():
    want = np.array([1.0, -4.0, 2.0])
    assert accuracy.rel_err(want, want) == 0.0
    assert accuracy.rel_err(want + [0.0, 0.0, 0.04], want) == pytest.approx(0.01)
    assert accuracy.rel_err(want + 0.04, want, slack=0.05) == 0.0
    assert accuracy.rel_err([1.0, np.nan, 2.0], want) == math.inf
    with pytest.raises(ValueError, match="shape"):
        accuracy.rel_err(want[:2], want)


def test_compare_refuses_missing_wrong_and_misshapen_results():
    want = {"a": np.ones(3), "b": np.full(2, 2.0)}
    assert bc.compare({"a": np.ones(3), "b": np.full(2, 2.0)}, want, 1e-3).ok
    g = bc.compare({"a": np.ones(3), "b": np.full(2, 2.02)}, want, 1e-3)
    assert not g.ok and g.worst == "b" and g.max_err == pytest.approx(0.01)
    assert "wrong result (max err 0.01 in 'b'" in g.message
    assert not bc.compare({"a": np.ones(3)}, want, 1e-3).ok
    assert not bc.compare({"a": np.ones(4), "b": np.full(2, 2.0)}, want, 1e-3).ok


class WrongContender(bk.Contender):
    """gpubp's NumPy path with a 1% error (or NaN) put into what the gate sees; counts its steps."""

    def __init__(self, how: str = "scale") -> None:
        super().__init__(f"wrong-{how}", "cpu")
        self.how, self.steps = how, 0

    def setup(self, case, size, inputs, copies):
        prep = super().setup(case, size, inputs, copies)

        def step(i):
            self.steps += 1
            prep.step(i)

        def result():
            out = prep.result()
            key = next(iter(out))
            out[key] = out[key] * 1.01 if self.how == "scale" else np.full_like(out[key], np.nan)
            return out

        return bk.Prepared(step, result)


@pytest.mark.parametrize("how", ["scale", "nan"])
def test_a_wrong_result_is_refused_and_never_timed(how):
    wrong = WrongContender(how)
    res = run_suite(bc.select_cases("smoke", patterns=["dense_fwd_bwd:relu"]),
                    [bk.make_contenders(["gpubp-cpu"])[0], wrong])
    mine = [r for r in res["records"] if r["contender"] == wrong.name]
    assert len(mine) == 4 and all(r["status"] == "refused" for r in mine)
    assert all(r["reason"].startswith("wrong result (max err") and "stats" not in r for r in mine)
    assert wrong.steps == 4  # one gate step per size, no warm-up, no timing
    ok = [r for r in res["records"] if r["contender"] == "gpubp-cpu"]
    assert all(r["status"] == "ok" and r["gate"]["max_err"] < 1e-5 for r in ok)
    assert all(r["gate"]["tol"] == accuracy.gate_tolerance("float32") for r in ok)  # the contract's tolerance
    assert res["headline"] == []  # nothing timed beside the primary


def test_the_gate_checks_a_reduced_batch_when_the_reference_costs_too_much():
    res = run_suite(bc.select_cases("smoke", patterns=["dense_fwd:relu"]), bk.make_contenders(["gpubp-cpu"]),
                    gate_flops=1e3)
    big = [r for r in res["records"] if r["size"]["N"] == 256]
    assert big and all(r["status"] == "ok" and r["gate"]["reduced"] for r in big)
    assert big[0]["gate"]["size"].startswith("N=64 ")


def test_a_relu_kink_flipped_by_rounding_is_accepted_but_other_errors_are_not():
    case = bc.layer_case("fwd_bwd", "relu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    b[0] = -(x[0].astype(np.float64) @ w[:, 0].astype(np.float64))  # z[0, 0] = 0 up to rounding
    da = rng.standard_normal((8, 3)).astype(np.float32)
    ref = case.reference({"x": x, "w": w, "b": b, "da": da}, accuracy.unit_roundoff("float32"))
    assert ref["slack"]["db"][0] > 0 and ref["slack"]["db"][1:].max() == 0
    # the result of a contender whose z[0, 0] rounded to the other side of the kink
    flipped = {k: ref[k].copy() for k in ("a", "dx", "dW", "db")}
    sign = -1.0 if x[0] @ w[:, 0] + b[0] > 0 else 1.0
    flipped["db"][0] += sign * da[0, 0]
    flipped["dW"][:, 0] += sign * x[0] * da[0, 0]
    flipped["dx"][0] += sign * da[0, 0] * w[:, 0]
    assert case.compare(flipped, ref, 1e-3).ok
    assert not bc.compare(flipped, {k: ref[k] for k in flipped}, 1e-3).ok  # without the allowance: refused
    flipped["db"][1] *= 1.01
    assert not case.compare(flipped, ref, 1e-3).ok


def test_step_and_optimizer_gates_see_a_wrong_update():
    case = bc.step_case("deep_narrow")
    inputs = case.restrict(case.inputs({"N": 64}, 0), {"N": 64})
    ref = case.reference(inputs)
    good = {"loss": ref["loss"], "grads": ref["grads"], "params": ref["params"].astype(np.float32)}
    assert case.compare(good, ref, 1e-3).ok
    p0 = ref["params0"]
    wrong = dict(good, params=(p0 + 1.02 * (ref["params"] - p0)).astype(np.float32))  # lr 2% too large
    g = case.compare(wrong, ref, 1e-3)
    assert not g.ok and g.worst.startswith("update ")

    opt = bc.optim_case("adam")
    inp = opt.inputs({"P": 5000}, 0)
    ref = opt.reference(inp)
    p = inp["p"].astype(np.float64)
    p[ref["index"]] = ref["p"]
    assert opt.compare({"p": p.astype(np.float32)}, ref, 1e-3).ok
    p[ref["index"]] += 0.05 * (ref["p"] - ref["p0"])
    assert not opt.compare({"p": p.astype(np.float32)}, ref, 1e-3).ok


# --- cases and contenders -------------------------------------------------------------------


def test_case_selection_by_group_name_and_glob():
    quick = [c.name for c in bc.select_cases("quick")]
    assert "dense_fwd:relu" in quick and "dense_fwd:gelu" in quick and "dense_fwd:silu" not in quick
    assert {"step:mnist_mlp", "step:deep_narrow", "step:wide", "optim:adam", "optim:sgd_momentum",
            "loss:cross_entropy"} <= set(quick)
    assert [c.name for c in bc.select_cases("quick", patterns=["dense_fwd"])] == ["dense_fwd:relu", "dense_fwd:gelu"]
    assert len(bc.select_cases("full", patterns=["dense_fwd_bwd"])) == 10
    assert [c.name for c in bc.select_cases("quick", patterns=["dense_*:silu"])] == ["dense_fwd:silu", "dense_fwd_bwd:silu"]
    with pytest.raises(ValueError, match="no case matches 'nope'"):
        bc.select_cases("quick", patterns=["nope"])
    with pytest.raises(ValueError, match="unknown 'cuda-magic'"):
        bk.make_contenders(["cuda-magic"])


def test_work_counts_follow_the_stated_formulas():
    fwd, both = bc.layer_case("fwd", "relu"), bc.layer_case("fwd_bwd", "relu")
    size = {"N": 256, "W": 64}
    assert fwd.work(size).flops == 2 * 256 * 64 * 64 and both.work(size).flops == 6 * 256 * 64 * 64
    assert fwd.throughput(size, 1e-3) == pytest.approx(2 * 256 * 64 * 64 / 1e-3 / 1e9)
    assert bc.optim_case("adam").work({"P": 10}).bytes == 7 * 4 * 10
    assert bc.optim_case("sgd_momentum").work({"P": 10}).bytes == 5 * 4 * 10
    assert bc.optim_case("adam").throughput({"P": 10}, 1e-3) == pytest.approx(7 * 4 * 10 / 1e-3 / 1e9)
    mnist = bc.step_case("mnist_mlp")
    assert mnist.work({"N": 1}).flops == 4 * 784 * 1024 + 6 * 1024 * 1024 + 6 * 1024 * 10
    assert mnist.throughput({"N": 4096}, 0.5) == 8192  # samples/s
    sizes, note = mnist.grid("quick", "cpu")
    assert sizes == [{"N": 256}] and note.startswith("reduced")
    assert mnist.grid("quick", "gpu") == ([{"N": 4096}], "")
    assert bc.step_case("wide").grid("quick", "cpu")[0] == []
    assert bc.step_case("wide").grid("quick", "gpu")[0] == [{"N": 8192}]
    assert bc.step_case("deep_narrow").grid("quick", "gpu")[0] == [{"N": 2**18}]
    assert bc.optim_case("adam").grid("quick", "gpu")[0] == [{"P": 100_000_000}]
    assert bc.optim_case("adam").label({"P": 100_000_000}) == "P=100M"


def test_big_inputs_repeat_a_prime_length_block(monkeypatch):
    monkeypatch.setattr(bc, "_BLOCK", 101)
    x = bc.fill(np.random.default_rng(0), (50, 7), "float32")
    assert x.shape == (50, 7) and x.dtype == np.float32
    assert not np.array_equal(x[0], x[1]) and x.ravel()[101] == x.ravel()[0]


@pytest.mark.skipif(cuda_status()[0] > 0, reason="a GPU is present")
def test_gpu_contenders_say_why_they_cannot_run():
    why = cuda_status()[1]
    by_name = {c.name: c for c in bk.make_contenders(compile_=True)}
    for name in ("gpubp", "gpubp-unfused"):
        ok, reason = by_name[name].available()
        assert not ok and why in reason
    for name in ("torch-cuda", "torch-compile"):
        ok, reason = by_name[name].available()
        assert not ok and reason


def test_ratios_and_headline_come_from_medians_at_the_same_size():
    def rec(contender, size, median):
        return {"case": "c", "size_label": size, "contender": contender, "status": "ok", "stats": {"median_s": median}}

    records = [rec("gpubp", "a", 1.0), rec("torch", "a", 2.0), rec("gpubp", "b", 1.0), rec("torch", "b", 8.0),
               rec("torch", "c", 3.0)]
    br.add_ratios(records, "gpubp")
    assert [r["speedup_of_primary"] for r in records] == [1.0, 2.0, 1.0, 8.0, None]
    assert records[0]["vs"] == {"torch": 2.0} and records[1]["vs"] == {"gpubp": 0.5} and records[4]["vs"] == {}
    (h,) = br.headline(records, "gpubp")
    assert h["contender"] == "torch" and h["geomean"] == pytest.approx(4.0) and (h["min"], h["max"], h["sizes"]) == (2, 8, 2)


# --- the whole command on the CPU ------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.run(bench_args("--smoke", "--out", str(out), "--quiet", "--warmup-time", "0.02"))
    return code, buf.getvalue(), out


def test_bench_command_runs_the_cpu_cases_and_prints_a_table(smoke_run):
    code, text, out = smoke_run
    assert code == 0, text
    assert "median" in text and "thrpt" in text and "ratio" in text and "headline:" in text
    assert "floor" in text and "of floor" in text and "ceilings CPU: copy " in text
    for case in ("dense_fwd:relu", "dense_fwd_bwd:relu", "step:mnist_mlp", "optim:adam", "loss:cross_entropy"):
        assert f"\n{case}: " in text
    assert "step:wide: not run in the smoke suite" in text
    if cuda_status()[0] == 0:
        assert "GPU: none: " + cuda_status()[1] in text
        assert "GPU contenders skipped (gpubp, gpubp-unfused, torch-cuda, torch-compile, jax-jit)" in text
    assert f"wrote {out}/" in text


def test_results_json_has_every_field(smoke_run):
    _, _, out = smoke_run
    res = json.loads((out / "results.json").read_text())
    for key in ("schema", "tier", "target", "dtype", "primary", "options", "timing", "contenders", "environment",
                "cases", "ceilings", "records", "not_measured", "headline", "plots"):
        assert key in res, key
    env = res["environment"]
    assert env["cpu"]["model"] and env["cpu"]["logical_cpus"] >= 1
    assert env["blas"]["name"] and "threads" in env["blas"] and env["blas"]["threads_source"] == "threadpoolctl"
    assert isinstance(env["blas"]["threads"], int) and env["blas"]["threads"] >= 1  # read by threadpoolctl
    assert env["git"]["commit"] and env["date"] and env["tf32"]["requested"] is False
    for dist in ("python", "gpubp", "numpy", "numba", "cupy-cuda13x", "cupy-cuda12x", "torch", "matplotlib"):
        assert dist in env["versions"]
    assert "available" in env["gpu"] and (env["gpu"]["available"] or env["gpu"]["reason"])
    assert res["timing"]["tolerances"] == accuracy.GATE
    cpu = res["ceilings"]["cpu"]
    assert cpu["bandwidth_Bps"] > 0 and cpu["flops"] > 0 and cpu["copy"]["count"] >= 3
    assert {c["name"] for c in res["contenders"]} == set(bk.CONTENDER_NAMES)
    ok = [r for r in res["records"] if r["status"] == "ok"]
    assert ok and all(r["status"] in ("ok", "skipped") for r in res["records"]), [
        (r["case"], r["contender"], r["reason"]) for r in res["records"] if r["status"] != "ok"]
    for r in ok:
        st = r["stats"]
        assert st["min_s"] <= st["median_s"] <= st["max_s"] and st["count"] == len(st["samples_s"]) >= 3
        assert r["gate"]["ok"] and r["gate"]["max_err"] <= r["gate"]["tol"]
        assert r["throughput"] > 0 and r["floor_s"] > 0 and r["speedup_of_primary"] > 0
        assert "of_peak_flops" in r["fraction"] and "of_bandwidth" in r["fraction"]
        assert 0 < r["fraction"]["of_floor"] == pytest.approx(r["floor_s"] / st["median_s"])
        if r["work"]["gemms"]:  # the case's GEMMs timed alone on the same device, and the ratio to them
            assert r["gemm"]["median_s"] > 0 and r["over_gemm"] == pytest.approx(st["median_s"] / r["gemm"]["median_s"])
        assert r["work"]["items"] > 0 and r["size_label"] and r["unit"] and isinstance(r["vs"], dict)
    assert any(r["case"].startswith("step:") and r["over_gemm"] > 0 for r in ok)
    if any(r["contender"] == "torch-cpu" for r in ok):
        assert any(h["contender"] == "torch-cpu" for h in res["headline"])


def test_plots_and_summary_are_written(smoke_run):
    _, _, out = smoke_run
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"dense-fwd-relu.png", "step-mnist-mlp.png", "optim-adam.png",
                                      "loss-cross-entropy.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = (out / "summary.md").read_text()
    assert md.startswith("# gpubp bench: ") and "headline:" in md and "\ndense_fwd:relu: " in md
    assert "ceilings CPU: copy " in md and "of floor" in md and "x GEMMs" in md
    assert "![dense_fwd:relu](dense-fwd-relu.png)" in md


def test_without_matplotlib_the_plots_are_skipped_and_said_so(smoke_run, tmp_path, monkeypatch):
    _, _, out = smoke_run
    results = json.loads((out / "results.json").read_text())
    real = br.importlib.util.find_spec
    monkeypatch.setattr(br.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    written = br.write_all(results, tmp_path)
    assert not any(k.startswith("plot:") for k in written) and not list(tmp_path.glob("*.png"))
    data = json.loads((tmp_path / "results.json").read_text())
    assert "matplotlib is not installed" in data["plots_skipped"]


def test_no_plots_writes_none(tmp_path, capsys):
    code = cli.run(bench_args("--smoke", "--cases", "loss", "--contenders", "gpubp-cpu", "--out", str(tmp_path),
                              "--quiet", "--no-plots", "--warmup-time", "0"))
    assert code == 0 and not list(tmp_path.glob("*.png")) and (tmp_path / "summary.md").exists()
    assert "0 plot(s)" in capsys.readouterr().out


def test_list_prints_cases_and_contenders(capsys):
    assert cli.run(bench_args("--list", "--cases", "step")) == 0
    out = capsys.readouterr().out
    assert "step:mnist_mlp" in out and "dense_fwd" not in out and "torch-compile" in out


def test_results_go_outside_the_checkout_by_default(tmp_path, monkeypatch):
    env = {"date": "2026-01-02T03:04:05+00:00", "gpu": {"available": True, "name": "NVIDIA H100 80GB HBM3"},
           "cpu": {"model": "AMD EPYC"}}
    monkeypatch.delenv("GPUBP_BENCH_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    folder = cli.default_folder({"environment": env})
    assert not folder.resolve().is_relative_to(ROOT) and folder.name == "2026-01-02-nvidia-h100-80gb-hbm3"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert cli.default_folder({"environment": env}).parent == tmp_path / "data" / "gpubp" / "bench"
    monkeypatch.setenv("GPUBP_BENCH_DIR", str(tmp_path / "runs"))
    env["gpu"] = {"available": False, "reason": "no driver"}
    folder = cli.default_folder({"environment": env})
    assert folder.parent == tmp_path / "runs" and folder.name.startswith("2026-01-02-amd-epyc")
    folder.mkdir(parents=True)
    assert cli.default_folder({"environment": env}).name == folder.name + "-2"  # an earlier run is kept


def test_unknown_names_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="--cases"):
        cli.run(bench_args("--cases", "dense_fwd:nonsense"))
    with pytest.raises(ValueError, match="--contenders"):
        cli.run(bench_args("--contenders", "jax"))


def test_the_old_name_of_the_cpu_contender_says_its_new_name(capsys):
    # "numpy" always ran gpubp's CPU backend; it is "gpubp-cpu" now, and the old name says so.
    with pytest.raises(ValueError, match=r"--contenders: 'numpy' is now called 'gpubp-cpu'"):
        cli.run(bench_args("--contenders", "numpy,torch-cpu"))
    from gpubp.cli import main

    assert main(["bench", "--list", "--contenders", "numpy"]) == 2
    assert "'gpubp-cpu'" in capsys.readouterr().err
    assert main(["bench", "--list", "--contenders", "gpubp-cpu"]) == 0
    assert "gpubp-cpu" in capsys.readouterr().out


def test_the_gpubp_command_reaches_bench(capsys):
    from gpubp.cli import main

    assert main(["bench", "--list", "--cases", "optim"]) == 0
    assert "optim:adam" in capsys.readouterr().out


def test_importing_gpubp_loads_neither_bench_nor_torch():
    code = ("import sys, gpubp; print(sorted(m for m in sys.modules if m.startswith('gpubp.bench') or "
            "m.split('.')[0] in ('torch', 'cupy', 'cupyx', 'matplotlib', 'threadpoolctl') or m == 'numba.cuda'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.strip() == "[]"


def _bench_imports(path: Path) -> set[str]:
    """The gpubp.bench modules a module imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpubp.bench"):
            names = [node.module] if node.module != "gpubp.bench" else [f"gpubp.bench.{a.name}" for a in node.names]
            out |= {n.split(".")[2] for n in names if n.count(".") >= 2}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("gpubp.bench.")}
    return out


def test_bench_modules_form_a_one_way_layering():
    modules = {p.stem: _bench_imports(p) for p in BENCH.glob("*.py") if p.stem != "__init__"}
    assert set(modules) >= {"timing", "cases", "contenders", "run", "cli"}

    def reach(m):  # every module m imports, directly or through others
        seen, todo = set(), list(modules.get(m, ()))
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo += modules.get(d, ())
        return seen

    for name in modules:
        assert name not in reach(name), f"gpubp.bench.{name} imports a module that imports it back"
    assert not _bench_imports(BENCH / "__init__.py")
    code = """if 1:  # each bench module imported alone, in a fresh interpreter: which bench modules it loads
        import importlib, json, sys
        out = {}
        for name in sys.argv[1:]:
            for m in [m for m in sys.modules if m.startswith("gpubp.bench")]:
                del sys.modules[m]
            importlib.import_module(f"gpubp.bench.{name}")
            out[name] = sorted(m.split(".")[2] for m in sys.modules if m.startswith("gpubp.bench."))
        print(json.dumps(out))"""
    r = subprocess.run([sys.executable, "-c", code, *sorted(modules)], capture_output=True, text=True, timeout=120,
                       check=True)
    for name, loaded in json.loads(r.stdout).items():  # only modules below it, none that imports it back
        assert all(name not in reach(m) for m in set(loaded) - {name}), (name, loaded)


def test_fraction_formatting_and_times():
    assert br.fmt_time(1.5e-6) == "1.5us" and br.fmt_time(0.25) == "250ms" and br.fmt_time(2.0) == "2s"
    assert br.fmt_si(65536) == "65.5k" and br.fmt_pct(0.5) == "50%" and br.fmt_pct(0.012) == "1.2%"


# --- allreduce: measured by gpubp.distributed.benchmark ------------------------------------------


def test_allreduce_without_its_module_is_listed_as_not_measured(monkeypatch):
    real = bc.importlib.util.find_spec
    monkeypatch.setattr(bc.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gpubp.distributed.benchmark" else real(name, *a))
    res = run_suite(bc.select_cases("smoke", patterns=["allreduce"]), [])
    assert res["records"] == []
    assert res["not_measured"] == [{"case": "allreduce", "contender": "*",
                                    "reason": "gpubp.distributed.benchmark is not in this installation"}]
    assert "allreduce: gpubp.distributed.benchmark is not in this installation" in br.table(res)


def test_allreduce_reports_each_time_over_one_process(monkeypatch):
    import gpubp.distributed.benchmark as dpb

    calls = []

    def fake_measure(procs, sizes, device, rounds, **kw):
        calls.append((tuple(procs), list(sizes), device, rounds, kw))
        return [{"what": w, "procs": k, "size": n, "median_s": t * (1.5 if k == 2 else 1.0), "p10_s": t, "p90_s": 2 * t,
                 "device": device} for k in procs for w, n, t in (("allreduce", sizes[0], 1e-4), ("step", 512, 0.02))]

    monkeypatch.setattr(dpb, "mpiexec", lambda: "/usr/bin/mpiexec")
    monkeypatch.setattr(dpb, "measure", fake_measure)
    assert [c.name for c in bc.select_cases("full")][-1] == "allreduce"  # in the full suite only
    assert "allreduce" not in [c.name for c in bc.select_cases("quick")]
    res = run_suite(bc.select_cases("smoke", patterns=["allreduce"]), [])
    assert calls[0][:4] == ((1, 2), [2**16], "cpu", 5) and calls[0][4]["dtype"] == "float32"
    by = {(r["what"], r["procs"]): r for r in res["records"]}
    assert len(by) == 4 and all(r["status"] == "ok" for r in res["records"])
    assert by["step", 1]["vs_1_process"] == 1.0 and by["step", 2]["vs_1_process"] == pytest.approx(1.5)
    assert by["step", 2]["size"] == {"N": 512} and by["allreduce", 2]["size_label"] == "P=2^16"
    text = br.table(res)
    assert "vs 1 process" in text and "cpu x2" in text and "1.50" in text


# --- mixed-precision cases ------------------------------------------------------------------


def test_precision_cases_are_named_grouped_and_kept_out_of_the_smoke_suite():
    quick = {c.name: c for c in bc.select_cases("quick", patterns=["precision"])}
    assert set(quick) == {f"{n}@{p}" for n in ("dense_fwd_bwd:relu", "step:mnist_mlp") for p in ("tf32", "bf16-mixed")}
    assert all(c.group == "precision" and c.dtype == "float32" for c in quick.values())
    assert quick["step:mnist_mlp@bf16-mixed"].precision == "bf16-mixed" and "jax" in quick["step:mnist_mlp@bf16-mixed"].ops
    assert "jax" not in quick["step:mnist_mlp@tf32"].ops and "jax" not in quick["dense_fwd_bwd:relu@bf16-mixed"].ops
    assert not any(c.precision != "fp32" for c in bc.select_cases("smoke"))  # CI's smoke run is unchanged
    assert [c.name for c in bc.select_cases("smoke", patterns=["step"])] == ["step:mnist_mlp", "step:deep_narrow",
                                                                             "step:wide"]
    assert len(bc.select_cases("full", patterns=["precision"])) == 10
    assert bc.select_cases("quick", "float64", patterns=["dense_fwd_bwd"])  # float64: no precision cases
    assert not [c for c in bc.all_cases("float64") if c.precision != "fp32"]
    assert [c.name for c in bc.select_cases("smoke", patterns=["step:*@tf32"])] == [  # names and globs: any tier
        "step:mnist_mlp@tf32", "step:deep_narrow@tf32", "step:wide@tf32"]
    case = quick["dense_fwd_bwd:relu@bf16-mixed"]  # same work as fp32; the CPU runs the smoke sizes
    assert case.work({"N": 256, "W": 64}) == bc.layer_case("fwd_bwd", "relu").work({"N": 256, "W": 64})
    assert case.grid("quick", "cpu")[0] == bc.layer_case("fwd_bwd", "relu").grid("smoke", "cpu")[0]
    assert case.grid("quick", "gpu") == bc.layer_case("fwd_bwd", "relu").grid("quick", "gpu")


def test_precision_gate_scales_the_contracts_tf32_tolerance_by_the_unit_roundoff():
    from gpubp.bench import gate

    assert gate.tolerance("float32") == (accuracy.gate_tolerance("float32"), 2.0**-24)
    assert gate.tolerance("float32", precision="tf32") == (accuracy.gate_tolerance("float32", tf32=True), 2.0**-11)
    assert gate.tolerance("float32", tf32=True, precision="bf16-mixed") == (pytest.approx(8e-2), 2.0**-8)
    assert gate.tolerance("float32", precision="fp16-mixed")[0] == pytest.approx(1e-2)


def test_tensor_core_peaks_are_the_dense_datasheet_figures():
    assert timing.tensor_core_peak("NVIDIA H100 80GB HBM3", "tf32")[0] == 494.7e12
    assert timing.tensor_core_peak("NVIDIA H200", "bf16")[0] == 989.4e12
    assert timing.tensor_core_peak("NVIDIA H100 PCIe", "bf16")[0] == 756.5e12
    peak, why = timing.tensor_core_peak("NVIDIA A10", "bf16")
    assert peak is None and "no stated BF16 tensor-core peak for NVIDIA A10" in why


class PoisonedContender(WrongContender):
    """A 50% error or NaN: beyond even the bf16-mixed gate (8e-2)."""

    def setup(self, case, size, inputs, copies):
        prep = bk.Contender.setup(self, case, size, inputs, copies)

        def result():
            out = prep.result()
            key = next(iter(out))
            out[key] = out[key] * 1.5 if self.how == "scale" else np.full_like(out[key], np.nan)
            return out

        return bk.Prepared(prep.step, result)


def test_precision_cases_run_tiny_on_the_cpu_and_refuse_poisoned_results(monkeypatch):
    """gpubp's emulation of tf32 and bf16-mixed on the CPU at one tiny size each, through the runner: within the
    precision's gate (and not bit-equal to fp32 in bf16); a poisoned contender is refused. No timing asserted."""
    import gpubp as gp

    monkeypatch.setitem(bc.LAYER_GRID, ("smoke", "cpu"), ([16], [32]))
    monkeypatch.setitem(bc.MODELS, "mnist_mlp", ("tiny MLP", [32, 16, 16, 10], 16, {"smoke": ([16], [16])}))
    monkeypatch.setattr(bc, "_initial_params", lambda key, dtype, seed: np.asarray(
        gp.Sequential(*bc.model_layers(key), dtype="float64", seed=seed).arena.data, dtype=dtype))
    cases = bc.select_cases("quick", patterns=["precision"])
    poisoned = [PoisonedContender("scale"), PoisonedContender("nan")]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the emulation says once that it emulates
        res = run_suite(cases, [bk.make_contenders(["gpubp-cpu"])[0], *poisoned], min_repeats=1)
    ok = [r for r in res["records"] if r["contender"] == "gpubp-cpu"]
    assert len(ok) == 4 and all(r["status"] == "ok" for r in ok), [(r["case"], r["reason"]) for r in ok]
    for r in ok:
        tol = 8e-2 if r["case"].endswith("bf16-mixed") else 1e-2
        assert r["gate"]["tol"] == pytest.approx(tol) and 0 < r["gate"]["max_err"] < tol / 4, r["gate"]
        assert r["peak_source"] == "measured GEMM ceiling" and "gemm" in r
    bad = [r for r in res["records"] if r["contender"] in ("wrong-scale", "wrong-nan")]
    assert len(bad) == 8 and all(r["status"] == "refused" and "stats" not in r for r in bad)

