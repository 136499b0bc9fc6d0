"""Prepared searches: everything about a search that does not depend on the
query, settled once.

``ds.searcher(column, k=10, nprobes=20, ...)`` gathers its settings into a
:class:`SearchOptions`; the :class:`Searcher` checks them, takes the index,
its pinned version and the search plan from the Dataset's
:class:`~bitshard.indexview.IndexView`, and resolves a filter to the rows it
allows; then ``searcher.search(q)`` costs the scan and little else, and
returns numpy arrays. ``Dataset.search`` is a prepared search used once (and
kept by the IndexView for the next call with the same settings), with its
answer turned into a pyarrow Table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np

from . import _native
from .artifacts import METRICS
from . import validate
from .errors import CorruptIndexError, InvalidInputError
from .sources import DEFAULT_BATCH_SIZE, Source, make_rowids

if TYPE_CHECKING:
    from .indexview import IndexView, OpenIndex, SearchPlan

__all__ = ["Searcher", "SearchOptions", "NO_ROW", "DEFAULT_EXACT_CACHE_BYTES",
           "EXACT_BATCH_BYTES", "ExactPart", "UncoveredRowsWarning"]

#: Row id that pads a result with fewer than k rows (its distance is +inf).
NO_ROW = np.uint64(np.iinfo(np.uint64).max)

#: Default of ``exact_cache_bytes``: bytes of raw vectors (plus 8 bytes of
#: row id a row) of the rows searched exactly that a Dataset keeps in memory
#: per index; the rest is streamed from the source on every search.
DEFAULT_EXACT_CACHE_BYTES = 256 << 20
#: Bytes of vectors read from the source per streamed batch of the exact scan
#: (at least one row, at most the sources' default batch of 65536 rows).
EXACT_BATCH_BYTES = 4 << 20

_Hits = Tuple[np.ndarray, np.ndarray]  # (rowids uint64, distances float32)
_SHIFT = np.uint64(32)  # row id = fragment id << 32 | offset
_LOW = np.uint64(0xFFFFFFFF)
#: Rows searched exactly: a fragment id and the sorted uint32 offsets of the
#: rows of it searched exactly, or None for every live row of it.
ExactPart = Tuple[int, Optional[np.ndarray]]


class UncoveredRowsWarning(UserWarning):
    """Some rows of the source are searched exactly (read from the source for
    every search) because no segment of the index covers them."""


def _refuse_query(a: np.ndarray, i: int, j: int, which: str) -> None:
    """Raise the accepted-values refusal for element (i, j) of float32 queries
    ``a`` (the C library words a single query's refusal the same way)."""
    v = float(a[i, j])
    if not np.isfinite(v):
        raise InvalidInputError(f"{which} has a non-finite value at dimension {j}")
    raise InvalidInputError(f"{which}: value {v:g} at dimension {j} is too large "
                            f"{validate.ACCEPTED_VALUES}")


@dataclass(frozen=True)
class SearchOptions:
    """The settings of a search: the keywords of ``Dataset.search`` and
    ``Dataset.searcher`` (documented there), as the caller gave them.
    :meth:`checked` validates and normalises them."""

    k: Any
    nprobes: Any
    refine_factor: Any
    index: Optional[str]
    fragment_ids: Optional[Sequence[int]]
    filter: Any
    fast_search: bool
    eps0: Any
    num_threads: Any
    #: None: the Dataset's cache (shared by its searchers); an integer: a
    #: cache of that many bytes owned by this searcher.
    exact_cache_bytes: Any = None

    @classmethod
    def from_arguments(cls, arguments: Dict[str, Any]) -> "SearchOptions":
        """The settings of a call of ``Dataset.search``, ``Dataset.searcher``
        or ``bitshard.serve``'s ``Service.search`` from its arguments
        (``locals()`` at its start: every setting is a parameter; the other
        names are ignored), not yet checked. All three build their settings
        here and check them with :meth:`checked`, so they refuse the same
        values with the same errors."""
        return cls(**{name: arguments[name] for name in _OPTION_NAMES})

    def checked(self) -> "SearchOptions":
        """These settings checked by their rules (validate.search_settings)
        and normalised: integers as ``int``, fragment_ids as a list."""
        s = validate.search_settings(self.k, self.nprobes, self.refine_factor, self.eps0,
                                     self.num_threads, self.fragment_ids)
        cache = (None if self.exact_cache_bytes is None
                 else validate.integer("exact_cache_bytes", self.exact_cache_bytes, 0))
        return dataclasses.replace(
            self, k=s.k, nprobes=s.nprobes, refine_factor=s.refine_factor, eps0=s.eps0,
            num_threads=s.num_threads, fragment_ids=s.fragment_ids, exact_cache_bytes=cache)

    def cache_key(self) -> Optional[Tuple[Any, ...]]:
        """A hashable key of checked settings, to reuse a prepared searcher;
        None with a filter (resolved afresh on each search) or an index
        argument that is not hashable (left for the index lookup to refuse)."""
        if self.filter is not None:
            return None
        try:
            key = (self.index, self.k, self.nprobes, self.refine_factor,
                   None if self.fragment_ids is None else tuple(self.fragment_ids),
                   bool(self.fast_search), self.eps0, self.num_threads,
                   self.exact_cache_bytes)
            hash(key)
        except (TypeError, ValueError):
            return None
        return key

    def native_params(self, segment_mask: np.ndarray, allowed_rows: Optional[np.ndarray],
                      allowed_fragments: Optional[np.ndarray],
                      denied: Optional[np.ndarray]) -> Tuple[Any, ...]:
        """The settings tuple of the C search (``_native.SearchParams``) for
        checked options and the plan's filters."""
        # nprobes above the partition count means every partition (the C
        # search caps it); so does one above the C parameter's range.
        return (self.k, min(self.nprobes, 2**32 - 1), self.eps0, self.refine_factor or 0,
                segment_mask, allowed_rows, allowed_fragments, denied)


#: The names of SearchOptions' fields (from_arguments reads them per call).
_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SearchOptions))


class Searcher:
    """A search of one index with fixed settings, ready for many queries.

    Made by :meth:`bitshard.Dataset.searcher`. The index version, the source's
    deleted rows and the rows a ``filter`` allows are read when the searcher is
    made; a searcher keeps answering from that snapshot (make a new one, after
    ``ds.refresh()``, to see later commits). Rows no segment covers, and rows
    of stale fragments (their data changed since they were encoded), are
    searched exactly unless ``fast_search``: on the first search as many of
    their vectors as ``exact_cache_bytes`` allows are read into a cache (the
    Dataset's, shared by its searchers of the same index, unless this
    searcher was given its own size), and the rest are streamed from the
    source in batches of at most :data:`EXACT_BATCH_BYTES` on every search
    (once for a whole batch of queries).

    Safe to share between threads; each call allocates its own output.
    """

    def __init__(self, view: "IndexView", column: str, options: SearchOptions) -> None:
        """A search of ``column`` through ``view`` (a Dataset's committed
        indexes) with ``options``, which are checked here; use
        :meth:`bitshard.Dataset.searcher` rather than this constructor."""
        options = options.checked()
        self.k: int = options.k
        self.nprobes: int = options.nprobes
        self.refine_factor: Optional[int] = options.refine_factor
        self.eps0: float = options.eps0
        self._num_threads: Optional[int] = options.num_threads
        self.column = column
        self.source: Source = view.source

        index = view.open(view.resolve(column, options.index))
        plan = view.plan(index)
        #: The index searched and its committed version.
        self.index_name = index.name
        self.index_version = int(index.doc.get("version", 0))
        wanted, mask, allowed_frags, parts = self._fragments(index, plan, options)
        allowed_rows = None
        if options.filter is not None:
            allowed_rows = np.ascontiguousarray(
                np.sort(self.source.filter_rowids(options.filter, sorted(wanted))),
                dtype=np.uint64)
        self._allowed_rows = allowed_rows
        self.metric: str = index.doc.get("metric", "l2")
        self._mcode = METRICS[self.metric]
        self.num_bits = int(index.doc.get("num_bits", 1))
        self.dim = self.source.vector_dim(column)
        #: The rows searched exactly (None: none), their fragments, and which
        #: of the cached rows this searcher's fragments and filter allow
        #: (computed on the first search; None there means all of them).
        self._exact: Optional[_ExactRows] = None
        self._exact_frags = {f for f, _ in parts}
        self._exact_sel: Optional[Tuple[Optional[np.ndarray]]] = None
        if parts:
            self._exact = view.exact_rows(index, plan, column, self.dim, parts,
                                          options.exact_cache_bytes)
        self._native = index.native if index.native is not None and mask.any() else None
        #: Segments read by range: each C search first attaches the
        #: partitions it probes (bitshard.ranged); None when none is.
        self._ranged = index.ranged if self._native is not None else None
        self._mask = mask
        #: Segment uuid -> file, to name the file of a partition the C search
        #: found damaged (partitions are checked when a search first touches them).
        self._segment_paths = {bytes(o.info["uuid"]).hex(): o.path for o in index.opened}
        self._params = options.native_params(mask, allowed_rows, allowed_frags, plan.denied)
        # How many candidates the C search can return: k (extra bits), k * r
        # (rerank), or every code that passed stage 1 (gated 1-bit rerank,
        # grown on demand); never more than the rows encoded.
        if self.refine_factor is not None:
            cap = self.k * self.refine_factor
        elif self.num_bits > 1:
            cap = self.k
        else:
            cap = max(256, 16 * self.k)
        self._cap = self._batch_cap = min(cap, sum(h.num_rows for h in index.handles))
        self._stats = np.zeros(4, dtype=np.uint64)
        self._exact_reads = 0
        #: One query whole in C (``_native.OneSearch.search``) where the scan's
        #: answer is final: more than one bit, no refine_factor, no rows
        #: searched exactly, no segment read by range. It returns None for a
        #: query that is not a C-contiguous float32 vector of the column's
        #: dimension, which then takes the Python path (converted or refused).
        #: It stands for this class's ``_one``: a subclass with its own (the
        #: serve front, whose scan is the actors') keeps that.
        self._one_c: Any = None
        if (type(self)._one is Searcher._one and self._native is not None
                and self._ranged is None and self._exact is None
                and self.num_bits > 1 and self.refine_factor is None):
            self._one_c = self._native.prepare_one(self._params, self._stats, np.empty,
                                                   np.dtype(np.uint64),
                                                   np.dtype(np.float32)).search

    @staticmethod
    def _fragments(index: "OpenIndex", plan: "SearchPlan", options: SearchOptions
                   ) -> Tuple[Set[int], np.ndarray, Optional[np.ndarray], List[ExactPart]]:
        """The fragments searched: (their ids, the segment mask, the fragment
        allow-list for the C search, the rows searched exactly)."""
        # Stale fragments (data changed since encoded) are never answered
        # from codes: scanned exactly like uncovered ones, or skipped by
        # fast_search.
        parts = [] if options.fast_search else plan.exact_parts()
        if options.fragment_ids is None:
            return plan.source_fragments, plan.segment_mask, plan.allowed_fragments, parts
        wanted = set(options.fragment_ids)
        unknown = wanted - plan.source_fragments
        if unknown:
            raise InvalidInputError(f"fragment {min(unknown)} is not in the source")
        mask = np.array([any(f in wanted and f in plan.covered for f in h.fragment_ids)
                         for h in index.handles], dtype=np.uint8)
        parts = [p for p in parts if p[0] in wanted]
        return wanted, mask, np.array(sorted(wanted - set(plan.stale)), dtype=np.uint64), parts

    # ------------------------------------------------------------- results

    @property
    def stats(self) -> Dict[str, int]:
        """Scan counts summed over every query this searcher answered:
        partitions probed, codes scanned (stage 1), codes given their extra
        bits (stage 2), candidates returned by the scan, exact vector reads."""
        s = self._stats
        return {"partitions_probed": int(s[0]), "codes_scanned": int(s[1]),
                "codes_stage2": int(s[2]), "candidates": int(s[3]),
                "exact_reads": int(self._exact_reads)}

    def search(self, q: Any) -> Tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours of one query or a batch.

        Args:
            q: shape (d,) or (nq, d); float16/32/64 (other numeric types are
                converted to float32).

        Returns:
            ``(rowids, distances)``: uint64 and float32 arrays of shape (k,)
            for one query, (nq, k) for a batch, each row sorted by (distance,
            row id). Distances are squared L2, or 1 - cosine / 1 - dot, exact
            when reranked and estimated from the codes otherwise (see
            ``Dataset.search``). A query with fewer than k results is padded
            with :data:`NO_ROW` and ``inf``.
        """
        one = self._one_c
        if one is not None:
            try:
                got = one(q)
            except CorruptIndexError as err:
                raise self._named(err) from None
            if got is not None:
                return got  # arrays of this call
        a = np.asarray(q)
        if a.ndim == 1:
            rows, dists = self._one(self._check(a))
            if rows.size == self.k:
                return rows, dists  # arrays of this call, not shared
            out_r = np.empty(self.k, dtype=np.uint64)
            out_d = np.empty(self.k, dtype=np.float32)
            out_r[:rows.size] = rows
            out_d[:rows.size] = dists
            out_r[rows.size:] = NO_ROW
            out_d[rows.size:] = np.inf
            return out_r, out_d
        if (a.ndim == 2 and self._native is not None and self.num_bits == 1
                and self.refine_factor is None and self._exact is None):
            # The gated rerank: the scan, each round of the rerank and the
            # final top k are one C call each for the whole batch.
            Q = self._check(a)
            r, _, lb, n = self._scan_batch(self._native, Q, True)
            assert lb is not None
            rows, dists, _ = self._gated(Q, r, lb, n)
            return rows, dists
        if (a.ndim == 2 and self._native is not None and self.num_bits > 1
                and self.refine_factor is None and self._exact is None):
            # The scan's answer is final (the k best estimates, in order):
            # the C batch writes it straight into the output.
            Q = self._check(a)
            nq = Q.shape[0]
            out_r = np.full((nq, self.k), NO_ROW, dtype=np.uint64)
            out_d = np.full((nq, self.k), np.inf, dtype=np.float32)
            counts = np.empty(nq, dtype=np.uint64)
            try:
                with self._attached(Q):
                    self._native.search_batch_into(Q, nq, self._threads(), self._params,
                                                   out_r, out_d, None, counts, self._stats)
            except CorruptIndexError as err:
                raise self._named(err) from None
            return out_r, out_d
        hits = self.search_lists(a)
        out_r = np.full((len(hits), self.k), NO_ROW, dtype=np.uint64)
        out_d = np.full((len(hits), self.k), np.inf, dtype=np.float32)
        for i, (rows, dists) in enumerate(hits):
            out_r[i, :rows.size] = rows
            out_d[i, :rows.size] = dists
        return out_r, out_d

    def search_lists(self, q: Any) -> List[_Hits]:
        """Like :meth:`search`, one (rowids, distances) pair per query, each of
        length <= k and unpadded. A 1-D query gives a list of one."""
        a = np.asarray(q)
        if a.ndim == 1:
            return [self._one(self._check(a))]
        return self._batch(self._check(a))

    # ------------------------------------------------------------ internals

    def _check(self, a: np.ndarray) -> np.ndarray:
        if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
            raise InvalidInputError(f"query must be numeric, got dtype {a.dtype}")
        if a.ndim not in (1, 2):
            raise InvalidInputError(f"query must be 1-D or 2-D, got shape {a.shape}")
        if a.shape[-1] != self.dim:
            raise InvalidInputError(
                f"query has dimension {a.shape[-1]}, column {self.column!r} has {self.dim}")
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 2:
            bad = validate.first_refused_value(a)
            if bad is not None:
                _refuse_query(a, bad[0], bad[1], f"query {bad[0]}")
        return a

    def _exact_selection(self, exact: "_ExactRows") -> Optional[np.ndarray]:
        """Positions of the cached rows this searcher searches (its fragments
        and filter), or None for all of them; computed once, after the fill."""
        if self._exact_sel is None:
            rows = exact.rows
            keep = None
            if any(f not in self._exact_frags for f, _ in exact.parts):
                keep = np.isin(rows >> np.uint64(32),
                               np.array(sorted(self._exact_frags), dtype=np.uint64))
            if self._allowed_rows is not None:
                allowed = np.isin(rows, self._allowed_rows)
                keep = allowed if keep is None else keep & allowed
            sel = None
            if keep is not None and not keep.all():
                sel = np.flatnonzero(keep).astype(np.int32 if rows.size < 2**31 else np.int64)
            self._exact_sel = (sel,)
        return self._exact_sel[0]

    def _exact_hits(self, Q: np.ndarray) -> List[_Hits]:
        """The k nearest rows of the exact search for each float32 query of
        ``Q`` (nq, d), each sorted by (distance, row id): the cached rows,
        then the rest streamed from the source once for all the queries.
        Every distance depends on its row alone and the top k is taken in
        (distance, row id) order, so the answer is the same however the rows
        are split between cache and stream."""
        exact = self._exact
        assert exact is not None
        exact.fill()
        k, nq = self.k, Q.shape[0]
        best: List[_Hits] = [(np.empty(0, np.uint64), np.empty(0, np.float32))] * nq
        n = exact.rows.size
        if n:
            sel = self._exact_selection(exact)
            rows = exact.rows if sel is None else exact.rows[sel]
            if rows.size:
                d = np.empty(n, dtype=np.float32)
                for qi in range(nq):
                    _native.exact_distances(self._mcode, Q[qi], exact.vecs, n, self.dim, d)
                    dq = d if sel is None else d[sel]
                    order = np.lexsort((rows, dq))[:k]
                    best[qi] = (rows[order], dq[order])
        for rid, vecs in exact.stream(self._exact_frags):
            if self._allowed_rows is not None:
                keep = np.isin(rid, self._allowed_rows)
                if not keep.any():
                    continue
                rid, vecs = rid[keep], vecs[keep]
            vecs = np.ascontiguousarray(vecs, dtype=np.float32)
            m = rid.size
            d = np.empty(m, dtype=np.float32)
            for qi in range(nq):
                _native.exact_distances(self._mcode, Q[qi], vecs, m, self.dim, d)
                r = np.concatenate([best[qi][0], rid])
                dd = np.concatenate([best[qi][1], d])
                order = np.lexsort((r, dd))[:k]
                best[qi] = (r[order], dd[order])
        return best

    def _named(self, err: CorruptIndexError) -> CorruptIndexError:
        """``err`` (the C search's "segment <uuid>: partition ..." refusal)
        with the segment's file in front, as an open names it."""
        msg = str(err)
        if not msg.startswith("segment "):
            return err  # already names its file (a partition fetched by range)
        uuid = msg[len("segment "):len("segment ") + 32]
        path = self._segment_paths.get(uuid)
        return CorruptIndexError(f"{path}: {msg}" if path else msg)

    def _one(self, q: np.ndarray) -> _Hits:
        """One float32 query of shape (d,): the hot path."""
        if self._native is None:
            rows, dists = np.empty(0, np.uint64), np.empty(0, np.float32)
            bad = validate.first_refused_value(q[None, :])
            if bad is not None:
                _refuse_query(q[None, :], 0, bad[1], "query")
        else:
            cap = self._cap
            gated = self.num_bits == 1 and self.refine_factor is None
            r = np.empty(cap, np.uint64)
            e = np.empty(cap, np.float32)
            lb = np.empty(cap, np.float32) if gated else None
            try:
                if self._ranged is None:
                    # Local segments: no context manager on the hot path (it
                    # cost ~6k instructions a query, 1.5% of one at nprobes 12).
                    n = self._native.search(q, self._params, r, e, lb, self._stats)
                    if n > cap:
                        r, e, lb = self._search_again(self._native, q, n, gated)
                else:
                    with self._attached(q):
                        n = self._native.search(q, self._params, r, e, lb, self._stats)
                        if n > cap:
                            r, e, lb = self._search_again(self._native, q, n, gated)
            except CorruptIndexError as err:
                raise self._named(err) from None
            rows, dists = r[:n], e[:n]
            if self.refine_factor is not None:
                rows, dists = _rerank_all(self.source, self.column, q[None, :],
                                          [(rows, dists)], self._mcode, self.dim)[0]
            elif lb is not None:
                top_r, top_d, got = self._gated(q[None, :], r[None, :], lb[None, :],
                                                np.array([n], dtype=np.uint64))
                rows, dists = top_r[0, :got[0]], top_d[0, :got[0]]
                if self._exact is None:
                    return rows, dists  # already the k best, in order
            else:
                # already the k best estimates in (estimate, row id) order
                if self._exact is None:
                    return rows, dists
        if self._exact is not None:
            er, ed = self._exact_hits(q[None, :])[0]
            rows = np.concatenate([rows, er])
            dists = np.concatenate([dists, ed])
        order = np.lexsort((rows, dists))[: self.k]
        return rows[order], dists[order]

    def _search_again(self, native: Any, q: np.ndarray, n: int, gated: bool
                      ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """The C search of one query again, into arrays that hold its ``n``
        candidates (only the gated 1-bit rerank returns an open-ended list):
        ``(rowids, estimates, lower bounds or None)``."""
        self._cap = cap = 1 << (n - 1).bit_length()
        r = np.empty(cap, np.uint64)
        e = np.empty(cap, np.float32)
        lb = np.empty(cap, np.float32) if gated else None
        native.search(q, self._params, r, e, lb, None)
        return r, e, lb

    def _threads(self) -> int:
        """Threads of a batch: the caller's count or every core (the C side
        starts at most 256)."""
        return int(self._num_threads or os.cpu_count() or 1)  # cpu_count is slow

    def _attached(self, Q: np.ndarray) -> Any:
        """A context in which every partition the queries ``Q`` probe is
        attached to the ranged segments searched (a no-op without any)."""
        if self._ranged is None:
            return contextlib.nullcontext()
        return self._ranged.attached(Q, self.nprobes, self._mask)

    def _scan_batch(self, native: Any, Q: np.ndarray, gated: bool
                    ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray]:
        """The C scan of a batch: ``(rowids, estimates, lower_bounds, counts)``,
        query i's candidates in the first ``counts[i]`` entries of row i of
        each (nq, width) array (lower bounds only for the gated 1-bit rerank,
        else None), the partitions the batch probes attached for the whole
        of it."""
        with self._attached(Q):
            return self._scan_batch_attached(native, Q, gated)

    def _scan_batch_attached(self, native: Any, Q: np.ndarray, gated: bool
                             ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray]:
        """:meth:`_scan_batch` once its partitions are attached. The arrays
        hold ``self._batch_cap`` candidates a query; the few queries with more
        (only the gated rerank's lists are open-ended) are scanned again, their
        counts not added twice, and the arrays widened to the longest list."""
        nq = Q.shape[0]
        cap = self._batch_cap
        r = np.empty((nq, cap), np.uint64)
        e = np.empty((nq, cap), np.float32)
        lb = np.empty((nq, cap), np.float32) if gated else None
        counts = np.empty(nq, np.uint64)
        try:
            native.search_batch_into(Q, nq, self._threads(), self._params, r, e, lb, counts,
                                     self._stats)
        except CorruptIndexError as err:
            raise self._named(err) from None
        over = np.flatnonzero(counts > cap)
        if over.size:
            Qo = np.ascontiguousarray(Q[over])
            cap2 = int(counts[over].max())
            r2 = np.empty((over.size, cap2), np.uint64)
            e2 = np.empty((over.size, cap2), np.float32)
            lb2 = np.empty((over.size, cap2), np.float32) if gated else None
            native.search_batch_into(Qo, over.size, self._threads(), self._params, r2, e2, lb2,
                                     np.empty(over.size, np.uint64), None)

            def wide(x: np.ndarray, x2: np.ndarray) -> np.ndarray:
                w = np.empty((nq, cap2), x.dtype)
                w[:, :cap] = x
                w[over] = x2
                return w

            r, e = wide(r, r2), wide(e, e2)
            if lb is not None and lb2 is not None:
                lb = wide(lb, lb2)
        return r, e, lb, counts

    def _gated(self, Q: np.ndarray, r: np.ndarray, lb: np.ndarray, counts: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The gated 1-bit rerank of scanned candidates (``_scan_batch``'s
        arrays): ``(rowids, distances, found)``, the k best exact distances
        of each query in (distance, row id) order, shape (nq, k), padded
        with NO_ROW and inf past the ``found[i]`` rows found."""
        kept, dists, reads = _rerank_gated(self.source, self.column, Q, r, lb, counts,
                                           self._mcode, self.dim, self.k)
        self._exact_reads += reads
        nq = Q.shape[0]
        out_r = np.empty((nq, self.k), np.uint64)
        out_d = np.empty((nq, self.k), np.float32)
        _native.top_k(r, dists, kept, self.k, out_r, out_d)
        return out_r, out_d, np.minimum(kept, self.k).astype(np.int64)

    def _batch(self, Q: np.ndarray) -> List[_Hits]:
        nq = Q.shape[0]
        per_query: List[_Hits] = [(np.empty(0, np.uint64), np.empty(0, np.float32))] * nq
        if self._native is not None and nq:
            gated = self.num_bits == 1 and self.refine_factor is None
            r, e, lb, n = self._scan_batch(self._native, Q, gated)
            if gated:
                assert lb is not None
                top_r, top_d, got = self._gated(Q, r, lb, n)
                per_query = [(top_r[i, :got[i]], top_d[i, :got[i]]) for i in range(nq)]
            else:
                per_query = [(r[i, :n[i]], e[i, :n[i]]) for i in range(nq)]
            if self.refine_factor is not None:
                per_query = _rerank_all(self.source, self.column, Q, per_query, self._mcode,
                                        self.dim)
        exact = self._exact_hits(Q) if self._exact is not None and nq else None
        out = []
        for qi in range(nq):
            rows, dists = per_query[qi]
            if exact is not None:
                er, ed = exact[qi]
                rows = np.concatenate([rows, er])
                dists = np.concatenate([dists, ed])
            order = np.lexsort((rows, dists))[: self.k]
            out.append((rows[order], dists[order]))
        return out


def _rerank_gated(source: Source, column: str, Q: np.ndarray, rows: np.ndarray,
                  lbs: np.ndarray, counts: np.ndarray, metric: int, dim: int, k: int
                  ) -> Tuple[np.ndarray, np.ndarray, int]:
    """Exact distances for 1-bit candidates, read in lower-bound order.

    Query i's candidates are the first ``counts[i]`` of row i of ``rows``
    (uint64 row ids) and ``lbs`` (float32 lower bounds), both (nq, width).
    Candidate j is read only if fewer than k exact distances are known or
    its lower bound is within the k-th best so far; the first candidate
    that fails ends that query. The stop point depends only on the
    candidate list, so a batch may read a few rows past it (to keep source
    reads few and large) without changing the answer: each round reads the
    next ``step`` candidates (2k, then doubling) of every query not yet
    stopped, in one ``take`` of their distinct rows, and one C call
    (``_native.rerank_gated``) computes their distances and applies the
    gate. A source that holds the column as one float32 array
    (``Source.float32_rows``) is read straight from it instead, the whole
    rerank in one C call that reads each query's candidates up to its stop
    (rounded up to 8) and checks each row against the accepted-values rule.

    Returns ``(kept, dists, reads)``: query i's answer is among its first
    ``kept[i]`` candidates, whose exact distances are ``dists[i, :kept[i]]``
    (float32, (nq, width)); ``reads`` counts the rows read from the source
    (through ``take``, a row offered to several queries of a round once;
    from an array, once per query that reads it).
    """
    nq, width = rows.shape
    counts = np.ascontiguousarray(counts, dtype=np.uint64)
    pos = np.zeros(nq, np.uint64)
    done = (counts == 0).view(np.uint8).copy()
    heaps = np.empty((nq, k), np.float32)  # max-heaps of the k best, per query
    heap_n = np.zeros(nq, np.uint64)
    dists = np.empty((nq, width), np.float32)
    direct = source.float32_rows(column)
    if direct is not None and nq:
        # Rows straight from the array, in one C call: the stop points are
        # those of the rounds below. A row id outside the array or a refused
        # value stops it, and the rounds below (take) refuse it by name.
        read, refused = _native.rerank_gated_array(metric, Q, dim, direct[0], direct[1], rows,
                                                   lbs, counts, k, pos, dists)
        if refused is None:
            return pos, dists, read
        source.take(column, np.array([refused], dtype=np.uint64))
        pos[:] = 0
    cols = np.arange(width, dtype=np.uint64)
    step = 2 * k
    reads = 0
    while not done.all():
        end = np.where(done.view(bool), pos, np.minimum(counts, pos + np.uint64(step)))
        # this round's candidates, query after query, in list order
        want = rows[(cols >= pos[:, None]) & (cols < end[:, None])]
        uniq, inverse = np.unique(want, return_inverse=True)
        vecs = np.ascontiguousarray(source.take(column, uniq), dtype=np.float32)
        reads += uniq.size
        _native.rerank_gated(metric, Q, dim, vecs, inverse.reshape(-1).astype(np.uint64), lbs,
                             counts, pos, end, k, heaps, heap_n, dists, done)
        step *= 2
    return pos, dists, reads


def _rerank_all(source: Source, column: str, Q: np.ndarray,
                per_query: List[_Hits], metric: int, dim: int) -> List[_Hits]:
    """Exact distances for every candidate, reading each row once per batch."""
    all_rows = np.concatenate([r for r, _ in per_query]) if per_query else np.empty(0, np.uint64)
    if all_rows.size == 0:
        return per_query
    uniq, inverse = np.unique(all_rows, return_inverse=True)
    vecs = np.ascontiguousarray(source.take(column, uniq), dtype=np.float32)
    out = []
    pos = 0
    for qi, (rows, _) in enumerate(per_query):
        n = rows.size
        sel = vecs[inverse[pos:pos + n]]
        pos += n
        d = np.empty(n, dtype=np.float32)
        if n:
            _native.exact_distances(metric, Q[qi], np.ascontiguousarray(sel), n, dim, d)
        out.append((rows, d))
    return out


class _ExactRows:
    """The rows of an index's plan searched exactly (uncovered rows): as many
    as ``cache_bytes`` allows held in memory, in part order, the rest
    streamed from the source on each search.

    The cache is filled on the first search (one pass that stops once the
    budget is spent) and then only read, so searchers on several threads can
    share it. A part the budget ends in is cached up to some offset; the
    stream of its rest reads the fragment again and skips the cached rows.
    """

    def __init__(self, source: Source, column: str, parts: List[ExactPart], dim: int,
                 cache_bytes: int) -> None:
        self.source = source
        self.column = column
        self.parts = list(parts)
        self.dim = dim
        self.cache_bytes = cache_bytes
        self.batch_rows = max(1, min(DEFAULT_BATCH_SIZE, EXACT_BATCH_BYTES // (4 * dim)))
        #: Rows of the parts by the fragments' metadata (live rows, or the
        #: offsets listed).
        self.num_rows = sum(source.fragment(f).num_rows if offs is None else int(offs.size)
                            for f, offs in self.parts)
        self.rows = np.empty(0, np.uint64)
        self.vecs = np.empty((0, dim), np.float32)
        #: What the cache does not hold: (fragment, offsets or None, first
        #: offset not cached).
        self.rest: List[Tuple[int, Optional[np.ndarray], int]] = [(f, o, 0) for f, o in parts]
        self._lock = threading.Lock()
        self._filled = False

    def fill(self) -> None:
        """Read the first rows into the cache, up to ``cache_bytes`` (once)."""
        if self._filled:
            return
        with self._lock:
            if self._filled:
                return
            row_bytes = 4 * self.dim + 8
            cap = min(self.num_rows, self.cache_bytes // row_bytes)
            rows = np.empty(cap, np.uint64)
            vecs = np.empty((cap, self.dim), np.float32)
            n = 0
            rest: List[Tuple[int, Optional[np.ndarray], int]] = []
            for fid, offs in self.parts:
                if n >= cap:
                    rest.append((fid, offs, 0))
                    continue
                for rid, v, o in self._read(fid, offs, 0):
                    m = min(rid.size, cap - n)
                    rows[n:n + m] = rid[:m]
                    vecs[n:n + m] = v[:m]
                    n += m
                    if m < rid.size:
                        rest.append((fid, offs, int(o[m])))
                        break
            # Views, not copies: a copy would hold the budget twice for a moment.
            self.rows, self.vecs, self.rest = rows[:n], vecs[:n], rest
            self._filled = True

    def stream(self, fragments: Set[int]) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """(row ids, float32 vectors) of the rows not cached whose fragment is
        in ``fragments``, read from the source in batches of
        ``batch_rows``."""
        for fid, offs, start in self.rest:
            if fid in fragments:
                for rid, v, _ in self._read(fid, offs, start):
                    yield rid, v

    def _read(self, fid: int, offs: Optional[np.ndarray], start: int
              ) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row ids, vectors, offsets) of a part's live rows from offset ``start``."""
        for b in self.source.iter_batches(self.column, fragment_ids=[fid],
                                          batch_size=self.batch_rows):
            o, v = b.offsets, b.vectors
            keep = o >= start if start else None
            if offs is not None:
                listed = np.isin(o, offs)
                keep = listed if keep is None else keep & listed
            if keep is not None:
                if not keep.any():
                    continue
                o, v = o[keep], v[keep]
            yield make_rowids(fid, o), v, o
