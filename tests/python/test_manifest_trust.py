"""A segment file is checked against what the manifest says it is (issue 11
item 3), and manifests and build states are validated against their schema
before any field is used (item 4)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import bitshard
from bitshard import index as idx
from bitshard.errors import CorruptIndexError

from conftest import clustered, write_lance

D = 16
UA, UB = "a" * 32, "b" * 32


@pytest.fixture
def two_segments(tmp_path):
    """An index of two committed segments (same artifacts): UA covers
    fragments 0-1, UB fragments 2-3."""
    x = clustered(1200, D, seed=6)
    uri = write_lance(tmp_path / "v.lance", x, 300)
    ds = bitshard.dataset(uri)
    ivf = bitshard.IvfModel(x[:4].copy(), "l2")
    a = ds.create_index_uncommitted("vec", name="idx", ivf_centroids=ivf, fragment_ids=[0, 1],
                                    index_uuid=UA)
    b = ds.create_index_uncommitted("vec", name="idx", ivf_centroids=ivf, fragment_ids=[2, 3],
                                    index_uuid=UB)
    ds.commit_existing_index_segments("idx", "vec", [a, b])
    return uri, x, ds, a, b


def _rewrite_manifest(ds, edit):
    """Write version 2 of 'idx': version 1 changed by ``edit(doc)``, with a
    valid checksum (the writer is hostile or buggy, not the disk)."""
    root = ds.index_root
    doc = json.load(open(os.path.join(root, "indices", "idx", "v00000001.json")))
    edit(doc)
    doc["version"] = 2
    doc["checksum"] = idx._checksum(doc)
    path = os.path.join(root, "indices", "idx", "v00000002.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def test_segment_copied_over_another_is_refused(two_segments):
    uri, x, ds, a, b = two_segments
    assert len(ds.search("vec", x[0], k=5)) == 5
    shutil.copy(a.path, b.path)  # every checksum and fingerprint still passes
    fresh = bitshard.dataset(uri)
    mpath = os.path.join(ds.index_root, "indices", "idx", "v00000001.json")
    with pytest.raises(CorruptIndexError) as e:
        fresh.search("vec", x[0], k=5)
    assert str(e.value) == (
        f"segment file {b.path} is not the segment manifest {mpath} describes: "
        f"uuid is '{UB}' there, '{UA}' in the file")
    # verify reports it too
    faults = bitshard.distributed.verify(uri)
    assert any(f"the manifest says uuid='{UB}', the file has '{UA}'" in f for f in faults)


def test_manifest_listing_a_segment_twice_is_refused(two_segments):
    uri, x, ds, a, b = two_segments

    def twice(doc):
        doc["segments"] = [doc["segments"][0], doc["segments"][0]]

    mpath = _rewrite_manifest(ds, twice)
    fresh = bitshard.dataset(uri)
    with pytest.raises(CorruptIndexError) as e:
        fresh.search("vec", x[0], k=5)
    assert str(e.value) == (f"manifest {mpath}: segment {UA} is listed twice (segments[0] and "
                            f"segments[1])")


def test_manifest_entries_with_overlapping_fragments_are_refused(two_segments):
    uri, x, ds, a, b = two_segments

    def overlap(doc):
        doc["segments"][1]["fragment_ids"] = [1, 2, 3]

    mpath = _rewrite_manifest(ds, overlap)
    with pytest.raises(CorruptIndexError) as e:
        bitshard.dataset(uri).search("vec", x[0], k=5)
    assert str(e.value) == (f"manifest {mpath}: fragment 1 is in two entries: segments[0] "
                            f"({UA}) and segments[1] ({UB})")


@pytest.mark.parametrize("field,value,shown", [
    ("fragment_ids", [2], "fragment_ids is [2] there, [2, 3] in the file"),
    ("num_rows", 601, "num_rows is 601 there, 600 in the file"),
])
def test_manifest_entry_disagreeing_with_its_file_is_refused(two_segments, field, value, shown):
    uri, x, ds, a, b = two_segments

    def edit(doc):
        doc["segments"][1][field] = value

    mpath = _rewrite_manifest(ds, edit)
    with pytest.raises(CorruptIndexError) as e:
        bitshard.dataset(uri).search("vec", x[0], k=5)
    assert str(e.value) == (f"segment file {b.path} is not the segment manifest {mpath} "
                            f"describes: {shown}")

