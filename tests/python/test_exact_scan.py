"""Rows no segment covers are searched exactly with bounded memory: a cache of
``exact_cache_bytes`` and the rest streamed from the source on each search
(once per batch of queries). The answers do not depend on the cache size,
equal a reference exact scan merged with the index's answer, and the memory
of a search is bounded by the cache plus a streamed batch."""

from __future__ import annotations

import threading
import tracemalloc
import warnings

import numpy as np
import pyarrow as pa
import pytest

import bitshard
from bitshard import InvalidInputError, _native
from bitshard import searcher as searcher_mod
from bitshard.searcher import DEFAULT_EXACT_CACHE_BYTES, UncoveredRowsWarning

from conftest import clustered, rowids_to_positions, write_lance

DIM = 16


def _table(x, start):
    n = len(x)
    ids = np.arange(start, start + n, dtype=np.int64)
    return pa.table({"id": pa.array(ids), "tag": pa.array(ids % 3),
                     "vec": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])})


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """3000 indexed rows (1-bit and 9-bit indexes), then 3000 appended rows
    in fragments of 700 that no segment covers, with duplicated vectors
    (ties among uncovered rows and with covered ones) and deletions in both."""
    import lance

    x = clustered(6000, DIM, seed=11)
    x[4000:4100] = x[4100:4200]
    x[5000:5050] = x[10:60]
    uri = str(tmp_path_factory.mktemp("exact") / "g.lance")
    lance.write_dataset(_table(x[:3000], 0), uri, max_rows_per_file=1000)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", name="b1", num_partitions=8, num_bits=1)
    ds.create_index("vec", "IVF_RQ", name="b9", num_partitions=8, num_bits=9)
    lance.write_dataset(_table(x[3000:], 3000), uri, mode="append", max_rows_per_file=700)
    lance.dataset(uri).delete("id % 17 = 0")
    rng = np.random.default_rng(0)
    Q = np.concatenate([x[[5, 3500, 4050, 4150, 5020, 5999]],
                        rng.normal(size=(6, DIM)).astype(np.float32) * 3])
    return uri, x, Q


def _reference(ds, index, Q, k, refine, extra):
    """The answer as the search defines it: the index's own answer
    (fast_search) merged with a plain exact scan of every live uncovered row
    the settings allow, top k in (distance, row id) order."""
    fast = ds.searcher("vec", index=index, k=k, nprobes=3, refine_factor=refine,
                       fast_search=True, **extra).search_lists(Q)
    covered = {f for s in ds.describe_indices() if s["name"] == index
               for seg in s["segments"] for f in seg["fragment_ids"]}
    frags = [f.id for f in ds.source.fragments() if f.id not in covered]
    if "fragment_ids" in extra:
        frags = [f for f in frags if f in extra["fragment_ids"]]
    rows, vecs = [], []
    for b in ds.source.iter_batches("vec", fragment_ids=frags):
        rows.append(b.rowids)
        vecs.append(b.vectors)
    rows = np.concatenate(rows) if rows else np.empty(0, np.uint64)
    vecs = np.ascontiguousarray(np.concatenate(vecs) if vecs else np.empty((0, DIM), np.float32))
    if "filter" in extra:
        keep = np.isin(rows, ds.source.filter_rowids(extra["filter"]))
        rows, vecs = rows[keep], np.ascontiguousarray(vecs[keep])
    out = []
    for qi, (fr, fd) in enumerate(fast):
        d = np.empty(rows.size, np.float32)
        if rows.size:
            _native.exact_distances(0, Q[qi], vecs, rows.size, DIM, d)
        r = np.concatenate([fr, rows])
        dd = np.concatenate([fd, d])
        order = np.lexsort((r, dd))[:k]
        out.append((r[order], dd[order]))
    return out


SETTINGS = [{}, {"filter": "tag = 1"}, {"fragment_ids": [0, 4, 6]}, {"fragment_ids": [5]}]


# 0 caches nothing; 1000 bytes is 13 rows (72 bytes a row at d = 16), a cut
# inside the first uncovered fragment; 100000 ends inside the second; the
# default holds them all.
@pytest.mark.parametrize("cache", [0, 1000, 100_000, None])
def test_answers_equal_the_reference_for_every_cache_size(grown, cache):
    uri, x, Q = grown
    ds = bitshard.dataset(uri)
    kw = {} if cache is None else {"exact_cache_bytes": cache}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        for index in ("b1", "b9"):
            for refine in (None, 2):
                for extra in SETTINGS:
                    for k in (1, 10, 150):
                        want = _reference(ds, index, Q, k, refine, extra)
                        s = ds.searcher("vec", index=index, k=k, nprobes=3,
                                        refine_factor=refine, **extra, **kw)
                        got = s.search_lists(Q)
                        rb, db = s.search(Q)
                        for qi, (wr, wd) in enumerate(want):
                            np.testing.assert_array_equal(got[qi][0], wr)
                            np.testing.assert_array_equal(got[qi][1], wd)
                            one_r, one_d = s.search(Q[qi])
                            np.testing.assert_array_equal(one_r[:wr.size], wr)
                            np.testing.assert_array_equal(one_d[:wd.size], wd)
                            np.testing.assert_array_equal(rb[qi, :wr.size], wr)
                        t = ds.search("vec", Q[:3], index=index, k=k, nprobes=3,
                                      refine_factor=refine, **extra, **kw)
                        np.testing.assert_array_equal(
                            t.column("_rowid").to_numpy(),
                            np.concatenate([r for r, _ in want[:3]]))
    # the uncovered duplicates tie: both rows come back, lower row id first
    s = ds.searcher("vec", index="b9", k=2, nprobes=3, **kw)
    r, d = s.search(x[4150])
    assert d.tolist() == [0.0, 0.0]
    assert rowids_to_positions(ds, r).tolist() == [4050, 4150]


def test_the_cache_holds_at_most_its_bytes_and_is_shared(grown):
    uri, _, Q = grown
    ds = bitshard.dataset(uri, exact_cache_bytes=100_000)
    assert ds.exact_cache_bytes == 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        a = ds.searcher("vec", index="b9", k=5, nprobes=3)
        b = ds.searcher("vec", index="b9", k=7, nprobes=2, filter="tag = 2")
        own = ds.searcher("vec", index="b9", k=5, nprobes=3, exact_cache_bytes=800)
        a.search(Q)
        own.search(Q)
    assert a._exact is b._exact and own._exact is not a._exact
    row_bytes = 4 * DIM + 8
    assert a._exact.rows.size == 100_000 // row_bytes == 1388
    assert a._exact.rows.nbytes + a._exact.vecs.nbytes <= 100_000
    assert own._exact.rows.size == 11
    # a new size applies to the searchers made after it
    ds.exact_cache_bytes = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        c = ds.searcher("vec", index="b9", k=5, nprobes=3)
        np.testing.assert_array_equal(c.search(Q)[0], a.search(Q)[0])
    assert c._exact.rows.size == 0


def test_one_warning_per_index_view_names_the_rows_and_the_fix(grown):
    uri, _, Q = grown
    ds = bitshard.dataset(uri)
    live_uncovered = sum(f.num_rows for f in ds.source.fragments() if f.id >= 3)
    with pytest.warns(UncoveredRowsWarning) as got:
        ds.search("vec", Q[0], index="b9", k=3)
        ds.search("vec", Q[0], index="b9", k=4)
        ds.searcher("vec", index="b9", k=5, nprobes=1).search(Q)
    assert [str(w.message) for w in got if w.category is UncoveredRowsWarning] == [
        f"index 'b9' does not cover {live_uncovered} rows in 5 fragments of the source "
        f"(version {ds.source.version}): they are searched exactly, read from the source on "
        f"every search beyond exact_cache_bytes={DEFAULT_EXACT_CACHE_BYTES}; "
        f"ds.optimize_indices() indexes them"]
    assert got[0].filename == __file__  # points at the caller, not into bitshard
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncoveredRowsWarning)
        ds.refresh()
        ds.search("vec", Q[0], index="b9", k=3)  # same versions: no second warning
        bitshard.dataset(uri).search("vec", Q[0], index="b9", k=3, fast_search=True)
        bitshard.dataset(uri).search("vec", Q[0], index="b9", k=3, fragment_ids=[0, 1])
    with pytest.warns(UncoveredRowsWarning, match="index 'b1' does not cover"):
        ds.search("vec", Q[0], index="b1", k=3)


def test_exact_cache_bytes_is_checked():
    ds = bitshard.dataset(clustered(100, 8), fragment_size=50)
    for bad, msg in [(-1, "exact_cache_bytes must be an integer >= 0, got -1"),
                     (True, "exact_cache_bytes must be an integer >= 0, got True"),
                     (1.5, "exact_cache_bytes must be an integer >= 0, got 1.5")]:
        with pytest.raises(InvalidInputError) as e:
            ds.searcher("vector", exact_cache_bytes=bad)
        assert str(e.value) == msg
        with pytest.raises(InvalidInputError) as e:
            ds.exact_cache_bytes = bad
        assert str(e.value) == msg
        with pytest.raises(InvalidInputError) as e:
            bitshard.dataset(clustered(10, 8), exact_cache_bytes=bad)
        assert str(e.value) == msg
    assert ds.exact_cache_bytes == DEFAULT_EXACT_CACHE_BYTES


def test_threads_share_the_first_fill(grown):
    uri, _, Q = grown
    ds = bitshard.dataset(uri, exact_cache_bytes=100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        want = [ds.searcher("vec", index="b1", k=10, nprobes=3, exact_cache_bytes=0).search(q)
                for q in Q]
        s = ds.searcher("vec", index="b1", k=10, nprobes=3)
    got: dict = {}

    def work(lo):
        for i in range(lo, len(Q), 3):
            got[i] = s.search(Q[i])

    ts = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i, (r, d) in enumerate(want):
        np.testing.assert_array_equal(got[i][0], r)
        np.testing.assert_array_equal(got[i][1], d)


def test_search_memory_is_bounded_by_cache_and_batch_not_by_uncovered_rows(tmp_path,
                                                                          monkeypatch):
    """48,000 uncovered rows of d = 64 (12.3 MB of vectors) searched with a
    1 MiB cache and 128 KiB batches: the peak of the arrays bitshard
    allocates (numpy reports them to tracemalloc) stays under 2 MiB, while
    a cache large enough for every row costs all 12.3 MB."""
    import lance

    x = clustered(50_000, 64, seed=5)
    uri = write_lance(tmp_path / "m.lance", x[:2000], 2000)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=9)
    for lo in range(2000, 50_000, 8000):
        lance.write_dataset(pa.table({
            "id": pa.array(np.arange(lo, lo + 8000, dtype=np.int64)),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(x[lo:lo + 8000].ravel()), 64)}),
            uri, mode="append")
    monkeypatch.setattr(searcher_mod, "EXACT_BATCH_BYTES", 128 << 10)
    Q = x[[100, 30_000, 49_999]] + np.float32(0.01)
    uncovered_bytes = 48_000 * 64 * 4

    def peak(cache):
        ds = bitshard.dataset(uri, exact_cache_bytes=cache)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UncoveredRowsWarning)
            s = ds.searcher("vec", k=10, nprobes=4)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            rb, _ = s.search(Q)          # the first search fills the cache
            r1, _ = s.search(Q[1])
            held = tracemalloc.get_traced_memory()[0] - base
            top = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert rowids_to_positions(ds, rb[:, 0]).tolist() == [100, 30_000, 49_999]
        np.testing.assert_array_equal(r1, rb[1])
        return held, top

    held, top = peak(1 << 20)
    assert held <= (1 << 20) + (64 << 10), held
    assert top <= 2 << 20, top
    held_all, top_all = peak(1 << 30)
    assert held_all >= uncovered_bytes and top_all >= uncovered_bytes


def test_stale_fragments_join_the_bounded_exact_scan(tmp_path):
    """A vector column replaced in place (drop_columns + add_columns) makes
    every fragment stale: the warning counts them, and their rows are
    searched exactly through the same cache and stream."""
    import lance

    x = clustered(800, DIM, seed=12)
    uri = write_lance(tmp_path / "st.lance", x, 200)
    bitshard.dataset(uri).create_index("vec", num_partitions=4, num_bits=4)
    new = (x + np.float32(3)).astype(np.float32)
    lance.dataset(uri).drop_columns(["vec"])

    @lance.batch_udf(output_schema=pa.schema([pa.field("vec", pa.list_(pa.float32(), DIM))]))
    def udf(batch):
        ids = batch.column("id").to_numpy()
        return pa.record_batch([pa.FixedSizeListArray.from_arrays(
            pa.array(new[ids].ravel()), DIM)], names=["vec"])

    lance.dataset(uri).add_columns(udf, read_columns=["id"])
    ds = bitshard.dataset(uri, exact_cache_bytes=1000)
    with pytest.warns(UncoveredRowsWarning) as got:
        t = ds.search("vec", new[[417, 3]], k=4)
    assert [str(w.message) for w in got if w.category is UncoveredRowsWarning] == [
        f"index 'vec_idx' does not cover 800 rows in 4 fragments of the source (version "
        f"{ds.source.version}), 4 of them stale (describe_indices says why): they are "
        f"searched exactly, read from the source on every search beyond exact_cache_bytes=1000; "
        f"ds.optimize_indices() indexes them"]
    assert rowids_to_positions(ds, t.column("_rowid").to_numpy())[[0, 4]].tolist() == [417, 3]
    assert t.column("_distance").to_numpy()[[0, 4]].tolist() == [0.0, 0.0]
    whole = bitshard.dataset(uri).searcher("vec", k=4).search(new[[417, 3]])
    np.testing.assert_array_equal(t.column("_rowid").to_numpy(), whole[0].ravel())
