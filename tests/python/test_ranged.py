"""Segments read by range from an object store (bitshard.ranged): the
two-phase search fetches only the partitions its queries probe and answers
bit for bit as the whole file does; the partition cache keeps its bound and
never drops a partition a running search holds.

The S3 server is moto's, started by test_object_store's fixture.
"""

from __future__ import annotations

import threading
import time
import uuid as uuid_mod

import lance
import numpy as np
import pytest

import bitshard
from bitshard import _native, ranged
from bitshard.errors import CorruptIndexError, InvalidInputError
from bitshard.ranged import PartitionCache, RangedSegment
from bitshard.storage import Storage

from conftest import clustered, run_threads, write_lance
from test_object_store import BUCKET, s3  # noqa: F401  (the moto fixture)

D = 32
K = 48  # partitions


def _root():
    return f"s3://{BUCKET}/r-{uuid_mod.uuid4().hex[:12]}"


def _flow(ds, ivf, rot, uuids):
    """Two segments (fragments 0-1 and 2-4) committed as one index."""
    frags = [f.id for f in ds.source.fragments()]
    a = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=ivf,
                                    rq_rotation=rot, fragment_ids=frags[:2], index_uuid=uuids[0])
    b = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=ivf,
                                    rq_rotation=rot, fragment_ids=frags[2:], index_uuid=uuids[1])
    ds.commit_existing_index_segments("idx", "vec", [a, b])


@pytest.fixture(scope="module")
def lance_data(tmp_path_factory):
    """2500 x 32 vectors and IVF centroids trained on them; each test writes
    its own Lance copy (5 fragments), which it may change."""
    x = clustered(2500, D, seed=11)
    uri = write_lance(tmp_path_factory.mktemp("rg") / "v.lance", x, 500)
    ivf = bitshard.train_ivf(bitshard.dataset(uri), "vec", num_partitions=K, seed=3)
    return x, ivf


def _pair(s3, lance_data, tmp_path, bits, **opts):
    """The same index on S3 and on a local directory over a new Lance copy
    of the data; fresh Datasets (the S3 one with storage options ``opts``)."""
    x, ivf = lance_data
    uri = write_lance(tmp_path / f"v{bits}.lance", x, 500)
    rot = bitshard.build_rq_rotation(dimension=D, num_bits=bits, seed=7)
    uuids = [uuid_mod.uuid4().hex for _ in range(2)]
    root = _root()
    _flow(bitshard.dataset(uri, index_uri=root, storage_options=s3["options"]), ivf, rot, uuids)
    loc_root = tmp_path / f"loc{bits}"
    _flow(bitshard.dataset(uri, index_uri=loc_root), ivf, rot, uuids)
    remote = bitshard.dataset(uri, index_uri=root, storage_options=dict(s3["options"], **opts))
    local = bitshard.dataset(uri, index_uri=loc_root)
    return remote, local, uri


def _same(a, b):
    assert a.column("_rowid").to_pylist() == b.column("_rowid").to_pylist()
    assert a.column("_distance").to_numpy().tobytes() == b.column("_distance").to_numpy().tobytes()


@pytest.mark.parametrize("bits", [1, 4, 9])
def test_ranged_search_answers_as_the_whole_file(s3, lance_data, tmp_path, bits):
    x, ivf = lance_data
    remote, local, uri = _pair(s3, lance_data, tmp_path, bits)
    rng = np.random.default_rng(bits)
    Q = (x[rng.choice(len(x), 60, replace=False)] + 0.05).astype(np.float32)
    ranged.read_stats(reset=True)
    for nprobes in (1, 3, 8):
        _same(remote.search("vec", Q, k=10, nprobes=nprobes),
              local.search("vec", Q, k=10, nprobes=nprobes))
        for q in Q[:6]:
            _same(remote.search("vec", q, k=7, nprobes=nprobes),
                  local.search("vec", q, k=7, nprobes=nprobes))
    _same(remote.search("vec", Q, k=10, nprobes=4, refine_factor=2),
          local.search("vec", Q, k=10, nprobes=4, refine_factor=2))
    _same(remote.search("vec", Q, k=10, nprobes=4, filter="id % 3 = 1"),
          local.search("vec", Q, k=10, nprobes=4, filter="id % 3 = 1"))
    _same(remote.search("vec", Q[:5], k=10, nprobes=4, fragment_ids=[3]),
          local.search("vec", Q[:5], k=10, nprobes=4, fragment_ids=[3]))
    # The segments were opened from their prefix: partitions are fetched.
    opened = remote._indexes.open("idx")
    assert opened.ranged is not None and all(o.ranged is not None for o in opened.opened)
    cache = remote._indexes.partition_cache.stats()
    assert cache["misses"] > 0 and cache["requests"] <= cache["misses"]
    assert ranged.read_stats()["bytes"] > 0

    # Rows deleted after the build are never returned, as from the whole file.
    lance.dataset(uri).delete("id % 11 = 0")
    remote = bitshard.dataset(uri, index_uri=remote.index_root,
                              storage_options=remote.storage_options)
    local = bitshard.dataset(uri, index_uri=local.index_root)
    for nprobes in (2, 8):
        got = remote.search("vec", Q, k=10, nprobes=nprobes, columns=["id"])
        _same(got, local.search("vec", Q, k=10, nprobes=nprobes, columns=["id"]))
        assert all(i % 11 for i in got.column("id").to_pylist())
        _same(remote.search("vec", Q, k=10, nprobes=nprobes, filter="id % 2 = 0"),
              local.search("vec", Q, k=10, nprobes=nprobes, filter="id % 2 = 0"))


def test_first_query_reads_only_the_prefix_and_its_probes(s3, tmp_path):
    x = clustered(2000, D, seed=4)
    uri = write_lance(tmp_path / "v.lance", x, 1000)
    ivf = bitshard.train_ivf(bitshard.dataset(uri), "vec", num_partitions=K, seed=1)
    rot = bitshard.build_rq_rotation(dimension=D, num_bits=4, seed=2)
    root = _root()
    bitshard.dataset(uri, index_uri=root, storage_options=s3["options"]).create_index(
        "vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot)
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    ranged.read_stats(reset=True)
    opened = ds._indexes.open("idx")
    (seg,) = [o.ranged for o in opened.opened]
    opened_stats = ranged.read_stats()
    # The open: one GET of the first 64 KiB, then the rest of the prefix.
    prefix = seg.prefix_bytes
    assert prefix < seg.size
    assert opened_stats == {"requests": 1 if prefix <= ranged.PREFIX_FIRST_READ else 2,
                            "bytes": prefix}
    assert not any(seg.native.attached(p) for p in range(K) if seg.ranges[p][1])
    q = x[17]
    probes = opened.ranged.probes(q[None, :], 5)
    assert probes.size == 5
    ranged.read_stats(reset=True)
    ds.search("vec", q, k=5, nprobes=5)
    want_bytes = sum(seg.ranges[p][1] for p in probes)
    runs = seg.fetch_runs([int(p) for p in probes if seg.ranges[p][1]])
    assert ranged.read_stats() == {"requests": len(runs), "bytes": want_bytes}
    assert {int(p) for p in range(K) if seg.native.attached(p) and seg.ranges[p][1]} == \
        {int(p) for p in probes if seg.ranges[p][1]}
    # Adjacent partitions are one request: 0..3 is one run, 5 another.
    assert seg.fetch_runs([0, 1, 2, 3, 5]) == [
        (seg.ranges[0][0], sum(seg.ranges[p][1] for p in range(4)), [0, 1, 2, 3]),
        (seg.ranges[5][0], seg.ranges[5][1], [5])]
    # The same query again reads nothing.
    ranged.read_stats(reset=True)
    ds.search("vec", q, k=5, nprobes=5)
    assert ranged.read_stats() == {"requests": 0, "bytes": 0}
    # A bad query is refused before anything is fetched, with search's message.
    bad = q.copy()
    bad[3] = np.nan
    with pytest.raises(InvalidInputError, match="^query has a non-finite value at dimension 3$"):
        ds.search("vec", bad, k=5, nprobes=40)
    assert ranged.read_stats() == {"requests": 0, "bytes": 0}


def test_corrupt_partition_is_named_when_fetched(s3, tmp_path, monkeypatch):
    x = clustered(1500, D, seed=8)
    uri = write_lance(tmp_path / "v.lance", x, 1500)
    ivf = bitshard.train_ivf(bitshard.dataset(uri), "vec", num_partitions=K, seed=1)
    rot = bitshard.build_rq_rotation(dimension=D, num_bits=1, seed=2)
    root = _root()
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    ds.create_index("vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot)
    u = ds.describe_indices()[0]["segments"][0]["uuid"]
    st = Storage.for_uri(root, s3["options"])
    seg = RangedSegment(st, f"segments/{u}.bsseg", "x")
    q = x[3]
    fresh = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    p = int(fresh._indexes.open("idx").ranged.probes(q[None, :], 1)[0])
    off, size = seg.ranges[p]
    assert size > 0
    key = f"{root[len('s3://' + BUCKET) + 1:]}/segments/{u}.bsseg"
    blob = bytearray(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read())
    blob[off + 70] ^= 0x10
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=bytes(blob))
    fresh = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    with pytest.raises(CorruptIndexError,
                       match=f"^{root}/segments/{u}.bsseg: segment {u}: partition {p} checksum "
                             f"mismatch \\(stage-1 region: stored "):
        fresh.search("vec", q, k=5, nprobes=1)
    # A batch holding that query fails as a whole; queries that do not
    # probe the partition are answered.
    with pytest.raises(CorruptIndexError, match=f"partition {p} checksum mismatch"):
        fresh.search("vec", np.stack([x[100], q]), k=5, nprobes=1)
    others = [x[i] for i in range(0, 1500, 7)
              if int(fresh._indexes.open("idx").ranged.probes(x[i][None, :], 1)[0]) != p][:5]
    assert len(others) == 5
    assert fresh.search("vec", np.stack(others), k=5, nprobes=1).num_rows == 25
    # The partition stays absent: asking again fetches and refuses again.
    with pytest.raises(CorruptIndexError, match=f"partition {p} checksum mismatch"):
        fresh.search("vec", q, k=5, nprobes=1)
    # Two searches at once: the one that waited for the other's (refused)
    # fetch fetches the partition again itself and is refused too.
    cache = fresh._indexes.partition_cache
    rseg = fresh._indexes.open("idx").ranged.segments[0]
    read = RangedSegment.read
    gets = []

    def gated(self, offset, size):
        gets.append(offset)
        deadline = time.monotonic() + 30
        while len(gets) == 1 and cache._pins.get((rseg, p), 0) < 2 and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        return read(self, offset, size)

    monkeypatch.setattr(RangedSegment, "read", gated)
    errors = []

    def run(_):
        try:
            fresh.search("vec", q, k=5, nprobes=1)
        except CorruptIndexError as e:
            errors.append(str(e))

    run_threads(run, range(2))
    assert len(errors) == 2 and all(f"partition {p} checksum mismatch" in e for e in errors)
    assert gets == [off, off] and not cache._pins and not cache._fetching


def test_partition_cache_keeps_its_bound(s3, lance_data, tmp_path):
    remote, local, uri = _pair(s3, lance_data, tmp_path, 4, partition_cache_bytes=20000)
    x, ivf = lance_data
    cache = remote._indexes.partition_cache
    assert cache.max_bytes == 20000
    rng = np.random.default_rng(5)
    for i in range(30):
        q = (x[rng.integers(len(x))] + 0.1).astype(np.float32)
        _same(remote.search("vec", q, k=5, nprobes=3), local.search("vec", q, k=5, nprobes=3))
        assert cache.bytes <= 20000
    st = cache.stats()
    assert st["evictions"] > 0 and st["hits"] + st["misses"] >= 30 * 3 * 2 - 6
    # A batch probing more than the bound holds all of it while it runs,
    # then shrinks back.
    Q = x[:40] + 0.1
    _same(remote.search("vec", Q, k=5, nprobes=6), local.search("vec", Q, k=5, nprobes=6))
    assert cache.bytes <= 20000


def test_partition_cache_never_drops_a_pinned_partition(s3, lance_data, tmp_path):
    remote, local, uri = _pair(s3, lance_data, tmp_path, 9)
    opened = remote._indexes.open("idx")
    segs = [s for s in opened.ranged.segments]
    cache = PartitionCache(max_bytes=0, max_requests=3)
    held = [p for p in range(K) if segs[0].ranges[p][1]][:3]
    other = [p for p in range(K) if segs[0].ranges[p][1]][3:9]
    with cache.pinned([(segs[0], held)]):
        assert all(segs[0].native.attached(p) for p in held)
        with cache.pinned([(segs[0], other), (segs[1], other)]):
            assert all(segs[0].native.attached(p) for p in held + other)
        # The inner pins ended: over the bound (0), those are dropped ...
        assert not any(segs[0].native.attached(p) for p in other)
        assert not any(segs[1].native.attached(p) for p in other)
        # ... the outer ones are still held.
        assert all(segs[0].native.attached(p) for p in held)
        assert cache.bytes == sum(segs[0].ranges[p][1] for p in held)
    assert cache.bytes == 0 and not any(segs[0].native.attached(p) for p in held)

    # Searches in threads with a cache too small for any of them: each
    # drops the others' partitions between searches, never under one.
    remote.partition_cache_bytes = 1
    x, ivf = lance_data
    Q = (x[::50][:24] + 0.1).astype(np.float32)
    want = [local.search("vec", q, k=5, nprobes=4) for q in Q]
    errors = []

    def run(t):
        try:
            for i in range(t, len(Q), 3):
                _same(remote.search("vec", Q[i], k=5, nprobes=4), want[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    run_threads(run, range(3))
    assert not errors, errors
    assert remote._indexes.partition_cache.bytes <= 1


def _two_probes(remote, x, same):
    """Two queries probing one partition each (nprobes=1) that has bytes in
    both segments: different partitions, or the same one when ``same``."""
    ranged_index = remote._indexes.open("idx").ranged
    segs = ranged_index.segments
    first = {}
    for i in range(0, len(x), 3):
        p = int(ranged_index.probes(x[i][None, :], 1)[0])
        if not all(s.ranges[p][1] for s in segs):
            continue
        if same and p in first:
            return [x[first[p]], x[i]], [p, p], segs
        if not same and first and p not in first:
            (i0, p0), = [(v, k) for k, v in first.items()][:1]
            return [x[i0], x[i]], [p0, p], segs
        first.setdefault(p, i)
    raise AssertionError("no two such queries")


def _in_threads(remote, Q):
    """``remote.search`` of each query (k=5, nprobes=1), each in its own
    thread, all at once; the Tables (an error in a thread fails the test)."""
    got, errors = [None] * len(Q), []

    def run(i):
        try:
            got[i] = remote.search("vec", Q[i], k=5, nprobes=1)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    run_threads(run, range(len(Q)))
    assert not errors, errors
    return got


def test_searches_fetch_their_partitions_at_the_same_time(s3, lance_data, tmp_path,
                                                          monkeypatch):
    """Two searches in threads fetch their (different) partitions at once:
    every GET of both waits at a barrier of all four (one partition in each
    of 2 segments per search), which a fetch made under the cache's lock
    would never reach. The answers, the bytes and GETs counted and the
    cache's bound are those of fetches made one at a time."""
    remote, local, uri = _pair(s3, lance_data, tmp_path, 4, partition_cache_bytes=1)
    x, ivf = lance_data
    Q, parts, segs = _two_probes(remote, x, same=False)
    want = [local.search("vec", q, k=5, nprobes=1) for q in Q]
    barrier = threading.Barrier(4, timeout=30)
    read = RangedSegment.read

    def gated(self, offset, size):
        barrier.wait()
        return read(self, offset, size)

    monkeypatch.setattr(RangedSegment, "read", gated)
    cache = remote._indexes.partition_cache
    ranged.read_stats(reset=True)
    for g, w in zip(_in_threads(remote, Q), want):
        _same(g, w)
    sizes = [s.ranges[p][1] for p in parts for s in segs]
    assert ranged.read_stats() == {"requests": 4, "bytes": sum(sizes)}
    st = cache.stats()
    assert (st["requests"], st["fetched_bytes"], st["misses"], st["hits"]) == (4, sum(sizes), 4, 0)
    assert cache.bytes <= 1 and not cache._pins and not cache._fetching


def test_a_partition_two_searches_want_is_fetched_once(s3, lance_data, tmp_path, monkeypatch):
    """The second search wanting a partition the first is fetching waits for
    that fetch (one GET per segment in all) instead of fetching it again."""
    remote, local, uri = _pair(s3, lance_data, tmp_path, 9)
    x, ivf = lance_data
    Q, parts, segs = _two_probes(remote, x, same=True)
    want = [local.search("vec", q, k=5, nprobes=1) for q in Q]
    cache = remote._indexes.partition_cache
    read = RangedSegment.read
    timed_out = []

    def gated(self, offset, size):
        # Hold the GET until the other search has pinned the partition too
        # (it then finds it being fetched and waits).
        deadline = time.monotonic() + 30
        while cache._pins.get((self, parts[0]), 0) < 2:
            if time.monotonic() > deadline:
                timed_out.append(self)
                break
            time.sleep(0.01)
        return read(self, offset, size)

    monkeypatch.setattr(RangedSegment, "read", gated)
    ranged.read_stats(reset=True)
    got = _in_threads(remote, Q)
    assert not timed_out
    for g, w in zip(got, want):
        _same(g, w)
    assert ranged.read_stats() == {"requests": 2,
                                   "bytes": sum(s.ranges[parts[0]][1] for s in segs)}
    st = cache.stats()
    assert (st["requests"], st["misses"], st["hits"]) == (2, 2, 2)
    assert not cache._pins and not cache._fetching


def test_partition_cache_bytes_option(s3, lance_data, tmp_path, monkeypatch):
    x, ivf = lance_data
    uri = write_lance(tmp_path / "v.lance", x[:100], 100)
    root = _root()
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    assert ds.partition_cache_bytes == ranged.DEFAULT_PARTITION_CACHE_BYTES == 512 << 20
    ds = bitshard.dataset(uri, index_uri=root,
                          storage_options=dict(s3["options"], partition_cache_bytes="1000"))
    assert ds.partition_cache_bytes == 1000
    monkeypatch.setenv("BITSHARD_PARTITION_CACHE_BYTES", "2048")
    ds = bitshard.dataset(uri, index_uri=_root(), storage_options=s3["options"])
    assert ds.partition_cache_bytes == 2048
    ds = bitshard.dataset(uri, index_uri=_root(), storage_options=s3["options"],
                          partition_cache_bytes=4096)
    assert ds.partition_cache_bytes == 4096
    ds.partition_cache_bytes = 0
    assert ds._indexes.partition_cache.max_bytes == 0
    with pytest.raises(InvalidInputError,
                       match="^partition_cache_bytes must be an integer >= 0, got -1$"):
        ds.partition_cache_bytes = -1
    with pytest.raises(InvalidInputError,
                       match="^partition_cache_bytes must be an integer >= 0, got 'lots'$"):
        bitshard.dataset(uri, index_uri=_root(),
                         storage_options=dict(s3["options"], partition_cache_bytes="lots"))


def test_prefix_size_native():
    with pytest.raises(CorruptIndexError, match="^bad magic at offset 0: not a bitshard segment$"):
        _native.segment_prefix_size(b"X" * 300)
    assert _native.segment_prefix_size(b"BSHRDSEG") == 256


def test_disk_cache_bound_evicts_by_unlink_under_live_mappings(s3, lance_data, tmp_path):
    """cache_dir_max_bytes: a download removes the least recently used cache
    files first; a reader still mapping a removed file reads all its bytes
    (an unlink never truncates: no SIGBUS)."""
    x, ivf = lance_data
    uri = write_lance(tmp_path / "v.lance", x, 500)
    rot = bitshard.build_rq_rotation(dimension=D, num_bits=4, seed=7)
    root = _root()
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    frags = [f.id for f in ds.source.fragments()]
    segs = [ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=ivf,
                                        rq_rotation=rot, fragment_ids=part)
            for part in (frags[:2], frags[2:4], frags[4:])]
    ds.commit_existing_index_segments("idx", "vec", segs)
    loc = tmp_path / "loc"
    lds = bitshard.dataset(uri, index_uri=loc)
    lds.commit_existing_index_segments(
        "idx", "vec", [lds.create_index_uncommitted(
            "vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot, fragment_ids=part,
            index_uuid=s.uuid) for part, s in zip((frags[:2], frags[2:4], frags[4:]), segs)])
    sizes = [s.size_bytes for s in segs]
    cache = tmp_path / "cache"
    bound = sum(sizes) - 1  # the three do not fit: the third download removes the first
    opts = dict(s3["options"], cache_dir=str(cache), cache_dir_max_bytes=str(bound))
    remote = bitshard.dataset(uri, index_uri=root, storage_options=opts)
    opened = remote._indexes.open("idx")
    assert opened.ranged is None  # with a cache_dir: whole files, mapped
    on_disk = sorted(p.name for p in cache.rglob("*.bsseg"))
    names = [f"segments__{s.uuid}.bsseg" for s in segs]
    assert on_disk == sorted(names[1:])  # the first one's file was removed ...
    assert sum(p.stat().st_size for p in cache.rglob("*.bsseg")) <= bound
    for o in opened.opened:  # ... while its mapping is live: every byte reads
        o.native.verify()
    Q = x[::41][:30] + 0.1
    _same(remote.search("vec", Q, k=10, nprobes=K), lds.search("vec", Q, k=10, nprobes=K))
    # A segment larger than the whole bound is read into memory, not cached.
    small = dict(s3["options"], cache_dir=str(tmp_path / "c2"), cache_dir_max_bytes="1")
    tiny = bitshard.dataset(uri, index_uri=root, storage_options=small)
    _same(tiny.search("vec", Q, k=10, nprobes=8), lds.search("vec", Q, k=10, nprobes=8))
    assert not list((tmp_path / "c2").rglob("*.bsseg"))
