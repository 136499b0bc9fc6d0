"""bitshard, 1 bit and multi-bit, over the same vectors as the peers.

Source (``--bitshard-source``): ``lance`` (the same Lance dataset that pylance
indexes, so reranking reads vectors the same way) or ``numpy`` (the cached
base.npy, memory-mapped, ``fragment_size`` = the Lance fragment size). Either
way fragment i holds rows [i * fragment_rows, ...), so a row id maps back to a position.

Search reports the staged scan's counters (``ds.last_search_stats`` after
``with_stats=True``): codes scanned at stage 1, codes reaching stage 2 (extra
bits), candidates reranked exactly, per query.

Distributed build: ``bitshard.build_index`` when the package has it; otherwise
the documented flow by hand: ``train_ivf`` and ``build_rq_rotation`` on the
driver, one ``create_index_uncommitted(fragment_ids=...)`` per worker process,
``merge_existing_index_segments``, ``commit_existing_index_segments``."""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os

import numpy as np

from . import dir_bytes, sweep_grid
from ..datasets import rowids_to_positions

FAMILY = "bitshard"
INDEX = "idx"


def available():
    try:
        import bitshard  # noqa: F401
    except Exception as e:
        return f"bitshard not importable: {type(e).__name__}: {e}"
    return None


def set_threads(n):
    os.environ.setdefault("BITSHARD_NUM_THREADS", str(n))


def variants(opts):
    """On the Lance source: 1, 4 and 9 bits. With ``--bitshard-source both`` (the
    default) also 1 bit over the numpy array (``-npy``): the same index, reranking
    from memory instead of through Lance's take, which shows what the source costs."""
    choice = opts.get("bitshard_source", "both")
    main_src = "numpy" if choice == "numpy" else "lance"
    suffix = "-npy" if choice == "numpy" else ""
    v = [{"label": f"bitshard-1bit{suffix}", "num_bits": 1, "source": main_src},
         {"label": f"bitshard-4bit{suffix}", "num_bits": 4, "source": main_src}]
    if not opts.get("quick"):
        v.append({"label": f"bitshard-9bit{suffix}", "num_bits": 9, "source": main_src})
    if choice == "both":
        v.append({"label": "bitshard-1bit-npy", "num_bits": 1, "source": "numpy"})
    return v


def _index_uri(workdir):
    return os.path.join(workdir, "bitshard_index")


def _open_source(data, params):
    """(source object, column name) for bitshard.dataset."""
    if params.get("source", "lance") == "numpy":
        return np.load(data.base_npy, mmap_mode="r"), "vector"
    return data.lance_uri, "vec"


def _dataset(data, params, workdir):
    import bitshard

    src, col = _open_source(data, params)
    kw = {"index_uri": _index_uri(workdir)}
    if params.get("source") == "numpy":
        kw["fragment_size"] = data.fragment_rows
    return bitshard.dataset(src, **kw), col


def build(data, params, workdir):
    ds, col = _dataset(data, params, workdir)
    ds.create_index(col, "IVF_RQ", name=INDEX, num_partitions=int(params["partitions"]),
                    num_bits=int(params["num_bits"]), metric="l2")
    return {"ds": ds, "col": col, "uri": _index_uri(workdir), "frag_rows": data.fragment_rows}


def _segment_worker(args):
    data_path, params, workdir, frags, centroids, rotation = args
    from ..datasets import open_data

    data = open_data(data_path)
    ds, col = _dataset(data, params, workdir)
    return ds.create_index_uncommitted(col, "IVF_RQ", name=INDEX, ivf_centroids=centroids,
                                       rq_rotation=rotation, fragment_ids=list(frags),
                                       num_bits=int(params["num_bits"]), metric="l2")


def build_distributed(data, params, workdir, workers):
    import bitshard

    ds, col = _dataset(data, params, workdir)
    # the rotation create_index uses by default, so that the merged index can be
    # compared with the single-process one result for result
    try:
        from bitshard.artifacts import DEFAULT_ROTATION_SEED as seed
    except ImportError:
        seed = None
    rotation = bitshard.build_rq_rotation(dimension=data.dim, num_bits=int(params["num_bits"]),
                                          seed=seed)
    if hasattr(bitshard, "build_index"):
        fn = bitshard.build_index
        sig = inspect.signature(fn)
        kw = {"num_partitions": int(params["partitions"]), "num_bits": int(params["num_bits"]),
              "metric": "l2", "name": INDEX, "num_workers": workers, "workers": workers,
              "index_uri": _index_uri(workdir), "column": col, "executor": "processes",
              "rq_rotation": rotation}
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            kw = {k: v for k, v in kw.items() if k in sig.parameters}
        first = next(iter(sig.parameters))
        kw.pop(first, None)
        src = ds if "dataset" in first or first == "ds" else _open_source(data, params)[0]
        fn(src, **kw)
        ds2, _ = _dataset(data, params, workdir)
        return {"ds": ds2, "col": col, "uri": _index_uri(workdir), "frag_rows": data.fragment_rows}, \
            f"bitshard.build_index({', '.join(sorted(kw))}) with {workers} workers"
    note = "bitshard.build_index missing (AttributeError): documented flow by hand, "
    centroids = bitshard.train_ivf(ds, col, int(params["partitions"]), metric="l2")
    frag_ids = [f.id for f in ds.source.fragments()]
    groups = [g.tolist() for g in np.array_split(np.array(frag_ids), min(workers, len(frag_ids)))]
    jobs = [(data.path, params, workdir, g, centroids, rotation) for g in groups if g]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        segs = pool.map(_segment_worker, jobs)
    merged = ds.merge_existing_index_segments(segs)
    ds.commit_existing_index_segments(INDEX, col, [merged])
    return {"ds": ds, "col": col, "uri": _index_uri(workdir), "frag_rows": data.fragment_rows}, note + (
        f"{len(jobs)} processes create_index_uncommitted (fragments {[len(g) for g in groups]}), "
        "merge + commit")


def open(data, params, workdir):  # noqa: A001
    ds, col = _dataset(data, params, workdir)
    return {"ds": ds, "col": col, "uri": _index_uri(workdir), "frag_rows": data.fragment_rows}


def search(h, queries, k, sp):
    q = np.asarray(queries, dtype=np.float32)
    kw = {"k": int(k), "nprobes": int(sp["nprobes"]), "with_stats": True,
          "refine_factor": None if sp.get("refine") is None else int(sp["refine"])}
    if sp.get("eps0") is not None:
        kw["eps0"] = float(sp["eps0"])
    t = h["ds"].search(h["col"], q if q.shape[0] > 1 else q[0], **kw)
    pos = rowids_to_positions(t.column("_rowid").to_numpy(), h["frag_rows"])
    out = np.full((q.shape[0], k), -1, dtype=np.int64)
    if "query_index" in t.column_names:
        qi = t.column("query_index").to_numpy()
        for i in range(q.shape[0]):
            p = pos[qi == i][:k]
            out[i, :p.size] = p
    else:
        out[0, :min(k, pos.size)] = pos[:k]
    h["last_nq"] = q.shape[0]
    return out


def stats(h):
    st = getattr(h["ds"], "last_search_stats", None)
    return dict(st) if st else None


def sweep(params, opts):
    b = params["num_bits"]
    refines = [None, 4] if b == 1 else ([None, 2] if b < 9 else [None])
    if opts.get("quick"):
        refines = refines[:1] + ([4] if b == 1 else [])
    return sweep_grid(params["partitions"], opts.get("quick"), refines)


def size(h):
    return dir_bytes(h["uri"])


def describe():
    import bitshard

    return f"bitshard {bitshard.__version__}, kernel {bitshard.simd_level()}"
