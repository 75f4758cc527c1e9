"""Figures of a training run: ``history`` (loss and metrics), ``gradient_flow`` (per-layer gradient
norms) and ``lr_find`` (a learning-rate range test).

    fig = gp.plot.history(model.fit(...))
    fig.savefig("history.png")

Each function returns a ``matplotlib.figure.Figure`` drawn on the Agg canvas: nothing is shown
and pyplot's global state is not touched, so it works without a display and in scripts.
matplotlib is optional: ``pip install 'gpubp[plot]'``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

INSTALL = "pip install 'gpubp[plot]'"
_NOT_METRICS = ("lr", "time", "gradient_stats")


def _figure(n_panels: int, width: float = 6.4, height: float = 3.2) -> tuple[Any, list[Any]]:
    """A Figure on an Agg canvas with ``n_panels`` stacked axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"gpubp.plot needs matplotlib, which is not installed: {INSTALL} ({e})") from None
    fig = Figure(figsize=(width, height * n_panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def _series(history: Mapping[str, Any], key: str) -> np.ndarray | None:
    """history[key] as a 1-D float array when it is a non-empty sequence of numbers, else None."""
    v = history.get(key)
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) == 0:
        return None
    try:
        arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.ndim == 1 else None


def _check_history(history: Any) -> Mapping[str, Any]:
    if not isinstance(history, Mapping):
        raise TypeError(f"history: expected the dict that fit returns, got {type(history).__name__}")
    return history


def history(history: Mapping[str, Any], title: str | None = None) -> Any:
    """Loss and every metric of a ``fit`` history against the epoch, train and validation.

    One panel per quantity (``loss`` first, then ``accuracy`` and any other per-epoch number),
    the training curve solid and the ``val_`` curve dashed. ``lr``, ``time`` and
    ``gradient_stats`` are left out (see :func:`gradient_flow`).
    """
    h = _check_history(history)
    names = [k for k in h if not k.startswith("val_") and k not in _NOT_METRICS and _series(h, k) is not None]
    names += [k[4:] for k in h if k.startswith("val_") and k[4:] not in names and _series(h, k) is not None]
    if not names:
        raise ValueError("history: no per-epoch loss or metric in it (expected keys such as 'loss', 'val_loss')")
    names.sort(key=lambda k: (k != "loss", k != "accuracy"))
    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names, strict=True):
        for key, style, label in ((name, "-", "train"), (f"val_{name}", "--", "validation")):
            s = _series(h, key)
            if s is not None:
                ax.plot(np.arange(1, len(s) + 1), s, style, marker="o" if len(s) < 30 else None, ms=3, label=label)
        ax.set_ylabel(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        if len(h.get(name, h.get(f"val_{name}", ()))) < 30:
            ax.xaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel("epoch")
    axes[0].set_title(title or "training history")
    return fig


def _gradient_stats(history: Mapping[str, Any]) -> list[list[Mapping[str, Any]]]:
    stats = history.get("gradient_stats")
    if not stats:
        raise ValueError(
            "history: no 'gradient_stats' in it; train with model.fit(..., gradient_stats=True) to record them"
        )
    if isinstance(stats, (str, bytes)) or not isinstance(stats, Sequence):
        raise TypeError(f"history['gradient_stats']: expected a list (one record per epoch), got {type(stats).__name__}")
    for e, record in enumerate(stats):
        if isinstance(record, (str, bytes)) or not isinstance(record, Sequence):
            raise TypeError(f"history['gradient_stats'][{e}]: expected a list of per-layer dicts, "
                            f"got {type(record).__name__}")
        for i, entry in enumerate(record):
            if not isinstance(entry, Mapping) or "name" not in entry or "grad_norm" not in entry:
                raise ValueError(f"history['gradient_stats'][{e}][{i}]: expected a dict with 'name' and "
                                 f"'grad_norm', got {entry!r}")
    return list(stats)


def _positive(v: Any) -> float:
    """v as a float for a log axis: NaN (a gap) where it is missing, not finite or <= 0."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) and f > 0 else math.nan


def gradient_flow(history: Mapping[str, Any], title: str | None = None) -> Any:
    """Per-parameter gradient norms over the epochs, log scale, from ``history["gradient_stats"]``.

    ``gradient_stats`` (recorded by ``fit(..., gradient_stats=True)``) holds one record per
    epoch, each a list of dicts with ``name`` ("0.weight", ...), ``grad_norm``, ``weight_norm``
    and ``update_ratio``. The first panel shows ``grad_norm``, the second ``update_ratio``
    (update norm / weight norm, when recorded), the third the ``dead`` and ``saturated``
    values when the records hold them. Weights are solid, biases dashed; a colour per layer.
    Gradients that vanish show as lines falling towards the bottom, layer by layer.
    Raises ValueError naming ``gradient_stats=True`` when the history has none.
    """
    stats = _gradient_stats(_check_history(history))
    names: list[str] = []
    for record in stats:
        for entry in record:
            if str(entry["name"]) not in names:
                names.append(str(entry["name"]))
    by_epoch = [{str(entry["name"]): entry for entry in record} for record in stats]
    has = lambda key: any(key in entry for record in stats for entry in record)  # noqa: E731
    panels = [("grad_norm", "gradient norm", True)]
    if has("update_ratio"):
        panels.append(("update_ratio", "update / weight norm", True))
    extra = [k for k in ("dead", "saturated") if has(k)]
    fig, axes = _figure(len(panels) + bool(extra), width=7.2)
    epochs = np.arange(1, len(stats) + 1)
    layers = sorted({n.split(".", 1)[0] for n in names}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s))
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    colour = {lay: cmap(i / max(1, len(layers) - 1) * 0.9) for i, lay in enumerate(layers)}
    for ax, (key, label, log) in zip(axes, panels, strict=False):
        for name in names:
            ys = [_positive(rec[name].get(key)) if name in rec else math.nan for rec in by_epoch]
            if all(math.isnan(v) for v in ys):
                continue
            style = "--" if name.endswith("bias") else "-"
            ax.plot(epochs, ys, style, color=colour[name.split(".", 1)[0]], marker="o" if len(epochs) < 30 else None,
                    ms=3, label=name)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    if extra:
        ax = axes[-1]
        for name in names:
            for key, style in zip(extra, ("-", ":"), strict=False):
                ys = [float(rec[name][key]) if name in rec and key in rec[name] else math.nan for rec in by_epoch]
                if all(math.isnan(v) for v in ys):
                    continue
                ax.plot(epochs, ys, style, color=colour[name.split(".", 1)[0]], label=f"{name} {key}")
        ax.set_ylabel(" / ".join(extra))
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.has_data():
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
        if len(epochs) < 30:
            ax.xaxis.get_major_locator().set_params(integer=True)
    axes[-1].set_xlabel("epoch")
    axes[0].set_title(title or "gradient flow")
    return fig


def lr_find(result: Any, title: str | None = None) -> Any:
    """The curve of :func:`gpubp.lr_find`: smoothed loss (and the raw losses, faint) against lr,
    log x, with the suggestion marked."""
    for attr in ("lrs", "losses"):
        if not hasattr(result, attr):
            raise TypeError(f"result: expected what gpubp.lr_find returns, got {type(result).__name__}")
    fig, (ax,) = _figure(1, height=4.0)
    raw = getattr(result, "raw_losses", None)
    if raw:
        ax.plot(result.lrs, raw, color="0.75", lw=0.8, label="batch loss")
    ax.plot(result.lrs, result.losses, label="smoothed loss")
    s = getattr(result, "suggestion", None)
    if s is not None:
        ax.axvline(s, color="C3", ls="--", label=f"suggestion {s:.2g}")
    ax.set_xscale("log")
    low = int(np.argmin(result.losses))
    lo, hi = result.losses[low], max(result.losses[: low + 1])
    span = max(hi - lo, 1e-3 * abs(lo), 1e-12)  # the diverged tail goes off the top
    ax.set_ylim(lo - 0.1 * span, hi + 0.1 * span)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title or "learning-rate range test")
    return fig
