"""Upkeep on odd trees (issue 11, "Upkeep leftovers and odd trees"): cleanup
on directories named like segments, the temp files of killed manifest and
build-state writers, files or directories where the index root needs the
other kind, and verify on a manifest whose file name is not its version."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import numpy as np
import pytest

import bitshard
from bitshard import index as idx
from bitshard.cli import main as cli_main
from bitshard.errors import CorruptIndexError

OLD = time.time() - 7200  # two hours ago: older than cleanup's default age


def _x() -> np.ndarray:
    return np.random.default_rng(5).normal(size=(300, 8)).astype(np.float32)


def _index(tmp_path):
    """A committed 1-bit index "idx" under tmp_path/root; returns (ds, root, segment uuid)."""
    root = str(tmp_path / "root")
    ds = bitshard.dataset(_x(), index_uri=root)
    ds.create_index("vector", "IVF_RQ", name="idx", num_partitions=2, num_bits=1)
    (seg,) = idx.committed_segments(root, "idx")
    return ds, root, seg.uuid


def _orphan(root: str, uuid: str) -> str:
    """An old, unreferenced copy of a segment (what cleanup removes)."""
    path = os.path.join(root, "segments", "ef" * 16 + ".bsseg")
    shutil.copy(os.path.join(root, "segments", uuid + ".bsseg"), path)
    os.utime(path, (OLD, OLD))
    return path


def _old(path: str) -> None:
    os.utime(path, (OLD, OLD))


def test_build_index_commits_when_another_manifest_is_unreadable(tmp_path, caplog):
    # The build's last step lists every manifest to decide which intermediate
    # segments it may delete; an unreadable one made it raise UnboundLocalError
    # after the commit. It now keeps them (for cleanup) and says why.
    ds, root, uuid = _index(tmp_path)
    p = os.path.join(root, "indices", "idx", "v00000001.json")
    with open(p, "rb") as f:
        body = f.read()
    with open(p, "wb") as f:
        f.write(body.replace(b'"num_bits": 1', b'"num_bits": 2', 1))
    out = bitshard.build_index(_x(), "vector", name="other", num_partitions=2, num_bits=1,
                               executor="serial", index_uri=root, progress=False)
    assert out.last_build_stats["version"] == 1
    assert "not removing the build's intermediate segments" in caplog.text
    (final,) = idx.committed_segments(root, "other")
    assert final.uuid == out.last_build_stats["final_segment"] and final.num_rows == 300


def test_cleanup_leaves_directories_named_like_segments(tmp_path):
    # It crashed with IsADirectoryError; a directory is not a file bitshard wrote.
    ds, root, uuid = _index(tmp_path)
    for fn in ("cd" * 16 + ".bsseg", "ce" * 16 + ".bsseg.tmp"):
        os.mkdir(os.path.join(root, "segments", fn))
        _old(os.path.join(root, "segments", fn))
    orphan = _orphan(root, uuid)
    assert bitshard.cleanup(root, 0) == ["ef" * 16]
    assert not os.path.exists(orphan)
    assert os.path.isdir(os.path.join(root, "segments", "cd" * 16 + ".bsseg"))
    assert os.path.isdir(os.path.join(root, "segments", "ce" * 16 + ".bsseg.tmp"))


@pytest.mark.parametrize("damage, what", [
    ("indices", "a file, not a directory"),
    ("builds", "a file, not a directory"),
    ("segments", "a file, not a directory"),
    ("indices/idx", "a file, not an index's directory"),
    ("indices/idx/v00000001.json", "a directory, not a manifest file"),
])
def test_cleanup_refuses_a_tree_it_does_not_expect(tmp_path, damage, what):
    # A file in place of indices/ made cleanup delete every segment.
    ds, root, uuid = _index(tmp_path)
    orphan = _orphan(root, uuid)
    path = os.path.join(root, *damage.split("/"))
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    if what.startswith("a directory"):
        os.mkdir(path)
    else:
        with open(path, "wb") as f:
            f.write(b"not a directory")
    before = sorted(os.listdir(os.path.join(root, "segments"))) if damage != "segments" else []
    with pytest.raises(CorruptIndexError) as e:
        bitshard.cleanup(root, 0)
    assert str(e.value).startswith(f"cleanup removes nothing: {path} is {what}; ")
    if damage != "segments":
        assert sorted(os.listdir(os.path.join(root, "segments"))) == before
        assert os.path.exists(orphan)
    # The command line says it in one line, no traceback.
    assert cli_main(["cleanup", root, "--older-than", "0"]) == 1


@contextlib.contextmanager
def _file_in_place_of(path: str):
    """A small file where the directory ``path`` was, for the ``with``
    block; the directory is put back after."""
    os.rename(path, path + ".saved")
    with open(path, "wb") as f:
        f.write(b"x")
    try:
        yield
    finally:
        os.remove(path)
        os.rename(path + ".saved", path)


def test_a_file_or_directory_in_the_wrong_place_is_a_clear_error(tmp_path, capsys):
    ds, root, uuid = _index(tmp_path)
    seg = os.path.join(root, "segments", uuid + ".bsseg")
    q = _x()[0]
    # A directory in place of a segment file (was IsADirectoryError).
    os.rename(seg, seg + ".saved")
    os.mkdir(seg)
    with pytest.raises(CorruptIndexError, match=f"^{seg} cannot be read: it is a directory, "
                                                f"where the index root needs a file$"):
        bitshard.dataset(_x(), index_uri=root).search("vector", q, k=3)
    os.rmdir(seg)
    os.rename(seg + ".saved", seg)
    # A file in place of segments/ (was NotADirectoryError on search,
    # FileExistsError on the next write).
    segs = os.path.join(root, "segments")
    with _file_in_place_of(segs):
        with pytest.raises(CorruptIndexError, match=f"^{seg} cannot be read: {segs} is a file, "
                                                    f"where the index root needs a directory"):
            bitshard.dataset(_x(), index_uri=root).search("vector", q, k=3)
        with pytest.raises(CorruptIndexError, match=f"cannot be written: {segs} is a file, "
                                                    f"where the index root needs a directory"):
            bitshard.dataset(_x(), index_uri=root).create_index(
                "vector", "IVF_RQ", name="idx2", num_partitions=2, num_bits=1)
    # A file in place of indices/ (search said "no index", a commit raised
    # NotADirectoryError).
    ind = os.path.join(root, "indices")
    with _file_in_place_of(ind):
        with pytest.raises(CorruptIndexError, match=f"^{ind} cannot be listed: it is a file, "
                                                    f"where the index root needs a directory"):
            bitshard.dataset(_x(), index_uri=root).search("vector", q, k=3)
        with pytest.raises(CorruptIndexError, match=f"cannot be (written|listed): {ind} is a file"):
            bitshard.dataset(_x(), index_uri=root).create_index(
                "vector", "IVF_RQ", name="idx2", num_partitions=2, num_bits=1)
    assert bitshard.dataset(_x(), index_uri=root).search("vector", q, k=3).num_rows == 3


def test_cleanup_removes_stale_manifest_and_build_state_temp_files(tmp_path, caplog):
    ds, root, uuid = _index(tmp_path)
    d = os.path.join(root, "indices", "idx")
    builds = os.path.join(root, "builds")
    os.makedirs(builds)
    stale = [os.path.join(d, "v00000002.json." + "5a" * 16 + ".tmp"),  # a killed commit
             os.path.join(d, "v00000002.json.4242.tmp"),               # older writers
             os.path.join(builds, "idx.json." + "0b" * 16 + ".tmp"),   # killed state saves
             os.path.join(builds, "idx.ivf." + "0c" * 16 + ".tmp")]
    for p in stale:
        with open(p, "wb") as f:
            f.write(b"{")
        _old(p)
    fresh = os.path.join(d, "v00000003.json." + "7d" * 16 + ".tmp")
    others = [fresh, os.path.join(d, "notes.tmp"), os.path.join(d, "v2.json.00.tmp"),
              os.path.join(builds, "idx.txt.00.tmp")]
    for p in others:
        with open(p, "wb") as f:
            f.write(b"{")
    for p in others[1:]:
        _old(p)
    caplog.set_level("INFO", logger="bitshard")
    assert bitshard.cleanup(root, dry_run=True) == []
    assert all(os.path.exists(p) for p in stale + others)
    assert f"cleanup would remove the leftover temp file {stale[0]}" in caplog.text
    assert bitshard.cleanup(root) == []              # nothing but temp files to remove
    assert [os.path.exists(p) for p in stale] == [False] * 4
    assert all(os.path.exists(p) for p in others)     # too young, or not a writer's temp file
    assert f"cleanup removed the leftover temp file {stale[2]}" in caplog.text
    assert bitshard.cleanup(root, 0) == []
    assert not os.path.exists(fresh)
    assert ds.search("vector", _x()[0], k=3).num_rows == 3


def test_verify_checks_each_manifest_file_name_against_its_version(tmp_path):
    ds, root, uuid = _index(tmp_path)
    ds.create_index("vector", "IVF_RQ", name="idx", num_partitions=2, num_bits=1)  # v2
    d = os.path.join(root, "indices", "idx")
    assert bitshard.distributed.verify(ds) == []
    # v1 copied over to v3: a valid checksum, but it says version 1.
    shutil.copy(os.path.join(d, "v00000001.json"), os.path.join(d, "v00000003.json"))
    with open(os.path.join(d, "v00000003.json")) as f:
        assert json.load(f)["version"] == 1
    faults = bitshard.distributed.verify(ds)
    assert f"index 'idx': manifest v3: {os.path.join(d, 'v00000003.json')} says version 1" \
        in faults
    report = bitshard.maintenance.verify_report(ds)
    assert report.faults == faults and not report.ok
