"""The benchmark harness, tested on the CPU: statistics, timing, the correctness gate, outputs, CLI.

The GPU contenders cannot run here; what is tested of them is that they say why.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from gpubp.bench import cases as bc
from gpubp.bench import cli, harness, report
from gpubp.device import cuda_status

FAST = dict(warmup=1, warmup_time=0.0, min_repeats=3, min_time=0.0, progress=False)


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpubp")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


# --- statistics and timing --------------------------------------------------------------


def test_summarize_gives_median_min_max_mean_count():
    s = harness.summarize([3.0, 1.0, 2.0, 5.0, 4.0], warmup=2)
    assert (s.median, s.min, s.max, s.mean, s.count, s.warmup) == (3.0, 1.0, 5.0, 3.0, 5, 2)
    assert harness.summarize([4.0, 1.0, 2.0, 3.0]).median == 2.5
    d = s.to_dict()
    assert d["median_s"] == 3.0 and d["samples_s"] == [3.0, 1.0, 2.0, 5.0, 4.0] and d["count"] == 5
    assert s.noisy and not harness.summarize([1.0, 1.1, 1.2]).noisy  # noisy: median > 1.5x the fastest repeat
    with pytest.raises(ValueError):
        harness.summarize([])


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
    s = harness.Settings(warmup=2, min_repeats=4, max_repeats=4, min_time=0.0)
    st = harness.time_host(clock.step, s, clock=clock)
    assert clock.calls == [0, 1, 2, 3, 4, 5]  # i counts every call: steps can rotate inputs
    assert st.samples == pytest.approx([0.3, 0.1, 0.2, 0.4])
    assert (st.count, st.warmup) == (4, 2)
    assert st.median == pytest.approx(0.25) and st.min == pytest.approx(0.1) and st.max == pytest.approx(0.4)


def test_time_host_repeats_until_min_time_but_not_past_max_repeats():
    clock = FakeClock([0.1] * 100)
    st = harness.time_host(clock.step, harness.Settings(1, 2, 50, min_time=0.35), clock=clock)
    assert st.count == 4  # 0.1 s each: the 4th repeat reaches 0.35 s
    clock = FakeClock([0.1] * 100)
    st = harness.time_host(clock.step, harness.Settings(1, 2, 3, min_time=10.0), clock=clock)
    assert st.count == 3
    clock = FakeClock([0.01] * 100)
    st = harness.time_host(clock.step, harness.Settings(1, 1, 1, min_time=0.0, warmup_time=0.05), clock=clock)
    assert st.warmup == 5 and st.count == 1  # warm-up runs for its time as well as its count


class FakeEvents:
    """CUDA-event stand-in on the host clock: records what the device timer does, in order."""

    def __init__(self):
        self.log = []

    def record(self):
        self.log.append("record")
        import time

        return time.perf_counter()

    def elapsed(self, start, end):
        return end - start

    def wait(self, event):
        self.log.append("wait")

    def synchronize(self):
        self.log.append("sync")

    def flush(self):
        self.log.append("flush")


def test_time_device_flushes_before_each_repeat_outside_the_events():
    ev = FakeEvents()
    calls = []
    st = harness.time_device(calls.append, harness.Settings(warmup=2, min_repeats=3, max_repeats=3, min_time=0), ev)
    assert calls == [0, 1, 2, 3, 4] and st.count == 3 and st.warmup == 2
    assert ev.log == ["sync"] + ["flush", "sync", "record", "record", "wait"] * 3
    assert st.wall_median is not None and st.wall_median >= st.median


class FakeCudaContender(bc.GpubpContender):
    """gpubp's NumPy path dressed as a GPU contender, to run the GPU-target flow on the CPU."""

    def __init__(self):
        super().__init__("fake-cuda", "cpu")
        self.device = "cuda"

    def available(self):
        return True, ""

    def backend(self):
        from gpubp.backends import numpy_ref

        return numpy_ref

    def model(self, layers, dtype):
        import gpubp as gp

        return gp.Sequential(*layers, device="cpu", dtype=dtype, seed=0)

    def events(self):
        return FakeEvents()

    def release(self):
        pass


def test_the_gpu_grid_runs_when_a_gpu_contender_can_run():
    res = run_suite(bc.select_cases("smoke", patterns=["loss:cross_entropy"]), [FakeCudaContender()])
    assert res["target"] == "gpu"
    assert [r["size_label"] for r in res["records"]] == ["N=4096 C=10", "N=4096 C=1000"]
    assert all(r["status"] == "ok" and r["stats"]["wall_median_s"] > 0 for r in res["records"])
    if cuda_status()[0] == 0:  # the GPU ceilings cannot be measured: said, not fatal
        assert "error" in res["ceilings"]["cuda"]


# --- the gate -----------------------------------------------------------------------------


def test_rel_err_is_relative_to_the_largest_reference_value():
    want = np.array([1.0, -4.0, 2.0])
    assert harness.rel_err(want, want) == 0.0
    assert harness.rel_err(want + [0.0, 0.0, 0.04], want) == pytest.approx(0.01)
    assert harness.rel_err(want + 0.04, want, slack=0.05) == 0.0
    assert harness.rel_err([1.0, np.nan, 2.0], want) == math.inf
    with pytest.raises(ValueError, match="shape"):
        harness.rel_err(want[:2], want)


def test_compare_refuses_missing_wrong_and_misshapen_results():
    want = {"a": np.ones(3), "b": np.full(2, 2.0)}
    assert harness.compare({"a": np.ones(3), "b": np.full(2, 2.0)}, want, 1e-3).ok
    g = harness.compare({"a": np.ones(3), "b": np.full(2, 2.02)}, want, 1e-3)
    assert not g.ok and g.worst == "b" and g.max_err == pytest.approx(0.01)
    assert "wrong result (max err 0.01 in 'b'" in g.message
    assert not harness.compare({"a": np.ones(3)}, want, 1e-3).ok
    assert not harness.compare({"a": np.ones(4), "b": np.full(2, 2.0)}, want, 1e-3).ok


class WrongContender(bc.GpubpContender):
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

        return bc.Prepared(step, result, prep.close)


def run_suite(cases, contenders, **opts):
    options = harness.Options(tier="smoke", **{**FAST, **opts})
    return harness.Runner(cases, contenders, options, log=lambda s: None).run()


@pytest.mark.parametrize("how", ["scale", "nan"])
def test_a_wrong_result_is_refused_and_never_timed(how):
    wrong = WrongContender(how)
    res = run_suite(bc.select_cases("smoke", patterns=["dense_fwd_bwd:relu"]),
                    [bc.make_contenders(["numpy"])[0], wrong])
    mine = [r for r in res["records"] if r["contender"] == wrong.name]
    assert len(mine) == 4 and all(r["status"] == "refused" for r in mine)
    assert all(r["reason"].startswith("wrong result (max err") and "stats" not in r for r in mine)
    assert wrong.steps == 4  # one gate step per size, no warm-up, no timing
    ok = [r for r in res["records"] if r["contender"] == "numpy"]
    assert all(r["status"] == "ok" and r["gate"]["max_err"] < 1e-5 for r in ok)
    assert res["headline"] == []  # nothing timed beside the primary


def test_the_gate_checks_a_reduced_batch_when_the_reference_costs_too_much():
    res = run_suite(bc.select_cases("smoke", patterns=["dense_fwd:relu"]), bc.make_contenders(["numpy"]),
                    gate_flops=1e3)
    big = [r for r in res["records"] if r["size"]["batch"] == 256]
    assert big and all(r["status"] == "ok" and r["gate"]["reduced"] for r in big)
    assert big[0]["gate"]["size"].startswith("N=64 ")


def test_a_relu_kink_flipped_by_rounding_is_accepted_but_other_errors_are_not():
    case = bc.LayerCase("fwd_bwd", "relu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    b[0] = -(x[0].astype(np.float64) @ w[:, 0].astype(np.float64))  # z[0, 0] = 0 up to rounding
    da = rng.standard_normal((8, 3)).astype(np.float32)
    ref = case.reference({"x": x, "w": w, "b": b, "da": da})
    assert ref["slack"]["db"][0] > 0 and ref["slack"]["db"][1:].max() == 0
    # the result of a contender whose z[0, 0] rounded to the other side of the kink
    flipped = {k: ref[k].copy() for k in ("a", "dx", "dW", "db")}
    sign = -1.0 if x[0] @ w[:, 0] + b[0] > 0 else 1.0
    flipped["db"][0] += sign * da[0, 0]
    flipped["dW"][:, 0] += sign * x[0] * da[0, 0]
    flipped["dx"][0] += sign * da[0, 0] * w[:, 0]
    assert case.compare(flipped, ref, 1e-3).ok
    assert not harness.compare(flipped, {k: ref[k] for k in flipped}, 1e-3).ok  # without the slack: refused
    flipped["db"][1] *= 1.01
    assert not case.compare(flipped, ref, 1e-3).ok


def test_step_and_optimizer_gates_see_a_wrong_update():
    case = bc.StepCase("deep_narrow")
    inputs = case.restrict(case.inputs({"batch": 64}, 0), {"batch": 64})
    ref = case.reference(inputs)
    good = {"loss": ref["loss"], "grads": ref["grads"], "params": ref["params"].astype(np.float32)}
    assert case.compare(good, ref, 1e-3).ok
    p0 = ref["params0"]
    wrong = dict(good, params=(p0 + 1.02 * (ref["params"] - p0)).astype(np.float32))  # lr 2% too large
    g = case.compare(wrong, ref, 1e-3)
    assert not g.ok and g.worst.startswith("update ")

    opt = bc.OptimCase("adam")
    inp = opt.inputs({"params": 5000}, 0)
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
    assert {"step:mnist_mlp", "step:deep_narrow", "step:wide", "optim:adam", "loss:cross_entropy"} <= set(quick)
    assert [c.name for c in bc.select_cases("quick", patterns=["dense_fwd"])] == ["dense_fwd:relu", "dense_fwd:gelu"]
    assert len(bc.select_cases("full", patterns=["dense_fwd_bwd"])) == 10
    assert [c.name for c in bc.select_cases("quick", patterns=["dense_*:silu"])] == ["dense_fwd:silu", "dense_fwd_bwd:silu"]
    with pytest.raises(ValueError, match="no case matches 'nope'"):
        bc.select_cases("quick", patterns=["nope"])
    with pytest.raises(ValueError, match="unknown 'cuda-magic'"):
        bc.make_contenders(["cuda-magic"])


def test_work_counts_follow_the_stated_formulas():
    fwd, both = bc.LayerCase("fwd", "relu"), bc.LayerCase("fwd_bwd", "relu")
    size = {"batch": 256, "width": 64}
    assert fwd.work(size).flops == 2 * 256 * 64 * 64 and both.work(size).flops == 6 * 256 * 64 * 64
    assert fwd.throughput(size, 1e-3) == pytest.approx(2 * 256 * 64 * 64 / 1e-3 / 1e9)
    assert bc.OptimCase("adam").work({"params": 10}).bytes == 7 * 4 * 10
    assert bc.OptimCase("sgd_momentum").work({"params": 10}).bytes == 5 * 4 * 10
    mnist = bc.StepCase("mnist_mlp")
    assert mnist.work({"batch": 1}).flops == 4 * 784 * 1024 + 6 * 1024 * 1024 + 6 * 1024 * 10
    sizes, note = mnist.grid("quick", "cpu")
    assert sizes == [{"batch": 256}] and note.startswith("reduced")
    assert mnist.grid("quick", "gpu") == ([{"batch": 4096}], "")
    assert bc.StepCase("wide").grid("quick", "cpu")[0] == []


def test_big_inputs_repeat_a_prime_length_block(monkeypatch):
    monkeypatch.setattr(bc, "_BLOCK", 101)
    x = bc.fill(np.random.default_rng(0), (50, 7), "float32")
    assert x.shape == (50, 7) and x.dtype == np.float32
    assert not np.array_equal(x[0], x[1]) and x.ravel()[101] == x.ravel()[0]


@pytest.mark.skipif(cuda_status()[0] > 0, reason="a GPU is present")
def test_gpu_contenders_say_why_they_cannot_run():
    why = cuda_status()[1]
    by_name = {c.name: c for c in bc.make_contenders()}
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
    harness.add_ratios(records, "gpubp")
    assert [r["speedup_of_primary"] for r in records] == [1.0, 2.0, 1.0, 8.0, None]
    (h,) = harness.headline(records, "gpubp")
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
    for case in ("dense_fwd:relu", "dense_fwd_bwd:relu", "step:mnist_mlp", "optim:adam", "loss:cross_entropy"):
        assert f"\n{case}: " in text
    assert "step:wide: not run in the smoke suite" in text
    if cuda_status()[0] == 0:
        assert "GPU: none: " + cuda_status()[1] in text
        assert "GPU contenders skipped (gpubp, gpubp-unfused, torch-cuda, torch-compile)" in text
    assert f"wrote {out}/" in text


def test_results_json_has_every_field(smoke_run):
    _, _, out = smoke_run
    res = json.loads((out / "results.json").read_text())
    for key in ("schema", "tier", "target", "dtype", "primary", "options", "timing", "contenders", "environment",
                "cases", "ceilings", "records", "not_measured", "headline", "plots"):
        assert key in res, key
    env = res["environment"]
    assert env["cpu"]["model"] and env["cpu"]["logical_cpus"] >= 1
    assert env["blas"]["name"] and "threads" in env["blas"] and "threads_source" in env["blas"]
    assert env["git"]["commit"] and env["date"] and env["tf32"]["requested"] is False
    for dist in ("python", "gpubp", "numpy", "numba", "cupy-cuda13x", "cupy-cuda12x", "torch", "matplotlib"):
        assert dist in env["versions"]
    assert "available" in env["gpu"] and (env["gpu"]["available"] or env["gpu"]["reason"])
    cpu = res["ceilings"]["cpu"]
    assert cpu["bandwidth_Bps"] > 0 and cpu["flops"] > 0 and cpu["copy"]["count"] >= 3
    assert {c["name"] for c in res["contenders"]} == set(bc.CONTENDER_NAMES)
    ok = [r for r in res["records"] if r["status"] == "ok"]
    assert ok and all(r["status"] in ("ok", "skipped") for r in res["records"]), [
        (r["case"], r["contender"], r["reason"]) for r in res["records"] if r["status"] != "ok"]
    for r in ok:
        st = r["stats"]
        assert st["min_s"] <= st["median_s"] <= st["max_s"] and st["count"] == len(st["samples_s"]) >= 3
        assert r["gate"]["ok"] and r["gate"]["max_err"] <= r["gate"]["tol"]
        assert r["throughput"] > 0 and r["floor_s"] > 0 and r["speedup_of_primary"] > 0
        assert "of_peak_flops" in r["fraction"] and "of_bandwidth" in r["fraction"]
        assert r["work"]["items"] > 0 and r["size_label"] and r["unit"]
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
    assert md.startswith("# gpubp bench: ") and "## Ceilings" in md and "## Headline" in md
    assert "![dense_fwd:relu](dense-fwd-relu.png)" in md


def test_without_matplotlib_the_plots_are_skipped_and_said_so(smoke_run, tmp_path, monkeypatch):
    _, _, out = smoke_run
    results = json.loads((out / "results.json").read_text())
    real = report.importlib.util.find_spec
    monkeypatch.setattr(report.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    written = report.write_all(results, tmp_path)
    assert not any(k.startswith("plot:") for k in written) and not list(tmp_path.glob("*.png"))
    data = json.loads((tmp_path / "results.json").read_text())
    assert "matplotlib is not installed" in data["plots_skipped"]


def test_list_prints_cases_and_contenders(capsys):
    assert cli.run(bench_args("--list", "--cases", "step")) == 0
    out = capsys.readouterr().out
    assert "step:mnist_mlp" in out and "dense_fwd" not in out and "torch-compile" in out


def test_results_folder_is_named_by_date_and_device(tmp_path, monkeypatch):
    env = {"date": "2026-01-02T03:04:05+00:00", "gpu": {"available": True, "name": "NVIDIA H100 80GB HBM3"},
           "cpu": {"model": "AMD EPYC"}}
    folder = cli.default_folder({"environment": env})
    assert folder.parent.name == "results" and folder.parent.parent.name == "bench"
    assert folder.name == "2026-01-02-nvidia-h100-80gb-hbm3"
    env["gpu"] = {"available": False, "reason": "no driver"}
    assert cli.default_folder({"environment": env}).name.startswith("2026-01-02-amd-epyc")


def test_unknown_names_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="--cases"):
        cli.run(bench_args("--cases", "dense_fwd:nonsense"))
    with pytest.raises(ValueError, match="--contenders"):
        cli.run(bench_args("--contenders", "jax"))


def test_importing_gpubp_loads_neither_bench_nor_torch():
    code = "import sys, gpubp; print(sorted(m for m in sys.modules if m.startswith('gpubp.bench') or m.split('.')[0] in ('torch', 'cupy', 'matplotlib')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.strip() == "[]"


def test_fraction_formatting_and_times():
    assert report.fmt_time(1.5e-6) == "1.5us" and report.fmt_time(0.25) == "250ms" and report.fmt_time(2.0) == "2s"
    assert report.fmt_si(65536) == "65.5k" and report.fmt_pct(0.5) == "50%" and report.fmt_pct(0.012) == "1.2%"
