"""Reading a run: the table on stdout, results.json, summary.md and PNG plots.

Every function takes the results dict that :meth:`gpubp.bench.harness.Runner.run`
returns. Ratios everywhere are ``contender median / primary median`` at the same
size in the same run: above 1 the primary (gpubp on the GPU, else gpubp's NumPy
path) is faster by that factor.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CONTENDER_ORDER = ("gpubp", "gpubp-unfused", "torch-cuda", "torch-compile", "numpy", "torch-cpu")
# tab10 colours, fixed per contender so every plot reads the same way
COLOURS = dict(zip(CONTENDER_ORDER, ("#d62728", "#ff7f0e", "#1f77b4", "#17becf", "#2ca02c", "#9467bd"), strict=True))

# --- formatting --------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g}{unit}"
    return f"{s / 1e-9:.3g}ns"


def fmt_si(v: float | None) -> str:
    """3 significant digits with an SI prefix: 1.23M, 456k, 7.89G."""
    if v is None:
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{prefix}"
    return f"{v:.3g}"


def fmt_throughput(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("GFLOP/s", "GB/s"):
        return f"{v:,.1f}" if v < 1e4 else f"{v:,.0f}"
    return fmt_si(v)


def fmt_pct(f: float | None) -> str:
    if f is None:
        return "-"
    return f"{100 * f:.1f}%" if f < 0.1 else f"{100 * f:.0f}%"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _median(st: dict[str, Any]) -> str:
    return fmt_time(st["median_s"]) + ("!" if st.get("noisy") else "")


def _order(name: str) -> int:
    return CONTENDER_ORDER.index(name) if name in CONTENDER_ORDER else len(CONTENDER_ORDER)


def _by_case(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results["records"]:
        out.setdefault(r["case"], []).append(r)
    return out


def _case_info(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in results["cases"]}


def _sizes_in_order(recs: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, tuple] = {}
    for r in recs:
        seen.setdefault(r["size_label"], tuple(r["size"].values()))
    return sorted(seen, key=lambda k: seen[k])


def device_line(results: dict[str, Any]) -> str:
    env = results["environment"]
    gpu = env["gpu"]
    cpu = f"{env['cpu']['model']} ({env['cpu']['usable_cpus'] or env['cpu']['logical_cpus']} CPUs usable, " \
          f"BLAS {env['blas']['name']} {env['blas']['threads']} threads)"
    if gpu.get("available"):
        g = f"{gpu['name']} (sm_{gpu['compute_capability'].replace('.', '')}, {gpu['memory_GiB']} GiB, " \
            f"driver {gpu.get('driver', 'CUDA ' + gpu['driver_cuda_version'])})"
        return f"GPU: {g}\nCPU: {cpu}"
    return f"GPU: none: {gpu.get('reason', 'unknown')}\nCPU: {cpu}"


# --- the text table ------------------------------------------------------------------------


def header(results: dict[str, Any]) -> str:
    """Where it ran, the ceilings, which contenders run and which do not (and why)."""
    lines = [device_line(results)]
    env = results["environment"]
    lines.append(
        f"suite: {results['tier']}, {results['target'].upper()} grid, dtype {results['dtype']}, "
        f"TF32 {'on' if env['tf32']['requested'] else 'off'}; commit {env['git']['commit'][:12]}"
        f"{' (local changes)' if env['git'].get('dirty') else ''}"
    )
    for dev, c in results["ceilings"].items():
        if "error" in c:
            lines.append(f"ceiling {dev}: not measured ({c['error']})")
        else:
            lines.append(f"ceiling {dev}: {c['bandwidth_Bps'] / 1e9:,.1f} GB/s ({c['copy']['what']}); "
                         f"{c['flops'] / 1e9:,.1f} GFLOP/s ({c['matmul']['what']})")
    off = [c for c in results["contenders"] if not c["available"]]
    on = [c["name"] for c in results["contenders"] if c["available"]]
    lines.append(f"contenders: {', '.join(on) or 'none'}")
    if off and not results["environment"]["gpu"].get("available"):
        gpu_off = [c["name"] for c in off if c["device"] == "cuda"]
        if gpu_off:
            lines.append(f"GPU contenders skipped ({', '.join(gpu_off)}): "
                         f"{results['environment']['gpu'].get('reason', 'no GPU')}")
        off = [c for c in off if c["device"] != "cuda"]
    for c in off:
        lines.append(f"  {c['name']}: not run: {c['reason']}")
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    """One block per case: a row per size and contender with median, min, max, n, throughput,
    fractions of the ceilings, the floor time and the ratio to the primary."""
    primary = results["primary"]
    info = _case_info(results)
    cols = ("size", "contender", "median", "min", "max", "n", "thrpt", "%peak", "%bw", "floor", "ratio")
    out = [f"ratio = contender median / {primary} median at the same size (above 1: {primary} is faster); "
           "floor = max(FLOPs / peak, bytes / bandwidth) at the measured ceilings; "
           "! = median over 1.5x the min (the machine was busy: rerun on an idle one)"]
    for case, recs in _by_case(results).items():
        c = info.get(case, {})
        out.append("")
        out.append(f"{case}: {c.get('title', '')}  [thrpt in {c.get('unit', '')}]")
        note = recs[0].get("note")
        if note:
            out.append(f"  ({note})")
        rows = [cols]
        for label in _sizes_in_order(recs):
            first = True
            for r in sorted((r for r in recs if r["size_label"] == label), key=lambda r: _order(r["contender"])):
                size = label if first else ""
                first = False
                if r["status"] != "ok":
                    rows.append((size, r["contender"], f"{r['status']}: {r['reason']}"))
                    continue
                st, fr = r["stats"], r["fraction"]
                ratio = "1" if r["contender"] == primary else fmt_ratio(r.get("speedup_of_primary"))
                rows.append((
                    size, r["contender"], _median(st), fmt_time(st["min_s"]), fmt_time(st["max_s"]),
                    str(st["count"]), fmt_throughput(r["throughput"], r["unit"]), fmt_pct(fr["of_peak_flops"]),
                    fmt_pct(fr["of_bandwidth"]), fmt_time(r.get("floor_s")), ratio,
                ))
        out += _align(rows)
    if results["not_measured"]:
        out.append("")
        out.append("not measured:")
        for n in results["not_measured"]:
            who = "" if n["contender"] == "*" else f" {n['contender']}"
            out.append(f"  {n['case']}{who}: {n['reason']}")
    return "\n".join(out)


def _align(rows: list[tuple[str, ...]]) -> list[str]:
    full = [r for r in rows if len(r) == len(rows[0])]
    widths = [max(len(r[i]) for r in full) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        if len(r) == len(rows[0]):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
            cells += [v.rjust(w) for v, w in zip(r[2:], widths[2:], strict=True)]
        else:  # a status line: size, contender, message
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2]]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def headline_text(results: dict[str, Any]) -> str:
    """The headline: for each case, the geometric-mean ratio of each contender to the primary."""
    primary = results["primary"]
    rows = results["headline"]
    if not rows:
        return f"headline: no contender was measured beside {primary or 'anything'} at the same sizes"
    others = sorted({r["contender"] for r in rows}, key=_order)
    by = {(r["case"], r["contender"]): r for r in rows}
    grid = [["case", *[f"vs {o}" for o in others]]]
    for case in dict.fromkeys(r["case"] for r in rows):
        cells = []
        for o in others:
            h = by.get((case, o))
            cells.append("-" if h is None else f"{h['geomean']:.2f}x ({h['min']:.2f}-{h['max']:.2f}, {h['sizes']})")
        grid.append([case, *cells])
    widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
    lines = [f"headline: {primary} against each contender: median-time ratio, geometric mean over sizes "
             f"(range, sizes); above 1: {primary} is faster"]
    for r in grid:
        lines.append("  " + "  ".join([r[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True))]))
    return "\n".join(lines)


# --- JSON --------------------------------------------------------------------------------


def _clean(obj: Any) -> Any:
    """JSON-ready: NumPy scalars to Python, non-finite floats to strings, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, TypeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_clean(results), indent=1, allow_nan=False) + "\n")
    return path


# --- Markdown ----------------------------------------------------------------------------


def _md_table(rows: list[Iterable[str]]) -> list[str]:
    rows = [list(r) for r in rows]
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows[1:]]
    return out


def markdown(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """summary.md: where and how it ran, the ceilings, the headline, each case's table and plot."""
    plots = plots or {}
    env = results["environment"]
    primary = results["primary"]
    gpu = env["gpu"]
    where = gpu["name"] if gpu.get("available") else env["cpu"]["model"]
    v = env["versions"]
    lines = [f"# gpubp bench: {where}, {env['date'][:10]}", ""]
    lines += [f"- {line}" for line in device_line(results).splitlines()]
    lines += [
        f"- suite: `{results['tier']}` on the {results['target'].upper()} grid, dtype {results['dtype']}, "
        f"TF32 {'on' if env['tf32']['requested'] else 'off'} (CUPY_TF32={env['tf32']['CUPY_TF32']})",
        f"- commit `{env['git']['commit']}`{' with local changes' if env['git'].get('dirty') else ''}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- timing: {results['timing']['method']['statistic']}; CPU: {results['timing']['method']['cpu']}; "
        f"GPU: {results['timing']['method']['cuda']}",
        f"- every result was checked against the float64 NumPy reference before it was timed "
        f"(tolerances {results['timing']['tolerances']})",
        f"- run time {results['elapsed_s']:.0f} s",
        "",
        "## Ceilings (measured in this run)",
        "",
    ]
    crow = [("device", "bandwidth", "how", "matmul", "how")]
    for dev, c in results["ceilings"].items():
        if "error" in c:
            crow.append((dev, "-", c["error"], "-", ""))
        else:
            crow.append((dev, f"{c['bandwidth_Bps'] / 1e9:,.1f} GB/s", c["copy"]["what"],
                         f"{c['flops'] / 1e9:,.1f} GFLOP/s", c["matmul"]["what"]))
    lines += _md_table(crow)
    lines += ["", "## Headline", "",
              f"Ratio = contender median / {primary} median at the same size, same run; above 1: {primary} "
              "is faster. Geometric mean over sizes, then (min-max, number of sizes). A median marked ! is over "
              "1.5x its fastest repeat: the machine was busy.", ""]
    hl = results["headline"]
    if hl:
        others = sorted({r["contender"] for r in hl}, key=_order)
        by = {(r["case"], r["contender"]): r for r in hl}
        rows = [("case", *[f"vs {o}" for o in others])]
        for case in dict.fromkeys(r["case"] for r in hl):
            rows.append((case, *[
                "-" if (case, o) not in by else
                f"**{by[case, o]['geomean']:.2f}x** ({by[case, o]['min']:.2f}-{by[case, o]['max']:.2f}, {by[case, o]['sizes']})"
                for o in others]))
        lines += _md_table(rows)
    else:
        lines.append(f"No contender was measured beside {primary} at the same sizes.")
    info = _case_info(results)
    lines += ["", "## Cases", ""]
    for case, recs in _by_case(results).items():
        c = info.get(case, {})
        lines += [f"### `{case}`: {c.get('title', '')}", "", f"Counting: {c.get('counting', '')}.", ""]
        if recs[0].get("note"):
            lines += [f"*{recs[0]['note']}*", ""]
        rows = [("size", "contender", "median", "min", "max", "n", c.get("unit", ""), "% peak", "% bw", "floor",
                 f"ratio vs {primary}")]
        for label in _sizes_in_order(recs):
            for r in sorted((r for r in recs if r["size_label"] == label), key=lambda r: _order(r["contender"])):
                if r["status"] != "ok":
                    rows.append((label, r["contender"], f"{r['status']}: {r['reason']}", "", "", "", "", "", "", "", ""))
                    continue
                st, fr = r["stats"], r["fraction"]
                gate = r["gate"]
                size = label + (f" (checked at {gate['size']})" if gate.get("reduced") else "")
                rows.append((size, r["contender"], _median(st), fmt_time(st["min_s"]),
                             fmt_time(st["max_s"]), str(st["count"]), fmt_throughput(r["throughput"], r["unit"]),
                             fmt_pct(fr["of_peak_flops"]), fmt_pct(fr["of_bandwidth"]), fmt_time(r.get("floor_s")),
                             "1" if r["contender"] == primary else fmt_ratio(r.get("speedup_of_primary"))))
        lines += _md_table(rows)
        if case in plots:
            lines += ["", f"![{case}]({plots[case]})"]
        lines.append("")
    if results["not_measured"]:
        lines += ["## Not measured", ""]
        lines += [f"- `{n['case']}`{'' if n['contender'] == '*' else ' ' + n['contender']}: {n['reason']}"
                  for n in results["not_measured"]]
        lines.append("")
    lines += ["## Contenders", ""]
    for c in results["contenders"]:
        state = "ran" if c["available"] else f"not run: {c['reason']}"
        lines.append(f"- **{c['name']}** ({c['device']}): {c['description']}; {state}")
    return "\n".join(lines) + "\n"


# --- plots -------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _panel_order(key: str) -> tuple:
    nums = re.findall(r"\d+", key)
    return (int(nums[0]) if nums else 0, key)


def plot_case(results: dict[str, Any], case: str, path: Path) -> Path | None:
    """Throughput against size, one line per contender, one panel per fixed parameter (e.g. width);
    dashed lines: the measured ceilings where the unit has one (GFLOP/s, GB/s)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = [r for r in results["records"] if r["case"] == case and r["status"] == "ok"]
    if not recs:
        return None
    info = _case_info(results).get(case, {})
    unit = recs[0]["unit"]
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    xlabel = ""
    for r in recs:
        panel, x, xlabel = r["plot"]
        panels.setdefault(panel, {}).setdefault(r["contender"], []).append((x, r["throughput"]))
    keys = sorted(panels, key=_panel_order)
    ncols = min(len(keys), 4)
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(max(6.4, 4.6 * ncols), 3.6 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    devices = {r["device"] for r in recs}
    for ax, key in zip(axes.flat, keys, strict=False):
        for name in sorted(panels[key], key=_order):
            pts = sorted(panels[key][name])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    color=COLOURS.get(name), linewidth=1.6)
        for dev in sorted(devices):
            c = results["ceilings"].get(dev, {})
            level = {"GFLOP/s": c.get("flops", 0) / 1e9, "GB/s": c.get("bandwidth_Bps", 0) / 1e9}.get(unit)
            if level:
                what = "matmul" if unit == "GFLOP/s" else "copy"
                ax.axhline(level, linestyle="--", linewidth=1, color="#555555" if dev == "cuda" else "#aaaaaa",
                           label=f"{dev} {what} ceiling")
        xs = sorted({p[0] for v in panels[key].values() for p in v})
        ys = [p[1] for v in panels[key].values() for p in v] + [ln.get_ydata()[0] for ln in ax.get_lines()[len(panels[key]):]]
        _axes_style(ax, xs, ys)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(unit)
        if key:
            ax.set_title(key, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8, loc="best")
    env = results["environment"]
    where = env["gpu"]["name"] if env["gpu"].get("available") else env["cpu"]["model"]
    fig.suptitle(f"{case}: {info.get('title', '')}\n{where}, {env['date'][:10]}, commit {env['git']['commit'][:8]}",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def _axes_style(ax: Any, xs: list[float], ys: list[float]) -> None:
    """Log axes with ticks at the measured sizes and plain SI labels (1.2k, 65.5k, 2.3G)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    label = FuncFormatter(lambda v, _: fmt_si(v))
    if len(xs) > 1 and xs[-1] / xs[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}" if v < 1e6 else fmt_si(v)))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(label)
    positive = [y for y in ys if y and y > 0]
    few_decades = positive and math.log10(max(positive) / min(positive)) < 1.0
    ax.yaxis.set_minor_formatter(label if few_decades else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def write_all(results: dict[str, Any], folder: Path, plots: bool = True) -> dict[str, Path]:
    """results.json, summary.md and one PNG per case into ``folder``; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    pngs: dict[str, str] = {}
    if plots and importlib.util.find_spec("matplotlib") is None:
        results["plots_skipped"] = "matplotlib is not installed (pip install 'gpubp[bench]')"
        plots = False
    if plots:
        for case in _by_case(results):
            p = plot_case(results, case, folder / f"{slug(case)}.png")
            if p is not None:
                pngs[case] = p.name
                written[f"plot:{case}"] = p
    results["plots"] = dict(pngs)
    written["json"] = write_json(results, folder / "results.json")
    md = folder / "summary.md"
    md.write_text(markdown(results, pngs))
    written["markdown"] = md
    return written
