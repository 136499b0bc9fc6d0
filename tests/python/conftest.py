"""Shared fixtures: clustered data written as Lance / Parquet / numpy, and a
brute-force oracle."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest


def clustered(n: int, d: int, clusters: int = 32, seed: int = 0) -> np.ndarray:
    """float32 (n, d) rows around random centres: what IVF is meant for."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32) * 3
    labels = rng.integers(0, clusters, size=n)
    return (centres[labels] + rng.normal(size=(n, d)).astype(np.float32)).astype(np.float32)


def write_lance(path, vectors: np.ndarray, rows_per_fragment: int, column: str = "vec",
                extra: dict | None = None):
    import lance

    d = vectors.shape[1]
    cols = {
        "id": pa.array(np.arange(len(vectors), dtype=np.int64)),
        column: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), d),
    }
    if extra:
        cols.update(extra)
    lance.write_dataset(pa.table(cols), str(path), max_rows_per_file=rows_per_fragment,
                        max_rows_per_group=min(rows_per_fragment, 1024))
    return str(path)


def lance_with_artifacts(path, n: int, d: int, rows_per_fragment: int, num_partitions: int,
                         seed: int, ivf_seed: int, rotation_seed: int):
    """n x d clustered vectors (seed) in Lance fragments of rows_per_fragment
    rows at path, IVF centroids trained on them and a 1-bit rotation:
    (uri, vectors, ivf, rotation)."""
    import bitshard

    x = clustered(n, d, seed=seed)
    uri = write_lance(path, x, rows_per_fragment)
    ivf = bitshard.train_ivf(bitshard.dataset(uri), "vec", num_partitions=num_partitions,
                             seed=ivf_seed)
    rot = bitshard.build_rq_rotation(dimension=d, num_bits=1, seed=rotation_seed)
    return uri, x, ivf, rot


def run_threads(target, args) -> None:
    """Calls target(a) for every a of args, each in a thread of its own, all
    started before any is waited for; returns when all have ended."""
    import threading

    threads = [threading.Thread(target=target, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def unreadable_build_state_message(state: str, reason: str, index: str) -> str:
    """What cleanup raises when the build state file ``state`` of ``index``
    cannot be read (``reason``: the reader's own message)."""
    return (f"cleanup removes nothing: the build state {state} cannot be read ({reason}), "
            f"so the uncommitted segments its build wrote cannot be told apart from orphans. "
            f"If no build of index '{index}' runs, delete that file (a rerun of the build "
            f"then starts afresh), or run cleanup with abandoned_builds=True "
            f"(--abandoned-builds) to drop it when older than the age; then run cleanup again")


def brute_force(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "l2") -> np.ndarray:
    """Exact top-k positions (nq, k) in float64."""
    b = base.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "l2":
        d = (q**2).sum(1)[:, None] - 2 * q @ b.T + (b**2).sum(1)[None, :]
    elif metric == "dot":
        d = 1 - q @ b.T
    else:
        bn = np.linalg.norm(b, axis=1)
        qn = np.linalg.norm(q, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            d = 1 - (q @ b.T) / (qn[:, None] * bn[None, :])
        d[~np.isfinite(d)] = 1.0
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def rowids_to_positions(ds, rowids: np.ndarray) -> np.ndarray:
    """Map (fragment << 32 | offset) row ids to positions in write order."""
    starts, s = {}, 0
    for f in ds.source.fragments():
        starts[f.id] = s
        s += f.physical_rows
    r = rowids.astype(np.uint64)
    frag = (r >> np.uint64(32)).astype(np.int64)
    off = (r & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return np.array([starts[f] for f in frag.ravel()], dtype=np.int64).reshape(frag.shape) + off


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(got[i]) & set(truth[i])) / k for i in range(len(truth))]))


@pytest.fixture
def small_lance(tmp_path):
    """6000 x 64 clustered vectors in 4 Lance fragments; returns (uri, vectors)."""
    x = clustered(6000, 64, seed=1)
    return write_lance(tmp_path / "small.lance", x, 1500), x
