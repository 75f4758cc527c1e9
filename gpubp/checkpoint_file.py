"""The checkpoint file: writing it atomically, reading it back, and its format marks.

What goes into the file is described in :mod:`gpubp.io`, which loads checkpoints into
models; this module needs no model class (it reads what it writes from the model's own
``config()``, ``parameters()`` and arena), so callbacks can save without depending on
the model module.

Writes are atomic: the bytes go to a temporary file in the same folder, are fsync'ed,
and replace the target with os.replace, so a crash mid-save leaves the previous
checkpoint intact. The file gets the mode a plain ``open(path, "wb")`` would give it:
0666 less the umask for a new file, the old file's mode when it replaces one.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
import threading
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as st_save

from gpubp import optim as optim_mod

FORMAT = "gpubp-checkpoint"
FORMAT_VERSION = "1"


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


def save(path: str | os.PathLike[str], model: Any, optimizer: Any = None, scheduler: Any = None) -> None:
    """Write ``model`` (and ``optimizer``, ``scheduler`` when given) to ``path`` atomically.

    ``path``'s folder must exist (see :func:`check_save_path`: checked before anything is
    written). The file's mode is that of a plain new file (0666 less the umask), or the
    mode of the file it replaces.
    """
    path = check_save_path(path)
    if not all(callable(getattr(model, m, None)) for m in ("config", "parameters")) or not hasattr(model, "arena"):
        raise TypeError(f"model: expected a gpubp.Sequential, got {type(model).__name__}")
    host = model.arena.backend.to_numpy  # host copies, wherever the parameters live
    tensors: dict[str, np.ndarray] = {f"param.{p.name}": np.ascontiguousarray(host(p.data)) for p in model.parameters()}
    cfg = model.config()
    cfg["epoch"] = model.epoch
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": json.dumps(cfg)}
    if optimizer is not None:
        if not isinstance(optimizer, optim_mod.Optimizer):
            raise TypeError(f"optimizer: expected a gpubp.optim.Optimizer, got {type(optimizer).__name__}")
        sd = optimizer.state_dict()
        metadata["optimizer"] = json.dumps(sd["meta"])
        tensors.update({f"optim.{k}": np.ascontiguousarray(v) for k, v in sd["state"].items()})
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
