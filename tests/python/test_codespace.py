"""The code space value: one comparison, messages that name the field that
differs with both values."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import bitshard
from bitshard import ArtifactMismatchError
from bitshard import index as idx
from bitshard.codespace import CodeSpace, Difference

from conftest import clustered


def _space(**changes):
    base = dict(dimension=64, column="vec", metric="l2", num_bits=1,
                rotation_fingerprint="a" * 32, ivf_fingerprint="b" * 32)
    base.update(changes)
    return CodeSpace(**base)


def test_differences_name_every_field_in_order():
    a = _space()
    assert a.differences(_space()) == []
    assert a.first_difference(_space()) is None
    b = _space(column="emb", ivf_fingerprint="c" * 32, dimension=65)
    assert a.differences(b) == [
        Difference("dimension", "dimension", 64, 65),
        Difference("column", "column", "vec", "emb"),
        Difference("ivf_fingerprint", "centroids", "b" * 32, "c" * 32),
    ]
    assert a.first_difference(b).describe() == "dimension differs: 64 vs 65"
    with pytest.raises(ArtifactMismatchError,
                       match=f"^ctx: rotation differs: '{'a' * 32}' vs '{'d' * 32}'$"):
        a.require_same(_space(rotation_fingerprint="d" * 32), "ctx")


def test_manifest_column_differing_from_its_segment_is_named(tmp_path):
    """A manifest whose column is not its segment's: the open-time check names
    the column and both values (it used to print two equal fingerprints)."""
    x = clustered(2000, 64, seed=3)
    ds = bitshard.dataset(x)
    ds.create_index("vector", "IVF_RQ", name="idx", num_partitions=4)
    path = os.path.join(ds.index_root, "indices", "idx", "v00000001.json")
    with open(path) as f:
        doc = json.load(f)
    doc["column"] = "other"
    doc["checksum"] = idx._checksum(doc)
    with open(path, "w") as f:
        json.dump(doc, f)
    fresh = bitshard.Dataset(ds.source, index_uri=ds.index_root)
    seg = doc["segments"][0]["uuid"]
    with pytest.raises(ArtifactMismatchError) as e:
        fresh.search("other", np.zeros(64, np.float32), index="idx")
    assert str(e.value) == (f"segment {seg} on disk does not match index 'idx' (file vs "
                            f"manifest): column differs: 'vector' vs 'other'")
