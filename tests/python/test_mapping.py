"""How local segment files are mapped (docs/distributed.md, "Memory"): a
verify or a merge of mapped files leaves a window of each resident, not the
whole file (``set_mapped``); a mapping opened for search only is advised
``MADV_RANDOM`` so the kernel reads what a search touches, not megabytes
around it. Both read from this process's /proc/self/smaps (Linux)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import bitshard
from bitshard import _native
from bitshard import index as idx
from bitshard.errors import InvalidInputError
from bitshard.index import OpenSegment

from conftest import clustered, write_lance

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/smaps")

D = 128
K = 8


def _mapping(path):
    """(Rss bytes, VmFlags) of this process's mapping of ``path``, or None."""
    real = os.path.realpath(path)
    found, rss, flags = False, 0, []
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                if found:
                    break
                found = len(head) >= 6 and head[5] == real
            elif found and line.startswith("Rss:"):
                rss = int(head[1]) * 1024
            elif found and line.startswith("VmFlags:"):
                flags = head[1:]
    return (rss, flags) if found else None


@pytest.fixture(scope="module")
def segs(tmp_path_factory):
    """Two 4-bit segments of 6,000 rows (about 500 KB each), one per
    fragment, and the single build of both (uuid "c" * 32)."""
    base = tmp_path_factory.mktemp("mapping")
    x = clustered(12000, D, seed=3)
    uri = write_lance(base / "v.lance", x, 6000)
    ds = bitshard.dataset(uri, index_uri=base / "idx")
    cents = bitshard.train_ivf(ds, "vec", num_partitions=K, seed=2).centroids
    rot = bitshard.build_rq_rotation(D, 4, seed=9)
    one = [ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=cents, rq_rotation=rot,
                                       fragment_ids=[f], num_bits=4, index_uuid=f"{f + 1:032x}")
           for f in (0, 1)]
    both = ds.create_index_uncommitted("vec", "IVF_RQ", ivf_centroids=cents, rq_rotation=rot,
                                       fragment_ids=[0, 1], num_bits=4, index_uuid="c" * 32)
    return ds, one, both


def test_verify_of_a_mapped_file_holds_a_window(segs):
    _, one, _ = segs
    o = OpenSegment(one[0].path)
    opened, flags = _mapping(one[0].path)
    assert "rr" not in flags  # not a search-only open: read-around kept
    o.native.verify()
    after, _ = _mapping(one[0].path)
    # The whole file (~500 KB) was read; the pages read through were dropped.
    assert o.size > 400_000
    assert after <= opened + 4 * 4096, (opened, after, o.size)


def test_merge_of_mapped_inputs_is_the_single_build(segs, tmp_path):
    ds, one, both = segs
    m = idx.merge_segments(one, ds.storage, uuid="c" * 32)
    assert open(m.path, "rb").read() == open(both.path, "rb").read()


def test_search_mapping_is_read_at_random(segs):
    _, _, both = segs
    o = OpenSegment(both.path, ranged=True)
    rss, flags = _mapping(both.path)
    assert "rr" in flags  # VM_RAND_READ: MADV_RANDOM
    del o


def test_a_copy_in_memory_is_not_declared(segs):
    """Only an mmap is declared: the C reader refuses a buffer off a page
    boundary, so declaring the caller's memory by mistake fails loudly."""
    _, _, both = segs
    data = open(both.path, "rb").read()
    buf = np.zeros(len(data) + 4096 + 64, dtype=np.uint8)
    start = (-buf.ctypes.data) % 4096 + 64  # 64-byte aligned, off a page boundary
    buf[start:start + len(data)] = np.frombuffer(data, np.uint8)
    seg = _native.Segment(buf[start:start + len(data)])
    with pytest.raises(InvalidInputError) as e:
        seg.set_mapped()
    assert str(e.value).startswith("the segment's buffer at 0x")
    assert str(e.value).endswith("does not start on a page boundary (4096 bytes): not a file "
                                 "mapping")
    seg.verify()  # the copy is whole
