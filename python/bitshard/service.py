"""Search fanned out on Ray: ``bitshard.serve(uri, column)`` (docs/serve.md).

A service is a *front* (in the caller's process) and ``num_actors`` Ray
actors. Actor ``i`` of ``n`` searches the partitions ``p`` with
``p % n == i`` of every segment of the index (all segments share the
centroids, so a query's probes fall in every segment). The answer is the
one ``Dataset.search`` gives, bit for bit, because the front reproduces the
single search's global threshold rather than merging local top-k lists:

Two rounds per batch of queries:

1. each actor runs the C search as one *partition share*
   (``bs_search_params.share``) and returns its k smallest upper bounds per
   query, keeping for round 2 every code of its share whose lower bound is
   within its own k-th smallest upper bound (row ids, lower bounds,
   estimates: the full code's for multi-bit indexes). Its threshold is
   never below the global one (it saw fewer codes), so those codes are a
   superset of the ones one process keeps from its partitions;
2. the front takes, per query, the k-th smallest upper bound over all
   actors (one process's threshold exactly: the k smallest of a union are
   among the union of each part's k smallest) and sends it back; each actor
   returns the codes within it, and, where the front keeps only the best
   ``limit`` by (estimate, row id) (multi-bit without refine: k; with
   ``refine_factor`` r: k x r), only its own best ``limit``: the global
   best are among the union of each share's best. For the gated 1-bit
   rerank, every code within the threshold.

The front ranks them as the C search ranks (by (lower bound, row id) for the
gated 1-bit rerank, by (estimate, row id) otherwise, a repeated row id
keeping its better-ranked copy), then hands them to the same code as a
single ``Searcher``: the exact rerank from the data, the exact scan of stale
and uncovered fragments, the Table.

One round would ship every code under each actor's own threshold (at 10^6
rows, 256 partitions, nprobes 16: 7,520 a query to keep 10); the second
round costs one more Ray call per batch (docs/serve.md, "Measured"). An
actor keeps its round-1 codes of at most ``MAX_PENDING_BATCHES`` batches;
one restarted or evicted between the rounds scans the batch again (the
same codes: the search is deterministic).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from . import validate
from .dataset import DEFAULT_EPS0, Dataset, dataset
from .distributed import start_ray
from .errors import CorruptIndexError, InvalidInputError
from .indexview import IndexView, OpenIndex
from .searcher import NO_ROW, SearchOptions, Searcher, _Hits, _refuse_query

__all__ = ["serve", "Service", "DEFAULT_MAX_RESTARTS", "MAX_FRONT_SEARCHERS"]

#: How many times Ray restarts a dead actor, and retries the calls it was
#: running, before a search fails.
DEFAULT_MAX_RESTARTS = 4
#: Prepared searchers the front keeps, one per search settings (a filter's
#: are not kept: it is resolved afresh on each search); the least recently
#: used is dropped first. Each holds its plan (segments, fragments, deleted
#: rows) and, with an ``exact_cache_bytes`` argument, a cache of that size.
MAX_FRONT_SEARCHERS = 16
#: Arrays of a batch up to this size are sent inline with each actor's call.
_INLINE_BYTES = 64 << 10
#: Batches whose round-1 codes an actor keeps for round 2 (each holds the
#: codes under the actor's own threshold: about 20 bytes a code); an older
#: batch's round 2 scans again.
MAX_PENDING_BATCHES = 8


def global_thresholds(ubs: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Per query, the k-th smallest upper bound over every share's k smallest
    ((nq, k) float32 arrays, +inf padded): one process's threshold. (nq,)"""
    u = np.concatenate(list(ubs), axis=1)
    return np.partition(u, k - 1, axis=1)[:, k - 1]


def select_survivors(counts: np.ndarray, rows: np.ndarray, ests: np.ndarray,
                     lbs: np.ndarray, thresholds: np.ndarray, limit: Optional[int]
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Round 2 of one share: of its codes (query after query, ``counts[i]``
    of query i), those whose lower bound is within query i's global
    threshold; with ``limit``, only the best ``limit`` of each query by
    (estimate, row id), a repeated row id counted once (its better copy).
    Returns (counts, rows, estimates, lower bounds), query after query (by
    (estimate, row id) within a query when ``limit`` is given)."""
    nq = counts.size
    q = np.repeat(np.arange(nq), counts.astype(np.int64))
    keep = lbs <= thresholds[q]
    q, r, e, lb = q[keep], rows[keep], ests[keep], lbs[keep]
    if limit is not None and q.size:
        n = np.bincount(q, minlength=nq)
        if int(n.max()) > limit:
            # Most of a share's codes are within the global threshold: a
            # sort of them all cost more than the search (1.5 M codes a batch
            # of 200 at 10^6 rows). Per query, the limit-th smallest estimate
            # is found by partition over a padded row; the codes at or under
            # it (the best limit and their ties) are few, and only those are
            # sorted by (estimate, row id) below.
            start = np.concatenate([[0], np.cumsum(n)[:-1]])
            col = np.arange(q.size) - start[q]
            E = np.full((nq, int(n.max())), np.inf, np.float32)
            E[q, col] = e
            cut = np.partition(E, limit - 1, axis=1)[:, limit - 1]
            near = e <= cut[q]
            q, r, e, lb = q[near], r[near], e[near], lb[near]
        order = np.lexsort((r, e, q))
        q, r, e, lb = q[order], r[order], e[order], lb[order]
        by_row = np.lexsort((np.arange(q.size), r, q))
        same = (q[by_row][1:] == q[by_row][:-1]) & (r[by_row][1:] == r[by_row][:-1])
        if same.any():
            # a row id twice in a query (only a crafted file has one in two
            # partitions): its later copies do not count, and the codes past
            # the cut may be needed after all: select from every code again
            return _select_all(counts, rows, ests, lbs, thresholds, limit)
        rank = np.arange(q.size) - np.searchsorted(q, q, "left")
        keep = rank < limit
        q, r, e, lb = q[keep], r[keep], e[keep], lb[keep]
    return np.bincount(q, minlength=nq).astype(np.int64), r, e, lb


def _select_all(counts: np.ndarray, rows: np.ndarray, ests: np.ndarray, lbs: np.ndarray,
                thresholds: np.ndarray, limit: int
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`select_survivors` by one sort of every code within the
    thresholds, repeated row ids dropped after their better copy."""
    nq = counts.size
    q = np.repeat(np.arange(nq), counts.astype(np.int64))
    keep = lbs <= thresholds[q]
    q, r, e, lb = q[keep], rows[keep], ests[keep], lbs[keep]
    order = np.lexsort((r, e, q))
    q, r, e, lb = q[order], r[order], e[order], lb[order]
    by_row = np.lexsort((np.arange(q.size), r, q))
    same = (q[by_row][1:] == q[by_row][:-1]) & (r[by_row][1:] == r[by_row][:-1])
    dup = np.zeros(q.size, bool)
    dup[by_row[1:][same]] = True
    q, r, e, lb = q[~dup], r[~dup], e[~dup], lb[~dup]
    keep = np.arange(q.size) - np.searchsorted(q, q, "left") < limit
    q, r, e, lb = q[keep], r[keep], e[keep], lb[keep]
    return np.bincount(q, minlength=nq).astype(np.int64), r, e, lb


def _ray() -> Any:
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise InvalidInputError("bitshard.serve needs Ray: pip install 'bitshard[ray]'") from None
    return ray


def share_mask(num_partitions: int, share: int, num_shares: int) -> np.ndarray:
    """The partition flags (uint8, one per partition) of share ``share`` of
    ``num_shares``: partition p belongs to share p % num_shares."""
    return (np.arange(num_partitions) % num_shares == share).astype(np.uint8)


class _FrontView(IndexView):
    """The front's view of the indexes: a Dataset's own (the plan needs the
    segments' fragment fingerprints, so the segments are opened as a
    Dataset opens them: mapped, or their prefix read by range), but the
    front never scans a partition: its actors do."""


class _Remote:
    """Stands for the C searcher in a front Searcher: the scan is the actors'."""


def _merge_shares(k: int, ubs: List[np.ndarray], rows: List[np.ndarray],
                  ests: List[np.ndarray], lbs: List[np.ndarray], by_lb: bool,
                  limit: Optional[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query's candidates from its shares' answers, as the single C search
    returns them: the codes whose lower bound is within the k-th smallest of
    every share's upper bounds (+inf padded, so fewer than k codes in all give
    +inf), sorted by (lower bound or estimate, row id), a repeated row id
    dropped after its first (better-ranked) copy, then the first ``limit``
    (None: all). Returns (row ids, estimates, lower bounds)."""
    ub = np.concatenate(ubs)
    t = np.partition(ub, k - 1)[k - 1]
    r = np.concatenate(rows)
    e = np.concatenate(ests)
    lb = np.concatenate(lbs)
    keep = lb <= t
    if not keep.all():
        r, e, lb = r[keep], e[keep], lb[keep]
    order = np.lexsort((r, lb if by_lb else e))
    r, e, lb = r[order], e[order], lb[order]
    _, first = np.unique(r, return_index=True)
    if first.size < r.size:  # only a crafted file holds a row in two partitions
        first.sort()
        r, e, lb = r[first], e[first], lb[first]
    if limit is not None:
        r, e, lb = r[:limit], e[:limit], lb[:limit]
    return r, e, lb


class _FrontSearcher(Searcher):
    """A Searcher whose scan is the actors' (see the module docstring); the
    rest (query checks, rerank, exact scan of uncovered and stale rows, the
    final order) is the single-process Searcher's own code."""

    def __init__(self, view: IndexView, column: str, options: SearchOptions,
                 service: "Service") -> None:
        super().__init__(view, column, options)
        self._service = service
        #: The settings the actors search with: the filter is resolved here
        #: once and sent as its allowed rows.
        self._actor_options = {
            "k": self.k, "nprobes": self.nprobes, "refine_factor": self.refine_factor,
            "index": self.index_name, "fragment_ids": options.fragment_ids,
            "fast_search": bool(options.fast_search), "eps0": self.eps0,
            "num_threads": self._num_threads}
        self._ranged = None  # the front attaches no partition
        self._native = _Remote() if self._params[4].any() else None

    def _one(self, q: np.ndarray) -> _Hits:
        bad = validate.first_refused_value(q[None, :])
        if bad is not None:
            _refuse_query(q[None, :], 0, bad[1], "query")
        return self._batch(q[None, :])[0]

    def _scan_batch(self, native: Any, Q: np.ndarray, gated: bool
                    ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray]:
        """The actors' candidates merged per query into the arrays the local
        scan returns (``Searcher._scan_batch``): query i's in the first
        ``counts[i]`` entries of row i, padded past them."""
        if self.refine_factor is not None:
            limit: Optional[int] = self.k * self.refine_factor
        else:
            limit = self.k if self.num_bits > 1 else None
        answers = self._service._scan(Q, self._actor_options, self._allowed_rows, self.k,
                                      None if gated else limit)
        nq = Q.shape[0]
        rows, ests, lbs = [], [], []
        splits = [np.cumsum(a[1])[:-1] for a in answers]
        per = [(np.split(a[2], s), np.split(a[3], s), np.split(a[4], s))
               for a, s in zip(answers, splits)]
        for qi in range(nq):
            r, e, lb = _merge_shares(self.k, [a[0][qi] for a in answers],
                                     [p[0][qi] for p in per], [p[1][qi] for p in per],
                                     [p[2][qi] for p in per], gated, limit)
            rows.append(r)
            ests.append(e)
            lbs.append(lb)
        counts = np.array([x.size for x in rows], dtype=np.uint64)
        width = max(1, int(counts.max())) if nq else 1
        r_arr = np.full((nq, width), NO_ROW, dtype=np.uint64)
        e_arr = np.full((nq, width), np.inf, dtype=np.float32)
        lb_arr = np.full((nq, width), np.inf, dtype=np.float32) if gated else None
        for qi in range(nq):
            n = rows[qi].size
            r_arr[qi, :n] = rows[qi]
            e_arr[qi, :n] = ests[qi]
            if lb_arr is not None:
                lb_arr[qi, :n] = lbs[qi]
        return r_arr, e_arr, lb_arr, counts


class _ShareActor:
    """One partition share of the index (a Ray actor; see :func:`serve`)."""

    def __init__(self, share: int, num_shares: int) -> None:
        self.share, self.num_shares = share, num_shares
        self._epoch = -1
        self._ds: Optional[Dataset] = None
        self._masks: Dict[str, np.ndarray] = {}
        self._caps: Dict[Any, int] = {}
        #: Round-1 codes by batch token, oldest first (MAX_PENDING_BATCHES).
        self._pending: "OrderedDict[str, Tuple[np.ndarray, ...]]" = OrderedDict()

    def pid(self) -> int:
        """This actor's process id (the tests kill it)."""
        return os.getpid()

    def _load(self, epoch: int, state: Any) -> None:
        blob = state[0]
        if not isinstance(blob, bytes):  # an object ref (bytes: a test's in-process actor)
            blob = _ray().get(blob)
        ds, versions = pickle.loads(blob)
        ds._indexes.pin(versions)
        self._ds, self._epoch = ds, epoch
        self._masks.clear()
        self._caps.clear()

    def thresholds(self, token: str, epoch: int, state: List[Any], column: str,
                   options: Dict[str, Any], allowed_rows: Optional[np.ndarray],
                   Q: np.ndarray) -> np.ndarray:
        """Round 1: this share's k smallest upper bounds (nq, k) of the
        queries ``Q``; its codes are kept under ``token`` for round 2."""
        ubs, *codes = self.scan(epoch, state, column, options, allowed_rows, Q)
        self._pending[token] = tuple(codes)
        while len(self._pending) > MAX_PENDING_BATCHES:
            self._pending.popitem(last=False)
        return ubs

    def survivors(self, token: str, thresholds: np.ndarray, limit: Optional[int],
                  epoch: int, state: List[Any], column: str, options: Dict[str, Any],
                  allowed_rows: Optional[np.ndarray], Q: np.ndarray
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Round 2: this share's codes of batch ``token`` within the global
        ``thresholds`` (nq,), the best ``limit`` of each query when given
        (:func:`select_survivors`). An actor that no longer holds the batch
        (restarted, or the batch evicted) scans it again from the same
        arguments as round 1."""
        codes = self._pending.pop(token, None)
        if codes is None:
            codes = tuple(self.scan(epoch, state, column, options, allowed_rows, Q)[1:])
        counts, rows, ests, lbs = codes
        return select_survivors(counts, rows, ests, lbs, thresholds, limit)

    def scan(self, epoch: int, state: List[Any], column: str, options: Dict[str, Any],
             allowed_rows: Optional[np.ndarray], Q: np.ndarray
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """This share's answer to the queries ``Q`` (nq, d) float32: (upper
        bounds (nq, k), candidate counts (nq,), then the candidates' row ids,
        estimates and lower bounds, query after query). ``state`` is ``[ref]``
        of the pickled (Dataset, pinned versions) of service epoch ``epoch``,
        loaded when this actor has another (first call, refresh, restart)."""
        if epoch != self._epoch:
            self._load(epoch, state)
        assert self._ds is not None
        view = self._ds._indexes
        with warnings.catch_warnings():
            # the front warns about uncovered rows; they are its to scan
            warnings.simplefilter("ignore")
            s = view.searcher(column, SearchOptions(filter=None, exact_cache_bytes=0,
                                                    **options))
        name = s.index_name
        mask = self._masks.get(name)
        opened = view.open(name)
        if mask is None:
            nparts = int(opened.opened[0].info["num_partitions"])
            mask = self._masks[name] = share_mask(nparts, self.share, self.num_shares)
        p = s._params
        params = (p[0], p[1], p[2], p[3], p[4],
                  allowed_rows if allowed_rows is not None else p[5], p[6], p[7], mask, True)
        nq, k = Q.shape[0], s.k
        key = (name, k)
        cap = self._caps.get(key, max(256, 16 * k))
        native = opened.native
        threads = s._threads()
        with self._attached(opened, s, mask, Q):
            return self._search(s, native, params, Q, nq, k, cap, key, threads)

    @staticmethod
    def _attached(opened: OpenIndex, s: Searcher, mask: np.ndarray, Q: np.ndarray) -> Any:
        """Segments read by range (an object store without a cache_dir):
        the partitions of this share that the queries probe, attached for the
        search (the rest of the probes are other actors'); a no-op for
        segments opened whole."""
        ranged = opened.ranged
        if ranged is None:
            return contextlib.nullcontext()
        parts = [int(p) for p in ranged.probes(Q, s.nprobes) if mask[p]]
        wants = [(seg, parts) for i, seg in enumerate(ranged.segments)
                 if seg is not None and s._params[4][i]]
        return ranged.cache.pinned(wants)

    def _search(self, s: Searcher, native: Any, params: Tuple[Any, ...], Q: np.ndarray,
                nq: int, k: int, cap: int, key: Any, threads: int
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        while True:
            r = np.empty((nq, cap), np.uint64)
            e = np.empty((nq, cap), np.float32)
            lb = np.empty((nq, cap), np.float32)
            counts = np.empty(nq, np.uint64)
            ubs = np.empty((nq, k), np.float32)
            try:
                native.search_batch_into(Q, nq, threads, params, r, e, lb, counts, None, ubs)
            except CorruptIndexError as err:
                raise s._named(err) from None
            most = int(counts.max()) if nq else 0
            if most <= cap:
                break
            # a share's list is open-ended: scan again with room for all
            cap = self._caps[key] = 1 << (most - 1).bit_length()
        n = counts.astype(np.int64)
        take = np.arange(cap)[None, :] < n[:, None]
        return ubs, n, r[take], e[take], lb[take]

    def memory(self) -> Dict[str, Any]:
        """What this actor holds: resident bytes of its process, the bytes of
        the segment files it has open (mapped or downloaded whole; for a segment
        read by range, its prefix), the bytes of partitions fetched by range it
        holds, and the Ray node it runs on."""
        rss = 0
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
        opened = cached = 0
        if self._ds is not None:
            view = self._ds._indexes
            for o in list(view._open.values()):
                opened += sum(int(s.ranged.prefix_bytes if s.ranged is not None else s.size)
                              for s in o.opened)
            cached = int(view.partition_cache.stats()["bytes"])
        return {"rss_bytes": rss, "segment_bytes": opened, "partition_cache_bytes": cached,
                "node_id": _ray().get_runtime_context().get_node_id()}


class Service:
    """A search service: a front in this process and Ray actors holding the
    partition shares of one index. Made by :func:`serve`; see docs/serve.md.

    ``search`` takes the query arguments of :meth:`bitshard.Dataset.search`
    and returns the same Table, bit for bit. The index version (and the
    source version) are pinned when the service starts; :meth:`refresh`
    moves to the newest committed ones. Safe to call from several threads.
    """

    def __init__(self, ds: Dataset, column: str, index: Optional[str], num_actors: int,
                 num_cpus: float, num_threads: Optional[int], max_restarts: int,
                 started_ray: bool, reopen: Any) -> None:
        ray = _ray()
        self.column = column
        self.num_actors = num_actors
        self._index_arg = index
        self._reopen = reopen
        self._started_ray = started_ray
        self._lock = threading.Lock()
        self._epoch = 0
        self._closed = False
        self._threads = num_threads
        self.last_rounds: Dict[str, Any] = {}
        self._pin(ds)
        # Actor i goes to alive node i mod nodes, so that each node holds
        # its share(s) of the index; soft, so that an actor whose node is
        # gone is restarted elsewhere.
        from ray.util.scheduling_strategies import (  # noqa: PLC0415
            NodeAffinitySchedulingStrategy)

        nodes = sorted(n["NodeID"] for n in ray.nodes()
                       if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
        remote = ray.remote(_ShareActor)
        self._actors = [remote.options(
            num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=max_restarts,
            scheduling_strategy=(NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True)
                                 if nodes else "SPREAD")).remote(i, num_actors)
            for i in range(num_actors)]

    def _pin(self, ds: Dataset) -> None:
        """Pin ``ds``'s newest committed index versions and source version as
        the service's state (a new epoch the actors load at their next call)."""
        ray = _ray()
        view = _FrontView(ds.storage, ds.source, ds.index_root)
        view.set_exact_cache_bytes(ds.exact_cache_bytes)
        versions = view.versions()
        name = view.resolve(self.column, self._index_arg)
        state = [ray.put(pickle.dumps((ds, versions)))]
        with self._lock:
            self._ds, self._view = ds, view
            self._epoch += 1
            self._state = state
            #: Prepared front searchers by settings, least recently used
            #: first (at most MAX_FRONT_SEARCHERS).
            self._searchers: "OrderedDict[Any, _FrontSearcher]" = OrderedDict()
            #: The index searched and its pinned version.
            self.index_name = name
            self.index_version = versions[name][0]

    def refresh(self) -> "Service":
        """Move to the newest committed version of the index (and of the
        source, reopened by its URI); searches already running finish on the
        old one. Returns self."""
        self._check_open()
        self._pin(self._reopen())
        return self

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError("this bitshard service is closed")

    def _scan(self, Q: np.ndarray, options: Dict[str, Any], allowed_rows: Optional[np.ndarray],
              k: int, limit: Optional[int]) -> List[Tuple[np.ndarray, ...]]:
        """Every actor's share answer to ``Q`` in two rounds (the module
        docstring): (its k smallest upper bounds, then its codes within the
        global thresholds as :func:`select_survivors` gives them). A call
        whose actor died is retried by Ray on the restarted actor."""
        ray = _ray()
        with self._lock:
            epoch, state = self._epoch, self._state
        opts = dict(options)
        if opts.get("num_threads") is None:
            opts["num_threads"] = self._threads
        # Large arrays go to the object store once for all actors; small
        # ones travel inline with each call (a put costs more than copying).
        def arg(v: Any) -> Any:
            big = isinstance(v, np.ndarray) and v.nbytes > _INLINE_BYTES
            return ray.put(v) if big and len(self._actors) > 1 else v

        Q_arg, rows_arg = arg(Q), arg(allowed_rows)
        token = uuid.uuid4().hex
        t0 = time.perf_counter()
        ubs = ray.get([a.thresholds.remote(token, epoch, state, self.column, opts, rows_arg,
                                           Q_arg) for a in self._actors])
        t = global_thresholds(ubs, k)
        t1 = time.perf_counter()
        codes = ray.get([a.survivors.remote(token, t, limit, epoch, state, self.column, opts,
                                            rows_arg, Q_arg) for a in self._actors])
        #: The last batch's rounds: seconds of each and codes round 2 shipped
        #: (bench/serve.py reads them; a concurrent search may overwrite).
        self.last_rounds = {"round1_s": t1 - t0, "round2_s": time.perf_counter() - t1,
                            "codes_shipped": int(sum(int(c[0].sum()) for c in codes))}
        return [(u, *c) for u, c in zip(ubs, codes)]

    def search(
        self,
        q: Any,
        k: int = 10,
        nprobes: int = 20,
        refine_factor: Optional[int] = None,
        columns: Optional[Sequence[str]] = None,
        *,
        fragment_ids: Optional[Sequence[int]] = None,
        filter: Any = None,
        fast_search: bool = False,
        eps0: float = DEFAULT_EPS0,
        num_threads: Optional[int] = None,
        exact_cache_bytes: Optional[int] = None,
    ) -> pa.Table:
        """Nearest neighbours of ``q`` (one query (d,) or a batch (nq, d)):
        the arguments and the Table of :meth:`bitshard.Dataset.search` (the
        index is the service's). ``num_threads`` is each actor's thread count
        for the batch (default: the service's)."""
        self._check_open()
        options = SearchOptions.from_arguments(dict(locals(), index=self.index_name)).checked()
        key = options.cache_key()
        with self._lock:
            ds, view, searchers = self._ds, self._view, self._searchers
            s = searchers.get(key) if key is not None else None
            if s is not None:
                searchers.move_to_end(key)
        if s is None:
            s = _FrontSearcher(view, self.column, options, self)
            if key is not None:
                with self._lock:
                    if searchers is self._searchers:  # not refreshed meanwhile
                        searchers[key] = s
                        while len(searchers) > MAX_FRONT_SEARCHERS:
                            searchers.popitem(last=False)
        q_arr = np.asarray(q)
        return ds._hits_table(s.search_lists(q_arr), q_arr.ndim, columns)

    def memory(self) -> List[Dict[str, Any]]:
        """Per actor: ``rss_bytes`` (its process's resident memory),
        ``segment_bytes`` (the segment files it has open),
        ``partition_cache_bytes`` (partitions fetched by range it holds: its
        share's only) and ``node_id`` (its Ray node)."""
        self._check_open()
        ray = _ray()
        return list(ray.get([a.memory.remote() for a in self._actors]))

    def actor_pids(self) -> List[int]:
        """The process id of each actor (for monitoring and the tests)."""
        ray = _ray()
        return list(ray.get([a.pid.remote() for a in self._actors]))

    def close(self) -> None:
        """Stop the actors (and Ray, when :func:`serve` started it)."""
        if self._closed:
            return
        self._closed = True
        ray = _ray()
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(
    uri: Union[str, os.PathLike, Dataset],
    column: str,
    index: Optional[str] = None,
    num_actors: Optional[int] = None,
    *,
    index_uri: Optional[Union[str, os.PathLike]] = None,
    storage_options: Optional[Dict[str, Any]] = None,
    num_cpus: float = 1.0,
    num_threads: Optional[int] = None,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    exact_cache_bytes: Optional[int] = None,
) -> Service:
    """Serve searches of one index from Ray actors, each holding a share of
    its partitions (docs/serve.md).

    Uses the Ray cluster this process is connected to, or starts a local one
    (stopped by :meth:`Service.close`).

    Args:
        uri: the dataset (what :func:`bitshard.dataset` opens, a path all
            nodes can read), or a :class:`bitshard.Dataset`.
        column: the indexed vector column.
        index: the index name when the column has several.
        num_actors: actors (partition shares); default one per alive Ray node.
        index_uri, storage_options: as :func:`bitshard.dataset` (ignored when
            ``uri`` is a Dataset).
        num_cpus: Ray CPUs each actor requests (fractions allowed).
        num_threads: threads each actor scans a batch with (default:
            ``ceil(num_cpus)``); the answer does not depend on it.
        max_restarts: how many times Ray restarts an actor that died (its
            calls are retried on the restarted actor).
        exact_cache_bytes: as :func:`bitshard.dataset`, for the rows the
            front searches exactly (default: the Dataset's).

    Returns:
        A :class:`Service`; ``close()`` it (or use it as a context manager).
    """
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or \
            not 0 < num_cpus < math.inf:
        raise InvalidInputError(f"num_cpus must be a finite number > 0, got {num_cpus!r}")
    num_cpus = float(num_cpus)
    if num_actors is not None:
        num_actors = validate.integer("num_actors", num_actors, 1)
    max_restarts = validate.integer("max_restarts", max_restarts, 0)
    if num_threads is not None:
        num_threads = validate.thread_count(num_threads)
    opts: Dict[str, Any] = {}
    if exact_cache_bytes is not None:
        opts["exact_cache_bytes"] = validate.integer("exact_cache_bytes", exact_cache_bytes, 0)
    if isinstance(uri, Dataset):
        ds = uri
        if exact_cache_bytes is not None:
            ds.exact_cache_bytes = opts["exact_cache_bytes"]
        src_uri, root, sopts = ds.source.uri, ds.index_root, ds.storage_options

        def reopen() -> Dataset:
            if src_uri is None:  # an in-memory source: only the indexes move
                ds.refresh()
                return ds
            return dataset(src_uri, index_uri=root, storage_options=sopts,
                           exact_cache_bytes=ds.exact_cache_bytes)
    else:
        def reopen() -> Dataset:
            return dataset(uri, index_uri=index_uri, storage_options=storage_options, **opts)
        ds = reopen()
    ray = _ray()
    started = False
    if not ray.is_initialized():
        start_ray(ray, None)
        started = True
    try:
        if num_actors is None:
            num_actors = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
        threads = num_threads if num_threads is not None else max(1, math.ceil(num_cpus))
        return Service(ds, column, index, num_actors, num_cpus, threads, max_restarts,
                       started, reopen)
    except BaseException:
        if started:
            ray.shutdown()
        raise
