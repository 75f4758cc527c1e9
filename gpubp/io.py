"""Checkpoints: safetensors files holding a model, its optimizer, its schedule and progress.

Layout of a checkpoint (no pickle anywhere):

    tensors   "param.<name>"          every parameter, e.g. "param.0.weight" (in, out)
              "optim.<name>.<buffer>" optimizer state, e.g. "optim.0.weight.exp_avg"
    metadata  "format"     "gpubp-checkpoint"        "format_version"  "2"
              "model"      JSON: architecture, dtype, seed, epochs trained
              "optimizer"  JSON: type, hyper-parameters, step count (when saved)
              "scheduler"  JSON: type, settings, last epoch (when saved)
              "progress"   JSON: the caller's resume point, e.g. {"epoch": 3, "step_in_epoch": 120}
              "digests"    JSON: sha256 of every tensor and of the metadata

Writing and reading the file (atomically, with the mode a plain file would get, and the
digests) is :mod:`gpubp.checkpoint_file`; ``save`` and ``check_save_path`` are
re-exported here. :func:`load` checks a file in this order, so that a damaged or hostile
one is refused before anything large is allocated or anything given is changed: the
header's layout; the metadata's digest; the architecture against the tensor table
(names, shapes, dtypes); then each tensor's bytes against its digest as it is read.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, NamedTuple

import numpy as np

from gpubp import optim as optim_mod
from gpubp import schedules as schedules_mod
from gpubp.backends import DENSE_IMPLS
from gpubp.checkpoint_file import (
    LEGACY_VERSIONS,
    Reader,
    UnverifiedCheckpointWarning,
    _is_count,
    as_path,
    check_belongs,
    check_progress,
    check_save_path,
    dtype_code,
    loads_json,
    save,
)
from gpubp.layers import Dense
from gpubp.layers import from_config as layer_from_config
from gpubp.model import DTYPES, Sequential
from gpubp.training import EpochProgress

__all__ = ["Checkpoint", "UnverifiedCheckpointWarning", "check_save_path", "load", "save"]

# What a checkpoint's JSON may raise when it is hostile: wrapped into ValueError naming the file.
_CONTENT_ERRORS = (ValueError, TypeError, LookupError, ArithmeticError, AttributeError, RecursionError)


class Checkpoint(NamedTuple):
    """What :func:`load` returns.

    ``progress`` is the dict given to ``save(..., progress=...)`` (e.g. ``{"epoch": 3,
    "step_in_epoch": 120}``), or None when none was saved: a training loop resumes
    mid-epoch from it.
    """

    model: Sequential
    optimizer: Any
    scheduler: Any
    metadata: dict[str, str]
    progress: dict[str, Any] | None = None


def load(
    path: str | os.PathLike[str],
    model: Sequential | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    device: str = "cpu",
    *,
    verify: bool = True,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save`.

    With ``model=None`` the model is rebuilt from the saved architecture; a
    given model must have the same architecture and dtype and is filled in
    place. The optimizer and scheduler are rebuilt (or, when given, filled) if
    the file holds them; a given optimizer must be over ``model``'s parameters
    (so ``model`` must be given too) and a given scheduler must drive it. The
    saved ``progress`` dict (or None) is ``Checkpoint.progress``. Training resumed
    from the result continues bit for bit as if it had never stopped.

    Every tensor and the metadata are checked against the digests saved with them
    (``verify=False`` skips that, to save the hashing time: about 1 ms per MB); a
    damaged file raises ValueError naming the damaged tensor or "metadata". A
    checkpoint from before digests (format version 1) loads with an
    :class:`UnverifiedCheckpointWarning`. A malformed or hostile file raises
    ValueError naming the file and the problem, before anything it declares is
    allocated and before a given model, optimizer or scheduler is changed.
    """
    path = as_path(path)
    if not isinstance(verify, (bool, np.bool_)):
        raise TypeError(f"verify: expected True or False, got {type(verify).__name__}")
    if model is not None and not isinstance(model, Sequential):
        raise TypeError(f"model: expected a gpubp.Sequential or None, got {type(model).__name__}")
    if optimizer is not None and model is None:
        if not isinstance(optimizer, optim_mod.Optimizer):
            raise TypeError(f"optimizer: expected a gpubp.optim.Optimizer, got {type(optimizer).__name__}")
        raise ValueError("optimizer: given without its model; pass model= too (a rebuilt model has new parameters)")
    if scheduler is not None and optimizer is None:
        if not isinstance(scheduler, schedules_mod.LRSchedule):
            raise TypeError(f"scheduler: expected a gpubp.schedules.LRSchedule, got {type(scheduler).__name__}")
        raise ValueError("scheduler: given without its optimizer; pass optimizer= and model= too")
    if model is not None:
        check_belongs(model.parameters(), optimizer, scheduler)

    with Reader(path, verify=bool(verify)) as ck:
        md = ck.metadata
        cfg, shapes = _architecture(ck)
        if model is not None:
            mine = model.config()
            if mine["layers"] != cfg["layers"]:
                raise ValueError(
                    f"model: architecture differs from the checkpoint's:\n  model:      {_describe(mine)}\n"
                    f"  checkpoint: {_describe(cfg)}"
                )
            if mine["dtype"] != cfg["dtype"]:
                raise ValueError(f"model: dtype {mine['dtype']} differs from the checkpoint's {cfg['dtype']}")
        opt_meta = _json_object(ck, "optimizer") if "optimizer" in md else None
        sched_meta = _json_object(ck, "scheduler") if "scheduler" in md else None
        if sched_meta is not None and opt_meta is None:
            if ck.version not in LEGACY_VERSIONS:
                raise ck.bad("metadata: a 'scheduler' entry without an 'optimizer' entry")
            sched_meta = None  # version 1 wrote it and loads ignored it
        progress = None
        if "progress" in md:
            saved = _json_object(ck, "progress")
            try:
                progress = check_progress(saved, "progress")
            except (ValueError, TypeError) as e:
                raise ck.bad(f"the 'progress' entry: {e}") from None
        _check_tensor_table(ck, shapes, cfg["dtype"], opt_meta is not None)
        tensors = ck.read()  # every tensor checked against its digest

        target = model if model is not None else Sequential.from_config(cfg, device=device, initialise=False)
        optimizer, scheduler = _restore_training_state(ck, target, optimizer, scheduler, opt_meta, sched_meta,
                                                       tensors)
        for p in target.parameters():  # the given model changes only now, everything checked
            target.arena.backend.assign_(p.data, tensors[f"param.{p.name}"])
        target.epoch = int(cfg.get("epoch", 0))
        target.optimizer = optimizer
        # A position inside an epoch (model.progress(), as ModelCheckpoint saves it) is where the
        # next fit starts; any other progress dict is the caller's own, and a given model's stale
        # position is dropped either way.
        position = progress if progress is not None and set(EpochProgress.KEYS) <= set(progress) else None
        try:
            target.load_progress(position)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: the 'progress' entry is not a position inside an epoch: {e}") from None
        return Checkpoint(target, optimizer, scheduler, md, progress)


# --- checks of the file's contents ------------------------------------------------------------


def _json_object(ck: Reader, key: str) -> dict[str, Any]:
    """Metadata entry ``key`` parsed as a JSON object, or ValueError naming the file and entry."""
    try:
        v = loads_json(ck.metadata[key])
    except (ValueError, RecursionError) as e:
        raise ck.bad(f"the {key!r} metadata entry is not valid JSON: {e}") from None
    if not isinstance(v, dict):
        raise ck.bad(f"the {key!r} metadata entry is JSON {type(v).__name__}, expected an object")
    return v


class _ShapeRecorder:
    """Stands in for an Arena in ``Layer.bind``: records the name and shape of each parameter
    a layer would carve, and allocates nothing."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}

    def carve(self, name: str, shape: tuple[int, ...]) -> None:
        self.shapes[name] = tuple(int(s) for s in shape)


# Keys each layer type's config must have (checked here so that a missing one is named).
_LAYER_KEYS = {"Dense": ("in_features", "out_features", "activation", "init"), "Dropout": ("p",)}


def _architecture(ck: Reader) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The "model" entry, checked, and the parameter shapes it implies ({"0.weight": (in, out), ...}),
    computed without building the model."""
    cfg = _json_object(ck, "model")

    def bad(why: str) -> ValueError:
        return ck.bad(f"the architecture ('model' metadata entry): {why}")

    layers = cfg.get("layers")
    if not isinstance(layers, list) or not layers:
        raise bad(f"expected a non-empty 'layers' list, got {layers!r:.100}")
    if cfg.get("dtype") not in DTYPES:
        raise bad(f"'dtype' is {cfg.get('dtype')!r:.50}, expected one of {', '.join(DTYPES)}")
    for key, ok, want in (("seed", _is_count(cfg.get("seed")), "an integer >= 0"),
                          ("check_finite", isinstance(cfg.get("check_finite"), bool), "true or false"),
                          ("epoch", "epoch" not in cfg or _is_count(cfg["epoch"]), "an integer >= 0"),
                          ("dense_impl", cfg.get("dense_impl", "auto") in DENSE_IMPLS, f"one of {DENSE_IMPLS}")):
        if not ok:
            raise bad(f"{key!r} is {cfg.get(key, '(missing)')!r:.50}, expected {want}")
    built = []
    for i, c in enumerate(layers):
        kind = c.get("type") if isinstance(c, dict) else None
        if not isinstance(kind, str) or kind not in _LAYER_KEYS:
            raise bad(f"layers[{i}]: unknown layer type {kind!r:.50}; expected one of {', '.join(_LAYER_KEYS)}")
        absent = [k for k in _LAYER_KEYS[kind] if k not in c]
        if absent:
            raise bad(f"layers[{i}] ({kind}) has no {absent[0]!r}")
        if kind == "Dense":
            act = c["activation"]
            if not isinstance(act, dict) or "name" not in act or "params" not in act:
                raise bad(f"layers[{i}]['activation'] is {act!r:.100}, expected an object with 'name' and 'params'")
            if not isinstance(act["params"], dict):
                raise bad(f"layers[{i}]['activation']['params'] is {act['params']!r:.100}, expected an object")
        try:
            built.append(layer_from_config(c))
        except _CONTENT_ERRORS as e:
            raise bad(f"layers[{i}]: {e}") from None
    if not any(isinstance(layer, Dense) for layer in built):
        raise bad("no Dense layer")
    width, width_from = None, None
    for i, layer in enumerate(built):
        if layer.in_features is not None:
            if width is not None and layer.in_features != width:
                raise bad(f"layers[{i}]: in_features={layer.in_features} does not match layers[{width_from}]'s "
                          f"out_features={width}")
            width, width_from = layer.out_features, i
    rec = _ShapeRecorder()
    for i, layer in enumerate(built):
        layer.bind(rec, i, None)  # type: ignore[arg-type]  (records shapes; the layers are thrown away)
    return cfg, rec.shapes


def _check_tensor_table(ck: Reader, shapes: dict[str, tuple[int, ...]], dtype: str, has_optimizer: bool) -> None:
    """Every tensor the architecture needs is there with its shape and dtype; optimizer
    tensors are shaped like a parameter; nothing else is in the file."""
    code = dtype_code(dtype)

    def check(key: str, entry: Any, shape: tuple[int, ...], what: str) -> None:
        if entry.shape != shape:
            raise ck.bad(f"tensor {key!r} has shape {entry.shape}, {what} needs {shape}")
        if entry.code != code:
            raise ck.bad(f"tensor {key!r} is {entry.code}, the model's dtype {dtype} needs {code}")

    for name, shape in shapes.items():
        key = f"param.{name}"
        if key not in ck.tensors:
            raise ck.bad(f"tensor {key!r} is missing (the architecture has parameter {name!r})")
        check(key, ck.tensors[key], shape, "the architecture")
    for key, entry in ck.tensors.items():
        if key.startswith("param.") and key[len("param."):] in shapes:
            continue
        if key.startswith("optim.") and has_optimizer:
            owner = key[len("optim."):].rpartition(".")[0]
            if owner not in shapes:
                raise ck.bad(f"tensor {key!r}: optimizer state of {owner!r}, which is not a parameter of the model")
            check(key, entry, shapes[owner], f"its parameter {owner!r}")
            continue
        why = "without an 'optimizer' metadata entry" if key.startswith("optim.") else "not in the architecture"
        raise ck.bad(f"unexpected tensor {key!r} ({why})")


def _restore_training_state(
    ck: Reader, model: Sequential, optimizer: Any, scheduler: Any, opt_meta: dict[str, Any] | None,
    sched_meta: dict[str, Any] | None, tensors: dict[str, np.ndarray],
) -> tuple[Any, Any]:
    """Rebuild or fill the optimizer and schedule; a given optimizer is put back as it was
    if the schedule then fails."""
    if opt_meta is None:
        return optimizer, scheduler
    state = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
    opt_given = optimizer is not None
    if optimizer is None:
        cls = _class(ck, optim_mod, optim_mod.Optimizer, opt_meta)
        by_name = {p.name: p for p in model.parameters()}
        names = opt_meta.get("param_names")
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n in by_name for n in names)
                and len(set(names)) == len(names)):
            raise ck.bad(f"the 'optimizer' entry: 'param_names' {names!r:.100} does not name the model's parameters")
        optimizer = _build(ck, cls, opt_meta, [by_name[n] for n in names], "optimizer")
    undo = optimizer.state_dict() if opt_given and sched_meta is not None else None
    _fill(ck, optimizer, {"meta": opt_meta, "state": state}, "optimizer", opt_given)
    if sched_meta is None:
        return optimizer, scheduler
    sched_given = scheduler is not None
    try:
        if scheduler is None:
            cls = _class(ck, schedules_mod, schedules_mod.LRSchedule, sched_meta)
            scheduler = _build(ck, cls, sched_meta, optimizer, "scheduler")
        _fill(ck, scheduler, sched_meta, "scheduler", sched_given)
    except BaseException:
        if undo is not None:
            optimizer.load_state_dict(undo)
        raise
    return optimizer, scheduler


def _fill(ck: Reader, obj: Any, state: Any, what: str, given: bool) -> None:
    """``obj.load_state_dict(state)``; a refusal names the file, and the argument when ``obj`` was given."""
    try:
        obj.load_state_dict(state)
    except _CONTENT_ERRORS as e:
        if given:
            raise ValueError(f"{what}: does not match the checkpoint {ck.path!r}: {e}") from None
        raise ck.bad(f"the {what!r} entry: {e}") from None


def _ctor_args(cls: type, meta: dict[str, Any]) -> dict[str, Any]:
    """The saved values of ``cls``'s constructor arguments (beyond the first)."""
    names = list(inspect.signature(cls).parameters)[1:]
    return {k: (tuple(meta[k]) if isinstance(meta[k], list) else meta[k]) for k in names if k in meta}


def _class(ck: Reader, module: Any, base: type, meta: dict[str, Any]) -> type:
    """``module.<meta["type"]>``, checked to be a concrete subclass of ``base`` (not ``base`` itself)."""
    kind = meta.get("type")
    cls = getattr(module, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, base)) or cls is base or inspect.isabstract(cls):
        what = "optimizer" if base is optim_mod.Optimizer else "scheduler"
        raise ck.bad(f"the {what!r} entry: unknown {base.__name__} type {kind!r:.50}")
    return cls


def _build(ck: Reader, cls: type, meta: dict[str, Any], first: Any, what: str) -> Any:
    """A new ``cls(first, **saved settings)``; a refusal names the file and the entry."""
    args = _ctor_args(cls, meta)
    if "lr" in args and args["lr"] == 0:
        # A schedule may have annealed lr to exactly 0, which a constructor rejects;
        # build with a stand-in and let load_state_dict restore the saved 0.
        args["lr"] = 1.0
    try:
        return cls(first, **args)
    except _CONTENT_ERRORS as e:
        raise ck.bad(f"the {what!r} entry: {e}") from None


def _describe(cfg: dict[str, Any]) -> str:
    """One line per architecture: Dense(in, out, activation) -> Dropout(p) -> ..."""

    def one(c: dict[str, Any]) -> str:
        if c.get("type") == "Dropout":
            return f"Dropout({c['p']})"
        return f"Dense({c['in_features']}, {c['out_features']}, {c['activation']['name']})"

    return " -> ".join(one(c) for c in cfg["layers"])

