"""Racing writers and upkeep on a local index root: commits against
``cleanup`` (the lock that orders them), and a small run of the race harness
(tests/trials/race_trials.py: 8 writers committing and delta-committing,
searchers, cleanup at its default age and at age 0; ``make trials`` runs the
full counts, locally and on a moto S3 server)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np
import pytest

import bitshard
from bitshard import index as idx
from bitshard.errors import InvalidInputError
from bitshard.storage import LocalStorage

from conftest import lance_with_artifacts

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "trials"))
import race_trials  # noqa: E402

pytest.importorskip("lance")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return lance_with_artifacts(tmp_path_factory.mktemp("races") / "v.lance", 400, 16, 100,
                                num_partitions=4, seed=3, ivf_seed=1, rotation_seed=2)


def test_cleanup_waits_for_a_commit_between_its_check_and_its_manifest(
        data, tmp_path, monkeypatch):
    """cleanup --older-than 0 starting after a commit checked its segment and
    before its manifest exists used to delete the segment, and the commit then
    named a missing file (search: CorruptIndexError, verify: a fault). Now it
    waits for the commit, and then sees the segment referenced."""
    uri, x, ivf, rot = data
    root = str(tmp_path / "root")
    ds = bitshard.dataset(uri, index_uri=root)
    seg = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=ivf,
                                      rq_rotation=rot)
    removed = []
    plain = LocalStorage.create_exclusive

    def racing_create(self, key, payload):
        t = threading.Thread(target=lambda: removed.extend(bitshard.cleanup(root, 0)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()          # cleanup waits for the commit's lock
        plain(self, key, payload)
        racing_create.thread = t

    monkeypatch.setattr(LocalStorage, "create_exclusive", racing_create)
    ds.commit_existing_index_segments("idx", "vec", [seg])
    racing_create.thread.join(30)
    assert removed == []
    assert os.path.exists(seg.path)
    assert bitshard.distributed.verify(uri, index_uri=root) == []
    hits = ds.search("vec", x[7], k=1, nprobes=4, refine_factor=20, fast_search=True)
    assert hits.column("_rowid").to_pylist() == [7]


def test_commit_after_cleanup_removed_its_segment_is_refused_clearly(data, tmp_path):
    uri, x, ivf, rot = data
    root = str(tmp_path / "root")
    ds = bitshard.dataset(uri, index_uri=root)
    seg = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=ivf,
                                      rq_rotation=rot)
    assert bitshard.cleanup(root, 0) == [seg.uuid]
    with pytest.raises(InvalidInputError) as e:
        ds.commit_existing_index_segments("idx", "vec", [seg])
    assert str(e.value) == (
        f"segment {seg.uuid} has no file at {seg.path}: it was never written there, or "
        f"cleanup removed it as unreferenced before this commit (cleanup's --older-than was "
        f"shorter than the time from writing the segment to committing it); write it again")
    assert idx.manifest_versions(ds.storage, "idx") == []


def test_listing_skips_a_name_removed_meanwhile(tmp_path, monkeypatch):
    """A name listed and then removed before it is stat'ed (a commit's temp
    manifest, a segment cleanup removed) is skipped; the racing-writers trial
    found it raising UnboundLocalError instead."""
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / "a.bsseg").write_bytes(b"1")
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda d: ["gone.bsseg"] + real(d))  # first: no earlier name
    assert [e.name for e in LocalStorage(str(tmp_path)).list("segments")] == ["a.bsseg"]


def test_racing_writers_searchers_and_cleanup_local(tmp_path):
    """8 writers x 2 commits, a searcher, cleanup at 3600 s and (second round)
    at 0 s: every commit lands or conflicts (or, at age 0, is refused because
    cleanup removed its segment), searches never fail or return a wrong row,
    nothing committed is lost, each fragment is covered once."""
    res = race_trials.run("local", writers=8, commits=2, searchers=1, seed=7,
                          work=str(tmp_path))
    by_round = {r["round"]: r for r in res}
    assert sorted(by_round) == ["age-0", "default-age"]
    for r in res:
        assert r["failed"] == [], json.dumps(r, indent=1)
        c = r["counts"]
        assert c["landed"] == 16 and "gave-up" not in c and "unexpected" not in c, r
        assert c["searches"] > 0, r
    assert "segment-removed" not in by_round["default-age"]["counts"]
    assert by_round["default-age"]["counts"]["removed-age-3600"] == 0
    # The age-0 cleaner did run and remove things meanwhile.
    assert by_round["age-0"]["counts"]["removed-age-0"] > 0, by_round["age-0"]
    assert np.all([by_round[k]["counts"]["final_version"] >= 17 for k in by_round])
