"""rabitqlib (the RaBitQ authors' library, PyPI ``rabitqlib``): IvfIndex with
1 to 9 bits per dimension.

Its API: ``RaBitQKMeans(d, k, num_threads=, ...)`` trains centroids and gives the
training rows' assignments; ``IvfIndex(dim, max_elements, num_clusters, nbits,
metric)`` then ``build(data, centroids, cluster_ids)`` needs an assignment for
every row it is given (``data`` must have exactly ``max_elements`` rows), and
``add(data)`` appends rows, each to its nearest centroid, returning their ids.
So the build here trains k-means on 256 rows per partition (as the others
sample), builds over that sample with its assignments and adds the rest. Ids are
then in (sample, rest) order: a permutation saved beside the index maps them
back to positions (harness bookkeeping, not counted in the index size).
``search(queries, k, nprobe, high_accuracy=None, num_threads=)`` returns
estimated distances; there is no exact rerank unless the index is built with
``nbits=32`` (raw vectors)."""

from __future__ import annotations

import os

import numpy as np

from . import sweep_grid

FAMILY = "rabitqlib"
_THREADS = [1]


def available():
    try:
        import rabitqlib  # noqa: F401
    except Exception as e:  # pragma: no cover
        return f"rabitqlib not importable: {e}"
    return None


def set_threads(n):
    _THREADS[0] = int(n)


def variants(opts):
    v = [
        {"label": "rabitqlib-ivf-1bit", "num_bits": 1},
        {"label": "rabitqlib-ivf-4bit", "num_bits": 4},
    ]
    if not opts.get("quick"):
        v.append({"label": "rabitqlib-ivf-9bit", "num_bits": 9})
    return v


def _paths(workdir):
    return os.path.join(workdir, "index.rabitq"), os.path.join(workdir, "perm.npy")


def build(data, params, workdir):
    import rabitqlib

    n, d, k = data.n, data.dim, params["partitions"]
    nt = max(1, os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    ns = min(n, 256 * k)
    sample_idx = np.sort(rng.choice(n, ns, replace=False))
    rest = np.ones(n, dtype=bool)
    rest[sample_idx] = False
    rest_idx = np.nonzero(rest)[0]
    sample = np.ascontiguousarray(data.base[sample_idx], dtype=np.float32)
    km = rabitqlib.RaBitQKMeans(d, k, num_threads=nt)
    km.train(sample)
    index = rabitqlib.IvfIndex(dim=d, max_elements=ns, num_clusters=k,
                               nbits=int(params["num_bits"]), metric="l2")
    index.build(sample, np.ascontiguousarray(km.centroids, dtype=np.float32),
                np.asarray(km.assignments).astype(np.uint32), num_threads=nt)
    ids_parts = [np.arange(ns, dtype=np.int64)]
    for s in range(0, rest_idx.size, 65536):
        chunk = rest_idx[s:s + 65536]
        got = index.add(np.ascontiguousarray(data.base[chunk], dtype=np.float32), num_threads=nt)
        ids_parts.append(np.asarray(got, dtype=np.int64))
    ids = np.concatenate(ids_parts)
    perm = np.empty(n, dtype=np.int64)
    perm[ids] = np.concatenate([sample_idx, rest_idx])
    ipath, ppath = _paths(workdir)
    index.save(ipath)
    np.save(ppath, perm)
    return {"index": index, "perm": perm, "path": ipath}


def open(data, params, workdir):  # noqa: A001
    import rabitqlib

    ipath, ppath = _paths(workdir)
    return {"index": rabitqlib.IvfIndex.load(ipath), "perm": np.load(ppath), "path": ipath}


def search(h, queries, k, sp):
    ids, _ = h["index"].search(np.ascontiguousarray(queries, dtype=np.float32), k,
                               int(sp["nprobes"]), high_accuracy=sp.get("high_accuracy"),
                               num_threads=_THREADS[0])
    ids = np.asarray(ids).astype(np.int64)
    valid = (ids >= 0) & (ids < h["perm"].size)
    return np.where(valid, h["perm"][np.where(valid, ids, 0)], -1)


def search_ids(h, queries, k, sp):
    """rabitqlib's own ids of one query (mapped to positions after timing)."""
    ids, _ = h["index"].search(queries, k, int(sp["nprobes"]),
                               high_accuracy=sp.get("high_accuracy"),
                               num_threads=_THREADS[0])
    return ids


def ids_to_positions(h, raw, k):
    ids = np.vstack([np.asarray(r).reshape(1, -1)[:, :k] for r in raw]).astype(np.int64)
    valid = (ids >= 0) & (ids < h["perm"].size)
    return np.where(valid, h["perm"][np.where(valid, ids, 0)], -1)


def sweep(params, opts):
    out = sweep_grid(params["partitions"], opts.get("quick"), [None])
    if params["num_bits"] > 1 and not opts.get("quick"):
        # high_accuracy=False: the cheaper estimate (its own speed/recall setting)
        out += sweep_grid(params["partitions"], opts.get("quick"), ["fast"],
                          {"high_accuracy": False})
    return out


def size(h):
    return os.path.getsize(h["path"])


def describe():
    from importlib import metadata

    return f"rabitqlib {metadata.version('rabitqlib')}"
