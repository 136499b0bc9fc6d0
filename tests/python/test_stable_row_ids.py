"""Lance datasets written with ``enable_stable_row_ids=True``: the index keys
on row addresses, as for any Lance dataset; ``Dataset.search`` answers with
Lance's stable ``_rowid`` (and the address as ``_rowaddr``), which Lance's
``_take_rows`` and ``_rowid`` filters accept and which compaction does not
change. Build, search (recall against brute force), deletes, appends and
compaction."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest

import bitshard
from bitshard.searcher import UncoveredRowsWarning

from conftest import brute_force, clustered, recall

lance = pytest.importorskip("lance")

N, DIM = 4000, 32


def _table(x, start):
    ids = np.arange(start, start + len(x), dtype=np.int64)
    return pa.table({"id": pa.array(ids),
                     "vec": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)})


def _lance_ids(uri):
    """Lance's own view: _rowaddr -> (_rowid, id) of every live row."""
    t = lance.dataset(uri).to_table(columns=["id"], with_row_id=True, with_row_address=True)
    return {a: (r, i) for a, r, i in zip(t.column("_rowaddr").to_pylist(),
                                         t.column("_rowid").to_pylist(),
                                         t.column("id").to_pylist())}


@pytest.fixture
def stable(tmp_path):
    x = clustered(N + 600, DIM, seed=21)
    uri = str(tmp_path / "s.lance")
    lance.write_dataset(_table(x[:N], 0), uri, max_rows_per_file=1000,
                        enable_stable_row_ids=True)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", name="idx", num_partitions=16, num_bits=9)
    return uri, x


def _check_ids(uri, t):
    """Every result's _rowid is Lance's stable row id of the row at its
    _rowaddr, and Lance's _take_rows with those ids gives the same rows."""
    lance_ids = _lance_ids(uri)
    addrs = t.column("_rowaddr").to_pylist()
    ids = t.column("_rowid").to_pylist()
    assert ids == [lance_ids[a][0] for a in addrs]
    taken = lance.dataset(uri)._take_rows(ids, columns=["id"]).column("id").to_pylist()
    assert taken == [lance_ids[a][1] for a in addrs]


def test_search_answers_with_stable_row_ids(stable):
    uri, x = stable
    ds = bitshard.dataset(uri)
    assert ds.source.stable_row_ids
    rng = np.random.default_rng(0)
    Q = (x[rng.choice(N, 30, replace=False)] + rng.normal(scale=0.1, size=(30, DIM))
         ).astype(np.float32)
    t = ds.search("vec", Q, k=10, nprobes=16, columns=["id"])
    assert t.column_names == ["_rowid", "_distance", "_rowaddr", "query_index", "id"]
    _check_ids(uri, t)
    # written in one go, the stable ids are the write positions
    got = t.column("_rowid").to_numpy().reshape(30, 10).astype(np.int64)
    np.testing.assert_array_equal(got, t.column("id").to_numpy().reshape(30, 10))
    assert recall(got, brute_force(x[:N], Q, 10)) >= 0.95
    # the prepared searcher answers with addresses; the source translates them
    s = ds.searcher("vec", k=10, nprobes=16)
    rows, _ = s.search(Q)
    np.testing.assert_array_equal(rows.ravel(), t.column("_rowaddr").to_numpy())
    np.testing.assert_array_equal(ds.source.lance_row_ids(rows.ravel()),
                                  t.column("_rowid").to_numpy())
    # a Lance filter on _rowid selects by stable id
    f = ds.search("vec", Q[:5], k=10, nprobes=16, filter="_rowid >= 2000")
    assert len(f) == 50 and min(f.column("_rowid").to_pylist()) >= 2000
    _check_ids(uri, f)


def test_deletes_appends_and_compaction_keep_the_ids_users_hold(stable):
    uri, x = stable
    lance.write_dataset(_table(x[N:], N), uri, mode="append")  # uncovered, exact
    lance.dataset(uri).delete("id % 10 = 3")  # indexed and appended rows
    ds = bitshard.dataset(uri)
    live = np.array([i for i in range(N + 600) if i % 10 != 3])
    probes = np.array([3, 13, 17, 2500, N + 5, N + 13, N + 599])  # some deleted
    with pytest.warns(UncoveredRowsWarning, match="does not cover 540 rows in 1 fragment"):
        before = ds.search("vec", x[probes], k=1, nprobes=16)
    _check_ids(uri, before)
    # a deleted row is never returned; a live one is found under its stable
    # id (an appended one exactly, at distance 0)
    for j, p in enumerate(probes):
        rid = before.column("_rowid")[j].as_py()
        if p % 10 == 3:
            assert rid != p
        else:
            assert rid == p
            assert p < N or before.column("_distance")[j].as_py() == 0.0
    rng = np.random.default_rng(1)
    Q = (x[rng.choice(live, 20, replace=False)] + rng.normal(scale=0.1, size=(20, DIM))
         ).astype(np.float32)
    want = brute_force(x[live], Q, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        t = ds.search("vec", Q, k=10, nprobes=16)
    got = t.column("_rowid").to_numpy().reshape(20, 10).astype(np.int64)
    assert recall(got, live[want]) >= 0.95

    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=100_000)
    ds = bitshard.dataset(uri)
    assert len(ds.source.fragments()) == 1
    with pytest.warns(UncoveredRowsWarning, match=f"does not cover {live.size} rows"):
        after = ds.search("vec", x[probes], k=1, nprobes=16)
    _check_ids(uri, after)
    # the same stable ids for the same rows, at new addresses
    live_probe = [j for j, p in enumerate(probes) if p % 10 != 3]
    assert [after.column("_rowid")[j].as_py() for j in live_probe] == \
        [before.column("_rowid")[j].as_py() for j in live_probe]
    assert all(after.column("_rowaddr")[j].as_py() != before.column("_rowaddr")[j].as_py()
               for j in live_probe)
    # every row is uncovered now: the answer is the exact one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        t = ds.search("vec", Q, k=10, nprobes=16)
    got = t.column("_rowid").to_numpy().reshape(20, 10).astype(np.int64)
    assert recall(got, live[want]) == 1.0
    _check_ids(uri, t)


def test_without_stable_row_ids_rowid_is_the_address(tmp_path):
    x = clustered(2000, DIM, seed=2)
    uri = str(tmp_path / "p.lance")
    lance.write_dataset(_table(x, 0), uri, max_rows_per_file=500)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=9)
    assert not ds.source.stable_row_ids
    t = ds.search("vec", x[[1, 1700]], k=3, nprobes=4)
    assert t.column_names == ["_rowid", "_distance", "query_index"]
    lance_ids = _lance_ids(uri)
    assert all(lance_ids[a][0] == a for a in t.column("_rowid").to_pylist())
    assert [t.column("_rowid")[0].as_py(), t.column("_rowid")[3].as_py()] == \
        [1, (3 << 32) | 200]
    rows = t.column("_rowid").to_numpy()
    np.testing.assert_array_equal(ds.source.lance_row_ids(rows), rows)


def test_take_on_stable_row_ids_goes_by_row_id_not_by_position(stable, monkeypatch):
    """LanceDataset.take by dataset position takes seconds for a few hundred
    rows of a dataset with deletions (pylance 14); take, take_table and the
    rerank go through _take_rows by stable row id instead."""
    uri, x = stable
    lance.dataset(uri).delete("id % 10 = 3")
    ds = bitshard.dataset(uri)

    def refuse(*a, **k):
        raise AssertionError("LanceDataset.take called")

    monkeypatch.setattr(lance.LanceDataset, "take", refuse)
    rows = ds.searcher("vec", k=10, nprobes=16).search(x[7])[0]
    np.testing.assert_array_equal(ds.source.take("vec", rows[::-1]),
                                  x[ds.source.take_table(rows[::-1], ["id"])
                                    .column("id").to_numpy()])
    t = ds.search("vec", x[7], k=10, nprobes=16, refine_factor=2, columns=["id"])
    assert t.column("_rowid").to_pylist()[0] == 7 and t.column("_distance")[0].as_py() == 0.0
    assert t.column("id").to_pylist() == t.column("_rowid").to_pylist()


def test_optimize_indices_after_compaction_keeps_the_stable_ids(stable):
    """After compact_files, ds.optimize_indices() maps the segments to the new
    addresses: nothing is searched exactly any more, and the answers carry
    the stable ids they carried before the compaction."""
    uri, x = stable
    lance.write_dataset(_table(x[N:], N), uri, mode="append")
    lance.dataset(uri).delete("id % 10 = 3")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=100_000)
    probes = np.array([5, 2501, N + 7])
    ds = bitshard.dataset(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        ds.search("vec", x[probes], k=1, nprobes=16)
    ds.optimize_indices()
    ds = bitshard.dataset(uri)
    (d,) = ds.describe_indices()
    assert d["uncovered_fragments"] == [] and d["stale_fragments"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncoveredRowsWarning)
        t = ds.search("vec", x[probes], k=1, nprobes=16)
    assert t.column("_rowid").to_pylist() == probes.tolist()
    _check_ids(uri, t)


def test_search_columns_rowid_gives_the_stable_id(stable):
    # columns=["_rowid"] repeats Lance's _rowid (the stable id, as the first
    # column), not the row address; through a compaction too.
    uri, x = stable
    lance.dataset(uri).delete("id < 500")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=2000)
    ds = bitshard.dataset(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        t = ds.search("vec", x[[1234, 3001]], k=5, nprobes=16, columns=["_rowid", "id"])
    assert t.column_names == ["_rowid", "_distance", "_rowaddr", "query_index", "_rowid", "id"]
    assert t.column(4).to_pylist() == t.column(0).to_pylist()
    assert t.column(4).to_pylist() == t.column("id").to_pylist()  # written in one go
    assert t.column(4).to_pylist()[0] == 1234 and t.column(4).to_pylist()[5] == 3001
    assert t.column(4).to_pylist() != t.column("_rowaddr").to_pylist()
    assert t.column(4).type == pa.uint64()
