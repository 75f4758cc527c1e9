"""Fuzzing ``gp.load`` with damaged and hostile checkpoints (hypothesis, derandomized for CI).

Real checkpoints are mutated: bytes flipped, cut, inserted or removed anywhere; the header
length field rewritten; any value of the header or of the JSON inside the metadata deleted
or replaced by arbitrary JSON, with the digests left as they were (damage) or recomputed (a
file edited on purpose, so that the checks behind the digests are exercised too).

The property: ``load`` returns, or raises ValueError/TypeError naming the file; never
another exception, never more than a few seconds, never more than 1 MiB allocated for a
4 KB file (so a header that declares a huge tensor is refused before allocation). When the
digests were not recomputed and ``verify`` is on, a load that succeeds must give exactly
what the original file held.
"""

from __future__ import annotations

import json
import math
import struct
import time
import tracemalloc

import pytest
from _checkpoint_bytes import build, join, meaning, small_checkpoint, split, tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpubp as gp

ORIGINALS = {"adam": small_checkpoint("adam"), "sgd": small_checkpoint("sgd")}
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
JSON_ENTRIES = ("model", "optimizer", "scheduler", "progress", "digests")  # metadata entries that hold JSON
NAME = "fuzz.safetensors"


@pytest.fixture(scope="module")
def spot(tmp_path_factory):
    """(the path each example writes, the meaning of each original file)."""
    path = tmp_path_factory.mktemp("fuzz") / NAME
    refs = {}
    for kind, raw in ORIGINALS.items():
        path.write_bytes(raw)
        refs[kind] = meaning(gp.load(path))
    return path, refs


def attempt(path, raw: bytes, verify: bool = True):
    """The meaning of ``load(raw)``, or None when it was refused as the property allows."""
    path.write_bytes(raw)
    tracemalloc.start()  # only around load: tracing hypothesis too would make the test slow
    t0 = time.perf_counter()
    try:
        ck = gp.load(path, verify=verify)
        got = meaning(ck)
    except (ValueError, TypeError) as e:
        assert NAME in str(e), f"the message does not name the file: {e}"
        got = None
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 5.0, f"load took {elapsed:.1f} s"
    assert peak < 2**20, f"load allocated {peak} bytes for a {len(raw)}-byte file"
    return got


# --- raw bytes ------------------------------------------------------------------------------------


@st.composite
def damaged(draw):
    """(original kind, damaged bytes, a description)."""
    kind = draw(st.sampled_from(sorted(ORIGINALS)))
    raw = bytearray(ORIGINALS[kind])
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    pos = st.one_of(st.integers(0, header_end - 1), st.integers(header_end, len(raw) - 1))  # header or data
    op = draw(st.sampled_from(["flip", "flip", "cut", "insert", "delete", "append", "splice header"]))
    if op == "flip":
        for p, x in draw(st.lists(st.tuples(pos, st.integers(1, 255)), min_size=1, max_size=4)):
            raw[p] ^= x
    elif op == "cut":
        del raw[draw(st.integers(0, len(raw) - 1)) :]
    elif op == "insert":
        p = draw(pos)
        raw[p:p] = draw(st.binary(min_size=1, max_size=16))
    elif op == "delete":
        p = draw(pos)
        del raw[p : p + draw(st.integers(1, 64))]
    elif op == "append":
        raw += draw(st.binary(min_size=1, max_size=64))
    else:  # replace a stretch of the header text and fix the length field: the JSON parser sees it
        a = draw(st.integers(8, header_end - 1))
        b = draw(st.integers(a, min(header_end, a + 16)))
        text = draw(st.one_of(st.binary(max_size=16), st.text(max_size=8).map(str.encode),
                              st.sampled_from([b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"1e999", b"-1",
                                               b"null", b"NaN", b"\\u0000", b"\xff"])))
        header = bytes(raw[8:a]) + text + bytes(raw[b:header_end])
        raw = bytearray(struct.pack("<Q", len(header)) + header + bytes(raw[header_end:]))
    return kind, bytes(raw), op


@settings(max_examples=300, **FUZZ)
@given(case=damaged(), verify=st.booleans())
def test_damaged_bytes_are_refused_or_harmless(spot, case, verify):
    path, refs = spot
    kind, raw, op = case
    got = attempt(path, raw, verify)
    if verify and got is not None:
        assert got == refs[kind], f"{op}: a changed file loaded as something else"


@settings(max_examples=60, **FUZZ)
@given(kind=st.sampled_from(sorted(ORIGINALS)),
       length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 5000), st.sampled_from([2**63, 2**64 - 1, 100_000_001])))
def test_any_header_length_is_refused_or_harmless(spot, kind, length):
    path, refs = spot
    raw = ORIGINALS[kind]
    got = attempt(path, struct.pack("<Q", length) + raw[8:])
    assert got is None or got == refs[kind]


# --- the header and the metadata as JSON trees -------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(["F32", "F64", "I32", "BOOL", "Adam", "SGD", "StepLR", "Dense", "Dropout", "relu", "float32",
                       "param.0.weight", "0.weight", "sha256", "2", "1"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def tree(raw: bytes) -> dict:
    """The header with every JSON metadata entry parsed, so that mutations can reach inside it."""
    header, _ = split(raw)
    md = header["__metadata__"]
    for k in JSON_ENTRIES:
        if k in md:
            md[k] = json.loads(md[k])
    return header


def paths(node, prefix=()):
    """Every path to a value inside ``node`` (dict keys and list indices)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from paths(v, (*prefix, k))


def _dumped(md: dict) -> dict:
    """The metadata with its JSON entries written back as text, as save writes them."""
    return {k: json.dumps(v) if k in JSON_ENTRIES else v for k, v in md.items()}


@st.composite
def edited(draw):
    """(original kind, edited bytes, whether the digests were recomputed, a description)."""
    kind = draw(st.sampled_from(sorted(ORIGINALS)))
    raw = ORIGINALS[kind]
    t = tree(raw)
    md = t["__metadata__"]
    # First the part of the file, then a value in it: each JSON entry is reached as often as
    # the tensor table, which holds most of the values.
    area = draw(st.sampled_from(["tensor table", "huge tensor", "metadata", *(k for k in JSON_ENTRIES if k in md)]))
    if area == "huge tensor":  # a tensor declared far larger than the file, its size consistent or not
        name = draw(st.sampled_from(sorted(k for k in t if k != "__metadata__")))
        shape = draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=3))
        size = 4 * math.prod(shape)
        begin = t[name]["data_offsets"][0]
        ends = st.one_of(st.just(begin + size), st.integers(begin, 2**64), st.sampled_from([2**31, 2**63]))
        t[name] = {"dtype": "F32", "shape": shape, "data_offsets": [begin, draw(ends)]}
        return kind, join(t | {"__metadata__": _dumped(md)}, split(raw)[1]), False, f"huge {name}"
    if area == "tensor table":
        choices = [p for p in paths(t) if p[0] != "__metadata__"]
    elif area == "metadata":
        choices = [("__metadata__", k) for k in md]
    else:
        choices = [("__metadata__", area), *(("__metadata__", area, *p) for p in paths(md[area]))]
    where = draw(st.sampled_from(sorted(choices, key=repr)))
    parent = t
    for k in where[:-1]:
        parent = parent[k]
    key = where[-1]
    op = draw(st.sampled_from(["delete", "replace", "replace", "number"]))
    if op == "delete":
        del parent[key]
    elif op == "number" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = draw(st.sampled_from([-1, 0, 1, 2**31, 2**64, 10**400, 0.5, -0.0]))
    else:
        parent[key] = draw(JSON_VALUES)
    md = t.get("__metadata__")
    if isinstance(md, dict):
        md = t["__metadata__"] = _dumped(md)
    sign = draw(st.booleans()) and isinstance(md, dict) and all(isinstance(v, str) for v in md.values())
    if sign:  # the tensors as they are in the file, the edited metadata, fresh digests
        table = tensors(raw)
        out = build({k: v for k, v in md.items() if k != "digests"}, table, sign=True)
        header, data = split(out)
        for name, entry in t.items():  # keep an edit of the tensor table itself
            if name != "__metadata__":
                header[name] = entry
        for name in [n for n in header if n != "__metadata__" and n not in t]:
            del header[name]
        return kind, join(header, data), True, f"{op} {where}"
    return kind, join(t, split(raw)[1]), False, f"{op} {where}"


@settings(max_examples=400, **FUZZ)
@given(case=edited())
def test_edited_headers_and_metadata_are_refused_or_harmless(spot, case):
    path, refs = spot
    kind, raw, signed, what = case
    got = attempt(path, raw)
    if not signed and got is not None:
        assert got == refs[kind], f"{what}: an edited file loaded as something else"
