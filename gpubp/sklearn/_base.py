"""What :mod:`gpubp.sklearn`'s MLPClassifier and MLPRegressor share: parameter checks, the network,
fitting with either solver, prediction's forward pass and pickling (:class:`_BaseMLP`)."""

from __future__ import annotations

import math
import numbers
import warnings
from itertools import pairwise
from typing import Any

import numpy as np
import scipy.optimize
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from gpubp.diagnostics import NonFiniteError
from gpubp.layers import Dense
from gpubp.model import Sequential
from gpubp.sklearn._solver import (
    _ADAMS,
    _STOCHASTIC,
    ACTIVATIONS,
    LEARNING_RATES,
    SOLVERS,
    _CrossEntropy,
    _HalfSquaredError,
    _host_loss,
    _Loop,
    _Recording,
    _RowMeanBCE,
    _Solver,
)

_PREDICT_BATCH = 65536  # rows per forward pass in predict (bounds the device memory it takes)


class DeviceFallbackWarning(UserWarning):
    """An unpickled estimator's network was fitted on a device this machine cannot use; it is on the CPU."""


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
