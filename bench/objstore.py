"""Open time, first-query time and bytes read against index size (issue 14).

    python -m bench.objstore                                  # 10^5 and 10^6 rows
    python -m bench.objstore --rows 100000,300000 --queries 5 --out bench/results/objstore-small.json
    # build once (slow, any time), measure later (quiet machine):
    python -m bench.objstore --rows 100000,1000000,10000000 --workdir W --reuse --build-only
    python -m bench.objstore --rows 100000,1000000,10000000 --workdir W --measure-only

For each row count, at a fixed partition count: synthetic clustered vectors
are written as a Lance dataset, one IVF model is trained and the bitshard
index is built in a local directory; pylance 14's own IVF_RQ index is built
on the Lance dataset beside it. ``--workdir W`` keeps these builds (and
``W/objstore-state.json``, which records each finished one with the
parameters it depends on: dimension, partitions, bits); ``--reuse`` makes only
the builds W lacks; ``--build-only`` stops there; ``--measure-only`` makes no
build (a missing one is refused) and runs only what follows. A moto S3 server
(its own process, loopback port) is started and filled with the local index
root's files (moto keeps its objects in its process and nothing survives it,
so the object-store index is the local one's bytes, uploaded afresh by every
measuring call: ``moto_upload`` in the row). Then every measurement runs in a
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


# moto's server answers a ranged GET by reading the whole object and slicing
# it: each GET of a 0.8 GB segment copies 0.8 GB (seconds on a loaded
# machine, past the S3 client's 3-second low-speed limit), so first-query
# times would be moto's. The server this harness starts reads only the
# range ("bytes=a-b", the only form bitshard sends) from the object's buffer;
# every other request is moto's own.
MOTO_SERVER = r"""
import re, sys
from moto.s3.responses import S3Response
from moto.server import main

moto_get_object = S3Response.get_object

def get_object(self):
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("range") or "")
    if m is None or self.querystring.get("partNumber"):
        return moto_get_object(self)
    key, not_modified = self._get_key()
    begin, end = int(m[1]), min(int(m[2]), key.size - 1)
    if not_modified or begin > end:
        return moto_get_object(self)
    with key.lock:
        key._value_buffer.seek(begin)
        body = key._value_buffer.read(end - begin + 1)
    headers = self._get_cors_headers_other()
    headers.update(key.response_dict)
    headers.update(key.metadata)
    for h in [h for h in headers if h.lower().startswith("x-amz-checksum-")]:
        del headers[h]
    headers.update({"Accept-Ranges": "bytes", "content-range": f"bytes {begin}-{end}/{key.size}",
                    "content-length": str(len(body))})
    return 206, headers, body

S3Response.get_object = get_object
main(sys.argv[1:])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(logdir: str):
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(os.path.join(logdir, "moto.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-c", MOTO_SERVER, "-H", "127.0.0.1", "-p",
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


def _clustered_batches(n: int, d: int, seed: int):
    """Yield the ``n x d`` clustered vectors in chunks of 100,000 rows (float32).

    The same random stream as one ``n x d`` array drawn chunk by chunk, so the data of a row
    count is the same whatever the memory: only one chunk is held at a time (10^7 x 128 is 5 GB).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, d)).astype(np.float32) * 3
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        yield (centres[rng.integers(0, 256, size=m)] + rng.normal(size=(m, d))).astype(np.float32)


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


# The builds a work directory keeps, per row count, in the order they are made. The state file
# (STATE in the work directory) records each one when it has finished, with the parameters the
# builds depend on, so that a later call with --reuse makes only what is missing and
# --measure-only makes nothing.
STATE = "objstore-state.json"
STEPS = ("data", "index", "pylance")


def _load_state(workdir: str, params: Dict[str, Any], reuse: bool) -> Dict[str, Any]:
    path = os.path.join(workdir, STATE)
    if reuse and os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
        if state.get("params") != params:
            raise SystemExit(f"{path} was built with {state.get('params')}, not {params}: "
                             f"use another --workdir, or leave out --reuse to build afresh")
        return state
    return {"params": params, "rows": {}}


def _save_state(workdir: str, state: Dict[str, Any]) -> None:
    path = os.path.join(workdir, STATE)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(path + ".tmp", path)


def _paths(workdir: str, n: int) -> Dict[str, str]:
    return {"uri": os.path.join(workdir, f"v{n}.lance"),
            "local_root": os.path.join(workdir, f"idx{n}")}


def _loadavg() -> float:
    return os.getloadavg()[0]


def build(n: int, workdir: str, state: Dict[str, Any], pylance: bool) -> Dict[str, Any]:
    """Make the builds of ``n`` rows the state does not record as done; returns its record.

    ``data``: the Lance dataset of clustered vectors (128-dim by default, 100,000 rows a file).
    ``index``: one IVF model trained and the bitshard index built in the local root ``idx<n>``
    (the object-store copy is these files uploaded, see ``_fill_moto``). ``pylance``: pylance's
    own IVF_RQ index on the Lance dataset (same partitions and bits). Each step's wall time
    and the load average around it are kept; remaking a step remakes the ones after it.
    """
    import shutil

    import lance
    import pyarrow as pa

    import bitshard

    p = state["params"]
    dim, partitions, bits = p["dim"], p["partitions"], p["bits"]
    rec = state["rows"].setdefault(str(n), {})
    paths = _paths(workdir, n)
    steps = [s for s in STEPS if s != "pylance" or pylance]
    for i, step in enumerate(steps):
        if step in rec:
            continue
        for later in steps[i + 1:]:
            rec.pop(later, None)
        load0, t = _loadavg(), time.perf_counter()
        done: Dict[str, Any] = {}
        if step == "data":
            schema = pa.schema([("id", pa.int64()), ("vec", pa.list_(pa.float32(), dim))])

            def batches():
                start = 0
                for x in _clustered_batches(n, dim, seed=n):
                    yield pa.record_batch([
                        pa.array(np.arange(start, start + len(x), dtype=np.int64)),
                        pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)],
                        schema=schema)
                    start += len(x)

            lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()),
                                paths["uri"], schema=schema, mode="overwrite",
                                max_rows_per_file=100_000)
        elif step == "index":
            shutil.rmtree(paths["local_root"], ignore_errors=True)
            ds = bitshard.dataset(paths["uri"])
            ivf = bitshard.train_ivf(ds, "vec", num_partitions=partitions, seed=1)
            rot = bitshard.build_rq_rotation(dimension=dim, num_bits=bits, seed=2)
            bitshard.dataset(paths["uri"], index_uri=paths["local_root"]).create_index(
                "vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot)
            done["segment_bytes"] = sum(
                os.path.getsize(os.path.join(d, f))
                for d, _, fs in os.walk(os.path.join(paths["local_root"], "segments"))
                for f in fs)
        else:
            try:
                lance.dataset(paths["uri"]).create_index(
                    "vec", index_type="IVF_RQ", num_partitions=partitions, num_bits=bits,
                    metric="l2", replace=True)
            except Exception as e:  # noqa: BLE001 - kept in the record, reported in the row
                done["error"] = [f"{type(e).__name__}: {e}"]
        done.update(build_s=time.perf_counter() - t, loadavg_before_after=[load0, _loadavg()])
        rec[step] = done
        _save_state(workdir, state)
        print(f"rows {n}: built {step} in {done['build_s']:.1f} s"
              + (f" error {done['error']}" if "error" in done else ""), flush=True)
    return rec


def _queries(uri: str, n: int, queries: int) -> np.ndarray:
    """Every ``n // queries``-th row of the data (the first ``queries``), plus 0.01."""
    import lance

    rows = np.arange(0, n, max(1, n // queries))[:queries]
    t = lance.dataset(uri).take(rows, columns=["vec"])
    dim = t.schema.field("vec").type.list_size
    x = t.column("vec").combine_chunks().values.to_numpy().reshape(-1, dim)
    return (x + np.float32(0.01)).astype(np.float32)


def _fill_moto(endpoint: str, local_root: str, prefix: str) -> Dict[str, Any]:
    """Upload every file of ``local_root`` under ``s3://BUCKET/<prefix>/`` (same keys).

    moto's server keeps its objects in its own process (large ones in temporary files it
    deletes), nothing survives it, so each measuring call starts one and fills it from the kept
    local index root: the object-store index is the local one's bytes.
    """
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID,
                      aws_secret_access_key=SECRET, region_name="us-east-1")
    t, total, files = time.perf_counter(), 0, 0
    for d, _, fs in os.walk(local_root):
        for f in fs:
            path = os.path.join(d, f)
            key = prefix + "/" + os.path.relpath(path, local_root).replace(os.sep, "/")
            s3.upload_file(path, BUCKET, key)
            total += os.path.getsize(path)
            files += 1
    return {"files": files, "bytes": total, "upload_s": time.perf_counter() - t}


def measure(n: int, workdir: str, state: Dict[str, Any], endpoint: str,
            opts: Dict[str, str], nprobes: int, queries: int) -> Dict[str, Any]:
    """Run the measuring children of ``n`` rows on the kept builds; returns the result row."""
    p, rec, paths = state["params"], state["rows"][str(n)], _paths(workdir, n)
    qpath = os.path.join(workdir, f"q{n}-{queries}.npy")
    np.save(qpath, _queries(paths["uri"], n, queries))
    s3_root = f"s3://{BUCKET}/idx{n}"
    uploaded = _fill_moto(endpoint, paths["local_root"], f"idx{n}")
    cfg = {"uri": paths["uri"], "local_root": paths["local_root"], "s3_root": s3_root,
           "storage_options": opts, "queries": qpath, "nprobes": nprobes}
    row: Dict[str, Any] = {"rows": n, "dim": p["dim"], "partitions": p["partitions"],
                           "nprobes": nprobes, "num_bits": p["bits"],
                           "segment_bytes": rec["index"]["segment_bytes"],
                           "builds": rec, "moto_upload": uploaded,
                           "local": _child("local", cfg), "moto": _child("moto", cfg)}
    if "pylance" in rec:
        row["pylance"] = (_child("pylance", cfg) if "error" not in rec["pylance"]
                          else {"error": rec["pylance"]["error"]})
    return row


def run(rows: List[int], dim: int, partitions: int, nprobes: int, bits: int, queries: int,
        workdir: str, pylance: bool, reuse: bool = False, build_only: bool = False,
        measure_only: bool = False) -> Dict[str, Any]:
    """Build (what the work directory lacks) and measure every row count.

    ``reuse``: keep the builds ``workdir`` already holds (its state file) and make only the
    missing ones; ``build_only``: make the builds and measure nothing; ``measure_only``: make
    nothing and refuse (SystemExit naming it) a row count whose builds are not all there.
    Returns the result document (``results`` empty when ``build_only``).
    """
    os.makedirs(workdir, exist_ok=True)
    state = _load_state(workdir, {"dim": dim, "partitions": partitions, "bits": bits},
                        reuse or measure_only)
    if measure_only:
        for n in rows:
            rec = state["rows"].get(str(n), {})
            missing = [s for s in STEPS if s not in rec and (s != "pylance" or pylance)]
            if missing:
                raise SystemExit(f"--measure-only: {workdir} has no {', '.join(missing)} "
                                 f"build for {n} rows; make it first with --reuse --build-only")
    else:
        _save_state(workdir, state)
        for n in rows:
            build(n, workdir, state, pylance)
    results: List[Dict[str, Any]] = []
    if not build_only:
        moto, opts = _start_moto(workdir)
        try:
            for n in rows:
                results.append(measure(n, workdir, state, opts["endpoint_override"], opts,
                                       nprobes, queries))
                print(_line(results[-1]), flush=True)
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
    ap.add_argument("--workdir", default=None,
                    help="keep the builds here (default: a temporary directory, removed)")
    ap.add_argument("--reuse", action="store_true",
                    help="use the builds --workdir holds; make only the missing ones")
    ap.add_argument("--build-only", action="store_true", help="make the builds, measure nothing")
    ap.add_argument("--measure-only", action="store_true",
                    help="make no build (refuse a missing one); only the measuring children")
    ap.add_argument("--out", default="bench/results/objstore.json")
    a = ap.parse_args(argv)
    if (a.reuse or a.build_only or a.measure_only) and not a.workdir:
        ap.error("--reuse, --build-only and --measure-only need --workdir")
    if a.build_only and a.measure_only:
        ap.error("--build-only and --measure-only exclude each other")
    rows = [int(v) for v in a.rows.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="bench-objstore-") as tmp:
        doc = run(rows, a.dim, a.partitions, a.nprobes, a.bits, max(2, a.queries),
                  os.path.abspath(a.workdir) if a.workdir else tmp, not a.no_pylance,
                  reuse=a.reuse, build_only=a.build_only, measure_only=a.measure_only)
    if a.build_only:
        print(f"builds kept in {a.workdir}")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{'LOADED machine: times are not meaningful; ' if doc['loaded'] else ''}"
          f"max load average {doc['max_loadavg']:.1f} on {doc['cores']} cores; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
