"""Memory of a distributed build: workers stream fragments, so their peak RSS
is bounded by a batch plus their segment, not by the dataset.

    python -m bench.memory [--rows 1500000] [--dim 128] [--workers 2]

Writes a Lance dataset several times larger than one worker's peak, runs
``bitshard.build_index`` with the process-pool executor (one task per
fragment), and records the source size, the peak RSS of the largest worker
process and of the driver, and the build time in
``bench/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa

from bench.rss import PeakWatcher, vm_hwm

HERE = os.path.dirname(os.path.abspath(__file__))


def write_source(uri: str, rows: int, dim: int, rows_per_fragment: int) -> int:
    """Write clustered float32 vectors in batches (never all in memory)."""
    import lance

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(256, dim)).astype(np.float32) * 3

    def batches():
        done = 0
        while done < rows:
            n = min(100_000, rows - done)
            lab = rng.integers(0, 256, n)
            v = centres[lab] + rng.normal(size=(n, dim)).astype(np.float32)
            yield pa.record_batch({
                "id": pa.array(np.arange(done, done + n)),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim),
            })
            done += n

    schema = pa.schema([("id", pa.int64()), ("vec", pa.list_(pa.float32(), dim))])
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    lance.write_dataset(reader, uri, max_rows_per_file=rows_per_fragment, mode="overwrite")
    return rows * dim * 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_500_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows-per-fragment", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "memory.json"))
    ap.add_argument("--cache", default=os.path.join(HERE, "cache"))
    args = ap.parse_args(argv)

    import bitshard

    os.makedirs(args.cache, exist_ok=True)
    uri = os.path.join(args.cache, f"memory-{args.rows}x{args.dim}.lance")
    if not os.path.isdir(uri):
        print(f"writing {args.rows} x {args.dim} vectors to {uri}", file=sys.stderr)
        # in a child, so that the driver's own peak is the build's
        subprocess.run([sys.executable, "-c",
                        "import sys; sys.path.insert(0, %r); import bench.memory as m; "
                        "m.write_source(%r, %d, %d, %d)" % (os.path.dirname(HERE), uri, args.rows,
                                                           args.dim, args.rows_per_fragment)],
                       check=True)
    shutil.rmtree(os.path.join(uri, "_bitshard"), ignore_errors=True)
    source_bytes = args.rows * args.dim * 4
    rss_before = vm_hwm()
    t0 = time.perf_counter()
    with PeakWatcher() as watch:
        ds = bitshard.build_index(uri, "vec", name="mem", num_partitions=args.partitions,
                                  executor="processes", num_workers=args.workers,
                                  fragments_per_task=1, progress=False)
    seconds = time.perf_counter() - t0
    worker_peak = max(watch.peaks.values()) if watch.peaks else 0
    driver_peak = vm_hwm()
    seg_bytes = sum(s["size_bytes"] for s in ds.describe_indices()[0]["segments"])
    row = {
        "rows": args.rows,
        "dim": args.dim,
        "workers": args.workers,
        "fragments": len(ds.source.fragments()),
        "source_vector_bytes": source_bytes,
        "largest_worker_peak_rss_bytes": worker_peak,
        "worker_peaks_bytes": sorted(watch.peaks.values(), reverse=True)[: args.workers + 2],
        "driver_peak_rss_bytes": driver_peak,
        "driver_rss_before_build_bytes": rss_before,
        "index_bytes": seg_bytes,
        "build_seconds": round(seconds, 2),
        "source_over_worker_peak": round(source_bytes / max(worker_peak, 1), 2),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(row, f, indent=1)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
