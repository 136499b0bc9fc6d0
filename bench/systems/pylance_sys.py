"""pylance's native IVF_RQ index over the same Lance dataset.

Single-process build: ``ds.create_index("vec", index_type="IVF_RQ",
num_partitions=, num_bits=)``. Search: ``ds.to_table(nearest={...},
with_row_id=True)``; a 2-D ``q`` is a batch (``query_index`` column).

Distributed build, pylance's own flow: IVF centroids trained once on the driver
(``lance.indices.IndicesBuilder.train_ivf``), one shared rotation
(``lance.lance.indices.build_rq_model``, a JSON string), then one
``create_index_uncommitted(..., fragment_ids=, ivf_centroids=, rabitq_model=)``
per worker process, ``merge_existing_index_segments`` and
``commit_existing_index_segments`` on the driver. Also lance-ray's
``create_index`` on a local Ray (variant ``dist="ray"``)."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time

import numpy as np

from . import dir_bytes, sweep_grid
from ..datasets import rowids_to_positions

FAMILY = "pylance"
COLUMN = "vec"
INDEX = "vec_idx"


def available():
    try:
        import lance  # noqa: F401
    except Exception as e:  # pragma: no cover
        return f"pylance not importable: {e}"
    return None


def set_threads(n):
    # LANCE_CPU_THREADS is read when lance starts its thread pool: the parent
    # sets it in the child's environment; nothing to do once imported.
    pass


def variants(opts):
    v = [{"label": "pylance-ivfrq-1bit", "num_bits": 1},
         {"label": "pylance-ivfrq-4bit", "num_bits": 4}]
    if not opts.get("quick"):
        v.append({"label": "pylance-ivfrq-9bit", "num_bits": 9})
    return v


def _uri(workdir):
    return os.path.join(workdir, "data.lance")


def prepare(data, params, workdir):
    """Untimed: a private copy of the cached Lance dataset (indexes are written into it)."""
    shutil.rmtree(_uri(workdir), ignore_errors=True)
    shutil.copytree(data.lance_uri, _uri(workdir))


def _index_dir_bytes(uri):
    import lance

    ds = lance.dataset(uri)
    total = 0
    try:
        for desc in ds.describe_indices():
            if desc.name == INDEX:
                for seg in desc.segments:
                    total += dir_bytes(os.path.join(uri, "_indices", str(seg.uuid)))
    except Exception:
        total = dir_bytes(os.path.join(uri, "_indices"))
    return total


def build(data, params, workdir):
    import lance

    ds = lance.dataset(_uri(workdir))
    ds = ds.create_index(COLUMN, index_type="IVF_RQ", name=INDEX,
                         num_partitions=int(params["partitions"]),
                         num_bits=int(params["num_bits"]), metric="l2", replace=True)
    return {"ds": ds, "uri": _uri(workdir), "frag_rows": data.fragment_rows}


def _segment_worker(args):
    uri, frags, num_partitions, num_bits, centroids, model = args
    import lance

    ds = lance.dataset(uri)
    return ds.create_index_uncommitted(
        COLUMN, "IVF_RQ", name=INDEX, metric="l2", num_partitions=num_partitions,
        num_bits=num_bits, ivf_centroids=centroids, rabitq_model=model,
        fragment_ids=list(frags))


def build_distributed(data, params, workdir, workers):
    import lance
    from lance.indices import IndicesBuilder
    from lance.lance import indices as lindices

    if params.get("dist") == "ray":
        return _build_ray(data, params, workdir, workers)
    uri = _uri(workdir)
    ds = lance.dataset(uri)
    parts = int(params["partitions"])
    # create_index lowers the sample rate itself on small sets; train_ivf refuses
    ivf = IndicesBuilder(ds, COLUMN).train_ivf(parts, distance_type="l2",
                                               sample_rate=max(1, min(256, data.n // parts)))
    model = lindices.build_rq_model(dimension=data.dim, num_bits=int(params["num_bits"]))
    frag_ids = [f.fragment_id for f in ds.get_fragments()]
    groups = [g.tolist() for g in np.array_split(np.array(frag_ids), min(workers, len(frag_ids)))]
    jobs = [(uri, g, int(params["partitions"]), int(params["num_bits"]), ivf.centroids, model)
            for g in groups if g]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        segs = pool.map(_segment_worker, jobs)
    merged = ds.merge_existing_index_segments(segs)
    ds = ds.commit_existing_index_segments(INDEX, COLUMN, [merged])
    return {"ds": lance.dataset(uri), "uri": uri, "frag_rows": data.fragment_rows}, (
        f"driver trains IVF + build_rq_model; {len(jobs)} processes create_index_uncommitted "
        f"(fragments {[len(g) for g in groups]}); merge_existing_index_segments + commit")


def _build_ray(data, params, workdir, workers):
    import lance
    import ray
    import lance_ray

    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)
    ray_start = time.perf_counter() - t
    t = time.perf_counter()
    lance_ray.create_index(_uri(workdir), COLUMN, "IVF_RQ", name=INDEX, num_workers=workers,
                           num_partitions=int(params["partitions"]),
                           num_bits=int(params["num_bits"]), metric="l2",
                           sample_rate=max(1, min(256, data.n // int(params["partitions"]))))
    took = time.perf_counter() - t
    ray.shutdown()
    return {"ds": lance.dataset(_uri(workdir)), "uri": _uri(workdir),
            "frag_rows": data.fragment_rows, "build_seconds_override": took}, (
        f"lance-ray create_index on a local Ray ({workers} CPUs); ray.init took "
        f"{ray_start:.1f} s (not counted)")


def open(data, params, workdir):  # noqa: A001
    import lance

    return {"ds": lance.dataset(_uri(workdir)), "uri": _uri(workdir),
            "frag_rows": data.fragment_rows}


def search(h, queries, k, sp):
    q = np.asarray(queries, dtype=np.float32)
    nearest = {"column": COLUMN, "q": q[0] if q.shape[0] == 1 else q, "k": int(k),
               "nprobes": int(sp["nprobes"])}
    if sp.get("refine") is not None:
        nearest["refine_factor"] = int(sp["refine"])
    t = h["ds"].to_table(nearest=nearest, with_row_id=True, columns=["_distance"])
    out = np.full((q.shape[0], k), -1, dtype=np.int64)
    pos = rowids_to_positions(t.column("_rowid").to_numpy(), h["frag_rows"])
    if "query_index" in t.column_names:
        qi = t.column("query_index").to_numpy()
        dist = t.column("_distance").to_numpy()
        order = np.lexsort((dist, qi))
        qi, pos = qi[order], pos[order]
        starts = np.searchsorted(qi, np.arange(q.shape[0]))
        ends = np.searchsorted(qi, np.arange(q.shape[0]), side="right")
        for i in range(q.shape[0]):
            m = min(k, ends[i] - starts[i])
            out[i, :m] = pos[starts[i]:starts[i] + m]
    else:
        m = min(k, pos.size)
        out[0, :m] = pos[:m]
    return out


def sweep(params, opts):
    refines = [None, 2, 5] if params["num_bits"] == 1 else [None]
    if opts.get("quick"):
        refines = refines[:2]
    return sweep_grid(params["partitions"], opts.get("quick"), refines)


def size(h):
    return _index_dir_bytes(h["uri"])


def describe():
    import lance

    try:
        import lance_ray

        lr = f", lance-ray {getattr(lance_ray, '__version__', '?')}"
    except Exception as e:
        lr = f", lance-ray not importable ({type(e).__name__})"
    return f"pylance {lance.__version__}{lr}"
