"""No file outside the index root, ever: names read from disk are checked in
one place (bitshard.names) before they become paths or object keys, and
symbolic links under the root are never deleted and never followed out of it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings

import numpy as np
import pytest

import bitshard
from bitshard import cli, names
from bitshard import index as idx
from bitshard.errors import CorruptIndexError, InvalidInputError
from bitshard.storage import LocalStorage

from conftest import clustered, write_lance

D = 16


@pytest.fixture
def lance_data(tmp_path):
    """1200 x 16 vectors in 4 Lance fragments at <tmp>/data/v.lance."""
    x = clustered(1200, D, seed=4)
    uri = write_lance(tmp_path / "data" / "v.lance", x, 300)
    return uri, x


class Interrupt(Exception):
    pass


def _interrupted_build(uri, **kw):
    def stop(stage, done, total):
        if stage == "encode" and done >= 600:
            raise Interrupt

    with pytest.raises(Interrupt):
        bitshard.build_index(uri, "vec", name="idx", num_partitions=4, executor="serial",
                             fragments_per_task=1, seed=3, progress=stop, **kw)


# ----------------------------------------------------------- the example


def test_build_state_cannot_delete_outside_the_root(lance_data, tmp_path, caplog):
    """Issue 11 item 2: a build state whose merges name ``../../../outside/victim``
    made the resumed build delete ``outside/victim.bsseg`` next to the data."""
    uri, _ = lance_data
    _interrupted_build(uri)
    root = os.path.join(uri, "_bitshard")
    victim = tmp_path / "data" / "outside" / "victim.bsseg"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    # the path the old code deleted: <root>/segments/../../../outside/victim.bsseg
    assert os.path.realpath(os.path.join(root, "segments", "../../../outside/victim.bsseg")) \
        == os.path.realpath(victim)
    state_path = os.path.join(root, "builds", "idx.json")
    state = json.load(open(state_path))
    assert len(state["segments"]) == 2
    state["merges"].append({"inputs": list(state["segments"].values()),
                            "uuid": "../../../outside/victim"})
    json.dump(state, open(state_path, "w"))
    with caplog.at_level(logging.WARNING, logger="bitshard"):
        ds = bitshard.build_index(uri, "vec", name="idx", num_partitions=4, executor="serial",
                                  fragments_per_task=1, seed=3, progress=False)
    assert victim.read_bytes() == b"precious"
    # the hostile state is refused as a whole, naming the file and the field
    assert not ds.last_build_stats["resumed"]
    assert (f"ignoring build state: build state {state_path}: bad field: Expected `str` "
            f"matching regex '^[0-9a-f]{{32}}\\\\Z' - at `$.merges[0].uuid`") in caplog.text
    assert len(ds.search("vec", np.zeros(D, np.float32), k=5)) == 5


def test_hostile_uuids_never_become_keys(tmp_path):
    st = LocalStorage(str(tmp_path / "root"))
    for bad in ("../../../outside/victim", "../" + "a" * 29, "A" * 32, "a" * 31, "a" * 33,
                "a" * 31 + "/", "ａ" * 32, "0" * 31 + "\0", 7, None):
        with pytest.raises(CorruptIndexError, match="must be a segment uuid"):
            idx.segment_key(bad)
        with pytest.raises(CorruptIndexError, match="must be a segment uuid"):
            idx.segment_path(str(tmp_path), bad)
        with pytest.raises(CorruptIndexError, match="must be a segment uuid"):
            idx.OpenSegment.of(st, bad)
    assert idx.segment_key("0f" * 16) == "segments/" + "0f" * 16 + ".bsseg"
    # the last line of defence: a key is checked before it becomes a path
    for key in ("segments/../../x", "../x", "/etc/passwd", "a//b", "a/./b", "a\\..\\b", "a\0"):
        with pytest.raises(CorruptIndexError, match="refusing index-root key"):
            st.path(key)
        with pytest.raises(CorruptIndexError, match="refusing index-root key"):
            st.delete(key)
        with pytest.raises(CorruptIndexError, match="refusing index-root key"):
            st.read_bytes(key)
    with pytest.raises(InvalidInputError, match="index_uuid is not a UUID"):
        idx.new_uuid("../x")


def test_manifest_versions_and_names(tmp_path):
    with pytest.raises(InvalidInputError, match=r"manifest version must be an integer in "
                                                r"1\.\.99999999, got -1"):
        names.manifest_key("idx", -1)
    for v in (0, 10**8, True, 1.0, "1"):
        with pytest.raises(InvalidInputError, match="manifest version"):
            names.manifest_key("idx", v)
    assert names.manifest_key("idx", 12) == "indices/idx/v00000012.json"
    assert [names.parse_manifest_file(f) for f in (
        "v00000001.json", "v1.json", "v000000001.json", "v0000000².json", "v00000000.json",
        "v00000001.json.123.tmp", "x00000001.json")] == [1, None, None, None, None, None, None]
    assert names.parse_segment_file("ab" * 16 + ".bsseg") == ("ab" * 16, False)
    assert names.parse_segment_file("ab" * 16 + ".bsseg.tmp") == ("ab" * 16, True)
    assert names.parse_segment_file("victim.bsseg") is None
    # manifest listings ignore names that are not exactly vNNNNNNNN.json
    d = tmp_path / "indices" / "x"
    d.mkdir(parents=True)
    for fn in ("v1.json", "v0000000².json", "v00000000.json"):
        (d / fn).write_text("{}")
    assert idx.manifest_versions(str(tmp_path), "x") == []
    assert idx.latest_version(str(tmp_path), "x") == 0
    for bad in ("../x", "a/b", "", ".hidden", "a\0b", "a\\b", "é" * 200):
        with pytest.raises(InvalidInputError, match="not a usable index name"):
            idx.read_manifest(str(tmp_path), bad)


def test_new_index_names_are_strict(lance_data, tmp_path):
    uri, x = lance_data
    ds = bitshard.dataset(uri)
    cents = x[:4].copy()
    strict = ("name must be 1 to 128 characters of A-Z a-z 0-9 _ . - not starting with '.' or "
              "'-' and without '..' (pattern [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}), got ")
    cases = [(bad, f"name is not a usable index name: {bad!r}")
             for bad in ("../x", "a/b", ".x", "a\0b", "a\\b")]
    cases += [(bad, strict + repr(bad)) for bad in ("a b", "-x", "a..b", "x" * 129, "é", "a+b")]
    for bad, message in cases:
        with pytest.raises(InvalidInputError) as e:
            ds.create_index("vec", name=bad, ivf_centroids=cents)
        assert str(e.value) == message
        with pytest.raises(InvalidInputError) as e:
            bitshard.build_index(uri, "vec", name=bad, num_partitions=4, executor="serial",
                                 progress=False)
        assert str(e.value) == message
    assert not os.path.exists(os.path.join(uri, "_bitshard"))
    assert sorted(os.listdir(tmp_path / "data")) == ["v.lance"]
    for good in ("x", "X_1", "vec_idx", "a.b-c", "_", "9" * 128):
        assert names.check_index_name(good, new=True) == good


def test_legacy_index_names_stay_readable(lance_data):
    uri, x = lance_data
    ds = bitshard.dataset(uri).create_index("vec", name="idx", ivf_centroids=x[:4].copy())
    want = ds.search("vec", x[:3], k=4)
    root = os.path.join(uri, "_bitshard")
    # an index created by an older bitshard under a name the new rule refuses
    src = os.path.join(root, "indices", "idx")
    dst = os.path.join(root, "indices", "my idx")
    os.makedirs(dst)
    doc = json.load(open(os.path.join(src, "v00000001.json")))
    doc["name"] = "my idx"
    doc["checksum"] = idx._checksum(doc)
    json.dump(doc, open(os.path.join(dst, "v00000001.json"), "w"))
    shutil.rmtree(src)
    with pytest.warns(names.LegacyNameWarning, match="index name 'my idx'"):
        ds = bitshard.dataset(uri)
        got = ds.search("vec", x[:3], k=4)
    assert got.equals(want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", names.LegacyNameWarning)
        # new versions of the existing index are allowed, new indexes are not
        ds.optimize_indices("my idx")
        ds.create_index("vec", name="my idx", ivf_centroids=x[:4].copy())
        assert idx.manifest_versions(root, "my idx") == [1, 2]
        with pytest.raises(InvalidInputError, match="got 'new idx'"):
            ds.create_index("vec", name="new idx", ivf_centroids=x[:4].copy())
    # directories that are no index name at all are skipped (hidden ones quietly)
    os.makedirs(os.path.join(root, "indices", ".trash"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", names.LegacyNameWarning)
        assert idx.index_dir_names(root) == ["my idx"]


# ------------------------------------------------------------ symlinks


def _built(uri, x):
    return bitshard.dataset(uri).create_index("vec", name="idx", ivf_centroids=x[:4].copy())


def test_symlinked_segment_pointing_outside_is_refused(lance_data, tmp_path):
    uri, x = lance_data
    ds = _built(uri, x)
    (h,) = idx.committed_segments(ds.storage, "idx")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / "copy.bsseg"
    shutil.copy(h.path, target)
    os.remove(h.path)
    os.symlink(target, h.path)
    ds2 = bitshard.dataset(uri)
    with pytest.raises(CorruptIndexError) as e:
        ds2.search("vec", x[0], k=3)
    assert str(e.value) == (
        f"{h.path} resolves to {os.path.realpath(target)}, outside the index root "
        f"{os.path.realpath(ds.index_root)}: bitshard does not follow symbolic links out of "
        f"the index root")
    # cleanup never deletes a link or what it points to
    os.remove(h.path)
    stray = os.path.join(ds.index_root, "segments", "cd" * 16 + ".bsseg")
    os.symlink(target, stray)
    assert bitshard.cleanup(uri, 0) == []
    assert os.path.islink(stray) and target.exists()


def test_symlinked_segment_inside_the_root_is_read(lance_data):
    uri, x = lance_data
    ds = _built(uri, x)
    want = ds.search("vec", x[:2], k=3)
    (h,) = idx.committed_segments(ds.storage, "idx")
    moved = os.path.join(ds.index_root, "store", "seg.bin")
    os.makedirs(os.path.dirname(moved))
    os.replace(h.path, moved)
    os.symlink(moved, h.path)
    assert bitshard.dataset(uri).search("vec", x[:2], k=3).equals(want)
    assert bitshard.distributed.verify(uri) == []


def test_symlinked_directory_out_of_the_root_is_refused(lance_data, tmp_path):
    uri, x = lance_data
    ds = _built(uri, x)
    seg_dir = os.path.join(ds.index_root, "segments")
    outside = tmp_path / "outside_segments"
    shutil.move(seg_dir, outside)
    os.symlink(outside, seg_dir)
    victim = outside / ("ef" * 16 + ".bsseg")   # unreferenced and old: cleanup would remove it
    victim.write_bytes(b"precious")
    os.utime(victim, (1, 1))
    with pytest.raises(CorruptIndexError, match="outside the index root"):
        bitshard.cleanup(uri, 0)
    assert victim.read_bytes() == b"precious"
    with pytest.raises(CorruptIndexError, match="outside the index root"):
        bitshard.dataset(uri).search("vec", x[0], k=3)
    # a planted link at a temp-file name is not written through
    os.remove(seg_dir)
    shutil.move(outside, seg_dir)
    builds = os.path.join(ds.index_root, "builds")
    os.makedirs(builds)
    secret = tmp_path / "secret"
    secret.write_text("keep")
    os.symlink(secret, os.path.join(builds, f"x.json.{os.getpid()}.tmp"))  # the old temp name
    ds.storage.write_bytes("builds/x.json", b"{}")
    assert secret.read_text() == "keep" and open(os.path.join(builds, "x.json")).read() == "{}"


def test_cli_refuses_a_bad_name_cleanly(lance_data, capsys):
    uri, _ = lance_data
    code = cli.main(["build", uri, "--column", "vec", "--name", "../up", "--executor", "serial",
                     "--num-partitions", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith("bitshard: error: name is not a usable index name: '../up'")


def test_segment_writer_does_not_write_through_a_planted_link(lance_data, tmp_path):
    uri, x = lance_data
    ds = bitshard.dataset(uri)
    seg_dir = os.path.join(ds.index_root, "segments")
    os.makedirs(seg_dir)
    secret = tmp_path / "secret"
    secret.write_text("keep")
    tmp = os.path.join(seg_dir, "ab" * 16 + ".bsseg.tmp")
    os.symlink(secret, tmp)
    with pytest.raises(CorruptIndexError) as e:
        ds.create_index_uncommitted("vec", ivf_centroids=x[:4].copy(), index_uuid="ab" * 16)
    assert str(e.value) == (f"refusing to write {os.path.join(seg_dir, 'ab' * 16 + '.bsseg')}: "
                            f"its temporary file {tmp} is a symbolic link")
    assert secret.read_text() == "keep"
