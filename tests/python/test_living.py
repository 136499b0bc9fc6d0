"""Living datasets: an index never answers from data that changed under it.

The failures of issue 12 (a vector column replaced with pylance's
drop_columns + add_columns; a Parquet file rewritten with the same row
count; a data overlay) are searched exactly after the change; indexes
written before manifest format 2 are compared at their recorded source
version, or are unverified (exactly searched, one warning); describe and
verify list what is stale with the reason."""

from __future__ import annotations

import io
import contextlib
import json
import os
import shutil
import warnings
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bitshard
from bitshard import cli
from bitshard import index as idx
from bitshard.maintenance import verify_report
from bitshard.searcher import UncoveredRowsWarning
from conftest import clustered, write_lance

D = 16
N, PER = 800, 200
VERSION_GONE = "unverified: source version 1 no longer exists"


def _fsl(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


def _indexed_lance(tmp_path, name="d.lance"):
    x = clustered(N, D, seed=11)
    uri = write_lance(tmp_path / name, x, PER)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", num_partitions=4, num_bits=4)
    return uri, x


def _replace_vec(uri: str, new: np.ndarray) -> None:
    """The vector column replaced in place: same fragments, same rows."""
    import lance

    lds = lance.dataset(uri)
    lds.drop_columns(["vec"])

    @lance.batch_udf(output_schema=pa.schema([pa.field("vec", pa.list_(pa.float32(), D))]))
    def udf(batch):
        ids = batch.column("id").to_numpy()
        return pa.record_batch([_fsl(new[ids])], names=["vec"])

    lance.dataset(uri).add_columns(udf, read_columns=["id"])


def _overlay(uri: str, fragment_id: int, offsets, values: np.ndarray):
    """A pylance data overlay: new values of ``vec`` for some rows of one
    fragment, without touching its data files. Returns the committed
    ``LanceDataset``: pylance 14.0.2 writes overlays (feature flag 64) but
    refuses to open such a version by URI, so it is read through this
    object."""
    import lance
    from lance import LanceOperation
    from lance.file import LanceFileWriter
    from lance.fragment import DataFile

    lds = lance.dataset(uri)
    field = next(f.id() for f in lds.lance_schema.fields() if f.name() == "vec")
    name = f"overlay-{fragment_id}-{len(offsets)}.lance"
    path = os.path.join(uri, "data", name)
    with LanceFileWriter(path, version="2.2") as w:
        w.write_batch(pa.table({"vec": _fsl(values)}))
    df = DataFile(name, fields=[field], column_indices=[0], file_major_version=2,
                  file_minor_version=2, file_size_bytes=os.path.getsize(path))
    op = LanceOperation.DataOverlay(groups=[LanceOperation.DataOverlayGroup(
        fragment_id=fragment_id,
        overlays=[LanceOperation.DataOverlayFile(data_file=df, offsets=list(offsets))])])
    return lance.LanceDataset.commit(uri, op, read_version=lds.version)


def _top(ds, q, k=3, **kw):
    t = ds.search("vec", q, k=k, **kw)
    return t.column("_rowid").to_pylist(), t.column("_distance").to_pylist()


def _stale(ds):
    (d,) = ds.describe_indices()
    return {s["id"]: s["reason"] for s in d["stale_fragments"]}


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _rowid(fragment: int, offset: int) -> int:
    return (fragment << 32) | offset


# ------------------------------------------------------------ Lance changes


def test_replaced_vector_column_is_searched_exactly(tmp_path):
    uri, x = _indexed_lance(tmp_path)
    rng = np.random.default_rng(5)
    new = (x + rng.normal(size=x.shape).astype(np.float32) * 4).astype(np.float32)
    _replace_vec(uri, new)
    ds = bitshard.dataset(uri)
    assert _stale(ds) == {f: "column fields changed" for f in range(4)}
    r = 2 * PER + 17  # fragment 2, offset 17
    rows, dists = _top(ds, new[r])
    assert rows[0] == _rowid(2, 17) and dists[0] == pytest.approx(0.0, abs=1e-4)
    rows, dists = _top(ds, x[r])
    assert dists[0] > 1e-3  # the old vector is gone from the answers
    # fast_search never answers from the stale codes either
    assert ds.search("vec", new[r], k=3, fast_search=True).num_rows == 0


def test_overlay_makes_its_fragment_stale(tmp_path):
    uri, x = _indexed_lance(tmp_path)
    vals = np.full((2, D), 40.0, dtype=np.float32)
    vals[1] += 1
    ds = bitshard.dataset(_overlay(uri, 1, [3, 4], vals))
    assert _stale(ds) == {1: "overlay"}
    rows, dists = _top(ds, vals[0])
    assert rows[0] == _rowid(1, 3) and dists[0] == pytest.approx(0.0, abs=1e-4)
    rows, dists = _top(ds, x[PER + 3], k=1)
    assert dists[0] > 1e-3
    # Other fragments are still answered from the index.
    rows, _ = _top(ds, x[3 * PER + 9], k=1, fragment_ids=[3])
    assert rows == [_rowid(3, 9)]


def test_deletes_and_unrelated_columns_keep_the_index_current(tmp_path):
    import lance

    uri, x = _indexed_lance(tmp_path)
    lds = lance.dataset(uri)
    lds.delete("id = 5 OR id = 450")
    lds.add_columns({"twice": "id * 2"})
    ds = bitshard.dataset(uri)
    assert _stale(ds) == {}
    rep = verify_report(uri)
    assert rep.faults == [] and rep.notices == [] and rep.current


def test_index_built_over_an_overlay_is_current(tmp_path):
    x = clustered(N, D, seed=11)
    uri = write_lance(tmp_path / "o.lance", x, PER)
    vals = np.full((1, D), 30.0, dtype=np.float32)
    ds = bitshard.dataset(_overlay(uri, 0, [7], vals))
    ds.create_index("vec", num_partitions=4, num_bits=4)
    assert _stale(ds) == {}
    rows, dists = _top(ds, vals[0], k=1, refine_factor=2)
    assert rows == [_rowid(0, 7)] and dists[0] == pytest.approx(0.0, abs=1e-4)


# ------------------------------------------------------------------ Parquet


def _parquet_dir(tmp_path, x, names):
    d = tmp_path / "pq"
    d.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        pq.write_table(pa.table({"vec": _fsl(x[i * PER:(i + 1) * PER])}), d / name)
    return str(d)


def test_parquet_file_rewritten_with_the_same_rows_is_stale(tmp_path):
    x = clustered(N, D, seed=12)
    uri = _parquet_dir(tmp_path, x, [f"p{i}.parquet" for i in range(4)])
    bitshard.dataset(uri).create_index("vec", num_partitions=4, num_bits=4)
    new = x[PER:2 * PER] * -1.0
    pq.write_table(pa.table({"vec": _fsl(new.astype(np.float32))}),
                   os.path.join(uri, "p1.parquet"))
    os.utime(os.path.join(uri, "p1.parquet"), ns=(1, 1))  # a different mtime, surely
    ds = bitshard.dataset(uri)
    assert _stale(ds) == {1: "file changed"}
    rows, dists = _top(ds, new[17])
    assert rows[0] == _rowid(1, 17) and dists[0] == pytest.approx(0.0, abs=1e-4)
    assert _top(ds, x[PER + 17])[1][0] > 1e-3


# ---------------------------------------------------- format 1 (no records)


def _zero_identities(path):
    """Rewrite a segment file as it was before fingerprints were recorded:
    the same rows, uuid and table, every fragment identity zero (a remap of
    the file onto itself without identities)."""
    from bitshard import _native

    o = idx.OpenSegment(path)
    frags = o.native.fragments()
    ids = np.array([f for f, _ in frags], np.uint64)
    rows = np.array([r for _, r in frags], np.uint64)
    m = np.concatenate([(np.uint64(f) << np.uint64(32)) | np.arange(r, dtype=np.uint64)
                        for f, r in frags])
    tmp = path + ".zero"
    _native.remap([o.native], [m], ids, rows, bytes(o.info["uuid"]), tmp)
    del o
    os.replace(tmp, path)


def _as_format_1(ds, name="vec_idx"):
    """Rewrite the latest manifest as format 1 wrote it (no identities), and
    its segments as they were then (no fingerprints in the files)."""
    v = idx.latest_version(ds.storage, name)
    path = os.path.join(ds.index_root, "indices", name, f"v{v:08d}.json")
    with open(path) as f:
        doc = json.load(f)
    for e in doc["segments"]:
        _zero_identities(idx.segment_path(ds.index_root, e["uuid"]))
    doc["format_version"] = 1
    for e in doc["segments"]:
        e.pop("fragments", None)
        e.pop("source_version", None)
    doc["checksum"] = idx._checksum(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def test_format_1_index_is_compared_at_its_source_version(tmp_path):
    import lance

    uri, x = _indexed_lance(tmp_path)
    _as_format_1(bitshard.dataset(uri))
    # An append changes the version, not the indexed fragments.
    lance.write_dataset(pa.table({"id": pa.array([N], pa.int64()), "vec": _fsl(x[:1] + 1)}),
                        uri, mode="append")
    ds = bitshard.dataset(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the appended row is searched exactly, and says so: expected here
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        assert _stale(ds) == {}
        rows, _ = _top(ds, x[3], k=1)
    assert rows == [_rowid(0, 3)]
    ds = bitshard.dataset(_overlay(uri, 2, [0], np.zeros((1, D), np.float32) + 50))
    assert _stale(ds) == {2: "overlay"}
    rows, dists = _top(ds, np.zeros(D, np.float32) + 50, k=1)
    assert rows == [_rowid(2, 0)] and dists[0] == pytest.approx(0.0, abs=1e-4)


def test_format_1_index_whose_version_is_gone_is_unverified(tmp_path):
    import lance

    uri, x = _indexed_lance(tmp_path)
    _as_format_1(bitshard.dataset(uri))
    lds = lance.dataset(uri)
    lds.delete("id = 1")
    lance.dataset(uri).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
    with pytest.raises(Exception):
        lance.dataset(uri, version=1)
    ds = bitshard.dataset(uri)
    assert _stale(ds) == {f: VERSION_GONE for f in range(4)}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rows, dists = _top(ds, x[PER + 5], k=1)
        _top(ds, x[6], k=1)
    assert rows == [_rowid(1, 5)] and dists[0] == pytest.approx(0.0, abs=1e-4)
    msgs = [str(m.message) for m in w]
    assert msgs == [
        "index 'vec_idx': 4 fragment(s) [0, 1, 2, 3] cannot be verified (" + VERSION_GONE
        + "): their rows are searched exactly, not from the index; rebuild the index "
        "(ds.create_index(..., replace=True), bitshard.build_index or `bitshard build`) to "
        "record what it covers",
        # and the exact search of those rows says what it costs
        f"index 'vec_idx' does not cover {N - 1} rows in 4 fragments of the source (version "
        f"{ds.source.version}), 4 of them stale (describe_indices says why): they are searched "
        f"exactly, read from the source on every search beyond exact_cache_bytes=268435456; "
        f"ds.optimize_indices() indexes them"]
    code, out, err = _cli("describe", uri)
    assert code == 0
    assert f"  fragment 0 is stale (searched exactly): {VERSION_GONE}\n" in out
    # A rebuild records identities: nothing is unverified any more.
    ds.create_index("vec", num_partitions=4, num_bits=4)
    assert _stale(bitshard.dataset(uri)) == {}


# ------------------------------------------------------------------ verify


def test_verify_after_compaction_and_changes(tmp_path):
    import lance

    uri, x = _indexed_lance(tmp_path)
    lds = lance.dataset(uri)
    lds.delete("id < 150")  # most of fragment 0
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=PER,
                                              materialize_deletions_threshold=0.5)
    frags = sorted(f.fragment_id for f in lance.dataset(uri).get_fragments())
    assert frags == [1, 2, 3, 4]  # fragment 0 rewritten into 4
    rep = verify_report(uri)
    assert rep.faults == []
    code, out, err = _cli("verify", uri)
    assert code == 0 and out.endswith("verify: ok\n"), (out, err)
    seg = idx.committed_segments(bitshard.dataset(uri).storage, "vec_idx")[0]
    # A compaction moved fragment 0's rows and its history is there: remappable.
    assert out == (
        f"NOTICE: index 'vec_idx' segment {seg.uuid} ({seg.path}): fragment 0 was rewritten by "
        f"compact_files (version(s) [4]) and is remappable: optimize_indices moves its codes "
        f"to the rows' new addresses without re-encoding them\n"
        f"NOTICE: index 'vec_idx': 1 fragment(s) not indexed (searched exactly): [4]; run "
        f"optimize_indices, or rebuild the index\n"
        f"index 'vec_idx' version 1: 1 segment(s), {N} rows\n"
        f"verify: ok\n")
    # Search is right: the compacted rows are found, the deleted ones never.
    ds = bitshard.dataset(uri)
    rows, dists = _top(ds, x[170], k=1)
    assert rows == [_rowid(4, 20)] and dists[0] == pytest.approx(0.0, abs=1e-4)
    assert all(r >> 32 != 0 for r in _top(ds, x[5], k=10)[0])
    code, out, err = _cli("verify", uri, "--strict")
    assert code == 1
    assert err == (f"verify: {len(rep.notices)} notice(s) (--strict: every fragment must be "
                   f"indexed and current)\n")
    # A stale fragment is a notice too (through the Dataset: see _overlay).
    with_overlay = bitshard.dataset(_overlay(uri, 3, [1], np.zeros((1, D), np.float32) + 9))
    rep2 = verify_report(with_overlay)
    assert rep2.faults == []
    assert rep2.notices == [
        "index 'vec_idx': fragment 3 is stale (overlay): searched exactly until re-indexed "
        "(run optimize_indices, or rebuild the index)"] + rep.notices


def test_verify_tells_remappable_from_gone(tmp_path):
    import lance

    uri, x = _indexed_lance(tmp_path)
    lance.dataset(uri).delete("id >= 600")  # all of fragment 3: it leaves the dataset
    lance.dataset(uri).delete("id < 150")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=PER,
                                              materialize_deletions_threshold=0.5)
    assert sorted(f.fragment_id for f in lance.dataset(uri).get_fragments()) == [1, 2, 4]
    seg = idx.committed_segments(bitshard.dataset(uri).storage, "vec_idx")[0]
    where = f"index 'vec_idx' segment {seg.uuid} ({seg.path})"
    rep = verify_report(uri)
    assert rep.faults == []
    assert rep.notices[:2] == [
        f"{where}: fragment 0 was rewritten by compact_files (version(s) [5]) and is "
        f"remappable: optimize_indices moves its codes to the rows' new addresses without "
        f"re-encoding them",
        f"{where}: fragment 3 is not in the source (compacted or deleted since the build); "
        f"run optimize_indices"]
    # Once cleanup removed the history, fragment 0 can no longer be remapped.
    lance.dataset(uri).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
    rep = verify_report(uri)
    assert rep.faults == []
    why = "the history after version 1 is gone (version 2 was removed by cleanup_old_versions)"
    assert rep.notices[:2] == [
        f"{where}: fragment {f} is not in the source and cannot be remapped ({why}); "
        f"optimize_indices re-encodes its rows where they are now" for f in (0, 3)]
    ds = bitshard.dataset(uri)
    ds.optimize_indices()  # what verify said
    assert ds.last_optimize_stats["vec_idx"]["lost_fragments"] == {0: why, 3: why}


def test_verify_strict_passes_when_current(tmp_path):
    uri, x = _indexed_lance(tmp_path)
    code, out, err = _cli("verify", uri, "--strict")
    assert code == 0 and "NOTICE" not in out and out.endswith("verify: ok\n")


def test_parquet_file_sorting_first_renumbers_nothing(tmp_path):
    x = clustered(N, D, seed=13)
    uri = _parquet_dir(tmp_path, x, ["b.parquet", "c.parquet"])
    bitshard.dataset(uri).create_index("vec", num_partitions=4, num_bits=4)
    extra = clustered(PER, D, seed=14) + 20
    pq.write_table(pa.table({"vec": _fsl(extra)}), os.path.join(uri, "a.parquet"))
    ds = bitshard.dataset(uri)
    assert ds.source.fragment_paths() == {0: "b.parquet", 1: "c.parquet", 2: "a.parquet"}
    (d,) = ds.describe_indices()
    assert d["stale_fragments"] == [] and d["uncovered_fragments"] == [2]
    rows, _ = _top(ds, x[PER + 4], k=1, fast_search=True)  # from the index alone
    assert rows == [_rowid(1, 4)]
    rows, dists = _top(ds, extra[9], k=1)
    assert rows == [_rowid(2, 9)] and dists[0] == pytest.approx(0.0, abs=1e-4)
    # The next build records the new file under its id; the old ids stay.
    ds.create_index("vec", num_partitions=4, num_bits=4)
    again = bitshard.dataset(uri)
    assert again.source.fragment_paths() == {0: "b.parquet", 1: "c.parquet", 2: "a.parquet"}
    assert again.describe_indices()[0]["uncovered_fragments"] == []
    assert verify_report(uri).current
    # A file removed keeps its id reserved: a new one gets a fresh id.
    os.remove(os.path.join(uri, "b.parquet"))
    pq.write_table(pa.table({"vec": _fsl(extra)}), os.path.join(uri, "0.parquet"))
    later = bitshard.dataset(uri)
    assert later.source.fragment_paths() == {1: "c.parquet", 2: "a.parquet", 3: "0.parquet"}
    assert _stale(later) == {}


def test_delta_commit_onto_a_format_1_index_keeps_its_version(tmp_path):
    import lance

    uri, x = _indexed_lance(tmp_path)
    ds = bitshard.dataset(uri)
    _as_format_1(ds)
    extra = clustered(PER, D, seed=15) + 10
    lance.write_dataset(pa.table({"id": pa.array(np.arange(N, N + PER), pa.int64()),
                                  "vec": _fsl(extra)}), uri, mode="append")
    ds = bitshard.dataset(uri)
    seg = idx.committed_segments(ds.storage, "vec_idx")[0]
    h = ds.create_index_uncommitted("vec", ivf_centroids=idx.open_handle(seg).ivf_model(),
                                    rq_rotation=idx.open_handle(seg).rotation(),
                                    fragment_ids=[4])
    ds.commit_existing_index_segments("vec_idx", "vec", [h])
    doc = idx.read_manifest(ds.storage, "vec_idx")
    assert doc["format_version"] == 2 and doc["source_version"] == 2
    old, new = doc["segments"]
    assert "fragments" not in old and old["source_version"] == 1
    assert [f["id"] for f in new["fragments"]] == [4] and new["source_version"] == 2
    fresh = bitshard.dataset(uri)
    assert _stale(fresh) == {}
    rows, dists = _top(fresh, extra[3], k=1, fast_search=True)
    assert rows == [_rowid(4, 3)]
    # A merge keeps the format 1 fragments comparable at their version
    # (optimize_indices("name"): the merge-only spelling).
    fresh.optimize_indices("vec_idx")
    (entry,) = idx.read_manifest(fresh.storage, "vec_idx")["segments"]
    assert [f["record"] for f in entry["fragments"][:4]] == \
        [{"kind": "unrecorded", "source_version": 1}] * 4
    assert [f["rows"] for f in entry["fragments"]] == [PER] * 5
    assert entry["fragments"][4] == new["fragments"][0]
    assert _stale(bitshard.dataset(uri)) == {}
    changed = bitshard.dataset(_overlay(uri, 1, [2], np.zeros((1, D), np.float32) + 60))
    assert _stale(changed) == {1: "overlay"}


def test_parquet_format_1_index(tmp_path):
    x = clustered(N, D, seed=16)
    uri = _parquet_dir(tmp_path, x, [f"p{i}.parquet" for i in range(4)])
    ds = bitshard.dataset(uri)
    ds.create_index("vec", num_partitions=4, num_bits=4)
    _as_format_1(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _stale(bitshard.dataset(uri)) == {}  # the same listing: current
        rows, _ = _top(bitshard.dataset(uri), x[PER + 1], k=1)
    assert rows == [_rowid(1, 1)]
    pq.write_table(pa.table({"vec": _fsl(x[PER:2 * PER])}), os.path.join(uri, "p9.parquet"))
    ds = bitshard.dataset(uri)
    token = idx.read_manifest(ds.storage, "vec_idx")["source_version"]
    why = (f"unverified: the parquet files changed since the index was built (version {token}) "
           f"and it recorded no fragment identities")
    assert _stale(ds) == {f: why for f in range(4)}
    with pytest.warns(UserWarning, match=r"4 fragment\(s\) \[0, 1, 2, 3\] cannot be verified"):
        rows, dists = _top(ds, x[PER + 1], k=2)
    assert sorted(rows) == [_rowid(1, 1), _rowid(4, 1)] and dists == [0.0, 0.0]
