"""Which num_bits gives the most recall per unit of time (the default's
evidence, docs/decisions.md): one Lance dataset, one set of centroids, an
index per bit width, single-query calls on one thread, a sweep of nprobes.

    python -m bench.bits [--rows 50000] [--dim 128]

Writes bench/results/bits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--partitions", type=int, default=224)
    ap.add_argument("--bits", default="1,2,4,9")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bits.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "python"))
    from conftest import brute_force, clustered, recall, rowids_to_positions, write_lance

    import bitshard

    x = clustered(args.rows + args.queries, args.dim, clusters=64, seed=3)
    base, qs = x[: args.rows], x[args.rows:]
    d = tempfile.mkdtemp(prefix="bitshard-bits-")
    uri = write_lance(os.path.join(d, "a.lance"), base, args.rows // 4)
    ds = bitshard.dataset(uri)
    ivf = bitshard.train_ivf(ds, "vec", args.partitions, max_iters=10)
    truth = brute_force(base, qs, 10)
    bits = [int(b) for b in args.bits.split(",")]
    for nb in bits:
        ds.create_index("vec", "IVF_RQ", name=f"i{nb}", ivf_centroids=ivf, num_bits=nb)
    rows_out = []
    for nb in bits:
        for npr in (2, 4, 8, 16, 32):
            t = time.perf_counter()
            got = [ds.search("vec", q, k=10, nprobes=npr, index=f"i{nb}", num_threads=1)
                   .column("_rowid").to_numpy() for q in qs]
            dt = time.perf_counter() - t
            r = recall(rowids_to_positions(ds, np.array(got)), truth)
            row = {"num_bits": nb, "nprobes": npr, "recall_at_10": round(r, 4),
                   "qps": round(len(qs) / dt, 1), "rows": args.rows, "dim": args.dim,
                   "source": "lance", "threads": 1}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows_out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
