"""Reading a run: the text table, results.json, summary.md and PNG plots, all from the results dict."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

ORDER = ("gpubp", "gpubp-unfused", "torch-cuda", "torch-compile", "numpy", "torch-cpu")
COLOURS = dict(zip(ORDER, ("#d62728", "#ff7f0e", "#1f77b4", "#17becf", "#2ca02c", "#9467bd"), strict=True))
COLUMNS = ("size", "contender", "median", "min", "max", "n", "thrpt", "%peak", "%bw", "floor", "ratio")
LEGEND = ("ratio = contender median / {p} median at the same size (above 1: {p} is faster); floor = max(FLOPs / "
          "peak, bytes / bandwidth) at the measured ceilings; ! = median over 1.5x the min (the machine was busy)")


def _scaled(v: float | None, steps: tuple[tuple[str, float], ...], last: tuple[str, float]) -> str:
    if v is None:
        return "-"
    name, k = next(((n, k) for n, k in steps if abs(v) >= k), last)
    return f"{v / k:.3g}{name}"


def fmt_time(s: float | None) -> str:
    return _scaled(s, (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)), ("ns", 1e-9))


def fmt_si(v: float | None) -> str:
    """3 significant digits with an SI prefix: 1.23M, 456k, 7.89G."""
    return _scaled(v, (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)), ("", 1.0))


def fmt_pct(f: float | None) -> str:
    return "-" if f is None else f"{100 * f:.1f}%" if f < 0.1 else f"{100 * f:.0f}%"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _order(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


def _by_case(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results["records"]:
        out.setdefault(r["case"], []).append(r)
    return out


def where(results: dict[str, Any]) -> str:
    env = results["environment"]
    return env["gpu"]["name"] if env["gpu"].get("available") else env["cpu"]["model"]


def header(results: dict[str, Any]) -> str:
    """Where it ran, the ceilings, which contenders ran and why the others did not."""
    env, gpu, cpu = results["environment"], results["environment"]["gpu"], results["environment"]["cpu"]
    lines = [f"GPU: {gpu['name']} (sm_{gpu['compute_capability'].replace('.', '')}, {gpu['memory_GiB']} GiB, driver "
             f"{gpu.get('driver', '?')}, CUDA {gpu['driver_cuda_version']})" if gpu.get("available")
             else f"GPU: none: {gpu.get('reason', 'unknown')}",
             f"CPU: {cpu['model']} ({cpu['usable_cpus'] or cpu['logical_cpus']} CPUs usable, BLAS "
             f"{env['blas']['name']} {env['blas']['threads']} threads)",
             f"suite: {results['tier']}, {results['target'].upper()} grid, dtype {results['dtype']}, TF32 "
             f"{'on' if env['tf32']['requested'] else 'off'}; commit {env['git']['commit'][:12]}"
             f"{' (local changes)' if env['git'].get('dirty') else ''}"]
    lines += [f"ceiling {d}: not measured ({c['error']})" if "error" in c else
              f"ceiling {d}: {c['bandwidth_Bps'] / 1e9:,.1f} GB/s ({c['copy']['what']}); {c['flops'] / 1e9:,.1f} "
              f"GFLOP/s ({c['matmul']['what']})" for d, c in results["ceilings"].items()]
    lines.append(f"contenders: {', '.join(c['name'] for c in results['contenders'] if c['available']) or 'none'}")
    off = [c for c in results["contenders"] if not c["available"]]
    gpu_off = [c["name"] for c in off if c["device"] == "cuda"]
    if gpu_off and not gpu.get("available"):
        lines.append(f"GPU contenders skipped ({', '.join(gpu_off)}): {gpu.get('reason', 'no GPU')}")
        off = [c for c in off if c["device"] != "cuda"]
    return "\n".join(lines + [f"  {c['name']}: not run: {c['reason']}" for c in off])


def _row(r: dict[str, Any], size: str, primary: str) -> tuple[str, ...]:
    if r["status"] != "ok":
        return size, r["contender"], f"{r['status']}: {r['reason']}"
    st, fr, thr, sp = r["stats"], r["fraction"], r["throughput"], r.get("speedup_of_primary")
    return (size + (f" (gate at {r['gate']['size']})" if r["gate"].get("reduced") and size else ""), r["contender"],
            fmt_time(st["median_s"]) + ("!" if st.get("noisy") else ""), fmt_time(st["min_s"]), fmt_time(st["max_s"]),
            str(st["count"]), f"{thr:,.1f}" if r["unit"] in ("GFLOP/s", "GB/s") else fmt_si(thr),
            fmt_pct(fr["of_peak_flops"]), fmt_pct(fr["of_bandwidth"]), fmt_time(r.get("floor_s")),
            "1" if r["contender"] == primary else f"{sp:.2f}x" if sp else "-")


def _align(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to width (numbers right-aligned); a 3-cell row (not timed: why) runs on."""
    widths = [max(len(r[i]) for r in rows if len(r) == len(rows[0])) for i in range(len(rows[0]))]
    return ["  " + "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1])] + (
        [v.rjust(w) for v, w in zip(r[2:], widths[2:], strict=True)] if len(r) == len(rows[0]) else [r[2]])).rstrip()
        for r in rows]


def case_block(results: dict[str, Any], case: str, recs: list[dict[str, Any]]) -> list[str]:
    notes = ([recs[0]["note"]] if recs[0].get("note") else []) + [
        f"{r['contender']} at {r['size_label']}: {r['launches_per_step']} kernel launches per step"
        for r in recs if r.get("launches_per_step") is not None]
    sizes = {r["size_label"]: tuple(r["size"].values()) for r in recs}
    recs = sorted(recs, key=lambda r: (sizes[r["size_label"]], _order(r["contender"])))
    rows = [_row(r, "" if k and r["size_label"] == recs[k - 1]["size_label"] else r["size_label"], results["primary"])
            for k, r in enumerate(recs)]
    return [f"{case}: {recs[0]['title']}  [thrpt in {recs[0]['unit']}]"] + [f"  ({n})" for n in notes] + _align(
        [COLUMNS, *rows])


def _not_measured(results: dict[str, Any]) -> list[str]:
    return [f"{n['case']}{'' if n['contender'] == '*' else ' ' + n['contender']}: {n['reason']}"
            for n in results["not_measured"]]


def table(results: dict[str, Any]) -> str:
    out = [LEGEND.format(p=results["primary"])]
    for case, recs in _by_case(results).items():
        out += ["", *case_block(results, case, recs)]
    return "\n".join(out + (["", "not measured:", *[f"  {n}" for n in _not_measured(results)]]
                            if results["not_measured"] else []))


def headline_text(results: dict[str, Any]) -> str:
    """For each case, the geometric-mean ratio of each contender to the primary (range, sizes)."""
    p, hl = results["primary"], results["headline"]
    if not hl:
        return f"headline: no contender was measured beside {p or 'anything'} at the same sizes"
    others = sorted({h["contender"] for h in hl}, key=_order)
    by = {(h["case"], h["contender"]): h for h in hl}
    rows = [("case", "", *[f"vs {o}" for o in others])] + [
        (case, "", *["-" if (case, o) not in by else f"{by[case, o]['geomean']:.2f}x ({by[case, o]['min']:.2f}-"
                     f"{by[case, o]['max']:.2f}, {by[case, o]['sizes']})" for o in others])
        for case in dict.fromkeys(h["case"] for h in hl)]
    return "\n".join([f"headline: {p} against each contender: median-time ratio, geometric mean over sizes (range, "
                      f"sizes); above 1: {p} is faster", *_align(rows)])


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    """summary.md: where and how it ran, the ceilings, the headline, each case's table and plot."""
    env, t = results["environment"], results["timing"]
    head = header(results).splitlines()
    lines = [f"# gpubp bench: {where(results)}, {env['date'][:10]}", ""] + [
        f"- {ln.strip()}" for ln in head if not ln.startswith("ceiling")] + [
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        f"- timing: {t['method']['statistic']}; CPU: {t['method']['cpu']}; GPU: {t['method']['cuda']}",
        f"- every result was checked against the float64 NumPy reference before it was timed (max error relative "
        f"to the largest reference value; tolerances {t['tolerances']})", f"- run time {results['elapsed_s']:.0f} s",
        "", "## Ceilings (measured in this run)", "", *[f"- {ln}" for ln in head if ln.startswith("ceiling")],
        "", "## Headline", "", "```", headline_text(results), "```", "", "## Cases", ""]
    counting = {c["name"]: c["counting"] for c in results["cases"]}
    for case, recs in _by_case(results).items():
        lines += [f"### `{case}`", "", f"Counting: {counting.get(case, '')}.", "", "```",
                  *case_block(results, case, recs), "```", *([f"![{case}]({plots[case]})"] if case in plots else []), ""]
    if results["not_measured"]:
        lines += ["## Not measured", "", *[f"- {n}" for n in _not_measured(results)], ""]
    return "\n".join(lines + ["## Contenders", ""] + [
        f"- **{c['name']}** ({c['device']}): {c['description']}; {'ran' if c['available'] else 'not run: ' + c['reason']}"
        for c in results["contenders"]]) + "\n"


def plot_case(results: dict[str, Any], case: str, path: Path) -> Path | None:
    """Throughput against size, a line per contender and fixed size parameter (e.g. W=64), log axes; dashed:
    the measured ceilings where the unit has one (GFLOP/s, GB/s)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    recs = [r for r in results["records"] if r["case"] == case and r["status"] == "ok"]
    if not recs:
        return None
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in recs:
        lines.setdefault((r["contender"], r["plot"][0]), []).append((r["plot"][1], r["throughput"]))
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax, unit = fig.subplots(), recs[0]["unit"]
    panels = sorted({k[1] for k in lines}, key=lambda k: [int(n) for n in re.findall(r"\d+", k)])
    for (name, panel), pts in sorted(lines.items(), key=lambda kv: (_order(kv[0][0]), panels.index(kv[0][1]))):
        x, y = zip(*sorted(pts), strict=True)
        ax.plot(x, y, marker="os^vD<>ph*"[panels.index(panel) % 10], color=COLOURS.get(name), linewidth=1.4,
                alpha=1.0 - 0.5 * panels.index(panel) / max(len(panels), 1), label=f"{name} {panel}".strip())
    for dev in sorted({r["device"] for r in recs}):
        c = results["ceilings"].get(dev, {})
        level = {"GFLOP/s": c.get("flops", 0) / 1e9, "GB/s": c.get("bandwidth_Bps", 0) / 1e9}.get(unit)
        if level:
            ax.axhline(level, linestyle="--", linewidth=1, color="#555555" if dev == "cuda" else "#aaaaaa",
                       label=f"{dev} {'matmul' if unit == 'GFLOP/s' else 'copy'} ceiling")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}" if v < 1e5 else fmt_si(v)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_si(v)))
    ax.set(xlabel=recs[0]["plot"][2], ylabel=unit)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncols=2 if len(lines) > 6 else 1)
    env = results["environment"]
    fig.suptitle(f"{case}: {recs[0]['title']}\n{where(results)}, {env['date'][:10]}, commit {env['git']['commit'][:8]}",
                 fontsize=9)
    fig.savefig(path, dpi=110)
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
    """results.json, summary.md and one PNG per case into ``folder``; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    if plots and importlib.util.find_spec("matplotlib") is None:
        results["plots_skipped"], plots = "matplotlib is not installed (pip install 'gpubp[bench]')", False
    pngs = {case: plot_case(results, case, folder / f"{slug(case)}.png") for case in (_by_case(results) if plots else ())}
    results["plots"] = {case: p.name for case, p in pngs.items() if p is not None}
    written = {f"plot:{case}": folder / name for case, name in results["plots"].items()}
    written["json"], written["markdown"] = folder / "results.json", folder / "summary.md"
    written["json"].write_text(json.dumps(_clean(results), indent=1, allow_nan=False) + "\n")
    written["markdown"].write_text(markdown(results, results["plots"]))
    return written
