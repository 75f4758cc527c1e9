"""Checkpoints: safetensors files holding a model, its optimizer and its schedule.

Layout of a checkpoint (no pickle anywhere):

    tensors   "param.<name>"          every parameter, e.g. "param.0.weight" (in, out)
              "optim.<name>.<buffer>" optimizer state, e.g. "optim.0.weight.exp_avg"
    metadata  "format"     "gpubp-checkpoint"        "format_version"  "1"
              "model"      JSON: architecture, dtype, seed, epochs trained
              "optimizer"  JSON: type, hyper-parameters, step count (when saved)
              "scheduler"  JSON: type, settings, last epoch (when saved)

Writes are atomic: the bytes go to a temporary file in the same folder, are
fsync'ed, and replace the target with os.replace, so a crash mid-save leaves
the previous checkpoint intact. The file gets the mode a plain ``open(path, "wb")``
would give it: 0666 less the umask for a new file, the old file's mode when it
replaces one.
"""

from __future__ import annotations

import inspect
import json
import os
import stat
import sys
import tempfile
import threading
from typing import Any, NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as st_save

from gpubp import optim as optim_mod
from gpubp import schedules as schedules_mod
from gpubp.model import Sequential

FORMAT = "gpubp-checkpoint"
FORMAT_VERSION = "1"


class Checkpoint(NamedTuple):
    model: Sequential
    optimizer: Any
    scheduler: Any
    metadata: dict[str, str]


def check_save_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string when a checkpoint can be written there, else raise naming ``path``.

    FileNotFoundError when its folder does not exist, NotADirectoryError when the folder is a
    file, IsADirectoryError when ``path`` is itself a folder, PermissionError when the folder
    cannot be written, TypeError/ValueError for something that is not a path. Nothing is
    written; :func:`save` calls it first, and a program can call it before a long run.
    """
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}") from None
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not p:
        raise ValueError("path: expected a file name, got an empty string")
    if os.path.isdir(p):
        raise IsADirectoryError(f"path: {p!r} is a folder; give a file name, e.g. {os.path.join(p, 'model.safetensors')!r}")
    folder = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise NotADirectoryError(f"path: {folder!r} (the folder of {p!r}) is not a folder")
        raise FileNotFoundError(f"path: the folder {folder!r} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"path: the folder {folder!r} is not writable")
    return p


def save(path: str | os.PathLike[str], model: Sequential, optimizer: Any = None, scheduler: Any = None) -> None:
    """Write ``model`` (and ``optimizer``, ``scheduler`` when given) to ``path`` atomically.

    ``path``'s folder must exist (see :func:`check_save_path`: checked before anything is
    written). The file's mode is that of a plain new file (0666 less the umask), or the
    mode of the file it replaces.
    """
    path = check_save_path(path)
    if not isinstance(model, Sequential):
        raise TypeError(f"model: expected a gpubp.Sequential, got {type(model).__name__}")
    tensors: dict[str, np.ndarray] = {f"param.{p.name}": np.ascontiguousarray(p.data) for p in model.parameters()}
    cfg = model.config()
    cfg["epoch"] = model.epoch
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": json.dumps(cfg)}
    if optimizer is not None:
        if not isinstance(optimizer, optim_mod.Optimizer):
            raise TypeError(f"optimizer: expected a gpubp.optim.Optimizer, got {type(optimizer).__name__}")
        meta, state = optimizer.state_dict()
        metadata["optimizer"] = json.dumps(meta)
        tensors.update({f"optim.{k}": np.ascontiguousarray(v) for k, v in state.items()})
    if scheduler is not None:
        metadata["scheduler"] = json.dumps(scheduler.state_dict())
    _write_atomic(path, st_save(tensors, metadata=metadata))


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where the platform allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it, and set it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _file_mode(path: str) -> int:
    """The mode ``open(path, "wb")`` would leave: the existing file's, or 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _write_atomic(path: str, payload: bytes) -> None:
    """Temp file in the target's folder, write, flush, fsync, os.replace, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if sys.platform != "win32":  # mkstemp creates it 0600
                os.fchmod(f.fileno(), mode)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every platform can open a folder
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _read(path: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no checkpoint file at {path!r}")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, or a header that is not JSON: truncated or not safetensors
        raise ValueError(f"path: {path!r} is not a readable safetensors checkpoint (truncated or corrupt?): {e}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"path: {path!r} is a safetensors file but not a gpubp checkpoint (no format={FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"path: checkpoint format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION!r}")
    return metadata, tensors


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
