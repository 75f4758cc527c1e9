"""Where training stands inside an epoch (:class:`EpochProgress`), and how a fit resumes there.

``model.progress()`` is an EpochProgress's JSON form, which checkpoints store; the next fit
takes the rest of that epoch first (see :mod:`gpubp.training`, "Mid-epoch resume").
"""

from __future__ import annotations

import math
from typing import Any

from gpubp._validate import int_in

_NONFINITE = ("nan", "inf", "-inf")  # how a loss sum that is not finite (on_nonfinite="ignore") is written


def _json_float(v: Any) -> float | str:
    """A float for JSON, whose readers may refuse NaN and Inf: those as "nan", "inf", "-inf"."""
    f = float(v)
    return f if math.isfinite(f) else repr(f)


class EpochProgress:
    """Where training stands inside epoch ``epoch + 1``: enough for fit to take the rest of
    that epoch as an uninterrupted run would.

    ``step`` optimizer steps of the epoch are in the parameters (0 <= step <= steps, where
    steps = ceil(samples / (batch_size x accumulate))); ``applied`` rows and ``skipped`` steps (on_nonfinite
    "skip") so far. The running sums behind the epoch's record stay where the loop keeps them
    (on a GPU: device scalars) until :meth:`to_dict` reads them: ``loss_sum`` (sum over the
    applied steps of loss x rows for reduction "mean", of the loss for "sum"), ``correct`` and
    ``counted``; with row weights also ``weight_sum`` (the weight of the applied rows; the
    loss sum is then sum_b W_b L_b, and correct/counted are sums of weights). Data-parallel,
    each rank's sums are its own: ``rank_sums`` holds every rank's
    ``[loss_sum, correct, counted]`` once gathered (fit does when it stops inside an epoch).
    ``sums_known`` False: the sums are not known here (a data-parallel position taken
    outside a stop, where the other ranks' sums are); the resumed epoch's record then
    covers only the steps run after the resume. ``optimizer_steps``: the optimizer's
    step count there, which the resuming optimizer must have (a checkpoint of other
    parameters loaded since, or a new optimizer, would not continue this run).
    """

    KEYS = ("epoch", "step", "steps", "samples", "batch_size", "shuffle", "world", "optimizer_steps", "applied",
            "skipped", "sums")

    def __init__(self, epoch: int, step: int, samples: int, batch_size: int, shuffle: bool, world: int,
                 accumulate: int = 1) -> None:
        self.epoch, self.step, self.samples, self.batch_size = epoch, step, samples, batch_size
        self.shuffle, self.world, self.accumulate = shuffle, world, accumulate
        self.applied, self.skipped = 0, 0
        self.loss_sum: Any = 0.0
        self.correct: Any = 0
        self.counted = 0
        self.rank_sums: list[list[Any]] | None = None
        self.sums_known = True
        self.optimizer_steps: int | None = None  # the optimizer's step_count there (None: not checked)
        self.weight_sum: float | None = None  # weighted runs: the weight of the applied rows

    @property
    def steps(self) -> int:
        return -(-self.samples // (self.batch_size * self.accumulate))

    def forget_sums(self) -> None:
        self.applied, self.loss_sum, self.correct, self.counted, self.rank_sums = 0, 0.0, 0, 0, None
        if self.weight_sum is not None:
            self.weight_sum = 0.0
        self.sums_known = False

    def to_host(self) -> None:
        """Read the running sums into Python numbers (one device read on a GPU)."""
        count = int if self.weight_sum is None else float  # sums of weights when weighted
        self.loss_sum, self.correct, self.counted = float(self.loss_sum), count(self.correct), count(self.counted)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the KEYS; ``"sums"`` is ``[[loss_sum, correct, counted]]``, one per rank, or None;
        a weighted run adds ``"weight_sum"``."""
        count = int if self.weight_sum is None else float
        weight_sum = self.weight_sum
        if not self.sums_known or (self.world > 1 and self.rank_sums is None):
            sums, applied = None, 0  # another rank's sums are not here: the record restarts
            weight_sum = None if weight_sum is None else 0.0
        elif self.rank_sums is not None:
            sums, applied = [[_json_float(r[0]), count(r[1]), count(r[2])] for r in self.rank_sums], self.applied
        else:
            sums, applied = [[_json_float(self.loss_sum), count(self.correct), count(self.counted)]], self.applied
        out = {"epoch": self.epoch, "step": self.step, "steps": self.steps, "samples": self.samples,
               "batch_size": self.batch_size, "shuffle": self.shuffle, "world": self.world, "applied": applied,
               "optimizer_steps": self.optimizer_steps, "skipped": self.skipped, "sums": sums}
        if weight_sum is not None:
            out["weight_sum"] = float(weight_sum)
        if self.accumulate != 1:
            out["accumulate"] = self.accumulate
        return out

    @classmethod
    def from_dict(cls, d: Any, name: str = "progress") -> EpochProgress:
        """Check ``d`` (from :meth:`to_dict`, e.g. read back from a checkpoint) key by key."""
        if not isinstance(d, dict):
            raise TypeError(f"{name}: expected a dict from model.progress(), got {type(d).__name__}")
        missing = [k for k in cls.KEYS if k not in d]
        if missing:
            raise ValueError(f"{name}: missing keys {missing} (expected those of model.progress())")
        samples = int_in(d["samples"], f"{name}['samples']", 1)
        batch_size = int_in(d["batch_size"], f"{name}['batch_size']", 1)
        if not isinstance(d["shuffle"], bool):
            raise ValueError(f"{name}['shuffle']: expected True or False, got {d['shuffle']!r}")
        accumulate = int_in(d.get("accumulate", 1), f"{name}['accumulate']", 1)
        p = cls(int_in(d["epoch"], f"{name}['epoch']", 0), 0, samples, batch_size, d["shuffle"],
                int_in(d["world"], f"{name}['world']", 1), accumulate)
        p.step = int_in(d["step"], f"{name}['step']", 0, p.steps)
        if d["steps"] != p.steps:
            raise ValueError(f"{name}['steps']: {d['steps']!r} steps do not fit {samples} samples in batches of "
                             f"{batch_size * accumulate} ({p.steps})")
        if d["optimizer_steps"] is not None:
            p.optimizer_steps = int_in(d["optimizer_steps"], f"{name}['optimizer_steps']", 0)
        p.applied = int_in(d["applied"], f"{name}['applied']", 0, samples)
        p.skipped = int_in(d["skipped"], f"{name}['skipped']", 0, p.step)
        if d.get("weight_sum") is not None:
            ws = d["weight_sum"]
            if isinstance(ws, bool) or not isinstance(ws, (int, float)) or not math.isfinite(ws) or ws < 0:
                raise ValueError(f"{name}['weight_sum']: expected a finite number >= 0, got {ws!r}")
            p.weight_sum = float(ws)
        sums = d["sums"]
        if sums is None:
            p.forget_sums()
            return p
        if not isinstance(sums, list) or not sums or not all(
                isinstance(r, list) and len(r) == 3 and (r[0] in _NONFINITE or isinstance(r[0], (int, float))
                                                         and not isinstance(r[0], bool))
                and all(_count_ok(c, p.weight_sum is not None) for c in r[1:]) for r in sums):
            raise ValueError(f"{name}['sums']: expected None or a list of [loss_sum, correct, counted] per rank, "
                             f"got {sums!r}")
        if len(sums) != p.world:
            raise ValueError(f"{name}['sums']: expected one [loss_sum, correct, counted] per rank of the world of "
                             f"{p.world}, got {len(sums)}")
        if len(sums) == 1:
            p.loss_sum, p.correct, p.counted = float(sums[0][0]), sums[0][1], sums[0][2]
        else:
            p.rank_sums = [[float(r[0]), r[1], r[2]] for r in sums]
        return p

    def sums_for(self, rank: int, world: int) -> tuple[float, int, int]:
        """This rank's starting sums. Saved by a world of another size: the totals on rank 0 (the
        epoch's record then equals the uninterrupted one to rounding, as data-parallel runs do)."""
        count = int if self.weight_sum is None else float
        rows = self.rank_sums if self.rank_sums is not None else [[self.loss_sum, self.correct, self.counted]]
        if len(rows) == world:
            return float(rows[rank][0]), count(rows[rank][1]), count(rows[rank][2])
        if rank:
            return 0.0, count(0), count(0)
        return float(sum(float(r[0]) for r in rows)), sum(count(r[1]) for r in rows), sum(count(r[2]) for r in rows)

    def describe(self) -> str:
        acc = f", accumulate {self.accumulate}" if self.accumulate != 1 else ""
        return (f"after step {self.step} of {self.steps} of epoch {self.epoch + 1} (batch_size {self.batch_size}{acc}, "
                f"{self.samples} training samples, shuffle={self.shuffle})")


def _count_ok(c: Any, weighted: bool) -> bool:
    """A saved correct/counted: an integer >= 0, or for a weighted run a finite number >= 0."""
    if isinstance(c, bool) or c is None:
        return False
    if isinstance(c, int):
        return c >= 0
    return weighted and isinstance(c, float) and math.isfinite(c) and c >= 0


def _resume_point(model: Any, optimizer: Any, n: int, batch_size: int, shuffle: bool,
                  weighted: bool = False, accumulate: int = 1) -> EpochProgress | None:
    """The model's mid-epoch position, checked against this fit; None at an epoch boundary."""
    pos = model.epoch_progress
    if pos is None or pos.step == 0:
        return None
    fix = ("; fit with the batch_size, accumulate, data and shuffle it stopped with to finish that epoch, or call "
           "model.load_progress(None) to start the epoch again from its first step")
    if pos.epoch != model.epoch:
        raise ValueError(f"model: it stopped {pos.describe()}, but model.epoch is now {model.epoch}{fix}")
    for what, mine, now in (("batch_size", pos.batch_size, batch_size), ("accumulate", pos.accumulate, accumulate),
                            ("training samples", pos.samples, n), ("shuffle", pos.shuffle, shuffle)):
        if mine != now:
            raise ValueError(f"model: it stopped {pos.describe()}; this fit has {what} {now}{fix}")
    if (pos.weight_sum is not None) != weighted:
        was, now = ("without", "has them") if weighted else ("with", "has none")
        raise ValueError(f"model: it stopped {pos.describe()} in a run {was} sample or class weights; this fit "
                         f"{now}{fix}")
    if pos.optimizer_steps is not None and optimizer.step_count != pos.optimizer_steps:
        raise ValueError(f"optimizer: it has taken {optimizer.step_count} steps, but the model stopped "
                         f"{pos.describe()} after its optimizer's step {pos.optimizer_steps} (another optimizer, "
                         f"or parameters loaded since?); pass that optimizer (e.g. gp.load(path).optimizer), or "
                         f"call model.load_progress(None) to start the epoch again from its first step")
    return pos

