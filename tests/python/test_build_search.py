"""Single-process build and search: recall against brute force, persistence,
degenerate inputs, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

import bitshard
from bitshard import IndexNotFoundError, InvalidInputError

from conftest import brute_force, clustered, recall, rowids_to_positions, write_lance


def _search_positions(ds, q, k=10, **kw):
    t = ds.search("vec", q, k=k, **kw)
    r = t.column("_rowid").to_numpy().reshape(len(q), k)
    return rowids_to_positions(ds, r), t


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("num_bits", [1, 4])
@pytest.mark.parametrize("dim", [128, 768])
def test_recall_against_brute_force(tmp_path, metric, num_bits, dim):
    n = 20000 if dim == 128 else 8000
    x = clustered(n + 50, dim, clusters=40, seed=dim + num_bits)
    if metric == "dot":
        # inner-product data: vary norms so that dot differs from cosine
        x *= np.random.default_rng(1).uniform(0.5, 1.5, size=(len(x), 1)).astype(np.float32)
    base, queries = x[:n], x[n:]
    uri = write_lance(tmp_path / "d.lance", base, n // 4)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=64, num_bits=num_bits, metric=metric)
    refine = None if num_bits == 1 else 4
    got, t = _search_positions(ds, queries, nprobes=12, refine_factor=refine)
    assert t.column_names == ["_rowid", "_distance", "query_index"]
    truth = brute_force(base, queries, 10, metric)
    r = recall(got, truth)
    assert r >= 0.95, f"recall@10 {r:.3f} for {metric} {num_bits} bit d={dim}"


def test_default_is_nine_bits_and_answers_from_codes(small_lance):
    uri, x = small_lance
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=8)
    assert ds.describe_indices()[0]["num_bits"] == 9
    t = ds.search("vec", x[:20], k=10, nprobes=8, with_stats=True)
    assert ds.last_search_stats["exact_reads"] == 0  # no source reads
    got = rowids_to_positions(ds, t.column("_rowid").to_numpy().reshape(20, 10))
    assert recall(got, brute_force(x, x[:20], 10)) >= 0.95


def test_multibit_codes_only_recall(tmp_path):
    x = clustered(20050, 128, clusters=40, seed=5)
    base, queries = x[:20000], x[20000:]
    ds = bitshard.dataset(write_lance(tmp_path / "d.lance", base, 5000))
    ds.create_index("vec", "IVF_RQ", num_partitions=64, num_bits=5)
    got, t = _search_positions(ds, queries, nprobes=12)  # no source reads
    assert recall(got, brute_force(base, queries, 10)) >= 0.9


def test_distances_are_exact_after_rerank(small_lance):
    uri, x = small_lance
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=16, num_bits=1)
    q = x[:3] + 0.01
    t = ds.search("vec", q, k=5, nprobes=16)
    pos = rowids_to_positions(ds, t.column("_rowid").to_numpy())
    exact = ((x[pos].astype(np.float64) - np.repeat(q, 5, axis=0)) ** 2).sum(1)
    np.testing.assert_allclose(t.column("_distance").to_numpy(), exact, rtol=1e-5)


def test_single_query_shape_and_columns(small_lance):
    uri, x = small_lance
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=8, num_bits=1)  # exact rerank
    t = ds.search("vec", x[10], k=3, columns=["id"])
    assert t.column_names == ["_rowid", "_distance", "id"]
    assert t.num_rows == 3
    assert t.column("id")[0].as_py() == 10  # the query is row 10 itself
    assert t.column("_distance")[0].as_py() == 0.0


def test_index_persists_and_reopens_in_new_process(small_lance):
    uri, x = small_lance
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=8)
    before = ds.search("vec", x[:5], k=5).column("_rowid").to_pylist()
    code = (
        "import bitshard, numpy as np, sys, json;"
        f"ds = bitshard.dataset({uri!r});"
        "import lance; t = lance.dataset(" + repr(uri) + ").to_table(columns=['vec']);"
        "x = np.stack(t.column('vec').to_numpy(zero_copy_only=False)[:5]).astype('float32');"
        "print(json.dumps(ds.search('vec', x, k=5).column('_rowid').to_pylist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    assert json.loads(out.stdout) == before
    assert os.path.isdir(os.path.join(uri, "_bitshard"))


def test_lance_upkeep_keeps_the_index(tmp_path):
    import lance

    x = clustered(4000, 32, seed=3)
    uri = write_lance(tmp_path / "u.lance", x, 1000)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=8)
    files_before = sorted(os.listdir(os.path.join(uri, "_bitshard", "segments")))
    # append, compact, clean up: pylance's own upkeep
    more = clustered(1000, 32, seed=4)
    lance.write_dataset(pa.table({"id": pa.array(np.arange(4000, 5000)),
                                  "vec": pa.FixedSizeListArray.from_arrays(pa.array(more.ravel()), 32)}),
                        uri, mode="append")
    lds = lance.dataset(uri)
    lds.optimize.compact_files()
    lds = lance.dataset(uri)
    from datetime import timedelta

    lds.cleanup_old_versions(older_than=timedelta(seconds=0), delete_unverified=True)
    assert sorted(os.listdir(os.path.join(uri, "_bitshard", "segments"))) == files_before
    ds2 = bitshard.dataset(uri)
    assert ds2.list_indices()[0]["name"] == "vec_idx"
    # the new/compacted fragments are searched exactly: results stay complete
    t = ds2.search("vec", more[:1], k=1, nprobes=8)
    assert t.column("_distance")[0].as_py() == pytest.approx(0.0, abs=1e-4)


def test_numpy_source_needs_index_uri_to_persist(tmp_path):
    x = clustered(3000, 16, seed=2)
    ds = bitshard.dataset(x, index_uri=tmp_path / "idx")
    ds.create_index("vector", "IVF_RQ", num_partitions=4)
    ds2 = bitshard.dataset(x, index_uri=tmp_path / "idx")
    assert ds2.search("vector", x[7], k=1).column("_rowid")[0].as_py() == 7


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_degenerate_vectors(metric):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 24)).astype(np.float32)
    x[:20] = 0.0                 # all-zero vectors
    x[20:40] = x[40]             # exact duplicates
    x[399] = 100.0               # far away: a partition of one row
    ds = bitshard.dataset(x, fragment_size=100)
    ivf = bitshard.train_ivf(ds, "vector", 8, metric=metric)
    c = ivf.centroids.copy()
    ds.create_index("vector", "IVF_RQ", ivf_centroids=c, metric=metric, num_bits=1)
    # a vector equal to its centroid: zero residual
    q = np.vstack([np.zeros(24, np.float32), x[40], x[399], c[0]])
    t = ds.search("vector", q, k=5, nprobes=8)
    d = t.column("_distance").to_numpy()
    assert np.isfinite(d).all()
    top = t.column("_rowid").to_numpy().reshape(4, 5)
    if metric == "l2":
        assert set(top[0]) <= set(range(20)) and d[0] == 0.0
        assert set(top[1]) <= set(range(20, 41))
        assert top[2][0] == (3 << 32) | 99  # row 399 = fragment 3, offset 99
    elif metric == "cosine":
        # a zero query has no direction: distance 1 to everything
        np.testing.assert_array_equal(d[:5], 1.0)
    # duplicates tie: order is by row id, deterministically
    assert list(top[1]) == sorted(top[1])


def test_bad_inputs(tmp_path, small_lance):
    uri, x = small_lance
    ds = bitshard.dataset(uri)
    with pytest.raises(IndexNotFoundError):
        ds.search("vec", x[0])
    ds.create_index("vec", "IVF_RQ", num_partitions=8)
    with pytest.raises(InvalidInputError, match="query has dimension 3, column 'vec' has 64"):
        ds.search("vec", np.zeros(3))
    q = x[0].copy()
    q[5] = np.inf
    with pytest.raises(InvalidInputError, match="non-finite value at dimension 5"):
        ds.search("vec", q)
    with pytest.raises(InvalidInputError, match="k must be"):
        ds.search("vec", x[0], k=0)
    with pytest.raises(InvalidInputError, match="num_bits must be in 1..9, got 12"):
        ds.create_index("vec", "IVF_RQ", num_partitions=8, num_bits=12)
    with pytest.raises(InvalidInputError, match="IVF_RQ"):
        ds.create_index("vec", "IVF_PQ", num_partitions=8)
    with pytest.raises(InvalidInputError, match="num_partitions"):
        ds.create_index("vec", "IVF_RQ", num_partitions=100000)
    with pytest.raises(InvalidInputError, match="unknown metric"):
        ds.create_index("vec", "IVF_RQ", num_partitions=8, metric="manhattan")


def test_nan_in_source_names_fragment_and_row(tmp_path):
    x = clustered(2000, 16, seed=9)
    x[1234, 3] = np.nan
    uri = write_lance(tmp_path / "nan.lance", x, 1000)
    ds = bitshard.dataset(uri)
    ivf = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    with pytest.raises(InvalidInputError) as e:
        ds.create_index("vec", "IVF_RQ", ivf_centroids=ivf)
    msg = str(e.value)
    assert "'vec'" in msg and "fragment 1" in msg and "row 234" in msg


def test_rows_deleted_after_the_build_are_never_returned(tmp_path):
    import lance

    x = clustered(3000, 32, seed=12)
    uri = write_lance(tmp_path / "del.lance", x, 1000)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=8)
    assert ds.search("vec", x[1500], k=1).column("_rowid")[0].as_py() == (1 << 32) | 500
    lance.dataset(uri).delete("id = 1500 OR id = 10")
    ds = bitshard.dataset(uri)  # the new version
    for q, gone in ((x[1500], (1 << 32) | 500), (x[10], 10)):
        t = ds.search("vec", q, k=5, nprobes=8)
        assert gone not in t.column("_rowid").to_pylist()
        assert len(t) == 5
