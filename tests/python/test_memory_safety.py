"""Memory safety at the edges: searches that find no candidate at all, run
again and again and in batches (the scratch buffers once shrank to zero bytes
and were freed twice), empty batches and k above the row count."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import bitshard
from bitshard import InvalidInputError

from conftest import clustered, write_lance


def _two_clusters(n_per: int = 500, d: int = 16) -> np.ndarray:
    """Fragment 0 holds rows near +10, fragment 1 rows near -10: with one
    probe, a query near +10 never reaches fragment 1's partition."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(n_per, d)).astype(np.float32) + 10.0
    b = rng.normal(size=(n_per, d)).astype(np.float32) - 10.0
    return np.vstack([a, b]).astype(np.float32)


@pytest.fixture(scope="module")
def two_clusters(tmp_path_factory):
    x = _two_clusters()
    uri = write_lance(tmp_path_factory.mktemp("empty") / "e.lance", x, 500)
    ds = bitshard.dataset(uri)
    c = np.vstack([x[:500].mean(0), x[500:].mean(0)]).astype(np.float32)
    for bits in (1, 4, 9):
        ds.create_index("vec", "IVF_RQ", name=f"b{bits}", ivf_centroids=c, num_bits=bits)
    return uri, x


@pytest.mark.parametrize("bits", [1, 4, 9])
@pytest.mark.parametrize("refine", [None, 2])
def test_filter_matching_nothing_again_and_in_a_batch(two_clusters, bits, refine):
    uri, x = two_clusters
    ds = bitshard.dataset(uri)
    for _ in range(4):
        t = ds.search("vec", x[0], k=5, index=f"b{bits}", refine_factor=refine,
                      filter="id < 0")
        assert t.num_rows == 0
    t = ds.search("vec", x[:2], k=5, index=f"b{bits}", refine_factor=refine,
                  filter="id < 0")
    assert t.num_rows == 0
    # and the searcher still answers ordinary queries afterwards
    t = ds.search("vec", x[3], k=1, index=f"b{bits}", refine_factor=refine)
    assert t.column("_rowid").to_pylist() == [3]


@pytest.mark.parametrize("bits", [1, 9])
def test_fragment_ids_outside_the_probed_partitions(two_clusters, bits):
    uri, x = two_clusters
    ds = bitshard.dataset(uri)
    for _ in range(3):
        t = ds.search("vec", x[0], k=5, nprobes=1, index=f"b{bits}", fragment_ids=[1])
        assert t.num_rows == 0
    t = ds.search("vec", x[:2], k=5, nprobes=1, index=f"b{bits}", fragment_ids=[1])
    assert t.num_rows == 0
    s = ds.searcher("vec", k=5, nprobes=1, index=f"b{bits}", fragment_ids=[1])
    for _ in range(3):
        rows, dists = s.search(x[0])
        assert (rows == bitshard.NO_ROW).all() and np.isinf(dists).all()
    rows, dists = s.search(x[:3])
    assert (rows == bitshard.NO_ROW).all()


def test_filter_matching_only_rows_appended_after_the_build(tmp_path):
    import lance

    x = clustered(1000, 16, seed=21)
    uri = write_lance(tmp_path / "app.lance", x, 500)
    bitshard.dataset(uri).create_index("vec", "IVF_RQ", num_partitions=4, num_bits=4)
    new = clustered(10, 16, seed=22)
    lance.write_dataset(pa.table({
        "id": pa.array(np.arange(1000, 1010, dtype=np.int64)),
        "vec": pa.FixedSizeListArray.from_arrays(pa.array(new.ravel()), 16)}),
        uri, mode="append")
    ds = bitshard.dataset(uri)
    for _ in range(3):
        t = ds.search("vec", new[0], k=3, filter="id >= 1000")
        assert t.num_rows == 3
        assert t.column("_distance")[0].as_py() == 0.0
    t = ds.search("vec", new[:2], k=3, filter="id >= 1000")
    assert t.num_rows == 6


def _table(x: np.ndarray) -> pa.Table:
    return pa.table({"vec": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()),
                                                               x.shape[1])})


@pytest.fixture(scope="module")
def small_index():
    x = clustered(400, 16, seed=7)
    ds = bitshard.dataset(_table(x), fragment_size=100)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=4)
    return ds, x


def test_batch_of_no_queries_and_k_above_the_row_count(small_index):
    ds, x = small_index
    t = ds.search("vec", np.zeros((0, 16), np.float32), k=3)
    assert t.num_rows == 0 and t.schema.names == ["_rowid", "_distance", "query_index"]
    s = ds.searcher("vec", k=3)
    rows, dists = s.search(np.zeros((0, 16), np.float32))
    assert rows.shape == (0, 3) and dists.shape == (0, 3)
    for _ in range(2):
        t = ds.search("vec", x[0], k=1000, nprobes=4)
        assert t.num_rows == 400
        assert sorted(t.column("_rowid").to_pylist()) == sorted(
            (i // 100) << 32 | (i % 100) for i in range(400))
    s = ds.searcher("vec", k=1000, nprobes=4)
    rows, _ = s.search(x[:2])
    assert rows.shape == (2, 1000) and ((rows != bitshard.NO_ROW).sum(1) == 400).all()
