"""Checkpoints: safetensors files holding a model, its optimizer and its schedule.

Layout of a checkpoint (no pickle anywhere):

    tensors   "param.<name>"          every parameter, e.g. "param.0.weight" (in, out)
              "optim.<name>.<buffer>" optimizer state, e.g. "optim.0.weight.exp_avg"
    metadata  "format"     "gpubp-checkpoint"        "format_version"  "1"
              "model"      JSON: architecture, dtype, seed, epochs trained
              "optimizer"  JSON: type, hyper-parameters, step count (when saved)
              "scheduler"  JSON: type, settings, last epoch (when saved)

Writing and reading the file (atomically, with the mode a plain file would get) is
:mod:`gpubp.checkpoint_file`; ``save`` and ``check_save_path`` are re-exported here.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, NamedTuple

from gpubp import optim as optim_mod
from gpubp import schedules as schedules_mod
from gpubp.checkpoint_file import _read, check_save_path, save
from gpubp.model import Sequential

__all__ = ["Checkpoint", "check_save_path", "load", "save"]


class Checkpoint(NamedTuple):
    model: Sequential
    optimizer: Any
    scheduler: Any
    metadata: dict[str, str]


def load(
    path: str | os.PathLike[str],
    model: Sequential | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    device: str = "cpu",
) -> Checkpoint:
    """Read a checkpoint written by :func:`save`.

    With ``model=None`` the model is rebuilt from the saved architecture; a
    given model must have the same architecture and dtype and is filled in
    place. The optimizer and scheduler are rebuilt (or, when given, filled) if
    the file holds them. Training resumed from the result continues bit for
    bit as if it had never stopped.
    """
    metadata, tensors = _read(os.fspath(path))
    cfg = json.loads(metadata["model"])
    if model is None:
        model = Sequential.from_config(cfg, device=device)
    else:
        if not isinstance(model, Sequential):
            raise TypeError(f"model: expected a gpubp.Sequential or None, got {type(model).__name__}")
        mine = model.config()
        if mine["layers"] != cfg["layers"]:
            raise ValueError(
                f"model: architecture differs from the checkpoint's:\n  model:      {_describe(mine)}\n"
                f"  checkpoint: {_describe(cfg)}"
            )
        if mine["dtype"] != cfg["dtype"]:
            raise ValueError(f"model: dtype {mine['dtype']} differs from the checkpoint's {cfg['dtype']}")
    for p in model.parameters():
        key = f"param.{p.name}"
        if key not in tensors or tensors[key].shape != p.shape or tensors[key].dtype != p.data.dtype:
            raise ValueError(f"path: checkpoint tensor {key!r} is missing or has the wrong shape/dtype")
        model._backend.assign_(p.data, tensors[key])
    model.epoch = int(cfg.get("epoch", 0))

    if "optimizer" in metadata:
        meta = json.loads(metadata["optimizer"])
        state = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
        if optimizer is None:
            optimizer = _rebuild(optim_mod, optim_mod.Optimizer, meta, model.parameters())
        optimizer.load_state_dict(meta, state)
    if "scheduler" in metadata and optimizer is not None:
        meta = json.loads(metadata["scheduler"])
        if scheduler is None:
            scheduler = _rebuild(schedules_mod, schedules_mod.LRSchedule, meta, optimizer)
        scheduler.load_state_dict(meta)
    model.optimizer = optimizer
    return Checkpoint(model, optimizer, scheduler, metadata)


def _ctor_args(cls: type, meta: dict[str, Any]) -> dict[str, Any]:
    """The saved values of ``cls``'s constructor arguments (beyond the first)."""
    names = list(inspect.signature(cls).parameters)[1:]
    return {k: (tuple(meta[k]) if isinstance(meta[k], list) else meta[k]) for k in names if k in meta}


def _rebuild(module: Any, base: type, meta: dict[str, Any], first: Any) -> Any:
    """A new ``module.<meta["type"]>(first, **saved settings)``, checked to be a ``base``."""
    cls = getattr(module, str(meta.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"path: unknown {base.__name__} type {meta.get('type')!r} in checkpoint")
    args = _ctor_args(cls, meta)
    if "lr" in args and args["lr"] == 0:
        # A schedule may have annealed lr to exactly 0, which a constructor rejects;
        # build with a stand-in and let load_state_dict restore the saved 0.
        args["lr"] = 1.0
    return cls(first, **args)


def _describe(cfg: dict[str, Any]) -> str:
    """One line per architecture: Dense(in, out, activation) -> Dropout(p) -> ..."""

    def one(c: dict[str, Any]) -> str:
        if c.get("type") == "Dropout":
            return f"Dropout({c['p']})"
        return f"Dense({c['in_features']}, {c['out_features']}, {c['activation']['name']})"

    return " -> ".join(one(c) for c in cfg["layers"])
