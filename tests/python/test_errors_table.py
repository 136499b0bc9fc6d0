"""Rows of docs/errors.md that no other test asserted: empty sources and
fragments, damaged segment files on a local root, an edited manifest, a
second commit of one version, an unknown index name, refine_factor and eps0
below their range. Each asserts the exception class and the message the
table gives."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bitshard
from bitshard import CommitConflictError, CorruptIndexError, InvalidInputError, MissingFileError
from bitshard import index as idx

from conftest import clustered

D = 16


def test_empty_source_is_refused_at_training(tmp_path):
    empty = bitshard.dataset(np.zeros((0, D), np.float32), index_uri=str(tmp_path / "idx"))
    with pytest.raises(InvalidInputError,
                       match=r"^num_partitions \(2\) exceeds the number of rows \(0\) "
                             r"of column 'vector'$"):
        empty.create_index("vector", "IVF_RQ", num_partitions=2)
    with pytest.raises(bitshard.IndexNotFoundError, match="no index on column 'vector'"):
        empty.search("vector", np.zeros(D, np.float32), k=1)


def test_empty_fragment_is_indexed_with_no_rows(tmp_path):
    x = clustered(300, D, seed=4)
    d = tmp_path / "pq"
    d.mkdir()
    typ = pa.list_(pa.float32(), D)
    for i, part in enumerate([x[:200], x[:0], x[200:]]):
        arr = pa.FixedSizeListArray.from_arrays(pa.array(part.ravel(), pa.float32()), D)
        pq.write_table(pa.table({"vec": pa.array(arr, typ)}), d / f"part-{i:02d}.parquet")
    ds = bitshard.dataset(str(d), index_uri=str(tmp_path / "idx"))
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=4)
    info = ds.describe_indices()[0]
    assert info["uncovered_fragments"] == []
    rowids, _ = ds.searcher("vec", k=1, nprobes=4, refine_factor=4).search(x[250])
    assert rowids.tolist() == [(2 << 32) | 50]


@pytest.fixture
def one_segment(tmp_path):
    x = clustered(400, D, seed=6)
    root = str(tmp_path / "idx")
    ds = bitshard.dataset(x, fragment_size=100, index_uri=root)
    ds.create_index("vector", "IVF_RQ", num_partitions=4, num_bits=1)
    u = ds.describe_indices()[0]["segments"][0]["uuid"]
    return x, root, os.path.join(root, "segments", u + ".bsseg")


def _search(x, root):
    return bitshard.dataset(x, fragment_size=100, index_uri=root).search("vector", x[0], k=2)


def test_damaged_segment_file_on_a_local_root(one_segment):
    x, root, path = one_segment
    good = open(path, "rb").read()
    open(path, "wb").write(good[:len(good) // 2])
    with pytest.raises(CorruptIndexError, match=f"^{path}: file truncated: segment is "
                                                f"{len(good)} bytes, file has {len(good) // 2}$"):
        _search(x, root)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    open(path, "wb").write(bytes(flipped))
    # Format 3: the open reads no partition; the search that touches the
    # damaged one refuses it, naming the segment (docs/format.md, "Validation").
    uuid = os.path.basename(path)[:-len(".bsseg")]
    with pytest.raises(CorruptIndexError,
                       match=f"^{path}: segment {uuid}: partition [0-9]+ checksum mismatch "
                             f"\\((stage-1|extra) region: stored [0-9a-f]{{16}}, "
                             f"computed [0-9a-f]{{16}}\\)$"):
        _search(x, root)
    open(path, "wb").write(b"junk" * 100)
    with pytest.raises(CorruptIndexError,
                       match=f"^{path}: bad magic at offset 0: not a bitshard segment$"):
        _search(x, root)
    os.remove(path)
    # A MissingFileError is a CorruptIndexError (and a FileNotFoundError);
    # the message says what can have removed it and what to do.
    with pytest.raises(MissingFileError,
                       match=f"^segment file is missing: {path} \\(a manifest or a handle names "
                             f"it, but it was removed: by hand, or by cleanup with an age "
                             f"shorter than a writer's write-to-commit time; refresh\\(\\) "
                             f"\\(or reopen the dataset\\) and rerun: .*\\)$"):
        _search(x, root)


def test_edited_manifest_fails_its_checksum(one_segment):
    x, root, _ = one_segment
    mpath = os.path.join(root, "indices", "vector_idx", "v00000001.json")
    text = open(mpath).read()
    open(mpath, "w").write(text.replace('"l2"', '"dot"'))
    with pytest.raises(CorruptIndexError, match="checksum"):
        idx.read_manifest(root, "vector_idx")


def test_second_commit_of_one_version_conflicts(tmp_path):
    x = clustered(200, D, seed=7)
    ds = bitshard.dataset(x, fragment_size=100, index_uri=str(tmp_path / "idx"))
    c = bitshard.train_ivf(ds, "vector", num_partitions=2)
    rot = bitshard.build_rq_rotation(D, num_bits=1, seed=3)
    a, b = (ds.create_index_uncommitted("vector", "IVF_RQ", name="idx", ivf_centroids=c,
                                        rq_rotation=rot, fragment_ids=[f]) for f in (0, 1))
    idx.commit(ds.index_root, "idx", "vector", [a], expected_version=0)
    with pytest.raises(CommitConflictError,
                       match="^index 'idx' version 1 was committed by another writer; "
                             "reload and retry$"):
        idx.commit(ds.index_root, "idx", "vector", [b], expected_version=0)


def test_unknown_index_name(one_segment):
    x, root, _ = one_segment
    ds = bitshard.dataset(x, fragment_size=100, index_uri=root)
    with pytest.raises(bitshard.IndexNotFoundError,
                       match=r"^\"no index named 'nope'; have \['vector_idx'\]\"$"):
        ds.search("vector", x[0], k=1, index="nope")


def test_refine_factor_and_eps0_below_their_range(one_segment):
    x, root, _ = one_segment
    ds = bitshard.dataset(x, fragment_size=100, index_uri=root)
    with pytest.raises(InvalidInputError, match=r"^refine_factor must be None or >= 1, got 0$"):
        ds.search("vector", x[0], k=1, refine_factor=0)
    with pytest.raises(InvalidInputError, match=r"^eps0 must be a finite number >= 0, got -1\.0$"):
        ds.search("vector", x[0], k=1, eps0=-1.0)
    with pytest.raises(InvalidInputError, match=r"^eps0 must be a finite number >= 0, got nan$"):
        ds.search("vector", x[0], k=1, eps0=float("nan"))


def test_float16_nan_and_inf_are_refused_like_any_other(one_segment):
    """Finite float16 values always qualify (65504 at most); a float16 NaN
    or infinity does not (docs/usage.md, "What values are accepted")."""
    x, root, _ = one_segment
    ds = bitshard.dataset(x, fragment_size=100, index_uri=root)
    q = x[0].astype(np.float16)
    q[3] = np.float16(65504)
    assert ds.search("vector", q, k=1).num_rows == 1
    q[3] = np.inf
    with pytest.raises(InvalidInputError, match=r"^query has a non-finite value at dimension 3"):
        ds.search("vector", q, k=1)
    y = x.astype(np.float16)
    y[150, 2] = np.nan
    with pytest.raises(InvalidInputError,
                       match=r"^column 'vector' fragment 1 row 50: non-finite value at dimension 2"):
        bitshard.dataset(y, fragment_size=100, index_uri=root + "2").create_index(
            "vector", "IVF_RQ", num_partitions=2)
