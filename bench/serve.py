"""Search fanned out on Ray (bitshard.serve): batch QPS with 1 and 2 actors
against one process, the bytes each actor holds, and what the distributed
path adds to a query's latency.

    python -m bench.serve [--rows 1000000] [--dim 128] [--partitions 256] [--bits 4]
                          [--queries 4000] [--batch 200] [--nprobes 16] [--k 10]
                          [--actors 1,2] [--loaded] [--out bench/results/serve.json]

The defaults are the run to make on a quiet machine: at 10^6 x 128, 256
partitions and nprobes 16 a query scans about 62,500 codes, so a batch of
200 is tens of milliseconds of scan against about a millisecond of Ray round
trip (``ray_round_ms``): the QPS measures the scan split over actors, not
Ray. Smaller sets (the first run's 20,000 rows) measure Ray.

One command: writes clustered vectors as a Lance dataset in a temporary
directory, builds the index (process pool), then on a local Ray of 2 CPUs:

- ``qps_single``: ``Dataset.searcher(...).search`` of batches of ``--batch``
  queries at one thread, in this process;
- per actor count n: ``qps`` of ``Service.search`` on the same batches (each
  actor 1 CPU, 1 thread), ``speedup`` over n = 1, every answer checked equal
  to the single process's; ``rss_bytes`` and ``segment_bytes`` of each actor
  (``Service.memory``), and ``share_bytes`` (segment bytes / n: what an actor
  holds once actors attach only their share);
- ``latency_ms``: one query at a time, median over ``--latency-queries``:
  one process, the service, a no-op call to every actor (``ray_round_ms``),
  and the front with its shares in this process, without Ray;
- ``round1_ms`` / ``round2_ms`` (per actor count): one query's two Ray
  rounds (the median); round 2 is the latency the second round adds;
- ``candidates_shipped_2_shares``: codes round 2 returns (two shares, in
  process), against ``candidates_one_round_would_ship_2_shares`` (every
  code under each share's own threshold, what a single round returned
  before) and ``answers_kept`` (the rows the answers keep).

A machine shared with other jobs gives numbers of that load: ``--loaded``
records that the run was such (``"loaded": true``), with the load average
before and after; a load average above the core count before or after
marks the run loaded too. ``seconds`` is the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _write(uri: str, rows: int, dim: int, seed: int = 0) -> np.ndarray:
    import lance
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, dim)).astype(np.float32) * 3
    x = centres[rng.integers(0, 256, rows)] + rng.normal(size=(rows, dim)).astype(np.float32)
    lance.write_dataset(pa.table({
        "id": np.arange(rows),
        "vec": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}),
        uri, max_rows_per_file=max(1, rows // 8))
    return x


def _qps(fn: Any, batches: List[np.ndarray]) -> float:
    fn(batches[0])  # warm: caches, Ray's first calls
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(b.shape[0] for b in batches) / (time.perf_counter() - t0)


def _median_ms(fn: Any, items: List[Any]) -> float:
    fn(items[0])
    times = []
    for it in items:
        t0 = time.perf_counter()
        fn(it)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--partitions", type=int, default=256)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--queries", type=int, default=4000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--latency-queries", type=int, default=100)
    p.add_argument("--nprobes", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--actors", default="1,2")
    p.add_argument("--loaded", action="store_true",
                   help="the machine was running other jobs: numbers of that load")
    p.add_argument("--out", default=os.path.join(HERE, "results", "serve.json"))
    a = p.parse_args(argv)

    import ray

    import bitshard
    from bitshard import service as sv
    from bitshard.dataset import DEFAULT_EPS0
    from bitshard.searcher import SearchOptions

    load_before = os.getloadavg()
    started = time.perf_counter()
    # removed at the end: 10^6 x 128 is 0.5 GB of data and 80 MB of index
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        uri = os.path.join(tmp, "data.lance")
        x = _write(uri, a.rows, a.dim)
        t0 = time.perf_counter()
        bitshard.build_index(uri, "vec", num_partitions=a.partitions, num_bits=a.bits,
                             executor="processes", num_workers=2, progress=False)
        build_s = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        Q = (x[rng.integers(0, a.rows, a.queries)]
             + 0.3 * rng.normal(size=(a.queries, a.dim))).astype(np.float32)
        batches = [Q[i:i + a.batch] for i in range(0, a.queries, a.batch)]
        singles = [Q[i] for i in range(min(a.latency_queries, a.queries))]
        kw = dict(k=a.k, nprobes=a.nprobes)

        ds = bitshard.dataset(uri)
        searcher = ds.searcher("vec", num_threads=1, **kw)
        want = [ds.search("vec", b, num_threads=1, **kw) for b in batches]
        out: Dict[str, Any] = {
            "rows": a.rows, "dim": a.dim, "partitions": a.partitions, "bits": a.bits,
            "queries": a.queries, "batch": a.batch, "k": a.k, "nprobes": a.nprobes,
            "build_seconds": build_s, "loaded": bool(a.loaded),
            "qps_single": _qps(lambda b: searcher.search(b), batches),
            "latency_ms": {"single_process": _median_ms(lambda q: searcher.search(q), singles)},
            "actors": {}}

        # The front's merge alone: shares in this process, no Ray.
        view = sv._FrontView(ds.storage, ds.source, ds.index_root)
        state = [pickle.dumps((ds, view.versions()))]
        shipped = kept = held = 0

        class _Local:
            def __init__(self, n: int) -> None:
                self.actors = [sv._ShareActor(i, n) for i in range(n)]

            def _scan(self, Qb: np.ndarray, options: Dict[str, Any], allowed: Any, k: int,
                      limit: Any) -> Any:
                # the service's two rounds (Service._scan) without Ray
                nonlocal shipped, held
                args = (1, state, "vec", dict(options, num_threads=1), allowed, Qb)
                ubs = [s.thresholds("t", *args) for s in self.actors]
                held += sum(int(s._pending["t"][0].sum()) for s in self.actors)
                t = sv.global_thresholds(ubs, k)
                res = [(u, *s.survivors("t", t, limit, *args)) for u, s in zip(ubs, self.actors)]
                shipped += sum(int(r[1].sum()) for r in res)
                return res

        local = _Local(2)
        front = sv._FrontSearcher(view, "vec", SearchOptions(
            index=None, refine_factor=None, fragment_ids=None, filter=None, fast_search=False,
            eps0=DEFAULT_EPS0, num_threads=1, **kw), local)
        out["latency_ms"]["in_process_2_shares"] = _median_ms(lambda q: front.search_lists(q),
                                                              singles)
        shipped = held = 0
        for b in batches:
            kept += sum(r.size for r, _ in front.search_lists(b))
        # codes round 2 ships, and what one round would have shipped (every
        # code under each actor's own threshold, held between the rounds)
        out["candidates_shipped_2_shares"] = shipped
        out["candidates_one_round_would_ship_2_shares"] = held
        out["answers_kept"] = kept

        # a Ray of its own: without address="local", ray.init joins a cluster another
        # process on this machine started (and refuses num_cpus)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            base = None
            for n in [int(v) for v in a.actors.split(",")]:
                with bitshard.serve(uri, "vec", num_actors=n, num_cpus=1) as svc:
                    got = [svc.search(b, num_threads=1, **kw) for b in batches]
                    assert all(g.equals(w) for g, w in zip(got, want)), "answers differ"
                    qps = _qps(lambda b: svc.search(b, num_threads=1, **kw), batches)
                    base = base or qps
                    lat = _median_ms(lambda q: svc.search(q, num_threads=1, **kw), singles)
                    rounds = []
                    for q in singles:
                        svc.search(q, num_threads=1, **kw)
                        rounds.append(dict(svc.last_rounds))
                    ping = _median_ms(lambda _: ray.get([h.pid.remote() for h in svc._actors]),
                                      singles)
                    mem = svc.memory()
                    out["actors"][str(n)] = {
                        "qps": qps, "speedup": qps / base, "latency_ms": lat,
                        "ray_round_ms": ping,
                        # one query: each round's median; round 2 is what the
                        # second round adds to a query's latency
                        "round1_ms": statistics.median(r["round1_s"] for r in rounds) * 1e3,
                        "round2_ms": statistics.median(r["round2_s"] for r in rounds) * 1e3,
                        "rss_bytes": [m["rss_bytes"] for m in mem],
                        "segment_bytes": [m["segment_bytes"] for m in mem],
                        "share_bytes": [m["segment_bytes"] // n for m in mem]}
                    print(f"{n} actor(s): {qps:.0f} QPS (x{qps / base:.2f}), one query "
                          f"{lat:.2f} ms (round 1 {out['actors'][str(n)]['round1_ms']:.2f} ms, "
                          f"round 2 {out['actors'][str(n)]['round2_ms']:.2f} ms), a Ray round "
                          f"{ping:.2f} ms", flush=True)
        finally:
            ray.shutdown()
        out["loadavg_before_after"] = [load_before[0], os.getloadavg()[0]]
        out["loaded"] = bool(a.loaded) or max(out["loadavg_before_after"]) > (os.cpu_count() or 1)
        out["seconds"] = time.perf_counter() - started
        print(f"one process: {out['qps_single']:.0f} QPS, one query "
              f"{out['latency_ms']['single_process']:.2f} ms; 2 shares in process "
              f"{out['latency_ms']['in_process_2_shares']:.2f} ms; {out['seconds']:.0f} s in all"
              + (" (LOADED machine: times are not meaningful)" if out["loaded"] else ""))
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
