"""gpubp.sklearn's :class:`MLPClassifier`."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.base import ClassifierMixin
from sklearn.metrics import accuracy_score
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from gpubp.sklearn._base import _BaseMLP


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier trained by gpubp: scikit-learn's MLPClassifier, on any gpubp device.

    Parameters are scikit-learn's (see :mod:`gpubp.sklearn` for what is computed and the
    additions), plus:

    Args:
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"``, where the network lives.
        dtype: ``None`` (scikit-learn's rule: float32 for float32 X, else float64),
            ``"float32"`` or ``"float64"``. Use float32 on a GPU.

    Attributes (after fit): ``classes_`` (n_classes,) of the labels' type; ``loss_``,
    ``loss_curve_`` (stochastic solvers), ``best_loss_``, ``validation_scores_``,
    ``best_validation_score_``; ``n_iter_`` (epochs of the last fit), ``t_`` (samples seen);
    ``n_features_in_``, ``feature_names_in_`` (DataFrame input); ``n_layers_``,
    ``n_outputs_``, ``out_activation_`` ("softmax", "logistic"); ``coefs_`` /
    ``intercepts_`` (lists per layer, ``coefs_[i]`` (in, out)); ``device_``.

    Binary problems have one output (logistic), multi-class ones one per class (softmax),
    and a 2-D 0/1 indicator y is multi-label (one logistic output per label, summed binary
    cross-entropy), as in scikit-learn.
    """

    def _validate_input(self, X: Any, y: Any, incremental: bool, reset: bool) -> tuple[np.ndarray, np.ndarray]:
        X, y = validate_data(self, X, y, multi_output=True, dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        target = type_of_target(y, input_name="y")
        if target not in ("binary", "multiclass", "multilabel-indicator"):
            raise ValueError(f"Unknown label type: {target}. y: expected class labels (binary or multi-class) or a "
                             "0/1 indicator matrix (multi-label)")
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(f"y: warm_start can only be used where `y` has the same classes as in the "
                                     f"previous call to fit. Previously got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"y: `y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. "
                                 f"'y' has {classes}.")
        if reset or self.__dict__.get("_network") is None:
            self._out_kind = "multiclass" if self._label_binarizer.y_type_ == "multiclass" else "logistic"
        return X, y

    def _targets(self, y: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Integer class indices (n,) for softmax outputs; the 0/1 indicator matrix (n, K) for logistic ones."""
        Y = self._label_binarizer.transform(y)
        if self._out_kind == "multiclass":
            return np.ascontiguousarray(Y.argmax(axis=1), dtype=np.int64)
        return np.ascontiguousarray(Y, dtype=dtype)

    def _decode(self, Y: np.ndarray) -> np.ndarray:
        """Labels back from :meth:`_targets`'s form (the early-stopping split)."""
        if self._out_kind == "multiclass":
            return self.classes_[Y]
        return self._label_binarizer.inverse_transform(Y)

    _score_function = staticmethod(accuracy_score)

    def _predict(self, X: Any, check_input: bool = True) -> np.ndarray:
        proba = self._proba(X, check_input)
        if self.n_outputs_ == 1:
            proba = proba.ravel()
        return self._label_binarizer.inverse_transform(proba)

    def _proba(self, X: Any, check_input: bool = True) -> np.ndarray:
        """Softmax (multi-class) or logistic outputs (n_samples, n_outputs)."""
        z = self._logits(X, check_input)
        if self.out_activation_ == "softmax":
            z = np.exp(z - z.max(axis=1, keepdims=True))
            return z / z.sum(axis=1, keepdims=True)
        return expit(z)

    def predict(self, X: Any) -> np.ndarray:
        """Class labels (n_samples,), or the indicator matrix (n_samples, n_labels) for multi-label."""
        check_is_fitted(self)
        return self._predict(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), columns in the order of ``classes_``
        ((n_samples, n_labels) per-label probabilities for multi-label)."""
        check_is_fitted(self)
        p = self._proba(X)
        if self.n_outputs_ == 1:
            p = p.ravel()
            return np.vstack([1 - p, p]).T
        return p

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """log(predict_proba(X)), (n_samples, n_classes)."""
        p = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(p, out=p)

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None, classes: Any = None) -> MLPClassifier:
        """One epoch over (X, y); ``classes`` (every label that will be seen) is required on the first call."""
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, sample_weight, incremental=True)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags
