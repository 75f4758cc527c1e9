"""The runner and its report. First the ceilings of each device in use (copy bandwidth, GEMM FLOP/s); then for
every (case, size, contender): the correctness gate (the first result against the float64 reference,
accuracy.gate_tolerance; a wrong or non-finite one is refused and never timed), the CPU budget, the timing, the
floor max(bytes / bandwidth, FLOPs / peak) and the fraction of it reached, and the case's GEMMs timed alone on
the same device (GEMM time and median / GEMM time). Then ratios, the headline, the text table, results.json,
summary.md, plots.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpubp.accuracy import GATE
from gpubp.bench.contenders import CONTENDER_NAMES, Contender, short
from gpubp.bench.gate import tolerance
from gpubp.bench.timing import SETTINGS, Settings, ceilings, environment, rotation, tensor_core_peak, time_gemms
from gpubp.precision import get as get_precision

SCHEMA = 3
METHOD = {"cpu": "time.perf_counter around each call; inputs rotate over up to 4 copies (64 MiB)",
          "cuda": "cupyx.profiler.benchmark: CUDA events on the current stream around each call; inputs rotate "
          "over copies spanning twice the L2 size", "statistic": "median of the repeats; warm-up not counted"}
OVERRIDES = ("warmup", "warmup_time", "min_repeats", "min_time")


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
        s, kw = SETTINGS[(self.tier, device)], {k: getattr(self, k) for k in OVERRIDES if getattr(self, k) is not None}
        return dataclasses.replace(s, **kw, max_repeats=max(s.max_repeats, self.min_repeats or 0))

    def budget(self) -> float:
        return self.cpu_budget if self.cpu_budget is not None else {"smoke": 0.5, "quick": 0.25, "full": 5.0}[self.tier]


class Runner:
    def __init__(self, cases: Sequence[Any], contenders: Sequence[Contender], options: Options) -> None:
        self.cases, self.contenders, self.opt = list(cases), list(contenders), options
        self.records: list[dict[str, Any]] = []
        self.not_measured: list[dict[str, str]] = []
        self.env: dict[str, Any] = {}
        self.ceilings: dict[str, Any] = {}
        self._gemm: dict[tuple, dict[str, Any]] = {}  # (case, size, device) -> stats of the GEMMs alone
        self.tasks: list[tuple] | None = None
        self._data: tuple[Any, dict, dict] = (None, {}, {})  # (case, size), inputs, references by (gate size, u)

    def prepare(self) -> dict[str, Any]:
        """Which contenders can run, on which grid, and the tasks, sizes in step across a group's cases. A case
        that measures itself (allreduce) is one task without a contender."""
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
            sizes, note = case.grid(self.opt.tier, self.target)
            self.not_measured += [] if sizes else [{"case": case.name, "contender": "*", "reason": note}]
            if case.measure:
                self.tasks += [(case, sizes, None)] if sizes else []
                continue
            groups.setdefault(case.group, []).append((case, sizes))
            self.not_measured += [{"case": case.name, "contender": c.name, "reason": c.supports(case)[1]}
                                  for c in self.contenders if c.usable and not c.supports(case)[0]]
        for pairs in groups.values():
            for j in range(max((len(s) for _, s in pairs), default=0)):
                self.tasks += [(case, sizes[j], c) for case, sizes in pairs if j < len(sizes)
                               for c in self.contenders if c.usable and c.supports(case)[0]]
        return {"contenders": self.available, "target": self.target, "runs": len(self.tasks)}

    def _record(self, case: Any, size: dict, who: str, device: str, status: str, reason: str = "", **extra: Any) -> dict:
        rec = {"case": case.name, "group": case.group, "kind": case.kind, "title": case.title, "unit": case.unit,
               "size": dict(size), "size_label": case.label(size), "note": case.grid(self.opt.tier, self.target)[1],
               "plot": list(case.plot_key(size)) if case.x_key in size else [], "contender": who, "device": device,
               "status": status, "reason": reason, **extra}
        self.records.append(rec)
        return rec

    def _expected(self, case: Any, size: dict, gsize: dict, u: float) -> tuple[dict, dict]:
        """The inputs of (case, size) and the reference at the gate size, kept while the contenders of one
        (case, size) run one after the other."""
        if self._data[0] != (case.name, case.label(size)):
            self._data = ((case.name, case.label(size)), case.inputs(size, self.opt.seed), {})
        _, inputs, refs = self._data
        if (case.label(gsize), u) not in refs:
            refs[case.label(gsize), u] = case.reference(case.restrict(inputs, gsize), u)
        return inputs, refs[case.label(gsize), u]

    def run_measured(self, case: Any, sizes: list[dict]) -> list[dict[str, Any]]:
        try:
            return [self._record(case, {"P" if r["what"] == "allreduce" else "N": r["size"]},
                                 f"{r['device']} x{r['procs']}", r["device"], "ok",
                                 what=r["what"], procs=r["procs"], vs_1_process=r["vs_1_process"],
                                 stats={k: r[k] for k in ("median_s", "p10_s", "p90_s")})
                    for r in case.measure(sizes, self.opt.tier)]
        except Exception as e:
            return [self._record(case, {}, "*", "cpu", "error", short(e), traceback=traceback.format_exc(limit=4))]

    def run_one(self, case: Any, size: dict[str, int], c: Contender) -> dict[str, Any]:
        record = lambda status, reason="", **kw: self._record(case, size, c.name, c.device, status, reason, **kw)  # noqa: E731
        if c.broken:
            return record("error", f"not run: {c.broken}")
        tf32 = self.opt.tf32 and c.device == "cuda"
        (tol, u), gsize = tolerance(self.opt.dtype, tf32, case.precision), case.gate_size(size, self.opt.gate_flops)
        try:
            inputs, expected = self._expected(case, size, gsize, u)
            nbytes = sum(inputs[k].nbytes for k in case.batched)
            copies = rotation(c.device, nbytes, self.env["gpu"].get("l2_bytes")) if nbytes else 1
            prepared = c.setup(case, gsize, case.restrict(inputs, gsize), copies if gsize == size else 1)
            prepared.step(0)
            gate = case.compare(prepared.result(), expected, tol)
            gate.size, gate.reduced = case.label(gsize), gsize != size
            if not gate.ok:
                return record("refused", gate.message, gate=asdict(gate))
            if c.device == "cpu":  # the faster of two more steps, scaled to the full batch: within the budget?
                ts = [time.perf_counter()]
                for i in (1, 2):
                    prepared.step(i)
                    ts.append(time.perf_counter())
                est = min(ts[1] - ts[0], ts[2] - ts[1]) * size.get("N", 1) / gsize.get("N", 1)
                if est > self.opt.budget():
                    return record("skipped", f"estimated {est:.2g} s per step on the CPU, over the CPU budget of "
                                  f"{self.opt.budget():g} s (--cpu-budget)", gate=asdict(gate))
            if gate.reduced:  # the gate ran a reduced batch: set up the full size to time it
                del prepared
                c.release()
                prepared = c.setup(case, size, inputs, copies)
            stats = c.timer(prepared.step, self.opt.settings(c.device))
            extra = {"launches_per_step": prepared.launches()} if prepared.launches else {}
        except Exception as e:
            c.broken = short(e) if c.fatal else ""
            return record("error", short(e), traceback=traceback.format_exc(limit=4))
        finally:
            prepared = None
            c.release()
        return record("ok", gate=asdict(gate), stats=stats, copies=copies, work=case.work(size)._asdict(),
                      throughput=case.throughput(size, stats["median_s"]), **self.floor(case, size, c.device, stats),
                      **extra)

    def floor(self, case: Any, size: dict, device: str, stats: dict) -> dict[str, Any]:
        """``floor_s`` = max(bytes / bandwidth, FLOPs / peak) at the device's ceilings; ``fraction``: of_peak_flops,
        of_bandwidth (work rate over the ceiling) and of_floor (floor over median: 1 is the roofline); with GEMMs,
        ``gemm`` (their time alone, on the same device, timed once per size) and ``over_gemm`` (median over it).
        A case in a mixed precision on a GPU takes the stated tensor-core peak of its GEMM kind instead of the
        measured float32 GEMM ceiling (``peak_flops``, ``peak_source``); on the CPU the float32 one (emulation)."""
        w, t, ceil = case.work(size), stats["median_s"], self.ceilings.get(device, {})
        kind = get_precision(case.precision).gemm
        peak, source = ceil.get("flops"), "measured GEMM ceiling" if ceil.get("flops") else "no GEMM ceiling"
        if kind is not None and device != "cpu":
            peak, source = tensor_core_peak(self.env.get("gpu", {}).get("name"), kind)
        flops = w.flops / peak if w.flops and peak else None  # seconds at the peaks
        moved = w.bytes / ceil["bandwidth_Bps"] if w.bytes and ceil.get("bandwidth_Bps") else None
        floor = max((f for f in (flops, moved) if f), default=None)
        out = {"floor_s": floor, "peak_flops": peak, "peak_source": source, "fraction": {"of_peak_flops": flops and flops / t, "of_bandwidth": moved and moved / t,
                                              "of_floor": floor and floor / t}}
        if not w.gemms:
            return out
        key = (case.name, case.label(size), device)
        if key not in self._gemm:
            try:
                self._gemm[key] = time_gemms(device, w.gemms, self.opt.dtype, self.opt.settings(device), kind)
            except Exception as e:  # no CuPy for a GPU stand-in, or out of memory: said, not fatal
                self._gemm[key] = {"error": short(e)}
        g = self._gemm[key]
        return out | {"gemm": g, "over_gemm": t / g["median_s"] if "median_s" in g else None}

    def run(self) -> dict[str, Any]:
        """Every task: the results dict that the report reads."""
        from tqdm.auto import tqdm

        if self.tasks is None:
            self.prepare()
        t0, self.env = time.perf_counter(), environment(self.opt.tf32)
        for dev in sorted({c.device for c in self.contenders if c.usable}):
            try:
                self.ceilings[dev] = ceilings(dev, self.opt.tier, self.opt.dtype, self.opt.tf32)
            except Exception as e:  # no GPU for a stand-in contender, or a broken install: said, not fatal
                self.ceilings[dev] = {"device": dev, "error": short(e)}
        with tqdm(total=len(self.tasks), desc="gpubp bench", unit="run", disable=not self.opt.progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for case, size, c in self.tasks:
                t_task = time.perf_counter()
                for rec in self.run_measured(case, size) if c is None else [self.run_one(case, size, c)]:
                    rec["task_s"] = time.perf_counter() - t_task
                    if rec["status"] in ("refused", "error"):
                        bar.write(f"{rec['status']}: {case.name} {rec['size_label']} {rec['contender']}: {rec['reason']}")
                bar.update(1)
        self._data, self._gemm = (None, {}, {}), {}
        names = [c.name for c in self.contenders if c.usable]  # the primary: gpubp on the GPU, else on the CPU
        primary = next((n for n in ("gpubp", "gpubp-cpu") if n in names), names[0] if names else "")
        add_ratios(self.records, primary)
        return {"schema": SCHEMA, "tier": self.opt.tier, "target": self.target, "dtype": self.opt.dtype,
                "primary": primary, "options": asdict(self.opt),
                "timing": {"cpu": asdict(self.opt.settings("cpu")), "cuda": asdict(self.opt.settings("cuda")),
                           "method": METHOD, "tolerances": dict(GATE), "gate_flops": self.opt.gate_flops},
                "contenders": self.available, "environment": self.env,
                "cases": [{"name": c.name, "kind": c.kind, "title": c.title, "unit": c.unit} for c in self.cases],
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


# --- the report -------------------------------------------------------------------------------------------

LEGEND = ("ratio = contender median / {p} median at the same size (above 1: {p} is faster); ! = median over 1.5x "
          "the min (the machine was busy); floor = max(bytes / bandwidth, FLOPs / peak) at the device's ceilings, "
          "of floor = floor / median; GEMMs = the case's GEMMs alone on the same device, x GEMMs = median / that")


def _scaled(v: float | None, steps: tuple[tuple[str, float], ...]) -> str:
    if v is None:
        return "-"
    name, k = next(((n, k) for n, k in steps if abs(v) >= k), steps[-1])
    return f"{v / k:.3g}{name}"


def fmt_time(s: float | None) -> str:
    return _scaled(s, (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)))


def fmt_si(v: float | None) -> str:
    """3 significant digits with an SI prefix: 1.23M, 456k, 7.89G."""
    return _scaled(v, (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)))


def fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.3g}%" if v < 10 else f"{100 * v:,.0f}%"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def where(results: dict[str, Any]) -> str:
    env = results["environment"]
    return env["gpu"]["name"] if env["gpu"].get("available") else env["cpu"]["model"]


def header(results: dict[str, Any]) -> str:
    """Where it ran, the ceilings measured, which contenders ran and why the others did not."""
    env, gpu, cpu = results["environment"], results["environment"]["gpu"], results["environment"]["cpu"]
    lines = [f"GPU: {gpu['name']} (sm_{gpu['compute_capability'].replace('.', '')}, {gpu['memory_GiB']} GiB)"
             if gpu.get("available") else f"GPU: none: {gpu.get('reason', 'unknown')}",
             f"CPU: {cpu['model']} ({cpu['usable_cpus'] or cpu['logical_cpus']} CPUs usable, BLAS "
             f"{env['blas']['name']} {env['blas']['threads']} threads)",
             f"suite: {results['tier']}, {results['target'].upper()} grid, dtype {results['dtype']}, TF32 "
             f"{'on' if env['tf32']['requested'] else 'off'}; commit {env['git']['commit'][:12]}"
             f"{' (local changes)' if env['git'].get('dirty') else ''}"]
    for dev, c in results.get("ceilings", {}).items():
        lines.append(f"ceilings {dev.upper()}: " + (f"not measured: {c['error']}" if "error" in c else
                     f"copy {c['bandwidth_Bps'] / 1e9:,.1f} GB/s ({c['copy']['what']}), GEMM {c['flops'] / 1e9:,.1f} "
                     f"GFLOP/s ({c['matmul']['what']}), fastest repeats"))
    lines.append(f"contenders: {', '.join(c['name'] for c in results['contenders'] if c['available']) or 'none'}")
    off = [c for c in results["contenders"] if not c["available"]]
    gpu_off = [c["name"] for c in off if c["device"] == "cuda"]
    if gpu_off and not gpu.get("available"):
        lines.append(f"GPU contenders skipped ({', '.join(gpu_off)}): {gpu.get('reason', 'no GPU')}")
        off = [c for c in off if c["device"] != "cuda"]
    return "\n".join(lines + [f"  {c['name']}: not run: {c['reason']}" for c in off])


# (header, cell of an "ok" record given the primary); the GEMM columns only in blocks whose case has GEMMs
COLUMNS: list[tuple[str, Any]] = [
    ("median", lambda r, p: fmt_time(r["stats"]["median_s"]) + ("!" if r["stats"].get("noisy") else "")),
    ("min", lambda r, p: fmt_time(r["stats"]["min_s"])), ("max", lambda r, p: fmt_time(r["stats"]["max_s"])),
    ("n", lambda r, p: str(r["stats"]["count"])),
    ("thrpt", lambda r, p: f"{r['throughput']:,.1f}" if r["unit"] in ("GFLOP/s", "GB/s") else fmt_si(r["throughput"])),
    ("floor", lambda r, p: fmt_time(r.get("floor_s"))), ("of floor", lambda r, p: fmt_pct(r["fraction"]["of_floor"])),
    ("GEMMs", lambda r, p: fmt_time(r["gemm"].get("median_s"))),
    ("x GEMMs", lambda r, p: "-" if r["over_gemm"] is None else f"{r['over_gemm']:.2f}"),
    ("ratio", lambda r, p: "1" if r["contender"] == p else f"{sp:.2f}x" if (sp := r["speedup_of_primary"]) else "-")]
MEASURED = [("what", lambda r, p: r["what"])] + [
    (k[:-2], lambda r, p, k=k: fmt_time(r["stats"][k])) for k in ("median_s", "p10_s", "p90_s")] + [
    ("vs 1 process", lambda r, p: "-" if r["vs_1_process"] is None else f"{r['vs_1_process']:.2f}")]


def case_block(results: dict[str, Any], case: str, recs: list[dict[str, Any]]) -> list[str]:
    """One case: its title, notes (reduced sizes, kernel launches per step), then a row per size and contender,
    columns padded to width (numbers right-aligned); a row that was not timed says why and runs on."""
    notes = ([recs[0]["note"]] if recs[0].get("note") else []) + [
        f"{r['contender']} at {r['size_label']}: {r['launches_per_step']} kernel launches per step"
        for r in recs if r.get("launches_per_step") is not None]
    measured = recs[0]["kind"] == "allreduce"
    if measured:
        cols, second = MEASURED, "processes"
        recs = sorted(recs, key=lambda r: (r.get("what", ""), r["size"].get("P", 0), r["contender"]))
    else:
        gemms = any("gemm" in r for r in recs)
        cols, second = [c for c in COLUMNS if gemms or "GEMM" not in c[0]], "contender"
        order = {r["size_label"]: tuple(r["size"].values()) for r in recs}
        recs = sorted(recs, key=lambda r: (order[r["size_label"]], CONTENDER_NAMES.index(r["contender"])
                                           if r["contender"] in CONTENDER_NAMES else 99))
    rows = [("size", second, *(h for h, _ in cols))]
    for k, r in enumerate(recs):
        size = "" if k and r["size_label"] == recs[k - 1]["size_label"] and not measured else r["size_label"]
        if r["status"] != "ok":
            rows.append((size, r["contender"], f"{r['status']}: {r['reason']}"))
            continue
        size += f" (gate at {r['gate']['size']})" if r.get("gate", {}).get("reduced") and size else ""
        rows.append((size, r["contender"], *(cell(r, results["primary"]) for _, cell in cols)))
    widths = [max(len(r[i]) for r in rows if len(r) == len(rows[0])) for i in range(len(rows[0]))]
    return [f"{case}: {recs[0]['title']}  [{'times in s' if measured else 'thrpt in ' + recs[0]['unit']}]"] + [
        f"  ({n})" for n in notes] + ["  " + "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1])] + (
            [v.rjust(w) for v, w in zip(r[2:], widths[2:], strict=True)] if len(r) == len(rows[0]) else [r[2]])).rstrip()
        for r in rows]


def by_case(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results["records"]:
        out.setdefault(r["case"], []).append(r)
    return out


def table(results: dict[str, Any]) -> str:
    out = [LEGEND.format(p=results["primary"])]
    for case, recs in by_case(results).items():
        out += ["", *case_block(results, case, recs)]
    return "\n".join(out + ["", "not measured:"] + [
        f"  {n['case']}{'' if n['contender'] == '*' else ' ' + n['contender']}: {n['reason']}"
        for n in results["not_measured"]] if results["not_measured"] else out)


def report_text(results: dict[str, Any]) -> str:
    """The header, the table and the headline: for each case and contender, the geometric-mean ratio to the
    primary (range, sizes)."""
    p = results["primary"]
    head = [f"headline: {p} against each contender: median-time ratio, geometric mean over sizes (range, sizes); "
            f"above 1: {p} is faster"] + [f"  {h['case']:<22} vs {h['contender']:<14} {h['geomean']:.2f}x "
                                          f"({h['min']:.2f}-{h['max']:.2f}, {h['sizes']})" for h in results["headline"]]
    if not results["headline"]:
        head = [f"headline: no contender was measured beside {p or 'anything'} at the same sizes"]
    return "\n\n".join([header(results), table(results), "\n".join(head)])


def plot_case(results: dict[str, Any], case: str, path: Path) -> Path | None:
    """Throughput against size, a line per contender and fixed size parameter, log axes."""
    from matplotlib.figure import Figure

    recs = [r for r in results["records"] if r["case"] == case and r["status"] == "ok" and "throughput" in r]
    if not recs:
        return None
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in recs:
        lines.setdefault(f"{r['contender']} {r['plot'][0]}".strip(), []).append((r["plot"][1], r["throughput"]))
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    for label, pts in lines.items():
        ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel=recs[0]["plot"][2], ylabel=recs[0]["unit"], title=f"{case}: {where(results)}")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return path


def _clean(obj: Any) -> Any:
    """JSON-ready: NumPy scalars to Python, non-finite floats to strings, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    obj = obj.item() if hasattr(obj, "item") and not isinstance(obj, (str, bytes)) else obj
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj if isinstance(obj, (str, int, float, bool)) or obj is None else str(obj)


def write_all(results: dict[str, Any], folder: Path, plots: bool = True) -> dict[str, Path]:
    """results.json, summary.md (the printed report and the plots) and one PNG per case into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if plots and importlib.util.find_spec("matplotlib") is None:
        results["plots_skipped"], plots = "matplotlib is not installed (pip install 'gpubp[bench]')", False
    pngs = {case: plot_case(results, case, folder / f"{slug(case)}.png") for case in (by_case(results) if plots else ())}
    results["plots"] = {case: p.name for case, p in pngs.items() if p is not None}
    written = {f"plot:{case}": folder / name for case, name in results["plots"].items()}
    written["json"], written["markdown"] = folder / "results.json", folder / "summary.md"
    written["json"].write_text(json.dumps(_clean(results), indent=1, allow_nan=False) + "\n")
    written["markdown"].write_text("\n".join([f"# gpubp bench: {where(results)}, {results['environment']['date'][:10]}",
                                              "", "```", report_text(results), "```", ""] + [
        f"![{case}]({name})" for case, name in results["plots"].items()]) + "\n")
    return written
