"""The runner: for every (case, size, contender) the budget and memory checks, the correctness gate, then
the timing; ceilings and environment of the same run; ratios and the headline.

Correctness before timing: each contender's first result is compared with the float64 NumPy reference
(accuracy.gate_tolerance); a wrong or non-finite one is recorded as refused and never timed.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gpubp.accuracy import GATE, gate_tolerance, unit_roundoff
from gpubp.bench import env
from gpubp.bench.contenders import Contender, short
from gpubp.bench.timing import SETTINGS, Settings, Stats, ceilings, rotation

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
    warmup: int | None = None
    warmup_time: float | None = None
    min_repeats: int | None = None
    min_time: float | None = None
    progress: bool = True

    def settings(self, device: str) -> Settings:
        s = SETTINGS[(self.tier, device)]
        return s.replace(warmup=self.warmup, warmup_time=self.warmup_time, min_repeats=self.min_repeats,
                         min_time=self.min_time, max_repeats=max(s.max_repeats, self.min_repeats or 0))

    def budget(self) -> float:
        return self.cpu_budget if self.cpu_budget is not None else {"smoke": 0.5, "quick": 0.25, "full": 5.0}[self.tier]


class Runner:
    def __init__(self, cases: Sequence[Any], contenders: Sequence[Contender], options: Options) -> None:
        self.cases, self.contenders, self.opt = list(cases), list(contenders), options
        self.records: list[dict[str, Any]] = []
        self.not_measured: list[dict[str, str]] = []
        self.ceilings: dict[str, Any] = {}
        self.tasks: list[tuple] | None = None
        self._cache: dict[Any, Any] = {}  # the latest inputs and references: tasks reuse them in order

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            while len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = make()
        return self._cache[key]

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

    def run_one(self, case: Any, size: dict[str, int], c: Contender) -> dict[str, Any]:
        if c.broken:
            return self._record(case, size, c, "error", f"not run: {c.broken}")
        est = case.cpu_seconds(size, self.ceilings.get("cpu", {})) if c.device == "cpu" else None
        if est is not None and est > self.opt.budget():
            return self._record(case, size, c, "skipped", f"estimated {est:.2g} s per step on the CPU, over the "
                                f"CPU budget of {self.opt.budget():g} s (--cpu-budget)")
        tf32 = self.opt.tf32 and c.device == "cuda"
        tol, u, gsize = gate_tolerance(self.opt.dtype, tf32), unit_roundoff(self.opt.dtype, tf32), case.gate_size(
            size, self.opt.gate_flops)
        try:
            inputs = self._cached((case.name, case.label(size)), lambda: case.inputs(size, self.opt.seed))
            expected = self._cached((case.name, case.label(size), case.label(gsize), u),
                                    lambda: case.reference(case.restrict(inputs, gsize), u))
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
        return self._record(case, size, c, "ok", gate=asdict(gate), stats=stats.to_dict(), copies=copies,
                            **self._figures(case, size, stats, c.device), **extra)

    def _figures(self, case: Any, size: dict[str, int], stats: Stats, device: str) -> dict[str, Any]:
        """Throughput; fractions of the measured ceilings; the floor max(FLOPs / peak, bytes / bandwidth)."""
        ceil, w, t = self.ceilings.get(device, {}), case.work(size), stats.median
        peak, bw = ceil.get("flops"), ceil.get("bandwidth_Bps")
        floors = ([w.flops / peak] if w.flops and peak else []) + ([w.bytes / bw] if w.bytes and bw else [])
        return {"work": asdict(w), "throughput": case.throughput(size, t),
                "fraction": {"of_peak_flops": w.flops / t / peak if w.flops and peak else None,
                             "of_bandwidth": w.bytes / t / bw if w.bytes and bw else None},
                "floor_s": max(floors) if floors else None}

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
        primary = primary_contender(self.contenders)
        add_ratios(self.records, primary)
        return {"schema": SCHEMA, "tier": self.opt.tier, "target": self.target, "dtype": self.opt.dtype,
                "primary": primary, "options": asdict(self.opt),
                "timing": {"cpu": asdict(self.opt.settings("cpu")), "cuda": asdict(self.opt.settings("cuda")),
                           "method": METHOD, "tolerances": dict(GATE), "gate_flops": self.opt.gate_flops},
                "contenders": self.available, "environment": env.capture(self.opt.tf32),
                "cases": [case.describe() for case in self.cases], "ceilings": self.ceilings,
                "records": self.records, "not_measured": self.not_measured,
                "headline": headline(self.records, primary), "elapsed_s": time.perf_counter() - t0}


def primary_contender(contenders: Sequence[Contender]) -> str:
    """Whose ratios the headline gives: gpubp on the GPU when it runs, else gpubp's NumPy path."""
    names = [c.name for c in contenders if c.usable]
    return next((n for n in ("gpubp", "numpy") if n in names), names[0] if names else "")


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
             "geomean": math.exp(statistics.fmean(math.log(x) for x in xs))} for (case, other), xs in groups.items()]
