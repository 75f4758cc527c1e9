"""The solvers of :mod:`gpubp.sklearn`'s estimators: the recording losses, the host loss of the
L-BFGS solver, :class:`_Solver` (one scikit-learn optimizer step as a gpubp optimizer) and
:class:`_Loop` (scikit-learn's per-epoch bookkeeping as a gpubp callback)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import expit, log_expit

from gpubp import activations as activations_mod
from gpubp import losses as losses_mod
from gpubp import optim as optim_mod
from gpubp._validate import real
from gpubp.callbacks import Callback
from gpubp.model import Sequential

#: scikit-learn's activation names and gpubp's, each to gpubp's name.
ACTIVATIONS: dict[str, str] = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu",
                               **{name: name for name in activations_mod.NAMES}}
#: Solvers: scikit-learn's ("lbfgs", "sgd", "adam") and gpubp's other optimizers.
SOLVERS = ("adam", "sgd", "lbfgs", "adamw", "rmsprop", "adagrad")
_STOCHASTIC = ("adam", "sgd", "adamw", "rmsprop", "adagrad")
_ADAMS = ("adam", "adamw")
LEARNING_RATES = ("constant", "invscaling", "adaptive")


# -- losses -------------------------------------------------------------------------------------


class _Recording:
    """Mixin for a Loss: remembers the rows and the weight total of the batch it last computed, which
    the solver's L2 penalty of that batch divides by (``Sequential.fit`` computes the loss of a batch
    before the optimizer steps on it)."""

    last_rows = 0
    last_total: float | None = None  # the batch's sum of sample weights; None without weights

    def compute(self, pred: Any, target: Any, backend: Any, weight: Any = None,
                weight_total: float | None = None, rows: int | None = None) -> tuple[Any, Any]:
        # rows: the whole batch's rows when pred holds a part of it (a micro-batch, a rank's share)
        self.last_rows, self.last_total = int(pred.shape[0] if rows is None else rows), weight_total
        return super().compute(pred, target, backend, weight, weight_total, rows)  # type: ignore[misc]

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

    def __init__(self, est: Any, solver: _Solver, n: int, batch_size: int, validation: list[Any] | None) -> None:
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

