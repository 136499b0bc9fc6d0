"""Segments of one index sharing their centroids by fingerprint (segment
header flags bit 0, docs/format.md "External centroids"): written without
them, opened with ``artifacts/<ivf fingerprint>.ivf`` of the index root,
answering bit for bit as self-contained segments, and exported back to a
self-contained file."""

from __future__ import annotations

import os

import numpy as np
import pytest

import bitshard
from bitshard import _native
from bitshard import distributed as dist
from bitshard import index as idx
from bitshard.artifacts import IvfModel
from bitshard.errors import (ArtifactMismatchError, CorruptIndexError, InvalidInputError,
                             MissingFileError)
from bitshard.index import OpenSegment

from conftest import clustered, write_lance

D = 48
K = 12


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same 3 fragments indexed twice, 4 bits: self-contained segments
    under root ``self``, external-centroid ones under root ``ext``."""
    base = tmp_path_factory.mktemp("shared")
    x = clustered(1500, D, seed=5)
    uri = write_lance(base / "v.lance", x, 500)
    cents = bitshard.train_ivf(bitshard.dataset(uri), "vec", num_partitions=K, seed=2).centroids
    rot = bitshard.build_rq_rotation(D, 4, seed=9)
    out = {}
    for kind, ext in (("self", False), ("ext", True)):
        ds = bitshard.dataset(uri, index_uri=base / kind)
        segs = [ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=cents,
                                            rq_rotation=rot, fragment_ids=[f],
                                            index_uuid=f"{f:032x}", external_centroids=ext)
                for f in (0, 1, 2)]
        ds.commit_existing_index_segments("idx", "vec", segs)
        out[kind] = (ds, segs)
    q = x[:30] + np.random.default_rng(1).normal(size=(30, D)).astype(np.float32) * 0.2
    return uri, x, q, IvfModel(cents), out


def _answer(ds, q, **kw):
    t = ds.search("vec", q, k=10, index="idx", **kw)
    return t.column("_rowid").to_pylist(), t.column("_distance").to_numpy().tobytes()


def test_files_leave_the_centroids_out(built):
    _, _, _, ivf, out = built
    ds, segs = out["ext"]
    key = idx.names.ivf_artifact_key(ivf.fingerprint)
    assert key == f"artifacts/{ivf.fingerprint}.ivf"
    assert IvfModel.from_bytes(ds.storage.read_bytes(key)) == ivf
    cent_bytes = -(-K * D * 4 // 64) * 64
    for s_self, s_ext in zip(out["self"][1], segs):
        assert os.path.getsize(s_self.path) - os.path.getsize(s_ext.path) == cent_bytes
        o = OpenSegment(s_ext.path)  # the root is found from the path
        assert o.info["external_centroids"] is True
        assert o.ivf_model() == ivf
        assert OpenSegment(s_self.path).info["external_centroids"] is False
        o.native.verify()


def test_answers_equal_self_contained(built):
    _, _, q, _, out = built
    for kw in (dict(nprobes=2), dict(nprobes=K), dict(nprobes=4, refine_factor=2)):
        assert _answer(out["ext"][0], q, **kw) == _answer(out["self"][0], q, **kw), kw
    assert dist.verify(out["ext"][0]) == []


def test_one_array_per_index(built):
    _, _, _, ivf, out = built
    ds, segs = out["ext"]
    a, b = OpenSegment(segs[0].path), OpenSegment(segs[1].path)
    ca, cb = np.empty((K, D), np.float32), np.empty((K, D), np.float32)
    a.native.centroids(ca)
    b.native.centroids(cb)
    assert ca.tobytes() == cb.tobytes() == ivf.centroids.tobytes()
    assert idx.shared_centroids(ds.storage, ivf.fingerprint) is \
        idx.shared_centroids(ds.storage, ivf.fingerprint)


def test_native_open_refusals(built):
    _, _, _, ivf, out = built
    path = out["ext"][1][0].path
    data = OpenSegment(path)._map
    fp = ivf.fingerprint
    with pytest.raises(InvalidInputError) as e:
        _native.Segment(data)
    assert str(e.value) == (f"segment has external centroids (IVF fingerprint {fp}): open it "
                            "with its index's centroids (bs_segment_open_with_centroids)")
    other = ivf.centroids.copy()
    other[3, 7] += 1.0
    ofp = IvfModel(other).fingerprint
    with pytest.raises(ArtifactMismatchError) as e:
        _native.Segment(data, centroids=other)
    assert str(e.value) == (f"centroids given do not match the segment's: IVF fingerprint "
                            f"{ofp} given, {fp} in the segment")
    # A self-contained file given other centroids is refused the same way.
    with pytest.raises(ArtifactMismatchError, match=f"{ofp} given, {fp} in the segment"):
        OpenSegment(out["self"][1][0].path, centroids=other)


def test_missing_or_wrong_artifacts_file(built, tmp_path):
    uri, _, _, ivf, out = built
    src = out["ext"][1][0].path
    root = tmp_path / "copy"
    os.makedirs(root / "segments")
    dst = root / "segments" / os.path.basename(src)
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    art = root / "artifacts" / f"{ivf.fingerprint}.ivf"
    with pytest.raises(MissingFileError) as e:
        OpenSegment(str(dst))
    assert str(art) in str(e.value) and "shared centroids" in str(e.value)
    # Another model's bytes under this fingerprint's name.
    os.makedirs(root / "artifacts")
    other = IvfModel(ivf.centroids + 1.0)
    art.write_bytes(other.to_bytes())
    with pytest.raises(CorruptIndexError) as e:
        OpenSegment(str(dst))
    assert str(e.value) == (f"{dst}: shared centroids {art} hold IVF model "
                            f"{other.fingerprint}, not {ivf.fingerprint}")
    # A damaged header is reported as such, not as a missing file.
    art.unlink()
    b = bytearray(dst.read_bytes())
    b[30] ^= 1
    dst.write_bytes(bytes(b))
    with pytest.raises(CorruptIndexError, match="header checksum mismatch"):
        OpenSegment(str(dst))


def test_export_and_merge_keep_or_drop(built, tmp_path):
    """A one-input merge with external_centroids=False exports a
    self-contained file: the self-contained build's bytes (same uuid)."""
    _, _, _, ivf, out = built
    ds, segs = out["ext"]
    exp = idx.merge_segments([segs[0]], ds.storage, uuid="e" * 32, external_centroids=False)
    assert OpenSegment(exp.path).info["external_centroids"] is False
    same = idx.merge_segments([out["self"][1][0]], out["self"][0].storage, uuid="e" * 32)
    assert open(exp.path, "rb").read() == open(same.path, "rb").read()
    # The default keeps the inputs' choice.
    m = idx.merge_segments(segs, ds.storage)
    assert OpenSegment(m.path).info["external_centroids"] is True
    m2 = idx.merge_segments(out["self"][1], out["self"][0].storage, external_centroids=True)
    assert OpenSegment(m2.path).info["external_centroids"] is True
    assert os.path.exists(os.path.join(out["self"][0].index_root, "artifacts",
                                       f"{ivf.fingerprint}.ivf"))


def test_cleanup_keeps_artifacts(built):
    _, _, _, ivf, out = built
    ds = out["ext"][0]
    dist.cleanup(ds, older_than_seconds=0)
    assert ds.storage.exists(f"artifacts/{ivf.fingerprint}.ivf")
    assert dist.verify(ds) == []


def test_argument_checked(built):
    ds = built[4]["ext"][0]
    with pytest.raises(InvalidInputError, match="external_centroids must be True or False, got 1"):
        ds.create_index_uncommitted("vec", "IVF_RQ", fragment_ids=[0], external_centroids=1)
