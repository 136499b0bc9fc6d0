"""Segment format 3 in Python: format 2 files still answer (converted at open,
with one FormatUpgradeWarning per index), `bitshard upgrade` /
`upgrade_index` rewrite them as format 3 without
changing an answer, `verify` checks every partition, and a damaged partition
is refused when a search touches it (docs/format.md)."""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

import bitshard
from bitshard import CorruptIndexError, FormatUpgradeWarning, _native
from bitshard import index as idx

from conftest import clustered, write_lance


def _a64(x: int) -> int:
    return (x + 63) & ~63


def _pad(b: bytes) -> bytes:
    return b + bytes(_a64(len(b)) - len(b))


def downgrade_to_v2(b: bytes) -> bytes:
    """The format 2 file of the same rows as format 3 file ``b``: the layout
    of docs/format.md's "Versions" note, written here from the spec (the
    library no longer writes format 2)."""
    u32 = lambda o: struct.unpack_from("<I", b, o)[0]  # noqa: E731
    u64 = lambda o: struct.unpack_from("<Q", b, o)[0]  # noqa: E731
    hs, D, B, k, nf = u32(16), u32(28), u32(32), u32(44), u32(72)
    art_off, art_size, frag_off, dir_off = u64(128), u64(136), u64(152), u64(176)
    header = bytearray(b[:hs])
    struct.pack_into("<II", header, 8, 2, 2)
    frags = _pad(b"".join(b[frag_off + 32 * i:frag_off + 32 * i + 16] for i in range(nf)))
    stride, ext_row = 4 * D + 384, (B - 1) * D // 8
    blocks_out, entries = [], []
    pos = hs + art_size + len(frags) + _a64(32 * k)
    for p in range(k):
        e = dir_off + 64 * p
        off, count, s1size = u64(e), u32(e + 16), u64(e + 24)
        nb = (count + 31) // 32
        part = b[off:off + u64(e + 8)]
        codes = b"".join(part[j * stride:j * stride + 4 * D] for j in range(nb))

        def factor(which: int) -> bytes:
            return b"".join(part[j * stride + 4 * D + 128 * which:
                                 j * stride + 4 * D + 128 * which + 4 * min(32, count - 32 * j)]
                            for j in range(nb))

        ordinals = part[_a64(nb * stride):_a64(nb * stride) + 4 * count]
        arrays = [codes, factor(0), factor(1), ordinals]
        if B > 1:
            ext = part[s1size:s1size + count * ext_row]
            sf = _a64(s1size + count * ext_row)
            arrays += [ext, part[sf:sf + 4 * count]]
        block = b"".join(_pad(a) for a in arrays)
        entries.append(struct.pack("<QQIIQ", pos, len(block), count, 0,
                                   _native.hash64(block, 0)))
        blocks_out.append(block)
        pos += len(block)
    directory = _pad(b"".join(entries))
    struct.pack_into("<Q", header, 64, pos)
    struct.pack_into("<QQQ", header, 152, hs + art_size, len(frags), _native.hash64(frags, 0))
    struct.pack_into("<QQQ", header, 176, hs + art_size + len(frags), len(directory),
                     _native.hash64(directory, 0))
    struct.pack_into("<Q", header, hs - 8, _native.hash64(bytes(header[:hs - 8]), 0))
    return bytes(header) + b[art_off:art_off + art_size] + frags + directory + \
        b"".join(blocks_out)


def _index(tmp_path, num_bits):
    x = clustered(3000, 64, clusters=12, seed=num_bits)
    uri = write_lance(tmp_path / "d.lance", x[:2900], 725)
    ds = bitshard.dataset(uri)
    ds.create_index("vec", "IVF_RQ", name="v", num_partitions=16, num_bits=num_bits)
    return ds, x[2900:]


def _downgrade_all(ds):
    for h in idx.committed_segments(ds.storage, "v"):
        path = idx.segment_path(ds.storage, h.uuid)
        with open(path, "rb") as f:
            b = f.read()
        with open(path, "wb") as f:
            f.write(downgrade_to_v2(b))


def _answers(ds, q, **kw):
    t = ds.search("vec", q, k=10, nprobes=6, **kw)
    return t.column("_rowid").to_numpy(), t.column("_distance").to_numpy()


@pytest.mark.parametrize("num_bits", [1, 4, 9])
def test_v2_index_answers_warns_once_and_upgrades(tmp_path, num_bits):
    ds, q = _index(tmp_path, num_bits)
    want = _answers(ds, q)
    _downgrade_all(ds)
    ds = bitshard.dataset(str(tmp_path / "d.lance"))
    seg = idx.OpenSegment(idx.segment_path(ds.storage,
                                           idx.committed_segments(ds.storage, "v")[0].uuid))
    assert seg.info["format_version"] == 2
    seg.native.verify()
    del seg
    with pytest.warns(FormatUpgradeWarning, match=r"index 'v' has 1 segment\(s\) of segment "
                                                   r"format 2 .*bitshard upgrade"):
        got = _answers(ds, q)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # Once per index: a second open of the same index does not warn again.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FormatUpgradeWarning)
        bitshard.dataset(str(tmp_path / "d.lance")).search("vec", q[:2], k=3)

    before = idx.read_manifest(ds.storage, "v")["version"]
    assert bitshard.upgrade_index(str(tmp_path / "d.lance")) == {"v": 1}
    assert idx.read_manifest(ds.storage, "v")["version"] == before + 1
    assert bitshard.upgrade_index(str(tmp_path / "d.lance")) == {"v": 0}
    ds = bitshard.dataset(str(tmp_path / "d.lance"))
    for h in idx.committed_segments(ds.storage, "v"):
        o = idx.open_handle(h, ds.storage)
        assert o.info["format_version"] == 3
        assert o.native.fragment_identities() == [bytes(16)] * len(h.fragment_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FormatUpgradeWarning)
        got = _answers(ds, q)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert bitshard.maintenance.verify(str(tmp_path / "d.lance")) == []


def test_cli_upgrade(tmp_path):
    ds, q = _index(tmp_path, 4)
    want = _answers(ds, q)
    uri = str(tmp_path / "d.lance")
    _downgrade_all(ds)
    out = subprocess.run([sys.executable, "-m", "bitshard", "upgrade", uri],
                         capture_output=True, text=True, check=True)
    assert out.stdout == "index 'v': 1 segment(s) rewritten\n"
    out = subprocess.run([sys.executable, "-m", "bitshard", "upgrade", uri, "--name", "v"],
                         capture_output=True, text=True, check=True)
    assert out.stdout == "index 'v': already current\n"
    got = _answers(bitshard.dataset(uri), q)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_damaged_partition_refused_when_touched_and_by_verify(tmp_path):
    ds, q = _index(tmp_path, 4)
    uri = str(tmp_path / "d.lance")
    h = idx.committed_segments(ds.storage, "v")[0]
    path = idx.segment_path(ds.storage, h.uuid)
    with open(path, "rb") as f:
        b = bytearray(f.read())
    dir_off = struct.unpack_from("<Q", b, 176)[0]
    # The partition of query 0's nearest centroid: damage its first code byte.
    seg = idx.OpenSegment(path)
    cent = seg.ivf_model().centroids
    del seg
    p = int(np.argmin(((cent - q[0]) ** 2).sum(1)))
    off = struct.unpack_from("<Q", b, dir_off + 64 * p)[0]
    b[off] ^= 0x21
    with open(path, "wb") as f:
        f.write(bytes(b))
    ds = bitshard.dataset(uri)
    far = int(np.argmax(((cent - q[0]) ** 2).sum(1)))
    ds.search("vec", cent[far][None, :], k=3, nprobes=1)  # does not touch p
    with pytest.raises(CorruptIndexError,
                       match=rf"^{path}: segment {h.uuid}: partition {p} checksum mismatch "
                             r"\(stage-1 region: stored"):
        ds.search("vec", q[:1], k=3, nprobes=1)
    with pytest.raises(CorruptIndexError, match=rf"partition {p} checksum mismatch"):
        ds.search("vec", q, k=3, nprobes=2)  # a batch touching it fails whole
    faults = bitshard.maintenance.verify(uri)
    assert len(faults) == 1 and f"partition {p} checksum mismatch (stage-1 region" in faults[0]
