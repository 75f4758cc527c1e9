"""scikit-learn estimators trained by gpubp: :class:`MLPClassifier` and :class:`MLPRegressor`.

    from gpubp.sklearn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(100,), random_state=0, device="cuda", dtype="float32")
    clf.fit(X, y).score(X_test, y_test)

They take scikit-learn's parameters (``sklearn.neural_network.MLPClassifier`` /
``MLPRegressor``) with their defaults and meanings, and add ``device`` and ``dtype``.
The network is a :class:`gpubp.Sequential` of Dense layers trained by ``Sequential.fit``
(stochastic solvers) or by ``scipy.optimize.minimize(method="L-BFGS-B")`` over gpubp's
gradients (``solver="lbfgs"``), so they run wherever gpubp runs, GPUs included. This module
imports scikit-learn; ``import gpubp`` does not import it.

The maths is scikit-learn's, step for step (``tests/test_sklearn.py`` checks it against
``sklearn.neural_network`` to rounding, in float64):

- initialisation: scikit-learn's Glorot-uniform draws (weights and biases in
  [-sqrt(6 / (fan_in + fan_out)), +...], factor 2 in place of 6 for ``"logistic"``), from
  the same ``random_state`` stream, in the same order;
- the loss of a batch B: the weighted mean sum_B w_i l_i / sum_B w_i of the per-sample
  losses (``fit(sample_weight=)``, handed to ``Sequential.fit``; w_i = 1 without it), plus
  the L2 penalty ``alpha / (2 sum_B w) * sum ||W||^2`` over the weights, not the biases. Its
  gradient adds ``alpha / sum_B w * W`` to each weight's: the ``weight_decay`` of a gpubp
  optimizer over the weights, set for each batch. Per sample: softmax cross-entropy
  (multi-class), binary cross-entropy summed over the outputs (binary and multi-label),
  half the squared error summed over the outputs (regression; ``loss_`` reports it averaged
  over the outputs, as scikit-learn does). ``loss_`` is the epoch's mean over the batches of
  (their loss + penalty) x rows;
- ``solver="sgd"``: scikit-learn's velocity ``v = momentum v - lr g`` (Nesterov: the update
  ``momentum v - lr g``), i.e. ``gpubp.optim.SGD`` with its momentum buffer rescaled
  whenever the learning rate changes; ``"adam"``: ``gpubp.optim.Adam`` with scikit-learn's
  epsilon, added to the square root of the second moment before its bias correction
  (torch's Adam adds it after);
- ``"lbfgs"``: scipy's L-BFGS-B on the whole data set's loss and gradient (``max_iter``,
  ``max_fun``, ``tol`` as gtol), evaluated by gpubp's forward and backward passes. For
  several regression outputs the objective sums their squared errors, as its gradient does
  (scikit-learn's L-BFGS objective averages them while its gradient sums them); ``loss_``
  still reports the average;
- ``learning_rate`` ("constant", "invscaling": ``learning_rate_init / (t_ + 1) ** power_t``
  after each epoch, "adaptive": divided by 5 when ``n_iter_no_change`` epochs did not
  improve by ``tol``), stopping (``tol``, ``n_iter_no_change``, ``early_stopping`` on a
  ``validation_fraction`` split scored by accuracy or R^2, the best parameters restored),
  ``ConvergenceWarning`` when ``max_iter`` ends training first.

Only the order of the mini-batches differs: an epoch's order is gpubp's (drawn from
``Generator([seed, epoch])``, the seed drawn from ``random_state``), not scikit-learn's.

Beyond scikit-learn: ``activation`` takes gpubp's activations too (``"leaky_relu"``,
``"elu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"softplus"``, ``"sigmoid"`` =
``"logistic"``); ``solver`` takes ``"adamw"`` (``alpha`` is then AdamW's decoupled decay of
the weights, ``W <- W (1 - lr alpha)`` per step), ``"rmsprop"`` and ``"adagrad"``
(``gpubp.optim`` with ``lr=learning_rate_init``, ``eps=epsilon`` and their other defaults);
``learning_rate`` applies to every solver but ``"adam"``/``"adamw"`` (scikit-learn: to
``"sgd"`` only). Sparse input is refused (densify it first).

Pickling (pickle, joblib): the state holds the parameters as NumPy arrays, the
architecture, the optimizer state and the device name, never device arrays. Unpickling
rebuilds the network on that device when this machine can use it, and otherwise on the
CPU with a :class:`DeviceFallbackWarning`: an estimator fitted on a GPU loads, and
predicts, on a machine without one. ``device_`` says where the network is;
:meth:`~MLPClassifier.to` moves it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from itertools import pairwise
from typing import Any

import numpy as np
import scipy.optimize
from scipy.special import expit, log_expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from gpubp import activations as activations_mod
from gpubp import losses as losses_mod
from gpubp import optim as optim_mod
from gpubp._validate import real
from gpubp.callbacks import Callback
from gpubp.diagnostics import NonFiniteError
from gpubp.layers import Dense
from gpubp.model import Sequential

__all__ = ["DeviceFallbackWarning", "MLPClassifier", "MLPRegressor"]

#: scikit-learn's activation names and gpubp's, each to gpubp's name.
ACTIVATIONS: dict[str, str] = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu",
                               **{name: name for name in activations_mod.NAMES}}
#: Solvers: scikit-learn's ("lbfgs", "sgd", "adam") and gpubp's other optimizers.
SOLVERS = ("adam", "sgd", "lbfgs", "adamw", "rmsprop", "adagrad")
_STOCHASTIC = ("adam", "sgd", "adamw", "rmsprop", "adagrad")
_ADAMS = ("adam", "adamw")
LEARNING_RATES = ("constant", "invscaling", "adaptive")
_PREDICT_BATCH = 65536  # rows per forward pass in predict (bounds the device memory it takes)


class DeviceFallbackWarning(UserWarning):
    """An unpickled estimator's network was fitted on a device this machine cannot use; it is on the CPU."""


# -- losses -------------------------------------------------------------------------------------


class _Recording:
    """Mixin for a Loss: remembers the rows and the weight total of the batch it last computed, which
    the solver's L2 penalty of that batch divides by (``Sequential.fit`` computes the loss of a batch
    before the optimizer steps on it)."""

    last_rows = 0
    last_total: float | None = None  # the batch's sum of sample weights; None without weights

    def compute(self, pred: Any, target: Any, backend: Any, weight: Any = None,
                weight_total: float | None = None) -> tuple[Any, Any]:
        self.last_rows, self.last_total = int(pred.shape[0]), weight_total
        if weight is None:
            return super().compute(pred, target, backend)  # type: ignore[misc]
        return super().compute(pred, target, backend, weight, weight_total)  # type: ignore[misc]

    def batch_weight(self) -> float:
        """The batch's sum of weights, or its rows without weights."""
        return float(self.last_rows if self.last_total is None else self.last_total)


class _CrossEntropy(_Recording, losses_mod.CrossEntropy):
    """Softmax cross-entropy, averaged over the rows (multi-class)."""


class _RowMeanBCE(_Recording, losses_mod.BCEWithLogits):
    """Binary cross-entropy on logits summed over the outputs, averaged over the rows (scikit-learn's
    multi-label loss; for one output it is BCEWithLogits). Gradient (sigmoid(z) - t) / N, z (N, K)."""

    def _count(self, pred: Any) -> int:
        return int(pred.shape[0])


class _HalfSquaredError(_Recording, losses_mod.MSE):
    """Half the squared error summed over the outputs, averaged over the rows: sum (p - y)^2 / (2N)
    for p, y (N, K); gradient (p - y) / N, scikit-learn's regression gradient."""

    def _count(self, pred: Any) -> int:
        return 2 * int(pred.shape[0])


def _host_loss(kind: str, z: np.ndarray, y: np.ndarray, w: np.ndarray | None, w_sum: float) -> tuple[float, np.ndarray]:
    """The data loss and its gradient over the logits, in float64 on the host (the L-BFGS solver).

    ``z`` (N, K) logits; ``y``: labels (N,) for "multiclass", targets (N, K) otherwise;
    ``w`` (N,) sample weights or None; ``w_sum``: N or sum(w). Returns (sum_i w_i l_i / w_sum,
    dL/dz (N, K)), l_i as in the module docstring.
    """
    if kind == "multiclass":
        shifted = z - z.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(z.shape[0])
        per_row = -log_p[rows, y]
        grad = np.exp(log_p)
        grad[rows, y] -= 1.0
    elif kind == "logistic":
        per_row = (np.maximum(z, 0) - z * y - log_expit(np.abs(z))).sum(axis=1)  # log(1 + e^-|z|) = -log_expit(|z|)
        grad = expit(z) - y
    else:  # half squared error, summed over the outputs
        diff = z - y
        per_row = 0.5 * np.einsum("ij,ij->i", diff, diff)
        grad = diff
    if w is None:
        return float(per_row.sum() / w_sum), grad / w_sum
    return float(per_row @ w / w_sum), grad * (w / w_sum)[:, None]


# -- the solver: one optimizer step as scikit-learn takes it --------------------------------------


class _Solver(optim_mod.Optimizer):
    """The update of a scikit-learn solver over a network's parameters, as a gpubp optimizer.

    Holds a gpubp optimizer over the weights and one over the biases (one over all the
    parameters when ``alpha`` is 0). Before each step it sets the weights' ``weight_decay`` to
    ``alpha / w_sum``, w_sum the batch's sum of weights (its rows without sample weights) as
    ``loss`` recorded it computing that batch (L2, coupled), or ``alpha`` ("adamw": decoupled);
    Adam's ``eps`` to ``epsilon / sqrt(1 - beta_2 ** t)`` (scikit-learn's epsilon); and, when
    ``penalty_slots`` is set, adds ||W||^2 of the weights into the step's slot and the step's
    rows / w_sum to ``shares`` (``loss_``'s penalty term). Setting ``lr`` rescales SGD's
    momentum buffer by old / new lr, so that it holds scikit-learn's velocity / -lr.
    """

    def __init__(self, model: Sequential, kind: str, lr: float, hp: dict[str, Any], alpha: float,
                 loss: _Recording) -> None:
        self._groups: list[optim_mod.Optimizer] = []
        params = model.parameters()
        super().__init__(params, lr=lr)
        self.kind, self.alpha, self.hp = kind, float(alpha), dict(hp)
        self._epsilon = float(hp.get("eps", 0.0))
        self._beta2 = float(hp["betas"][1]) if kind in _ADAMS else 0.0
        cls: type[optim_mod.Optimizer] = {"sgd": optim_mod.SGD, "adam": optim_mod.Adam, "adamw": optim_mod.AdamW,
                                          "rmsprop": optim_mod.RMSprop, "adagrad": optim_mod.Adagrad}[kind]
        extra = {"weight_decay": 0.0}
        self._weights = [p for p in params if p.name.endswith(".weight")]
        if self.alpha > 0:
            biases = [p for p in params if p.name.endswith(".bias")]
            self._groups = [cls(self._weights, lr=lr, **hp, **extra), cls(biases, lr=lr, **hp, **extra)]
            if kind == "adamw":
                self._groups[0].weight_decay = self.alpha
        else:
            self._groups = [cls(params, lr=lr, **hp, **extra)]
        self.loss = loss
        self.penalty_slots: Any = None  # a float64 device array, one slot per step of the epoch, or None
        self.shares: list[float] = []  # per step of the epoch: rows / w_sum of its batch
        self.k = 0  # the step of the epoch

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        new = real(value, "lr", min=0.0)
        old = getattr(self, "_lr", None)
        for g in self._groups:
            if isinstance(g, optim_mod.SGD) and g.momentum != 0 and old and new > 0 and new != old:
                for (arena, _, _), state in zip(g._runs, g._state, strict=True):
                    arena.backend.scale_(state["momentum_buffer"], old / new)
            g.lr = new
        self._lr = new

    def _update(self, ops: Any, p: Any, g: Any, state: dict[str, Any], guard: Any = None) -> None:
        raise AssertionError("_Solver.step updates through its groups")  # never called: step is overridden

    def step(self, guard: Any = None) -> None:
        self.step_count += 1
        k = self.k
        self.k += 1
        w_sum = self.loss.batch_weight()
        if self.penalty_slots is not None and k < self.penalty_slots.shape[0]:
            for p in self._weights:
                arena = p.arena
                arena.backend.sum_of_squares_into(arena.data[p.offset : p.offset + p.size],
                                                  self.penalty_slots[k : k + 1], accumulate=True)
            self.shares.append(self.loss.last_rows / w_sum if w_sum > 0 else 0.0)
        if self.alpha > 0 and self.kind != "adamw":
            self._groups[0].weight_decay = self.alpha / w_sum if w_sum > 0 else 0.0  # no rows count: no penalty
        for g in self._groups:
            if self.kind in _ADAMS:
                g.eps = self._epsilon / math.sqrt(1.0 - self._beta2 ** (g.step_count + 1))
            g.step(guard=guard)

    def export(self) -> dict[str, Any]:
        """Host copies of the state (for pickling): lr, steps and each group's state_dict()."""
        return {"lr": self._lr, "step_count": self.step_count, "groups": [g.state_dict() for g in self._groups]}

    def restore(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`export` returned (the groups' step counts and buffers)."""
        self.step_count = int(state["step_count"])
        for g, sd in zip(self._groups, state["groups"], strict=True):
            g.load_state_dict(sd)
        self._lr = float(state["lr"])
        for g in self._groups:
            g.lr = self._lr


# -- the epoch loop's scikit-learn bookkeeping, as a gpubp callback --------------------------------


class _Loop(Callback):
    """scikit-learn's per-epoch logic inside ``Sequential.fit``: ``loss_``, ``loss_curve_``,
    ``t_``, ``n_iter_``, the learning-rate schedule, the stopping rule and early stopping."""

    def __init__(self, est: _BaseMLP, solver: _Solver, n: int, batch_size: int, validation: list[Any] | None) -> None:
        self.est, self.solver, self.n, self.validation = est, solver, n, validation
        self.steps = -(-n // batch_size)
        self.converged = False
        self.epochs = 0
        self._sum: Any = 0.0

    def on_epoch_begin(self, epoch: int) -> None:
        solver = self.solver
        solver.k = 0
        solver.shares = []
        if solver.alpha > 0 and solver.kind != "adamw":  # the L2 penalty is part of loss_
            solver.penalty_slots = self.run.model.arena.backend.full(self.steps, 0.0, np.float64)
        self._sum = 0.0

    def on_batch_end(self, step: int, logs: dict[str, Any]) -> None:
        self._sum = self._sum + logs["loss"] * logs["size"]  # stays on the device until the epoch ends

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        est, solver = self.est, self.solver
        data = float(self._sum) / est._loss_outputs
        penalty = 0.0
        if solver.penalty_slots is not None:
            squares = self.run.model.arena.backend.to_numpy(solver.penalty_slots)[: len(solver.shares)]
            penalty = 0.5 * solver.alpha * float(squares @ np.asarray(solver.shares))
        est.loss_ = (data + penalty) / self.n
        est.n_iter_ += 1
        est.t_ += self.n
        est.loss_curve_.append(est.loss_)
        self.epochs += 1
        if est.verbose:
            print(f"Iteration {est.n_iter_}, loss = {est.loss_:.8f}")
        est._update_no_improvement_count(self.validation)
        if est.solver not in _ADAMS and est.learning_rate == "invscaling":
            solver.lr = est.learning_rate_init / (est.t_ + 1) ** est.power_t
        if est._no_improvement_count > est.n_iter_no_change:
            what = "Validation score" if est.early_stopping else "Training loss"
            msg = (f"{what} did not improve more than tol={est.tol:f} for {est.n_iter_no_change} "
                   "consecutive epochs.")
            if est.solver in _ADAMS or est.learning_rate != "adaptive":
                self._stop(msg + " Stopping.")
            elif solver.lr <= 1e-6:
                self._stop(msg + " Learning rate too small. Stopping.")
            else:
                solver.lr = solver.lr / 5.0
                est._no_improvement_count = 0
                if est.verbose:
                    print(msg + f" Setting learning rate to {solver.lr:f}")

    def _stop(self, msg: str) -> None:
        if self.est.verbose:
            print(msg)
        self.converged = True
        self.run.stop("converged")


# -- the estimators ----------------------------------------------------------------------------


def _check_sample_weight(sample_weight: Any, n: int) -> np.ndarray | None:
    """None, or the weights as a float64 (n,) array: finite, >= 0, not all 0."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, numbers.Number) and not isinstance(sample_weight, bool):
        return np.full(n, float(sample_weight))
    try:
        w = np.array(sample_weight, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"sample_weight: expected an array-like of numbers, could not convert: {e}") from None
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"sample_weight: expected shape ({n},), one weight per sample, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("sample_weight: contains NaN or Inf")
    if (w < 0).any():
        raise ValueError(f"sample_weight: expected weights >= 0, got {w.min()}")
    if not w.sum() > 0:
        raise ValueError("sample_weight: all the weights are zero; at least one must be > 0")
    return w


def _real(v: Any, name: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    if not (v > lo if lo_open else v >= lo) or not (v < hi if hi_open else v <= hi) or math.isnan(v):
        raise ValueError(f"{name}: expected a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                         f"got {v!r}")


def _int(v: Any, name: str, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")


def _flag(v: Any, name: str) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(v).__name__}")


class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: parameters, the network, the solvers, pickling."""

    _out_kind = "identity"  # "multiclass" (softmax), "logistic" or "identity": set at the first fit

    def __init__(self, hidden_layer_sizes: Any = (100,), activation: str = "relu", *, solver: str = "adam",
                 alpha: float = 0.0001, batch_size: int | str = "auto", learning_rate: str = "constant",
                 learning_rate_init: float = 0.001, power_t: float = 0.5, max_iter: int = 200, shuffle: bool = True,
                 random_state: Any = None, tol: float = 1e-4, verbose: bool | int = False, warm_start: bool = False,
                 momentum: float = 0.9, nesterovs_momentum: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 n_iter_no_change: int | float = 10, max_fun: int = 15000, device: str = "cpu",
                 dtype: Any = None) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.device = device
        self.dtype = dtype

    # -- parameters ----------------------------------------------------------------------------

    def _hidden_sizes(self) -> list[int]:
        h = self.hidden_layer_sizes
        sizes = list(h) if hasattr(h, "__iter__") and not isinstance(h, str) else [h]
        for i, s in enumerate(sizes):
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise TypeError(f"hidden_layer_sizes: expected positive integers, got {s!r} at index {i}")
            if s < 1:
                raise ValueError(f"hidden_layer_sizes: expected positive integers, got {list(sizes)}")
        return [int(s) for s in sizes]

    def _check_params(self) -> None:
        """Raise ValueError / TypeError naming the first parameter out of its range."""
        self._hidden_sizes()
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {self.activation!r}")
        if not isinstance(self.solver, str) or self.solver not in SOLVERS:
            raise ValueError(f"solver: expected one of {', '.join(map(repr, SOLVERS))}, got {self.solver!r}")
        _real(self.alpha, "alpha", 0.0)
        if not (isinstance(self.batch_size, str) and self.batch_size == "auto"):
            if isinstance(self.batch_size, str):
                raise ValueError(f"batch_size: expected 'auto' or an integer >= 1, got {self.batch_size!r}")
            _int(self.batch_size, "batch_size", 1)
        if not isinstance(self.learning_rate, str) or self.learning_rate not in LEARNING_RATES:
            raise ValueError(f"learning_rate: expected one of {', '.join(map(repr, LEARNING_RATES))}, "
                             f"got {self.learning_rate!r}")
        _real(self.learning_rate_init, "learning_rate_init", 0.0, lo_open=True)
        _real(self.power_t, "power_t", 0.0)
        _int(self.max_iter, "max_iter", 1)
        _flag(self.shuffle, "shuffle")
        if not (self.random_state is None or isinstance(self.random_state, (numbers.Integral, np.random.RandomState))):
            raise TypeError(f"random_state: expected None, an integer or a numpy.random.RandomState, "
                            f"got {type(self.random_state).__name__}")
        _real(self.tol, "tol", 0.0)
        if not isinstance(self.verbose, (bool, np.bool_, numbers.Integral)):
            raise TypeError(f"verbose: expected a bool or an integer, got {type(self.verbose).__name__}")
        _flag(self.warm_start, "warm_start")
        _real(self.momentum, "momentum", 0.0, 1.0)
        _flag(self.nesterovs_momentum, "nesterovs_momentum")
        _flag(self.early_stopping, "early_stopping")
        _real(self.validation_fraction, "validation_fraction", 0.0, 1.0, hi_open=True)
        _real(self.beta_1, "beta_1", 0.0, 1.0, hi_open=True)
        _real(self.beta_2, "beta_2", 0.0, 1.0, hi_open=True)
        _real(self.epsilon, "epsilon", 0.0, lo_open=True)
        if not (isinstance(self.n_iter_no_change, float) and self.n_iter_no_change == math.inf):
            _int(self.n_iter_no_change, "n_iter_no_change", 1)
        _int(self.max_fun, "max_fun", 1)
        if not isinstance(self.device, str):
            raise TypeError(f"device: expected a string such as 'cpu', 'cuda', 'cuda:1' or 'auto', "
                            f"got {type(self.device).__name__}")
        if self.dtype is not None:
            try:
                name = np.dtype(self.dtype).name
            except TypeError:
                name = None
            if name not in ("float32", "float64"):
                raise ValueError(f"dtype: expected None, 'float32' or 'float64', got {self.dtype!r}")

    # -- the network ---------------------------------------------------------------------------

    def _initial_parameters(self, sizes: list[int], rs: np.random.RandomState) -> list[np.ndarray]:
        """scikit-learn's initialisation: per layer W (in, out) then b (out,), uniform in +-sqrt(f / (in + out))."""
        factor = 2.0 if ACTIVATIONS[self.activation] == "sigmoid" else 6.0
        out = []
        for fan_in, fan_out in pairwise(sizes):
            bound = np.sqrt(factor / (fan_in + fan_out))
            out.append(rs.uniform(-bound, bound, (fan_in, fan_out)))
            out.append(rs.uniform(-bound, bound, fan_out))
        return out

    def _build(self, sizes: list[int], dtype: np.dtype, initial: list[np.ndarray], seed: int) -> Sequential:
        act = ACTIVATIONS[self.activation]
        last = len(sizes) - 2
        layers = [Dense(a, b, None if i == last else act) for i, (a, b) in enumerate(pairwise(sizes))]
        model = Sequential(*layers, device=self.device, dtype=dtype, seed=seed)
        flat = np.concatenate([a.ravel() for a in initial]).astype(dtype)
        model.arena.backend.assign_(model.arena.data, flat)
        return model

    def _layer_params(self, kind: str) -> list[np.ndarray]:
        model = self.__dict__.get("_network")
        if model is None:
            raise AttributeError(f"{type(self).__name__} has no {kind} before fit")
        to_numpy = model.arena.backend.to_numpy
        return [to_numpy(getattr(layer, "weight" if kind == "coefs_" else "bias").data).copy()
                for layer in model.layers]

    def _set_layer_params(self, kind: str, values: Any) -> None:
        model = self.__dict__.get("_network")
        if model is None:
            raise AttributeError(f"{kind}: set it on a fitted {type(self).__name__}")
        values = list(values)
        if len(values) != len(model.layers):
            raise ValueError(f"{kind}: expected {len(model.layers)} arrays, one per layer, got {len(values)}")
        backend = model.arena.backend
        for i, (layer, v) in enumerate(zip(model.layers, values, strict=True)):
            p = layer.weight if kind == "coefs_" else layer.bias
            a = np.asarray(v, dtype=model.dtype)
            if a.shape != p.shape:
                raise ValueError(f"{kind}[{i}]: expected shape {p.shape}, got {a.shape}")
            backend.assign_(model.arena.data[p.offset : p.offset + p.size], a.ravel())

    @property
    def coefs_(self) -> list[np.ndarray]:
        """Weights per layer, ``coefs_[i]`` of shape (units of layer i, units of layer i + 1): host
        copies (assign a list to set them; changing a returned array changes nothing)."""
        return self._layer_params("coefs_")

    @coefs_.setter
    def coefs_(self, values: Any) -> None:
        self._set_layer_params("coefs_", values)

    @property
    def intercepts_(self) -> list[np.ndarray]:
        """Biases per layer, ``intercepts_[i]`` of shape (units of layer i + 1,): host copies."""
        return self._layer_params("intercepts_")

    @intercepts_.setter
    def intercepts_(self, values: Any) -> None:
        self._set_layer_params("intercepts_", values)

    @property
    def device_(self) -> str:
        """The device the fitted network is on (``"cpu"``, ``"cuda:0"``, ...)."""
        model = self.__dict__.get("_network")
        if model is None:
            raise AttributeError(f"{type(self).__name__} has no device_ before fit")
        return str(model.device)

    def to(self, device: str) -> _BaseMLP:
        """Move the fitted network (and the solver's state, for ``partial_fit``) to ``device``; returns self.

        The ``device`` parameter is left as it is: the next ``fit`` without ``warm_start``
        builds its network there.
        """
        check_is_fitted(self)
        solver = self.__dict__.get("_solver")
        saved = solver.export() if solver is not None else None
        self._network.to(device)
        if saved is not None:
            self._solver = self._new_solver()
            self._solver.restore(saved)
        return self

    # -- fitting -------------------------------------------------------------------------------

    def _new_solver(self) -> _Solver:
        kind = self.solver
        if kind == "sgd":
            hp: dict[str, Any] = {"momentum": float(self.momentum),
                                  "nesterov": bool(self.nesterovs_momentum) and self.momentum > 0}
        elif kind in _ADAMS:
            hp = {"betas": (float(self.beta_1), float(self.beta_2)), "eps": float(self.epsilon)}
        else:
            hp = {"eps": float(self.epsilon)}
        return _Solver(self._network, kind, float(self.learning_rate_init), hp, float(self.alpha), self._loss())

    def _fit(self, X: Any, y: Any, sample_weight: Any, incremental: bool) -> _BaseMLP:
        self._check_params()
        hidden = self._hidden_sizes()
        if self.solver == "lbfgs" and incremental:
            raise AttributeError("partial_fit: only for the stochastic solvers; solver='lbfgs' is not one")
        first_pass = self.__dict__.get("_network") is None or (not self.warm_start and not incremental)
        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        n, n_features = X.shape
        sw = _check_sample_weight(sample_weight, n)
        dtype = np.dtype(self.dtype or X.dtype) if first_pass else self._dtype
        Y = self._targets(y, dtype)
        self._random_state = check_random_state(self.random_state)
        sizes = [n_features, *hidden, Y.shape[1] if Y.ndim == 2 else len(self.classes_)]
        if first_pass:
            self._initialize(sizes, dtype)
        else:
            self._check_architecture(sizes)
        X = np.ascontiguousarray(X, dtype=dtype)
        if self.solver == "lbfgs":
            self._fit_lbfgs(X, Y, sw)
        else:
            self._fit_stochastic(X, Y, sw, incremental)
        return self

    def _initialize(self, sizes: list[int], dtype: np.dtype) -> None:
        self.n_iter_ = 0
        self.t_ = 0
        self.n_layers_ = len(sizes)
        self.n_outputs_ = sizes[-1]
        self.out_activation_ = {"multiclass": "softmax", "logistic": "logistic", "identity": "identity"}[self._out_kind]
        self._dtype = dtype
        self._initial = self._initial_parameters(sizes, self._random_state)
        self._network = None  # built once the validation split has drawn from random_state
        self._sizes = sizes
        self._solver = None
        self._best_parameters = None
        if self.solver in _STOCHASTIC:
            self.loss_curve_: list[float] = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_: list[float] | None = []
                self.best_validation_score_: float | None = -np.inf
                self.best_loss_: float | None = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    def _ensure_network(self) -> Sequential:
        if self._network is None:
            seed = int(self._random_state.randint(np.iinfo(np.int32).max))
            self._network = self._build(self._sizes, self._dtype, self._initial, seed)
            self._initial = None
        return self._network

    def _check_architecture(self, sizes: list[int]) -> None:
        if sizes != self._sizes:
            raise ValueError(f"hidden_layer_sizes: warm_start / partial_fit need the layer sizes the network has "
                             f"({self._sizes}), got {sizes}; set warm_start=False to train a new network")

    def _fit_lbfgs(self, X: np.ndarray, Y: np.ndarray, sw: np.ndarray | None) -> None:
        model = self._ensure_network()
        backend = model.arena.backend
        xd = backend.asarray(X, model.dtype)
        w_sum = float(X.shape[0] if sw is None else sw.sum())
        kind = self._out_kind
        weights = [(layer.weight.offset, layer.weight.size) for layer in model.layers]
        alpha = float(self.alpha)
        last = [0.0]

        def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            backend.assign_(model.arena.data, theta.astype(model.dtype))
            z = backend.to_numpy(model.forward(xd, training=True)).astype(np.float64)
            value, dz = _host_loss(kind, z, Y, sw, w_sum)
            model.backward(dz.astype(model.dtype))
            grad = backend.to_numpy(model.arena.grad).astype(np.float64)
            squares = 0.0
            for off, size in weights:
                wv = theta[off : off + size]
                squares += float(wv @ wv)
                grad[off : off + size] += (alpha / w_sum) * wv
            last[0] = value
            return value + 0.5 * alpha * squares / w_sum, grad

        theta0 = backend.to_numpy(model.arena.data).astype(np.float64)
        res = scipy.optimize.minimize(loss_and_grad, theta0, method="L-BFGS-B", jac=True,
                                      options={"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol})
        backend.assign_(model.arena.data, np.asarray(res.x).astype(model.dtype))
        self.n_iter_ = int(res.nit)
        self.loss_ = float(res.fun)
        if self._loss_outputs > 1:  # loss_ averages the squared error over the outputs, as scikit-learn's
            objective = loss_and_grad(np.asarray(res.x, dtype=np.float64))[0]
            self.loss_ = objective - last[0] + last[0] / self._loss_outputs
        if self.verbose:
            print(f"L-BFGS-B: {res.message} after {res.nit} iterations, loss = {self.loss_:.8f}")
        if res.status != 0:
            msg = res.message.decode("latin1") if isinstance(res.message, bytes) else str(res.message)
            warnings.warn(f"lbfgs failed to converge after {res.nit} iteration(s) (status={res.status}):\n{msg}.\n\n"
                          "Increase the number of iterations to improve the convergence "
                          f"(max_iter={self.max_iter}).", ConvergenceWarning, stacklevel=3)

    @property
    def _loss_outputs(self) -> int:
        """What ``loss_`` divides the summed per-sample loss by: the outputs for regression, else 1."""
        return self.n_outputs_ if self._out_kind == "identity" else 1

    def _loss(self) -> _Recording:
        if self._out_kind == "multiclass":
            return _CrossEntropy()
        if self._out_kind == "logistic":
            return _RowMeanBCE()
        return _HalfSquaredError()

    def _fit_stochastic(self, X: np.ndarray, Y: np.ndarray, sw: np.ndarray | None, incremental: bool) -> None:
        if self.early_stopping and incremental:
            raise ValueError("early_stopping: partial_fit does not support early_stopping=True")
        validation = None
        if self.early_stopping:
            # scikit-learn stratifies a classifier's split when it has one output (binary problems)
            stratify = Y if isinstance(self, ClassifierMixin) and self.n_outputs_ == 1 else None
            parts = train_test_split(X, Y, *(() if sw is None else (sw,)), random_state=self._random_state,
                                     test_size=self.validation_fraction, stratify=stratify)
            X, X_val, Y, Y_val = parts[:4]
            sw, sw_val = (None, None) if sw is None else (parts[4], parts[5])
            if X_val.shape[0] < 2:
                raise ValueError("validation_fraction: the validation set is too small (fewer than 2 samples); "
                                 "increase validation_fraction or the size of the data")
            validation = [X_val, self._decode(Y_val), sw_val]
        model = self._ensure_network()
        if validation is not None:  # scored after every epoch: copied to the device once
            validation[0] = model.arena.backend.asarray(validation[0], model.dtype)
        if not incremental or self._solver is None:
            self._solver = self._new_solver()
        n = X.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped",
                              stacklevel=3)
            batch_size = int(np.clip(self.batch_size, 1, n))
        loop = _Loop(self, self._solver, n, batch_size, validation)
        xd = model.arena.backend.asarray(X, model.dtype)
        self.n_iter_ = 0
        epochs = 1 if incremental else int(self.max_iter)
        try:
            history = model.fit(xd, Y, self._solver.loss, self._solver, epochs=epochs, batch_size=batch_size,
                                shuffle=bool(self.shuffle), verbose=0, callbacks=[loop], sample_weight=sw)
        except NonFiniteError as e:
            raise ValueError("Solver produced non-finite parameter weights. The input data may contain large values "
                             f"and need to be preprocessed ({e})") from e
        if history.get("stopped") == "interrupted":
            model.load_progress(None)
            warnings.warn("Training interrupted by user.", stacklevel=3)
        elif not incremental and not loop.converged and loop.epochs == self.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the optimization "
                          "hasn't converged yet.", ConvergenceWarning, stacklevel=3)
        if self.early_stopping and self._best_parameters is not None:  # kept across warm starts, as scikit-learn's
            model.arena.backend.assign_(model.arena.data, self._best_parameters)

    def _update_no_improvement_count(self, validation: list[Any] | None) -> None:
        """scikit-learn's stopping bookkeeping after an epoch (and the best parameters, early stopping)."""
        if validation is not None:
            X_val, y_val, sw_val = validation
            score = self._score(X_val, y_val, sw_val)
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}")
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                model = self._network
                self._best_parameters = model.arena.backend.to_numpy(model.arena.data).copy()
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> _BaseMLP:
        """Train on X (n_samples, n_features) and y; returns self.

        ``y``: class labels (n_samples,) of any type, or a 0/1 indicator matrix (n_samples,
        n_labels) for multi-label classification; targets (n_samples,) or (n_samples,
        n_outputs) for regression. ``sample_weight`` (n_samples,): weights >= 0; each batch's
        loss is sum_i w_i l_i / sum_i w_i, and the L2 penalty of a batch divides by its sum
        of weights, as scikit-learn's. A new network unless ``warm_start`` (then training
        continues, with a new solver state, as scikit-learn's).
        """
        return self._fit(X, y, sample_weight, incremental=False)

    def _check_solver(self) -> bool:
        if self.solver not in _STOCHASTIC:
            raise AttributeError(f"partial_fit is only available for stochastic optimizers. {self.solver} is not "
                                 "stochastic.")
        return True

    # -- prediction ----------------------------------------------------------------------------

    def _logits(self, X: Any, check_input: bool = True) -> np.ndarray:
        """The network's output (n_samples, n_outputs) on the host, in the network's dtype."""
        check_is_fitted(self)
        if check_input:
            X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        model = self._network
        if not model.arena.backend.is_device_array(X):
            X = np.ascontiguousarray(X, dtype=model.dtype)
        return model.predict(X, batch_size=_PREDICT_BATCH, check_finite=False)

    def _score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        y_pred = self._predict(X, check_input=False)
        if np.issubdtype(np.asarray(y_pred).dtype, np.floating) and not np.isfinite(y_pred).all():
            return np.nan
        return float(self._score_function(y, y_pred, sample_weight=sample_weight))

    # -- pickling ------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # object.__getstate__ returns __dict__ itself: copy it
        model = state.get("_network")
        if model is not None:
            state["_network"] = {"config": model.config(), "epoch": model.epoch, "device": str(model.device),
                                 "parameters": model.arena.backend.to_numpy(model.arena.data).copy()}
        solver = state.get("_solver")
        if solver is not None:
            state["_solver"] = solver.export()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        network, solver = state.get("_network"), state.get("_solver")
        state = dict(state, _network=None, _solver=None)
        super().__setstate__(state)
        if network is not None:
            self._network = _restore_network(network)
        if solver is not None and self._network is not None:
            self._solver = self._new_solver()
            self._solver.restore(solver)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.input_tags.allow_nan = False
        return tags


def _restore_network(saved: dict[str, Any]) -> Sequential:
    """The pickled network on its device, or on the CPU (DeviceFallbackWarning) when this machine cannot use it."""
    device = saved["device"]
    try:
        model = Sequential.from_config(saved["config"], device=device, initialise=False)
    except (RuntimeError, ImportError, OSError) as e:
        warnings.warn(f"gpubp.sklearn: the network was fitted on {device!r}, which this machine cannot use ({e}); "
                      "it is loaded on the CPU", DeviceFallbackWarning, stacklevel=3)
        model = Sequential.from_config(saved["config"], device="cpu", initialise=False)
    model.arena.backend.assign_(model.arena.data, np.asarray(saved["parameters"], dtype=model.dtype))
    model.epoch = int(saved["epoch"])
    return model


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


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor trained by gpubp: scikit-learn's MLPRegressor, on any gpubp device.

    Parameters are scikit-learn's (``loss="squared_error"``, the only loss; scikit-learn's
    ``"poisson"`` is refused) plus ``device`` and ``dtype``, as for :class:`MLPClassifier`.
    The output layer is the identity; y (n_samples,) or (n_samples, n_outputs). Attributes
    as :class:`MLPClassifier`'s, without ``classes_``; ``out_activation_`` is "identity".
    """

    def __init__(self, loss: str = "squared_error", hidden_layer_sizes: Any = (100,), activation: str = "relu", *,
                 solver: str = "adam", alpha: float = 0.0001, batch_size: int | str = "auto",
                 learning_rate: str = "constant", learning_rate_init: float = 0.001, power_t: float = 0.5,
                 max_iter: int = 200, shuffle: bool = True, random_state: Any = None, tol: float = 1e-4,
                 verbose: bool | int = False, warm_start: bool = False, momentum: float = 0.9,
                 nesterovs_momentum: bool = True, early_stopping: bool = False, validation_fraction: float = 0.1,
                 beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 n_iter_no_change: int | float = 10, max_fun: int = 15000, device: str = "cpu",
                 dtype: Any = None) -> None:
        super().__init__(hidden_layer_sizes=hidden_layer_sizes, activation=activation, solver=solver, alpha=alpha,
                         batch_size=batch_size, learning_rate=learning_rate, learning_rate_init=learning_rate_init,
                         power_t=power_t, max_iter=max_iter, shuffle=shuffle, random_state=random_state, tol=tol,
                         verbose=verbose, warm_start=warm_start, momentum=momentum,
                         nesterovs_momentum=nesterovs_momentum, early_stopping=early_stopping,
                         validation_fraction=validation_fraction, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         n_iter_no_change=n_iter_no_change, max_fun=max_fun, device=device, dtype=dtype)
        self.loss = loss

    def _check_params(self) -> None:
        if self.loss != "squared_error":
            raise ValueError(f"loss: expected 'squared_error' (gpubp has no Poisson loss; use "
                             f"sklearn.neural_network.MLPRegressor(loss='poisson')), got {self.loss!r}")
        super()._check_params()

    def _validate_input(self, X: Any, y: Any, incremental: bool, reset: bool) -> tuple[np.ndarray, np.ndarray]:
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=(np.float64, np.float32),
                             reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y

    def _targets(self, y: np.ndarray, dtype: np.dtype) -> np.ndarray:
        return np.ascontiguousarray(y.reshape(y.shape[0], -1), dtype=dtype)

    def _decode(self, Y: np.ndarray) -> np.ndarray:
        return Y.ravel() if Y.shape[1] == 1 else Y

    _score_function = staticmethod(r2_score)

    def _predict(self, X: Any, check_input: bool = True) -> np.ndarray:
        z = self._logits(X, check_input)
        return z.ravel() if z.shape[1] == 1 else z

    def predict(self, X: Any) -> np.ndarray:
        """Predictions (n_samples,), or (n_samples, n_outputs) for several outputs."""
        check_is_fitted(self)
        return self._predict(X)

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPRegressor:
        """One epoch over (X, y), continuing from the current network (a new one on the first call)."""
        return self._fit(X, y, sample_weight, incremental=True)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
