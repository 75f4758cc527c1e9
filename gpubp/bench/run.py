"""The runner: for every (case, size, contender) the budget check, the correctness gate, then the timing;
ceilings and environment of the same run; ratios and the headline.

Correctness before timing: each contender's first result is compared with the float64 NumPy reference
(accuracy.gate_tolerance); a wrong or non-finite one is recorded as refused and never timed.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gpubp.accuracy import GATE, gate_tolerance, unit_roundoff
from gpubp.bench import env
from gpubp.bench.contenders import Contender, short
from gpubp.bench.timing import SETTINGS, Settings, ceilings, rotation

SCHEMA = 2
METHOD = {"cpu": "time.perf_counter around each call; inputs rotate over up to 4 copies (64 MiB)",
          "cuda": "cupyx.profiler.benchmark: CUDA events on the current stream around each call; inputs rotate "
          "over copies spanning twice the L2 size, so no repeat finds them in L2",
          "statistic": "median of the repeats, with min, max and count; warm-up calls not counted"}


@dataclass
class Options:
    tier: str = "quick"
    dtype: str = "float32"
    tf32: bool = False
    seed: int = 0
    cpu_budget: float | None = None  # CPU contenders skip sizes estimated slower than this per step
    gate_flops: float = 2e10  # reference cost above which the gate checks a reduced batch
    warmup: int | None = None  # timing overrides (None: the tier's Settings)
    warmup_time: float | None = None
    min_repeats: int | None = None
    min_time: float | None = None
    progress: bool = True

    def settings(self, device: str) -> Settings:
        s = SETTINGS[(self.tier, device)]
        kw = {k: getattr(self, k) for k in ("warmup", "warmup_time", "min_repeats", "min_time")}
        return dataclasses.replace(s, **{k: v for k, v in kw.items() if v is not None},
                                   max_repeats=max(s.max_repeats, self.min_repeats or 0))

    def budget(self) -> float:
        return self.cpu_budget if self.cpu_budget is not None else {"smoke": 0.5, "quick": 0.25, "full": 5.0}[self.tier]


class Runner:
    def __init__(self, cases: Sequence[Any], contenders: Sequence[Contender], options: Options) -> None:
        self.cases, self.contenders, self.opt = list(cases), list(contenders), options
        self.records: list[dict[str, Any]] = []
        self.not_measured: list[dict[str, str]] = []
        self.ceilings: dict[str, Any] = {}
        self.tasks: list[tuple] | None = None
        self._data: tuple[Any, dict, dict] = (None, {}, {})  # (case, size), inputs, references by (gate size, u)

    def prepare(self) -> dict[str, Any]:
        """Which contenders can run, on which grid, and the tasks, sizes in step across a group's cases."""
        self.available = []
        for c in self.contenders:
            try:
                c.usable, why = c.available()
            except Exception as e:  # a broken optional install must not stop the suite
                c.usable, why = False, short(e)
            self.available.append({"name": c.name, "device": c.device, "description": c.description,
                                   "available": c.usable, "reason": why})
        self.target = "gpu" if any(c.usable and c.device == "cuda" for c in self.contenders) else "cpu"
        self.tasks, groups = [], {}
        for case in self.cases:
            groups.setdefault(case.group, []).append(case)
            sizes, note = case.grid(self.opt.tier, self.target)
            self.not_measured += [] if sizes else [{"case": case.name, "contender": "*", "reason": note}]
            self.not_measured += [{"case": case.name, "contender": c.name, "reason": c.supports(case)[1]}
                                  for c in self.contenders if c.usable and not c.supports(case)[0]]
        for cases in groups.values():
            grids = [case.grid(self.opt.tier, self.target)[0] for case in cases]
            for j in range(max(map(len, grids), default=0)):
                self.tasks += [(case, sizes[j], c) for case, sizes in zip(cases, grids, strict=True) if j < len(sizes)
                               for c in self.contenders if c.usable and c.supports(case)[0]]
        return {"contenders": self.available, "target": self.target, "runs": len(self.tasks)}

    def _record(self, case: Any, size: dict, c: Contender, status: str, reason: str = "", **extra: Any) -> dict:
        rec = {"case": case.name, "group": case.group, "kind": case.kind, "title": case.title, "unit": case.unit,
               "size": dict(size), "size_label": case.label(size), "note": case.grid(self.opt.tier, self.target)[1],
               "plot": list(case.plot_key(size)), "contender": c.name, "device": c.device, "status": status,
               "reason": reason, **extra}
        self.records.append(rec)
        return rec

    def _expected(self, case: Any, size: dict, gsize: dict, u: float) -> tuple[dict, dict]:
        """The inputs of (case, size) and the reference at the gate size: kept while the contenders of one
        (case, size) run one after the other."""
        if self._data[0] != (case.name, case.label(size)):
            self._data = ((case.name, case.label(size)), case.inputs(size, self.opt.seed), {})
        _, inputs, refs = self._data
        if (case.label(gsize), u) not in refs:
            refs[case.label(gsize), u] = case.reference(case.restrict(inputs, gsize), u)
        return inputs, refs[case.label(gsize), u]

    def run_one(self, case: Any, size: dict[str, int], c: Contender) -> dict[str, Any]:
        if c.broken:
            return self._record(case, size, c, "error", f"not run: {c.broken}")
        est = case.cpu_seconds(size, self.ceilings.get("cpu", {})) if c.device == "cpu" else None
        if est is not None and est > self.opt.budget():
            return self._record(case, size, c, "skipped", f"estimated {est:.2g} s per step on the CPU, over the "
                                f"CPU budget of {self.opt.budget():g} s (--cpu-budget)")
        tf32 = self.opt.tf32 and c.device == "cuda"
        tol, gsize = gate_tolerance(self.opt.dtype, tf32), case.gate_size(size, self.opt.gate_flops)
        try:
            inputs, expected = self._expected(case, size, gsize, unit_roundoff(self.opt.dtype, tf32))
            nbytes = sum(inputs[k].nbytes for k in case.batched)
            copies = rotation(c.device, nbytes, self.ceilings.get("cuda", {}).get("l2_bytes")) if nbytes else 1
            prepared = c.setup(case, gsize, case.restrict(inputs, gsize), copies if gsize == size else 1)
            prepared.step(0)
            gate = case.compare(prepared.result(), expected, tol)
            gate.size, gate.reduced = case.label(gsize), gsize != size
            if not gate.ok:
                return self._record(case, size, c, "refused", gate.message, gate=asdict(gate))
            if gate.reduced:  # the gate ran a reduced batch: set up the full size to time it
                del prepared
                c.release()
                prepared = c.setup(case, size, inputs, copies)
            stats = c.timer(prepared.step, self.opt.settings(c.device))
            extra = {"launches_per_step": prepared.launches()} if prepared.launches else {}
        except Exception as e:
            c.broken = short(e) if c.fatal else ""
            return self._record(case, size, c, "error", short(e), traceback=traceback.format_exc(limit=4))
        finally:
            prepared = None
            c.release()
        # throughput, fractions of the measured ceilings, the floor max(FLOPs / peak, bytes / bandwidth)
        ceil, w, t = self.ceilings.get(c.device, {}), case.work(size), stats["median_s"]
        peak, bw = ceil.get("flops"), ceil.get("bandwidth_Bps")
        floors = ([w.flops / peak] if w.flops and peak else []) + ([w.bytes / bw] if w.bytes and bw else [])
        return self._record(case, size, c, "ok", gate=asdict(gate), stats=stats, copies=copies,
                            work=w._asdict(), throughput=case.throughput(size, t), floor_s=max(floors, default=None),
                            fraction={"of_peak_flops": w.flops / t / peak if w.flops and peak else None,
                                      "of_bandwidth": w.bytes / t / bw if w.bytes and bw else None}, **extra)

    def run(self) -> dict[str, Any]:
        """Ceilings, then every task: the results dict that report reads."""
        from tqdm.auto import tqdm

        if self.tasks is None:
            self.prepare()
        t0 = time.perf_counter()
        for dev in sorted({c.device for c in self.contenders if c.usable}):
            try:
                self.ceilings[dev] = ceilings(dev, self.opt.tier, self.opt.dtype, self.opt.tf32)
            except Exception as e:  # no GPU for the fake contenders of the tests, or a broken install
                self.ceilings[dev] = {"device": dev, "error": short(e)}
        with tqdm(total=len(self.tasks), desc="gpubp bench", unit="run", disable=not self.opt.progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for case, size, c in self.tasks:
                bar.set_postfix_str(f"{case.name} {case.label(size)} {c.name}", refresh=False)
                t_task = time.perf_counter()
                rec = self.run_one(case, size, c)
                rec["task_s"] = time.perf_counter() - t_task
                if rec["status"] in ("refused", "error"):
                    bar.write(f"{rec['status']}: {case.name} {rec['size_label']} {c.name}: {rec['reason']}")
                bar.update(1)
        self._data = (None, {}, {})
        names = [c.name for c in self.contenders if c.usable]  # the primary: gpubp on the GPU, else its NumPy path
        primary = next((n for n in ("gpubp", "numpy") if n in names), names[0] if names else "")
        add_ratios(self.records, primary)
        return {"schema": SCHEMA, "tier": self.opt.tier, "target": self.target, "dtype": self.opt.dtype,
                "primary": primary, "options": asdict(self.opt),
                "timing": {"cpu": asdict(self.opt.settings("cpu")), "cuda": asdict(self.opt.settings("cuda")),
                           "method": METHOD, "tolerances": dict(GATE), "gate_flops": self.opt.gate_flops},
                "contenders": self.available, "environment": env.capture(self.opt.tf32),
                "cases": [{"name": c.name, "group": c.group, "kind": c.kind, "title": c.title, "unit": c.unit,
                           "dtype": c.dtype, "counting": c.formula} for c in self.cases],
                "ceilings": self.ceilings, "records": self.records, "not_measured": self.not_measured,
                "headline": headline(self.records, primary), "elapsed_s": time.perf_counter() - t0}


def add_ratios(records: list[dict[str, Any]], primary: str) -> None:
    """``speedup_of_primary``: this median / the primary's at the same size; ``vs``: each other contender's
    median / this one's at the same size (above 1: this one is faster)."""
    medians: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["status"] == "ok":
            medians.setdefault((r["case"], r["size_label"]), {})[r["contender"]] = r["stats"]["median_s"]
    for r in records:
        same = medians.get((r["case"], r["size_label"]), {})
        mine, base = same.get(r["contender"]) if r["status"] == "ok" else None, same.get(primary)
        r["speedup_of_primary"] = mine / base if mine and base else None
        r["vs"] = {k: v / mine for k, v in same.items() if mine and k != r["contender"]}


def headline(records: list[dict[str, Any]], primary: str) -> list[dict[str, Any]]:
    """Per case and contender: geometric mean, min and max over sizes of ``speedup_of_primary``."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r["contender"] != primary and r.get("speedup_of_primary"):
            groups.setdefault((r["case"], r["contender"]), []).append(r["speedup_of_primary"])
    return [{"case": case, "primary": primary, "contender": other, "sizes": len(xs), "min": min(xs), "max": max(xs),
             "geomean": statistics.geometric_mean(xs)} for (case, other), xs in groups.items()]
