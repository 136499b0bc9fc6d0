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

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from . import _native
from .artifacts import METRICS
from . import validate
from .errors import InvalidInputError
from .sources import Source

if TYPE_CHECKING:
    from .indexview import IndexView, OpenIndex, SearchPlan

__all__ = ["Searcher", "SearchOptions", "NO_ROW"]

#: Row id that pads a result with fewer than k rows (its distance is +inf).
NO_ROW = np.uint64(np.iinfo(np.uint64).max)

_Hits = Tuple[np.ndarray, np.ndarray]  # (rowids uint64, distances float32)


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

    def checked(self) -> "SearchOptions":
        """These settings checked by their rules (validate.search_settings)
        and normalised: integers as ``int``, fragment_ids as a list."""
        s = validate.search_settings(self.k, self.nprobes, self.refine_factor, self.eps0,
                                     self.num_threads, self.fragment_ids)
        return dataclasses.replace(
            self, k=s.k, nprobes=s.nprobes, refine_factor=s.refine_factor, eps0=s.eps0,
            num_threads=s.num_threads, fragment_ids=s.fragment_ids)

    def cache_key(self) -> Optional[Tuple[Any, ...]]:
        """A hashable key of checked settings, to reuse a prepared searcher;
        None with a filter (resolved afresh on each search) or an index
        argument that is not hashable (left for the index lookup to refuse)."""
        if self.filter is not None:
            return None
        try:
            key = (self.index, self.k, self.nprobes, self.refine_factor,
                   None if self.fragment_ids is None else tuple(self.fragment_ids),
                   bool(self.fast_search), self.eps0, self.num_threads)
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


class Searcher:
    """A search of one index with fixed settings, ready for many queries.

    Made by :meth:`bitshard.Dataset.searcher`. The index version, the source's
    deleted rows and the rows a ``filter`` allows are read when the searcher is
    made; a searcher keeps answering from that snapshot (make a new one, after
    ``ds.refresh()``, to see later commits). Fragments no segment covers, and
    stale ones (their data changed since they were encoded), are scanned
    exactly unless ``fast_search``; their vectors are read on the first
    search and held by the searcher.

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
        wanted, mask, allowed_frags, uncovered = self._fragments(index, plan, options)
        allowed_rows = None
        if options.filter is not None:
            allowed_rows = np.ascontiguousarray(
                np.sort(self.source.filter_rowids(options.filter, sorted(wanted))),
                dtype=np.uint64)
        self._allowed_rows = allowed_rows
        self._uncovered = list(uncovered)
        self._exact: Optional[_ExactScan] = None
        self.metric: str = index.doc.get("metric", "l2")
        self._mcode = METRICS[self.metric]
        self.num_bits = int(index.doc.get("num_bits", 1))
        self.dim = self.source.vector_dim(column)
        self._native = index.native if index.native is not None and mask.any() else None
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

    @staticmethod
    def _fragments(index: "OpenIndex", plan: "SearchPlan", options: SearchOptions
                   ) -> Tuple[Set[int], np.ndarray, Optional[np.ndarray], List[int]]:
        """The fragments searched: (their ids, the segment mask, the fragment
        allow-list for the C search, those scanned exactly)."""
        # Stale fragments (data changed since encoded) are never answered
        # from codes: scanned exactly like uncovered ones, or skipped by
        # fast_search.
        if options.fragment_ids is None:
            uncovered = [] if options.fast_search else plan.exact
            return plan.source_fragments, plan.segment_mask, plan.allowed_fragments, uncovered
        wanted = set(options.fragment_ids)
        unknown = wanted - plan.source_fragments
        if unknown:
            raise InvalidInputError(f"fragment {min(unknown)} is not in the source")
        mask = np.array([any(f in wanted and f in plan.covered for f in h.fragment_ids)
                         for h in index.handles], dtype=np.uint8)
        uncovered = [] if options.fast_search else sorted(wanted - plan.covered)
        return wanted, mask, np.array(sorted(wanted - set(plan.stale)), dtype=np.uint64), \
            uncovered

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
        if (a.ndim == 2 and self._native is not None and self.num_bits > 1
                and self.refine_factor is None and not self._uncovered):
            # The scan's answer is final (the k best estimates, in order):
            # the C batch writes it straight into the output.
            Q = self._check(a)
            nq = Q.shape[0]
            out_r = np.full((nq, self.k), NO_ROW, dtype=np.uint64)
            out_d = np.full((nq, self.k), np.inf, dtype=np.float32)
            counts = np.empty(nq, dtype=np.uint64)
            self._native.search_batch_into(Q, nq, self._threads(), self._params, out_r, out_d,
                                           None, counts, self._stats)
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

    def _exact_scan(self) -> Optional["_ExactScan"]:
        if self._uncovered and self._exact is None:
            self._exact = _ExactScan(self.source, self.column, self._uncovered,
                                     self._allowed_rows, self._mcode, self.dim)
        return self._exact

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
            n = self._native.search(q, self._params, r, e, lb, self._stats)
            if n > cap:
                # only the gated 1-bit rerank returns an open-ended list
                self._cap = cap = 1 << (n - 1).bit_length()
                r = np.empty(cap, np.uint64)
                e = np.empty(cap, np.float32)
                lb = np.empty(cap, np.float32) if gated else None
                self._native.search(q, self._params, r, e, lb, None)
            rows, dists = r[:n], e[:n]
            if self.refine_factor is not None:
                rows, dists = _rerank_all(self.source, self.column, q[None, :],
                                          [(rows, dists)], self._mcode, self.dim)[0]
            elif lb is not None:
                got, reads = _rerank_gated(self.source, self.column, q[None, :],
                                           [(rows, dists)], [lb[:n]], self._mcode, self.dim,
                                           self.k)
                rows, dists = got[0]
                self._exact_reads += reads
            else:
                # already the k best estimates in (estimate, row id) order
                if self._exact_scan() is None:
                    return rows, dists
        exact = self._exact_scan()
        if exact is not None:
            er, ed = exact.search(q, self.k)
            rows = np.concatenate([rows, er])
            dists = np.concatenate([dists, ed])
        order = np.lexsort((rows, dists))[: self.k]
        return rows[order], dists[order]

    def _threads(self) -> int:
        """Threads of a batch: the caller's count or every core (the C side
        starts at most 256)."""
        return int(self._num_threads or os.cpu_count() or 1)  # cpu_count is slow

    def _scan_batch(self, native: Any, Q: np.ndarray, gated: bool
                    ) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
        """The C scan of a batch: per query its candidates' row ids, estimates
        and (gated 1-bit rerank) lower bounds, each list complete. The arrays
        hold ``self._batch_cap`` candidates a query; the few queries with more
        (only the gated rerank's lists are open-ended) are scanned again into
        arrays long enough, their counts not added twice."""
        nq = Q.shape[0]
        cap = self._batch_cap
        r = np.empty((nq, cap), np.uint64)
        e = np.empty((nq, cap), np.float32)
        lb = np.empty((nq, cap), np.float32) if gated else None
        counts = np.empty(nq, np.uint64)
        native.search_batch_into(Q, nq, self._threads(), self._params, r, e, lb, counts,
                                 self._stats)
        n = counts.astype(np.int64)
        rows = [r[i, :min(n[i], cap)] for i in range(nq)]
        ests = [e[i, :min(n[i], cap)] for i in range(nq)]
        lbs = [lb[i, :min(n[i], cap)] for i in range(nq)] if lb is not None else []
        over = np.flatnonzero(n > cap)
        if over.size:
            Qo = np.ascontiguousarray(Q[over])
            cap2 = int(n[over].max())
            r2 = np.empty((over.size, cap2), np.uint64)
            e2 = np.empty((over.size, cap2), np.float32)
            lb2 = np.empty((over.size, cap2), np.float32) if gated else None
            native.search_batch_into(Qo, over.size, self._threads(), self._params, r2, e2, lb2,
                                     np.empty(over.size, np.uint64), None)
            for j, qi in enumerate(over):
                rows[qi], ests[qi] = r2[j, :n[qi]], e2[j, :n[qi]]
                if lb2 is not None:
                    lbs[qi] = lb2[j, :n[qi]]
        return rows, ests, lbs

    def _batch(self, Q: np.ndarray) -> List[_Hits]:
        nq = Q.shape[0]
        per_query: List[_Hits] = [(np.empty(0, np.uint64), np.empty(0, np.float32))] * nq
        if self._native is not None and nq:
            gated = self.num_bits == 1 and self.refine_factor is None
            found, ests, lbs = self._scan_batch(self._native, Q, gated)
            per_query = list(zip(found, ests))
            if self.refine_factor is not None:
                per_query = _rerank_all(self.source, self.column, Q, per_query, self._mcode,
                                        self.dim)
            elif gated:
                per_query, reads = _rerank_gated(self.source, self.column, Q, per_query, lbs,
                                                 self._mcode, self.dim, self.k)
                self._exact_reads += reads
        exact = self._exact_scan()
        out = []
        for qi in range(nq):
            rows, dists = per_query[qi]
            if exact is not None:
                er, ed = exact.search(Q[qi], self.k)
                rows = np.concatenate([rows, er])
                dists = np.concatenate([dists, ed])
            order = np.lexsort((rows, dists))[: self.k]
            out.append((rows[order], dists[order]))
        return out


def _rerank_gated(source: Source, column: str, Q: np.ndarray,
                  per_query: List[_Hits], lbs: List[np.ndarray],
                  metric: int, dim: int, k: int) -> Tuple[List[_Hits], int]:
    """Exact distances for 1-bit candidates, read in lower-bound order.

    Candidate i is read only if fewer than k exact distances are known or its
    lower bound is within the k-th best so far; the first candidate that fails
    ends that query. The stop point depends only on the candidate list, so a
    batch may read a few rows past it (to keep source reads few and large)
    without changing the answer.
    """
    nq = len(per_query)
    done = [rows.size == 0 for rows, _ in per_query]
    pos = [0] * nq
    kept_rows: List[List[np.ndarray]] = [[] for _ in range(nq)]
    kept_d: List[List[np.ndarray]] = [[] for _ in range(nq)]
    heaps = np.zeros((nq, k), dtype=np.float32)  # max-heaps of the k best, per query
    heap_n = [0] * nq
    step = 2 * k
    reads = 0
    while not all(done):
        want = []
        for qi in range(nq):
            if not done[qi]:
                rows = per_query[qi][0]
                want.append((qi, pos[qi], min(rows.size, pos[qi] + step)))
        all_rows = np.concatenate([per_query[qi][0][a:b] for qi, a, b in want])
        uniq, inverse = np.unique(all_rows, return_inverse=True)
        vecs = np.ascontiguousarray(source.take(column, uniq), dtype=np.float32)
        reads += uniq.size
        at = 0
        for qi, a, b in want:
            n = b - a
            sel = np.ascontiguousarray(vecs[inverse[at:at + n]])
            at += n
            d = np.empty(n, dtype=np.float32)
            _native.exact_distances(metric, Q[qi], sel, n, dim, d)
            stop, heap_n[qi] = _native.rerank_gate(
                np.ascontiguousarray(lbs[qi][a:b]), d, heaps[qi], heap_n[qi], k)
            kept_rows[qi].append(per_query[qi][0][a:a + stop])
            kept_d[qi].append(d[:stop])
            pos[qi] = a + stop
            if stop < n or b >= per_query[qi][0].size:
                done[qi] = True
        step *= 2
    out = []
    for qi in range(nq):
        if kept_rows[qi]:
            out.append((np.concatenate(kept_rows[qi]), np.concatenate(kept_d[qi])))
        else:
            out.append(per_query[qi])
    return out, reads


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


class _ExactScan:
    """Exact search over fragments that no segment covers (their vectors held
    in memory by the searcher, read once)."""

    def __init__(self, source: Source, column: str, fragments: List[int],
                 allowed_rows: Optional[np.ndarray], metric: int, dim: int) -> None:
        rows, vecs = [], []
        for b in source.iter_batches(column, fragment_ids=fragments):
            rid = (np.uint64(b.fragment_id) << np.uint64(32)) | b.offsets.astype(np.uint64)
            v = b.vectors
            if allowed_rows is not None:
                keep = np.isin(rid, allowed_rows)
                rid, v = rid[keep], v[keep]
            rows.append(rid)
            vecs.append(v)
        self.rows = np.concatenate(rows) if rows else np.empty(0, np.uint64)
        self.vecs = np.ascontiguousarray(
            np.concatenate(vecs) if vecs else np.empty((0, dim), np.float32), dtype=np.float32)
        self.metric = metric
        self.dim = dim

    def search(self, q: np.ndarray, k: int) -> _Hits:
        n = self.rows.size
        if n == 0:
            return self.rows, np.empty(0, np.float32)
        d = np.empty(n, dtype=np.float32)
        _native.exact_distances(self.metric, q, self.vecs, n, self.dim, d)
        order = np.lexsort((self.rows, d))[:k]
        return self.rows[order], d[order]
