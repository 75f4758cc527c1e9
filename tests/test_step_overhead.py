"""bench/step_overhead.py on the CPU, --quick: it runs and its outputs are well formed.

No timing is asserted (timings belong to the benchmark's report, not to tests): the check is
that every gpubp contender ran, the replayed step replayed a plan, both outputs are written
and agree with each other, and a contender that cannot run says why.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "step_overhead.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("step_overhead") / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=180, cwd=REPO)
    return r, out


def test_quick_cpu_run_writes_results_and_summary(quick_run):
    r, out = quick_run
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    assert r.stdout.rstrip().endswith(summary.rstrip())  # the table is also printed
    assert res["device"] == "cpu" and res["quick"] is True
    assert "--device cpu" in res["command"] and res["environment"]["device"]
    assert [c["case"] for c in res["cases"]] == ["tiny 2-16-2", "small 64-64-64-10"]
    for case in res["cases"]:
        cs = case["contenders"]
        assert {"gpubp eager", "gpubp replayed", "torch eager", "gpubp fit eager", "gpubp fit replayed"} <= set(cs)
        for name, rec in cs.items():
            assert rec["status"] == "ok" or rec["status"].startswith("skipped: "), (name, rec["status"])
            if rec["status"] != "ok":
                continue
            samples = rec["samples_step_us"]
            assert samples and all(math.isfinite(v) and v > 0 for v in samples)
            assert rec["step_us"] == pytest.approx(sorted(samples)[len(samples) // 2], rel=0.5)
            assert min(samples) == pytest.approx(rec["step_us_min"], abs=1e-2)
            if "loss_agrees" in rec:
                assert rec["loss_agrees"], (name, rec["first_loss"])
            assert f"| {case['case']} | {name} |" in summary
        assert cs["gpubp eager"]["status"] == "ok" and cs["gpubp replayed"]["status"] == "ok"
        replayed = cs["gpubp replayed"]
        assert replayed["replays"] > 0 and replayed["eager_reason"] is None, replayed
        for fit in ("gpubp fit eager", "gpubp fit replayed"):
            assert cs[fit]["status"] == "ok" and not cs[fit]["warnings"], cs[fit]
    (goal,) = res["goals"]
    assert goal["verdict"] in ("met", "NOT met") and goal["goal"] in summary


def test_cuda_without_a_gpu_says_why(tmp_path):
    from tests.conftest import GPUS

    if GPUS:
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "step_overhead: no GPU: " in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "o").exists()
