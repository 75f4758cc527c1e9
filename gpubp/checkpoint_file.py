"""The checkpoint file: writing it atomically, reading it back with every byte checked.

What goes into the file is described in :mod:`gpubp.io`, which loads checkpoints into
models; this module needs no model class (it reads what it writes from the model's own
``config()``, ``parameters()`` and arena), so callbacks can save without depending on
the model module.

Writes are atomic: the bytes go to a temporary file in the same folder, are fsync'ed,
and replace the target with os.replace, so a crash mid-save leaves the previous
checkpoint intact. The file gets the mode a plain ``open(path, "wb")`` would give it:
0666 less the umask for a new file, the old file's mode when it replaces one.

Integrity (format version 2). The metadata entry ``"digests"`` holds, as JSON::

    {"algorithm": "sha256",
     "tensors":  {name: sha256(json([dtype code, shape]) + the tensor's bytes)},
     "metadata": sha256(canonical JSON of {algorithm, every other metadata entry, tensors})}

so a changed byte anywhere in a tensor, its dtype or shape, the metadata, or the table
of tensor digests is found on load and named. The digests detect damage (a bad disk, a
truncated copy, a bit flip); they are not a signature: whoever can write the file can
recompute them. sha256 runs at about 1 GB/s where the CPU has SHA instructions.

Reading. The safetensors layout (8-byte little-endian header length, JSON header,
tensor bytes) is parsed here, not by the safetensors library, so that nothing is
allocated before the header has been checked: the header must fit in the file, every
tensor's dtype and shape must need exactly the bytes its offsets span, and the tensors
must tile the data section. Every problem is a ValueError naming the file and what is
wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from gpubp import optim as optim_mod
from gpubp import schedules as schedules_mod

FORMAT = "gpubp-checkpoint"
FORMAT_VERSION = "2"
LEGACY_VERSIONS = ("1",)  # written before checkpoints carried digests
DIGEST = "sha256"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_PROGRESS_BYTES = 65_536  # JSON text of the "progress" entry

# The metadata entries each version may hold; the first group must be present.
_REQUIRED = {"2": ("format", "format_version", "model", "digests"), "1": ("format", "format_version", "model")}
_OPTIONAL = {"2": ("optimizer", "scheduler", "progress"), "1": ("optimizer", "scheduler")}

# safetensors dtype codes NumPy can hold, little-endian as in the file.
_DTYPES: dict[str, np.dtype] = {
    code: np.dtype(t).newbyteorder("<")
    for code, t in (("BOOL", np.bool_), ("U8", np.uint8), ("I8", np.int8), ("U16", np.uint16), ("I16", np.int16),
                    ("F16", np.float16), ("U32", np.uint32), ("I32", np.int32), ("F32", np.float32),
                    ("U64", np.uint64), ("I64", np.int64), ("F64", np.float64))
}
_CODES: dict[tuple[str, int], str] = {(dt.kind, dt.itemsize): code for code, dt in _DTYPES.items()}


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint from before digests (format version 1) was loaded: its contents could not be checked."""


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a NumPy dtype, e.g. ``"F32"`` for float32."""
    dt = np.dtype(dtype)
    try:
        return _CODES[(dt.kind, dt.itemsize)]
    except KeyError:
        raise TypeError(f"dtype: {dt} has no safetensors code gpubp reads") from None


def as_path(path: Any, name: str = "path") -> str:
    """``path`` (str, bytes or os.PathLike) as a str; TypeError naming ``name`` for anything else."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError(f"{name}: expected a str or os.PathLike, got {type(path).__name__}") from None
    return os.fsdecode(p) if isinstance(p, bytes) else p


def check_save_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string when a checkpoint can be written there, else raise naming ``path``.

    FileNotFoundError when its folder does not exist, NotADirectoryError when the folder is a
    file, IsADirectoryError when ``path`` is itself a folder, PermissionError when the folder
    cannot be written, TypeError/ValueError for something that is not a path. Nothing is
    written; :func:`save` calls it first, and a program can call it before a long run.
    """
    p = as_path(path)
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


def check_belongs(params: list[Any], optimizer: Any, scheduler: Any) -> None:
    """Refuse an optimizer that is not over ``params`` (a model's parameters, or some of
    them) and a schedule that is not ``optimizer``'s: ValueError/TypeError naming which.

    Identity decides: a model built the same way, or a clone, has other parameter objects.
    """
    if optimizer is not None:
        if not isinstance(optimizer, optim_mod.Optimizer):
            raise TypeError(f"optimizer: expected a gpubp.optim.Optimizer, got {type(optimizer).__name__}")
        mine = {id(p) for p in params}
        foreign = [p.name for p in optimizer.params if id(p) not in mine]
        if foreign:
            raise ValueError(
                f"optimizer: it was built for parameters of another model (its {foreign[0]!r} is not this "
                "model's); pass the optimizer built on model.parameters()"
            )
    if scheduler is not None:
        if not isinstance(scheduler, schedules_mod.LRSchedule):
            raise TypeError(f"scheduler: expected a gpubp.schedules.LRSchedule, got {type(scheduler).__name__}")
        if optimizer is None:
            raise ValueError("scheduler: given without its optimizer; pass optimizer=scheduler.optimizer too")
        if scheduler.optimizer is not optimizer:
            raise ValueError(
                f"scheduler: it belongs to another optimizer ({scheduler.optimizer!r}), not to the one given"
            )


def check_progress(progress: Any, name: str = "progress") -> dict[str, Any]:
    """``progress`` as plain JSON values: a dict of str keys to None, bool, int, finite float,
    str or (nested) lists of those; NumPy scalars become Python ones. ValueError/TypeError
    naming the entry otherwise, or when its JSON text exceeds MAX_PROGRESS_BYTES."""

    def plain(v: Any, where: str) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, np.bool_):
            return bool(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)):
            if not math.isfinite(v):
                raise ValueError(f"{where}: expected a finite number, got {v!r}")
            return float(v)
        if isinstance(v, (list, tuple)):
            return [plain(x, f"{where}[{i}]") for i, x in enumerate(v)]
        raise TypeError(f"{where}: expected None, a bool, number, str or list, got {type(v).__name__}")

    if not isinstance(progress, dict):
        raise TypeError(f"{name}: expected a dict of JSON scalars and lists, got {type(progress).__name__}")
    out = {}
    for k, v in progress.items():
        if not isinstance(k, str):
            raise TypeError(f"{name}: expected str keys, got {type(k).__name__} {k!r}")
        out[k] = plain(v, f"{name}[{k!r}]")
    size = len(json.dumps(out))
    if size > MAX_PROGRESS_BYTES:
        raise ValueError(f"{name}: {size} bytes of JSON, more than the {MAX_PROGRESS_BYTES} a checkpoint keeps")
    return out


def save(
    path: str | os.PathLike[str],
    model: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    progress: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (and ``optimizer``, ``scheduler``, ``progress`` when given) to ``path`` atomically.

    ``path``'s folder must exist (see :func:`check_save_path`: checked before anything is
    written). ``optimizer`` must be over this model's parameters and ``scheduler`` must
    drive ``optimizer`` (ValueError otherwise, before anything is written). ``progress``
    is a small dict of JSON scalars and lists, e.g. ``{"epoch": 3, "step_in_epoch": 120}``,
    kept as it is (see :func:`check_progress`) and returned by ``gpubp.load`` as
    ``Checkpoint.progress``. Every tensor and the metadata get a digest (see the module
    docstring). The file's mode is that of a plain new file (0666 less the umask), or the
    mode of the file it replaces.
    """
    path = check_save_path(path)
    if not all(callable(getattr(model, m, None)) for m in ("config", "parameters")) or not hasattr(model, "arena"):
        raise TypeError(f"model: expected a gpubp.Sequential, got {type(model).__name__}")
    params = model.parameters()
    check_belongs(params, optimizer, scheduler)
    clean_progress = None if progress is None else check_progress(progress)
    host = model.arena.backend.to_numpy  # host copies, wherever the parameters live
    tensors: dict[str, np.ndarray] = {f"param.{p.name}": np.ascontiguousarray(host(p.data)) for p in params}
    cfg = model.config()
    cfg["epoch"] = model.epoch
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": json.dumps(cfg)}
    if optimizer is not None:
        sd = optimizer.state_dict()
        metadata["optimizer"] = json.dumps(sd["meta"])
        tensors.update({f"optim.{k}": np.ascontiguousarray(v) for k, v in sd["state"].items()})
    if scheduler is not None:
        metadata["scheduler"] = json.dumps(scheduler.state_dict())
    if clean_progress is not None:
        metadata["progress"] = json.dumps(clean_progress)
    digests = {k: tensor_digest(dtype_code(a.dtype), a.shape, _le_bytes(a)) for k, a in tensors.items()}
    metadata["digests"] = json.dumps(
        {"algorithm": DIGEST, "tensors": digests, "metadata": metadata_digest(metadata, digests)}
    )
    _write_atomic(path, st_save(tensors, metadata=metadata))


def _le_bytes(a: np.ndarray) -> np.ndarray:
    """The bytes safetensors writes for ``a``: C order, little-endian, as a flat uint8 view."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8)


def tensor_digest(code: str, shape: tuple[int, ...], data: Any) -> str:
    """sha256 of ``[code, shape]`` as JSON followed by the tensor's bytes ``data`` (a buffer)."""
    h = hashlib.sha256(json.dumps([code, [int(s) for s in shape]], separators=(",", ":")).encode())
    h.update(data)
    return h.hexdigest()


def metadata_digest(metadata: dict[str, str], tensor_digests: dict[str, str]) -> str:
    """sha256 of the canonical JSON of the algorithm, every metadata entry but "digests",
    and the tensor digests: a change to any of them changes it."""
    covered = {k: v for k, v in metadata.items() if k != "digests"}
    text = json.dumps({"algorithm": DIGEST, "metadata": covered, "tensors": tensor_digests},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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


# --- reading ------------------------------------------------------------------------------


def loads_json(text: str) -> Any:
    """``json.loads`` that refuses what a checkpoint never holds: duplicate keys and
    NaN/Infinity. ValueError (or RecursionError for absurd nesting) on bad text."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor lies in the file: ``begin`` (from the start of the file) and ``nbytes``,
    its safetensors ``code``, NumPy ``dtype`` (little-endian) and ``shape``."""

    code: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    nbytes: int


class Reader:
    """An open checkpoint whose header has been read and checked; tensors are read on demand.

    On construction: the 8-byte header length (it must fit in the file), the JSON header
    (at most MAX_HEADER_BYTES), every tensor's dtype, shape and offsets (they must tile
    the data section exactly), the format marks and metadata entries, and, with
    ``verify``, the metadata digest and that every tensor has a digest. Nothing larger
    than the header is allocated. :meth:`read` then reads tensors, each checked against
    its digest with ``verify``. Use it as a context manager (the file stays open, so all
    reads see the one file even if the path is replaced meanwhile).

    A file of format version 1 (before digests) is read with an
    :class:`UnverifiedCheckpointWarning` (none with ``verify=False``).
    """

    def __init__(self, path: str, verify: bool = True) -> None:
        self.path = path
        self.verify = bool(verify)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no checkpoint file at {path!r}")
        self._f = open(path, "rb")  # noqa: SIM115 (closed by close() / __exit__)
        try:
            self._parse()
        except BaseException:
            self._f.close()
            raise

    # errors ----------------------------------------------------------------------------

    def corrupt(self, why: str) -> ValueError:
        return ValueError(f"path: {self.path!r} is not a readable safetensors checkpoint (truncated or corrupt?): {why}")

    def bad(self, why: str) -> ValueError:
        return ValueError(f"path: {self.path!r}: {why}")

    # header ----------------------------------------------------------------------------

    def _parse(self) -> None:
        f = self._f
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise self.corrupt(f"the file has {size} bytes, fewer than the 8 of the header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise self.corrupt(f"the header length is {n} bytes, larger than the {size - 8} bytes after it")
        if n > MAX_HEADER_BYTES:
            raise self.corrupt(f"the header length is {n} bytes, more than the {MAX_HEADER_BYTES} allowed")
        raw = f.read(n)
        if len(raw) != n:
            raise self.corrupt(f"the file ended inside the {n}-byte header")
        try:
            header = loads_json(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise self.corrupt(f"the header is not UTF-8 text ({e.reason} at byte {8 + e.start})") from None
        except (ValueError, RecursionError) as e:
            raise self.corrupt(f"the header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise self.corrupt(f"the header is JSON {type(header).__name__}, expected an object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self.corrupt("the header's __metadata__ is not an object of strings")
        data_start, data_len = 8 + n, size - 8 - n
        self.tensors = self._entries(header, data_start, data_len)
        self.metadata: dict[str, str] = metadata
        self._check_metadata()

    def _entries(self, header: dict[str, Any], data_start: int, data_len: int) -> dict[str, TensorEntry]:
        entries: list[tuple[str, TensorEntry]] = []
        for name, e in header.items():
            where = f"tensor {name!r}"
            if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                raise self.corrupt(f"{where}: expected an object with dtype, shape and data_offsets, got {e!r:.200}")
            code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
            if not isinstance(code, str) or code not in _DTYPES:
                raise self.corrupt(f"{where}: unknown or unsupported dtype {code!r:.50}")
            if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
                raise self.corrupt(f"{where}: shape {shape!r:.200} is not a list of integers >= 0")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                    and offsets[0] <= offsets[1]):
                raise self.corrupt(f"{where}: data_offsets {offsets!r:.200} is not a pair begin <= end of integers >= 0")
            if offsets[1] > data_len:
                raise self.corrupt(f"{where}: its bytes end at {offsets[1]} but the data section holds {data_len} "
                                   "(truncated?)")
            dt = _DTYPES[code]
            nbytes = math.prod(shape) * dt.itemsize  # Python ints: no overflow
            if offsets[1] - offsets[0] != nbytes:
                raise self.corrupt(f"{where}: shape {tuple(shape)} of {code} needs {nbytes} bytes, its data_offsets "
                                   f"span {offsets[1] - offsets[0]}")
            entries.append((name, TensorEntry(code, dt, tuple(shape), data_start + offsets[0], nbytes)))
        entries.sort(key=lambda kv: kv[1].begin)
        pos = data_start
        for name, t in entries:  # the tensors tile the data section: no gap, no overlap
            if t.begin != pos:
                raise self.corrupt(f"tensor {name!r}: its bytes start at {t.begin - data_start}, expected "
                                   f"{pos - data_start} (tensor data overlaps or leaves a gap)")
            pos += t.nbytes
        if pos != data_start + data_len:
            raise self.corrupt(f"{data_start + data_len - pos} bytes after the last tensor")
        return dict(entries)

    # metadata and digests --------------------------------------------------------------

    def _check_metadata(self) -> None:
        md = self.metadata
        if md.get("format") != FORMAT:
            raise self.bad(f"a safetensors file but not a gpubp checkpoint (no format={FORMAT!r})")
        version = md.get("format_version")
        if version not in _REQUIRED:
            raise self.bad(f"checkpoint format version {version!r:.50}; this gpubp reads versions "
                           f"{', '.join(sorted(_REQUIRED))}")
        self.version = version
        missing = [k for k in _REQUIRED[version] if k not in md]
        extra = sorted(k for k in md if k not in _REQUIRED[version] + _OPTIONAL[version])
        if missing or extra:
            why = f"no {missing[0]!r} entry" if missing else f"unexpected entries {extra}"
            raise self.bad(f"metadata of a format version {version} checkpoint: {why}")
        self.digests: dict[str, str] | None = None
        if version in LEGACY_VERSIONS:
            if self.verify:
                warnings.warn(UnverifiedCheckpointWarning(
                    f"{self.path!r} is a format version {version} checkpoint, written before checkpoints carried "
                    "digests: its contents cannot be checked for damage; save it again to add them"), stacklevel=5)
            return
        if not self.verify:
            return
        try:
            d = loads_json(md["digests"])
        except (ValueError, RecursionError) as e:
            raise self.bad(f"the metadata is damaged: its 'digests' entry is not JSON ({e})") from None
        if not (isinstance(d, dict) and set(d) == {"algorithm", "tensors", "metadata"}
                and isinstance(d["tensors"], dict) and isinstance(d["metadata"], str)
                and all(isinstance(v, str) for v in d["tensors"].values())):
            raise self.bad("the metadata is damaged: its 'digests' entry is not {algorithm, tensors, metadata}")
        if d["algorithm"] != DIGEST:
            raise self.bad(f"the metadata is damaged: digest algorithm {d['algorithm']!r:.50}, expected {DIGEST!r}")
        if metadata_digest(md, d["tensors"]) != d["metadata"]:
            raise self.bad("the metadata is damaged: it does not match its digest")
        missing = [k for k in self.tensors if k not in d["tensors"]]
        if missing:
            raise self.bad(f"tensor {missing[0]!r} has no digest (the tensor table is damaged)")
        absent = [k for k in d["tensors"] if k not in self.tensors]
        if absent:
            raise self.bad(f"tensor {absent[0]!r} is missing from the file (the tensor table is damaged)")
        self.digests = d["tensors"]

    # tensors ---------------------------------------------------------------------------

    def read(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The tensors ``names`` (all by default), in native byte order, each checked against
        its digest when the reader verifies; ValueError naming the first damaged one."""
        wanted = self.tensors if names is None else {k: self.tensors[k] for k in names}
        out: dict[str, np.ndarray] = {}
        for name, t in sorted(wanted.items(), key=lambda kv: kv[1].begin):
            buf = np.empty(t.nbytes, dtype=np.uint8)
            self._f.seek(t.begin)
            got = self._f.readinto(memoryview(buf))
            if got != t.nbytes:
                raise self.corrupt(f"tensor {name!r}: the file ended after {got} of its {t.nbytes} bytes")
            if self.digests is not None and tensor_digest(t.code, t.shape, buf) != self.digests[name]:
                raise self.bad(f"tensor {name!r} is damaged: its bytes, dtype or shape do not match its digest")
            arr = buf.view(t.dtype).reshape(t.shape)
            out[name] = arr if t.dtype.isnative else arr.astype(t.dtype.newbyteorder("="))
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_count(v: Any) -> bool:
    """An int >= 0 (JSON true/false are not counts)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
