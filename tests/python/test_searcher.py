"""Prepared searches (ds.searcher): the one-query fast path answers exactly
like the batch path and like ds.search, pins its index version, pads short
results, and refuses bad queries with the same errors."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest

import bitshard
from bitshard import NO_ROW, InvalidInputError

from conftest import brute_force, clustered, recall, rowids_to_positions, write_lance


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """One Lance source with a 1-bit and a 9-bit index on two columns."""
    x = clustered(6000, 64, seed=3)
    d = tmp_path_factory.mktemp("searcher")
    extra = {"vec9": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)}
    uri = write_lance(d / "s.lance", x, 1500, extra=extra)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", name="one", num_partitions=16, num_bits=1)
    ds.create_index("vec9", "IVF_RQ", name="nine", num_partitions=16, num_bits=9)
    return uri, x


def _queries(x, n=20, seed=0):
    rng = np.random.default_rng(seed)
    return (x[rng.choice(len(x), n, replace=False)]
            + rng.normal(scale=0.1, size=(n, x.shape[1]))).astype(np.float32)


@pytest.mark.parametrize("column,refine", [("vec", None), ("vec", 3), ("vec9", None),
                                           ("vec9", 2)])
def test_one_query_path_equals_batch_path_and_ds_search(indexed, column, refine):
    uri, x = indexed
    ds = bitshard.dataset(uri)
    Q = _queries(x)
    s = ds.searcher(column, k=10, nprobes=4, refine_factor=refine)
    rows_b, dists_b = s.search(Q)
    assert rows_b.shape == (20, 10) and rows_b.dtype == np.uint64
    assert dists_b.shape == (20, 10) and dists_b.dtype == np.float32
    for i, q in enumerate(Q):
        r, d = s.search(q)
        np.testing.assert_array_equal(r, rows_b[i])
        np.testing.assert_array_equal(d, dists_b[i])
        t = ds.search(column, q, k=10, nprobes=4, refine_factor=refine)
        np.testing.assert_array_equal(t.column("_rowid").to_numpy(), r)
        np.testing.assert_array_equal(t.column("_distance").to_numpy(), d)
    # and the answer is a good one (a fixed k * r rerank of 1-bit codes at d = 64
    # is the weak setting)
    got = rowids_to_positions(ds, rows_b)
    assert recall(got, brute_force(x, Q, 10)) >= (0.9 if refine is None else 0.5)


def test_other_dtypes_and_layouts_give_the_float32_answer(indexed):
    uri, x = indexed
    s = bitshard.dataset(uri).searcher("vec9", k=5, nprobes=4)
    q = _queries(x, 1)[0]
    r, d = s.search(q)
    for other in (q.astype(np.float64), np.repeat(q, 2)[::2], q.astype(np.float16)):
        r2, _ = s.search(other)
        if other.dtype == np.float16:
            assert len(set(r2) & set(r)) >= 4
        else:
            np.testing.assert_array_equal(r2, r)


def test_short_results_are_padded(tmp_path):
    x = clustered(40, 16, seed=4)
    ds = bitshard.dataset(x, index_uri=str(tmp_path / "idx"), fragment_size=20)
    ds.create_index("vector", "IVF_RQ", num_partitions=2, num_bits=4)
    s = ds.searcher("vector", k=50, nprobes=2)
    r, d = s.search(x[0])
    assert (r[:40] != NO_ROW).all() and (r[40:] == NO_ROW).all()
    assert np.isfinite(d[:40]).all() and np.isinf(d[40:]).all()
    assert sorted(rowids_to_positions(ds, r[:40]).tolist()) == list(range(40))
    rb, db = s.search(x[:3])
    assert rb.shape == (3, 50) and (rb[:, 40:] == NO_ROW).all()
    np.testing.assert_array_equal(rb[0], r)


def test_bad_queries_and_settings(indexed):
    uri, x = indexed
    ds = bitshard.dataset(uri)
    s = ds.searcher("vec9", k=3, nprobes=2)
    with pytest.raises(InvalidInputError, match="query has dimension 63, column 'vec9' has 64"):
        s.search(np.zeros(63, np.float32))
    q = x[0].copy()
    q[5] = np.nan
    with pytest.raises(InvalidInputError, match="non-finite value at dimension 5"):
        s.search(q)
    with pytest.raises(InvalidInputError, match="query 1 has a non-finite value at dimension 5"):
        s.search(np.stack([x[0], q]))
    with pytest.raises(InvalidInputError, match="query must be numeric"):
        s.search(np.array(["a"] * 64))
    with pytest.raises(InvalidInputError, match="1-D or 2-D"):
        s.search(np.zeros((1, 1, 64), np.float32))
    with pytest.raises(InvalidInputError, match="k must be an integer >= 1, got 0"):
        ds.searcher("vec9", k=0)
    with pytest.raises(InvalidInputError, match="nprobes must be an integer >= 1, got True"):
        ds.searcher("vec9", nprobes=True)
    with pytest.raises(InvalidInputError, match="eps0 must be a finite number >= 0, got -1"):
        ds.searcher("vec9", eps0=-1)
    with pytest.raises(InvalidInputError, match="refine_factor must be None or >= 1"):
        ds.searcher("vec9", refine_factor=0)


def test_searcher_keeps_its_version_and_ds_search_sees_new_commits(tmp_path):
    x = clustered(3000, 32, seed=5)
    ds = bitshard.dataset(x, index_uri=str(tmp_path / "idx"), fragment_size=1000)
    ivf = bitshard.train_ivf(ds, "vector", 8)
    rot = bitshard.build_rq_rotation(32, num_bits=9)
    seg = ds.create_index_uncommitted("vector", "IVF_RQ", name="v", ivf_centroids=ivf,
                                      rq_rotation=rot, fragment_ids=[0, 1], num_bits=9)
    ds.commit_existing_index_segments("v", "vector", [seg])
    old = ds.searcher("vector", k=1, nprobes=8, fast_search=True)
    target = x[2500]  # in fragment 2, which the first index does not cover
    assert ds.search("vector", target, k=1, nprobes=8, fast_search=True).column(
        "_rowid")[0].as_py() != (2 << 32) | 500
    ds.create_index("vector", "IVF_RQ", name="v", num_partitions=8, num_bits=9, replace=True)
    r, _ = old.search(target)
    assert r[0] != (2 << 32) | 500  # the old searcher still answers from version 1
    t = ds.search("vector", target, k=1, nprobes=8, fast_search=True)
    assert t.column("_rowid")[0].as_py() == (2 << 32) | 500
    assert ds.searcher("vector", k=1, nprobes=8).search(target)[0][0] == (2 << 32) | 500


def test_uncovered_fragments_are_scanned_exactly_by_the_one_query_path(tmp_path):
    import lance

    x = clustered(3000, 32, seed=6)
    uri = write_lance(tmp_path / "u.lance", x[:2000], 1000)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=8, num_bits=9)
    lance.write_dataset(pa.table({
        "id": pa.array(np.arange(2000, 3000, dtype=np.int64)),
        "vec": pa.FixedSizeListArray.from_arrays(pa.array(x[2000:].ravel()), 32)}),
        uri, mode="append")
    ds = bitshard.dataset(uri)
    s = ds.searcher("vec", k=3, nprobes=8)
    r, d = s.search(x[2400])
    pos = rowids_to_positions(ds, r)
    assert pos[0] == 2400 and d[0] == 0.0
    rb, _ = s.search(x[2399:2402])
    np.testing.assert_array_equal(rb[1], r)
    fast = ds.searcher("vec", k=3, nprobes=8, fast_search=True)
    assert (rowids_to_positions(ds, fast.search(x[2400])[0]) < 2000).all()


def test_one_query_in_c_answers_and_refuses_as_the_python_path(indexed):
    """A multi-bit searcher without refine answers one float32 query in one C
    call (_native.OneSearch): the same arrays as the Python path
    (search_lists), fresh ones each call, the same refusals word for word,
    and any other query layout falls back to the Python path."""
    import array

    uri, x = indexed
    ds = bitshard.dataset(uri)
    s = ds.searcher("vec9", k=10, nprobes=4)
    assert s._one_c is not None
    assert ds.searcher("vec", k=10, nprobes=4)._one_c is None  # 1 bit: gated rerank
    assert ds.searcher("vec9", k=10, nprobes=4, refine_factor=2)._one_c is None
    for q in _queries(x, 30, seed=5):
        r, d = s.search(q)
        (r2, d2), = s.search_lists(q)
        assert r.dtype == np.uint64 and d.dtype == np.float32 and r.shape == d.shape == (10,)
        np.testing.assert_array_equal(r, r2)
        np.testing.assert_array_equal(d, d2)
    q = _queries(x, 1, seed=6)[0]
    r, d = s.search(q)
    r[:] = 0
    np.testing.assert_array_equal(s.search(q)[0], s.search_lists(q)[0][0])
    # other layouts: None from C, then the Python path's conversion
    for other in (q.astype(">f4"), np.repeat(q, 2)[::2], q.astype(np.float64), q.tolist()):
        if isinstance(other, np.ndarray):
            assert s._one_c(other) is None
        np.testing.assert_array_equal(s.search(other)[0], s.search(q)[0])
    for buf in (memoryview(q), array.array("f", q.tobytes())):
        np.testing.assert_array_equal(s.search(buf)[0], s.search(q)[0])
    assert s._one_c(np.zeros(63, np.float32)) is None
    assert s._one_c(np.zeros((1, 64), np.float32)) is None
    # refusals: the C search's own words for values, Python's for the rest
    bad = q.copy()
    bad[5] = np.nan
    with pytest.raises(InvalidInputError, match=r"^query has a non-finite value at dimension 5$"):
        s.search(bad)
    bad[5] = np.inf
    with pytest.raises(InvalidInputError, match=r"^query has a non-finite value at dimension 5$"):
        s.search(bad)
    bad[5] = 2e12
    with pytest.raises(InvalidInputError,
                       match=r"^query: value 2e\+12 at dimension 5 is too large \(accepted: "
                             r"finite, \|value\| <= 2\*\*40 = 1099511627776\.0\)$"):
        s.search(bad)
    with pytest.raises(InvalidInputError, match=r"^query has dimension 63, column 'vec9' has 64$"):
        s.search(np.zeros(63, np.float32))
    with pytest.raises(InvalidInputError, match=r"^query must be numeric, got dtype <U1$"):
        s.search(np.array(["a"] * 64))
    with pytest.raises(InvalidInputError, match=r"^query must be 1-D or 2-D, got shape \(\)$"):
        s.search(np.float32(1))
    before = s.stats["partitions_probed"]
    s.search(q)
    assert s.stats["partitions_probed"] == before + 4


def test_a_subclass_with_its_own_one_query_path_keeps_it(indexed):
    """The C one-query path stands for Searcher._one: a subclass that
    overrides _one (bitshard.serve's front, whose scan is its actors') is
    called for every query."""
    from bitshard.searcher import SearchOptions, Searcher

    uri, x = indexed
    ds = bitshard.dataset(uri)
    calls = []

    class Own(Searcher):
        def _one(self, q):
            calls.append(q.shape)
            return super()._one(q)

    opts = SearchOptions(k=10, nprobes=4, refine_factor=None, index="nine", fragment_ids=None,
                         filter=None, fast_search=False, eps0=1.9, num_threads=None)
    s = Own(ds._indexes, "vec9", opts)
    assert s._one_c is None
    r, d = s.search(x[0])
    assert calls == [(64,)]
    np.testing.assert_array_equal(r, ds.searcher("vec9", k=10, nprobes=4).search(x[0])[0])


def test_threads_share_a_searcher(indexed):
    uri, x = indexed
    s = bitshard.dataset(uri).searcher("vec9", k=10, nprobes=4)
    Q = _queries(x, 64, seed=9)
    want = [s.search(q) for q in Q]
    got: dict = {}

    def work(lo):
        for i in range(lo, 64, 4):
            for _ in range(5):
                got.setdefault(i, []).append(s.search(Q[i]))

    ts = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(64):
        for r, d in got[i]:
            np.testing.assert_array_equal(r, want[i][0])
            np.testing.assert_array_equal(d, want[i][1])


def test_stats_count_every_query(indexed):
    uri, x = indexed
    ds = bitshard.dataset(uri)
    s = ds.searcher("vec9", k=10, nprobes=4)
    s.search(x[0])
    one = s.stats
    assert one["partitions_probed"] == 4 and one["codes_scanned"] > 0
    assert 0 < one["codes_stage2"] <= one["codes_scanned"] and one["candidates"] == 10
    s.search(x[:3])
    assert s.stats["partitions_probed"] == 16
    ds.search("vec9", x[0], k=10, nprobes=4, with_stats=True)
    ds.search("vec9", x[0], k=10, nprobes=4, with_stats=True)
    assert ds.last_search_stats == one


def test_batch_candidate_lists_longer_than_the_arrays():
    """A gated 1-bit batch writes at most 256 candidates a query into its
    arrays (k=1); queries with more are scanned again into longer ones. The
    answers and the counts equal those of the queries one by one."""
    x = clustered(3000, 32, seed=3)
    ds = bitshard.dataset(x)
    ds.create_index("vector", "IVF_RQ", name="one", num_partitions=8, num_bits=1)
    Q = x[:12]
    one = ds.searcher("vector", k=1, nprobes=8, eps0=5.0)
    per_query = [one.search(q) for q in Q]
    counts = []
    for q in Q:
        before = one.stats["candidates"]
        one.search(q)
        counts.append(one.stats["candidates"] - before)
    assert min(counts) < 256 < max(counts)  # both kinds of query in the batch
    batch = ds.searcher("vector", k=1, nprobes=8, eps0=5.0)
    rows, dists = batch.search(Q)
    np.testing.assert_array_equal(rows, np.stack([r for r, _ in per_query]))
    np.testing.assert_array_equal(dists, np.stack([d for _, d in per_query]))
    # the scan's counts (exact reads differ: a batch reads ahead in steps)
    scan = ("partitions_probed", "codes_scanned", "codes_stage2", "candidates")
    assert [batch.stats[key] for key in scan] == [one.stats[key] // 2 for key in scan]


@pytest.mark.parametrize("column,refine", [("vec", None), ("vec", 3), ("vec9", None)])
def test_batch_answers_and_counts_are_the_same_at_every_thread_count(indexed, column, refine):
    """A batch is shared out query by query to whichever worker is free (the
    calling thread and num_threads - 1 started ones): the answers, and the
    scan's counts, are those of one thread, also with more threads than
    queries."""
    uri, x = indexed
    ds = bitshard.dataset(uri)
    Q = _queries(x, 37, seed=5)
    scan = ("partitions_probed", "codes_scanned", "codes_stage2", "candidates")
    base = ds.searcher(column, k=10, nprobes=5, refine_factor=refine, num_threads=1)
    want_r, want_d = base.search(Q)
    for threads in (2, 3, 8, 64):
        s = ds.searcher(column, k=10, nprobes=5, refine_factor=refine, num_threads=threads)
        for _ in range(2):  # the second call reuses the workers' scratch
            r, d = s.search(Q)
            np.testing.assert_array_equal(r, want_r)
            np.testing.assert_array_equal(d, want_d)
        assert [s.stats[key] for key in scan] == [2 * base.stats[key] for key in scan]


def test_gated_rerank_reads_a_float32_array_directly_with_the_same_answers(tmp_path):
    """A numpy float32 source hands the 1-bit rerank its array (rows read in
    C, each checked); a float64 copy goes through take. Both answer alike,
    one query or a batch, and a refused value in a candidate's row is
    refused by take's message."""
    x = clustered(3000, 32, seed=6)
    Q = x[:25] + np.float32(0.01)
    answers = []
    for arr in (x, x.astype(np.float64)):
        ds = bitshard.dataset(arr, index_uri=str(tmp_path / f"i{arr.dtype}"), fragment_size=700)
        ds.create_index("vector", "IVF_RQ", num_partitions=8, num_bits=1)
        s = ds.searcher("vector", k=10, nprobes=3)
        assert (s.source.float32_rows(None) is not None) == (arr.dtype == np.float32)
        rows, dists = s.search(Q)
        for i in (0, 7, 24):
            r, d = s.search(Q[i])
            np.testing.assert_array_equal(r, rows[i])
            np.testing.assert_array_equal(d, dists[i])
        answers.append((rows, dists))
        assert s.stats["exact_reads"] > 0
    np.testing.assert_array_equal(answers[0][0], answers[1][0])
    np.testing.assert_array_equal(answers[0][1], answers[1][1])
    bad = x.copy()
    ds = bitshard.dataset(bad, index_uri=str(tmp_path / "bad"), fragment_size=700)
    ds.create_index("vector", "IVF_RQ", num_partitions=8, num_bits=1)
    s = ds.searcher("vector", k=10, nprobes=3)
    first = int(s.search(x[1500])[0][0])
    bad[(first >> 32) * 700 + (first & 0xFFFFFFFF), 5] = np.nan
    with pytest.raises(InvalidInputError,
                       match=rf"column 'vector' fragment {first >> 32} row {first & 0xFFFFFFFF}: "
                             r"non-finite value at dimension 5 \(nan\)"):
        s.search(x[1500])
