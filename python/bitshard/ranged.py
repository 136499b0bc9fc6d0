"""Search of segments read by range from an object store, in two phases.

A segment on an object store (without a ``cache_dir``) is opened from its
**prefix**: the header, artifacts, fragment table and directory, one
contiguous range from offset 0 (docs/format.md, "Opening from a prefix"),
read with one ranged GET (two or three when the first read of
:data:`PREFIX_FIRST_READ` bytes falls short of it). No partition is read.

A search then runs in two phases. Before the C search of a query or of a
whole batch, :meth:`RangedIndex.attached` asks the C searcher which
partitions the queries probe (the same in every segment: they share the
centroids), and :class:`PartitionCache` fetches those of the searched
segments that are not in memory: one ranged GET per run of adjacent
partitions of a segment (coalesced up to :data:`MAX_REQUEST_BYTES`), the
requests issued in parallel on a pool of at most ``max_requests`` threads.
Each partition is attached to its segment (the C reader checks its two
checksums and its values first: a corrupt range is
:class:`~bitshard.errors.CorruptIndexError` naming the segment file and the
partition) and pinned until the search returns. The answer is the whole-file
answer bit for bit: the C search reads the same bytes, checked the same way.

The cache keeps up to ``max_bytes`` of partitions no search pins (the
Dataset's ``partition_cache_bytes``), dropping the least recently used
first. A partition a running search pinned is never dropped under it; while
such searches run, their partitions may take the cache past its bound, and
it shrinks back when they end. The prefixes are held while their index
version is open and are not counted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import _native
from .errors import CorruptIndexError
from .storage import SEGMENT_ALIGN, Storage, _aligned_empty

__all__ = ["RangedSegment", "PartitionCache", "RangedIndex", "read_stats",
           "DEFAULT_PARTITION_CACHE_BYTES"]

#: Default bound of a Dataset's partition cache: 512 MiB.
DEFAULT_PARTITION_CACHE_BYTES = 512 << 20
#: The first read of a segment's prefix. It covers the largest header
#: (1280 bytes) and, for up to about 16,000 centroid values (k x d), the
#: whole prefix.
PREFIX_FIRST_READ = 64 << 10
#: Adjacent partitions are fetched with one request up to this many bytes.
MAX_REQUEST_BYTES = 64 << 20
#: Ranged GETs in flight at once, per fetch.
MAX_PARALLEL_REQUESTS = 8

_stats_lock = threading.Lock()
_stats = {"requests": 0, "bytes": 0}


def _count(requests: int, nbytes: int) -> None:
    with _stats_lock:
        _stats["requests"] += requests
        _stats["bytes"] += nbytes


def read_stats(reset: bool = False) -> Dict[str, int]:
    """Ranged GETs this process issued for segments (prefixes and
    partitions) and the bytes they returned, since start or the last
    ``reset=True``."""
    with _stats_lock:
        out = dict(_stats)
        if reset:
            _stats.update(requests=0, bytes=0)
    return out


class RangedSegment:
    """A segment opened from its prefix; its partitions are attached later.

    ``storage`` must have :attr:`~bitshard.storage.Storage.ranged_reads`;
    ``path`` names the file in messages.
    """

    def __init__(self, storage: Storage, key: str, path: str,
                 centroids_for: Optional[Callable[[Any, int], Any]] = None) -> None:
        """Read the prefix of ``key`` and open it with the C reader
        (CorruptIndexError naming ``path`` if it is refused).
        ``centroids_for(prefix, file_size)``: the centroids to open it with
        (a file with external centroids needs them), or None."""
        self.storage = storage
        self.key = key
        self.path = path
        #: Bytes of the file; the handle its ranged reads go through.
        self.size, self._handle = storage.open_ranged(key)
        prefix = self._read_prefix()
        #: Bytes of the prefix read at open.
        self.prefix_bytes = len(prefix)
        try:
            cents = centroids_for(prefix, self.size) if centroids_for is not None else None
            self.native = _native.Segment(prefix, self.size, centroids=cents)
        except CorruptIndexError as e:
            raise type(e)(f"{path}: {e}") from None
        info = self.native.info()
        self.num_partitions = int(info["num_partitions"])
        #: (offset, size) of each partition in the file.
        self.ranges = [self.native.partition_range(p) for p in range(self.num_partitions)]

    def _read_prefix(self) -> np.ndarray:
        if self.size == 0:
            raise CorruptIndexError(f"segment file is empty: {self.path}")
        buf = self.read(0, min(self.size, PREFIX_FIRST_READ))
        _count(1, len(buf))
        for _ in range(3):
            try:
                need = _native.segment_prefix_size(buf)
            except CorruptIndexError as e:
                raise type(e)(f"{self.path}: {e}") from None
            if need <= len(buf):
                return buf
            if need > self.size:
                raise CorruptIndexError(
                    f"{self.path}: file truncated: the segment's header and directory need "
                    f"{need} bytes, the file has {self.size}")
            more = self.read(len(buf), need - len(buf))
            _count(1, len(more))
            whole = _aligned_empty(need)
            whole[:len(buf)] = buf
            whole[len(buf):] = more
            whole.flags.writeable = False
            buf = whole
        raise CorruptIndexError(f"{self.path}: the segment's prefix size kept growing")

    def read(self, offset: int, size: int) -> np.ndarray:
        """Bytes ``[offset, offset + size)`` of the file (one ranged GET),
        64-byte aligned. Thread-safe."""
        return self.storage.read_range(self.key, offset, size, self._handle)

    def fetch_runs(self, parts: Sequence[int]) -> List[Tuple[int, int, List[int]]]:
        """The requests that fetch ``parts`` (sorted partition ids with bytes):
        ``(offset, size, partitions)`` per run of adjacent ones."""
        runs: List[Tuple[int, int, List[int]]] = []
        for p in parts:
            off, size = self.ranges[p]
            if runs and runs[-1][0] + runs[-1][1] == off and \
                    runs[-1][1] + size <= MAX_REQUEST_BYTES:
                o, s, ps = runs[-1]
                runs[-1] = (o, s + size, ps + [p])
            else:
                runs.append((off, size, [p]))
        return runs


class PartitionCache:
    """Fetched partitions of ranged segments, up to ``max_bytes`` not pinned
    by a running search (least recently used dropped first). Thread-safe:
    searches fetch their partitions at the same time (the GETs run outside
    the lock; a partition another search is fetching is waited for, never
    fetched twice); only the attach and the accounting take the lock."""

    def __init__(self, max_bytes: int = DEFAULT_PARTITION_CACHE_BYTES,
                 max_requests: int = MAX_PARALLEL_REQUESTS) -> None:
        """A cache bounded by ``max_bytes`` (>= 0) issuing at most
        ``max_requests`` (>= 1) ranged GETs at once."""
        self.max_bytes = int(max_bytes)
        self.max_requests = max(1, int(max_requests))
        self._lock = threading.RLock()
        #: (segment, partition) -> bytes, least recently used first.
        self._lru: "OrderedDict[Tuple[RangedSegment, int], int]" = OrderedDict()
        self._pins: Dict[Tuple[RangedSegment, int], int] = {}
        #: Partitions being fetched (by the thread that registered them) ->
        #: set when their fetch has ended, attached or not.
        self._fetching: Dict[Tuple[RangedSegment, int], threading.Event] = {}
        #: Bytes attached now (pinned or not).
        self.bytes = 0
        self.counts = {"hits": 0, "misses": 0, "requests": 0, "fetched_bytes": 0,
                       "evictions": 0}

    def stats(self) -> Dict[str, int]:
        """Partitions found attached (hits) and fetched (misses), ranged GETs
        and bytes fetched, partitions dropped, bytes held now."""
        with self._lock:
            return dict(self.counts, bytes=self.bytes, max_bytes=self.max_bytes)

    @contextmanager
    def pinned(self, wants: Sequence[Tuple[RangedSegment, Sequence[int]]]) -> Iterator[None]:
        """Inside the block, partitions ``wants[i][1]`` of segment
        ``wants[i][0]`` are attached and not dropped."""
        keys = self._acquire(wants)
        try:
            yield
        finally:
            self._release(keys)

    def _acquire(self, wants: Sequence[Tuple[RangedSegment, Sequence[int]]]
                 ) -> List[Tuple[RangedSegment, int]]:
        keys: List[Tuple[RangedSegment, int]] = []
        try:
            # Pin every wanted partition at once (so none is dropped while
            # the others are fetched); fetch the ones no one holds or
            # fetches, outside the lock; wait for the ones another search is
            # fetching. A fetch that failed leaves its partitions absent: the
            # next pass fetches them itself (and meets its error itself).
            with self._lock:
                todo: List[Tuple[RangedSegment, int]] = []
                for seg, parts in wants:
                    for p in sorted({int(x) for x in parts}):
                        if seg.ranges[p][1] == 0:
                            if not seg.native.attached(p):
                                seg.native.attach(p, _aligned_empty(0))
                            continue  # no bytes: nothing to hold or drop
                        key = (seg, p)
                        self._pins[key] = self._pins.get(key, 0) + 1
                        keys.append(key)
                        todo.append(key)
            while todo:
                mine: List[Tuple[RangedSegment, int]] = []
                waited: List[Tuple[RangedSegment, int]] = []
                waits: List[threading.Event] = []
                with self._lock:
                    for key in todo:
                        if key in self._lru:
                            self._lru.move_to_end(key)
                            self.counts["hits"] += 1
                        elif key in self._fetching:
                            waited.append(key)
                            waits.append(self._fetching[key])
                        else:
                            self._fetching[key] = threading.Event()
                            mine.append(key)
                if mine:
                    self._fetch(mine)
                for ev in waits:
                    ev.wait()
                todo = waited
            with self._lock:
                self._shrink()
        except BaseException:
            self._release(keys)
            raise
        return keys

    def _fetch(self, mine: List[Tuple[RangedSegment, int]]) -> None:
        """Fetch and attach ``mine`` (keys this thread registered in
        ``_fetching``): the GETs outside the lock, in parallel; the attach
        and the accounting under it. Whatever happens, the keys leave
        ``_fetching`` and the searches waiting for them are woken."""
        try:
            by_seg: Dict[RangedSegment, List[int]] = {}
            for seg, p in mine:
                by_seg.setdefault(seg, []).append(p)
            jobs = [(seg, off, size, ps) for seg, parts in by_seg.items()
                    for off, size, ps in seg.fetch_runs(sorted(parts))]

            def get(job: Tuple[RangedSegment, int, int, List[int]]) -> np.ndarray:
                seg, off, size, _ = job
                return seg.read(off, size)

            if len(jobs) == 1:
                bufs = [get(jobs[0])]
            else:
                with ThreadPoolExecutor(min(len(jobs), self.max_requests)) as pool:
                    bufs = list(pool.map(get, jobs))
            fetched = sum(len(b) for b in bufs)
            _count(len(jobs), fetched)
            with self._lock:
                self.counts["requests"] += len(jobs)
                self.counts["fetched_bytes"] += fetched
                for (seg, off, size, ps), buf in zip(jobs, bufs):
                    for p in ps:
                        poff, psize = seg.ranges[p]
                        part = buf
                        if len(ps) > 1:
                            # Its own buffer, so that dropping it frees its bytes.
                            part = _aligned_empty(psize)
                            part[:] = buf[poff - off:poff - off + psize]
                            part.flags.writeable = False
                        assert part.ctypes.data % SEGMENT_ALIGN == 0
                        try:
                            seg.native.attach(p, part)
                        except CorruptIndexError as e:
                            raise CorruptIndexError(f"{seg.path}: {e}") from None
                        self._lru[(seg, p)] = psize
                        self.bytes += psize
                        self.counts["misses"] += 1
        finally:
            with self._lock:
                for key in mine:
                    self._fetching.pop(key).set()

    def _release(self, keys: List[Tuple[RangedSegment, int]]) -> None:
        with self._lock:
            for key in keys:
                n = self._pins.get(key, 0) - 1
                if n > 0:
                    self._pins[key] = n
                else:
                    self._pins.pop(key, None)
            self._shrink()

    def _shrink(self) -> None:
        """Drop unpinned partitions, least recently used first, down to the
        bound."""
        if self.bytes <= self.max_bytes:
            return
        for key in list(self._lru):
            if self.bytes <= self.max_bytes:
                break
            if key in self._pins:
                continue
            self._drop(key)

    def _drop(self, key: Tuple[RangedSegment, int]) -> None:
        seg, p = key
        seg.native.detach(p)
        self.bytes -= self._lru.pop(key)
        self.counts["evictions"] += 1

    def forget(self, segments: Sequence[RangedSegment]) -> None:
        """Drop the unpinned partitions of ``segments`` (an index version
        that is no longer searched)."""
        gone = set(segments)
        with self._lock:
            for key in [k for k in self._lru if k[0] in gone and k not in self._pins]:
                self._drop(key)

    def set_max_bytes(self, value: int) -> None:
        """A new bound (>= 0), applied now to the unpinned partitions."""
        with self._lock:
            self.max_bytes = int(value)
            self._shrink()


class RangedIndex:
    """The ranged segments of one opened index version, in the manifest's
    order (None for a segment opened whole), and the cache their partitions
    go through."""

    def __init__(self, native: Any, segments: List[Optional[RangedSegment]],
                 cache: PartitionCache) -> None:
        """``native``: the C searcher over every segment of the version."""
        self.native = native
        self.segments = segments
        self.cache = cache
        self.num_partitions = max((s.num_partitions for s in segments if s is not None),
                                  default=0)

    def probes(self, Q: np.ndarray, nprobes: int) -> np.ndarray:
        """The partitions the C search probes for the float32 queries ``Q``
        ((nq, d) or (d,)), sorted and unique."""
        Q2 = Q.reshape(1, -1) if Q.ndim == 1 else Q
        nq = Q2.shape[0]
        n = min(int(nprobes), self.num_partitions)
        out = np.empty((nq, n), dtype=np.uint32)
        if nq:
            self.native.probes(Q2, nq, nprobes, out)
        return np.unique(out)

    @contextmanager
    def attached(self, Q: np.ndarray, nprobes: int,
                 mask: Optional[np.ndarray] = None) -> Iterator[None]:
        """Inside the block, every partition the queries ``Q`` probe is
        attached in every ranged segment ``mask`` (one flag per segment;
        None: all) selects, and stays attached."""
        parts = [int(p) for p in self.probes(Q, nprobes)]
        wants = [(s, parts) for i, s in enumerate(self.segments)
                 if s is not None and (mask is None or mask[i])]
        with self.cache.pinned(wants):
            yield
