"""The user's entry point: ``bitshard.dataset(...)`` and its index methods.

Method and keyword names follow pylance where the concept is the same, so a
Lance user's distributed-build code runs with only the opening line changed.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from . import _native
from .artifacts import (
    DEFAULT_ROTATION_SEED,
    METRICS,
    IvfModel,
    Rotation,
    as_ivf_model,
    metric_code,
)
from .errors import (
    ArtifactMismatchError,
    IndexNotFoundError,
    InvalidInputError,
)
from . import index as idx
from .index import SegmentHandle
from .sources import Source, open_source
from .storage import Storage, is_object_uri, join_uri

__all__ = ["Dataset", "dataset", "train_ivf", "DEFAULT_NUM_BITS", "DEFAULT_EPS0"]

#: Bits per dimension when the caller does not say: 9, the width that gave the
#: most recall per unit of query time in bench/results/bits.json (see
#: docs/decisions.md). ``build_rq_rotation`` keeps pylance's default of 1.
DEFAULT_NUM_BITS = 9
#: Width of the error bound in standard deviations (shared/rabitq.md).
DEFAULT_EPS0 = 1.9
INDEX_DIR_NAME = "_bitshard"


def dataset(
    x: Any,
    *,
    index_uri: Optional[Union[str, os.PathLike]] = None,
    fragment_size: Optional[int] = None,
    storage_options: Optional[Dict[str, Any]] = None,
) -> "Dataset":
    """Open a source of vectors for indexing and search.

    Args:
        x: a Lance dataset (path/URI or ``lance.LanceDataset``), a Parquet file or
            directory, a ``pyarrow.Table``, or a numpy array of shape (n, d)
            (its column is named ``vector``).
        index_uri: where indexes live: a local directory or an object-store
            prefix (``s3://bucket/prefix``). By default ``<dataset dir>/_bitshard``,
            so indexes travel with the data; in-memory sources without one keep
            their indexes in a temporary directory that is not persisted.
        fragment_size: rows per fragment for in-memory arrays (default 65536).
        storage_options: connection settings of an object-store index root
            (``endpoint_override``, ``access_key``, ``secret_key``,
            ``session_token``, ``region``; the boto3/Lance spellings such as
            ``aws_access_key_id`` work too; see :mod:`bitshard.storage`).
            Without them the environment (``AWS_ENDPOINT_URL``,
            ``AWS_ACCESS_KEY_ID``, ...) and the AWS default chain apply. They
            travel with the pickled Dataset to workers.

    Returns:
        A :class:`Dataset`.
    """
    src = open_source(x, fragment_size=fragment_size) if fragment_size else open_source(x)
    return Dataset(src, index_uri=index_uri, storage_options=storage_options)


def train_ivf(
    ds: Union["Dataset", Any],
    column: str,
    num_partitions: int,
    metric: str = "l2",
    sample_rate: int = 256,
    max_iters: int = 50,
    seed: Optional[int] = None,
) -> IvfModel:
    """Train IVF centroids with k-means on a sample of the column.

    Args:
        ds: a :class:`Dataset` (or anything :func:`dataset` accepts).
        column: the vector column.
        num_partitions: k, the number of partitions (>= 1).
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``.
        sample_rate: rows sampled per partition (the sample is
            ``num_partitions * sample_rate`` rows, capped at the row count).
        max_iters: Lloyd iterations at most.
        seed: sampling and seeding seed (``None``: fixed default 0).

    Returns:
        An :class:`IvfModel` with float32 centroids (num_partitions, d).
    """
    if not isinstance(ds, Dataset):
        ds = dataset(ds)
    metric_code(metric)
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)) \
            or num_partitions < 1:
        raise InvalidInputError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if sample_rate < 1 or max_iters < 1:
        raise InvalidInputError(
            f"sample_rate and max_iters must be >= 1, got {sample_rate} and {max_iters}"
        )
    seed = 0 if seed is None else int(seed)
    sample = ds.source.sample(column, int(num_partitions) * int(sample_rate), seed)
    n, d = sample.shape
    if n < num_partitions:
        raise InvalidInputError(
            f"num_partitions ({num_partitions}) exceeds the number of rows ({n}) of column {column!r}"
        )
    out = np.empty((num_partitions, d), dtype=np.float32)
    _native.kmeans_train(np.ascontiguousarray(sample, dtype=np.float32), n, d,
                         int(num_partitions), METRICS[metric.lower()], int(max_iters),
                         seed, out)
    return IvfModel(out, metric)


def _source_storage_options(source: Source) -> Optional[Dict[str, Any]]:
    """The object-store options a Lance source was opened with, limited to
    the keys bitshard's storage knows (an index beside such data uses them)."""
    from .storage import _ALIASES  # noqa: PLC0415

    opts = getattr(source, "_storage_options", None) or {}
    known = {k: v for k, v in opts.items() if str(k).lower() in _ALIASES}
    return known or None


def _default_num_partitions(num_rows: int) -> int:
    # About sqrt(n) partitions, as pylance suggests, at least 1.
    return max(1, min(num_rows, int(round(np.sqrt(max(num_rows, 1))))))


class Dataset:
    """A source of vectors plus the bitshard indexes built over it."""

    #: Set by :func:`bitshard.build_index` on the dataset it returns: what the
    #: build did (executor, tasks, reused segments, seconds per phase, ...).
    last_build_stats: Dict[str, Any]

    def __init__(self, source: Source, index_uri: Optional[Union[str, os.PathLike]] = None,
                 storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.source = source
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        if index_uri is not None:
            text = os.fspath(index_uri)
            self.index_root = text.rstrip("/") if is_object_uri(text) else os.path.abspath(text)
        elif source.uri is not None and is_object_uri(source.uri):
            # Data on an object store: the index sits beside it there.
            self.index_root = (join_uri(source.uri, INDEX_DIR_NAME) if source.kind == "lance"
                               else source.uri.rstrip("/") + INDEX_DIR_NAME)
            if storage_options is None:
                storage_options = _source_storage_options(source)
        elif source.uri is not None and os.path.isdir(source.uri):
            self.index_root = os.path.join(os.path.abspath(source.uri), INDEX_DIR_NAME)
        elif source.uri is not None:
            self.index_root = os.path.abspath(source.uri) + INDEX_DIR_NAME
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="bitshard-")
            self.index_root = self._tmp.name
        self.storage_options: Optional[Dict[str, Any]] = \
            dict(storage_options) if storage_options else None
        #: Where the indexes live (:class:`bitshard.storage.Storage`).
        self.storage: Storage = Storage.for_uri(self.index_root, self.storage_options)
        self._searchers: Dict[Tuple[str, int], Any] = {}
        # The committed indexes this object searches: name -> (version,
        # column), read at first use and kept (like a Lance dataset pinned to
        # its version) until this object commits or refresh() is called, so
        # a search does not list and parse manifests on every call.
        self._view: Optional[Dict[str, Tuple[int, str]]] = None
        self._plans: Dict[Any, Dict[str, Any]] = {}
        self._deleted_cache: Dict[Tuple[Any, int], np.ndarray] = {}

    # -------------------------------------------------------------- pickling

    def __getstate__(self) -> Dict[str, Any]:
        return {"source": self.source, "index_root": self.index_root,
                "storage_options": self.storage_options}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.source = state["source"]
        self.index_root = state["index_root"]
        self.storage_options = state.get("storage_options")
        self.storage = Storage.for_uri(self.index_root, self.storage_options)
        self._tmp = None
        self._searchers = {}
        self._deleted_cache = {}
        self._view = None
        self._plans = {}

    def __repr__(self) -> str:
        return f"bitshard.Dataset({self.source.kind}, uri={self.source.uri!r}, index_root={self.index_root!r})"

    # -------------------------------------------------------------- building

    def _resolve_artifacts(
        self,
        column: str,
        ivf_centroids: Any,
        rq_rotation: Optional[Rotation],
        num_bits: Optional[int],
        metric: str,
    ) -> Tuple[IvfModel, Rotation]:
        metric_code(metric)
        if ivf_centroids is None:
            raise InvalidInputError("ivf_centroids is required (an array, IvfModel or path)")
        ivf = as_ivf_model(ivf_centroids, metric)
        dim = self.source.vector_dim(column)
        if ivf.dimension != dim:
            raise InvalidInputError(
                f"ivf_centroids have dimension {ivf.dimension}, column {column!r} has {dim}"
            )
        if rq_rotation is None:
            rot = Rotation(dim, DEFAULT_NUM_BITS if num_bits is None else num_bits,
                           "float32", "fast", DEFAULT_ROTATION_SEED)
        else:
            if not isinstance(rq_rotation, Rotation):
                raise InvalidInputError(
                    f"rq_rotation must be a bitshard.Rotation, got {type(rq_rotation).__name__}"
                )
            rot = rq_rotation
            if num_bits is not None and int(num_bits) != rot.num_bits:
                raise InvalidInputError(
                    f"num_bits={num_bits} conflicts with the rotation's num_bits={rot.num_bits}"
                )
            if rot.dimension != dim:
                raise InvalidInputError(
                    f"rq_rotation has dimension {rot.dimension}, column {column!r} has {dim}"
                )
        return ivf, rot

    def create_index_uncommitted(
        self,
        column: str,
        index_type: str = "IVF_RQ",
        name: Optional[str] = None,
        ivf_centroids: Any = None,
        rq_rotation: Optional[Rotation] = None,
        fragment_ids: Optional[Sequence[int]] = None,
        num_bits: Optional[int] = None,
        metric: str = "l2",
        index_uuid: Optional[str] = None,
        *,
        rabitq_model: Optional[Rotation] = None,
        batch_size: int = 65536,
        progress: Any = None,
        **kwargs: Any,
    ) -> SegmentHandle:
        """Encode some fragments into one segment; commit nothing.

        Args:
            column: vector column (fixed-size list of float16/32/64).
            index_type: must be ``"IVF_RQ"``.
            name: the index name the segment is for (default ``<column>_idx``).
            ivf_centroids: the shared IVF model, a (k, d) array or a path.
            rq_rotation: the shared :class:`Rotation` (``rabitq_model=`` is an
                alias). Without one the rotation comes from a fixed default
                seed, so independent workers still agree.
            fragment_ids: the fragments to encode (default: all).
            num_bits: bits per dimension; taken from the rotation when given.
            metric: ``"l2"``, ``"cosine"`` or ``"dot"``.
            index_uuid: the segment's uuid (default: a fresh one).

        Returns:
            A picklable :class:`SegmentHandle`.
        """
        if kwargs:
            raise InvalidInputError(f"unexpected arguments: {sorted(kwargs)}")
        if str(index_type).upper() != "IVF_RQ":
            raise InvalidInputError(f"index_type must be 'IVF_RQ', got {index_type!r}")
        if rabitq_model is not None:
            if rq_rotation is not None and rq_rotation != rabitq_model:
                raise InvalidInputError("rq_rotation and rabitq_model name different rotations")
            rq_rotation = rabitq_model
        ivf, rot = self._resolve_artifacts(column, ivf_centroids, rq_rotation, num_bits, metric)
        if fragment_ids is None:
            fragment_ids = [f.id for f in self.source.fragments()]
        fragment_ids = [int(f) for f in fragment_ids]
        name = name or f"{column}_idx"
        return idx.write_segment(
            self.source, column, name, self.storage, ivf, rot, fragment_ids,
            idx.new_uuid(index_uuid), batch_size=batch_size, progress=progress,
        )

    def merge_existing_index_segments(
        self, segments: Sequence[SegmentHandle], index_uuid: Optional[str] = None
    ) -> SegmentHandle:
        """Merge segments into one (streaming; bounded by one partition).

        Raises:
            ArtifactMismatchError: rotation, centroids, metric, bit width,
                dimension or column differ (the message names which).
            InvalidInputError: fragments overlap.
        """
        segments = list(segments)
        idx.check_same_artifacts(segments)
        return idx.merge_segments(segments, self.storage, index_uuid)

    def commit_existing_index_segments(
        self,
        name: str,
        column: str,
        segments: Sequence[SegmentHandle],
        *,
        replace: bool = False,
    ) -> "Dataset":
        """Commit segments as index ``name`` on ``column``; returns self.

        Appends to an existing index of that name (a delta commit) unless
        ``replace=True``. Raises CommitConflictError when another writer
        committed the same version first.
        """
        self._view = None  # our own commit: see it next search
        idx.commit(self.storage, name, column, list(segments),
                   mode="replace" if replace else "append",
                   source_version=self.source.version)
        return self

    def create_index(
        self,
        column: str,
        index_type: str = "IVF_RQ",
        name: Optional[str] = None,
        num_partitions: Optional[int] = None,
        num_bits: Optional[int] = None,
        metric: str = "l2",
        ivf_centroids: Any = None,
        rq_rotation: Optional[Rotation] = None,
        *,
        sample_rate: int = 256,
        max_iters: int = 50,
        seed: Optional[int] = None,
        replace: bool = True,
        progress: bool = False,
        **kwargs: Any,
    ) -> "Dataset":
        """Build and commit an IVF_RQ index in this process.

        Trains centroids when none are given (``num_partitions`` of them,
        default about sqrt(rows)), uses the default rotation when none is
        given, encodes every fragment into one segment and commits it.
        Returns self.
        """
        name = name or f"{column}_idx"
        if ivf_centroids is None:
            nrows = sum(f.num_rows for f in self.source.fragments())
            k = num_partitions or _default_num_partitions(nrows)
            ivf_centroids = train_ivf(self, column, k, metric, sample_rate, max_iters, seed)
        elif num_partitions is not None and as_ivf_model(ivf_centroids, metric).num_partitions != num_partitions:
            raise InvalidInputError("num_partitions conflicts with ivf_centroids")
        seg = self.create_index_uncommitted(
            column, index_type, name=name, ivf_centroids=ivf_centroids,
            rq_rotation=rq_rotation, num_bits=num_bits, metric=metric, **kwargs,
        )
        self._view = None  # our own commit: see it next search
        idx.commit(self.storage, name, column, [seg], mode="replace" if replace else "append",
                   source_version=self.source.version)
        return self

    def optimize_indices(self, name: Optional[str] = None) -> "Dataset":
        """Merge each index's committed segments into one (same merge path)."""
        names = [name] if name else idx.list_index_names(self.storage)
        for n in names:
            doc = idx.read_manifest(self.storage, n)
            segs = idx.committed_segments(self.storage, n, doc["version"])
            if len(segs) <= 1:
                continue
            merged = idx.merge_segments(segs, self.storage)
            self._view = None  # our own commit: see it next search
            idx.commit(self.storage, n, doc["column"], [merged], mode="replace",
                       source_version=self.source.version, expected_version=doc["version"])
        return self

    # --------------------------------------------------------- description

    def list_indices(self) -> List[Dict[str, Any]]:
        """One dict per committed index: name, column, version, segment count."""
        out = []
        for n in idx.list_index_names(self.storage):
            doc = idx.read_manifest(self.storage, n)
            out.append({
                "name": n,
                "type": "IVF_RQ",
                "column": doc["column"],
                "version": doc["version"],
                "num_segments": len(doc["segments"]),
                "metric": doc.get("metric"),
                "num_bits": doc.get("num_bits"),
            })
        return out

    def describe_indices(self) -> List[Dict[str, Any]]:
        """Each index with its segments, fragments, rows, fingerprints, and the
        source fragments no segment covers."""
        all_frags = [f.id for f in self.source.fragments()]
        out = []
        for n in idx.list_index_names(self.storage):
            doc = idx.read_manifest(self.storage, n)
            segs = idx.committed_segments(self.storage, n)
            covered = set(idx.iter_fragments(segs))
            out.append({
                "name": n,
                "column": doc["column"],
                "version": doc["version"],
                "metric": doc.get("metric"),
                "num_bits": doc.get("num_bits"),
                "dimension": doc.get("dimension"),
                "rotation_fingerprint": doc.get("rotation_fingerprint"),
                "ivf_fingerprint": doc.get("ivf_fingerprint"),
                "segments": [s.to_json() for s in segs],
                "num_rows": sum(s.num_rows for s in segs),
                "uncovered_fragments": [f for f in all_frags if f not in covered],
            })
        return out

    # -------------------------------------------------------------- search

    def refresh(self) -> "Dataset":
        """See indexes committed by other writers since this object first
        searched (its own commits are always seen). Returns self."""
        self._view = None
        return self

    def _index_view(self) -> Dict[str, Tuple[int, str]]:
        if self._view is None:
            view = {}
            for n in idx.list_index_names(self.storage):
                v = idx.latest_version(self.storage, n)
                view[n] = (v, idx.read_manifest(self.storage, n, v)["column"])
            self._view = view
        return self._view

    def _resolve_index(self, column: str, index: Optional[str]) -> str:
        view = self._index_view()
        names = sorted(view)
        if index is not None:
            if index not in view:
                raise IndexNotFoundError(f"no index named {index!r}; have {names}")
            return index
        on_col = [n for n in names if view[n][1] == column]
        if not on_col:
            raise IndexNotFoundError(f"no index on column {column!r}")
        if len(on_col) > 1:
            raise InvalidInputError(
                f"column {column!r} has several indexes {on_col}; pass index= to choose"
            )
        return on_col[0]

    def _deleted_rowids(self, handles: List[SegmentHandle]) -> Optional[np.ndarray]:
        """Sorted row ids deleted from the source after their segments were
        built (a segment encodes the rows live at build time), or None."""
        covered = set(idx.iter_fragments(handles))
        parts = []
        for f in self.source.fragments():
            if f.id in covered and f.num_rows < f.physical_rows:
                key = (self.source.version, f.id)
                if key not in self._deleted_cache:
                    live = self.source._live_offsets(f.id).astype(np.uint64)
                    dead = np.setdiff1d(np.arange(f.physical_rows, dtype=np.uint64), live)
                    self._deleted_cache[key] = (np.uint64(f.id) << np.uint64(32)) | dead
                parts.append(self._deleted_cache[key])
        if not parts:
            return None
        return np.ascontiguousarray(np.sort(np.concatenate(parts)), dtype=np.uint64)

    def _plan(self, name: str, handles: List[SegmentHandle]) -> Dict[str, Any]:
        """What a search of index ``name`` needs that does not depend on the
        query: computed once per (index version, source version)."""
        key = (name, self._index_view()[name][0], self.source.version)
        plan = self._plans.get(key)
        if plan is None:
            source_frags = {f.id for f in self.source.fragments()}
            covered = set(idx.iter_fragments(handles))
            # Fragments compacted away or deleted since the build: segments
            # covering only those are skipped, and their rows never returned.
            stale = covered - source_frags
            plan = {
                "source_frags": source_frags,
                "covered": covered,
                "uncovered_all": sorted(source_frags - covered),
                "mask_all": np.array([any(f in source_frags for f in h.fragment_ids)
                                      for h in handles], dtype=np.uint8),
                "allowed_all": np.array(sorted(source_frags), dtype=np.uint64) if stale else None,
                "denied": self._deleted_rowids(handles),
            }
            self._plans = {key: plan}
        return plan

    def _searcher(self, name: str) -> Tuple[Any, List[SegmentHandle], Dict[str, Any]]:
        version = self._index_view()[name][0]
        key = (name, version)
        if key not in self._searchers:
            doc = idx.read_manifest(self.storage, name, version)
            handles = idx.committed_segments(self.storage, name, version)
            opened = [idx.open_handle(h, self.storage) for h in handles]
            # The manifest's claims are checked against the files: a segment
            # swapped on disk for one from another code space is refused here
            # (and the C searcher checks the files against each other).
            for h, o in zip(handles, opened):
                real = o.handle(self.index_root, name)
                if (real.rotation_fingerprint, real.ivf_fingerprint, real.num_bits,
                        real.metric, real.column) != (h.rotation_fingerprint,
                                                      h.ivf_fingerprint, h.num_bits,
                                                      h.metric, h.column):
                    raise ArtifactMismatchError(
                        f"segment {h.uuid} on disk does not match index {name!r}: "
                        f"rotation {real.rotation_fingerprint} vs {h.rotation_fingerprint}, "
                        f"centroids {real.ivf_fingerprint} vs {h.ivf_fingerprint}"
                    )
            searcher = _native.Searcher([o.native for o in opened]) if opened else None
            self._searchers = {k: v for k, v in self._searchers.items() if k[0] != name}
            self._searchers[key] = (searcher, handles, doc, opened)
        s, handles, doc, _ = self._searchers[key]
        return s, handles, doc

    def search(
        self,
        column: str,
        q: Any,
        k: int = 10,
        nprobes: int = 20,
        refine_factor: Optional[int] = None,
        columns: Optional[Sequence[str]] = None,
        index: Optional[str] = None,
        *,
        fragment_ids: Optional[Sequence[int]] = None,
        filter: Any = None,
        fast_search: bool = False,
        eps0: float = DEFAULT_EPS0,
        num_threads: Optional[int] = None,
        with_stats: bool = False,
    ) -> pa.Table:
        """Nearest neighbours of ``q`` through the committed index.

        Args:
            column: the indexed vector column.
            q: one query (d,) or a batch (nq, d); float16/32/64.
            k: neighbours per query.
            nprobes: partitions probed (capped at the partition count).
            refine_factor: ``None`` reranks exactly the candidates whose lower
                bound can still enter the top k (1-bit) or returns the extra
                bits' estimates (multi-bit); ``r`` reranks the k*r best
                estimates with exact distances.
            columns: source columns to add to the result.
            index: the index name when the column has several.
            fragment_ids: search only these fragments (prunes segments).
            filter: a filter on other columns (Lance SQL string, or a pyarrow
                expression), resolved to allowed rows first (prefilter).
            fast_search: skip fragments that no segment covers instead of
                scanning them exactly.
            eps0: width of the error bound in standard deviations.
            num_threads: threads for a batch of queries (default: all cores).
            with_stats: record scan counts in ``self.last_search_stats``.

        Returns:
            pyarrow Table with ``_rowid`` (uint64), ``_distance`` (float32),
            the requested columns, and ``query_index`` for a batch; rows sorted
            by (query_index, _distance, _rowid).
        """
        q_arr = np.asarray(q)
        if q_arr.dtype.kind not in "fiu" or q_arr.dtype.kind == "b":
            raise InvalidInputError(f"query must be numeric, got dtype {q_arr.dtype}")
        batch = q_arr.ndim == 2
        if q_arr.ndim not in (1, 2):
            raise InvalidInputError(f"query must be 1-D or 2-D, got shape {q_arr.shape}")
        Q = np.ascontiguousarray(q_arr.reshape(-1, q_arr.shape[-1]), dtype=np.float32)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
        if isinstance(nprobes, bool) or not isinstance(nprobes, (int, np.integer)) or nprobes < 1:
            raise InvalidInputError(f"nprobes must be an integer >= 1, got {nprobes!r}")
        if refine_factor is not None and (not isinstance(refine_factor, (int, np.integer))
                                          or refine_factor < 1):
            raise InvalidInputError(f"refine_factor must be None or >= 1, got {refine_factor!r}")
        name = self._resolve_index(column, index)
        searcher, handles, doc = self._searcher(name)
        metric = doc.get("metric", "l2")
        dim = self.source.vector_dim(column)
        if Q.shape[1] != dim:
            raise InvalidInputError(f"query has dimension {Q.shape[1]}, column {column!r} has {dim}")
        if not np.isfinite(Q).all():
            bad = np.argwhere(~np.isfinite(Q))[0]
            raise InvalidInputError(
                f"query {bad[0]} has a non-finite value at dimension {bad[1]}"
            )
        num_bits = int(doc.get("num_bits", 1))
        plan = self._plan(name, handles)
        if fragment_ids is None:
            wanted = plan["source_frags"]
            mask = plan["mask_all"]
            allowed_frags = plan["allowed_all"]
            uncovered = [] if fast_search else plan["uncovered_all"]
        else:
            wanted = {int(f) for f in fragment_ids}
            unknown = wanted - plan["source_frags"]
            if unknown:
                raise InvalidInputError(f"fragment {min(unknown)} is not in the source")
            mask = np.array([any(f in wanted for f in h.fragment_ids) for h in handles],
                            dtype=np.uint8)
            allowed_frags = np.array(sorted(wanted), dtype=np.uint64)
            uncovered = [] if fast_search else sorted(wanted - plan["covered"])
        allowed_rows = None
        if filter is not None:
            allowed_rows = np.ascontiguousarray(
                np.sort(self.source.filter_rowids(filter, sorted(wanted))), dtype=np.uint64)
        mcode = METRICS[metric]
        stats_reads = 0

        rowid_parts, dist_parts, qi_parts = [], [], []
        stats = np.zeros(4, dtype=np.int64)
        nq = Q.shape[0]
        per_query: List[Tuple[np.ndarray, np.ndarray]] = [
            (np.empty(0, np.uint64), np.empty(0, np.float32))] * nq
        if searcher is not None and mask.any():
            threads = num_threads or os.cpu_count() or 1
            res, st = searcher.search_batch(
                Q, nq, int(k), int(nprobes), float(eps0),
                0 if refine_factor is None else int(refine_factor),
                mask, allowed_rows, allowed_frags, int(threads), plan["denied"],
            )
            stats += np.array(st, dtype=np.int64)
            per_query = [(np.frombuffer(r, dtype=np.uint64), np.frombuffer(e, dtype=np.float32))
                         for r, e, _ in res]
            if refine_factor is not None:
                per_query = _rerank_all(self.source, column, Q, per_query, mcode, dim)
            elif num_bits == 1:
                lbs = [np.frombuffer(lb, dtype=np.float32) for _, _, lb in res]
                per_query, reads = _rerank_gated(self.source, column, Q, per_query, lbs,
                                                 mcode, dim, int(k))
                stats_reads = reads
        exact_scan = _ExactScan(self.source, column, uncovered, allowed_rows, mcode, dim) \
            if uncovered else None
        for qi in range(nq):
            rows, dists = per_query[qi]
            if exact_scan is not None:
                er, ed = exact_scan.search(Q[qi], int(k))
                rows = np.concatenate([rows, er])
                dists = np.concatenate([dists, ed])
            order = np.lexsort((rows, dists))[: int(k)]
            rowid_parts.append(rows[order])
            dist_parts.append(dists[order])
            qi_parts.append(np.full(order.size, qi, dtype=np.int32))
        rowids = np.concatenate(rowid_parts) if rowid_parts else np.empty(0, np.uint64)
        table = pa.table({
            "_rowid": pa.array(rowids, type=pa.uint64()),
            "_distance": pa.array(np.concatenate(dist_parts), type=pa.float32()),
        })
        if batch:
            table = table.append_column("query_index", pa.array(np.concatenate(qi_parts)))
        if columns:
            extra = self.source.take_table(rowids, list(columns))
            for c in columns:
                table = table.append_column(c, extra.column(c))
        if with_stats:
            self.last_search_stats = {
                "partitions_probed": int(stats[0]),
                "codes_scanned": int(stats[1]),
                "codes_stage2": int(stats[2]),
                "candidates": int(stats[3]),
                "exact_reads": int(stats_reads),
            }
        return table


def _rerank_gated(source: Source, column: str, Q: np.ndarray,
                  per_query: List[Tuple[np.ndarray, np.ndarray]], lbs: List[np.ndarray],
                  metric: int, dim: int, k: int) -> Tuple[List[Tuple[np.ndarray, np.ndarray]], int]:
    """Exact distances for 1-bit candidates, read in lower-bound order.

    Candidate i is read only if fewer than k exact distances are known or its
    lower bound is within the k-th best so far; the first candidate that fails
    ends that query. The stop point depends only on the candidate list, so a
    batch may read a few rows past it (to keep source reads few and large)
    without changing the answer.
    """
    nq = len(per_query)
    done = [rows.size == 0 for rows, _ in per_query]
    pos = [0] * nq
    kept_rows: List[List[np.ndarray]] = [[] for _ in range(nq)]
    kept_d: List[List[np.ndarray]] = [[] for _ in range(nq)]
    heaps = np.zeros((nq, k), dtype=np.float32)  # max-heaps of the k best, per query
    heap_n = [0] * nq
    step = 2 * k
    reads = 0
    while not all(done):
        want = []
        for qi in range(nq):
            if not done[qi]:
                rows = per_query[qi][0]
                want.append((qi, pos[qi], min(rows.size, pos[qi] + step)))
        all_rows = np.concatenate([per_query[qi][0][a:b] for qi, a, b in want])
        uniq, inverse = np.unique(all_rows, return_inverse=True)
        vecs = np.ascontiguousarray(source.take(column, uniq), dtype=np.float32)
        reads += uniq.size
        at = 0
        for qi, a, b in want:
            n = b - a
            sel = np.ascontiguousarray(vecs[inverse[at:at + n]])
            at += n
            d = np.empty(n, dtype=np.float32)
            _native.exact_distances(metric, Q[qi], sel, n, dim, d)
            stop, heap_n[qi] = _native.rerank_gate(
                np.ascontiguousarray(lbs[qi][a:b]), d, heaps[qi], heap_n[qi], k)
            kept_rows[qi].append(per_query[qi][0][a:a + stop])
            kept_d[qi].append(d[:stop])
            pos[qi] = a + stop
            if stop < n or b >= per_query[qi][0].size:
                done[qi] = True
        step *= 2
    out = []
    for qi in range(nq):
        if kept_rows[qi]:
            out.append((np.concatenate(kept_rows[qi]), np.concatenate(kept_d[qi])))
        else:
            out.append(per_query[qi])
    return out, reads


def _rerank_all(source: Source, column: str, Q: np.ndarray,
                 per_query: List[Tuple[np.ndarray, np.ndarray]], metric: int, dim: int
                 ) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Exact distances for every candidate, reading each row once per batch."""
    all_rows = np.concatenate([r for r, _ in per_query]) if per_query else np.empty(0, np.uint64)
    if all_rows.size == 0:
        return per_query
    uniq, inverse = np.unique(all_rows, return_inverse=True)
    vecs = np.ascontiguousarray(source.take(column, uniq), dtype=np.float32)
    out = []
    pos = 0
    for qi, (rows, _) in enumerate(per_query):
        n = rows.size
        sel = vecs[inverse[pos:pos + n]]
        pos += n
        d = np.empty(n, dtype=np.float32)
        if n:
            _native.exact_distances(metric, Q[qi], np.ascontiguousarray(sel), n, dim, d)
        out.append((rows, d))
    return out


class _ExactScan:
    """Exact search over fragments that no segment covers (held in memory
    once per search call, so a batch of queries reads them once)."""

    def __init__(self, source: Source, column: str, fragments: List[int],
                 allowed_rows: Optional[np.ndarray], metric: int, dim: int) -> None:
        rows, vecs = [], []
        for b in source.iter_batches(column, fragment_ids=fragments):
            rid = (np.uint64(b.fragment_id) << np.uint64(32)) | b.offsets.astype(np.uint64)
            v = b.vectors
            if allowed_rows is not None:
                keep = np.isin(rid, allowed_rows)
                rid, v = rid[keep], v[keep]
            rows.append(rid)
            vecs.append(v)
        self.rows = np.concatenate(rows) if rows else np.empty(0, np.uint64)
        self.vecs = np.ascontiguousarray(np.concatenate(vecs) if vecs else np.empty((0, dim), np.float32), dtype=np.float32)
        self.metric = metric
        self.dim = dim

    def search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        n = self.rows.size
        if n == 0:
            return self.rows, np.empty(0, np.float32)
        d = np.empty(n, dtype=np.float32)
        _native.exact_distances(self.metric, q, self.vecs, n, self.dim, d)
        order = np.lexsort((self.rows, d))[:k]
        return self.rows[order], d[order]
