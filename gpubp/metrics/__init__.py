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

# the functions (gpubp.metrics.scores); Metric, resolve and Tracker for fit and evaluate (gpubp.metrics.records)
from gpubp.metrics.records import RESERVED, Metric, Tracker, resolve  # noqa: F401
from gpubp.metrics.scores import (
    AVERAGES,  # noqa: F401
    UndefinedMetricWarning,
    accuracy,
    confusion_matrix,
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
