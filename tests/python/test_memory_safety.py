"""Memory safety at the edges: searches that find no candidate at all, run
again and again and in batches (the scratch buffers once shrank to zero bytes
and were freed twice), empty batches and k above the row count; and finite
but huge values, refused where they enter (docs/usage.md, "What values are
accepted")."""

from __future__ import annotations

import gc
import os

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


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_huge_finite_data_value_is_refused_naming_column_fragment_row(metric):
    x = clustered(300, 16, seed=4)
    x[123, 7] = 3e19
    ds = bitshard.dataset(_table(x), fragment_size=100)
    c = clustered(4, 16, seed=5)
    with pytest.raises(InvalidInputError) as e:
        ds.create_index("vec", "IVF_RQ", ivf_centroids=c, metric=metric)
    assert str(e.value) == (
        "column 'vec' fragment 1 row 23: value 3e+19 at dimension 7 is too large "
        "(accepted: finite, |value| <= 2**40 = 1099511627776.0)")


def test_huge_finite_value_in_training_sample_is_refused():
    x = clustered(300, 16, seed=4)
    x[5, 0] = -1e13
    ds = bitshard.dataset(_table(x), fragment_size=100)
    with pytest.raises(InvalidInputError, match=r"fragment 0 row 5: value -1e\+13 at "
                                                r"dimension 0 is too large"):
        ds.create_index("vec", "IVF_RQ", num_partitions=4)


def test_bound_itself_is_accepted_and_next_float_refused():
    x = clustered(300, 16, seed=4)
    x[10, 2] = 2.0**40
    x[11, 3] = -(2.0**40)
    ds = bitshard.dataset(_table(x), fragment_size=100)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=9)
    for q in (x[10], x[11]):
        t = ds.search("vec", q, k=3)
        assert t.num_rows == 3 and np.isfinite(t.column("_distance").to_numpy()).all()
    t = ds.search("vec", x[9:12], k=3)
    assert t.num_rows == 9
    y = x.copy()
    y[10, 2] = np.nextafter(np.float32(2.0**40), np.float32(np.inf))
    ds2 = bitshard.dataset(_table(y), fragment_size=100)
    with pytest.raises(InvalidInputError, match="fragment 0 row 10: value 1.09951"):
        ds2.create_index("vec", "IVF_RQ", num_partitions=4)


def test_huge_query_is_refused_naming_batch_index_and_dimension(small_index):
    ds, x = small_index
    q = x[:3].copy()
    q[2, 5] = 3e19
    with pytest.raises(InvalidInputError) as e:
        ds.search("vec", q, k=3)
    assert str(e.value) == ("query 2: value 3e+19 at dimension 5 is too large "
                            "(accepted: finite, |value| <= 2**40 = 1099511627776.0)")
    with pytest.raises(InvalidInputError) as e:
        ds.search("vec", q[2], k=3)
    assert str(e.value) == ("query: value 3e+19 at dimension 5 is too large "
                            "(accepted: finite, |value| <= 2**40 = 1099511627776.0)")
    s = ds.searcher("vec", k=3)
    for bad in (q, q[2]):
        with pytest.raises(InvalidInputError, match="value 3e\\+19 at dimension 5"):
            s.search(bad)
    # the searcher is unharmed
    rows, _ = s.search(x[4])
    assert rows[0] == 4


def test_huge_user_centroid_is_refused():
    x = clustered(300, 16, seed=4)
    ds = bitshard.dataset(_table(x), fragment_size=100)
    c = clustered(4, 16, seed=5)
    c[3, 9] = 5e20
    with pytest.raises(InvalidInputError,
                       match=r"centroids hold a value too large \(5e\+20\) at partition 3, "
                             r"dimension 9"):
        ds.create_index("vec", "IVF_RQ", ivf_centroids=c)


def test_three_e19_row_no_longer_crashes_search_of_itself():
    """The issue's example: the row was accepted, then searching for it aborted."""
    x = clustered(300, 16, seed=4)
    good = x.copy()
    x[50, 0] = 3e19
    ds = bitshard.dataset(_table(x), fragment_size=100)
    with pytest.raises(InvalidInputError, match="fragment 0 row 50"):
        ds.create_index("vec", "IVF_RQ", num_partitions=4)
    ds = bitshard.dataset(_table(good), fragment_size=100)
    ds.create_index("vec", "IVF_RQ", num_partitions=4)
    for _ in range(3):
        with pytest.raises(InvalidInputError, match="dimension 0 is too large"):
            ds.search("vec", x[50], k=3)
        with pytest.raises(InvalidInputError, match="query 1: value 3e\\+19"):
            ds.search("vec", x[49:51], k=3)
    assert ds.search("vec", good[50], k=1).column("_rowid").to_pylist() == [50]


def test_eps0_above_its_cap_is_refused(small_index):
    ds, x = small_index
    with pytest.raises(InvalidInputError, match=r"eps0 must be at most 1000, got 1001"):
        ds.search("vec", x[0], k=3, eps0=1001)
    t = ds.search("vec", x[0], k=3, eps0=1000)
    assert t.column("_rowid")[0].as_py() == 0


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_the_edges_of_the_accepted_range_give_finite_answers(metric):
    """Rows and queries at +-2**40 in every dimension (the largest norms and
    pair distances the rule allows), zero rows, and eps0 at its cap: every
    mode answers with finite distances."""
    d, m = 2048, np.float32(2.0**40)
    rng = np.random.default_rng(3)
    x = (rng.choice([-1.0, 1.0], size=(120, d)) * m).astype(np.float32)
    x[:10] *= rng.random((10, d)).astype(np.float32)
    x[10:13] = 0.0
    x[13], x[14] = m, -m
    q = np.vstack([x[13], x[14], rng.normal(size=d), np.zeros(d)]).astype(np.float32)
    for bits in (1, 4, 9):
        ds = bitshard.dataset(x, fragment_size=50)
        ds.create_index("vector", "IVF_RQ", num_partitions=3, num_bits=bits, metric=metric)
        for refine in (None, 2):
            for eps0 in (1.9, 1000):
                t = ds.search("vector", q, k=10, nprobes=3, refine_factor=refine, eps0=eps0)
                assert t.num_rows == 40
                assert np.isfinite(t.column("_distance").to_numpy()).all(), (bits, refine, eps0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="ASan keeps freed blocks in quarantine: RSS is no leak measure there")
def test_open_search_close_loop_keeps_rss_bounded(two_clusters):
    """Opening an index, searching (batch, single, empty results, a refused
    query) and dropping it, many times: the resident set stays flat (0.2 MB
    measured). Keeping one searcher per round alive, with its segments and
    scratch, grows it by 26 MB, so a leak of any of those fails the bound
    (tests/c/test_leaks.c checks the C library block by block under
    LeakSanitizer)."""
    uri, x = two_clusters
    bad = x[0].copy()
    bad[1] = 3e19

    def once():
        ds = bitshard.dataset(uri)
        for bits in (1, 9):
            s = ds.searcher("vec", k=5, index=f"b{bits}")
            s.search(x[:4])
            s.search(x[0])
            with pytest.raises(InvalidInputError):
                s.search(bad)
        ds.search("vec", x[:2], k=5, index="b4", filter="id < 0")

    for _ in range(20):  # caches and allocator pools settle first
        once()
    gc.collect()
    before = _rss_bytes()
    for _ in range(150):
        once()
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 12 * 2**20, f"RSS grew {growth / 2**20:.1f} MB over 150 rounds"
