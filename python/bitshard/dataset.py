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
from . import identity, validate
from .errors import BitshardError, InvalidInputError
from . import index as idx
from .index import SegmentHandle
from .indexview import IndexView
from .upkeep import drift_report
from .searcher import DEFAULT_EXACT_CACHE_BYTES, SearchOptions, Searcher
from .sources import Source, open_source
from .storage import Storage, is_object_uri, join_uri

__all__ = ["Dataset", "dataset", "train_ivf", "DEFAULT_NUM_BITS", "DEFAULT_EPS0"]

#: Bits per dimension when the caller does not say: 9, the width that gave the
#: most recall per unit of query time in bench/results/bits.json (see
#: docs/decisions.md). ``build_rq_rotation`` keeps pylance's default of 1.
DEFAULT_NUM_BITS = 9
#: Width of the error bound in standard deviations (docs/rabitq.md).
DEFAULT_EPS0 = 1.9
INDEX_DIR_NAME = "_bitshard"


def dataset(
    x: Any,
    *,
    index_uri: Optional[Union[str, os.PathLike]] = None,
    fragment_size: Optional[int] = None,
    storage_options: Optional[Dict[str, Any]] = None,
    exact_cache_bytes: int = DEFAULT_EXACT_CACHE_BYTES,
    partition_cache_bytes: Optional[int] = None,
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
        exact_cache_bytes: bytes of vectors (plus 8 bytes of row id a row)
            of the rows no segment covers that searches keep in memory, per
            index; the rest are read from the source on every search
            (default 256 MiB; 0 caches nothing). See :attr:`Dataset.exact_cache_bytes`.
        partition_cache_bytes: bytes of index partitions fetched by range
            from an object store that searches keep in memory (default: the
            ``partition_cache_bytes`` storage option, else 512 MiB). See
            :attr:`Dataset.partition_cache_bytes`.

    Returns:
        A :class:`Dataset`.
    """
    src = open_source(x, fragment_size=fragment_size) if fragment_size else open_source(x)
    return Dataset(src, index_uri=index_uri, storage_options=storage_options,
                   exact_cache_bytes=exact_cache_bytes,
                   partition_cache_bytes=partition_cache_bytes)


def train_ivf(
    ds: Union["Dataset", Any],
    column: str,
    num_partitions: int,
    metric: str = "l2",
    sample_rate: int = 256,
    max_iters: int = 50,
    seed: Optional[int] = None,
    num_threads: Optional[int] = None,
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
        num_threads: threads for the Lloyd iterations (default: all cores).
            The centroids are the same, bit for bit, for every thread count.

    Returns:
        An :class:`IvfModel` with float32 centroids (num_partitions, d).
    """
    if not isinstance(ds, Dataset):
        ds = dataset(ds)
    metric_code(metric)
    num_partitions = validate.num_partitions(num_partitions)
    sample_rate = validate.sample_rate(sample_rate)
    max_iters = validate.max_iters(max_iters)
    seed = validate.kmeans_seed(seed)
    num_threads = validate.thread_count(num_threads)
    sample = ds.source.sample(column, int(num_partitions) * int(sample_rate), seed)
    n, d = sample.shape
    if n < num_partitions:
        raise InvalidInputError(
            f"num_partitions ({num_partitions}) exceeds the number of rows ({n}) of column {column!r}"
        )
    out = np.empty((num_partitions, d), dtype=np.float32)
    _native.kmeans_train(np.ascontiguousarray(sample, dtype=np.float32), n, d,
                         int(num_partitions), METRICS[metric.lower()], int(max_iters),
                         seed, out, num_threads)
    return IvfModel(out, metric)


def _source_storage_options(source: Source) -> Optional[Dict[str, Any]]:
    """The object-store options a Lance source was opened with, limited to
    the keys bitshard's storage knows (an index beside such data uses them)."""
    from .storage import _ALIASES  # noqa: PLC0415

    opts = getattr(source, "_storage_options", None) or {}
    known = {k: v for k, v in opts.items() if str(k).lower() in _ALIASES}
    return known or None


def _recorded_parquet_ids(storage: Storage) -> Dict[str, int]:
    """Relative path -> fragment id, as the latest manifests of the indexes
    under ``storage`` recorded them (format 2 Parquet records). An index
    whose manifest cannot be read is left out (its search reports why); a
    path or id two indexes record differently keeps the first index's (by
    name); the other index then sees that fragment as stale."""
    from .errors import BitshardError  # noqa: PLC0415

    out: Dict[str, int] = {}
    taken: Dict[int, str] = {}
    try:
        names = idx.list_index_names(storage)
    except (BitshardError, OSError):
        return out
    for n in names:
        try:
            doc = idx.read_manifest(storage, n)
        except (BitshardError, OSError):
            continue
        for e in doc["segments"]:
            for f in e.get("fragments") or ():
                rec = f["record"]
                if rec.get("kind") != "parquet":
                    continue
                path, fid = rec["path"], int(f["id"])
                if path not in out and fid not in taken:
                    out[path] = fid
                    taken[fid] = path
    return out


def _default_num_partitions(num_rows: int) -> int:
    # About sqrt(n) partitions, as pylance suggests, at least 1.
    return max(1, min(num_rows, int(round(np.sqrt(max(num_rows, 1))))))


class Dataset:
    """A source of vectors plus the bitshard indexes built over it."""

    #: Set by :func:`bitshard.build_index` on the dataset it returns: what the
    #: build did (executor, tasks, reused segments, seconds per phase, ...).
    last_build_stats: Dict[str, Any]

    def __init__(self, source: Source, index_uri: Optional[Union[str, os.PathLike]] = None,
                 storage_options: Optional[Dict[str, Any]] = None,
                 exact_cache_bytes: int = DEFAULT_EXACT_CACHE_BYTES,
                 partition_cache_bytes: Optional[int] = None) -> None:
        exact_cache_bytes = validate.integer("exact_cache_bytes", exact_cache_bytes, 0)
        partition_cache_bytes = validate.optional_integer(
            "partition_cache_bytes", partition_cache_bytes, 0)
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
        if source.kind == "parquet":
            # A Parquet file keeps the fragment id its indexes recorded for
            # its path; new files get fresh ids (docs/sources.md).
            ids = _recorded_parquet_ids(self.storage)
            if ids:
                source.adopt_fragment_ids(ids)  # type: ignore[attr-defined]
        # The committed indexes this object searches, pinned at first use
        # until it commits or refresh() is called (see bitshard.indexview).
        self._indexes = IndexView(self.storage, self.source, self.index_root)
        self._indexes.set_exact_cache_bytes(exact_cache_bytes)
        self._partition_cache_bytes = partition_cache_bytes
        if partition_cache_bytes is not None:
            self._indexes.partition_cache.set_max_bytes(partition_cache_bytes)

    @property
    def partition_cache_bytes(self) -> int:
        """Bytes of index partitions read by range from an object store
        (no ``cache_dir``) that this Dataset's searches keep in memory,
        least recently used dropped first; partitions a running search
        probes are held until it ends, even past the bound. Settable (an
        integer >= 0, applied at once). Default: the ``partition_cache_bytes``
        storage option or ``BITSHARD_PARTITION_CACHE_BYTES``, else 512 MiB."""
        return self._indexes.partition_cache.max_bytes

    @partition_cache_bytes.setter
    def partition_cache_bytes(self, value: int) -> None:
        value = validate.integer("partition_cache_bytes", value, 0)
        self._partition_cache_bytes = value
        self._indexes.partition_cache.set_max_bytes(value)

    @property
    def exact_cache_bytes(self) -> int:
        """Bytes of vectors (plus 8 bytes of row id a row) of the rows no
        segment covers that this Dataset's searches keep in memory, per
        index; the rest are streamed from the source on every search.
        Settable (an integer >= 0); a new value applies to searchers made
        after it. ``search``/``searcher`` take ``exact_cache_bytes=`` to give
        one searcher its own cache instead."""
        return self._indexes.exact_cache_bytes

    @exact_cache_bytes.setter
    def exact_cache_bytes(self, value: int) -> None:
        self._indexes.set_exact_cache_bytes(validate.integer("exact_cache_bytes", value, 0))

    # -------------------------------------------------------------- pickling

    def __getstate__(self) -> Dict[str, Any]:
        return {"source": self.source, "index_root": self.index_root,
                "storage_options": self.storage_options,
                "exact_cache_bytes": self.exact_cache_bytes,
                "partition_cache_bytes": self._partition_cache_bytes}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.source = state["source"]
        self.index_root = state["index_root"]
        self.storage_options = state.get("storage_options")
        self.storage = Storage.for_uri(self.index_root, self.storage_options)
        self._tmp = None
        self._indexes = IndexView(self.storage, self.source, self.index_root)
        self._indexes.set_exact_cache_bytes(
            state.get("exact_cache_bytes", DEFAULT_EXACT_CACHE_BYTES))
        self._partition_cache_bytes = state.get("partition_cache_bytes")
        if self._partition_cache_bytes is not None:
            self._indexes.partition_cache.set_max_bytes(self._partition_cache_bytes)

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
        validate.ivf_for(ivf, dim, column)
        if rq_rotation is None:
            rot = Rotation(dim, DEFAULT_NUM_BITS if num_bits is None else num_bits,
                           "float32", "fast", DEFAULT_ROTATION_SEED)
        else:
            rot = validate.rotation_for(rq_rotation, num_bits, dim, column)
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
        num_threads: Optional[int] = None,
        external_centroids: bool = False,
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
            num_threads: threads that encode each batch (default: all
                cores; a distributed worker uses 1, one task per core). The
                segment is the same, byte for byte, for every count.
            external_centroids: leave the centroids out of the file; they are
                stored once under the index root (``artifacts/<ivf
                fingerprint>.ivf``) and shared by the index's segments
                (docs/format.md, "External centroids").

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
        name = validate.index_name(name or f"{column}_idx")
        num_bits = validate.optional_num_bits(num_bits)
        if fragment_ids is not None:
            fragment_ids = validate.fragment_ids(fragment_ids)
        batch_size = validate.positive_integer("batch_size", batch_size)
        num_threads = validate.thread_count(num_threads)
        external_centroids = validate.boolean("external_centroids", external_centroids)
        ivf, rot = self._resolve_artifacts(column, ivf_centroids, rq_rotation, num_bits, metric)
        if fragment_ids is None:
            fragment_ids = [f.id for f in self.source.fragments()]
        return idx.write_segment(
            self.source, column, name, self.storage, ivf, rot, fragment_ids,
            idx.new_uuid(index_uuid), batch_size=batch_size, progress=progress,
            num_threads=num_threads, external_centroids=external_centroids,
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
        committed the same version first. Each handle carries the identity
        of its fragments at the version its worker read; a handle without
        them (one made from its file alone) gets this Dataset's source's,
        so commit such a handle through a Dataset pinned to that version.
        """
        self._indexes.invalidate()  # our own commit: see it next search
        idx.commit(self.storage, name, column, list(segments),
                   mode="replace" if replace else "append",
                   source_version=self.source.version, source=self.source)
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
        num_threads: Optional[int] = None,
        **kwargs: Any,
    ) -> "Dataset":
        """Build and commit an IVF_RQ index in this process.

        Trains centroids when none are given (``num_partitions`` of them,
        default about sqrt(rows)), uses the default rotation when none is
        given, encodes every fragment into one segment and commits it.
        ``num_threads`` (default: all cores) runs k-means and encoding; the
        index is the same, byte for byte, for every count. Returns self.
        """
        name = idx.check_commit_name(self.storage, name or f"{column}_idx")
        if num_partitions is not None:
            num_partitions = validate.num_partitions(num_partitions)
        num_bits = validate.optional_num_bits(num_bits)
        sample_rate = validate.sample_rate(sample_rate)
        max_iters = validate.max_iters(max_iters)
        seed = validate.optional_seed(seed)
        num_threads = validate.thread_count(num_threads)
        if ivf_centroids is None:
            nrows = sum(f.num_rows for f in self.source.fragments())
            k = num_partitions or _default_num_partitions(nrows)
            ivf_centroids = train_ivf(self, column, k, metric, sample_rate, max_iters, seed,
                                      num_threads=num_threads)
        elif num_partitions is not None:
            ivf_centroids = as_ivf_model(ivf_centroids, metric)
            validate.ivf_for(ivf_centroids, self.source.vector_dim(column), column,
                             num_partitions)
        seg = self.create_index_uncommitted(
            column, index_type, name=name, ivf_centroids=ivf_centroids,
            rq_rotation=rq_rotation, num_bits=num_bits, metric=metric,
            num_threads=num_threads, **kwargs,
        )
        self._indexes.invalidate()  # our own commit: see it next search
        idx.commit(self.storage, name, column, [seg], mode="replace" if replace else "append",
                   source_version=self.source.version)
        return self

    def optimize_indices(self, name: Optional[str] = None, *,
                         index_names: Optional[Sequence[str]] = None,
                         num_indices_to_merge: Optional[int] = None,
                         retrain: bool = False) -> "Dataset":
        """Bring each index up to date with the source; pylance's arguments.

        Rows a compaction moved are remapped to their new addresses (their
        codes are reused: no vector of theirs is read or encoded again),
        deleted rows are dropped, stale fragments and rows no segment covers
        (appended fragments, rows whose compaction history is gone) are read
        and encoded with the committed artifacts, and the result replaces
        the index in one commit (docs/usage.md, "Living datasets").

        Args:
            name: the older spelling, kept as it was: given alone, it only
                merges every committed segment of index ``name`` into one
                (nothing remapped, encoded or dropped); with other arguments
                it is ``index_names=[name]``.
            index_names: the indexes to optimize (default: all).
            num_indices_to_merge: as pylance's: ``None`` or 0 writes the new
                rows as a new delta segment (remapped segments replace the
                ones they come from); ``N >= 1`` merges the new rows and the
                latest N kept segments into one.
            retrain: train new centroids (same count) on the current data
                and encode every row again with them (same rotation);
                ``num_indices_to_merge`` is ignored and the index becomes
                one segment.

        Returns:
            self. ``self.last_optimize_stats`` maps each index name to what
            was done: ``rows_remapped``, ``rows_encoded``, ``rows_read``
            (vectors read from the source: the encoded rows only),
            ``rows_dropped``, ``compactions`` (Lance versions followed),
            ``lost_fragments`` / ``stale_fragments`` (fragment -> reason),
            ``history_gone``, ``segments_before`` / ``segments_after``,
            ``version``, ``committed``, ``seconds``, and its parts in
            seconds: ``seconds_history`` (following the compactions),
            ``seconds_encode`` (reading and encoding the uncovered rows),
            ``seconds_write`` (writing the new segments),
            ``seconds_commit``.

        Raises:
            CommitConflictError: another writer committed the index while
                this ran; nothing changed and the call can be repeated.
        """
        from .upkeep import optimize_index  # noqa: PLC0415

        if name is not None and index_names is not None:
            raise InvalidInputError("give name or index_names, not both")
        merge_all = name is not None and num_indices_to_merge is None and not retrain
        if name is not None:
            index_names = [name]
        if isinstance(index_names, str):
            index_names = [index_names]
        if num_indices_to_merge is not None:
            if isinstance(num_indices_to_merge, bool) or not isinstance(
                    num_indices_to_merge, (int, np.integer)) or num_indices_to_merge < 0:
                raise InvalidInputError(f"num_indices_to_merge must be an integer >= 0 or "
                                        f"None, got {num_indices_to_merge!r}")
        if not isinstance(retrain, bool):
            raise InvalidInputError(f"retrain must be True or False, got {retrain!r}")
        if merge_all and name is not None:
            return self._merge_all(name)
        names = list(index_names) if index_names is not None else \
            idx.list_index_names(self.storage)
        self.last_optimize_stats: Dict[str, Any] = {}
        for n in names:
            self.last_optimize_stats[n] = optimize_index(self, n, num_indices_to_merge,
                                                         retrain)
        return self

    def _merge_all(self, name: str) -> "Dataset":
        """``optimize_indices(name)``: merge the committed segments of index
        ``name`` into one (same merge path), as this method did before it
        took pylance's arguments."""
        doc = idx.read_manifest(self.storage, name)
        segs = idx.committed_segments(self.storage, name, doc["version"])
        if len(segs) <= 1:
            return self
        merged = idx.merge_segments(segs, self.storage)
        self._indexes.invalidate()  # our own commit: see it next search
        idx.commit(self.storage, name, doc["column"], [merged], mode="replace",
                   source_version=self.source.version, expected_version=doc["version"])
        return self

    @property
    def optimize(self) -> "_Optimizer":
        """pylance's spelling: ``ds.optimize.optimize_indices(...)``."""
        return _Optimizer(self)

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
        """Each index with its segments, fragments, rows, fingerprints, the
        source fragments no segment covers (``uncovered_fragments``), the
        covered ones whose data changed since they were encoded
        (``stale_fragments``: ``{"id", "reason"}`` each, searched exactly;
        a reason starting ``"unverified"`` is a fragment of an index that
        recorded no identities and whose build version cannot be compared;
        judged as a search judges them: each segment file's identity
        fingerprints against the source's current fragments, the
        manifest's records naming the reason or standing in where a file
        has none),
        and the covered ones no longer in the source (``missing_fragments``:
        compacted away or deleted; their rows are never returned; run
        ``optimize_indices``), and ``drift``: after an ``optimize_indices``,
        the rows it encoded since the centroids were last applied to every
        row (``new_rows``) and their mean residual norm (distance to their
        centroid, ``new_mean_residual``) against the indexed rows'
        (``indexed_rows``, ``indexed_mean_residual``), and ``ratio`` = new /
        indexed (well above 1: time to retrain); None before any upkeep."""
        all_frags = [f.id for f in self.source.fragments()]
        out = []
        for n in idx.list_index_names(self.storage):
            doc = idx.read_manifest(self.storage, n)
            segs = [idx.handle_from_json(self.storage, n, doc["column"], e)
                    for e in doc["segments"]]
            covered = set(idx.iter_fragments(segs))
            # The files' fingerprints decide, as when a search opens the
            # index (IndexView.plan): opened for search only, so an object
            # store reads each file's prefix, not its partitions.
            stale = identity.stale_fragments(self.source, doc, segs,
                                             [self._open_for_identities(h) for h in segs])
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
                "stale_fragments": [{"id": f, "reason": r} for f, r in sorted(stale.items())],
                "missing_fragments": identity.missing_fragments(self.source, segs),
                "drift": drift_report(doc.get("drift")),
            })
        return out

    def _open_for_identities(self, h: SegmentHandle) -> Optional[idx.OpenSegment]:
        """Segment ``h`` opened for its fragment fingerprints (for search
        only: an object store reads the file's prefix, not its
        partitions), or None when it cannot be opened or is not the file
        the manifest describes: ``verify`` reports that; describe then
        judges its fragments from the manifest."""
        try:
            return idx.open_handle(h, self.storage, ranged=True)
        except (BitshardError, OSError):
            return None

    # -------------------------------------------------------------- search

    def refresh(self) -> "Dataset":
        """See indexes committed by other writers since this object first
        searched (its own commits are always seen). Returns self."""
        self._indexes.invalidate()
        return self

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
        exact_cache_bytes: Optional[int] = None,
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
            exact_cache_bytes: ``None`` (default): rows no segment covers
                are cached up to :attr:`exact_cache_bytes` of this Dataset,
                shared by its searches of the index; an integer >= 0: a
                cache of that many bytes for this search's settings alone.

        Returns:
            pyarrow Table with ``_rowid`` (uint64), ``_distance`` (float32),
            ``query_index`` for a batch, and the requested columns; rows
            sorted by (query_index, _distance, row address). ``_rowid`` is
            Lance's ``_rowid`` of the row: its row address
            ``(fragment << 32) | offset`` (bitshard's row id), or, for a
            Lance dataset with stable row ids, its stable row id, with the
            address in an extra ``_rowaddr`` column after ``_distance``
            (docs/sources.md, "Stable row ids").
        """
        s = self._indexes.searcher(column, SearchOptions.from_arguments(locals()))
        before = s.stats if with_stats else None
        q_arr = np.asarray(q)
        table = self._hits_table(s.search_lists(q_arr), q_arr.ndim, columns)
        if before is not None:
            self.last_search_stats = {key: v - before[key] for key, v in s.stats.items()}
        return table

    def _hits_table(self, hits: List[Tuple[np.ndarray, np.ndarray]], ndim: int,
                    columns: Optional[Sequence[str]]) -> pa.Table:
        """The Table :meth:`search` returns for a searcher's ``hits`` (one
        (rowids, distances) pair per query) of queries of ``ndim`` dimensions
        (1: one query, 2: a batch); bitshard.serve's front builds the same."""
        if len(hits) == 1:
            rowids, dists = hits[0]
        else:
            rowids = np.concatenate([r for r, _ in hits]) if hits else np.empty(0, np.uint64)
            dists = np.concatenate([d for _, d in hits]) if hits else np.empty(0, np.float32)
        table = pa.Table.from_arrays([pa.array(rowids, type=pa.uint64()),
                                      pa.array(dists, type=pa.float32())],
                                     names=["_rowid", "_distance"])
        if self.source.stable_row_ids:
            table = pa.Table.from_arrays(
                [pa.array(self.source.lance_row_ids(rowids), type=pa.uint64()),
                 table.column("_distance"), table.column("_rowid")],
                names=["_rowid", "_distance", "_rowaddr"])
        if ndim == 2:
            qi = np.repeat(np.arange(len(hits), dtype=np.int32), [r.size for r, _ in hits])
            table = table.append_column("query_index", pa.array(qi))
        if columns:
            extra = self.source.take_table(rowids, list(columns))
            for c in columns:
                if c == "_rowid" and self.source.stable_row_ids and \
                        self.source.schema.get_field_index(c) < 0:
                    # Lance's _rowid (the stable id, as in the first column),
                    # not the address take_table's pseudo-column gives.
                    table = table.append_column(c, table.column(0))
                else:
                    table = table.append_column(c, extra.column(c))
        return table

    def searcher(
        self,
        column: str,
        *,
        k: int = 10,
        nprobes: int = 20,
        refine_factor: Optional[int] = None,
        index: Optional[str] = None,
        fragment_ids: Optional[Sequence[int]] = None,
        filter: Any = None,
        fast_search: bool = False,
        eps0: float = DEFAULT_EPS0,
        num_threads: Optional[int] = None,
        exact_cache_bytes: Optional[int] = None,
    ) -> Searcher:
        """A prepared search: the settings of :meth:`search`, fixed, for many
        queries.

        Everything that does not depend on the query (the index and its
        committed version, the plan of segments and fragments, the rows a
        ``filter`` allows, the deleted rows) is settled here once, so
        ``searcher.search(q)`` costs the scan itself and returns numpy arrays:
        ``(rowids, distances)`` of shape (k,) per query, or (nq, k) for a
        batch, padded with ``bitshard.NO_ROW`` / ``inf``. The searcher keeps
        the index version it was made with; call :meth:`refresh` and make a
        new one to see later commits.

        Args: as :meth:`search`.

        Returns:
            A :class:`bitshard.Searcher`.
        """
        return Searcher(self._indexes, column, SearchOptions.from_arguments(locals()))


class _Optimizer:
    """``Dataset.optimize``: the upkeep methods under pylance's names."""

    def __init__(self, ds: Dataset) -> None:
        self._ds = ds

    def optimize_indices(self, **kwargs: Any) -> Dataset:
        """:meth:`Dataset.optimize_indices` (keyword arguments only, as in
        pylance)."""
        return self._ds.optimize_indices(**kwargs)
