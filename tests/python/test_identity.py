"""Fragment identities (bitshard.identity) and manifest format 2: what a
segment records about the fragments it encoded, at the version it read."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bitshard
from bitshard import identity
from bitshard import index as idx
from bitshard.errors import CorruptIndexError
from conftest import clustered, write_lance


def _manifest(ds, name="vec_idx", version=None):
    v = version or idx.latest_version(ds.storage, name)
    with open(os.path.join(ds.index_root, "indices", name, f"v{v:08d}.json")) as f:
        return json.load(f)


@pytest.fixture
def indexed(small_lance):
    """small_lance with its index vec_idx (8 partitions) committed:
    (uri, vectors, dataset, the manifest as a dict)."""
    uri, x = small_lance
    ds = bitshard.dataset(uri)
    ds.create_index("vec", num_partitions=8)
    return uri, x, ds, _manifest(ds)


def _write_as_version_2(ds, doc):
    """doc, an edited manifest of vec_idx, committed as its version 2 with a
    valid checksum (so that only the edit can be refused); its path."""
    doc["version"] = 2
    doc["checksum"] = idx._checksum(doc)
    path = os.path.join(ds.index_root, "indices", "vec_idx", "v00000002.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def test_fingerprint_is_pinned():
    # The fingerprint is a format: a change here breaks every manifest.
    rec = {"kind": "parquet", "path": "a/b.parquet", "size": 123, "mtime_ns": 456}
    assert identity.canonical_json(rec) == \
        '{"kind":"parquet","mtime_ns":456,"path":"a/b.parquet","size":123}'
    assert identity.fingerprint(rec) == identity.fingerprint(dict(reversed(list(rec.items()))))
    assert identity.fingerprint(rec) == "e2c8c96a005840005d054078491238aa"


def test_lance_records_the_column_files_and_rows(tmp_path):
    x = clustered(300, 8, seed=3)
    uri = write_lance(tmp_path / "d.lance", x, 100)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", num_partitions=2)
    doc = _manifest(ds)
    assert doc["format_version"] == 2
    (entry,) = doc["segments"]
    assert entry["source_version"] == 1
    assert [f["id"] for f in entry["fragments"]] == [0, 1, 2]
    import lance
    lds = lance.dataset(uri)
    for f, lf in zip(entry["fragments"], lds.get_fragments()):
        (dfile,) = lf.metadata.files
        assert f["rows"] == 100
        assert f["record"] == {
            "kind": "lance", "physical_rows": 100, "fields": [1],
            "files": [{"path": dfile.path, "size": dfile.file_size_bytes, "version": "2.2",
                       "base_id": None, "columns": [[1, 1]]}],
            "overlays": []}
        assert f["identity"] == identity.fingerprint(f["record"])
    h = idx.committed_segments(ds.storage, "vec_idx")[0]
    assert [i.id for i in h.identities] == [0, 1, 2]
    assert h.to_json() == entry


def test_parquet_records_path_size_mtime(tmp_path):
    d = tmp_path / "pq"
    d.mkdir()
    x = clustered(200, 8, seed=4)
    for i in range(2):
        t = pa.table({"vec": pa.FixedSizeListArray.from_arrays(
            pa.array(x[i * 100:(i + 1) * 100].ravel()), 8)})
        pq.write_table(t, d / f"part{i}.parquet")
    ds = bitshard.dataset(str(d))
    ds.create_index("vec", num_partitions=2)
    (entry,) = _manifest(ds)["segments"]
    for i, f in enumerate(entry["fragments"]):
        st = os.stat(d / f"part{i}.parquet")
        assert f["record"] == {"kind": "parquet", "path": f"part{i}.parquet",
                               "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def test_merge_and_distributed_build_carry_identities(small_lance):
    uri, x = small_lance
    ds = bitshard.dataset(uri)
    c = bitshard.train_ivf(ds, "vec", 8)
    a = ds.create_index_uncommitted("vec", name="m", ivf_centroids=c, fragment_ids=[2, 3])
    b = ds.create_index_uncommitted("vec", name="m", ivf_centroids=c, fragment_ids=[0, 1])
    merged = ds.merge_existing_index_segments([a, b])
    assert [i.id for i in merged.identities] == list(merged.fragment_ids)
    assert {i.id: i for i in merged.identities} == {i.id: i for i in a.identities + b.identities}
    assert merged.source_version == 1
    ds.commit_existing_index_segments("m", "vec", [merged])
    (entry,) = _manifest(ds, "m")["segments"]
    assert [f["id"] for f in entry["fragments"]] == list(merged.fragment_ids)
    built = bitshard.build_index(uri, "vec", name="b", num_partitions=8, executor="serial")
    entries = _manifest(built, "b")["segments"]
    assert sorted(f["id"] for e in entries for f in e["fragments"]) == [0, 1, 2, 3]


def test_handle_without_identities_gets_the_committing_sources(small_lance):
    # A resumed build makes handles from the files alone; its Dataset is
    # pinned to the version the segments were read at.
    uri, x = small_lance
    ds = bitshard.dataset(uri)
    c = bitshard.train_ivf(ds, "vec", 8)
    h = ds.create_index_uncommitted("vec", name="r", ivf_centroids=c)
    bare = idx.OpenSegment.of(ds.storage, h.uuid).handle(ds.storage.root, "r")
    assert bare.identities == ()
    ds.commit_existing_index_segments("r", "vec", [bare])
    (entry,) = _manifest(ds, "r")["segments"]
    assert entry["fragments"] == [i.to_json() for i in h.identities]


def test_v2_identity_not_matching_its_record_is_refused(indexed):
    uri, x, ds, doc = indexed
    doc["segments"][0]["fragments"][1]["record"]["physical_rows"] = 1499
    path = _write_as_version_2(ds, doc)
    fp = identity.fingerprint(doc["segments"][0]["fragments"][1]["record"])
    with pytest.raises(CorruptIndexError) as e:
        idx.read_manifest(ds.storage, "vec_idx")
    assert str(e.value) == (
        f"manifest {path}: segments[0].fragments[1].identity is "
        f"{doc['segments'][0]['fragments'][1]['identity']}, its record's fingerprint is {fp}")


def test_v1_manifest_with_fragments_is_refused(indexed):
    uri, x, ds, doc = indexed
    doc["format_version"] = 1
    path = _write_as_version_2(ds, doc)
    with pytest.raises(CorruptIndexError) as e:
        idx.read_manifest(ds.storage, "vec_idx")
    assert str(e.value) == (f"manifest {path}: segments[0].fragments is a format 2 field, "
                            f"the manifest says format 1")


def test_unknown_record_kind_is_refused(indexed):
    uri, x, ds, doc = indexed
    doc["segments"][0]["fragments"][0]["record"]["kind"] = "zip"
    path = _write_as_version_2(ds, doc)
    with pytest.raises(CorruptIndexError) as e:
        idx.read_manifest(ds.storage, "vec_idx")
    assert str(e.value) == (f"manifest {path}: bad field: Invalid value 'zip' - at "
                            f"`$.segments[0].fragments[0].record.kind`")


def test_identities_of_other_fragments_than_the_file_are_refused(indexed):
    uri, x, ds, doc = indexed
    frags = doc["segments"][0]["fragments"]
    frags[0], frags[1] = frags[1], frags[0]
    path = _write_as_version_2(ds, doc)
    seg = idx.segment_path(ds.index_root, doc["segments"][0]["uuid"])
    with pytest.raises(CorruptIndexError) as e:
        bitshard.dataset(uri).search("vec", x[0], k=1)
    assert str(e.value) == (
        f"segment file {seg} is not the segment manifest {path} describes: its fragment "
        f"identities are of fragments [1, 0, 2, 3], the file has [0, 1, 2, 3]")


# ------------------------------------------- fingerprints in segment files


def test_segments_record_the_fingerprints_of_the_manifest_records(indexed):
    # Builds (here and by workers), merges and commits: the file's
    # fragment table carries each fragment's fingerprint, the manifest its
    # record; the two agree.
    uri, x, ds, _ = indexed
    built = bitshard.build_index(uri, "vec", name="b", num_partitions=8, executor="serial")
    for d, name in ((ds, "vec_idx"), (built, "b")):
        for e in _manifest(d, name)["segments"]:
            o = idx.OpenSegment(idx.segment_path(d.index_root, e["uuid"]))
            assert o.fragment_fingerprints == [f["identity"] for f in e["fragments"]]
            assert o.fragment_fingerprints == [
                identity.fingerprint(ds.source.fragment_identity(f, "vec"))
                for f in e["fragment_ids"]]


def test_a_manifest_record_the_file_contradicts_is_refused(indexed):
    # A record (and its fingerprint) rewritten consistently in the manifest
    # still differs from the fingerprint the worker wrote in the file.
    from bitshard.maintenance import verify_report

    uri, x, ds, doc = indexed
    e = doc["segments"][0]
    old_fp = e["fragments"][1]["identity"]
    e["fragments"][1]["record"]["files"][0]["size"] += 1
    new_fp = identity.fingerprint(e["fragments"][1]["record"])
    e["fragments"][1]["identity"] = new_fp
    path = _write_as_version_2(ds, doc)
    seg = idx.segment_path(ds.index_root, e["uuid"])
    with pytest.raises(CorruptIndexError) as err:
        bitshard.dataset(uri).search("vec", x[0], k=1)
    assert str(err.value) == (
        f"segment file {seg} is not the segment manifest {path} describes: fragment 1's "
        f"identity fingerprint is {new_fp} there, {old_fp} in the file")
    assert verify_report(uri).faults == [
        f"index 'vec_idx': segment file {seg} is not the segment the manifest describes: "
        f"fragment 1's identity fingerprint is {new_fp} there, {old_fp} in the file"]


def test_staleness_is_read_from_the_file_without_manifest_records(indexed, tmp_path):
    # A manifest entry without records (a format 2 manifest may leave them
    # out) over a file that has fingerprints: the file decides, not the
    # manifest's source version (which, gone, would make every fragment
    # "unverified").
    import lance

    uri, x, ds, doc = indexed
    for e in doc["segments"]:
        e.pop("fragments")
        e["source_version"] = 0  # never a Lance version: cannot be compared
    _write_as_version_2(ds, doc)
    ds = bitshard.dataset(uri)
    (e,) = doc["segments"]
    handles = idx.committed_segments(ds.storage, "vec_idx")
    opened = [idx.open_handle(h, ds.storage) for h in handles]
    assert identity.stale_fragments(ds.source, doc, handles, opened) == {}
    # without the file: the manifest's fallback cannot verify anything
    assert set(identity.stale_fragments(ds.source, doc, handles)) == set(e["fragment_ids"])
    # describe_indices judges as the search does: from the file
    assert ds.describe_indices()[0]["stale_fragments"] == []
    # Fragment 2's vectors replaced in place: the file's fingerprint no
    # longer matches, and with no record to compare the reason is generic.
    lds = lance.dataset(uri)
    lds.drop_columns(["vec"])
    new = (x * -1.0).astype(np.float32)

    @lance.batch_udf(output_schema=pa.schema([pa.field("vec", pa.list_(pa.float32(),
                                                                        x.shape[1]))]))
    def udf(batch):
        ids = batch.column("id").to_numpy()
        return pa.record_batch([pa.FixedSizeListArray.from_arrays(
            pa.array(new[ids].ravel()), x.shape[1])], names=["vec"])

    lance.dataset(uri).add_columns(udf, read_columns=["id"])
    ds = bitshard.dataset(uri)
    opened = [idx.open_handle(h, ds.storage) for h in handles]
    assert identity.stale_fragments(ds.source, doc, handles, opened) == \
        {f: "identity changed" for f in e["fragment_ids"]}
    assert ds.describe_indices()[0]["stale_fragments"] == \
        [{"id": f, "reason": "identity changed"} for f in e["fragment_ids"]]
    rows = ds.search("vec", new[5], k=1).column("_rowid").to_pylist()
    assert rows == [5]  # searched exactly: the new vector is found
