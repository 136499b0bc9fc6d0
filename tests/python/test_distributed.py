"""Distributed builds: segments with shared artifacts, merge, commit, and
search over segments, compared bit for bit with a single-process build."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

import bitshard
from bitshard import ArtifactMismatchError, CommitConflictError, InvalidInputError

from conftest import (brute_force, clustered, recall, rowids_to_positions, run_threads,
                      write_lance)


@pytest.fixture
def workflow(tmp_path):
    x = clustered(8000, 96, seed=11)
    uri = write_lance(tmp_path / "w.lance", x, 1000)          # 8 fragments
    ds = bitshard.dataset(uri)
    c = bitshard.train_ivf(ds, "vec", num_partitions=32)
    rotation = bitshard.build_rq_rotation(dimension=96, num_bits=1, dtype="float32")
    return uri, x, ds, c, rotation


def _result(t):
    return t.column("_rowid").to_pylist(), t.column("_distance").to_numpy().tobytes()


@pytest.mark.parametrize("num_bits", [1, 3])
def test_design_workflow_equals_single_process(tmp_path, num_bits):
    x = clustered(8000, 96, seed=11)
    uri = write_lance(tmp_path / "w.lance", x, 1000)
    ds = bitshard.dataset(uri)
    c = bitshard.train_ivf(ds, "vec", num_partitions=32)
    rotation = bitshard.build_rq_rotation(dimension=96, num_bits=num_bits, dtype="float32")
    frags = [f.id for f in ds.source.fragments()]
    frags_a, frags_b = frags[::2], frags[1::2]

    seg_a = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=c,
                                        rq_rotation=rotation, fragment_ids=frags_a)
    seg_b = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=c,
                                        rq_rotation=rotation, fragment_ids=frags_b)
    seg_b = pickle.loads(pickle.dumps(seg_b))              # handles travel
    assert seg_a.num_rows + seg_b.num_rows == 8000
    merged = ds.merge_existing_index_segments([seg_a, seg_b])
    ds = ds.commit_existing_index_segments("idx", "vec", [merged])

    single = bitshard.dataset(uri, index_uri=tmp_path / "single")
    single.create_index("vec", "IVF_RQ", name="idx", ivf_centroids=c, rq_rotation=rotation)

    unmerged = bitshard.dataset(uri, index_uri=tmp_path / "unmerged")
    unmerged.commit_existing_index_segments("idx", "vec", [
        unmerged.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=c,
                                          rq_rotation=rotation, fragment_ids=f)
        for f in (frags_a, frags_b)])
    assert len(unmerged.describe_indices()[0]["segments"]) == 2

    queries = x[:40] + np.random.default_rng(5).normal(size=(40, 96)).astype(np.float32) * 0.5
    for kw in (dict(nprobes=8, refine_factor=2), dict(nprobes=4), dict(nprobes=16)):
        a = _result(ds.search("vec", queries, k=10, **kw))
        b = _result(single.search("vec", queries, k=10, **kw))
        u = _result(unmerged.search("vec", queries, k=10, **kw))
        assert a == b == u, kw
    got = rowids_to_positions(ds, np.array(a[0]).reshape(40, 10))
    if num_bits == 1:
        assert recall(got, brute_force(x, queries, 10)) >= 0.95


def test_thread_count_changes_no_byte(tmp_path):
    """k-means and encoding split rows over threads by worker index: the
    centroids and the segment file must not depend on the count (a worker
    on a 2-core box and one on a 64-core box must agree)."""
    x = clustered(12000, 40, seed=3)
    uri = write_lance(tmp_path / "t.lance", x, 5000)
    ds = bitshard.dataset(uri)
    cents = [bitshard.train_ivf(ds, "vec", num_partitions=24, num_threads=t).centroids
             for t in (1, 2, 3)]
    assert cents[0].tobytes() == cents[1].tobytes() == cents[2].tobytes()
    files = []
    for t in (1, 3):
        seg = ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=cents[0], num_bits=5,
                                          metric="cosine", index_uuid="a" * 32, num_threads=t)
        files.append(open(seg.path, "rb").read())
    assert files[0] == files[1]
    with pytest.raises(InvalidInputError, match="num_threads must be an integer >= 1, got 0"):
        bitshard.train_ivf(ds, "vec", num_partitions=4, num_threads=0)
    with pytest.raises(InvalidInputError, match="num_threads"):
        ds.create_index("vec", num_partitions=4, num_threads=True)


def test_merge_is_associative(workflow):
    uri, x, ds, c, rot = workflow
    frags = [f.id for f in ds.source.fragments()]
    segs = [ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c, rq_rotation=rot,
                                        fragment_ids=[f]) for f in frags]
    flat = ds.merge_existing_index_segments(segs, index_uuid="0" * 32)
    left = ds.merge_existing_index_segments(segs[:3])
    right = ds.merge_existing_index_segments(segs[3:])
    tree = ds.merge_existing_index_segments([left, right], index_uuid="0" * 31 + "1")
    a = open(flat.path, "rb").read()
    b = open(tree.path, "rb").read()
    assert len(a) == len(b)
    # identical except the uuid the caller chose (and the checksum covering it)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    assert 0 < len(diff) <= 24


def test_default_rotation_lets_workers_agree(workflow):
    uri, x, ds, c, _ = workflow
    frags = [f.id for f in ds.source.fragments()]
    a = ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c, fragment_ids=frags[:4])
    b = bitshard.dataset(uri).create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c,
                                                       fragment_ids=frags[4:])
    assert a.rotation_fingerprint == b.rotation_fingerprint
    ds.merge_existing_index_segments([a, b])


def test_rabitq_model_alias_and_bits_conflict(workflow):
    uri, x, ds, c, rot = workflow
    model = bitshard.build_rq_model(96, 2, "float32")
    seg = ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c, rabitq_model=model,
                                      fragment_ids=[0])
    assert seg.num_bits == 2
    with pytest.raises(InvalidInputError, match="num_bits=4 conflicts with the rotation's num_bits=2"):
        ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c, rq_rotation=model,
                                    num_bits=4, fragment_ids=[1])


@pytest.mark.parametrize("what", ["rotation", "centroids", "num_bits", "metric"])
def test_mixed_artifacts_refused_at_merge_commit_and_query(workflow, tmp_path, what):
    uri, x, ds, c, rot = workflow
    kw_a = dict(ivf_centroids=c, rq_rotation=rot, fragment_ids=[0, 1])
    kw_b = dict(ivf_centroids=c, rq_rotation=rot, fragment_ids=[2, 3])
    if what == "rotation":
        kw_b["rq_rotation"] = bitshard.build_rq_rotation(96, seed=rot.seed ^ 1)
    elif what == "centroids":
        kw_b["ivf_centroids"] = c.centroids + 0.001
    elif what == "num_bits":
        kw_b["rq_rotation"] = rot.with_bits(2)
    else:
        kw_b["metric"] = "dot"
        kw_b["ivf_centroids"] = bitshard.IvfModel(c.centroids, "dot")
    a = ds.create_index_uncommitted("vec", "IVF_RQ", **kw_a)
    b = ds.create_index_uncommitted("vec", "IVF_RQ", **kw_b)
    with pytest.raises(ArtifactMismatchError, match=f"{what} differs"):
        ds.merge_existing_index_segments([a, b])
    with pytest.raises(ArtifactMismatchError, match=f"{what} differs"):
        ds.commit_existing_index_segments("idx", "vec", [a, b])
    # a delta commit that mixes is refused too
    ds.commit_existing_index_segments("idx", "vec", [a])
    with pytest.raises(ArtifactMismatchError, match=f"{what} differs"):
        ds.commit_existing_index_segments("idx", "vec", [b])
    # forced together on disk (a file swapped behind the manifest's back):
    # refused at query time by the file check
    import shutil

    shutil.copy(b.path, a.path)
    fresh = bitshard.dataset(uri)
    with pytest.raises(bitshard.BitshardError):
        fresh.search("vec", x[0])


def test_forced_mix_refused_by_the_c_searcher(workflow):
    uri, x, ds, c, rot = workflow
    from bitshard import _native
    from bitshard.index import OpenSegment

    a = ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c, rq_rotation=rot,
                                    fragment_ids=[0])
    b = ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c,
                                    rq_rotation=bitshard.build_rq_rotation(96, seed=1),
                                    fragment_ids=[1])
    with pytest.raises(ArtifactMismatchError, match="rotation differs"):
        _native.Searcher([OpenSegment(a.path).native, OpenSegment(b.path).native])


def test_overlapping_fragments_refused(workflow):
    uri, x, ds, c, rot = workflow
    a = ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c, rq_rotation=rot,
                                    fragment_ids=[0, 1])
    b = ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c, rq_rotation=rot,
                                    fragment_ids=[1, 2])
    with pytest.raises(InvalidInputError, match="fragment 1"):
        ds.merge_existing_index_segments([a, b])
    with pytest.raises(InvalidInputError, match="fragment 1"):
        ds.commit_existing_index_segments("idx", "vec", [a, b])


def test_delta_commit_and_describe(workflow):
    uri, x, ds, c, rot = workflow
    a = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=c,
                                    rq_rotation=rot, fragment_ids=[0, 1, 2, 3])
    ds.commit_existing_index_segments("idx", "vec", [a])
    d = ds.describe_indices()[0]
    assert d["uncovered_fragments"] == [4, 5, 6, 7] and d["num_rows"] == 4000
    # uncovered fragments are searched exactly unless fast_search=True
    q = x[7500]
    assert ds.search("vec", q, k=1).column("_rowid")[0].as_py() == (7 << 32) | 500
    assert (ds.search("vec", q, k=1, fast_search=True).column("_rowid")[0].as_py() >> 32) < 4
    b = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=c,
                                    rq_rotation=rot, fragment_ids=[4, 5, 6, 7])
    ds.commit_existing_index_segments("idx", "vec", [b])
    d = ds.describe_indices()[0]
    assert d["uncovered_fragments"] == [] and len(d["segments"]) == 2 and d["version"] == 2
    assert ds.search("vec", q, k=1, fast_search=True).column("_rowid")[0].as_py() == (7 << 32) | 500
    before = _result(ds.search("vec", x[:20], k=10))
    ds.optimize_indices("idx")
    assert len(ds.describe_indices()[0]["segments"]) == 1
    assert _result(ds.search("vec", x[:20], k=10)) == before


def test_commit_race_one_wins(workflow):
    uri, x, ds, c, rot = workflow
    segs = [ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=c,
                                        rq_rotation=rot, fragment_ids=[f]) for f in range(8)]
    from bitshard import index as idx

    outcomes = []
    barrier = threading.Barrier(8)

    def commit(seg):
        barrier.wait()
        try:
            idx.commit(ds.index_root, "idx", "vec", [seg], expected_version=0)
            outcomes.append("ok")
        except CommitConflictError:
            outcomes.append("conflict")

    run_threads(commit, segs)
    assert sorted(outcomes) == ["conflict"] * 7 + ["ok"]
    assert ds.describe_indices()[0]["version"] == 1


def test_fragment_pruning_and_prefilter(workflow):
    uri, x, ds, c, rot = workflow
    segs = [ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=c,
                                        rq_rotation=rot, fragment_ids=[2 * i, 2 * i + 1])
            for i in range(4)]
    ds.commit_existing_index_segments("idx", "vec", segs)
    q = x[100]  # lives in fragment 0
    t = ds.search("vec", q, k=10, fragment_ids=[3, 4])
    frags = {r >> 32 for r in t.column("_rowid").to_pylist()}
    assert frags <= {3, 4} and len(t) == 10
    # prefilter on another column: only even ids
    t = ds.search("vec", q, k=10, filter="id % 2 = 0", columns=["id"])
    assert len(t) == 10 and all(i % 2 == 0 for i in t.column("id").to_pylist())
    assert 100 in t.column("id").to_pylist()


def test_ivf_centroids_as_array_model_or_path(workflow, tmp_path):
    uri, x, ds, c, rot = workflow
    np.save(tmp_path / "c.npy", c.centroids)
    c.save(tmp_path / "c.bsivf")
    handles = [
        ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=arg, rq_rotation=rot,
                                    fragment_ids=[0])
        for arg in (c, np.array(c.centroids), str(tmp_path / "c.npy"), tmp_path / "c.bsivf")
    ]
    assert len({h.ivf_fingerprint for h in handles}) == 1
    with pytest.raises(InvalidInputError, match="dimension 5, column 'vec' has 96"):
        ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=np.zeros((4, 5), np.float32),
                                    rq_rotation=rot, fragment_ids=[0])
    with pytest.raises(InvalidInputError, match="fragment 99 is not in the source"):
        ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=c, rq_rotation=rot,
                                    fragment_ids=[99])
