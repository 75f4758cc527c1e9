"""The metric functions: scikit-learn's scores of NumPy arrays (the table in :mod:`gpubp.metrics`),
with their input checks. Their reduction during fit and evaluate is :mod:`gpubp.metrics.records`."""

from __future__ import annotations

import warnings
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
