"""Metrics in ``fit(..., metrics=)`` and ``evaluate(..., metrics=)``: a name or callable resolved to a
:class:`Metric` (checked against the loss before any step), and the :class:`Tracker` that reduces
them over one pass, on the device batch by batch or from the outputs gathered on the host
(the rules: :mod:`gpubp.metrics`' docstring)."""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubp.metrics.scores import (
    AVERAGES,
    UndefinedMetricWarning,
    _r2_from,
    _ss_tot,
    accuracy,
    f1,
    log_loss,
    mae,
    precision,
    r2,
    recall,
    rmse,
    roc_auc,
    top_k_accuracy,
)

__all__ = ["RESERVED", "Metric", "Tracker", "resolve"]

# --- metrics in fit and evaluate ----------------------------------------------------------
# A metric of a record: what it reads from the model's outputs (``feed``) and how it is
# reduced: on the device batch by batch (``device``), or from the epoch's outputs gathered
# on the host once.

_CLASSIFY = {"accuracy", "top_k_accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"}
_REGRESS = {"r2", "mae", "rmse"}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "top_k_accuracy": top_k_accuracy, "precision": precision, "recall": recall, "f1": f1,
    "roc_auc": roc_auc, "log_loss": log_loss, "r2": r2, "mae": mae, "rmse": rmse,
}
_FEEDS = {"accuracy": "labels", "top_k_accuracy": "probs", "precision": "labels", "recall": "labels", "f1": "labels",
          "roc_auc": "probs", "log_loss": "probs", "r2": "values", "mae": "values", "rmse": "values"}
#: keys a metric may not take: the record's own
RESERVED = ("loss", "lr", "time", "stopped", "skipped", "gradient_stats")


@dataclass(frozen=True)
class Metric:
    """One metric of a record: its key, the function, its options, and what it is fed."""

    name: str
    fn: Callable[..., Any]
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = "raw"  # the function's name in _FUNCTIONS, or "raw" for another callable
    builtin: bool = False  # the record's own accuracy

    @property
    def feed(self) -> str:
        return _FEEDS.get(self.kind, "raw")

    @property
    def device(self) -> str | None:
        """How the metric reduces batch by batch on the backend (None: gathered on the host)."""
        if self.kind in ("mae", "rmse", "r2"):
            return self.kind
        if self.kind == "top_k_accuracy":
            return "top_k"  # with integer labels; else gathered
        return None

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> float:
        return float(self.fn(y_true, y_pred, sample_weight, **self.options))


def _named(name: str) -> Metric:
    key = name.strip().lower()
    m = re.fullmatch(r"top_(\d+)_accuracy", key)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise ValueError(f"top_k_accuracy: k must be >= 1, got {k}")
        return Metric(key, top_k_accuracy, {"k": k}, "top_k_accuracy")
    if key == "top_k_accuracy":
        return Metric(key, top_k_accuracy, {"k": 2}, "top_k_accuracy")
    m = re.fullmatch(r"(precision|recall|f1)(?:_(macro|micro|binary))?", key)
    if m:
        average = m.group(2) or "macro"
        return Metric(m.group(1) if average == "macro" else key, _FUNCTIONS[m.group(1)], {"average": average},
                      m.group(1))
    if key in _FUNCTIONS:
        return Metric(key, _FUNCTIONS[key], {}, key)
    raise ValueError(f"unknown metric {name!r}; expected one of accuracy, top_k_accuracy, top_<k>_accuracy, "
                     "precision, recall, f1 (_macro, _micro, _binary), roc_auc, log_loss, r2, mae, rmse, "
                     "or a callable")


def _of_function(fn: Any) -> Metric | None:
    """The Metric of one of this module's functions, or of a functools.partial of one."""
    options: dict[str, Any] = {}
    if isinstance(fn, functools.partial):
        if fn.args:
            raise ValueError("a functools.partial of a gpubp metric may fix keyword options only")
        options, fn = dict(fn.keywords), fn.func
    kind = next((k for k, f in _FUNCTIONS.items() if f is fn), None)
    if kind is None:
        return None
    if kind == "top_k_accuracy":
        return _named(f"top_{options.get('k', 2)}_accuracy") if set(options) <= {"k"} else _bad_options(kind, options)
    if kind in ("precision", "recall", "f1"):
        average = options.get("average", "macro")
        if not set(options) <= {"average"} or average not in AVERAGES:
            _bad_options(kind, options)
        return _named(kind if average == "macro" else f"{kind}_{average}")
    return _named(kind) if not options else _bad_options(kind, options)


def _bad_options(kind: str, options: dict[str, Any]) -> Metric:
    raise ValueError(f"{kind}: unexpected options {options!r}")


def resolve(metrics: Any, loss: Any, out_features: int, name: str = "metrics") -> list[Metric]:
    """``metrics`` (None, or a list of names and callables) checked against the loss and the model's
    outputs before any step; each becomes a :class:`Metric` with a distinct key."""
    if metrics is None:
        return []
    if isinstance(metrics, (str, bytes)) or callable(metrics) or not isinstance(metrics, (list, tuple)):
        raise TypeError(f"{name}: expected a list of metric names or callables, got {type(metrics).__name__}")
    out: list[Metric] = []
    for i, m in enumerate(metrics):
        where = f"{name}[{i}]"
        try:
            if isinstance(m, Metric):
                metric = m
            elif isinstance(m, str):
                metric = _named(m)
            elif callable(m):
                metric = _of_function(m)
                if metric is None:
                    label = getattr(m, "__name__", None)
                    if not isinstance(label, str) or not label.isidentifier():
                        raise ValueError(f"the callable has no usable name ({label!r}) to key the history; "
                                         "define a named function")
                    metric = Metric(label, m)
            else:
                raise TypeError(f"expected a metric name or a callable, got {type(m).__name__}")
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: {e}") from None
        if metric.name in RESERVED or (metric.name == "accuracy" and metric.kind != "accuracy" and loss.classifies):
            raise ValueError(f"{where}: {metric.name!r} is a key of the record already; rename the metric")
        if metric.kind in _CLASSIFY and not loss.classifies:
            raise ValueError(f"{where}: {metric.name!r} is a classification metric; the loss {loss.name!r} is not "
                             "a classification loss")
        if metric.kind in _REGRESS and loss.classifies:
            raise ValueError(f"{where}: {metric.name!r} is a regression metric; the loss {loss.name!r} classifies")
        if metric.kind in _CLASSIFY and metric.kind != "accuracy":
            try:
                loss.predicted_labels(np.zeros((1, out_features)))
            except ValueError as e:
                raise ValueError(f"{where}: {metric.name!r}: {e}") from None
        if metric.name == "accuracy" and loss.classifies:
            metric = Metric("accuracy", metric.fn, metric.options, metric.kind, builtin=True)
        if any(metric.name == other.name for other in out):
            raise ValueError(f"{where}: {metric.name!r} is listed twice")
        out.append(metric)
    return out


class Tracker:
    """The metrics of one pass over data (a training epoch, or an evaluation): ``update`` per batch,
    ``result`` once. Device sums stay on the backend until ``result``; gathered outputs stay
    there as a list of batches until then."""

    def __init__(self, metrics: list[Metric], loss: Any, backend: Any, target_shape: tuple[int, ...],
                 out_features: int, weighted: bool = False, comm: Any = None) -> None:
        self.metrics = [m for m in metrics if not m.builtin]
        self.loss, self.backend, self.comm = loss, backend, comm
        self.out_features = out_features
        self.target_shape = tuple(target_shape)  # the shape of one row's target: () for labels
        self.sums: dict[str, Any] = {}  # device partial sums by metric
        self.weight: Any = 0.0  # the weight the sums cover: rows, or (weighted) a sum on the backend
        self.outs: list[Any] = []  # device outputs of the batches, when a metric gathers
        self.ys: list[np.ndarray] = []  # host targets of the batches (gathered metrics, R²)
        self.ws: list[np.ndarray] = []  # host weights of the batches (weighted)
        self.weighted = bool(weighted)
        self._labels = len(self.target_shape) == 0  # integer labels (N,): top-k reduces on the backend
        self._gathers = any(self._gathered(m, self._labels) for m in self.metrics)
        self._needs_rows = self._gathers or any(m.device == "r2" for m in self.metrics)

    @staticmethod
    def _gathered(metric: Metric, labels: bool) -> bool:
        return metric.device is None or (metric.device == "top_k" and not labels)

    def __bool__(self) -> bool:
        return bool(self.metrics)

    def update(self, out: Any, yb: Any, y_rows: np.ndarray, wb: Any = None, w_rows: np.ndarray | None = None) -> None:
        """One batch: outputs ``out`` (N, C) and targets ``yb`` on the backend, the same targets
        on the host (``y_rows``), and row weights on the backend (``wb``) and the host (``w_rows``),
        or None."""
        if not self.metrics:
            return
        n = int(out.shape[0])
        # the denominators are summed as the numerators are (on the backend), so that a fraction
        # whose every row counts is exactly 1
        self.weight = self.weight + (wb.sum() if wb is not None else n)
        for m in self.metrics:
            if self._gathered(m, self._labels):
                continue
            part = self._device_sum(m, out, yb, wb)
            self.sums[m.name] = part if m.name not in self.sums else self.sums[m.name] + part
        if self._needs_rows:
            self.ys.append(np.asarray(y_rows))
            if self.weighted:
                self.ws.append(np.asarray(w_rows, dtype=np.float64))
        if self._gathers:
            self.outs.append(out.copy())  # kept to the epoch's end: a recorded step's buffer is written again

    def _device_sum(self, m: Metric, out: Any, yb: Any, wb: Any) -> Any:
        """This batch's sums of metric ``m`` on the backend (float64): weighted hits (top-k), or
        per-output sums of w |d| (MAE) or w d^2 (RMSE, R²)."""
        xp = self.backend.xp
        if m.device == "top_k":
            n, c = out.shape
            s_true = out[xp.arange(n), yb][:, None]
            above = (out > s_true) | ((out == s_true) & (xp.arange(c)[None, :] > yb[:, None]))
            hits = above.sum(axis=1) < m.options["k"]
            return hits.sum(dtype=np.float64) if wb is None else (hits * wb).sum()
        d = out - yb
        term = xp.abs(d) if m.device == "mae" else d * d
        return term.sum(axis=0, dtype=np.float64) if wb is None else (term * wb[:, None]).sum(axis=0)

    def result(self) -> dict[str, float]:
        """Every metric's value over the batches seen (read from the backend once)."""
        if not self.metrics:
            return {}
        backend, comm = self.backend, self.comm
        sums = {k: np.atleast_1d(np.asarray(backend.to_numpy(v), dtype=np.float64)) for k, v in self.sums.items()}
        total = float(backend.to_numpy(self.weight))
        if comm is not None:  # the sums of every rank, in a fixed order
            for k in sorted(sums):
                sums[k] = comm.allreduce_(np.ascontiguousarray(sums[k]), op="sum")
            total = float(comm.allreduce_(np.array([total]), op="sum")[0])
        ys = self._concat(self.ys, (0, *self.target_shape))
        ws = (np.concatenate(self.ws) if self.ws else np.zeros(0)) if self.weighted else None
        outs = None
        if self._gathers:
            if self.outs:
                outs = backend.to_numpy(backend.xp.concatenate(self.outs) if len(self.outs) > 1 else self.outs[0])
            else:
                outs = np.zeros((0, self.out_features))
        if comm is not None and self._needs_rows:  # everyone's rows, in rank order
            parts = comm.allgather((outs, ys, ws))
            outs = None if outs is None else np.concatenate([p[0] for p in parts])
            ys = np.concatenate([p[1] for p in parts])
            ws = None if ws is None else np.concatenate([p[2] for p in parts])
        result: dict[str, float] = {}
        for m in self.metrics:
            if m.name in sums:
                result[m.name] = self._from_sums(m, sums[m.name], total, ys, ws)
            else:
                result[m.name] = self._from_outputs(m, outs, ys, ws)
        return result

    @staticmethod
    def _concat(parts: list[np.ndarray], empty: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(empty)

    def _from_sums(self, m: Metric, s: np.ndarray, total: float, ys: np.ndarray, ws: np.ndarray | None) -> float:
        if not total > 0:
            return float("nan")
        if m.device == "top_k":
            return float(s[0] / total)
        if m.device == "mae":
            return float(np.mean(s / total))
        if m.device == "rmse":
            return float(np.mean(np.sqrt(s / total)))
        t = ys.reshape(ys.shape[0], -1).astype(np.float64)  # R²: the total sum of squares from the host targets
        if t.shape[0] < 2:
            return float("nan")
        return _r2_from(s, _ss_tot(t, ws))

    def _from_outputs(self, m: Metric, outs: np.ndarray, ys: np.ndarray, ws: np.ndarray | None) -> float:
        if outs.shape[0] == 0:
            return float("nan")
        loss = self.loss
        if m.feed == "raw":
            return float(m.fn(ys, outs, ws))
        if m.feed == "values":
            y_pred: Any = outs
            y_true: Any = ys
        else:
            y_true = loss.labels(ys)
            if m.feed == "labels":
                y_pred = loss.predicted_labels(outs)
            else:
                y_pred = loss.probabilities(outs)
                y_pred = y_pred[:, 0] if y_pred.shape[1] == 1 else y_pred
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)  # NaN in the record says it
            return m(y_true, y_pred, ws)

