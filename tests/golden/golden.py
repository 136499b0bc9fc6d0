"""Freeze bitshard's observable behaviour: segment bytes and search answers.

Builds a fixed set of indexes (1, 4 and 9 bits; l2, cosine and dot; one
segment per index, merged from two workers' segments, and left as two
unmerged committed segments) with fixed seeds and fixed segment uuids, runs a
fixed query set through ``Dataset.search``, the prepared searcher (one query
and a batch) and the 1-bit rerank path, and writes one digest per artifact.

Run it with the code before and after a change that must not change
behaviour, and compare the two files:

    python tests/golden/golden.py --out before.json      # on the old commit
    python tests/golden/golden.py --out after.json       # on the new one
    python tests/golden/golden.py --compare before.json after.json

``--compare`` prints every key that differs and exits 1 if any does. The
digests are SHA-256 over the raw segment file bytes and over the little-endian
bytes of the row-id and distance arrays, so "equal" means byte for byte and
bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import tempfile
from typing import Dict

import numpy as np

ROWS, DIM, QUERIES, PARTITIONS = 6000, 48, 40, 16
FRAGMENT = 1000
WIDE_DIM, WIDE_ROWS, WIDE_PARTITIONS = 768, 3000, 96


def _uuid(n: int) -> str:
    return f"{n:032x}"


def _encode(ds, name, parts, ivf, rot, metric, serials):
    """One uncommitted segment per fragment list, uuids from ``serials``."""
    return [ds.create_index_uncommitted(
        "vector", "IVF_RQ", name=name, ivf_centroids=ivf, rq_rotation=rot, fragment_ids=p,
        metric=metric, index_uuid=_uuid(next(serials)), num_threads=1) for p in parts]


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _data() -> tuple:
    rng = np.random.default_rng(20261202)
    centres = rng.normal(size=(24, DIM)).astype(np.float32) * 3
    labels = rng.integers(0, 24, size=ROWS + QUERIES)
    x = (centres[labels] + rng.normal(size=(ROWS + QUERIES, DIM))).astype(np.float32)
    x[5] = 0.0                      # a zero vector (cosine's degenerate case)
    x[7] = x[8]                     # duplicates: ties broken by row id
    return x[:ROWS].copy(), x[ROWS:].copy()


def run(workdir: str) -> Dict[str, str]:
    import bitshard

    base, queries = _data()
    out: Dict[str, str] = {}
    serials = itertools.count(1)
    for metric in ("l2", "cosine", "dot"):
        ds0 = bitshard.dataset(base, fragment_size=FRAGMENT,
                               index_uri=os.path.join(workdir, f"idx-{metric}"))
        ivf = bitshard.train_ivf(ds0, "vector", PARTITIONS, metric=metric, seed=3,
                                 num_threads=1)
        for bits in (1, 4, 9):
            rot = bitshard.build_rq_rotation(dimension=DIM, num_bits=bits, seed=11)
            tag = f"{metric}-{bits}bit"
            ds = bitshard.dataset(base, fragment_size=FRAGMENT,
                                  index_uri=os.path.join(workdir, tag))
            frags = [f.id for f in ds.source.fragments()]
            halves = (frags[: len(frags) // 2], frags[len(frags) // 2:])
            segs = _encode(ds, "merged", halves, ivf, rot, metric, serials)
            merged = ds.merge_existing_index_segments(segs, index_uuid=_uuid(next(serials)))
            ds.commit_existing_index_segments("merged", "vector", [merged])
            # Committed out of order on purpose.
            unmerged = _encode(ds, "unmerged", halves[::-1], ivf, rot, metric, serials)
            ds.commit_existing_index_segments("unmerged", "vector", unmerged)
            single = _encode(ds, "single", [frags], ivf, rot, metric, serials)[0]
            for label, h in [("seg-a", segs[0]), ("seg-b", segs[1]), ("merged", merged),
                             ("single", single)]:
                out[f"{tag}/file/{label}"] = _file_digest(h.path)
            for name in ("merged", "unmerged"):
                for nprobes in (1, 4, PARTITIONS):
                    for refine in (None, 3):
                        t = ds.search("vector", queries[0], k=10, nprobes=nprobes,
                                      refine_factor=refine, index=name)
                        key = f"{tag}/{name}/search/np{nprobes}/rf{refine}"
                        out[key] = _digest(t.column("_rowid").to_numpy(),
                                           t.column("_distance").to_numpy())
                    s = ds.searcher("vector", k=10, nprobes=nprobes, index=name)
                    r1, d1 = s.search(queries[1])
                    rb, db = s.search(queries)
                    out[f"{tag}/{name}/searcher/np{nprobes}/one"] = _digest(r1, d1)
                    out[f"{tag}/{name}/searcher/np{nprobes}/batch"] = _digest(rb, db)
                t = ds.search("vector", queries[2], k=25, nprobes=4, index=name,
                              fragment_ids=[0, 2, 5], eps0=4.0)
                out[f"{tag}/{name}/search/filtered"] = _digest(
                    t.column("_rowid").to_numpy(), t.column("_distance").to_numpy())
    out.update(_run_wide(workdir))
    return out


def _run_wide(workdir: str) -> Dict[str, str]:
    """768 dimensions and 96 partitions: the float16 probe pre-pass (which
    needs at least 256 dimensions and 64 partitions) and the fast rotation's
    padding of a dimension that is not a power of two."""
    import bitshard

    rng = np.random.default_rng(768)
    dim, rows, parts = WIDE_DIM, WIDE_ROWS, WIDE_PARTITIONS
    centres = rng.normal(size=(40, dim)).astype(np.float32)
    labels = rng.integers(0, 40, size=rows + 8)
    x = (centres[labels] + 0.5 * rng.normal(size=(rows + 8, dim))).astype(np.float32)
    base, queries = x[:rows].copy(), x[rows:].copy()
    out: Dict[str, str] = {}
    serials = itertools.count(10_000)
    for metric in ("l2", "cosine"):
        ds0 = bitshard.dataset(base, fragment_size=FRAGMENT,
                               index_uri=os.path.join(workdir, f"wide-idx-{metric}"))
        ivf = bitshard.train_ivf(ds0, "vector", parts, metric=metric, seed=5, num_threads=1)
        for bits in (1, 9):
            rot = bitshard.build_rq_rotation(dimension=dim, num_bits=bits, seed=13)
            tag = f"wide-{metric}-{bits}bit"
            ds = bitshard.dataset(base, fragment_size=FRAGMENT,
                                  index_uri=os.path.join(workdir, tag))
            frags = [f.id for f in ds.source.fragments()]
            segs = _encode(ds, "merged", (frags[:1], frags[1:]), ivf, rot, metric, serials)
            merged = ds.merge_existing_index_segments(segs, index_uuid=_uuid(next(serials)))
            ds.commit_existing_index_segments("merged", "vector", [merged])
            out[f"{tag}/file/merged"] = _file_digest(merged.path)
            for nprobes in (8, parts):
                s = ds.searcher("vector", k=10, nprobes=nprobes, index="merged")
                rb, db = s.search(queries)
                out[f"{tag}/searcher/np{nprobes}/batch"] = _digest(rb, db)
                t = ds.search("vector", queries[0], k=10, nprobes=nprobes, index="merged",
                              refine_factor=2)
                out[f"{tag}/search/np{nprobes}/rf2"] = _digest(
                    t.column("_rowid").to_numpy(), t.column("_distance").to_numpy())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the digests here (JSON)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        with open(args.compare[0]) as f:
            a = json.load(f)
        with open(args.compare[1]) as f:
            b = json.load(f)
        bad = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        for k in bad:
            print(f"differs: {k}")
        print(f"{len(set(a) | set(b)) - len(bad)} equal, {len(bad)} differ")
        return 1 if bad else 0
    with tempfile.TemporaryDirectory(prefix="bitshard-golden-") as d:
        out = run(d)
    text = json.dumps(out, indent=1, sort_keys=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    print(f"{len(out)} digests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
