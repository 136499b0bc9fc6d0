"""Fuzzing of the readers of bitshard's JSON documents: manifests
(``index.read_manifest``) and build states (``schema.read_build_state``).

Structure-aware: a valid document has one field replaced by an arbitrary
JSON value (or removed, or an extra field added), its checksum recomputed so
the schema itself is exercised, and it is read back; byte-level: the bytes
of a valid document are edited, cut, or wrapped in deep nesting. Whatever
the input, the reader returns a document whose fields have their types and
ranges, or raises CorruptIndexError: never another exception."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitshard import index as idx
from bitshard import names, schema
from bitshard.errors import CorruptIndexError

FP = "0123456789abcdef" * 2


def _entry(i: int, frags):
    return {"uuid": f"{i:032x}", "file": f"segments/{i:032x}.bsseg", "fragment_ids": frags,
            "num_rows": 100 * len(frags), "num_bits": 4, "metric": "l2", "dimension": 8,
            "rotation_fingerprint": FP, "ivf_fingerprint": FP, "size_bytes": 4096}


def _manifest():
    doc = {"format": "bitshard-manifest", "format_version": 1, "name": "idx", "column": "vec",
           "version": 1, "created_at": 1.5, "source_version": 3,
           "segments": [_entry(1, [0, 1]), _entry(2, [2])], "metric": "l2", "num_bits": 4,
           "dimension": 8, "rotation_fingerprint": FP, "ivf_fingerprint": FP}
    doc["checksum"] = idx._checksum(doc)
    return doc


def _build_state():
    return {"format": "bitshard-build", "format_version": 1, "name": "idx",
            "index_type": "IVF_RQ",
            "params": {"column": "vec", "metric": "l2", "num_partitions": 4, "num_bits": None,
                       "sample_rate": 256, "max_iters": 50, "seed": 1, "ivf_centroids": None,
                       "rq_rotation": None},
            "source": {"kind": "lance", "uri": "/data/v.lance", "version": 2},
            "rotation": "00ff", "rotation_seed": 7, "ivf_file": "idx.ivf",
            "ivf_fingerprint": FP,
            "tasks": [{"id": 0, "fragment_ids": [0, 1], "num_rows": 200},
                      {"id": 1, "fragment_ids": [2], "num_rows": 100}],
            "segments": {"0": "a" * 32}, "merges": [{"inputs": ["a" * 32, "b" * 32],
                                                     "uuid": "c" * 32}],
            "created_at": 2.0}


def _paths(doc, prefix=()):
    """Every path to a value inside ``doc``."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


MANIFEST_PATHS = _paths(_manifest())
STATE_PATHS = _paths(_build_state())

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
    | st.sampled_from(["l2", "dot", "cosine", "bogus", "2", "../x", "a" * 32, "A" * 32, FP,
                       "segments/../../x.bsseg", "", ".."]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=16)

EDITS = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10**6), VALUES),
    st.tuples(st.just("del"), st.integers(0, 10**6), st.none()),
    st.tuples(st.just("add"), st.integers(0, 10**6), VALUES),
    st.tuples(st.just("deep"), st.integers(0, 10**6), st.integers(1, 400)),
)


def _apply(doc, paths, edits):
    for kind, pick, value in edits:
        path = paths[pick % len(paths)]
        parent, node = None, doc
        try:
            for p in path:
                parent, node = node, node[p]
        except (KeyError, IndexError, TypeError):
            continue
        if kind == "deep":
            value = json.loads("[" * value + "]" * value)
        if kind in ("set", "deep"):
            if parent is None:
                doc = value
            else:
                parent[path[-1]] = value
        elif kind == "del" and parent is not None:
            del parent[path[-1]]
        elif kind == "add" and isinstance(node, dict):
            node[f"extra{pick % 7}"] = value
    return doc


def _dumps(doc):
    try:
        return json.dumps(doc).encode()
    except RecursionError:  # nesting json itself cannot write: build it by hand
        return b"[" * 5000 + b"]" * 5000


def _check_manifest(doc):
    """What a reader may rely on after read_manifest succeeds."""
    assert isinstance(doc["name"], str) and isinstance(doc["column"], str)
    assert 1 <= doc["version"] <= names.MAX_VERSION
    seen, frags = set(), set()
    for e in doc["segments"]:
        assert names.is_uuid(e["uuid"]) and e["uuid"] not in seen
        seen.add(e["uuid"])
        for f in e["fragment_ids"]:
            assert type(f) is int and 0 <= f < 2**32 and f not in frags
            frags.add(f)
        assert e["metric"] in ("l2", "cosine", "dot") and 1 <= e["num_bits"] <= 9
        for k in ("num_rows", "dimension"):
            assert type(e[k]) is int and e[k] >= 0


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(EDITS, min_size=1, max_size=3), reseal=st.booleans())
def test_manifest_reader_fuzz_structured(tmp_path, edits, reseal):
    doc = _apply(copy.deepcopy(_manifest()), MANIFEST_PATHS, edits)
    if reseal and isinstance(doc, dict):
        try:
            doc["checksum"] = idx._checksum(doc)
        except (RecursionError, ValueError):
            pass
    d = tmp_path / "indices" / "idx"
    d.mkdir(parents=True, exist_ok=True)
    (d / "v00000001.json").write_bytes(_dumps(doc))
    try:
        got = idx.read_manifest(str(tmp_path), "idx")
    except CorruptIndexError:
        return
    _check_manifest(got)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=3)), max_size=4),
       cut=st.integers(0, 50), wrap=st.integers(0, 100_000))
def test_manifest_reader_fuzz_bytes(tmp_path, edits, cut, wrap):
    data = bytearray(json.dumps(_manifest()).encode())
    for pos, b in edits:
        p = pos % len(data)
        data[p:p + len(b)] = b
    data = bytes(data[: len(data) - cut] if cut else data)
    if wrap:
        data = b"[" * wrap + data + b"]" * wrap
    d = tmp_path / "indices" / "idx"
    d.mkdir(parents=True, exist_ok=True)
    (d / "v00000001.json").write_bytes(data)
    try:
        got = idx.read_manifest(str(tmp_path), "idx")
    except CorruptIndexError:
        return
    _check_manifest(got)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(EDITS, min_size=1, max_size=3))
def test_build_state_reader_fuzz_structured(edits):
    doc = _apply(copy.deepcopy(_build_state()), STATE_PATHS, edits)
    try:
        got = schema.read_build_state(_dumps(doc), "builds/idx.json")
    except CorruptIndexError:
        return
    # what build_index and cleanup rely on
    for k, u in got["segments"].items():
        assert names.is_uuid(u) and 0 <= int(k) < len(got["tasks"])
    for m in got["merges"]:
        assert names.is_uuid(m["uuid"]) and all(names.is_uuid(u) for u in m["inputs"])
    for i, t in enumerate(got["tasks"]):
        assert t["id"] == i and all(type(f) is int and 0 <= f < 2**32 for f in t["fragment_ids"])
    bytes.fromhex(got["rotation"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=3)), max_size=4),
       cut=st.integers(0, 50), wrap=st.integers(0, 100_000))
def test_build_state_reader_fuzz_bytes(edits, cut, wrap):
    data = bytearray(json.dumps(_build_state()).encode())
    for pos, b in edits:
        p = pos % len(data)
        data[p:p + len(b)] = b
    data = bytes(data[: len(data) - cut] if cut else data)
    if wrap:
        data = b'{"x": ' + b"[" * wrap + data + b"]" * wrap + b"}"
    try:
        schema.read_build_state(data, "builds/idx.json")
    except CorruptIndexError:
        pass


def test_valid_documents_pass():
    """The fuzzers start from documents the readers accept."""
    assert schema.read_build_state(json.dumps(_build_state()).encode(), "s") == _build_state()
    doc = _manifest()
    assert schema.read_document(json.dumps(doc).encode(), "m", "manifest", "bitshard-manifest",
                                1, schema.Manifest, idx._checksum) == doc


@pytest.mark.parametrize("data,depth", [
    (b"", 0), (b"{}", 1), (b'{"a": [[1], {"b": []}]}', 4), (b'["[[[[", "\\"[["]', 1),
    (b'"\\\\" [[', 2), (b"[" * 50, 50), (b'"unterminated [[[', 3),
])
def test_json_depth(data, depth):
    assert schema.json_depth(data) == depth
