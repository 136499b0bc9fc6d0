"""FAISS: IndexIVFRaBitQ (1 and multi-bit, ``IVF{P},RaBitQ{b}``), its FastScan
variant (``IVF{P},RaBitQfs{b}``) and 1-bit with an exact rerank over stored raw
vectors (IndexRefineFlat; its size includes those vectors).

Distributed build: the FAISS way, train once on the driver, each worker adds
its shard of rows to a copy of the trained empty index, the driver merges the
shards' inverted lists (``merge_from``)."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np

from . import dir_bytes, sweep_grid

FAMILY = "faiss"


def available():
    try:
        import faiss  # noqa: F401
    except Exception as e:  # pragma: no cover
        return f"faiss not importable: {e}"
    return None


def set_threads(n):
    import faiss

    faiss.omp_set_num_threads(int(n))


def variants(opts):
    import faiss

    v = [
        {"label": "faiss-ivfrabitq-1bit", "num_bits": 1, "kind": "RaBitQ"},
        {"label": "faiss-ivfrabitq-1bit+refine", "num_bits": 1, "kind": "RaBitQ", "refine": True},
        {"label": "faiss-ivfrabitq-4bit", "num_bits": 4, "kind": "RaBitQ"},
        {"label": "faiss-ivfrabitq-fs-1bit", "num_bits": 1, "kind": "RaBitQfs"},
        {"label": "faiss-ivfrabitq-fs-4bit", "num_bits": 4, "kind": "RaBitQfs"},
    ]
    if not opts.get("quick"):
        v.append({"label": "faiss-ivfrabitq-9bit", "num_bits": 9, "kind": "RaBitQ"})
    have_fs = hasattr(faiss, "IndexIVFRaBitQFastScan")
    return [x for x in v if have_fs or x["kind"] != "RaBitQfs"]


def _factory(d, params):
    b = params["num_bits"]
    return f"IVF{params['partitions']},{params['kind']}{'' if b == 1 else b}"


def _path(workdir):
    return os.path.join(workdir, "index.faiss")


def _empty_trained(data, params):
    import faiss

    index = faiss.index_factory(data.dim, _factory(data.dim, params), faiss.METRIC_L2)
    # FAISS k-means samples 256 points per centroid itself, as the others do.
    index.cp.max_points_per_centroid = 256
    n = data.n
    ns = min(n, 256 * params["partitions"])
    rng = np.random.default_rng(0)
    sample = np.asarray(data.base[np.sort(rng.choice(n, ns, replace=False))], dtype=np.float32)
    index.train(sample)
    return index


def _add_rows(index, base, lo, hi):
    for s in range(lo, hi, 65536):
        e = min(hi, s + 65536)
        x = np.ascontiguousarray(base[s:e], dtype=np.float32)
        index.add_with_ids(x, np.arange(s, e, dtype=np.int64))


def build(data, params, workdir):
    import faiss

    index = _empty_trained(data, params)
    if params.get("refine"):
        # IndexRefineFlat keeps the raw vectors beside the codes (its ids are
        # sequential, i.e. positions); wrap the empty trained index, then add
        index = faiss.IndexRefineFlat(index)
        for s in range(0, data.n, 65536):
            index.add(np.ascontiguousarray(data.base[s:s + 65536], dtype=np.float32))
    else:
        _add_rows(index, data.base, 0, data.n)
    faiss.write_index(index, _path(workdir))
    return {"index": index, "path": _path(workdir)}


def _worker_add(args):
    trained_path, base_path, lo, hi, out = args
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.read_index(trained_path)
    base = np.load(base_path, mmap_mode="r")
    _add_rows(index, base, lo, hi)
    faiss.write_index(index, out)
    return out


def build_distributed(data, params, workdir, workers):
    """Train on the driver; add shards in ``workers`` processes; merge."""
    import faiss

    if params.get("refine"):
        return None, "refine variant: distributed build not measured"
    index = _empty_trained(data, params)
    trained = os.path.join(workdir, "trained.faiss")
    faiss.write_index(index, trained)
    bounds = np.linspace(0, data.n, workers + 1).astype(int)
    jobs = [(trained, data.base_npy, int(bounds[i]), int(bounds[i + 1]),
             os.path.join(workdir, f"shard{i}.faiss")) for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        shards = pool.map(_worker_add, jobs)
    merged = faiss.read_index(shards[0])
    for s in shards[1:]:
        merged.merge_from(faiss.read_index(s), 0)
    faiss.write_index(merged, _path(workdir))
    for s in shards + [trained]:
        os.remove(s)
    return {"index": merged, "path": _path(workdir)}, \
        f"trained on driver, {workers} processes add shards, merge_from"


def open(data, params, workdir):  # noqa: A001
    import faiss

    return {"index": faiss.read_index(_path(workdir)), "path": _path(workdir)}


def search(h, queries, k, sp):
    import faiss

    index = h["index"]
    if isinstance(index, faiss.IndexRefine):
        faiss.extract_index_ivf(index.base_index).nprobe = int(sp["nprobes"])
        index.k_factor = float(sp["refine"] or 1)
    else:
        index.nprobe = int(sp["nprobes"])
    if "qb" in sp and hasattr(index, "qb"):
        index.qb = int(sp["qb"])
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids.astype(np.int64)


def sweep(params, opts):
    refines = [2, 5, 10] if params.get("refine") else [None]
    return sweep_grid(params["partitions"], opts.get("quick"), refines)


def size(h):
    return dir_bytes(h["path"])


def describe():
    import faiss

    opts = faiss.get_compile_options() if hasattr(faiss, "get_compile_options") else ""
    return f"faiss {faiss.__version__} ({opts.strip()})"
