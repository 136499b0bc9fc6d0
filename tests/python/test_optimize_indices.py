"""optimize_indices after pylance's upkeep (issue 12, items 3 and 4): rows a
compaction moved are remapped without reading a vector, and the index then
answers bit for bit like a fresh build with the same artifacts over the
compacted dataset; appended and stale rows are encoded into delta segments;
num_indices_to_merge and retrain keep pylance's meaning; an upkeep that lost
a race says so and can be rerun."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest

import bitshard
from bitshard import index as idx
from bitshard import upkeep
from bitshard.errors import CommitConflictError, InvalidInputError
from bitshard.sources import LanceSource

from conftest import clustered, write_lance

lance = pytest.importorskip("lance")

D = 16
NAME = "vec_idx"


def _count_reads(monkeypatch, source_class):
    """Counts the vectors read from any source of source_class (take and
    iter_batches) in the returned dict's "rows"."""
    count = {"rows": 0}
    take, batches = source_class.take, source_class.iter_batches

    def counted_take(self, column, rowids):
        out = take(self, column, rowids)
        count["rows"] += len(out)
        return out

    def counted_batches(self, *a, **k):
        for b in batches(self, *a, **k):
            count["rows"] += len(b.vectors)
            yield b

    monkeypatch.setattr(source_class, "take", counted_take)
    monkeypatch.setattr(source_class, "iter_batches", counted_batches)
    return count


@pytest.fixture
def reads(monkeypatch):
    """Counts the vectors read from any Lance source (take and iter_batches)."""
    return _count_reads(monkeypatch, LanceSource)


def _data(tmp_path, n=3000, rows_per_fragment=300, seed=3):
    x = clustered(n, D, seed=seed)
    uri = write_lance(tmp_path / "u.lance", x, rows_per_fragment)
    return uri, x


def _append(uri, x0, n, seed):
    more = clustered(n, D, seed=seed)
    ids = np.arange(x0, x0 + n)
    lance.write_dataset(pa.table({"id": pa.array(ids),
                                  "vec": pa.FixedSizeListArray.from_arrays(
                                      pa.array(more.ravel()), D)}),
                        uri, mode="append", max_rows_per_file=200)
    return more


def _queries():
    return clustered(20, D, seed=99)


def _answers(ds, **kw):
    t = ds.search("vec", _queries(), k=10, nprobes=8, **kw)
    return (t.column("_rowid").to_pylist(), t.column("_distance").to_numpy().tobytes())


def _fresh(uri, tmp_path, ds):
    """A fresh build over the dataset as it is now, with the index's own
    artifacts (rotation and IVF), one segment per committed segment with the
    same uuid and fragment table: (its index root dataset, equal bytes?)."""
    handles = idx.committed_segments(ds.storage, NAME)
    o = idx.open_handle(handles[0], ds.storage)
    fresh = bitshard.dataset(uri, index_uri=tmp_path / f"fresh{len(os.listdir(tmp_path))}")
    same = True
    segs = []
    for h in handles:
        f = fresh.create_index_uncommitted("vec", ivf_centroids=o.ivf_model(),
                                           rq_rotation=o.rotation(),
                                           fragment_ids=list(h.fragment_ids), index_uuid=h.uuid)
        with open(h.path, "rb") as a, open(f.path, "rb") as b:
            same = same and a.read() == b.read()
        segs.append(f)
    fresh.commit_existing_index_segments(NAME, "vec", segs)
    return fresh, same


def test_compactions_with_deletions_are_remapped_without_reading_a_vector(tmp_path, reads):
    uri, x = _data(tmp_path)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=8, num_bits=4)
    # Two compactions with deletions before each: combined in one upkeep.
    lance.dataset(uri).delete("id % 7 = 3")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=1000)
    lance.dataset(uri).delete("id % 11 = 5")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=2000)
    ds = bitshard.dataset(uri)
    before = ds.describe_indices()[0]["uncovered_fragments"]
    assert before == [f.id for f in ds.source.fragments()] and before
    reads["rows"] = 0
    ds.optimize_indices()
    st = ds.last_optimize_stats[NAME]
    live = sum(1 for i in range(3000) if i % 7 != 3 and i % 11 != 5)
    assert reads["rows"] == 0
    assert (st["rows_read"], st["rows_encoded"], st["rows_remapped"]) == (0, 0, live)
    assert st["rows_dropped"] == 3000 - live
    assert st["compactions"] == [4, 7] and st["committed"] and st["version"] == 2
    assert st["history_gone"] is None and st["lost_fragments"] == {}
    d = ds.describe_indices()[0]
    assert d["uncovered_fragments"] == [] and d["num_rows"] == live
    fresh, same = _fresh(uri, tmp_path, ds)
    assert same  # the remapped segment is the fresh build's, byte for byte
    assert _answers(ds) == _answers(fresh)
    assert _answers(ds, refine_factor=3) == _answers(fresh, refine_factor=3)
    # Nothing left to do: no new version.
    ds.optimize_indices()
    assert ds.last_optimize_stats[NAME]["committed"] is False
    assert idx.latest_version(ds.storage, NAME) == 2


def test_a_compacted_fragment_mixing_covered_and_appended_rows(tmp_path, reads):
    # Rows appended after the build are compacted together with indexed ones:
    # the new fragment is remapped for the covered rows and only the
    # appended rows are read and encoded.
    uri, x = _data(tmp_path, n=2000, rows_per_fragment=250)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=6, num_bits=1)
    _append(uri, 2000, 300, seed=8)
    lance.dataset(uri).delete("id % 13 = 1")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=100_000)
    ds = bitshard.dataset(uri)
    assert len(ds.source.fragments()) == 1
    reads["rows"] = 0
    ds.optimize_indices()
    st = ds.last_optimize_stats[NAME]
    appended_live = sum(1 for i in range(2000, 2300) if i % 13 != 1)
    covered_live = sum(1 for i in range(2000) if i % 13 != 1)
    assert st["rows_encoded"] == st["rows_read"] == reads["rows"] == appended_live
    assert st["rows_remapped"] == covered_live
    fresh, same = _fresh(uri, tmp_path, ds)
    assert same
    assert ds.describe_indices()[0]["uncovered_fragments"] == []
    assert _answers(ds) == _answers(fresh)


def test_history_gone_after_cleanup_re_encodes(tmp_path, reads):
    uri, x = _data(tmp_path, n=1500, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=2)
    lance.dataset(uri).delete("id % 5 = 0")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=800)
    lance.dataset(uri).cleanup_old_versions(older_than=timedelta(seconds=0),
                                            delete_unverified=True)
    ds = bitshard.dataset(uri)
    reads["rows"] = 0
    ds.optimize_indices()
    st = ds.last_optimize_stats[NAME]
    assert st["history_gone"] == ("the history after version 1 is gone (version 2 was removed "
                                  "by cleanup_old_versions)")
    assert st["lost_fragments"] == {f: st["history_gone"] for f in range(5)}
    assert st["rows_remapped"] == 0 and st["rows_encoded"] == reads["rows"] == 1200
    fresh, same = _fresh(uri, tmp_path, ds)
    assert same
    assert _answers(ds) == _answers(fresh)


def test_appends_go_to_a_delta_and_num_indices_to_merge(tmp_path, reads):
    uri, x = _data(tmp_path, n=1200, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=3)
    (base,) = idx.committed_segments(ds.storage, NAME)
    _append(uri, 1200, 200, seed=5)
    ds = bitshard.dataset(uri)
    reads["rows"] = 0
    ds.optimize.optimize_indices(index_names=[NAME])  # pylance's spelling
    st = ds.last_optimize_stats[NAME]
    assert st["rows_encoded"] == reads["rows"] == 200 and st["rows_remapped"] == 0
    segs = idx.committed_segments(ds.storage, NAME)
    # Default (None): a new delta; the base segment is kept as it is.
    assert [s.uuid for s in segs][0] == base.uuid and len(segs) == 2
    assert segs[1].fragment_ids == (4,) and segs[1].num_rows == 200
    assert ds.describe_indices()[0]["uncovered_fragments"] == []
    _append(uri, 1400, 200, seed=6)
    ds = bitshard.dataset(uri)
    ds.optimize_indices(num_indices_to_merge=0)
    assert len(idx.committed_segments(ds.storage, NAME)) == 3
    _append(uri, 1600, 200, seed=7)
    ds = bitshard.dataset(uri)
    # N = 2: the new rows and the latest two segments become one.
    ds.optimize_indices(num_indices_to_merge=2)
    segs = idx.committed_segments(ds.storage, NAME)
    assert len(segs) == 2 and segs[0].uuid == base.uuid
    assert segs[1].fragment_ids == (4, 5, 6) and segs[1].num_rows == 600
    fresh, same = _fresh(uri, tmp_path, ds)
    assert same
    assert _answers(ds) == _answers(fresh)
    # N = 1 with nothing new: nothing to merge, no commit.
    ds.optimize_indices(num_indices_to_merge=1)
    assert ds.last_optimize_stats[NAME]["committed"] is False
    # The older spelling, a positional name, only merges everything into one
    # (appended rows stay uncovered).
    _append(uri, 1800, 100, seed=9)
    ds = bitshard.dataset(uri)
    ds.optimize_indices(NAME)
    (one,) = idx.committed_segments(ds.storage, NAME)
    assert one.fragment_ids == (0, 1, 2, 3, 4, 5, 6) and one.num_rows == 1800
    assert ds.describe_indices()[0]["uncovered_fragments"] == [7]


def test_retrain_trains_new_centroids_and_rebuilds(tmp_path):
    uri, x = _data(tmp_path, n=1200, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=2,
                    ivf_centroids=x[:4].copy())
    _append(uri, 1200, 300, seed=11)
    ds = bitshard.dataset(uri)
    old = ds.describe_indices()[0]
    ds.optimize_indices(retrain=True, num_indices_to_merge=0)  # N is ignored
    st = ds.last_optimize_stats[NAME]
    new = ds.describe_indices()[0]
    assert st["retrained"] and st["rows_encoded"] == 1500
    assert new["ivf_fingerprint"] != old["ivf_fingerprint"]
    assert new["rotation_fingerprint"] == old["rotation_fingerprint"]
    assert len(new["segments"]) == 1 and new["num_rows"] == 1500


def test_bad_arguments(tmp_path):
    uri, x = _data(tmp_path, n=600, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=2, num_bits=1)
    with pytest.raises(InvalidInputError, match=r"^num_indices_to_merge must be an integer "
                                                r">= 0 or None, got -1$"):
        ds.optimize_indices(num_indices_to_merge=-1)
    with pytest.raises(InvalidInputError, match=r"^retrain must be True or False, got 1$"):
        ds.optimize_indices(retrain=1)
    with pytest.raises(InvalidInputError, match=r"^give name or index_names, not both$"):
        ds.optimize_indices(NAME, index_names=[NAME])
    with pytest.raises(TypeError):
        ds.optimize.optimize_indices(NAME)  # keyword arguments only, as in pylance


def test_an_upkeep_that_lost_a_race_says_so_and_can_be_rerun(tmp_path, monkeypatch):
    uri, x = _data(tmp_path, n=1200, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=1)
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=600)
    ds = bitshard.dataset(uri)
    real = upkeep._upkeep
    other = bitshard.dataset(uri)

    def racing(*a, **k):
        out = real(*a, **k)
        # Another writer commits while this upkeep is between read and commit.
        seg = other.create_index_uncommitted("vec", name=NAME, ivf_centroids=idx.open_handle(
            out[0], ds.storage).ivf_model(), rq_rotation=idx.open_handle(
            out[0], ds.storage).rotation(), fragment_ids=[ds.source.fragments()[0].id])
        other.commit_existing_index_segments(NAME, "vec", [seg], replace=True)
        return out

    monkeypatch.setattr(upkeep, "_upkeep", racing)
    with pytest.raises(CommitConflictError, match=(
            r"^optimize_indices lost a race on index 'vec_idx': another writer committed "
            r"version 2 after this upkeep read version 1; nothing was changed, run "
            r"optimize_indices again$")):
        ds.optimize_indices()
    assert idx.latest_version(ds.storage, NAME) == 2
    monkeypatch.setattr(upkeep, "_upkeep", real)
    ds.optimize_indices()  # rerun: reads version 2 and completes
    assert ds.last_optimize_stats[NAME]["version"] == 3
    assert ds.describe_indices()[0]["uncovered_fragments"] == []


def test_drift_of_new_rows_is_reported_until_retrain(tmp_path, capsys):
    from bitshard.cli import main as cli_main

    uri, x = _data(tmp_path, n=1200, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=2)
    assert ds.describe_indices()[0]["drift"] is None  # no upkeep yet
    (h,) = idx.committed_segments(ds.storage, NAME)
    c = idx.open_handle(h, ds.storage).ivf_model().centroids.astype(np.float64)

    def mean_residual(v):
        d2 = ((v.astype(np.float64)[:, None, :] - c[None]) ** 2).sum(-1)
        return float(np.sqrt(d2.min(1)).mean())

    shifted = clustered(200, D, seed=5) + 6.0  # far from every centroid
    lance.write_dataset(pa.table({"id": pa.array(np.arange(1200, 1400)),
                                  "vec": pa.FixedSizeListArray.from_arrays(
                                      pa.array(shifted.ravel()), D)}), uri, mode="append")
    ds = bitshard.dataset(uri)
    ds.optimize_indices()
    dr = ds.describe_indices()[0]["drift"]
    assert (dr["indexed_rows"], dr["new_rows"]) == (1200, 200)
    assert dr["indexed_mean_residual"] == pytest.approx(mean_residual(x), rel=1e-4)
    assert dr["new_mean_residual"] == pytest.approx(mean_residual(shifted), rel=1e-4)
    assert dr["ratio"] == pytest.approx(dr["new_mean_residual"] / dr["indexed_mean_residual"])
    assert dr["ratio"] > 2
    assert cli_main(["describe", uri]) == 0
    out = capsys.readouterr().out
    assert (f"  drift: 200 row(s) encoded by upkeep since training, mean residual "
            f"{dr['new_mean_residual']:.4g} vs {dr['indexed_mean_residual']:.4g} for the 1200 "
            f"indexed row(s) (x{dr['ratio']:.3f}; retrain with "
            f"optimize_indices(retrain=True) when it grows)") in out
    # A retrain starts the record again.
    ds.optimize_indices(retrain=True)
    dr = ds.describe_indices()[0]["drift"]
    assert (dr["indexed_rows"], dr["new_rows"], dr["ratio"]) == (1400, 0, None)


def _replace_vectors(uri, shift):
    """pylance's in-place column replacement: same fragment ids and row
    counts, new vector values (row i's vector + shift)."""
    x = None
    t = lance.dataset(uri).to_table(columns=["id", "vec"])
    old = {int(i): np.asarray(v, np.float32) for i, v in
           zip(t.column("id").to_pylist(), t.column("vec").to_pylist())}
    lance.dataset(uri).drop_columns(["vec"])

    @lance.batch_udf()
    def new_vec(batch):
        ids = batch.column("id").to_numpy()
        v = np.stack([old[int(i)] + shift for i in ids]).astype(np.float32)
        return pa.record_batch([pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), D)],
                               names=["vec"])

    lance.dataset(uri).add_columns(new_vec, read_columns=["id"])


def test_a_stale_fragment_that_was_compacted_is_encoded_not_laundered(tmp_path, reads):
    # The vector column is replaced in place (fragment ids and row counts
    # kept), then the dataset is compacted: the index's codes describe the
    # old vectors, so the compaction's rows must be encoded again from the
    # new ones, never remapped as if current.
    uri, x = _data(tmp_path, n=1200, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=4)
    _replace_vectors(uri, 0.5)
    lance.dataset(uri).delete("id % 10 = 4")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=600)
    ds = bitshard.dataset(uri)
    reads["rows"] = 0
    ds.optimize_indices()
    st = ds.last_optimize_stats[NAME]
    assert st["rows_remapped"] == 0 and st["rows_encoded"] == reads["rows"] == 1080
    assert sorted(st["lost_fragments"]) == [0, 1, 2, 3]
    assert set(st["lost_fragments"].values()) == {"it changed before the compaction at version 6"}
    fresh, same = _fresh(uri, tmp_path, ds)
    assert same and _answers(ds) == _answers(fresh)
    # A row's new vector is found at distance 0, its old one is not.
    got = ds.search("vec", x[7] + 0.5, k=1, nprobes=4)
    assert got.column("_distance")[0].as_py() == pytest.approx(0.0, abs=1e-3)


def test_a_stale_fragment_is_re_encoded_into_a_delta(tmp_path, reads):
    uri, x = _data(tmp_path, n=900, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=2)
    _replace_vectors(uri, 1.0)
    ds = bitshard.dataset(uri)
    reads["rows"] = 0
    ds.optimize_indices()
    st = ds.last_optimize_stats[NAME]
    assert st["stale_fragments"] == {0: "column fields changed", 1: "column fields changed",
                                     2: "column fields changed"}
    assert st["rows_encoded"] == reads["rows"] == 900 and st["rows_remapped"] == 0
    fresh, same = _fresh(uri, tmp_path, ds)
    assert same and _answers(ds) == _answers(fresh)


def test_a_manifest_with_a_bad_drift_record_is_refused(tmp_path):
    import json

    from bitshard.errors import CorruptIndexError

    uri, x = _data(tmp_path, n=600, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=2, num_bits=1)
    path = os.path.join(ds.index_root, "indices", NAME, "v00000001.json")
    doc = json.load(open(path))
    doc["drift"] = {"indexed_rows": 600, "indexed_residual_sum": 1.0, "new_rows": -1,
                    "new_residual_sum": 0.0}
    doc["checksum"] = idx._checksum(doc)
    json.dump(doc, open(path, "w"))
    with pytest.raises(CorruptIndexError, match=r"bad field: Expected `int` >= 0 - at "
                                                r"`\$.drift.new_rows`"):
        idx.read_manifest(ds.storage, NAME)


def test_the_optimize_command(tmp_path, capsys):
    from bitshard.cli import main as cli_main

    uri, x = _data(tmp_path, n=1200, rows_per_fragment=300)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", num_partitions=4, num_bits=1)
    lance.dataset(uri).delete("id % 4 = 0")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=1000)
    assert cli_main(["optimize", uri]) == 0
    assert capsys.readouterr().out == (
        "index 'vec_idx' version 1 -> 2: 900 row(s) remapped, 0 encoded (0 read from the "
        "source), 300 dropped; 1 segment(s)\n")
    assert cli_main(["optimize", uri, "--name", NAME]) == 0
    assert capsys.readouterr().out == "index 'vec_idx' version 2: nothing to do\n"
    with pytest.raises(SystemExit) as e:
        cli_main(["optimize", uri, "--num-indices-to-merge", "-1"])
    assert e.value.code == 2
    assert "argument --num-indices-to-merge: expected an integer >= 0, got -1" in \
        capsys.readouterr().err


def test_parquet_appends_and_a_rewritten_file(tmp_path, monkeypatch):
    # Parquet has no compaction: files appended (one whose name sorts first)
    # are encoded into a delta, a file rewritten in place (same rows) is
    # stale and re-encoded, the unchanged files keep their codes (remapped
    # onto themselves, nothing read). The result equals a fresh build with
    # the same artifacts over the same fragments, bytes and answers.
    import pyarrow.parquet as pq

    from bitshard.sources import ParquetSource

    count = _count_reads(monkeypatch, ParquetSource)
    x = clustered(1000, D, seed=5)
    d = tmp_path / "pq"
    d.mkdir()

    def put(name, v):
        pq.write_table(pa.table({"vec": pa.FixedSizeListArray.from_arrays(
            pa.array(v.astype(np.float32).ravel()), D)}), d / name)

    for i in range(3):
        put(f"p{i}.parquet", x[i * 200:(i + 1) * 200])
    uri = str(d)
    bitshard.dataset(uri).create_index("vec", "IVF_RQ", num_partitions=4, num_bits=4)
    put("a.parquet", x[600:800])  # sorts first
    put("q.parquet", x[800:1000])
    new = x[200:400] * -1.0
    put("p1.parquet", new)
    os.utime(d / "p1.parquet", ns=(1, 1))  # a different mtime, surely
    ds = bitshard.dataset(uri)
    assert ds.source.fragment_paths() == {0: "p0.parquet", 1: "p1.parquet", 2: "p2.parquet",
                                          3: "a.parquet", 4: "q.parquet"}
    count["rows"] = 0
    ds.optimize_indices()
    st = ds.last_optimize_stats[NAME]
    assert st["stale_fragments"] == {1: "file changed"}
    assert (st["rows_encoded"], st["rows_read"], st["rows_remapped"], st["rows_dropped"]) == \
        (600, 600, 400, 200)
    assert count["rows"] == 600  # the appended files and the rewritten one, nothing else
    assert st["compactions"] == [] and st["lost_fragments"] == {} and st["committed"]
    d0 = ds.describe_indices()[0]
    assert d0["uncovered_fragments"] == [] and d0["stale_fragments"] == []
    assert d0["num_rows"] == 1000
    assert sorted(tuple(s["fragment_ids"]) for s in d0["segments"]) == [(0, 2), (1, 3, 4)]
    # A fresh build with the same artifacts and segment layout: in a copy of
    # the index root (its manifests carry the path -> fragment id map), the
    # committed segment files written again from the source.
    handles = idx.committed_segments(ds.storage, NAME)
    o = idx.open_handle(handles[0], ds.storage)
    fresh_root = str(tmp_path / "fresh")
    shutil.copytree(ds.index_root, fresh_root)
    for h in handles:
        os.remove(idx.segment_path(fresh_root, h.uuid))
    fresh = bitshard.dataset(uri, index_uri=fresh_root)
    assert fresh.source.fragment_paths() == ds.source.fragment_paths()
    for h in handles:
        f = fresh.create_index_uncommitted("vec", ivf_centroids=o.ivf_model(),
                                           rq_rotation=o.rotation(),
                                           fragment_ids=list(h.fragment_ids), index_uuid=h.uuid)
        with open(h.path, "rb") as x1, open(f.path, "rb") as x2:
            assert x1.read() == x2.read()
    q = np.concatenate([_queries(), new[[5, 17]]]).astype(np.float32)
    a = ds.search("vec", q, k=10, nprobes=4)
    b = fresh.search("vec", q, k=10, nprobes=4)
    assert a.equals(b)
    # the rewritten file's new vectors are found, from their new codes
    top = a.column("_rowid").to_numpy()[a.column("query_index").to_numpy() >= 20]
    assert top[0] == (1 << 32) | 5 and top[10] == (1 << 32) | 17
