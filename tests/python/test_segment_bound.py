"""build_index's bound on one segment file (``max_segment_bytes``): no task
or merge writes a larger file, an index that would exceed it is committed
as several segments sharing their centroids, and it answers bit for bit like
the single-segment build."""

from __future__ import annotations

import os

import numpy as np
import pytest

import bitshard
from bitshard import distributed as dist
from bitshard import index as idx
from bitshard.errors import InvalidInputError
from bitshard.index import OpenSegment

from conftest import clustered, write_lance

D = 40
ROWS = 4000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4000 x 40 clustered vectors in 10 Lance fragments of 400 rows."""
    x = clustered(ROWS, D, seed=8)
    uri = write_lance(tmp_path_factory.mktemp("bound") / "v.lance", x, 400)
    q = x[:40] + np.random.default_rng(2).normal(size=(40, D)).astype(np.float32) * 0.3
    return uri, x, q


def _answer(ds, q, name, **kw):
    t = ds.search("vec", q, k=10, index=name, **kw)
    return t.column("_rowid").to_pylist(), t.column("_distance").to_numpy().tobytes()


def test_size_bound_formula_holds():
    """segment_size_bound is an upper bound of real files, and tight within
    one partial block per partition."""
    x = clustered(3000, 100, seed=1)
    for bits in (1, 4, 9):
        ds = bitshard.dataset(x)
        h = ds.create_index_uncommitted("vector", "IVF_RQ", num_bits=bits,
                                        ivf_centroids=x[:20].copy())
        real = os.path.getsize(h.path)
        bound = dist.segment_size_bound(3000, 20, 100, bits, 1, len("vector"))
        assert real <= bound < real + 20 * (4 * 128 + 384 + 63 + 126) + 64, (bits, real, bound)


@pytest.mark.parametrize("bits", [1, 4])
def test_bounded_build_is_several_segments_with_one_answer(data, tmp_path, monkeypatch, bits):
    uri, x, q = data
    written = []
    real_write = idx._write_native

    def spy(root, uuid, name, write, centroids=None):
        h = real_write(root, uuid, name, write, centroids)
        written.append(h.size_bytes)
        return h

    monkeypatch.setattr(idx, "_write_native", spy)
    one = bitshard.build_index(uri, "vec", name="one", num_partitions=16, num_bits=bits,
                               executor="serial", fragments_per_task=1, seed=3,
                               index_uri=tmp_path / "one")
    assert one.last_build_stats["shared_centroids"] is False
    size_one = one.last_build_stats and os.path.getsize(
        idx.segment_path(one.index_root, one.last_build_stats["final_segment"]))
    bound = size_one // 3
    written.clear()
    ds = bitshard.build_index(uri, "vec", name="cut", num_partitions=16, num_bits=bits,
                              executor="serial", fragments_per_task=1, seed=3,
                              index_uri=tmp_path / "cut", max_segment_bytes=bound)
    st = ds.last_build_stats
    assert st["shared_centroids"] is True and st["max_segment_bytes"] == bound
    assert st["final_segment"] is None and len(st["final_segments"]) >= 3
    assert st["num_rows"] == ROWS and st["merges"] >= 1
    # No file the build wrote (leaves, merges, finals) exceeds the bound.
    assert written and max(written) <= bound
    segs = idx.committed_segments(ds.index_root, "cut")
    assert [s.uuid for s in segs] == st["final_segments"]
    frags = [f for s in segs for f in s.fragment_ids]
    assert frags == sorted(frags) == list(range(10))
    for s in segs:
        o = OpenSegment(s.path)
        assert o.info["external_centroids"] is True and o.size <= bound
        assert o.info["num_partitions"] == 16
        o.native.verify()
    # One answer: the segments together answer as the single segment does.
    for kw in (dict(nprobes=3), dict(nprobes=16), dict(nprobes=6, refine_factor=3)):
        assert _answer(ds, q, "cut", **kw) == _answer(one, q, "one", **kw), kw
    assert dist.verify(ds, name="cut") == []


def test_shared_centroids_forced_on_one_segment(data, tmp_path):
    uri, x, q = data
    ds = bitshard.build_index(uri, "vec", name="s", num_partitions=8, executor="serial",
                              seed=3, index_uri=tmp_path / "s", shared_centroids=True)
    st = ds.last_build_stats
    assert st["shared_centroids"] is True and st["final_segments"] == [st["final_segment"]]
    o = OpenSegment(idx.segment_path(ds.index_root, st["final_segment"]))
    assert o.info["external_centroids"] is True
    assert os.path.exists(os.path.join(ds.index_root, "artifacts",
                                       f"{st['ivf_fingerprint']}.ivf"))


def test_fragment_above_the_bound_is_refused(data, tmp_path):
    uri, _, _ = data
    need = dist.segment_size_bound(400, 16, D, 1, 1, 3, external_centroids=True)
    with pytest.raises(InvalidInputError) as e:
        bitshard.build_index(uri, "vec", name="t", num_partitions=16, num_bits=1,
                             executor="serial", seed=3, index_uri=tmp_path / "t",
                             max_segment_bytes=need - 1)
    assert str(e.value) == (f"max_segment_bytes is {need - 1}, but fragment 0 alone (400 rows) "
                            f"may take up to {need} bytes and a task never splits a fragment")
    with pytest.raises(InvalidInputError, match="max_segment_bytes must be an integer >= 1, got 0"):
        bitshard.build_index(uri, "vec", index_uri=tmp_path / "t", max_segment_bytes=0)
    with pytest.raises(InvalidInputError, match="shared_centroids must be True or False, got 'y'"):
        bitshard.build_index(uri, "vec", index_uri=tmp_path / "t", shared_centroids="y")


def test_merge_groups():
    assert dist.merge_groups([5, 5, 5, 5], 8, 10) == [[0, 1], [2, 3]]
    assert dist.merge_groups([5, 5, 5], 2, 100) == [[0, 1], [2]]
    assert dist.merge_groups([11, 1, 1], 8, 10) == [[0], [1, 2]]
