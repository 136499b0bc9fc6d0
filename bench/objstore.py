"""Open time, first-query time and bytes read against index size (issue 14).

    python -m bench.objstore                                  # 10^5 and 10^6 rows
    python -m bench.objstore --rows 100000,300000 --queries 5 --out bench/results/objstore-small.json

For each row count, at a fixed partition count: synthetic clustered vectors
are written as a Lance dataset, one IVF model is trained and the same bitshard
index is built twice, in a local directory and on a moto S3 server this
harness starts (its own process, loopback port); pylance 14's own IVF_RQ index
is built on the Lance dataset beside them. Then every measurement runs in a
**new process**:

- ``local``: the segment files' pages are dropped from the page cache first
  (``posix_fadvise(DONTNEED)``, which needs no privilege; whether the kernel
  honoured it is not checked); then the Dataset is made (``dataset_s``: the
  Lance source opened), the index opened (manifest, segments: ``open_s``),
  one query searched (``first_query_s``)
  and another (``second_query_s``). Bytes read: ``major_faults`` (pages the
  process faulted in from storage, a mapped file's reads) and
  ``read_bytes`` from ``/proc/self/io`` (storage I/O, when the kernel counts
  it).
- ``moto``: the same against the S3 root with no ``cache_dir``: the segments
  are opened from their prefix and the first query fetches its probes by
  range; ``bitshard.ranged.read_stats()`` gives the GETs and bytes after the
  open and after the first query.
- ``pylance``: the Lance dataset's files dropped from the page cache, then
  ``lance.dataset(uri)`` and its first ``nearest`` query (IVF_RQ, same
  partitions, nprobes and bits) and a second one.

What to expect (docs/distributed.md, "What a search reads from an object
store"): open time and bytes flat in the row count (the prefix is the
centroids, the fragment table and the directory); first-query bytes about
``nprobes / partitions`` of the codes. Results go to ``--out`` as JSON with
the 1-minute load average before and after each child, and a table is
printed. On a machine shared with other work the times are not meaningful:
the output says ``loaded`` when the load average exceeded the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List

import numpy as np

BUCKET = "bench-objstore"
KEY_ID, SECRET = "bench-key", "bench-secret"

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
mode, cfg = sys.argv[1], json.loads(sys.argv[2])

def drop_cache(paths):
    for root in paths:
        for d, _, files in os.walk(root):
            for f in files:
                try:
                    fd = os.open(os.path.join(d, f), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

def io_read_bytes():
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None

Q = np.load(cfg["queries"])
out = {}
if mode in ("local", "moto"):
    import bitshard
    from bitshard import ranged
    if mode == "local":
        drop_cache([cfg["local_root"]])
    f0, r0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, io_read_bytes()
    ranged.read_stats(reset=True)
    t = time.perf_counter()
    opts = cfg.get("storage_options") if mode == "moto" else None
    root = cfg["s3_root"] if mode == "moto" else cfg["local_root"]
    ds = bitshard.dataset(cfg["uri"], index_uri=root, storage_options=opts)
    out["dataset_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ds._indexes.open("idx")
    out["open_s"] = time.perf_counter() - t
    out["open_get"] = ranged.read_stats(reset=True)
    t = time.perf_counter()
    ds.search("vec", Q[0], k=10, nprobes=cfg["nprobes"], columns=[])
    out["first_query_s"] = time.perf_counter() - t
    out["first_query_get"] = ranged.read_stats(reset=True)
    t = time.perf_counter()
    ds.search("vec", Q[1], k=10, nprobes=cfg["nprobes"], columns=[])
    out["second_query_s"] = time.perf_counter() - t
    out["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0
    r1 = io_read_bytes()
    out["read_bytes"] = None if r0 is None or r1 is None else r1 - r0
else:
    import lance
    drop_cache([cfg["uri"]])
    f0, r0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, io_read_bytes()
    t = time.perf_counter()
    ds = lance.dataset(cfg["uri"])
    out["open_s"] = time.perf_counter() - t
    nearest = {"column": "vec", "k": 10, "nprobes": cfg["nprobes"]}
    t = time.perf_counter()
    ds.to_table(columns=["id"], nearest=dict(nearest, q=Q[0]))
    out["first_query_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ds.to_table(columns=["id"], nearest=dict(nearest, q=Q[1]))
    out["second_query_s"] = time.perf_counter() - t
    out["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - f0
    r1 = io_read_bytes()
    out["read_bytes"] = None if r0 is None or r1 is None else r1 - r0
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(logdir: str):
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(os.path.join(logdir, "moto.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start; see {log.name}")
            time.sleep(0.2)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID,
                 aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(
        Bucket=BUCKET)
    opts = {"endpoint_override": endpoint, "access_key": KEY_ID, "secret_key": SECRET,
            "region": "us-east-1"}
    return proc, opts


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, d)).astype(np.float32) * 3
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        out[s:s + m] = centres[rng.integers(0, 256, size=m)] + rng.normal(size=(m, d))
    return out


def _child(mode: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    load0 = os.getloadavg()[0]
    p = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(cfg)],
                       capture_output=True, text=True, timeout=3600)
    load1 = os.getloadavg()[0]
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"],
                "loadavg_before_after": [load0, load1]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["loadavg_before_after"] = [load0, load1]
    return out


def run(rows: List[int], dim: int, partitions: int, nprobes: int, bits: int, queries: int,
        workdir: str, pylance: bool) -> Dict[str, Any]:
    """Build and measure every row count; returns the result document."""
    import lance
    import pyarrow as pa

    import bitshard

    moto, opts = _start_moto(workdir)
    results: List[Dict[str, Any]] = []
    try:
        for n in rows:
            x = _clustered(n, dim, seed=n)
            uri = os.path.join(workdir, f"v{n}.lance")
            lance.write_dataset(pa.table({
                "id": pa.array(np.arange(n, dtype=np.int64)),
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}),
                uri, mode="overwrite", max_rows_per_file=100_000)
            qpath = os.path.join(workdir, f"q{n}.npy")
            np.save(qpath, x[:: max(1, n // queries)][:queries] + 0.01)
            ds = bitshard.dataset(uri)
            t = time.perf_counter()
            ivf = bitshard.train_ivf(ds, "vec", num_partitions=partitions, seed=1)
            rot = bitshard.build_rq_rotation(dimension=dim, num_bits=bits, seed=2)
            local_root = os.path.join(workdir, f"idx{n}")
            bitshard.dataset(uri, index_uri=local_root).create_index(
                "vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot)
            s3_root = f"s3://{BUCKET}/idx{n}"
            bitshard.dataset(uri, index_uri=s3_root, storage_options=opts).create_index(
                "vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot)
            build_s = time.perf_counter() - t
            seg_bytes = sum(os.path.getsize(os.path.join(d, f))
                            for d, _, fs in os.walk(os.path.join(local_root, "segments"))
                            for f in fs)
            cfg = {"uri": uri, "local_root": local_root, "s3_root": s3_root,
                   "storage_options": opts, "queries": qpath, "nprobes": nprobes}
            row: Dict[str, Any] = {"rows": n, "dim": dim, "partitions": partitions,
                                   "nprobes": nprobes, "num_bits": bits,
                                   "segment_bytes": seg_bytes, "build_both_s": build_s,
                                   "local": _child("local", cfg), "moto": _child("moto", cfg)}
            if pylance:
                try:
                    lance.dataset(uri).create_index(
                        "vec", index_type="IVF_RQ", num_partitions=partitions,
                        num_bits=bits, metric="l2", replace=True)
                    row["pylance"] = _child("pylance", cfg)
                except Exception as e:  # noqa: BLE001 - reported in the row
                    row["pylance"] = {"error": [f"{type(e).__name__}: {e}"]}
            results.append(row)
            print(_line(row), flush=True)
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    cores = os.cpu_count() or 1
    loads = [v for r in results for k in ("local", "moto", "pylance")
             for v in r.get(k, {}).get("loadavg_before_after", [])]
    return {"harness": "python -m bench.objstore", "cores": cores,
            "loaded": bool(loads) and max(loads) > cores, "max_loadavg": max(loads, default=0),
            "results": results}


def _fmt(v: Any, scale: float = 1.0, unit: str = "") -> str:
    return "-" if v is None else f"{v * scale:.3g}{unit}"


def _line(r: Dict[str, Any]) -> str:
    m, lo, pl = r["moto"], r["local"], r.get("pylance", {})
    og, fg = m.get("open_get") or {}, m.get("first_query_get") or {}
    return (f"rows {r['rows']:>9}  segment {r['segment_bytes'] / 1e6:8.1f} MB | local open "
            f"{_fmt(lo.get('open_s'), 1e3, 'ms')} first {_fmt(lo.get('first_query_s'), 1e3, 'ms')}"
            f" faults {lo.get('major_faults')} | moto open {_fmt(m.get('open_s'), 1e3, 'ms')} "
            f"({og.get('requests')} GET, {_fmt(og.get('bytes'), 1e-3, 'kB')}) first "
            f"{_fmt(m.get('first_query_s'), 1e3, 'ms')} ({fg.get('requests')} GET, "
            f"{_fmt(fg.get('bytes'), 1e-3, 'kB')}) | pylance open "
            f"{_fmt(pl.get('open_s'), 1e3, 'ms')} first {_fmt(pl.get('first_query_s'), 1e3, 'ms')}"
            + (f" error {pl['error']}" if "error" in pl else ""))


def main(argv: List[str] = None) -> int:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m bench.objstore", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--rows", default="100000,1000000", help="comma-separated row counts")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--partitions", type=int, default=256)
    ap.add_argument("--nprobes", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--no-pylance", action="store_true")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory")
    ap.add_argument("--out", default="bench/results/objstore.json")
    a = ap.parse_args(argv)
    rows = [int(v) for v in a.rows.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="bench-objstore-") as tmp:
        doc = run(rows, a.dim, a.partitions, a.nprobes, a.bits, max(2, a.queries),
                  a.workdir or tmp, not a.no_pylance)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{'LOADED machine: times are not meaningful; ' if doc['loaded'] else ''}"
          f"max load average {doc['max_loadavg']:.1f} on {doc['cores']} cores; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
