"""Property-based fuzzing of the Python readers of untrusted bytes: artifact
bytes and manifests. Any input either parses to a valid object or raises
CorruptIndexError (never another exception, never a wrong object). The C
segment reader has its libFuzzer target in fuzz/."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitshard
from bitshard import CorruptIndexError
from bitshard import index as idx

ROT = bitshard.build_rq_rotation(100, num_bits=3, seed=5).to_bytes()
IVF = bitshard.IvfModel(np.arange(24, dtype=np.float32).reshape(4, 6), "dot").to_bytes()


def _mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.integers(0, 64))
def test_rotation_bytes_fuzz(edits, cut):
    data = _mutate(ROT, edits)
    data = data[: len(data) - cut] if cut else data
    try:
        r = bitshard.Rotation.from_bytes(data)
    except CorruptIndexError:
        return
    assert r.to_bytes() == data  # accepted only if it is exactly canonical


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.integers(0, 200), st.binary(max_size=40))
def test_ivf_bytes_fuzz(edits, cut, extra):
    data = _mutate(IVF, edits)
    data = (data[: len(data) - cut] if cut else data) + extra
    try:
        m = bitshard.IvfModel.from_bytes(data)
    except CorruptIndexError:
        return
    assert m.to_bytes() == data


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12))
def test_manifest_reader_fuzz(tmp_path, doc):
    d = tmp_path / "indices" / "x"
    d.mkdir(parents=True, exist_ok=True)
    (d / "v00000001.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptIndexError):
        idx.read_manifest(str(tmp_path), "x")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_manifest_bytes_fuzz(tmp_path, raw):
    d = tmp_path / "indices" / "y"
    d.mkdir(parents=True, exist_ok=True)
    (d / "v00000001.json").write_bytes(raw)
    with pytest.raises(CorruptIndexError):
        idx.read_manifest(str(tmp_path), "y")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["name", "column", "version", "segments", "uuid", "fragment_ids",
                              "num_rows", "metric"]),
       value=st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2))
def test_checksummed_but_malformed_manifest_is_corrupt(tmp_path, field, value):
    """A manifest whose checksum matches but whose fields are wrong is refused
    with CorruptIndexError before any reader trips over it."""
    seg = {"uuid": "ab" * 16, "file": "segments/x.bsseg", "fragment_ids": [0], "num_rows": 1,
           "num_bits": 1, "metric": "l2", "dimension": 4, "rotation_fingerprint": "0" * 32,
           "ivf_fingerprint": "0" * 32, "size_bytes": 1}
    doc = {"format": idx.MANIFEST_FORMAT, "format_version": 1, "name": "z", "column": "vec",
           "version": 1, "segments": [seg]}
    if field in doc:
        doc[field] = value
    else:
        seg[field] = value
    doc["checksum"] = idx._checksum(doc)
    d = tmp_path / "indices" / "z"
    d.mkdir(parents=True, exist_ok=True)
    (d / "v00000001.json").write_text(json.dumps(doc))
    try:
        got = idx.read_manifest(str(tmp_path), "z")
    except CorruptIndexError:
        return
    # accepted: then every reader of it works
    idx.committed_segments(str(tmp_path), "z")
    assert isinstance(got["segments"], list)
