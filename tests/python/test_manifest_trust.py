"""A segment file is checked against what the manifest says it is (issue 11
item 3), and manifests and build states are validated against their schema
before any field is used (item 4)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import bitshard
from bitshard import index as idx
from bitshard import schema
from bitshard.errors import CorruptIndexError

from conftest import clustered, unreadable_build_state_message, write_lance

D = 16
UA, UB = "a" * 32, "b" * 32


@pytest.fixture
def two_segments(tmp_path):
    """An index of two committed segments (same artifacts): UA covers
    fragments 0-1, UB fragments 2-3."""
    x = clustered(1200, D, seed=6)
    uri = write_lance(tmp_path / "v.lance", x, 300)
    ds = bitshard.dataset(uri)
    ivf = bitshard.IvfModel(x[:4].copy(), "l2")
    a = ds.create_index_uncommitted("vec", name="idx", ivf_centroids=ivf, fragment_ids=[0, 1],
                                    index_uuid=UA)
    b = ds.create_index_uncommitted("vec", name="idx", ivf_centroids=ivf, fragment_ids=[2, 3],
                                    index_uuid=UB)
    ds.commit_existing_index_segments("idx", "vec", [a, b])
    return uri, x, ds, a, b


def _rewrite_manifest(ds, edit):
    """Write version 2 of 'idx': version 1 changed by ``edit(doc)``, with a
    valid checksum (the writer is hostile or buggy, not the disk)."""
    root = ds.index_root
    doc = json.load(open(os.path.join(root, "indices", "idx", "v00000001.json")))
    edit(doc)
    doc["version"] = 2
    doc["checksum"] = idx._checksum(doc)
    path = os.path.join(root, "indices", "idx", "v00000002.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def test_segment_copied_over_another_is_refused(two_segments):
    uri, x, ds, a, b = two_segments
    assert len(ds.search("vec", x[0], k=5)) == 5
    shutil.copy(a.path, b.path)  # every checksum and fingerprint still passes
    fresh = bitshard.dataset(uri)
    mpath = os.path.join(ds.index_root, "indices", "idx", "v00000001.json")
    with pytest.raises(CorruptIndexError) as e:
        fresh.search("vec", x[0], k=5)
    assert str(e.value) == (
        f"segment file {b.path} is not the segment manifest {mpath} describes: "
        f"uuid is '{UB}' there, '{UA}' in the file")
    # verify reports it too
    faults = bitshard.distributed.verify(uri)
    assert any(f"the manifest says uuid='{UB}', the file has '{UA}'" in f for f in faults)


def test_manifest_listing_a_segment_twice_is_refused(two_segments):
    uri, x, ds, a, b = two_segments

    def twice(doc):
        doc["segments"] = [doc["segments"][0], doc["segments"][0]]

    mpath = _rewrite_manifest(ds, twice)
    fresh = bitshard.dataset(uri)
    with pytest.raises(CorruptIndexError) as e:
        fresh.search("vec", x[0], k=5)
    assert str(e.value) == (f"manifest {mpath}: segment {UA} is listed twice (segments[0] and "
                            f"segments[1])")


def test_manifest_entries_with_overlapping_fragments_are_refused(two_segments):
    uri, x, ds, a, b = two_segments

    def overlap(doc):
        doc["segments"][1]["fragment_ids"] = [1, 2, 3]

    mpath = _rewrite_manifest(ds, overlap)
    with pytest.raises(CorruptIndexError) as e:
        bitshard.dataset(uri).search("vec", x[0], k=5)
    assert str(e.value) == (f"manifest {mpath}: fragment 1 is in two entries: segments[0] "
                            f"({UA}) and segments[1] ({UB})")


@pytest.mark.parametrize("field,value,shown", [
    ("fragment_ids", [2], "fragment_ids is [2] there, [2, 3] in the file"),
    ("num_rows", 601, "num_rows is 601 there, 600 in the file"),
])
def test_manifest_entry_disagreeing_with_its_file_is_refused(two_segments, field, value, shown):
    uri, x, ds, a, b = two_segments

    def edit(doc):
        doc["segments"][1][field] = value

    mpath = _rewrite_manifest(ds, edit)
    with pytest.raises(CorruptIndexError) as e:
        bitshard.dataset(uri).search("vec", x[0], k=5)
    assert str(e.value) == (f"segment file {b.path} is not the segment manifest {mpath} "
                            f"describes: {shown}")



# ------------------------------------------- item 4: schemas of on-disk JSON


def _manifest_doc(ds):
    return json.load(open(os.path.join(ds.index_root, "indices", "idx", "v00000001.json")))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["segments"][0].update(metric="bogus"),
     "bad field: Invalid enum value 'bogus' - at `$.segments[0].metric`"),
    (lambda d: d.update(metric="bogus"),
     "bad field: Invalid enum value 'bogus' - at `$.metric`"),
    (lambda d: d["segments"][1].update(num_bits="x"),
     "bad field: Expected `int`, got `str` - at `$.segments[1].num_bits`"),
    (lambda d: d["segments"][1].update(num_bits=12),
     "bad field: Expected `int` <= 9 - at `$.segments[1].num_bits`"),
    (lambda d: d.update(format_version="2"),
     "field 'format_version' must be an integer >= 1, got '2'"),
    (lambda d: d["segments"][0].update(fragment_ids=[-1]),
     "bad field: Expected `int` >= 0 - at `$.segments[0].fragment_ids[0]`"),
    (lambda d: d["segments"][0].update(uuid="../" + "a" * 29),
     "bad field: Expected `str` matching regex '^[0-9a-f]{32}\\\\Z' - at `$.segments[0].uuid`"),
    (lambda d: d["segments"][0].pop("num_rows"),
     "bad field: Object missing required field `num_rows` - at `$.segments[0]`"),
    (lambda d: d.update(segments={"a": 1}),
     "bad field: Expected `array`, got `object` - at `$.segments`"),
    (lambda d: d.update(extra=json.loads("[" * 17 + "0" + "]" * 17)),
     "nested 18 deep, more than the 16 a manifest may be"),
    (lambda d: d["segments"][0].update(file="segments/../../x.bsseg"),
     "segments[0].file is 'segments/../../x.bsseg', the segment's uuid makes it "
     "'segments/" + UA + ".bsseg'"),
    (lambda d: d.update(name="../x"),
     "field 'name' is not a usable index name: '../x'"),
])
def test_hostile_manifest_fields_are_named(two_segments, edit, message, capsys):
    uri, x, ds, a, b = two_segments
    mpath = _rewrite_manifest(ds, edit)   # with a valid checksum
    with pytest.raises(CorruptIndexError) as e:
        idx.read_manifest(ds.index_root, "idx")
    assert str(e.value) == f"manifest {mpath}: {message}"
    with pytest.raises(CorruptIndexError) as e:
        bitshard.dataset(uri).search("vec", x[0], k=5)
    assert str(e.value) == f"manifest {mpath}: {message}"
    # the command line prints the message, not a traceback
    from bitshard import cli

    assert cli.main(["describe", uri]) == 1
    err = capsys.readouterr().err
    assert err == f"bitshard: error: manifest {mpath}: {message}\n"


def test_deeply_nested_manifest_is_corrupt_not_recursion(two_segments, capsys):
    uri, x, ds, a, b = two_segments
    path = os.path.join(ds.index_root, "indices", "idx", "v00000002.json")
    for data in (b"[" * 200_000 + b"]" * 200_000,
                 b'{"format": "bitshard-manifest", "x": ' + b"[" * 200_000 + b"]" * 200_000
                 + b"}",
                 b'{"a": "' + b"[" * 300 + b'"}'):   # brackets inside a string do not nest
        with open(path, "wb") as f:
            f.write(data)
        with pytest.raises(CorruptIndexError) as e:
            idx.read_manifest(ds.index_root, "idx")
        assert str(e.value).startswith(f"manifest {path}")
        assert cli_describe(uri, capsys).startswith(f"bitshard: error: manifest {path}")
    with open(path, "wb") as f:
        f.write(b"[" * 200_000)
    with pytest.raises(CorruptIndexError) as e:
        idx.read_manifest(ds.index_root, "idx")
    assert str(e.value) == f"manifest {path}: nested 200000 deep, more than the 16 a manifest may be"


def cli_describe(uri, capsys):
    from bitshard import cli

    assert cli.main(["describe", uri]) == 1
    return capsys.readouterr().err


def test_oversized_manifest_is_refused(two_segments, monkeypatch):
    uri, x, ds, a, b = two_segments
    from bitshard import schema

    monkeypatch.setattr(schema, "MAX_DOCUMENT_BYTES", 100)
    path = os.path.join(ds.index_root, "indices", "idx", "v00000001.json")
    size = os.path.getsize(path)
    with pytest.raises(CorruptIndexError) as e:
        idx.read_manifest(ds.index_root, "idx")
    assert str(e.value) == f"manifest {path}: {size} bytes, more than the 100 a manifest may have"


def test_too_many_segments_is_refused(two_segments):
    uri, x, ds, a, b = two_segments
    from bitshard import schema

    entry = _manifest_doc(ds)["segments"][0]
    many = [dict(entry, uuid=f"{i:032x}", fragment_ids=[i]) for i in range(schema.MAX_SEGMENTS + 1)]
    mpath = _rewrite_manifest(ds, lambda d: d.update(segments=many))
    with pytest.raises(CorruptIndexError) as e:
        idx.read_manifest(ds.index_root, "idx")
    assert str(e.value) == (f"manifest {mpath}: bad field: Expected `array` of length <= "
                            f"{schema.MAX_SEGMENTS} - at `$.segments`")


# ---------------------------------------------------------- build states


def _interrupted(uri):
    class Stop(Exception):
        pass

    def stop(stage, done, total):
        if stage == "encode" and done >= 600:
            raise Stop

    with pytest.raises(Stop):
        bitshard.build_index(uri, "vec", name="b", num_partitions=4, executor="serial",
                             fragments_per_task=1, seed=3, progress=stop)
    return os.path.join(uri, "_bitshard", "builds", "b.json")


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["params"].update(num_bits="x"),
     "bad field: Expected `int | null`, got `str` - at `$.params.num_bits`"),
    (lambda d: d["params"].update(metric="bogus"),
     "bad field: Invalid enum value 'bogus' - at `$.params.metric`"),
    (lambda d: d.update(format_version="2"),
     "field 'format_version' must be an integer >= 1, got '2'"),
    (lambda d: d.update(tasks=json.loads("[" * 17 + "]" * 17)),
     "nested 18 deep, more than the 16 a build state may be"),
    (lambda d: d["segments"].update({"99": "c" * 32}),
     "segments['99'] names no task (there are 4)"),
    (lambda d: d["tasks"][1].update(id=0),
     "tasks[1].id is 0, not 1"),
])
def test_hostile_build_state_is_ignored_with_its_field_named(tmp_path, edit, message, caplog):
    x = clustered(1200, D, seed=6)
    uri = write_lance(tmp_path / "v.lance", x, 300)
    path = _interrupted(uri)
    doc = json.load(open(path))
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(CorruptIndexError) as e:
        schema.read_build_state(open(path, "rb").read(), path)
    assert str(e.value) == f"build state {path}: {message}"
    # cleanup removes nothing while it cannot tell which segments the build
    # wrote (and says how to proceed); a rerun starts afresh instead of failing
    import logging

    segs = sorted(os.listdir(os.path.join(uri, "_bitshard", "segments")))
    with pytest.raises(CorruptIndexError) as e:
        bitshard.cleanup(uri, 0)
    assert str(e.value) == unreadable_build_state_message(
        path, f"build state {path}: {message}", "b")
    assert sorted(os.listdir(os.path.join(uri, "_bitshard", "segments"))) == segs
    with caplog.at_level(logging.WARNING, logger="bitshard"):
        ds = bitshard.build_index(uri, "vec", name="b", num_partitions=4, executor="serial",
                                  fragments_per_task=1, seed=3, progress=False)
    assert f"ignoring build state: build state {path}: {message}" in caplog.text
    # the build committed and dropped its state: cleanup runs again
    assert set(bitshard.cleanup(uri, 0)) >= {s[:32] for s in segs}
    assert not ds.last_build_stats["resumed"]
    assert len(ds.search("vec", x[0], k=5)) == 5


def test_one_unreadable_manifest_does_not_stop_other_indexes(two_segments):
    # A corrupt manifest of one index used to make every search under the
    # root fail, whichever index it asked for.
    uri, x, ds, a, b = two_segments
    ivf = bitshard.IvfModel(x[:4].copy(), "l2")
    seg = ds.create_index_uncommitted("vec", name="other", ivf_centroids=ivf)
    ds.commit_existing_index_segments("other", "vec", [seg])
    want = ds.search("vec", x[0], k=5, index="other").column("_rowid").to_pylist()
    with open(os.path.join(ds.index_root, "indices", "idx", "v00000001.json"), "w") as f:
        f.write('{"format": ')
    fresh = bitshard.dataset(uri)
    got = fresh.search("vec", x[0], k=5, index="other").column("_rowid").to_pylist()
    assert got == want
    with pytest.raises(CorruptIndexError, match="v00000001.json"):
        fresh.search("vec", x[0], k=5, index="idx")
    # By column: the readable index answers, and the warning names the other.
    with pytest.warns(UserWarning, match="index 'idx' is unreadable"):
        got = fresh.search("vec", x[0], k=5).column("_rowid").to_pylist()
    assert got == want
    # With no readable index on the column, the damage is the answer.
    shutil.rmtree(os.path.join(ds.index_root, "indices", "other"))
    with pytest.raises(CorruptIndexError, match="v00000001.json"):
        bitshard.dataset(uri).search("vec", x[0], k=5)
