"""bitshard: distributed IVF_RQ (IVF + RaBitQ) index builds whose segments
merge into one index that answers exactly as a single-process build would.

Quick start::

    import bitshard
    ds = bitshard.dataset("vectors.lance")
    ds.create_index("vec", "IVF_RQ", num_partitions=256)
    hits = ds.search("vec", query, k=10)        # pyarrow.Table
    s = ds.searcher("vec", k=10, nprobes=20)    # prepared: for many queries
    rowids, distances = s.search(query)         # numpy arrays
"""

from __future__ import annotations

from .errors import (
    ArtifactMismatchError,
    BitshardError,
    CommitConflictError,
    CorruptIndexError,
    IndexNotFoundError,
    InvalidInputError,
    MissingFileError,
    StorageError,
    UnsupportedCpuError,
    UnsupportedVersionError,
)
from .artifacts import IvfModel, Rotation, build_rq_model, build_rq_rotation
from .dataset import Dataset, dataset, train_ivf
from .searcher import NO_ROW, Searcher, UncoveredRowsWarning
from .index import FormatUpgradeWarning, SegmentHandle
from .distributed import build_index
from .maintenance import cleanup, upgrade_index
from .service import Service, serve
from . import _native

__version__ = "0.1.0"


def simd_level() -> str:
    """The scan kernel in use: ``"scalar"``, ``"avx2"`` or ``"avx512"``
    (override with the environment variable ``BITSHARD_SIMD``)."""
    return str(_native.simd_level())


__all__ = [
    "ArtifactMismatchError",
    "BitshardError",
    "CommitConflictError",
    "CorruptIndexError",
    "Dataset",
    "FormatUpgradeWarning",
    "IndexNotFoundError",
    "InvalidInputError",
    "IvfModel",
    "MissingFileError",
    "NO_ROW",
    "Rotation",
    "SegmentHandle",
    "Searcher",
    "Service",
    "StorageError",
    "UncoveredRowsWarning",
    "UnsupportedCpuError",
    "UnsupportedVersionError",
    "build_index",
    "build_rq_model",
    "build_rq_rotation",
    "cleanup",
    "dataset",
    "serve",
    "simd_level",
    "train_ivf",
    "upgrade_index",
]
