"""What ``fit(..., comm=comm)`` does differently: data parallelism over a communicator.

Every rank holds the whole model and the same data (or data of the same length); the
global batch ``rows`` (drawn from the same shuffled order on every rank) is split by rank:
rank r takes rows [r B // P, (r + 1) B // P) of a batch of B rows over P ranks, so the
split is fixed and a batch smaller than P leaves some ranks without rows.

Weighting: each rank computes its loss and gradients with the scale of the *global*
batch (1 / (B x per-row count) for reduction="mean"), so the sum over ranks of the
local gradients is the gradient of the whole batch, however unevenly the rows fall; the
gradient arena is then summed across ranks (one fixed-order all-reduce) and every rank
takes the same optimizer step. Dropout masks are those of the whole batch: rank r's rows
start at row r B // P of it.

The non-finite guard reads the reduced gradients only (the same bits on every rank), so
all ranks take the same decision; metrics are summed across ranks once per epoch, and
the progress value and Ctrl-C are agreed every ``READ_EVERY`` steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubp.distributed.comm import Communicator


def resolve(comm: Any) -> Communicator | None:
    """``comm`` checked: None, or a Communicator (its world of one is treated as None)."""
    if comm is None:
        return None
    if not isinstance(comm, Communicator):
        raise TypeError(f"comm: expected a communicator from gpubp.distributed.init(), got {type(comm).__name__}")
    if comm.broken:
        raise ValueError(f"comm: this communicator can no longer be used ({comm.broken}); start a new run")
    return comm if comm.size > 1 else None


def _describe(model: Any, optimizer: Any, loss: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """What every rank must agree on before training (rank 0's values win for the parameters)."""
    hp = optimizer._hparams()
    hp.pop("lr", None)  # broadcast from rank 0 (a schedule or a checkpoint may have set it)
    return {
        "model architecture": model.config()["layers"],
        "model dtype": model.dtype.name,
        "model seed": model.seed,
        "number of parameters": model.num_parameters,
        "loss": loss.config(),
        "optimizer": [type(optimizer).__name__, hp],
        **settings,
    }


class DataParallel:
    """The distributed side of one fit: agreement at the start, then per-step and per-epoch hooks."""

    def __init__(self, comm: Communicator, model: Any, optimizer: Any, loss: Any, settings: dict[str, Any]) -> None:
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.interrupted = False
        self._check_agreement(_describe(model, optimizer, loss, settings))
        self._broadcast_state(model, optimizer)
        backend = model.arena.backend
        self.finite_value = backend.zeros((), np.float64)  # the guard's loss value: see the module docstring

    def _check_agreement(self, mine: dict[str, Any]) -> None:
        everyone = self.comm.allgather(mine)
        for r, theirs in enumerate(everyone[1:], start=1):
            for key, want in everyone[0].items():
                got = theirs.get(key)
                if got != want:
                    err = ValueError(f"comm: rank {r} disagrees with rank 0 on the {key}: {got!r} != {want!r}; "
                                     "every rank must build the same model and pass data of the same length "
                                     "and the same fit arguments")
                    err.all_ranks = True  # every rank raises it: nobody needs telling
                    raise err

    def _broadcast_state(self, model: Any, optimizer: Any) -> None:
        """Rank 0's parameters, optimizer state, step count, learning rate and epoch, on every rank."""
        comm = self.comm
        comm.broadcast_(model.arena.data, 0)
        for state in optimizer._state:
            for name in sorted(state):
                comm.broadcast_(state[name], 0)
        optimizer.step_count, optimizer.lr, model.epoch = comm.bcast(
            (optimizer.step_count, optimizer.lr, model.epoch), 0)

    # -- per step -----------------------------------------------------------------------

    def split(self, rows: Any, n: int) -> tuple[Any, int, int]:
        """``(this rank's rows, their first row in the batch, rows in the global batch)``.

        ``rows``: the global batch, a slice of [0, n) or a host int64 index array."""
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(n)
            nb = max(stop - start, 0)
            lo, hi = self.rank * nb // self.size, (self.rank + 1) * nb // self.size
            return slice(start + lo, start + hi), lo, nb
        nb = len(rows)
        lo, hi = self.rank * nb // self.size, (self.rank + 1) * nb // self.size
        return rows[lo:hi], lo, nb

    @staticmethod
    def loss(loss: Any, out: Any, yb: Any, nb: int, backend: Any) -> tuple[Any, Any]:
        """Value and gradient of this rank's rows, scaled as rows of the global batch of ``nb`` rows."""
        if loss.reduction == "mean":
            scale = 1.0 / (loss._count(out) // out.shape[0] * nb)  # the same float as one process's 1 / count
        else:
            scale = 1.0
        return loss._value_and_grad(backend, out, yb, scale)

    def reduce_gradients(self, model: Any) -> None:
        """Sum the gradient arena across ranks (each rank's part already carries the global scale)."""
        self.comm.allreduce_(model.arena.grad, op="sum")

    def sync(self, value: Any, hit: bool) -> float:
        """Every READ_EVERY steps: the batch loss summed across ranks, and Ctrl-C on any rank."""
        both = np.array([float(value), 1.0 if hit else 0.0])
        self.comm.allreduce_(both, op="sum")
        self.interrupted = self.interrupted or both[1] > 0
        return float(both[0])

    # -- per epoch ----------------------------------------------------------------------

    def sums(self, *values: Any) -> list[float]:
        """Each value (host or device scalars) summed across ranks, in float64."""
        arr = np.array([float(v) for v in values], dtype=np.float64)
        return [float(v) for v in self.comm.allreduce_(arr, op="sum")]

    def agree(self, run: Any, optimizer: Any) -> None:
        """After the epoch's callbacks: rank 0's stop decision and learning rate on every rank."""
        run.stop_reason, optimizer.lr = self.comm.bcast((run.stop_reason, optimizer.lr), 0)

    def runs_here(self, callback: Any) -> bool:
        """Whether ``callback`` runs on this rank: the file writers (ModelCheckpoint, CSVLogger, and any
        callback with ``rank_zero_only = True``) run on rank 0 only, the others on every rank."""
        if self.rank == 0:
            return True
        from gpubp.callbacks import CSVLogger, ModelCheckpoint

        zero_only = getattr(callback, "rank_zero_only", None)
        if zero_only is None:
            zero_only = isinstance(callback, (ModelCheckpoint, CSVLogger))
        return not zero_only

    def where(self, text: str) -> str:
        """Where each rank's replay of a diverged step found NaN/Inf, in one line."""
        found = self.comm.allgather(text)
        bad = [f"on rank {r}: {t}" for r, t in enumerate(found) if not t.startswith("no ")]
        return "; ".join(bad) if bad else f"no NaN or Inf on replay on any of the {self.size} ranks"
