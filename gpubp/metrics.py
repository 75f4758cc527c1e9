"""Metrics: scikit-learn's numbers, as functions of NumPy arrays, and their reduction during fit.

Every function takes ``(y_true, y_pred_or_scores, sample_weight=None)`` (options keyword-only)
and returns what the scikit-learn function in the table returns, to rounding (the tests hold
them to 1e-12 in float64). ``sample_weight``: one weight per row (1-D, finite, >= 0, not all
zero); each row then counts w_i times, as in scikit-learn.

| function                               | scikit-learn                                            |
|----------------------------------------|---------------------------------------------------------|
| accuracy(y, y_pred)                    | accuracy_score (labels (N,), or indicators (N, L): rows equal) |
| top_k_accuracy(y, scores, k=2)         | top_k_accuracy_score(labels=arange(C))                  |
| precision / recall / f1(y, y_pred, average="macro") | precision_score ... (average "macro", "micro" or "binary") |
| roc_auc(y, scores)                     | roc_auc_score: binary (scores (N,), or (N, 2): column 1), one-vs-rest macro for (N, C >= 3) |
| log_loss(y, probs)                     | log_loss(labels=arange(C)): probs (N, C), or (N,) for P(label 1) |
| confusion_matrix(y, y_pred)            | confusion_matrix (rows: true labels, sorted)            |
| r2 / mae / rmse(y, y_pred)             | r2_score / mean_absolute_error / root_mean_squared_error (outputs averaged uniformly) |

Class labels of the score-based metrics (top_k_accuracy, roc_auc with (N, C) scores, log_loss)
are the column indices 0 .. C-1, as scikit-learn's with ``labels=range(C)``: a class absent
from y_true is fine where the metric stays defined. Precision, recall, f1 and the confusion
matrix take scikit-learn's default labels (the sorted union of y_true and y_pred); a ratio
whose denominator is 0 is 0 (scikit-learn's zero_division default, without the warning).
Undefined scores (ROC AUC with one class in y_true, R² of one sample) are NaN with an
:class:`UndefinedMetricWarning`, as in scikit-learn 1.9.

In ``fit(..., metrics=[...])`` and ``evaluate(..., metrics=[...])`` a metric is a name
(``"accuracy"``, ``"top_k_accuracy"`` (k=2) or ``"top_5_accuracy"``, ``"precision"``,
``"recall"``, ``"f1"`` (macro; ``"f1_micro"`` ...), ``"roc_auc"``, ``"log_loss"``, ``"r2"``,
``"mae"``, ``"rmse"``), one of the functions above (or a functools.partial of one with its
options), or any other callable ``f(y_true, y_pred, sample_weight=None) -> float``, which gets
the targets as fit validated them and the model's raw outputs (N, C) on the host. How each
reaches the model's outputs:

- labels: the loss's classes (argmax of the logits for cross-entropy, logit > 0 for
  binary BCEWithLogits with one output column); probabilities: softmax / sigmoid in float64.
- Reduced on the device, batch by batch, read once per epoch: top-k accuracy (integer
  labels: the rank of the true class among the logits, ties as scikit-learn breaks them),
  MAE, RMSE and R² (per-output sums of w|d| and w d²; R²'s total sum of squares on the
  host, from the targets, which stay there). The others gather the epoch's outputs on the
  host once, at the end of the epoch (the outputs stay on the device until then).
- ``"accuracy"`` with a classification loss is the record's own accuracy (always there).
- With weights (sample_weight, class_weight), every metric is weighted by the rows' weights.
- Data-parallel fit: sums are added across the ranks and gathered outputs concatenated
  in rank order, so every rank records the same numbers.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubp._validate import sample_weights

__all__ = [
    "UndefinedMetricWarning",
    "accuracy",
    "confusion_matrix",
    "f1",
    "log_loss",
    "mae",
    "precision",
    "r2",
    "recall",
    "rmse",
    "roc_auc",
    "top_k_accuracy",
]

AVERAGES = ("macro", "micro", "binary")


class UndefinedMetricWarning(UserWarning):
    """A score is not defined for these inputs (NaN returned), as scikit-learn warns."""


# --- input checks ---------------------------------------------------------------------------


def _array(a: Any, name: str) -> np.ndarray:
    if isinstance(a, (str, bytes)):
        raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
    try:
        arr = np.asarray(a)
    except (ValueError, TypeError) as e:
        raise TypeError(f"{name}: expected an array, could not convert: {e}") from None
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty array with one entry per row, got shape {arr.shape}")
    return arr


def _pair(y_true: Any, y_pred: Any, pred_name: str = "y_pred") -> tuple[np.ndarray, np.ndarray]:
    t, p = _array(y_true, "y_true"), _array(y_pred, pred_name)
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"{pred_name}: expected {t.shape[0]} rows to match y_true, got shape {p.shape}")
    return t, p


def _weights(sample_weight: Any, n: int) -> np.ndarray | None:
    return None if sample_weight is None else sample_weights(sample_weight, n)


def _numeric(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected numbers, got dtype {a.dtype}")
    out = np.asarray(a, dtype=np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return out


def _int_labels(y: np.ndarray, classes: int, name: str = "y_true") -> np.ndarray:
    """Integer class labels (N,) in [0, classes)."""
    if y.ndim != 1:
        raise ValueError(f"{name}: expected class labels (N,), got shape {y.shape}")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer class labels, got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise ValueError(f"{name}: class labels must lie in [0, {classes}) (the score columns), got {lo if lo < 0 else hi}")
    return y.astype(np.int64)


def _average(values: np.ndarray, w: np.ndarray | None, axis: int | None = None) -> Any:
    """numpy.average as scikit-learn takes it: sum(a w) / sum(w), or the mean."""
    return np.average(values, axis=axis, weights=w)


# --- classification ------------------------------------------------------------------------


def accuracy(y_true: Any, y_pred: Any, sample_weight: Any = None) -> float:
    """The (weighted) fraction of rows predicted right: labels (N,) equal, or indicator rows (N, L)
    equal in every column (scikit-learn's subset accuracy)."""
    t, p = _pair(y_true, y_pred)
    if t.shape != p.shape or t.ndim > 2:
        raise ValueError(f"y_pred: expected the shape of y_true {t.shape}, got {p.shape}")
    hit = (t == p) if t.ndim == 1 else (t == p).all(axis=1)
    return float(_average(hit.astype(np.float64), _weights(sample_weight, t.shape[0])))


def _rank_hits(y: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Whether label y_i is among the k best of scores_i (N, C): fewer than k classes rank above it,
    where class j ranks above y when s_j > s_y, or s_j == s_y and j > y (scikit-learn's order:
    a stable ascending sort, reversed)."""
    n, c = scores.shape
    s_true = scores[np.arange(n), y][:, None]
    above = (scores > s_true) | ((scores == s_true) & (np.arange(c)[None, :] > y[:, None]))
    return above.sum(axis=1) < k


def top_k_accuracy(y_true: Any, y_score: Any, sample_weight: Any = None, *, k: int = 2) -> float:
    """The (weighted) fraction of rows whose true label is among the ``k`` highest scores.

    y_true: labels (N,) in [0, C); y_score: scores (N, C) (column c: label c). Scores (N,) of
    label 1 (binary): k = 1 predicts 1 above a threshold of 0.5 (scores in [0, 1]) or 0, and any
    k >= 2 is right everywhere, as scikit-learn.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    t, s = _pair(y_true, y_score, "y_score")
    s = _numeric(s, "y_score")
    w = _weights(sample_weight, t.shape[0])
    if s.ndim == 1:
        y = _int_labels(t, 2)
        if k == 1:
            threshold = 0.5 if s.min() >= 0 and s.max() <= 1 else 0.0
            hits = (s > threshold).astype(np.int64) == y
        else:
            hits = np.ones(t.shape[0], dtype=bool)
    elif s.ndim == 2:
        hits = _rank_hits(_int_labels(t, s.shape[1]), s, int(k))
    else:
        raise ValueError(f"y_score: expected scores (N, C) or (N,), got shape {s.shape}")
    return float(_average(hits.astype(np.float64), w))


def _label_counts(t: np.ndarray, p: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(labels: the sorted union of y_true and y_pred, weighted confusion counts (L, L) in float64)."""
    if t.ndim != 1 or p.shape != t.shape:
        raise ValueError(f"y_pred: expected class labels of the shape of y_true {t.shape}, got {p.shape}")
    labels = np.unique(np.concatenate([t, p]))
    ti, pi = np.searchsorted(labels, t), np.searchsorted(labels, p)
    cm = np.zeros((labels.size, labels.size))
    np.add.at(cm, (ti, pi), 1.0 if w is None else w)
    return labels, cm


def confusion_matrix(y_true: Any, y_pred: Any, sample_weight: Any = None) -> np.ndarray:
    """(L, L) counts: row i true label i, column j predicted label j, over the sorted union of the
    labels in y_true and y_pred; int64 counts, or float64 sums of weights (int64 for integer
    weights), as scikit-learn."""
    t, p = _pair(y_true, y_pred)
    w = _weights(sample_weight, t.shape[0])
    _, cm = _label_counts(t, p, w)
    integral = sample_weight is None or np.asarray(sample_weight).dtype.kind in "iub"
    return cm.astype(np.int64) if integral else cm


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division)."""
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _prf(y_true: Any, y_pred: Any, sample_weight: Any, average: str) -> tuple[float, float, float]:
    """(precision, recall, f1) averaged as ``average`` says (scikit-learn's precision_recall_fscore_support)."""
    if average not in AVERAGES:
        raise ValueError(f"average: expected one of {', '.join(map(repr, AVERAGES))}, got {average!r}")
    t, p = _pair(y_true, y_pred)
    w = _weights(sample_weight, t.shape[0])
    labels, cm = _label_counts(t, p, w)
    tp, pred_sum, true_sum = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    if average == "binary":
        extra = [v for v in labels.tolist() if v not in (0, 1)]
        if extra:
            raise ValueError(f"average: 'binary' needs labels 0 and 1, got {labels.tolist()} "
                             "(use 'macro' or 'micro' for several classes)")
        pos = np.flatnonzero(labels == 1)
        tp, pred_sum, true_sum = (a[pos] if pos.size else np.zeros(1) for a in (tp, pred_sum, true_sum))
    elif average == "micro":
        tp, pred_sum, true_sum = (np.array([a.sum()]) for a in (tp, pred_sum, true_sum))
    precision_ = _ratio(tp, pred_sum)
    recall_ = _ratio(tp, true_sum)
    f1_ = _ratio(2.0 * tp, true_sum + pred_sum)
    return float(np.mean(precision_)), float(np.mean(recall_)), float(np.mean(f1_))


def precision(y_true: Any, y_pred: Any, sample_weight: Any = None, *, average: str = "macro") -> float:
    """tp / (tp + fp): per label then averaged ("macro"), from the summed counts ("micro"), or
    of label 1 ("binary")."""
    return _prf(y_true, y_pred, sample_weight, average)[0]


def recall(y_true: Any, y_pred: Any, sample_weight: Any = None, *, average: str = "macro") -> float:
    """tp / (tp + fn), averaged as :func:`precision`."""
    return _prf(y_true, y_pred, sample_weight, average)[1]


def f1(y_true: Any, y_pred: Any, sample_weight: Any = None, *, average: str = "macro") -> float:
    """2 tp / (2 tp + fp + fn), averaged as :func:`precision`."""
    return _prf(y_true, y_pred, sample_weight, average)[2]


def _binary_auc(pos: np.ndarray, score: np.ndarray, w: np.ndarray | None) -> float:
    """Area under the ROC curve of scores against the 0/1 array ``pos``: the (weighted) true- and
    false-positive counts at each distinct threshold, highest first, joined by trapezoids
    (scikit-learn's roc_curve and auc)."""
    order = np.argsort(score, kind="mergesort")[::-1]
    s, y = score[order], pos[order].astype(np.float64)
    weight = np.ones_like(y) if w is None else w[order]
    if w is not None:  # rows of weight 0 set no threshold
        keep = weight != 0
        s, y, weight = s[keep], y[keep], weight[keep]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y * weight)[last]
    fps = np.cumsum((1.0 - y) * weight)[last]
    if tps.size == 0 or tps[-1] <= 0 or fps[-1] <= 0:
        warnings.warn("roc_auc: only one class is present in y_true; ROC AUC is not defined there",
                      UndefinedMetricWarning, stacklevel=3)
        return float("nan")
    tpr = np.r_[0.0, tps] / tps[-1]
    fpr = np.r_[0.0, fps] / fps[-1]
    return float(np.trapezoid(tpr, fpr))


def roc_auc(y_true: Any, y_score: Any, sample_weight: Any = None) -> float:
    """Area under the ROC curve. Binary: y_true of two values (the larger is positive) and scores
    (N,) of the positive class, or (N, 2) (column 1 is used). Multiclass: labels (N,) in [0, C)
    and scores (N, C >= 3), the unweighted mean over classes of each class against the rest."""
    t, s = _pair(y_true, y_score, "y_score")
    s = _numeric(s, "y_score")
    w = _weights(sample_weight, t.shape[0])
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim == 1:
        if t.ndim != 1:
            raise ValueError(f"y_true: expected labels (N,), got shape {t.shape}")
        values = np.unique(t)
        if values.size > 2:
            raise ValueError(f"y_true: {values.size} classes with scores (N,); pass scores (N, C) for several classes")
        return _binary_auc(t == values[-1], s, w)
    if s.ndim != 2:
        raise ValueError(f"y_score: expected scores (N,) or (N, C), got shape {s.shape}")
    y = _int_labels(t, s.shape[1])
    return float(np.mean([_binary_auc(y == c, s[:, c], w) for c in range(s.shape[1])]))


def log_loss(y_true: Any, y_prob: Any, sample_weight: Any = None) -> float:
    """Mean (weighted) -log p(true label), probabilities clipped to [eps, 1 - eps] (eps of their
    float dtype), the log taken in float64 (as scikit-learn 1.6; 1.9 takes it in float32 for
    float32 probabilities). y_prob (N, C) (column c: label c) or (N,) the probability of label 1."""
    t, p = _pair(y_true, y_prob, "y_prob")
    if p.dtype.kind not in "fiub":
        raise TypeError(f"y_prob: expected numbers, got dtype {p.dtype}")
    p = p if p.dtype in (np.float32, np.float64) else p.astype(np.float64)
    if not np.isfinite(p).all():
        raise ValueError("y_prob: contains NaN or Inf")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"y_prob: probabilities must lie in [0, 1], got range [{p.min()}, {p.max()}]")
    w = _weights(sample_weight, t.shape[0])
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"y_prob: expected probabilities (N, C) or (N,), got shape {p.shape}")
    y = _int_labels(t, p.shape[1])
    eps = np.finfo(p.dtype).eps
    p = np.clip(p, eps, 1 - eps)  # in the probabilities' dtype; the log in float64
    return float(_average(-np.log(p[np.arange(p.shape[0]), y].astype(np.float64)), w))


# --- regression ----------------------------------------------------------------------------


def _targets(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) as float64 (N, outputs); (N,) is one output."""
    t, p = _pair(y_true, y_pred)
    t, p = _numeric(t, "y_true"), _numeric(p, "y_pred")
    t = t.reshape(-1, 1) if t.ndim == 1 else t
    p = p.reshape(-1, 1) if p.ndim == 1 else p
    if t.shape != p.shape or t.ndim != 2:
        raise ValueError(f"y_pred: expected the shape of y_true {t.shape}, got {p.shape}")
    return t, p


def _r2_from(ss_res: np.ndarray, ss_tot: np.ndarray) -> float:
    """scikit-learn's R² per output (force_finite: 1 for a perfect fit of constant targets, 0 for
    an imperfect one), averaged uniformly."""
    scores = np.ones(ss_res.shape[0])
    valid = (ss_tot != 0) & (ss_res != 0)
    scores[valid] = 1 - ss_res[valid] / ss_tot[valid]
    scores[(ss_res != 0) & (ss_tot == 0)] = 0.0
    return float(np.mean(scores))


def _ss_tot(t: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """sum_i w_i (y_i - ybar_w)^2 per output, ybar_w the weighted mean (two passes)."""
    weight = 1.0 if w is None else w[:, None]
    return (weight * (t - np.average(t, axis=0, weights=w)) ** 2).sum(axis=0)


def r2(y_true: Any, y_pred: Any, sample_weight: Any = None) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot per output, averaged; NaN for one sample."""
    t, p = _targets(y_true, y_pred)
    w = _weights(sample_weight, t.shape[0])
    if t.shape[0] < 2:
        warnings.warn("r2: R² is not defined for fewer than two samples", UndefinedMetricWarning, stacklevel=2)
        return float("nan")
    weight = 1.0 if w is None else w[:, None]
    return _r2_from((weight * (t - p) ** 2).sum(axis=0), _ss_tot(t, w))


def mae(y_true: Any, y_pred: Any, sample_weight: Any = None) -> float:
    """Mean absolute error per output (weighted over rows), averaged over the outputs."""
    t, p = _targets(y_true, y_pred)
    return float(np.mean(_average(np.abs(p - t), _weights(sample_weight, t.shape[0]), axis=0)))


def rmse(y_true: Any, y_pred: Any, sample_weight: Any = None) -> float:
    """Root of the mean squared error of each output (weighted over rows), averaged over the outputs."""
    t, p = _targets(y_true, y_pred)
    return float(np.mean(np.sqrt(_average((t - p) ** 2, _weights(sample_weight, t.shape[0]), axis=0))))


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
            self.outs.append(out)

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

