"""A day in the life of a living dataset (issue 12): the index follows the
data through appends, deletes and a compaction.

    python -m bench.living [--rows 1000000] [--dim 64] [--out bench/results/living.json]

One run, one process, in this order, on a synthetic clustered Lance dataset:

1. ``build``: write ``--rows`` rows, ``create_index``;
2. ``appends``: 20 commits of ``--rows / 200`` rows each (10% in all),
   nothing re-indexed (the new rows are searched exactly);
3. ``delete``: 5% of all rows (every 20th id);
4. ``compact``: pylance's ``compact_files`` with
   ``materialize_deletions_threshold=0.01`` (``--materialize-threshold``), so
   every fragment with deletions is rewritten and every covered row moves;
5. ``optimize``: ``ds.optimize_indices()``;
6. ``fresh``: a fresh build over the compacted dataset with the index's own
   rotation and centroids and the same segment layout (uuids, fragments).

After each step: the step's wall time, the vectors bitshard read from the
source during it (``LanceSource.take`` and ``iter_batches`` counted), the
rows it encoded, the process's peak RSS during the step (VmHWM, reset before
each step through ``/proc/self/clear_refs``), and a search at a fixed setting
(k = 10, ``--nprobes``, no refine): recall@10 against exact neighbours of
the live rows (the queries as one batch), single-thread QPS (median of 3
runs, each at least 1 s of single queries in turn, prepared searcher), the
search's peak RSS and the rows no segment covers. At the end it checks
whether the optimized index's answers and segment bytes equal the fresh
build's, and compares the upkeep's time with the fresh build's (which
encodes every row again).

The 1-minute load average is recorded before and after every step: on a
shared machine QPS and times are not measurements, rows read / encoded,
recall and the equality checks are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))
K = 10
APPEND_COMMITS = 20


def loadavg() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak RSS since the last reset_peak, in bytes."""
    return _status_kb("VmHWM") * 1024


class Data:
    """Clustered float32 vectors, row ``i`` has ``id = i``; all kept in
    memory (for the exact neighbours)."""

    def __init__(self, total: int, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.centres = rng.normal(size=(max(16, int(np.sqrt(total) // 4)), dim)
                                  ).astype(np.float32) * 3
        self.x = np.empty((total, dim), dtype=np.float32)
        for s in range(0, total, 100_000):
            n = min(100_000, total - s)
            lab = rng.integers(0, len(self.centres), n)
            self.x[s:s + n] = self.centres[lab] + rng.normal(size=(n, dim)).astype(np.float32)
        self.live = np.zeros(total, dtype=bool)
        # Queries: near the data, not in it.
        lab = rng.integers(0, len(self.centres), 1000)
        self.queries_all = (self.centres[lab] + rng.normal(size=(1000, dim))
                            ).astype(np.float32)

    def table(self, lo: int, hi: int) -> pa.Table:
        d = self.x.shape[1]
        return pa.table({"id": pa.array(np.arange(lo, hi, dtype=np.int64)),
                         "vec": pa.FixedSizeListArray.from_arrays(
                             pa.array(self.x[lo:hi].ravel()), d)})


def exact_neighbours(data: Data, q: np.ndarray, k: int = K) -> np.ndarray:
    """Ids of the k nearest live rows (squared L2) of each query."""
    ids = np.flatnonzero(data.live)
    best_d = np.full((len(q), k), np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    qn = (q * q).sum(1)[:, None]
    for s in range(0, ids.size, 200_000):
        blk = ids[s:s + 200_000]
        xb = data.x[blk]
        dist = qn - 2 * q @ xb.T + (xb * xb).sum(1)[None, :]
        cand_d = np.concatenate([best_d, dist], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(blk, dist.shape)], axis=1)
        top = np.argpartition(cand_d, k - 1, axis=1)[:, :k]
        best_d = np.take_along_axis(cand_d, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
    return best_i


class ReadCounter:
    """Counts the vectors bitshard reads from a Lance source."""

    def __init__(self) -> None:
        from bitshard.sources import LanceSource

        self.rows = 0
        take, batches = LanceSource.take, LanceSource.iter_batches
        counter = self

        def counted_take(src: Any, column: Any, rowids: Any) -> np.ndarray:
            out = take(src, column, rowids)
            counter.rows += len(out)
            return out

        def counted_batches(src: Any, *a: Any, **k: Any) -> Any:
            for b in batches(src, *a, **k):
                counter.rows += len(b.vectors)
                yield b

        LanceSource.take = counted_take  # type: ignore[method-assign]
        LanceSource.iter_batches = counted_batches  # type: ignore[method-assign]


def search_report(ds: Any, data: Data, queries: np.ndarray, gt: np.ndarray, nprobes: int,
                  counter: ReadCounter) -> Dict[str, Any]:
    """Recall@10 and single-thread QPS (median of 3) at the fixed setting,
    with the search's peak RSS and reads, and the uncovered rows."""
    import warnings

    from bitshard.searcher import UncoveredRowsWarning

    d = ds.describe_indices()[0]
    outside = set(d["uncovered_fragments"]) | {x["id"] for x in d["stale_fragments"]}
    uncovered = sum(int(f.num_rows) for f in ds.source.fragments() if f.id in outside)
    reset_peak()
    before = counter.rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        s = ds.searcher("vec", k=K, nprobes=nprobes, num_threads=1)
        s.search(queries[0])  # the first call pays for the plan and caches
        # The answers: one batch (rows no segment covers are then read once
        # for the whole batch, beyond the cache).
        rows, dists = s.search(queries)
        runs = []
        for _ in range(3):  # each run: single queries, in turn, for at least 1 s
            n, t0 = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - t0 < 1.0:
                s.search(queries[n % len(queries)])
                n += 1
            runs.append(n / (time.perf_counter() - t0))
    peak = peak_bytes()
    ids = ds.source.take_table(rows.ravel(), ["id"]).column("id").to_numpy().reshape(rows.shape)
    hit = sum(len(set(ids[i].tolist()) & set(gt[i].tolist())) for i in range(len(queries)))
    return {
        "recall_at_10": hit / (K * len(queries)),
        "qps_single_thread": statistics.median(runs),
        "qps_runs": runs,
        "search_peak_rss_bytes": peak,
        "search_rows_read": counter.rows - before,
        "uncovered_rows": uncovered,
        "segments": len(d.get("segments", [])),
        "_answers": (rows, dists),
    }


def interleaved_qps(datasets: Dict[str, Any], queries: np.ndarray, nprobes: int,
                    rounds: int = 5) -> Dict[str, Any]:
    """Single-thread QPS of several indexes measured in turns (A, B, A, B,
    ...: ``rounds`` runs of at least 1 s each), so that a drift of the
    machine's speed during the run (seen on this VM as 10-20% between
    consecutive 1-s runs) falls on all of them alike; the median per name."""
    import warnings

    from bitshard.searcher import UncoveredRowsWarning

    searchers = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        for name, ds in datasets.items():
            s = ds.searcher("vec", k=K, nprobes=nprobes, num_threads=1)
            s.search(queries[0])
            searchers[name] = s
        runs: Dict[str, List[float]] = {name: [] for name in searchers}
        for _ in range(rounds):
            for name, s in searchers.items():
                n, t0 = 0, time.perf_counter()
                while n == 0 or time.perf_counter() - t0 < 1.0:
                    s.search(queries[n % len(queries)])
                    n += 1
                runs[name].append(n / (time.perf_counter() - t0))
    return {"runs": runs, "median": {n: statistics.median(r) for n, r in runs.items()}}


def ratio(a: float, b: float) -> Optional[float]:
    """a / b, None when b is not positive."""
    return a / b if b > 0 else None


class EncodeSpy:
    """While entered, records what ``optimize_indices`` encodes (the rows
    no segment covers: fragment -> offsets) and the time it takes to read
    and encode them (wall and CPU: the encoder runs on every core)."""

    def __init__(self) -> None:
        self.encode: Dict[int, np.ndarray] = {}
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.rows = 0

    def __enter__(self) -> "EncodeSpy":
        from bitshard import upkeep

        self._real = real = upkeep._encode_rows
        spy = self

        def encode_rows(source: Any, column: str, ivf: Any, rot: Any, frags: Any,
                        source_frags: Any, encode: Dict[int, np.ndarray], *a: Any,
                        **k: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            out = real(source, column, ivf, rot, frags, source_frags, encode, *a, **k)
            spy.seconds += time.perf_counter() - t0
            spy.cpu_seconds += time.process_time() - c0
            for f, o in encode.items():
                spy.encode[int(f)] = np.asarray(o, np.uint32).copy()
                spy.rows += int(o.size)
            return out

        upkeep._encode_rows = encode_rows  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        from bitshard import upkeep

        upkeep._encode_rows = self._real  # type: ignore[assignment]


def reencode_covered(uri: str, encoded: Dict[int, np.ndarray]) -> Dict[str, Any]:
    """Comparison (b): read and encode again exactly the rows the upkeep
    remapped (every live row of the compacted dataset but those it encoded)
    with the index's own rotation and centroids, by the upkeep's own encoder
    (``bitshard.upkeep._encode_rows``: a fragment wholly re-encoded is
    scanned, the others read by row address), into a temporary segment;
    its wall and CPU time."""
    import bitshard
    from bitshard import index as idx
    from bitshard import upkeep

    ds = bitshard.dataset(uri)
    o = idx.open_handle(idx.committed_segments(ds.storage, "vec_idx")[0], ds.storage)
    ivf, rot = o.ivf_model(), o.rotation()
    source = ds.source
    source_frags = {f.id: f for f in source.fragments()}
    covered: Dict[int, np.ndarray] = {}
    for f in source_frags:
        live = np.asarray(source.live_offsets(f), np.uint32)
        rows = np.setdiff1d(live, encoded.get(f, np.zeros(0, np.uint32)), assume_unique=True)
        if rows.size:
            covered[f] = rows.astype(np.uint32)
    frags = sorted(covered)
    tmp = tempfile.mkdtemp(prefix="bench-living-reencode-")
    stats: Dict[str, Any] = {"rows_encoded": 0, "rows_read": 0}
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        upkeep._encode_rows(source, "vec", ivf, rot, frags, source_frags, covered, tmp, stats,
                            source.live_offsets)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": int(stats["rows_encoded"]), "seconds": secs, "cpu_seconds": cpu,
            "loadavg_after": loadavg()}


def memory_in_child(uri: str, queries_path: str, nprobes: int,
                    cache_bytes: Optional[int]) -> Dict[str, Any]:
    """The search's memory in a fresh process (``python -m bench.living
    --memory-child``) holding only the dataset, the index and the queries:
    see :func:`memory_child`."""
    cmd = [sys.executable, "-m", "bench.living", "--memory-child", uri, queries_path,
           str(nprobes), "default" if cache_bytes is None else str(cache_bytes)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_child(uri: str, queries_path: str, nprobes: int, cache: str) -> Dict[str, Any]:
    """In this process: open the dataset and its index, load the queries
    (RSS then: ``rss_index_open_bytes``), search them as one batch (the
    cache of rows searched exactly is filled, the rest streamed) and then
    20 of them one by one (each streams what the cache does not hold), and
    report the peak RSS during the searches against the stated bound:
    ``exact_cache_bytes`` plus four streamed batches
    (``EXACT_BATCH_BYTES`` each; docs/usage.md, "Rows no segment covers")."""
    import warnings

    import bitshard
    from bitshard.searcher import EXACT_BATCH_BYTES, UncoveredRowsWarning

    rss_imports = _status_kb("VmRSS") * 1024
    kw = {} if cache == "default" else {"exact_cache_bytes": int(cache)}
    ds = bitshard.dataset(uri, **kw)
    queries = np.load(queries_path)
    d = ds.describe_indices()[0]
    outside = set(d["uncovered_fragments"]) | {x["id"] for x in d["stale_fragments"]}
    uncovered = sum(int(f.num_rows) for f in ds.source.fragments() if f.id in outside)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncoveredRowsWarning)
        s = ds.searcher("vec", k=K, nprobes=nprobes, num_threads=1)
        rss_open = _status_kb("VmRSS") * 1024
        # The same searches without the rows searched exactly
        # (fast_search): what the index side holds (its partitions paged
        # in, the search's buffers), apart from the uncovered rows.
        fast = ds.searcher("vec", k=K, nprobes=nprobes, num_threads=1, fast_search=True)
        fast.search(queries)
        for i in range(min(20, len(queries))):
            fast.search(queries[i])
        rss_index_searched = _status_kb("VmRSS") * 1024
        # The source's reader started (one row of an uncovered fragment
        # read): its runtime and buffers are a fixed cost of the first read
        # from the source, whatever is read (about 45 MiB for a local Lance
        # dataset), not memory held for the uncovered rows.
        for _ in ds.source.iter_batches("vec", fragment_ids=sorted(outside)[:1], batch_size=1):
            break
        rss_reader = _status_kb("VmRSS") * 1024
        reset_peak()
        s.search(queries)
        for i in range(min(20, len(queries))):
            s.search(queries[i])
    peak = peak_bytes()
    rss_after = _status_kb("VmRSS") * 1024
    cache_bytes = ds.exact_cache_bytes
    row_bytes = 4 * queries.shape[1] + 8
    bound = cache_bytes + 4 * EXACT_BATCH_BYTES
    return {"exact_cache_bytes": cache_bytes, "uncovered_rows": uncovered,
            "uncovered_bytes": uncovered * row_bytes,
            "cached_bytes": min(cache_bytes // row_bytes, uncovered) * row_bytes,
            "rss_after_imports_bytes": rss_imports, "rss_index_open_bytes": rss_open,
            "rss_index_searched_bytes": rss_index_searched,
            "rss_reader_started_bytes": rss_reader,
            "peak_rss_search_bytes": peak, "rss_after_search_bytes": rss_after,
            "search_growth_bytes": peak - rss_reader,
            "bound_bytes": bound, "within_bound": peak - rss_reader <= bound}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import lance

    import bitshard
    from bitshard import index as idx

    work = args.workdir or tempfile.mkdtemp(prefix="bench-living-")
    uri = os.path.join(work, "living.lance")
    shutil.rmtree(uri, ignore_errors=True)
    per_append = max(1, args.rows // (10 * APPEND_COMMITS))
    total = args.rows + per_append * APPEND_COMMITS
    data = Data(total, args.dim, seed=args.seed)
    queries = data.queries_all[:args.queries]
    counter = ReadCounter()
    steps: List[Dict[str, Any]] = []
    out: Dict[str, Any] = {
        "benchmark": "living", "rows": args.rows, "dim": args.dim,
        "appended_rows": per_append * APPEND_COMMITS, "append_commits": APPEND_COMMITS,
        "queries": len(queries), "k": K, "nprobes": args.nprobes,
        "num_partitions": args.partitions, "num_bits": args.bits,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "peak_reset_works": reset_peak(), "steps": steps,
    }

    def step(name: str, fn: Any, ds_after: Any = None) -> Any:
        la0 = loadavg()
        reset_peak()
        r0 = counter.rows
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        secs = time.perf_counter() - t0
        rec: Dict[str, Any] = {"step": name, "seconds": secs,
                               "cpu_seconds": time.process_time() - c0,
                               "rows_read": counter.rows - r0,
                               "peak_rss_bytes": peak_bytes()}
        if isinstance(result, dict):
            rec.update(result)
        ds = ds_after() if ds_after else None
        if ds is not None:
            gt = exact_neighbours(data, queries)
            rec["search"] = search_report(ds, data, queries, gt, args.nprobes, counter)
        rec["loadavg_before_after"] = [la0, loadavg()]
        steps.append(rec)
        s = rec.get("search", {})
        print(f"{name:9s} {secs:8.1f}s read {rec['rows_read']:>9,} "
              f"encoded {rec.get('rows_encoded', 0):>9,} peak {rec['peak_rss_bytes'] >> 20} MiB"
              + (f"  recall {s['recall_at_10']:.4f} qps {s['qps_single_thread']:.0f} "
                 f"uncovered {s['uncovered_rows']}" if s else ""), flush=True)
        return result

    # 1. build
    def build() -> Dict[str, Any]:
        lance.write_dataset(data.table(0, args.rows), uri, max_rows_per_file=args.fragment_rows)
        data.live[:args.rows] = True
        ds = bitshard.dataset(uri)
        ds.create_index("vec", "IVF_RQ", num_partitions=args.partitions, num_bits=args.bits)
        return {"rows_encoded": args.rows}

    step("build", build, lambda: bitshard.dataset(uri))

    # 2. appends
    def appends() -> Dict[str, Any]:
        lo = args.rows
        for _ in range(APPEND_COMMITS):
            lance.write_dataset(data.table(lo, lo + per_append), uri, mode="append")
            lo += per_append
        data.live[args.rows:lo] = True
        return {"rows_encoded": 0}

    step("appends", appends, lambda: bitshard.dataset(uri))
    # The search's memory with 10% of the rows uncovered, in a process that
    # holds nothing else: the default cache, and one a quarter of the
    # uncovered rows' size (the rest streamed).
    qpath = os.path.join(work, "queries.npy")
    np.save(qpath, queries)
    row_bytes = 4 * args.dim + 8
    uncovered_bytes = steps[-1]["search"]["uncovered_rows"] * row_bytes
    out["memory_10pct_uncovered"] = [
        memory_in_child(uri, qpath, args.nprobes, cache)
        for cache in (None, max(row_bytes, uncovered_bytes // 4))]
    for m in out["memory_10pct_uncovered"]:
        print(f"memory    cache {m['exact_cache_bytes'] >> 20} MiB: index open "
              f"{m['rss_index_open_bytes'] >> 20} MiB, index searched "
              f"{m['rss_index_searched_bytes'] >> 20} MiB, reader started "
              f"{m['rss_reader_started_bytes'] >> 20} MiB, exact search peak "
              f"{m['peak_rss_search_bytes'] >> 20} MiB (+{m['search_growth_bytes'] >> 20} MiB; "
              f"bound {m['bound_bytes'] >> 20} MiB: "
              f"{'within' if m['within_bound'] else 'NOT within'})", flush=True)

    # 3. delete 5%
    def delete() -> Dict[str, Any]:
        lance.dataset(uri).delete("id % 20 = 7")
        data.live[np.arange(total) % 20 == 7] = False
        return {"rows_encoded": 0, "rows_deleted": int((np.arange(total) % 20 == 7).sum())}

    step("delete", delete, lambda: bitshard.dataset(uri))

    # 4. compact
    def compact() -> Dict[str, Any]:
        m = lance.dataset(uri).optimize.compact_files(
            target_rows_per_fragment=args.fragment_rows,
            materialize_deletions_threshold=args.materialize_threshold)
        return {"rows_encoded": 0, "compaction": str(m)}

    step("compact", compact, lambda: bitshard.dataset(uri))

    # 5. optimize_indices
    holder: Dict[str, Any] = {}

    encoded = EncodeSpy()

    def optimize() -> Dict[str, Any]:
        ds = bitshard.dataset(uri)
        with encoded:
            ds.optimize_indices()
        st = dict(ds.last_optimize_stats["vec_idx"])
        holder["ds"] = ds
        keep = ("rows_remapped", "rows_encoded", "rows_read", "rows_dropped", "compactions",
                "segments_before", "segments_after", "history_gone", "seconds",
                "seconds_history", "seconds_encode", "seconds_write", "seconds_commit")
        return {"optimize_stats": {k: st.get(k) for k in keep},
                "rows_encoded": int(st["rows_encoded"]),
                "encode_uncovered": {"seconds": encoded.seconds,
                                     "cpu_seconds": encoded.cpu_seconds,
                                     "rows": encoded.rows}}

    # (b) is one upkeep against one re-encode, each under a second to a few
    # seconds on a VM whose disk sync rate and speed drift: both are
    # repeated, in turns (the upkeep on a copy of the index as it was before
    # the step, which it commits again identically), and compared by medians.
    backup = os.path.join(work, "index-before-optimize")
    shutil.rmtree(backup, ignore_errors=True)
    shutil.copytree(os.path.join(uri, "_bitshard"), backup)
    step("optimize", optimize, lambda: bitshard.dataset(uri))
    reencodes = [reencode_covered(uri, encoded.encode)]
    remaps = [(steps[-1]["seconds"] - steps[-1]["encode_uncovered"]["seconds"],
               steps[-1]["cpu_seconds"] - steps[-1]["encode_uncovered"]["cpu_seconds"])]
    for _ in range(args.b_repeats - 1):
        shutil.rmtree(os.path.join(uri, "_bitshard"))
        shutil.copytree(backup, os.path.join(uri, "_bitshard"))
        again = EncodeSpy()
        t0, c0 = time.perf_counter(), time.process_time()
        with again:
            bitshard.dataset(uri).optimize_indices()
        remaps.append((time.perf_counter() - t0 - again.seconds,
                       time.process_time() - c0 - again.cpu_seconds))
        reencodes.append(reencode_covered(uri, encoded.encode))
    shutil.rmtree(backup, ignore_errors=True)
    reencode = dict(reencodes[0])
    reencode["runs_seconds"] = [r["seconds"] for r in reencodes]
    reencode["runs_cpu_seconds"] = [r["cpu_seconds"] for r in reencodes]
    reencode["median_seconds"] = float(np.median(reencode["runs_seconds"]))
    reencode["median_cpu_seconds"] = float(np.median(reencode["runs_cpu_seconds"]))
    out["remap_runs"] = {"seconds": [r[0] for r in remaps], "cpu_seconds": [r[1] for r in remaps]}
    print(f"re-encode {reencode['median_seconds']:8.2f}s the {reencode['rows']:,} remapped rows "
          f"(median of {len(reencodes)}; cpu {reencode['median_cpu_seconds']:.1f}s); the upkeep's "
          f"work on them {float(np.median([r[0] for r in remaps])):.3f}s", flush=True)

    # 6. a fresh build with the same artifacts and layout
    fresh_root = os.path.join(work, "fresh-index")
    shutil.rmtree(fresh_root, ignore_errors=True)
    same_bytes: Dict[str, bool] = {}

    def fresh() -> Dict[str, Any]:
        ds = bitshard.dataset(uri)
        handles = idx.committed_segments(ds.storage, "vec_idx")
        o = idx.open_handle(handles[0], ds.storage)
        f = bitshard.dataset(uri, index_uri=fresh_root)
        segs = []
        n = 0
        for h in handles:
            s = f.create_index_uncommitted("vec", ivf_centroids=o.ivf_model(),
                                           rq_rotation=o.rotation(),
                                           fragment_ids=list(h.fragment_ids), index_uuid=h.uuid)
            with open(h.path, "rb") as a, open(s.path, "rb") as b:
                same_bytes[h.uuid] = a.read() == b.read()
            segs.append(s)
            n += s.num_rows
        f.commit_existing_index_segments("vec_idx", "vec", segs)
        return {"rows_encoded": n}

    step("fresh", fresh, lambda: bitshard.dataset(uri, index_uri=fresh_root))

    turns = interleaved_qps({"optimized": bitshard.dataset(uri),
                             "fresh": bitshard.dataset(uri, index_uri=fresh_root)},
                            queries, args.nprobes)
    out["qps_interleaved"] = turns
    print(f"qps in turns (median of {len(turns['runs']['fresh'])}): optimized "
          f"{turns['median']['optimized']:.0f}, fresh {turns['median']['fresh']:.0f}", flush=True)

    opt = steps[4]["search"].pop("_answers")
    frs = steps[5]["search"].pop("_answers")
    for s in steps:
        s.get("search", {}).pop("_answers", None)
    opt_step, fresh_step = steps[4], steps[5]
    upkeep_s, upkeep_cpu = opt_step["seconds"], opt_step["cpu_seconds"]
    remap_s = float(np.median(out["remap_runs"]["seconds"]))
    remap_cpu = float(np.median(out["remap_runs"]["cpu_seconds"]))
    out["reencode_covered"] = reencode
    out["checks"] = {
        "optimize_rows_read": opt_step["rows_read"],
        "answers_identical_to_fresh": bool(np.array_equal(opt[0], frs[0])
                                           and np.array_equal(opt[1], frs[1])),
        "segment_bytes_identical_to_fresh": all(same_bytes.values()) and bool(same_bytes),
        # (a) the whole upkeep (remap + encoding the uncovered rows) against
        # a fresh build of the compacted dataset with the same artifacts
        "a_fresh_build_over_upkeep": ratio(fresh_step["seconds"], upkeep_s),
        "a_fresh_build_over_upkeep_cpu": ratio(fresh_step["cpu_seconds"], upkeep_cpu),
        # (b) the upkeep's work on the covered rows (all of it but reading
        # and encoding the uncovered rows) against re-encoding exactly the
        # rows it remapped, with the same artifacts, by the upkeep's own
        # encoder: the 10x target is judged on this one
        # medians of --b-repeats runs each, in turns
        "b_remapped_rows": int(opt_step["optimize_stats"]["rows_remapped"]),
        "b_remap_seconds": remap_s,
        "b_reencode_seconds": reencode["median_seconds"],
        "b_reencode_over_remap": ratio(reencode["median_seconds"], remap_s),
        "b_reencode_over_remap_cpu": ratio(reencode["median_cpu_seconds"], remap_cpu),
        "b_target_10x_met": (ratio(reencode["median_seconds"], remap_s) or 0.0) >= 10.0,
        "qps_optimized_over_fresh": (opt_step["search"]["qps_single_thread"]
                                     / fresh_step["search"]["qps_single_thread"]),
        # the same two indexes searched in turns after both exist: the figure
        # the "within 10%" is judged on (the per-step runs above are
        # minutes apart)
        "qps_optimized_over_fresh_interleaved": (turns["median"]["optimized"]
                                                 / turns["median"]["fresh"]),
        "recall_optimized_minus_fresh": (opt_step["search"]["recall_at_10"]
                                         - fresh_step["search"]["recall_at_10"]),
        "memory_10pct_uncovered_within_bound": all(
            m["within_bound"] for m in out["memory_10pct_uncovered"]),
    }
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--memory-child"]:
        uri, qpath, nprobes, cache = argv[1:5]
        print(json.dumps(memory_child(uri, qpath, int(nprobes), cache)))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.living", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows built on (default 1M)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--partitions", type=int, default=1024)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--nprobes", type=int, default=20)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--fragment-rows", type=int, default=100_000)
    p.add_argument("--materialize-threshold", type=float, default=0.01,
                   help="compact_files' materialize_deletions_threshold: the default 0.01 "
                        "rewrites every fragment with 5%% deleted (pylance's own 0.1 would "
                        "leave them, and move only the small appended fragments)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="kept when given (default: a temp dir)")
    p.add_argument("--b-repeats", type=int, default=3,
                   help="upkeeps and re-encodes timed for (b), in turns; medians compared")
    p.add_argument("--out", default=os.path.join(HERE, "results", "living.json"))
    args = p.parse_args(argv)
    t0 = time.time()
    out = run(args)
    out["started_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    out["wall_seconds"] = time.time() - t0
    out["command"] = "python -m bench.living " + " ".join(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(json.dumps(out["checks"], indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
