"""What a Dataset searches: its committed indexes, pinned at first use, and
everything a search reuses that is derived from them.

A :class:`IndexView` reads the list of committed indexes (name -> version,
column) the first time a search needs it and keeps it, like a Lance dataset
pinned to its version, so that a search does not list and parse manifests on
every call. Its Dataset calls :meth:`IndexView.invalidate` after each commit
of its own and on ``refresh()``; the next search reads the list again. The
other caches here are keyed by the index version and the source version they
were made for, so the pin is all there is to invalidate:

- the opened segments of an index version and the C searcher over them
  (:meth:`IndexView.open`), one version per index name;
- the search plan of an (index version, source version): the fragments,
  those whose data changed since they were encoded (stale: compared by
  their identity records, :mod:`bitshard.identity`, here and never per
  query), the segment mask, the rows deleted since the build
  (:meth:`IndexView.plan`);
- the prepared searchers behind ``Dataset.search``, per settings
  (:meth:`IndexView.searcher`);
- the cache of the rows an index searches exactly, one per index, shared by
  its searchers (:meth:`IndexView.exact_rows`).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from . import _native
from . import identity
from . import index as idx
from .codespace import CodeSpace
from .errors import CorruptIndexError, IndexNotFoundError, InvalidInputError
from .index import OpenSegment, SegmentHandle
from .searcher import (DEFAULT_EXACT_CACHE_BYTES, ExactPart, SearchOptions, Searcher,
                       UncoveredRowsWarning, _ExactRows)
from .sources import Source
from .ranged import DEFAULT_PARTITION_CACHE_BYTES, PartitionCache, RangedIndex
from .storage import Storage

__all__ = ["IndexView", "OpenIndex", "SearchPlan"]

#: Prepared searchers kept for Dataset.search (the cache is emptied when full).
MAX_PREPARED = 16


#: (index root, index name) pairs already warned about old-format segments:
#: the warning is given once per index and process.
_warned_old_format: Set[Tuple[str, str]] = set()


@dataclass(frozen=True)
class OpenIndex:
    """One committed version of an index, opened for search."""

    name: str
    version: int
    #: The manifest.
    doc: Dict[str, Any]
    #: The manifest's segments, in its order.
    handles: List[SegmentHandle]
    #: The C searcher over every segment (None when the index has none).
    native: Any
    #: The opened files, held while the C searcher points into them.
    opened: List[OpenSegment]
    #: Segments read by range (an object store without a cache_dir): the
    #: two-phase search fetches the partitions it probes (bitshard.ranged).
    ranged: Optional[RangedIndex] = None


@dataclass(frozen=True)
class SearchPlan:
    """What a search of an index version needs from the source's version
    that does not depend on the query or on the search settings."""

    #: Fragments of the source.
    source_fragments: Set[int]
    #: Source fragments some segment covers with codes of their current
    #: data (neither stale nor gone).
    covered: Set[int]
    #: Source fragments no segment covers, sorted (scanned exactly).
    uncovered: List[int]
    #: Covered source fragments whose codes must not be used, with the
    #: reason (bitshard.identity.stale_fragments): scanned exactly.
    stale: Dict[int, str]
    #: One flag per segment: does it cover a fragment still in the source.
    segment_mask: np.ndarray
    #: The source's fragments, sorted, when some segment covers fragments
    #: compacted away or deleted since the build (their rows are never
    #: returned); None when every covered fragment is still there.
    allowed_fragments: Optional[np.ndarray]
    #: Sorted row ids deleted from the source after their segment was built.
    denied: Optional[np.ndarray]

    @property
    def exact(self) -> List[int]:
        """The fragments searched exactly: uncovered and stale, sorted."""
        return sorted(set(self.uncovered) | set(self.stale))

    def exact_parts(self) -> List[ExactPart]:
        """The rows searched exactly instead of from codes, in fragment order:
        (fragment id, sorted uint32 offsets or None for every live row)."""
        return [(f, None) for f in self.exact]


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by this function's
    caller point at the first frame outside the bitshard package."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and \
            str(frame.f_globals.get("__name__", "")).startswith("bitshard"):
        frame = frame.f_back
        level += 1
    return level


class IndexView:
    """The committed indexes of one Dataset as its searches see them."""

    def __init__(self, storage: Storage, source: Source, index_root: str) -> None:
        self.storage = storage
        self.source = source
        self.index_root = index_root
        self._versions: Optional[Dict[str, Tuple[int, str]]] = None
        #: Indexes whose newest manifest could not be read, with the error:
        #: a search of another index does not depend on them.
        self._broken: Dict[str, CorruptIndexError] = {}
        self._open: Dict[str, OpenIndex] = {}
        self._plans: Dict[Tuple[str, int, Any], SearchPlan] = {}
        self._deleted: Dict[Tuple[Any, int], np.ndarray] = {}
        self._prepared: Dict[Any, Searcher] = {}
        #: Bytes of vectors of exactly-searched rows kept per index (the
        #: Dataset's ``exact_cache_bytes``).
        self.exact_cache_bytes = DEFAULT_EXACT_CACHE_BYTES
        self._exact: Dict[str, Tuple[Any, _ExactRows]] = {}
        self._warned: Set[Tuple[str, int, Any]] = set()
        #: Partitions fetched by range for this Dataset's searches, bounded
        #: by partition_cache_bytes (the Dataset's argument, else the storage
        #: option, else the default).
        self.partition_cache = PartitionCache(
            storage.partition_cache_bytes if storage.partition_cache_bytes is not None
            else DEFAULT_PARTITION_CACHE_BYTES)

    def invalidate(self) -> None:
        """Read the committed versions again at the next search (after a
        commit, or to see other writers' commits)."""
        self._versions = None

    def versions(self) -> Dict[str, Tuple[int, str]]:
        """Index name -> (committed version, column), read once and kept."""
        if self._versions is None:
            versions, broken = {}, {}
            for n in idx.list_index_names(self.storage):
                v = idx.latest_version(self.storage, n)
                try:
                    versions[n] = (v, idx.read_manifest(self.storage, n, v)["column"])
                except CorruptIndexError as e:
                    broken[n] = e
            self._versions, self._broken = versions, broken
        return self._versions

    def pin(self, versions: Dict[str, Tuple[int, str]]) -> None:
        """Search these committed versions (index name -> (version, column),
        as :meth:`versions` of another view returned them) until the next
        :meth:`invalidate`: the actors of bitshard.serve answer for the
        version their front pinned."""
        self._versions, self._broken = dict(versions), {}

    def resolve(self, column: str, index: Optional[str]) -> str:
        """The index a search of ``column`` uses: ``index`` when given (it
        must exist), else the one index on the column."""
        versions = self.versions()
        names = sorted(versions)
        if index is not None:
            if index in self._broken:
                raise self._broken[index]
            if index not in versions:
                raise IndexNotFoundError(f"no index named {index!r}; have {names}")
            return index
        on_col = [n for n in names if versions[n][1] == column]
        if self._broken:
            # An unreadable manifest may be another index on this column: with
            # none readable, its error is the answer; with one, search it and
            # say which index was left out (verify reports the damage).
            first = sorted(self._broken)[0]
            if not on_col:
                raise self._broken[first]
            warnings.warn(
                f"index {first!r} is unreadable and was not considered for column "
                f"{column!r}: {self._broken[first]}", stacklevel=4)
        if not on_col:
            raise IndexNotFoundError(f"no index on column {column!r}")
        if len(on_col) > 1:
            raise InvalidInputError(
                f"column {column!r} has several indexes {on_col}; pass index= to choose"
            )
        return on_col[0]

    def open(self, name: str) -> OpenIndex:
        """The pinned version of index ``name``, its segments opened and
        checked against its manifest (kept until the version changes)."""
        version = self.versions()[name][0]
        found = self._open.get(name)
        if found is not None and found.version == version:
            return found
        doc = idx.read_manifest(self.storage, name, version)
        handles = idx.committed_segments(self.storage, name, version)
        mpath = self.storage.path(idx._manifest_key(name, version))
        opened = [idx.open_handle(h, self.storage, f"manifest {mpath}", ranged=True)
                  for h in handles]
        # The manifest's claims are checked against the files: a segment
        # swapped on disk for one from another code space is refused here
        # (and the C searcher checks the files against each other).
        for h, o in zip(handles, opened):
            real = o.handle(self.index_root, name)
            CodeSpace.of(real).require_same(
                CodeSpace.of(h),
                f"segment {h.uuid} on disk does not match index {name!r} (file vs manifest)")
        old = [h.uuid for h, o in zip(handles, opened) if idx.needs_upgrade(o)]
        if old and (self.index_root, name) not in _warned_old_format:
            _warned_old_format.add((self.index_root, name))
            warnings.warn(
                f"index {name!r} has {len(old)} segment(s) of segment format 2 (first "
                f"{old[0]}): each is read and checked whole at every open; `bitshard "
                f"upgrade` (bitshard.upgrade_index) rewrites them as format "
                f"{idx.SEGMENT_FORMAT_VERSION} without re-encoding",
                idx.FormatUpgradeWarning, stacklevel=4)
        native = _native.Searcher([o.native for o in opened]) if opened else None
        ranged = None
        if native is not None and any(o.ranged is not None for o in opened):
            ranged = RangedIndex(native, [o.ranged for o in opened], self.partition_cache)
        if found is not None and found.ranged is not None:
            # The older version's partitions make room (those a running
            # search holds stay until it ends and are dropped in LRU order).
            self.partition_cache.forget([s for s in found.ranged.segments if s is not None])
        self._open[name] = OpenIndex(name, version, doc, handles, native, opened, ranged)
        return self._open[name]

    def plan(self, index: OpenIndex) -> SearchPlan:
        """The plan of ``index`` at the source's current version (computed
        once per index version and source version; the last one is kept)."""
        key = (index.name, index.version, self.source.version)
        plan = self._plans.get(key)
        if plan is None:
            source_fragments = {f.id for f in self.source.fragments()}
            covered = set(idx.iter_fragments(index.handles))
            # Fragments compacted away or deleted since the build: segments
            # covering only those are skipped, and their rows never returned.
            gone = covered - source_fragments
            # Fragments whose data changed since they were encoded: their
            # codes are never used; their rows are scanned exactly.
            stale = identity.stale_fragments(self.source, index.doc, index.handles,
                                             index.opened)
            message = identity.unverified_warning(index.name, stale)
            if message is not None:
                warnings.warn(message, stacklevel=4)
            current = covered - gone - set(stale)
            plan = SearchPlan(
                source_fragments=source_fragments,
                covered=current,
                uncovered=sorted(source_fragments - covered),
                stale=stale,
                segment_mask=np.array([any(f in current for f in h.fragment_ids)
                                       for h in index.handles], dtype=np.uint8),
                allowed_fragments=(np.array(sorted(source_fragments - set(stale)),
                                            dtype=np.uint64)
                                   if gone or stale else None),
                denied=self._deleted_rowids(current),
            )
            self._plans = {key: plan}
        return plan

    def _deleted_rowids(self, covered: Set[int]) -> Optional[np.ndarray]:
        """Sorted row ids deleted from the source after their segments were
        built (a segment encodes the rows live at build time), or None."""
        parts = []
        for f in self.source.fragments():
            if f.id in covered and f.num_rows < f.physical_rows:
                key = (self.source.version, f.id)
                if key not in self._deleted:
                    live = self.source.live_offsets(f.id).astype(np.uint64)
                    dead = np.setdiff1d(np.arange(f.physical_rows, dtype=np.uint64), live)
                    self._deleted[key] = (np.uint64(f.id) << np.uint64(32)) | dead
                parts.append(self._deleted[key])
        if not parts:
            return None
        return np.ascontiguousarray(np.sort(np.concatenate(parts)), dtype=np.uint64)

    def set_exact_cache_bytes(self, value: int) -> None:
        """Change the cache size of the exact search (checked by the caller);
        caches already made keep theirs until their searchers are dropped."""
        self.exact_cache_bytes = value
        self._exact.clear()
        self._prepared.clear()

    def exact_rows(self, index: OpenIndex, plan: SearchPlan, column: str, dim: int,
                   parts: List[ExactPart], cache_bytes: Optional[int]) -> _ExactRows:
        """The rows of ``parts`` for an exact search of ``index``: with
        ``cache_bytes`` None, the one cache of the index's plan kept here for
        all its searchers (``parts`` are some of the plan's), else a cache of
        ``cache_bytes`` over ``parts`` for one searcher. Warns once per index
        version and source version that rows are searched exactly."""
        key = (index.name, index.version, self.source.version)
        every = plan.exact_parts()
        if key not in self._warned:
            self._warned.add(key)
            rows = sum(self.source.fragment(f).num_rows if o is None else int(o.size)
                       for f, o in every)
            nf, ns = len(every), len(plan.stale)
            stale = f", {ns} of them stale (describe_indices says why)" if ns else ""
            warnings.warn(
                f"index {index.name!r} does not cover {rows} rows in {nf} "
                f"fragment{'' if nf == 1 else 's'} of the source (version "
                f"{self.source.version}){stale}: they are searched exactly, read from the "
                f"source on every search beyond exact_cache_bytes="
                f"{self.exact_cache_bytes if cache_bytes is None else cache_bytes}; "
                f"ds.optimize_indices() indexes them", UncoveredRowsWarning,
                stacklevel=_user_stacklevel())
        if cache_bytes is not None:
            return _ExactRows(self.source, column, parts, dim, cache_bytes)
        full = key + (column, self.exact_cache_bytes)
        found = self._exact.get(index.name)
        if found is None or found[0] != full:
            found = (full, _ExactRows(self.source, column, every, dim, self.exact_cache_bytes))
            self._exact[index.name] = found
        return found[1]

    def searcher(self, column: str, options: SearchOptions) -> Searcher:
        """A searcher of these settings, reused across calls while the index
        version and the source version it was made for hold (a filter is
        resolved afresh on each call, so those are not kept)."""
        # Checked before the cache is consulted: k=True must not find k=1's.
        options = options.checked()
        settings = options.cache_key()
        key = None if settings is None else (column, settings, self.source.version)
        s = self._prepared.get(key) if key is not None else None
        if s is not None and self.versions().get(s.index_name, (None,))[0] == s.index_version:
            return s
        s = Searcher(self, column, options)
        if key is not None:
            if len(self._prepared) >= MAX_PREPARED:
                self._prepared.clear()
            self._prepared[key] = s
        return s
