"""Property-based fuzzing of the Python readers of untrusted bytes: artifact
bytes and manifests. Any input either parses to a valid object or raises
CorruptIndexError (never another exception, never a wrong object). The C
segment reader has its libFuzzer target in fuzz/."""

from __future__ import annotations

import json
import struct
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitshard
from bitshard import CorruptIndexError, InvalidInputError
from bitshard import artifacts
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


# Bytes with a valid checksum over fuzzed fields: random mutations almost never
# pass the checksum, and a crafted file can carry a valid one, so the checks
# behind it are fuzzed directly (as fuzz/fuzz_segment_open.c reseals segments).

def _sealed(body: bytes) -> bytes:
    return body + struct.pack("<Q", bitshard._native.hash64(body, 0))


@settings(max_examples=300, deadline=None)
@given(dim=st.sampled_from([0, 1, 3, 64, 65, 2**16, 2**16 + 1, 2**31, 2**32 - 1]),
       bits=st.sampled_from([0, 1, 9, 10, 2**32 - 1]), kind=st.integers(0, 3),
       dtype=st.integers(0, 4), seed=st.integers(0, 2**64 - 1))
def test_rotation_resealed_fields_fuzz(dim, bits, kind, dtype, seed):
    data = _sealed(artifacts._ROT_STRUCT.pack(artifacts._ROT_MAGIC, dim, bits, kind, dtype, seed))
    try:
        r = bitshard.Rotation.from_bytes(data)
    except CorruptIndexError:
        return
    assert r.to_bytes() == data
    # a matrix rotation above the C limit is refused, not accepted and failed later
    assert not (kind == 1 and r.padded_dimension > 4096)
    # accepted: then the transform it names can be made and used
    assert len(r.fingerprint) == 32
    assert r.apply(np.zeros((1, dim), np.float32)).shape == (1, r.padded_dimension)


def test_rotation_resealed_matrix_too_large_is_corrupt():
    data = _sealed(artifacts._ROT_STRUCT.pack(artifacts._ROT_MAGIC, 65536, 1, 1, 0, 0))
    with pytest.raises(CorruptIndexError, match="^rotation bytes hold bad values: matrix "
                       "rotation dimension must be <= 4096"):
        bitshard.Rotation.from_bytes(data)


def test_matrix_rotation_too_large_is_refused_when_asked_for():
    # Padded dimension 4096 is the largest matrix rotation; 4097 pads to 4160.
    assert bitshard.build_rq_rotation(4096, rotation_type="matrix").dimension == 4096
    with pytest.raises(InvalidInputError, match=r"^matrix rotation dimension must be <= 4096 "
                       r"\(padded dimension 4160 for dimension 4097"):
        bitshard.build_rq_rotation(4097, rotation_type="matrix")


@pytest.mark.parametrize("k,d,values", [
    (0, 0, []),
    (1, 0, []),
    pytest.param(1, 1, [float("nan")], id="nan"),
    pytest.param(1, 1, [float("inf")], id="inf"),
    pytest.param(1, 2, [0.0, 2.0**41], id="too-large"),
])
def test_ivf_resealed_refused_values_are_corrupt(k, d, values):
    data = _sealed(artifacts._IVF_STRUCT.pack(artifacts._IVF_MAGIC, k, d, 0)
                   + np.array(values, "<f4").tobytes())
    with pytest.raises(CorruptIndexError, match="^IVF model bytes hold bad values: "):
        bitshard.IvfModel.from_bytes(data)


@settings(max_examples=300, deadline=None)
@given(k=st.integers(1, 4), d=st.integers(1, 6), metric=st.integers(0, 4),
       hk=st.sampled_from([None, 0, 1, 2**31, 2**32 - 1]),
       hd=st.sampled_from([None, 0, 1, 2**31, 2**32 - 1]),
       values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=24, max_size=24),
       extra=st.binary(max_size=12))
def test_ivf_resealed_fields_fuzz(k, d, metric, hk, hd, values, extra):
    """Sealed bytes whose header may disagree with the payload length."""
    payload = np.array(values[: k * d], "<f4").tobytes() + extra
    body = artifacts._IVF_STRUCT.pack(artifacts._IVF_MAGIC, k if hk is None else hk,
                                      d if hd is None else hd, metric) + payload
    data = _sealed(body)
    try:
        m = bitshard.IvfModel.from_bytes(data)
    except CorruptIndexError:
        return
    assert m.to_bytes() == data
    assert len(m.fingerprint) == 32
