"""What ``fit(..., comm=comm)`` does differently: data parallelism over a communicator, as the
:class:`~gpubp.train_step.Strategy` of fit's training step.

Every rank holds the whole model and the same data (or data of the same length); the
global batch ``rows`` (drawn from the same shuffled order on every rank) is split by rank:
rank r takes rows [r B // P, (r + 1) B // P) of a batch of B rows over P ranks, so the
split is fixed and a batch smaller than P leaves some ranks without rows.

Weighting: each rank computes its loss and gradients with the scale of the *global*
batch (1 / (B x per-row count) for reduction="mean"), so the sum over ranks of the
local gradients is the gradient of the whole batch, however unevenly the rows fall. With
row weights (sample_weight, class_weight) the scale is 1 / (per-row count x W), W the weight
of the whole global batch: each rank's share is its share of the global weight sum. Every
rank computes W itself, with math.fsum over the global batch's rows of its own weights, so
fit checks (with the other settings) that every rank was given the same weights; the
gradient arena is then summed across ranks (one fixed-order all-reduce) and every rank
takes the same optimizer step. Dropout masks are those of the whole batch: rank r's rows
start at row r B // P of it.

Gradient buckets (``comm.bucket_bytes``): the arena is cut, from its end, into buckets of
whole layers of at least ``bucket_bytes`` each. Layers are carved in order, so the last
layers' gradients are the arena's tail, which backward writes first: once backward has
written every layer of a bucket, that bucket's all-reduce starts (``start_allreduce_``)
while backward goes on with the earlier layers, and the step waits for all of them before
the guard and the optimizer. Bucket k starts after the backward of its first layer and
before the backward of the layer before it. The sum of each element is the same as one
all-reduce of the whole arena on the MPI path (see :mod:`gpubp.distributed.comm`).

With ``accumulate=k`` each micro-batch of the step's big batch is split the same way (rank r's
rows of micro-batch j start at row j b + r m // P of the big batch, m the micro-batch's rows),
each rank adds its micro-batches' gradients, and the reduction runs once per optimizer step: the
buckets start during the backward of the last micro-batch only (see :mod:`gpubp.train_step`).

The non-finite guard reads the reduced gradients only (the same bits on every rank), so
all ranks take the same decision; metrics are summed across ranks once per epoch, and
the progress value and Ctrl-C are agreed every ``READ_EVERY`` steps and at each epoch's end.
A fit that stops inside an epoch gathers every rank's running sums into the model's
position (``model.progress()``), so that a checkpoint of it resumes on a world of the same
size bit for bit (on another size: to rounding, as any change of world size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubp.distributed.comm import Communicator, Pending, check_bucket_bytes
from gpubp.train_step import Strategy

# bucket_bytes when the communicator's is None: DDP's 25 MiB where the all-reduce runs beside
# the compute (NCCL: a stream of its own); none on MPI, whose progress shares the CPU with
# backward (see README, "Data-parallel training").
DEFAULT_BUCKET_BYTES = {"nccl": 25 << 20, "mpi": 0, "single": 0}


@dataclass(frozen=True)
class Bucket:
    """Gradients ``[start, stop)`` of the arena: the whole parameters of layers ``first_layer`` .. ``last_layer``."""

    start: int
    stop: int
    first_layer: int
    last_layer: int


def plan_buckets(model: Any, bucket_bytes: Any) -> list[Bucket]:
    """The arena cut from its end into buckets of whole layers of at least ``bucket_bytes``
    (the first bucket of the arena may be smaller), in the order backward completes them;
    ``[]`` for ``bucket_bytes`` 0 (one all-reduce after backward)."""
    bucket_bytes = check_bucket_bytes(bucket_bytes)
    if not bucket_bytes:
        return []
    itemsize = model.dtype.itemsize
    spans = []  # (layer, start, stop) of every layer with parameters
    for i, layer in enumerate(model.layers):
        params = layer.parameters()
        if params:
            lo = min(p.offset for p in params)
            hi = max(p.offset + p.size for p in params)
            if hi - lo != sum(p.size for p in params):
                raise AssertionError(f"layer {i}: its parameters are not adjacent in the arena")
            spans.append((i, lo, hi))
    buckets: list[Bucket] = []
    cur: list[tuple[int, int, int]] = []
    for span in reversed(spans):
        if cur and cur[-1][1] != span[2]:
            raise AssertionError(f"layer {span[0]}: its parameters do not end where layer {cur[-1][0]}'s begin")
        cur.append(span)
        if (cur[0][2] - span[1]) * itemsize >= bucket_bytes:
            buckets.append(Bucket(span[1], cur[0][2], span[0], cur[0][0]))
            cur = []
    if cur:
        buckets.append(Bucket(cur[-1][1], cur[0][2], cur[-1][0], cur[0][0]))
    return buckets


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
    hp = dict(optimizer.state_dict()["meta"])
    for key in ("lr", "step", "param_names"):  # broadcast from rank 0 (a schedule or a checkpoint may have set lr)
        hp.pop(key, None)
    return {
        "model architecture": model.config()["layers"],
        "model dtype": model.dtype.name,
        "model seed": model.seed,
        "number of parameters": model.num_parameters,
        "loss": loss.config(),
        "optimizer": [type(optimizer).__name__, hp],
        **settings,
    }


class DataParallel(Strategy):
    """The distributed strategy of one fit's :class:`~gpubp.train_step.TrainStep`: agreement at the
    start, then the per-step and per-epoch hooks of :class:`~gpubp.train_step.Strategy`."""

    def __init__(self, comm: Communicator, model: Any, optimizer: Any, loss: Any, settings: dict[str, Any]) -> None:
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self._interrupted = False
        self._check_agreement(_describe(model, optimizer, loss, settings))
        self._broadcast_state(model, optimizer)
        backend = model.arena.backend
        self.finite_value = backend.zeros((), np.float64)  # the guard's loss value: see the module docstring
        size = comm.bucket_bytes if comm.bucket_bytes is not None else DEFAULT_BUCKET_BYTES.get(comm.backend, 0)
        self.buckets = plan_buckets(model, size)
        self._grad = model.arena.grad
        self._pending: list[Pending] = []

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
        """Rank 0's parameters, optimizer state, step count, learning rate, epoch and position
        inside the epoch (``model.progress()``), on every rank."""
        comm = self.comm
        comm.broadcast_(model.arena.data, 0)
        sd = optimizer.state_dict()  # host copies of the state, once per fit
        for name in sorted(sd["state"]):
            comm.broadcast_(sd["state"][name], 0)
        meta, lr, model.epoch, progress = comm.bcast((sd["meta"], optimizer.lr, model.epoch, model.progress()), 0)
        optimizer.load_state_dict({"meta": meta, "state": sd["state"]})  # rank 0's state and step count
        optimizer.lr = lr
        model.load_progress(progress)

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

    def after_layer(self, i: int) -> None:  # type: ignore[override]
        """Called after layer ``i``'s backward: start the all-reduce of every bucket it completed."""
        if not self.buckets:
            return
        while len(self._pending) < len(self.buckets) and self.buckets[len(self._pending)].first_layer >= i:
            if not self._pending:
                self.comm.before_buckets()
            b = self.buckets[len(self._pending)]
            self._pending.append(self.comm.start_allreduce_(self._grad[b.start:b.stop], op="sum"))
        for p in self._pending:  # let MPI move the ones in flight along
            p.test()

    def reduce_gradients(self, grad: Any) -> None:
        """Sum the gradient arena across ranks (each rank's part already carries the global scale):
        one all-reduce, or the buckets not started yet, then wait for every bucket."""
        if not self.buckets:
            self.comm.allreduce_(grad, op="sum")
            return
        self.after_layer(-1)  # a rank without rows, or layers without a hook: start the rest now
        pending, self._pending = self._pending, []
        for p in pending:
            p.wait()

    def guard_value(self, value: Any) -> Any:
        """The guard reads the reduced gradients only (a rank's loss is its own): a zero."""
        return self.finite_value

    def sync(self, value: Any, hit: bool) -> float:
        """Every READ_EVERY steps: the batch loss summed across ranks, and Ctrl-C on any rank."""
        both = np.array([float(value), 1.0 if hit else 0.0])
        self.comm.allreduce_(both, op="sum")
        self._interrupted = self._interrupted or both[1] > 0
        return float(both[0])

    def interrupted(self, hit: bool) -> bool:
        """Ctrl-C as agreed at the last sync or epoch end (every rank stops at the same step)."""
        return self._interrupted

    # -- per epoch ----------------------------------------------------------------------

    def sums(self, *values: Any) -> list[float]:
        """Each value (host or device scalars) summed across ranks, in float64."""
        arr = np.array([float(v) for v in values], dtype=np.float64)
        return [float(v) for v in self.comm.allreduce_(arr, op="sum")]

    def gather_sums(self, total: Any, correct: Any, counted: Any, weighted: bool = False) -> list[list[Any]]:
        """Every rank's running epoch sums ``[loss_sum, correct, counted]``, in rank order (fit stopping
        inside an epoch keeps them, so that a checkpoint resumes each rank's own sums); correct and
        counted are sums of weights (floats) when ``weighted``."""
        count = float if weighted else int
        return [list(r) for r in self.comm.allgather((float(total), count(correct), count(counted)))]

    def agree(self, run: Any, optimizer: Any, hit: bool = False) -> None:
        """After the epoch's callbacks: rank 0's stop decision and learning rate on every rank, and
        whether any rank saw Ctrl-C (``hit``) since the last agreement (one all-gather)."""
        everyone = self.comm.allgather((run.stop_reason, optimizer.lr, bool(hit)))
        run.stop_reason, optimizer.lr = everyone[0][0], everyone[0][1]
        self._interrupted = self._interrupted or any(h for _, _, h in everyone)

    def where(self, text: str) -> str:
        """Where each rank's replay of a diverged step found NaN/Inf, in one line."""
        found = self.comm.allgather(text)
        bad = [f"on rank {r}: {t}" for r, t in enumerate(found) if not t.startswith("no ")]
        return "; ".join(bad) if bad else f"no NaN or Inf on replay on any of the {self.size} ranks"
