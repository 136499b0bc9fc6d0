"""The arithmetic of a billion, measured: calibrate a cost model on this
machine, predict a large build and search with it, run them, compare.

    python -m bench.scale                       # 10^7 x 128, 4 bits, 2 workers
    python -m bench.scale --rows 2000000 --dim 768
    python -m bench.scale --skip-big            # calibration and model only

Steps (each figure goes to ``bench/results/scale.json``, a summary to
``scale-summary.txt``):

1. **Calibration, synthetic, the big run's dimension, bits and partitions**
   (``--calib-rows``, default 300,000, in fragments of the big run's size or
   fewer, so that every worker gets 2 encode tasks and a merge runs): the
   k-means time of
   :func:`bitshard.train_ivf` (its sample, ``k * 256`` rows, does not grow with
   the rows, so it is the big build's training time), the encode and merge
   rates of :func:`bitshard.build_index` on the process pool.
1b. **Search calibration** (``--search-calib-rows``, default
   ``min(rows / 4, max(--calib-rows, 2,000 x partitions))``): the same source
   generator and partitions, enough rows for partitions of at least 2,000
   rows, built and searched at every nprobes of the sweep: its seconds per
   query after the probe choice, per scanned code, are the big run's at the
   same nprobes (``calibrate_search``).
2. **Per-dimension costs** (``--dims``, ``--bits``): encode rows/s of one
   thread and stage-1 + stage-2 search nanoseconds per scanned code, on small
   synthetic sets of each dimension and bit width; these scale the model to
   other dimensions.
3. **Real embeddings** (``--real``, the WordNet cache of ``python -m bench``:
   30,000 x 384 MiniLM sentence embeddings, 1,000 queries): the nprobes, as a
   fraction of ``k = sqrt(rows)`` partitions, that reaches recall@10 0.90 and
   0.95 for 1, 4 and 9 bits.
4. **The big run** (``--rows`` x ``--dim``, unless ``--skip-big``): a clustered
   synthetic Lance source written in batches, ``build_index`` with
   ``--workers`` processes, one task per fragment, segments bounded by
   ``--max-segment-mb``; then, in a fresh process, a search sweep with recall
   against exact neighbours (computed by streaming the source). Peak RSS of
   every process is polled. Each figure is printed beside the model's
   prediction from steps 1 and 2; "good" is within 30%.

Every long step runs at the caller's priority: on a shared machine start it
from a shell that did ``echo 19 > /proc/self/autogroup``. The load average is
recorded before and after each step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

from bench.rss import PeakWatcher, vm_hwm

HERE = os.path.dirname(os.path.abspath(__file__))
K_NEIGHBOURS = 10


def load() -> List[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def log(*a: Any) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data


def write_source(uri: str, rows: int, dim: int, rows_per_fragment: int, seed: int = 0) -> None:
    """Clustered float32 vectors (1024 Gaussian clusters whose centres are
    about as far apart as their rows spread, so that neighbours cross
    cluster borders) written in batches of 100,000 rows to a Lance dataset:
    never all in memory."""
    import lance
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1024, dim)).astype(np.float32) * 0.75

    def batches():
        done = 0
        while done < rows:
            n = min(100_000, rows - done)
            lab = rng.integers(0, 1024, n)
            v = centres[lab] + rng.normal(size=(n, dim)).astype(np.float32)
            yield pa.record_batch({
                "id": pa.array(np.arange(done, done + n)),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim),
            })
            done += n

    schema = pa.schema([("id", pa.int64()), ("vec", pa.list_(pa.float32(), dim))])
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    lance.write_dataset(reader, uri, max_rows_per_file=rows_per_fragment, mode="overwrite")


def queries_for(uri: str, n: int, dim: int, seed: int = 1) -> np.ndarray:
    """n queries: rows spread over the source, plus a little noise."""
    import lance

    ds = lance.dataset(uri)
    total = ds.count_rows()
    idx = np.linspace(0, total - 1, n).astype(np.int64)
    t = ds.take(idx, columns=["vec"])
    x = np.stack(t.column("vec").to_numpy(zero_copy_only=False)).astype(np.float32)
    return x + np.random.default_rng(seed).normal(size=x.shape).astype(np.float32) * 0.5


def exact_neighbours(uri: str, q: np.ndarray, k: int = K_NEIGHBOURS) -> np.ndarray:
    """Row positions of the k nearest (squared l2) rows of each query,
    streaming the source in batches (bounded memory)."""
    import lance

    best_d = np.full((q.shape[0], k), np.inf, dtype=np.float32)
    best_i = np.zeros((q.shape[0], k), dtype=np.int64)
    qn = (q * q).sum(1)
    base = 0
    for b in lance.dataset(uri).to_batches(columns=["vec"], batch_size=200_000):
        # The list column's flat values, one reshape (np.stack of one array
        # per row took most of this pass at 10^7 rows).
        x = b.column("vec").values.to_numpy().reshape(-1, q.shape[1]).astype(np.float32,
                                                                              copy=False)
        d = qn[:, None] - 2.0 * (q @ x.T) + (x * x).sum(1)[None, :]
        cat_d = np.concatenate([best_d, d], 1)
        cat_i = np.concatenate([best_i, base + np.arange(x.shape[0])[None, :].repeat(q.shape[0], 0)], 1)
        part = np.argpartition(cat_d, k - 1, axis=1)[:, :k]
        best_d = np.take_along_axis(cat_d, part, 1)
        best_i = np.take_along_axis(cat_i, part, 1)
        base += x.shape[0]
    return best_i


def positions(ds: Any, rowids: np.ndarray) -> np.ndarray:
    """Row positions (0..rows-1 in fragment order) of row ids (fragment << 32 | offset)."""
    frags = sorted(ds.source.fragments(), key=lambda f: f.id)
    start, acc = {}, 0
    for f in frags:
        start[f.id] = acc
        acc += f.physical_rows
    r = rowids.astype(np.uint64)
    return np.array([start[int(a >> 32)] + int(a & 0xFFFFFFFF) if int(a >> 32) in start else -1
                     for a in r], dtype=np.int64)


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(g) & set(t)) for g, t in zip(got, truth))
    return hits / truth.size


# --------------------------------------------------------------- searches


def timed_search(ds: Any, q: np.ndarray, nprobes: int, threads: int = 1,
                 refine: Optional[int] = None, repeats: int = 3) -> Dict[str, Any]:
    """Seconds per query (best of ``repeats`` batches, one thread by
    default), codes scanned per query, and the answers' row ids."""
    s = ds.searcher("vec", k=K_NEIGHBOURS, nprobes=nprobes, num_threads=threads,
                    refine_factor=refine)
    ids, _ = s.search(q)  # warm: partitions read and checked on first touch
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        ids, _ = s.search(q)
        best = min(best, time.perf_counter() - t0)
    before = dict(s.stats)
    s.search(q)
    after = s.stats
    scanned = (after["codes_scanned"] - before["codes_scanned"]) / q.shape[0]
    # Rows of the source read to rerank (1 bit only): a per-query cost the
    # model's a + b * codes does not separate.
    reads = (after.get("exact_reads", 0) - before.get("exact_reads", 0)) / q.shape[0]
    stage2 = (after["codes_stage2"] - before["codes_stage2"]) / q.shape[0]
    return {"nprobes": nprobes, "s_per_query": best / q.shape[0], "qps": q.shape[0] / best,
            "codes_per_query": scanned, "stage2_per_query": stage2,
            "source_reads_per_query": reads, "rowids": ids}


# ------------------------------------------------------------ calibration


def calibrate(args: argparse.Namespace, work: str) -> Dict[str, Any]:
    """Step 1: training, encode and merge rates, and search a + b * codes,
    at the big run's dimension, bits and partitions."""
    import bitshard

    # Fragments of the big run's size, but at least 2 tasks per worker: every
    # worker encodes (the rate is the pool's) and a merge runs (its rate).
    frag = calib_fragment_rows(args)
    uri = os.path.join(work, f"calib-{args.calib_rows}x{args.dim}-f{frag}.lance")
    if not os.path.isdir(uri):
        write_source(uri, args.calib_rows, args.dim, frag, seed=0)
    shutil.rmtree(os.path.join(uri, "_bitshard"), ignore_errors=True)
    out: Dict[str, Any] = {"rows": args.calib_rows, "rows_per_fragment": frag,
                           "load_before": load()}
    ds = bitshard.dataset(uri)
    t0 = time.perf_counter()
    ivf = bitshard.train_ivf(ds, "vec", args.partitions, sample_rate=args.sample_rate,
                             max_iters=args.max_iters, seed=0)
    out["train_s"] = time.perf_counter() - t0
    events: List[Any] = []

    def progress(stage: str, done: int, total: int) -> None:
        events.append((time.perf_counter(), stage, done))

    with PeakWatcher() as watch:
        built = bitshard.build_index(uri, "vec", name="idx", ivf_centroids=ivf,
                                     num_bits=args.bits, executor="processes",
                                     num_workers=args.workers, fragments_per_task=1,
                                     seed=0, progress=progress)
    st = built.last_build_stats
    seg_bytes = sum(s["size_bytes"] for s in built.describe_indices()[0]["segments"])
    out.update(encode_s=st["seconds"]["encode"], merge_s=st["seconds"]["merge"],
               index_bytes=seg_bytes, tasks=st["tasks"], merges=st["merges"],
               worker_peak_rss=max(watch.peaks.values()) if watch.peaks else 0)
    # The pool's steady rate, from the rows finished after each worker's
    # first task (the first tasks also pay the workers' start: imports, the
    # source opened, the IVF model loaded), and that start as a fixed cost.
    done = [(t, d) for t, stage, d in events if stage == "encode" and d > 0]
    w = max(1, args.workers)
    if len(done) > w and done[-1][0] > done[w - 1][0]:
        out["encode_rows_per_s"] = (done[-1][1] - done[w - 1][1]) / (done[-1][0] - done[w - 1][0])
    else:
        out["encode_rows_per_s"] = args.calib_rows / out["encode_s"]
    out["encode_start_s"] = max(0.0, out["encode_s"] - args.calib_rows / out["encode_rows_per_s"])
    # Seconds per merged byte as the merge tree ran them (merge_seconds
    # below plans the same tree; a merge writes about its inputs' bytes).
    out["merge_critical_bytes"] = merge_seconds(
        leaf_sizes(args.calib_rows, frag, seg_bytes), args.workers,
        args.max_segment_mb << 20, 1.0)
    out["merge_bytes_per_s"] = out["merge_critical_bytes"] / max(out["merge_s"], 1e-9)
    out["load_after"] = load()
    return out


def search_calib_rows(args: argparse.Namespace) -> int:
    """Rows of the search calibration: partitions of at least 2,000 rows (or
    the big run's, if shorter), at most a quarter of the big run."""
    want = max(args.calib_rows, 2000 * args.partitions)
    return int(args.search_calib_rows or max(1, min(args.rows // 4, want)))


def calibrate_search(args: argparse.Namespace, work: str) -> Dict[str, Any]:
    """Step 1b: the search sweep on an index of the big run's partitions
    over fewer rows of the same generator, and the probe choice's cost.

    The cost of a query after its probes are chosen is, at a given nprobes,
    proportional to the codes it scans once the partitions are long: the
    stage-1 kernel is per code, and what else a query pays (the stage-2
    estimates of the candidates under the threshold, the top-k) comes with
    them. Short partitions break that: at 300,000 rows in 1,024 partitions
    (293 rows each) a query cost 7.6 ns per scanned code at nprobes 64 and
    18 ns at nprobes 4, against 3.7 and 8.3 at 2,000,000 rows and 3.6 and 8.4
    at 10,000,000 (128 dims, 4 bits, this machine): a sparse partition holds
    few of a query's neighbours, so the threshold falls late and more codes
    reach the candidate list and stage 2. From 2,000 rows a partition on,
    the cost per code no longer moved, so the prediction scales the
    calibration's time per query by the codes, per nprobes."""
    import bitshard

    from bitshard import distributed as dist

    rows = search_calib_rows(args)
    # Fragments short enough that the first merge level runs a merge on
    # every worker at once, as the big run's does, and merges of the big
    # run's size follow (the first calibration's single 26 MB merge is
    # mostly fixed costs).
    frag = max(1, min(args.rows_per_fragment,
                      rows // (dist.MERGE_FAN_IN * max(1, args.workers))))
    uri = os.path.join(work, f"search-{rows}x{args.dim}-f{frag}.lance")
    if not os.path.isdir(uri):
        write_source(uri, rows, args.dim, frag, seed=0)
    shutil.rmtree(os.path.join(uri, "_bitshard"), ignore_errors=True)
    out: Dict[str, Any] = {"rows": rows, "load_before": load()}
    t0 = time.perf_counter()
    built = bitshard.build_index(uri, "vec", name="idx", num_partitions=args.partitions,
                                 sample_rate=args.sample_rate, max_iters=args.max_iters,
                                 num_bits=args.bits, executor="processes",
                                 num_workers=args.workers, fragments_per_task=1, seed=0,
                                 progress=False)
    out["build_s"] = time.perf_counter() - t0
    # Its merges are the big run's size (a segment per fragment of the big
    # run's length, merged up to the same bound), where the first
    # calibration's one small merge is mostly fixed costs: the merge rate
    # the prediction uses.
    st = built.last_build_stats
    seg_bytes = sum(s["size_bytes"] for s in built.describe_indices()[0]["segments"])
    out["merge_s"] = st["seconds"]["merge"]
    out["merge_critical_bytes"] = merge_seconds(
        leaf_sizes(rows, frag, seg_bytes), args.workers, args.max_segment_mb << 20, 1.0)
    out["merge_bytes_per_s"] = out["merge_critical_bytes"] / max(out["merge_s"], 1e-9)
    out["rows_per_fragment"] = frag
    # Four times the big run's queries and more repeats than its sweep: a
    # batch of 100 queries here lasts 20-100 ms, and the prediction is only
    # as good as this best time (QPS at one nprobes moved 0.1-0.2 between
    # runs with 100 queries).
    q = queries_for(uri, 4 * args.queries, args.dim)
    pts = [timed_search(built, q, p, repeats=9) for p in args.nprobes]
    out["points"] = [{k: v for k, v in p.items() if k != "rowids"} for p in pts]
    out["rank_s_per_centroid_dim"] = rank_cost(built, q, args.partitions, args.dim)
    rank = out["rank_s_per_centroid_dim"] * args.partitions * args.dim
    for p in out["points"]:
        p["scan_s_per_code"] = max(p["s_per_query"] - rank, 0.0) / max(p["codes_per_query"], 1.0)
    out["load_after"] = load()
    return out


def rank_cost(ds: Any, q: np.ndarray, k: int, dim: int) -> float:
    """Seconds per centroid and dimension of choosing a query's probes (the
    C search's own probe selection, timed alone): a per-query cost that grows
    with k x d, small at 1,024 partitions and large at 10^9 rows."""
    s = ds.searcher("vec", k=K_NEIGHBOURS, nprobes=1, num_threads=1)
    native = s._native  # the prepared C searcher (the bench reads internals)
    nprobes = min(64, k)
    out = np.empty((q.shape[0], nprobes), dtype=np.uint32)
    native.probes(q, q.shape[0], nprobes, out)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        native.probes(q, q.shape[0], nprobes, out)
        best = min(best, time.perf_counter() - t0)
    return best / q.shape[0] / (k * dim)


def per_dim_costs(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Step 2: one-thread encode rows/s and search seconds per scanned code,
    for each dimension and bit width, on small synthetic sets."""
    import bitshard

    rows = []
    for d in args.dims:
        n = max(5_000, args.cost_rows * 128 // d)
        rng = np.random.default_rng(d)
        centres = rng.normal(size=(64, d)).astype(np.float32) * 3
        x = centres[rng.integers(0, 64, n)] + rng.normal(size=(n, d)).astype(np.float32)
        q = x[:200] + rng.normal(size=(200, d)).astype(np.float32) * 0.5
        for bits in args.bits_list:
            l0 = load()
            ds = bitshard.dataset(x)
            t0 = time.perf_counter()
            ds.create_index("vector", "IVF_RQ", num_bits=bits, num_threads=1,
                            ivf_centroids=centres)
            enc = time.perf_counter() - t0
            s = ds.searcher("vector", k=K_NEIGHBOURS, nprobes=64, num_threads=1)
            s.search(q)
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                s.search(q)
                best = min(best, time.perf_counter() - t0)
            row = {"dim": d, "bits": bits, "rows": n, "encode_rows_per_s": n / enc,
                   "search_s_per_code": best / (200 * n), "load": [l0, load()]}
            log("cost", row)
            rows.append(row)
    return rows


def real_recall(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Step 3: on real embeddings, the nprobes fraction of k = sqrt(rows)
    partitions reaching recall@10 0.90 and 0.95, per bit width."""
    import bitshard

    path = args.real
    if not path or not os.path.exists(os.path.join(path, "base.npy")):
        log("no real embeddings at", path, "- step 3 skipped")
        return None
    base = np.load(os.path.join(path, "base.npy"))
    qs = np.load(os.path.join(path, "queries.npy"))[:500]
    gt = np.load(os.path.join(path, "gt.npy"))[:500, :K_NEIGHBOURS]
    k = int(round(math.sqrt(base.shape[0])))
    out: Dict[str, Any] = {"path": os.path.basename(path.rstrip("/")), "rows": int(base.shape[0]),
                           "dim": int(base.shape[1]), "partitions": k, "by_bits": {}}
    ds0 = bitshard.dataset(base)
    ivf = bitshard.train_ivf(ds0, "vector", k, seed=0)
    for bits in args.bits_list:
        ds = bitshard.dataset(base)
        ds.create_index("vector", "IVF_RQ", num_bits=bits, ivf_centroids=ivf)
        curve = []
        for p in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, k}):
            if p > k:
                continue
            ids, _ = ds.searcher("vector", k=K_NEIGHBOURS, nprobes=p).search(qs)
            got = positions(ds, ids.ravel()).reshape(qs.shape[0], -1)
            curve.append({"nprobes": p, "recall": recall(got, gt)})
        need = {}
        for target in (0.90, 0.95):
            hit = next((c["nprobes"] for c in curve if c["recall"] >= target), None)
            need[str(target)] = None if hit is None else hit / k
        out["by_bits"][str(bits)] = {"curve": curve, "nprobes_fraction": need}
        log("real", bits, need)
    return out


# ------------------------------------------------------------------ model


def bytes_per_vector(dim: int, bits: int) -> float:
    """Stored bytes per row (docs/format.md): the 1-bit code and its three
    factors (D/8 + 12), the ordinal (4), and for B > 1 the extra bits and
    s_full."""
    D = -(-dim // 64) * 64
    return D / 8 + 12 + 4 + ((bits - 1) * D / 8 + 4 if bits > 1 else 0)


def nearest_cost(costs: List[Dict[str, Any]], dim: int, bits: int, key: str) -> float:
    """A per-dimension cost at (dim, bits), interpolated linearly in the
    padded dimension between the measured dimensions."""
    pts = sorted((c["dim"], c[key]) for c in costs if c["bits"] == bits)
    if not pts:
        raise ValueError(f"no cost measured for {bits} bits")
    ds = [p[0] for p in pts]
    vs = [p[1] for p in pts]
    if key == "encode_rows_per_s":  # interpolate time, not rate
        return 1.0 / float(np.interp(dim, ds, [1.0 / v for v in vs]))
    return float(np.interp(dim, ds, vs))


#: Peak bytes the Lance reader holds while a fragment is read in batches,
#: per byte of the fragment's float32 vectors: reading one fragment of
#: 250,000 x 128 (128 MB) raised a fresh process's peak RSS by 250 MB
#: (pylance of this repository's lock; batch_readahead and io_buffer_size
#: did not change it). An encode task's memory grows with its fragment.
READER_BYTES_PER_SOURCE_BYTE = 1.95


def calib_fragment_rows(args: argparse.Namespace) -> int:
    """Rows per fragment of the calibration source: the big run's, or fewer
    so that each worker gets at least 2 encode tasks."""
    return max(1, min(args.rows_per_fragment, args.calib_rows // (2 * max(1, args.workers))))


def leaf_sizes(rows: int, rows_per_fragment: int, index_bytes: float) -> List[float]:
    """Predicted bytes of each encode task's segment (one task per fragment):
    the index's bytes shared out by rows."""
    sizes, done = [], 0
    while done < rows:
        n = min(rows_per_fragment, rows - done)
        sizes.append(index_bytes * n / rows)
        done += n
    return sizes


def merge_seconds(sizes: List[float], workers: int, max_bytes: int,
                  bytes_per_s: float) -> float:
    """Seconds of build_index's merge tree over segments of ``sizes`` bytes
    at ``bytes_per_s`` per worker: the same plan as the library
    (bitshard.distributed.merge_groups, fan-in MERGE_FAN_IN, the size
    bound), each level's merges dealt to the ``workers`` in turn, a level
    lasting as long as its busiest worker. (Timed merge by merge at 10^7
    rows, two merges of 168 MB running at once took 0.75 s, one alone 0.71
    s: the workers do not share a bottleneck.)"""
    from bitshard import distributed as dist

    total = 0.0
    level = list(sizes)
    while len(level) > 1:
        groups = dist.merge_groups([int(x) for x in level], dist.MERGE_FAN_IN, max_bytes)
        merged = [sum(level[i] for i in g) for g in groups if len(g) > 1]
        if not merged:
            break
        busy = [0.0] * max(1, workers)
        for m in sorted(merged, reverse=True):
            busy[busy.index(min(busy))] += m
        total += max(busy) / bytes_per_s
        level = [sum(level[i] for i in g) for g in groups]
    return total


def predict_big(args: argparse.Namespace, cal: Dict[str, Any], sc: Dict[str, Any],
                costs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What the big run should measure, from steps 1 and 2 alone."""
    n, k = args.rows, args.partitions
    per_row = cal["index_bytes"] / cal["rows"]  # measured bytes per row, padding included
    index_bytes = n * bytes_per_vector(args.dim, args.bits) + k * args.dim * 4
    encode_s = cal.get("encode_start_s", 0.0) + n / cal["encode_rows_per_s"]
    merge_s = merge_seconds(leaf_sizes(n, args.rows_per_fragment, index_bytes), args.workers,
                            args.max_segment_mb << 20, sc["merge_bytes_per_s"])
    # A worker's peak (docs/distributed.md, "Memory of a worker"): the
    # calibration's, plus what a larger fragment adds to an encode task (the
    # source reader's buffers, READER_BYTES_PER_SOURCE_BYTE of the
    # fragment's vectors, and the segment being encoded), plus a 4 MiB
    # window for each merge input beyond the calibration's.
    bpv = bytes_per_vector(args.dim, args.bits)
    cal_frag = cal.get("rows_per_fragment", cal["rows"])
    cal_inputs = min(8, max(1, cal.get("tasks", 1)))
    big_inputs = min(8, max(1, -(-n // args.rows_per_fragment)))
    more_rows = max(0, args.rows_per_fragment - cal_frag)
    rss = (cal["worker_peak_rss"]
           + more_rows * (READER_BYTES_PER_SOURCE_BYTE * args.dim * 4 + bpv)
           + max(0, big_inputs - cal_inputs) * (4 << 20))
    pred = {
        "index_bytes": index_bytes,
        "index_bytes_from_calibration": per_row * n,
        "build_s": cal["train_s"] + encode_s + merge_s,
        "train_s": cal["train_s"], "encode_s": encode_s, "merge_s": merge_s,
        "worker_peak_rss": rss,
        "search": {},
    }
    rank = sc["rank_s_per_centroid_dim"] * k * args.dim
    for pt in sc["points"]:
        # Same partitions and data distribution: the calibration's codes per
        # query scaled by the rows, at its cost per code (calibrate_search).
        codes = pt["codes_per_query"] * n / sc["rows"]
        t = rank + pt["scan_s_per_code"] * codes
        pred["search"][str(pt["nprobes"])] = {"codes_per_query": codes, "qps": 1.0 / t}
    return pred


def model_table(cal: Dict[str, Any], sc: Dict[str, Any], costs: List[Dict[str, Any]],
                real: Optional[Dict[str, Any]], cores: int = 2) -> List[Dict[str, Any]]:
    """docs/scale.md's table: 10^8 and 10^9 vectors, 384/768/1536 dims,
    1/4/9 bits; per node of ``cores`` cores. Partitions k = 4 sqrt(N) rounded
    to a power of two; nprobes the fraction of k that reached recall 0.90 on
    the real embeddings (step 3), applied to k; QPS from the probe choice's
    cost (k x d) and the search calibration's cost per code at its largest
    nprobes (the most codes a query, nearest the table's millions: step 1b),
    carried to each dimension and bit width by step 2's per-code cost there
    over its cost at the calibration's dimension and bits; build time
    from the one-thread encode rate (step 2) on ``cores`` cores plus the
    k-means of a k * 256 sample (step 1's time scaled by k^2 d)."""
    rows = []
    measured_bits = sorted({c["bits"] for c in costs})
    widest = max(sc["points"], key=lambda p: p["codes_per_query"])
    for n in (10 ** 8, 10 ** 9):
        k = 2 ** int(round(math.log2(4 * math.sqrt(n))))
        for d in (384, 768, 1536):
            for b in measured_bits:
                frac = None
                if real is not None:
                    frac = real["by_bits"].get(str(b), {}).get("nprobes_fraction", {}).get("0.9")
                frac = frac or 0.05
                nprobes = max(1, int(math.ceil(frac * k)))
                disk = n * bytes_per_vector(d, b)
                cents = k * d * 4
                enc_rate = nearest_cost(costs, d, b, "encode_rows_per_s") * cores
                per_code = widest["scan_s_per_code"] * (
                    nearest_cost(costs, d, b, "search_s_per_code")
                    / nearest_cost(costs, cal["dim"], cal["bits"], "search_s_per_code"))
                codes = n * nprobes / k
                rank = sc["rank_s_per_centroid_dim"] * k * d
                qps_core = 1.0 / (rank + per_code * codes)
                train = cal["train_s"] * (k / cal["partitions"]) ** 2 * (d / cal["dim"])
                rows.append({
                    "vectors": n, "dim": d, "bits": b, "partitions": k, "nprobes": nprobes,
                    "disk_bytes": disk + cents,
                    "memory_bytes_all_in_ram": disk + 2 * cents,
                    "nodes_at_64GiB": int(math.ceil((disk + 2 * cents) / (64 << 30))),
                    "encode_hours_per_node": n / enc_rate / 3600,
                    "train_hours": train / 3600,
                    "codes_per_query": codes,
                    "qps_per_node_if_one_node": qps_core * cores,
                })
    return rows


# --------------------------------------------------------------- big run


def big_run(args: argparse.Namespace, work: str) -> Dict[str, Any]:
    """Step 4: write the source, build with the process pool, then search in
    a fresh process."""
    import bitshard

    uri = os.path.join(work, f"big-{args.rows}x{args.dim}.lance")
    out: Dict[str, Any] = {"rows": args.rows, "dim": args.dim, "bits": args.bits,
                           "partitions": args.partitions, "workers": args.workers}
    if not os.path.isdir(uri):
        log("writing", uri)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c",
                        "import sys; sys.path.insert(0, %r); import bench.scale as m; "
                        "m.write_source(%r, %d, %d, %d)" % (os.path.dirname(HERE), uri, args.rows,
                                                           args.dim, args.rows_per_fragment)],
                       check=True)
        out["write_source_s"] = time.perf_counter() - t0
    shutil.rmtree(os.path.join(uri, "_bitshard"), ignore_errors=True)
    out["load_before_build"] = load()
    log("building")
    t0 = time.perf_counter()
    with PeakWatcher() as watch:
        ds = bitshard.build_index(uri, "vec", name="idx", num_partitions=args.partitions,
                                  sample_rate=args.sample_rate, max_iters=args.max_iters,
                                  num_bits=args.bits, executor="processes",
                                  num_workers=args.workers, fragments_per_task=1, seed=0,
                                  max_segment_bytes=args.max_segment_mb << 20, progress=False)
    out["build_s"] = time.perf_counter() - t0
    st = ds.last_build_stats
    out["build_seconds"] = st["seconds"]
    out["segments"] = len(st["final_segments"])
    out["shared_centroids"] = st["shared_centroids"]
    out["index_bytes"] = sum(s["size_bytes"] for s in ds.describe_indices()[0]["segments"])
    out["worker_peak_rss"] = max(watch.peaks.values()) if watch.peaks else 0
    out["driver_peak_rss"] = vm_hwm()
    out["load_after_build"] = load()
    log("build done", out["build_s"], "s;", out["segments"], "segments")
    # The search in a fresh process, so that its peak RSS is its own.
    res = subprocess.run([sys.executable, "-m", "bench.scale", "--search-only", uri,
                          "--dim", str(args.dim), "--queries", str(args.queries),
                          "--nprobes", ",".join(map(str, args.nprobes))],
                         check=True, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    out["search"] = json.loads(res.stdout)
    return out


def search_only(uri: str, args: argparse.Namespace) -> Dict[str, Any]:
    """The big run's search: exact neighbours by streaming, then the sweep."""
    import bitshard

    q = queries_for(uri, args.queries, args.dim)
    l0 = load()
    t0 = time.perf_counter()
    truth = exact_neighbours(uri, q)
    gt_s = time.perf_counter() - t0
    rss_before = vm_hwm()
    ds = bitshard.dataset(uri)
    t0 = time.perf_counter()
    ds.searcher("vec", k=K_NEIGHBOURS, nprobes=1, num_threads=1)
    open_s = time.perf_counter() - t0
    pts = []
    for p in args.nprobes:
        r = timed_search(ds, q, p)
        got = positions(ds, np.asarray(r.pop("rowids")).ravel()).reshape(q.shape[0], -1)
        r["recall"] = recall(got, truth)
        r["qps_2_threads"] = timed_search(ds, q, p, threads=2, repeats=2)["qps"]
        pts.append(r)
    return {"exact_s": gt_s, "open_s": open_s, "rss_before_search": rss_before,
            "peak_rss": vm_hwm(), "points": pts, "load": [l0, load()]}


# ------------------------------------------------------------------- main


def compare(pred: Dict[str, Any], big: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Measured beside predicted, with the ratio; good within 30%."""
    rows = [("index bytes", pred["index_bytes"], big["index_bytes"]),
            ("build seconds", pred["build_s"], big["build_s"]),
            ("encode seconds", pred["encode_s"], big["build_seconds"]["encode"]),
            ("merge seconds", pred["merge_s"], big["build_seconds"]["merge"]),
            ("worker peak RSS", pred["worker_peak_rss"], big["worker_peak_rss"])]
    for p in big["search"]["points"]:
        pp = pred["search"].get(str(p["nprobes"]))
        if pp:
            rows.append((f"codes/query nprobes={p['nprobes']}", pp["codes_per_query"],
                         p["codes_per_query"]))
            rows.append((f"QPS 1 thread nprobes={p['nprobes']}", pp["qps"], p["qps"]))
    return [{"figure": f, "predicted": a, "measured": b, "ratio": b / a if a else None,
             "within_30pct": (abs(b / a - 1) <= 0.3) if a else None} for f, a, b in rows]


def summary(res: Dict[str, Any]) -> str:
    lines = [f"command: {res['command']}", f"machine: {res['machine']}"]
    c = res["calibration"]
    lines.append(f"calibration ({c['rows']} rows): train {c['train_s']:.1f} s, encode "
                 f"{c.get('encode_start_s', 0):.1f} s + {c['encode_rows_per_s']:,.0f} rows/s "
                 f"({res['args']['workers']} workers), merge "
                 f"{c['merge_bytes_per_s'] / 1e6:,.0f} MB/s; load {c['load_before']} -> "
                 f"{c['load_after']}")
    sc = res.get("search_calibration")
    if sc:
        lines.append(f"search calibration ({sc['rows']:,} rows, {res['args']['partitions']} "
                     f"partitions): probe choice {sc['rank_s_per_centroid_dim'] * 1e12:.1f} ps "
                     f"x k x d; merge {sc['merge_bytes_per_s'] / 1e6:,.0f} MB/s "
                     f"(what the prediction uses); load {sc['load_before']} -> {sc['load_after']}")
        for p in sc["points"]:
            lines.append(f"  nprobes={p['nprobes']:4d}: {p['s_per_query'] * 1e6:8.1f} us a query, "
                         f"{p['codes_per_query']:10,.0f} codes ({p['scan_s_per_code'] * 1e9:.2f} "
                         f"ns each after the probe choice), {p['stage2_per_query']:7,.0f} stage-2")
    for r in res.get("costs") or []:
        lines.append(f"  d={r['dim']:5d} bits={r['bits']}: encode {r['encode_rows_per_s']:,.0f} "
                     f"rows/s/thread, search {r['search_s_per_code'] * 1e9:.2f} ns/code")
    if res.get("real"):
        for b, v in res["real"]["by_bits"].items():
            lines.append(f"  real {res['real']['path']} {b}-bit: nprobes/k for recall "
                         f"0.90/0.95 = {v['nprobes_fraction']}")
    if res.get("big"):
        b = res["big"]
        lines.append(f"big run: {b['rows']:,} x {b['dim']}, {b['bits']}-bit, k={b['partitions']}, "
                     f"{b['segments']} segment(s), shared centroids {b['shared_centroids']}; "
                     f"load {b['load_before_build']} -> {b['load_after_build']}")
        lines.append(f"  driver peak RSS {b['driver_peak_rss'] / 2**20:,.0f} MiB, worker "
                     f"{b['worker_peak_rss'] / 2**20:,.0f} MiB, search process "
                     f"{b['search']['peak_rss'] / 2**20:,.0f} MiB; index "
                     f"{b['index_bytes'] / 2**20:,.0f} MiB")
        for p in b["search"]["points"]:
            lines.append(f"  nprobes={p['nprobes']:4d}: recall@10 {p['recall']:.3f}, QPS "
                         f"{p['qps']:,.0f} (1 thread), {p['qps_2_threads']:,.0f} (2 threads), "
                         f"{p.get('source_reads_per_query', 0):,.0f} source rows read a query")
        lines.append(f"  {'figure':32s} {'predicted':>14s} {'measured':>14s} ratio")
        for r in res["comparison"]:
            lines.append(f"  {r['figure']:32s} {r['predicted']:14,.1f} {r['measured']:14,.1f} "
                         f"{r['ratio']:.2f}{'' if r['within_30pct'] else '  (off by more than 30%)'}")
    if res.get("model"):
        lines.append("model, per node of the measured cores (docs/scale.md):")
        lines.append(f"  {'vectors':>7s} {'dim':>5s} {'bits':>4s} {'k':>7s} {'nprobes':>7s} "
                     f"{'disk GB':>8s} {'RAM GB':>8s} {'encode h':>9s} {'train h':>8s} "
                     f"{'QPS':>9s}")
        for m in res["model"]:
            lines.append(f"  {m['vectors']:7.0e} {m['dim']:5d} {m['bits']:4d} {m['partitions']:7d} "
                         f"{m['nprobes']:7d} {m['disk_bytes'] / 1e9:8.1f} "
                         f"{m['memory_bytes_all_in_ram'] / 1e9:8.1f} "
                         f"{m['encode_hours_per_node']:9.1f} {m['train_hours']:8.2f} "
                         f"{m['qps_per_node_if_one_node']:9.2f}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4,
                    help="bits of the calibration and the big run: 4 (the default) or more "
                         "search without reading the source; 1 bit reranks from it, a "
                         "per-query cost the model does not cover")
    ap.add_argument("--partitions", type=int, default=1024)
    ap.add_argument("--sample-rate", type=int, default=64,
                    help="k-means sample rows per partition (calibration and big run)")
    ap.add_argument("--max-iters", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows-per-fragment", type=int, default=250_000)
    ap.add_argument("--max-segment-mb", type=int, default=256)
    ap.add_argument("--calib-rows", type=int, default=300_000)
    ap.add_argument("--search-calib-rows", type=int, default=None,
                    help="rows of the search calibration (default: partitions of 2,000 rows, "
                         "at most a quarter of --rows)")
    ap.add_argument("--cost-rows", type=int, default=60_000,
                    help="rows of the per-dimension sets at 128 dims (fewer at more)")
    ap.add_argument("--dims", default="128,384,768,1536")
    ap.add_argument("--bits-list", default="1,4,9")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--nprobes", default="4,8,16,32,64")
    ap.add_argument("--real", default=os.path.join(
        os.environ.get("BITSHARD_BENCH_CACHE") or os.path.join(HERE, "cache"),
        "wordnet-n30000-q1000"))
    ap.add_argument("--work", default=os.path.join(HERE, "cache", "scale"))
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--search-only", metavar="URI")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scale.json"))
    args = ap.parse_args(argv)
    args.dims = [int(x) for x in args.dims.split(",")]
    args.bits_list = [int(x) for x in args.bits_list.split(",")]
    args.nprobes = [int(x) for x in args.nprobes.split(",")]
    if args.search_only:
        print(json.dumps(search_only(args.search_only, args)))
        return 0
    import platform

    import bitshard

    os.makedirs(args.work, exist_ok=True)
    res: Dict[str, Any] = {
        "command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores; python "
                   f"{platform.python_version()}; kernel {bitshard._native.simd_level()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "args": {k: v for k, v in vars(args).items()},
        "load_start": load(),
    }
    def save() -> None:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=float)
        with open(args.out[:-5] + "-summary.txt", "w") as f:
            f.write(summary(res))

    # The big run right after the calibration that predicts it (the load of
    # a shared machine drifts); the model's other inputs after. Saved after
    # every step.
    log("calibration")
    res["calibration"] = cal = calibrate(args, args.work)
    cal["partitions"], cal["dim"], cal["bits"] = args.partitions, args.dim, args.bits
    log("search calibration")
    res["search_calibration"] = sc = calibrate_search(args, args.work)
    save()
    res["prediction"] = predict_big(args, cal, sc, [])
    res["costs"], res["real"] = [], None
    save()
    if not args.skip_big:
        res["big"] = big_run(args, args.work)
        res["comparison"] = compare(res["prediction"], res["big"])
        save()
    log("per-dimension costs")
    res["costs"] = per_dim_costs(args)
    save()
    log("real embeddings")
    res["real"] = real_recall(args)
    res["model"] = model_table(cal, sc, res["costs"], res["real"], cores=os.cpu_count() or 2)
    res["load_end"] = load()
    save()
    sys.stdout.write(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
