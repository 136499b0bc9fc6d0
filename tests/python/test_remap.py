"""bitshard._native.remap (bs_segment_remap): the codes of existing segments
written under new row ids, without reading or encoding a vector. The output
equals, byte for byte, the segment a fresh build with the same artifacts and
uuid writes over the new layout (docs/format.md, "Remapping")."""

from __future__ import annotations

import os

import numpy as np
import pytest

import bitshard
from bitshard import _native
from bitshard import index as idx
from bitshard.errors import ArtifactMismatchError, InvalidInputError
from bitshard.sources import open_source

from conftest import clustered

DROP = np.uint64(2**64 - 1)


def _artifacts(x, bits):
    ivf = bitshard.IvfModel(x[:: len(x) // 6][:6].copy(), "l2")
    rot = bitshard.Rotation(x.shape[1], bits, "float32", "fast", 42)
    return ivf, rot


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("bits", [1, 4, 9])
def test_remap_equals_a_fresh_build_of_the_new_layout(tmp_path, bits):
    # Old layout: 300 rows in fragments 0, 1, 2 of 100; rows i % 7 == 3 are
    # deleted (never encoded). New layout: the live rows, in order, in
    # fragments of 150 (what a compaction does).
    x = clustered(300, 24, seed=bits)
    live = np.array([i for i in range(300) if i % 7 != 3])
    ivf, rot = _artifacts(x, bits)
    root = str(tmp_path / "root")
    old = open_source(x, fragment_size=100)
    seg_a = idx.write_segment(old, "vector", "idx", root, ivf, rot, [0, 1], "a" * 32)
    seg_b = idx.write_segment(old, "vector", "idx", root, ivf, rot, [2], "b" * 32)
    new = open_source(x[live], fragment_size=150)
    fresh = idx.write_segment(new, "vector", "idx", root, ivf, rot, [0, 1], "c" * 32)
    fresh_bytes = _read(fresh.path)
    fresh_fps = idx.OpenSegment(fresh.path).native.fragment_identities()
    os.remove(fresh.path)
    # The old segments did encode the deleted rows (a numpy source has none),
    # so the map drops them, as a compaction's map does for deleted rows.
    pos = np.full(300, DROP, dtype=np.uint64)
    newpos = np.arange(live.size, dtype=np.uint64)
    pos[live] = ((newpos // 150) << np.uint64(32)) | (newpos % 150)
    segs = [idx.open_handle(h, root).native for h in (seg_a, seg_b)]
    out = str(tmp_path / "out.bsseg")
    ids = np.array([0, 1], np.uint64)
    rows = np.array([150, live.size - 150], np.uint64)
    # The build records each fragment's identity fingerprint in the file;
    # given the same ones, the remap writes the same bytes.
    fps = b"".join(bytes.fromhex(i.fingerprint) for i in fresh.identities)
    assert b"".join(fresh_fps) == fps and len(fps) == 32
    _native.remap(segs, [pos[:200], pos[200:]], ids, rows, bytes.fromhex("c" * 32), out)
    assert _read(out) != fresh_bytes  # without them: zeros
    assert idx.OpenSegment(out).native.fragment_identities() == [bytes(16)] * 2
    _native.remap(segs, [pos[:200], pos[200:]], ids, rows, bytes.fromhex("c" * 32), out, 0, fps)
    assert _read(out) == fresh_bytes
    assert idx.OpenSegment(out).native.fragment_identities() == \
        [bytes.fromhex(i.fingerprint) for i in fresh.identities]
    with pytest.raises(InvalidInputError, match="^identities holds 16 items, needs 32$"):
        _native.remap(segs, [pos[:200], pos[200:]], ids, rows, bytes.fromhex("c" * 32), out,
                      0, fps[:16])
    # Several maps onto one row are refused, naming both.
    bad = pos[200:].copy()
    bad[0] = pos[0]
    with pytest.raises(InvalidInputError, match=r"^input 0 ordinal 0 and input 1 ordinal 0 "
                                                r"both map to row id 0 \(fragment 0 offset 0\)$"):
        _native.remap(segs, [pos[:200], bad], ids, rows, bytes.fromhex("c" * 32), out)
    with pytest.raises(InvalidInputError, match=r"^input 1: row_map has 99 entries, the "
                                                r"segment has 100 ordinals"):
        _native.remap(segs, [pos[:200], pos[201:]], ids, rows, bytes.fromhex("c" * 32), out)
    with pytest.raises(InvalidInputError, match="^maps holds 1 items, segments 2$"):
        _native.remap(segs, [pos[:200]], ids, rows, bytes.fromhex("c" * 32), out)
    with pytest.raises(TypeError, match=r"maps\[1\] must hold uint64"):
        _native.remap(segs, [pos[:200], pos[200:].astype(np.uint32)], ids, rows,
                      bytes.fromhex("c" * 32), out)
    assert _read(out) == fresh_bytes  # refused calls leave the file alone


def test_remap_refuses_segments_of_another_code_space(tmp_path):
    x = clustered(200, 16, seed=1)
    root = str(tmp_path / "root")
    src = open_source(x, fragment_size=100)
    ivf, rot = _artifacts(x, 2)
    _, rot3 = _artifacts(x, 3)
    a = idx.write_segment(src, "vector", "idx", root, ivf, rot, [0], "a" * 32)
    b = idx.write_segment(src, "vector", "idx", root, ivf, rot3, [1], "b" * 32)
    segs = [idx.open_handle(h, root).native for h in (a, b)]
    m = (np.arange(100, dtype=np.uint64) | np.uint64(0))
    with pytest.raises(ArtifactMismatchError, match="^cannot remap segment 1: "):
        _native.remap(segs, [m, m + np.uint64(1 << 32)], np.array([0, 1], np.uint64),
                      np.array([100, 100], np.uint64), b"\0" * 16, str(tmp_path / "o.bsseg"))


def test_row_map_ordinals_by_table_and_by_search_agree_with_a_plain_loop():
    # bitshard.upkeep._ordinals: a table from fragment id to ordinal start
    # when ids are small, binary search when not; both against a loop.
    from bitshard.compaction import DROP
    from bitshard.upkeep import _ordinals

    rng = np.random.default_rng(7)
    for shift in (0, 1 << 23):  # small ids (table), large ids (search)
        ids = np.array([3, 4, 9, 17], np.uint64) + np.uint64(shift)
        phys = np.array([5, 0, 7, 2], np.int64)
        start = np.concatenate([[0], np.cumsum(phys)]).astype(np.int64)
        frag = rng.choice(np.concatenate([ids, ids + np.uint64(1), [np.uint64(0)]]), 500)
        off = rng.integers(0, 9, 500).astype(np.uint64)
        m = (frag << np.uint64(32)) | off
        m[rng.random(500) < 0.2] = DROP
        o, ok = _ordinals(m, ids, start, phys)
        for j in range(m.size):
            want = None
            if m[j] != DROP:
                f, r = int(m[j] >> np.uint64(32)), int(m[j] & np.uint64(0xFFFFFFFF))
                hit = [i for i in range(ids.size) if int(ids[i]) == f]
                if hit and r < phys[hit[0]]:
                    want = int(start[hit[0]]) + r
            assert bool(ok[j]) == (want is not None), (shift, j)
            if want is not None:
                assert int(o[j]) == want
