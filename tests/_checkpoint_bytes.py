"""Taking checkpoint files apart and putting them back together, for the integrity and fuzz tests.

A safetensors file is ``u64 little-endian header length | JSON header | tensor bytes``; the
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets into the tensor bytes) and holds the metadata under ``"__metadata__"``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import gpubp as gp
from gpubp import checkpoint_file as cf


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """(header as a dict, in file order; the tensor bytes)."""
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict[str, Any] | str | bytes, data: bytes) -> bytes:
    """The file of ``header`` (a dict, or the header text itself) and tensor bytes ``data``."""
    text = header if isinstance(header, (str, bytes)) else json.dumps(header, separators=(",", ":"))
    body = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(body)) + body + data


def tensors(raw: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype code, shape, bytes), in file order."""
    header, data = split(raw)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def build(metadata: dict[str, str], table: dict[str, tuple[str, list[int], bytes]], sign: bool = True) -> bytes:
    """A file of these tensors (laid out in the order given) and metadata; with ``sign`` the
    digests are recomputed as save computes them (a file whose contents were edited on purpose)."""
    md = dict(metadata)
    if sign:
        digests = {k: cf.tensor_digest(code, shape, b) for k, (code, shape, b) in table.items()}
        md["digests"] = json.dumps({"algorithm": cf.DIGEST, "tensors": digests,
                                    "metadata": cf.metadata_digest(md, digests)})
    header: dict[str, Any] = {"__metadata__": md}
    pos = 0
    for k, (code, shape, b) in table.items():
        header[k] = {"dtype": code, "shape": shape, "data_offsets": [pos, pos + len(b)]}
        pos += len(b)
    return join(header, b"".join(b for _, _, b in table.values()))


def edit(raw: bytes, sign: bool = True, **changes: Any) -> bytes:
    """``raw`` with metadata entries replaced (a value of None deletes the entry; a dict or
    list is written as JSON), re-signed when ``sign``."""
    header, _ = split(raw)
    md = dict(header["__metadata__"])
    for k, v in changes.items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v if isinstance(v, str) else json.dumps(v)
    return build(md, tensors(raw), sign=sign)


def meaning(ck: Any) -> tuple:
    """What a loaded checkpoint holds, comparable with ==: architecture, epoch, parameter
    bytes, optimizer and schedule state, progress."""
    opt = None
    if ck.optimizer is not None:
        sd = ck.optimizer.state_dict()
        opt = (json.dumps(sd["meta"], sort_keys=True),
               tuple(sorted((k, v.dtype.str, v.shape, v.tobytes()) for k, v in sd["state"].items())))
    sched = None if ck.scheduler is None else json.dumps(ck.scheduler.state_dict(), sort_keys=True)
    return (json.dumps(ck.model.config(), sort_keys=True), ck.model.epoch, ck.model.arena.data.dtype.str,
            ck.model.arena.data.tobytes(), opt, sched, json.dumps(ck.progress, sort_keys=True))


def small_checkpoint(kind: str) -> bytes:
    """The bytes of a small real checkpoint: "adam" (Dense, Dropout, Dense in float32; Adam with
    AMSGrad, a StepLR schedule, progress) or "sgd" (float64, SGD with momentum, nothing else),
    both after one optimizer step so that every state buffer holds something."""
    import os
    import tempfile

    import numpy as np

    if kind == "adam":
        model = gp.Sequential(gp.Dense(3, 4, "relu"), gp.Dropout(0.25), gp.Dense(4, 2), dtype="float32", seed=1)
        opt = gp.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
        sched = gp.schedules.StepLR(opt, step_size=2)
        progress: dict[str, Any] | None = {"epoch": 1, "step_in_epoch": 3, "order_seed": [7, 1]}
    else:
        model = gp.Sequential(gp.Dense(2, 3, gp.Activation("leaky_relu", slope=0.2)), gp.Dense(3, 1),
                              dtype="float64", seed=2)
        opt = gp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched, progress = None, None
    x = np.linspace(-1, 1, 5 * model.layers[0].in_features).reshape(5, -1)
    model.backward(gp.losses.MSE()(model(x), np.ones((5, model.out_features)))[1])
    opt.step()
    if sched is not None:
        sched.step()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.safetensors")
        gp.save(path, model, opt, sched, progress=progress)
        with open(path, "rb") as f:
            return f.read()
