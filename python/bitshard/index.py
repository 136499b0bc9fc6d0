"""Segments, merges, manifests and commits: the index on storage.

Layout under an index root (by default ``<dataset>/_bitshard``; a local
directory or an object-store prefix such as ``s3://bucket/prefix``)::

    segments/<uuid>.bsseg                 immutable segment files
    indices/<name>/v<NNNNNNNN>.json       manifest versions of index <name>
    artifacts/<ivf fingerprint>.ivf       centroids shared by segments written
                                          with external centroids

A segment is written before anything refers to it; a commit creates the next
manifest version with an exclusive create (locally ``os.link`` of a finished
temp file; on S3 a conditional PUT, ``If-None-Match: *``; see
:mod:`bitshard.storage`), so a version appears whole or not at all, and of
two writers racing for one version exactly one wins; the other gets
CommitConflictError.

Every function taking ``root`` accepts the root as a string (a path or URI)
or a :class:`~bitshard.storage.Storage`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import time
import uuid as uuid_mod
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native
from .artifacts import (
    METRIC_NAMES,
    METRICS,
    ROTATION_NAMES,
    IvfModel,
    Rotation,
)
from .codespace import CodeSpace
from .errors import (
    ArtifactMismatchError,
    BitshardError,
    CommitConflictError,
    CorruptIndexError,
    IndexNotFoundError,
    InvalidInputError,
)
from . import identity, names, schema
from .identity import FragmentIdentity
from .names import BUILDS_DIR, INDICES_DIR, SEGMENT_SUFFIX, SEGMENTS_DIR
from .storage import LocalStorage, Storage, is_object_uri, join_uri
from .ranged import RangedSegment

MANIFEST_FORMAT = "bitshard-manifest"
#: The manifest format written. Format 2 adds, per segment entry, the
#: identity of each fragment at the version it was read (``fragments``) and
#: that version (``source_version``); format 1 is still read.
MANIFEST_VERSION = 2

log = logging.getLogger("bitshard.index")

#: An index root: a path or URI string, or a Storage.
Root = Union[str, Storage]


def storage_of(root: Root) -> Storage:
    """The :class:`~bitshard.storage.Storage` of an index root."""
    return root if isinstance(root, Storage) else Storage.for_uri(root)


def _root_str(root: Root) -> str:
    return root.root if isinstance(root, Storage) else os.fspath(root)


@dataclass(frozen=True)
class SegmentHandle:
    """A written segment, committed or not. Picklable; cheap to send around.

    Attributes:
        uuid: 32 hex digits; the file is ``segments/<uuid>.bsseg``.
        index_root: the directory holding ``segments/``.
        name: the index name it was built for.
        column: the vector column.
        fragment_ids: the source fragments it covers, in table order.
        num_rows: rows encoded.
        num_bits, metric, dimension: the quantizer settings.
        rotation_fingerprint, ivf_fingerprint: 32 hex digits each.
        size_bytes: the file's size.
        identities: the :class:`~bitshard.identity.FragmentIdentity` of each
            fragment at the version the worker read, in ``fragment_ids``
            order; empty when unknown (a handle made from the file alone, or
            from a format 1 manifest).
        source_version: the source version the fragments were read at
            (None when unknown).
    """

    uuid: str
    index_root: str
    name: str
    column: str
    fragment_ids: tuple
    num_rows: int
    num_bits: int
    metric: str
    dimension: int
    rotation_fingerprint: str
    ivf_fingerprint: str
    size_bytes: int = 0
    identities: Tuple[FragmentIdentity, ...] = ()
    source_version: Any = None

    @property
    def path(self) -> str:
        """Absolute path (or URI) of the segment file."""
        return segment_path(self.index_root, self.uuid)

    def to_json(self) -> Dict[str, Any]:
        """The manifest entry of this segment (``fragments`` only when the
        identities are known; ``source_version`` only when known)."""
        out = {
            "uuid": self.uuid,
            "file": f"segments/{self.uuid}{SEGMENT_SUFFIX}",
            "fragment_ids": list(self.fragment_ids),
            "num_rows": self.num_rows,
            "num_bits": self.num_bits,
            "metric": self.metric,
            "dimension": self.dimension,
            "rotation_fingerprint": self.rotation_fingerprint,
            "ivf_fingerprint": self.ivf_fingerprint,
            "size_bytes": self.size_bytes,
        }
        if self.identities:
            out["fragments"] = [i.to_json() for i in self.identities]
        if self.source_version is not None:
            out["source_version"] = self.source_version
        return out

    def with_identities(self, source: Any) -> "SegmentHandle":
        """This handle with the identities of its fragments in ``source``
        (at the version ``source`` is pinned to) and that version."""
        return dataclasses.replace(
            self, identities=identity.identities(source, self.fragment_ids, self.column),
            source_version=source.version)


def segment_key(uuid: str) -> str:
    """The key of segment ``uuid`` relative to an index root
    (CorruptIndexError if ``uuid`` is not 32 lowercase hex digits)."""
    return names.segment_key(uuid)


def segment_path(root: Root, uuid: str) -> str:
    """Where segment ``uuid`` lives under ``root`` (a path, or a URI)."""
    if isinstance(root, Storage):
        return root.path(segment_key(uuid))
    if is_object_uri(root):
        return join_uri(root, segment_key(uuid))
    return names.local_path(root, segment_key(uuid))


def new_uuid(index_uuid: Optional[str] = None) -> str:
    """A fresh segment uuid (32 hex digits), or a caller's, validated."""
    if index_uuid is None:
        return uuid_mod.uuid4().hex
    try:
        u = uuid_mod.UUID(str(index_uuid)).hex
    except ValueError:
        raise InvalidInputError(f"index_uuid is not a UUID: {index_uuid!r}") from None
    return names.check_uuid(u, "index_uuid", InvalidInputError)


def _file_storage(path: str) -> Tuple[Storage, str]:
    """The storage of a file's directory, and the file's key in it. A local
    path a caller names is taken as it resolves (the link rules of
    bitshard.names apply to keys under an index root, not to such a path)."""
    if is_object_uri(path):
        parent, name = path.rstrip("/").rsplit("/", 1)
        return Storage.for_uri(parent), name
    real = os.path.realpath(path)
    return LocalStorage(os.path.dirname(real)), os.path.basename(real)


#: Shared centroids already read, by (index root, IVF fingerprint): the
#: segments of one index opened in one process share one array (and one
#: read of ``artifacts/<fp>.ivf``). A few entries: an array is k x d floats.
_SHARED_CENTROIDS: Dict[Tuple[str, str], np.ndarray] = {}
_SHARED_CENTROIDS_MAX = 8
_FLAGS_OFFSET, _IVF_FP_OFFSET = 20, 112  # header fields (docs/format.md)


def external_centroids_fingerprint(data: Any) -> Optional[str]:
    """The IVF fingerprint (32 hex digits) a segment's bytes name when their
    header's flags bit 0 (external centroids) is set, else None. Reads two
    header fields only; the C reader validates the header afterwards (a
    corrupt header is refused there whatever this returned)."""
    mv = memoryview(data).cast("B")
    if len(mv) < _IVF_FP_OFFSET + 16:
        return None
    if not int.from_bytes(mv[_FLAGS_OFFSET:_FLAGS_OFFSET + 4], "little") & 1:
        return None
    return bytes(mv[_IVF_FP_OFFSET:_IVF_FP_OFFSET + 16]).hex()


def _segments_root(storage: Storage, key: str) -> Tuple[Storage, str]:
    """The index root holding segment ``key`` of ``storage``: ``storage``
    itself for a ``segments/...`` key, else (a file opened by its path) the
    parent of the ``segments`` directory holding it."""
    if key.startswith(SEGMENTS_DIR + "/"):
        return storage, key
    root = storage.root.rstrip("/")
    parent, _, last = root.rpartition("/")
    if last == SEGMENTS_DIR and parent:
        return Storage.for_uri(parent), f"{SEGMENTS_DIR}/{key}"
    return storage, key


def shared_centroids(storage: Storage, fingerprint: str) -> np.ndarray:
    """The centroids ``artifacts/<fingerprint>.ivf`` of index root
    ``storage`` holds, as a read-only float32 (k, d) array (cached per root
    and fingerprint). MissingFileError naming the file when it is absent;
    CorruptIndexError when its bytes are bad or hold another model."""
    cache_key = (storage.root, fingerprint)
    got = _SHARED_CENTROIDS.get(cache_key)
    if got is not None:
        return got
    key = names.ivf_artifact_key(fingerprint)
    try:
        model = IvfModel.from_bytes(storage.read_bytes(key))
    except CorruptIndexError as e:
        raise type(e)(f"shared centroids {storage.path(key)}: {e}") from None
    if model.fingerprint != fingerprint:
        raise CorruptIndexError(
            f"shared centroids {storage.path(key)} hold IVF model {model.fingerprint}, "
            f"not {fingerprint}")
    if len(_SHARED_CENTROIDS) >= _SHARED_CENTROIDS_MAX:
        _SHARED_CENTROIDS.pop(next(iter(_SHARED_CENTROIDS)))
    _SHARED_CENTROIDS[cache_key] = model.centroids
    return model.centroids


def store_shared_centroids(root: Root, ivf: IvfModel) -> str:
    """Write ``ivf`` to ``artifacts/<fingerprint>.ivf`` under ``root`` unless
    it is there already (the name is the content's fingerprint, so an
    existing file is the same model; a concurrent writer writes the same
    bytes). Returns the key. Called before any segment naming it is written."""
    st = storage_of(root)
    key = names.ivf_artifact_key(ivf.fingerprint)
    if not st.exists(key):
        st.write_bytes(key, ivf.to_bytes())
    return key


def _centroids_for(buf: Any, storage: Storage, key: str, given: Any,
                   open_alone: Any) -> Any:
    """The centroids to open segment bytes ``buf`` (a whole file or its
    prefix) with: ``given`` when not None; else, for a file with external
    centroids, its index root's shared ones; else None. When those cannot
    be read, ``open_alone()`` (the open without them) runs first, so that a
    header the reader refuses is reported as such (CorruptIndexError), not
    as a missing or bad artifacts file."""
    if given is not None:
        return given
    fp = external_centroids_fingerprint(buf)
    if fp is None:
        return None
    root_st, _ = _segments_root(storage, key)
    try:
        return shared_centroids(root_st, fp)
    except CorruptIndexError as missing:
        try:
            open_alone()
        except InvalidInputError:
            raise missing from None
        raise


#: A fragment table identity that records nothing (docs/format.md).
ZERO_IDENTITY = bytes(16)


def check_identity_fingerprints(h: SegmentHandle, o: "OpenSegment", what: str) -> None:
    """CorruptIndexError unless every identity fingerprint the file ``o``
    records equals the one of the same fragment in ``h.identities`` (the
    manifest's record). Zero entries (not recorded) and a handle without
    identities are not compared. ``what`` names the handle in the message."""
    if len(h.identities) != len(o.fragments):
        return
    for ident, fp in zip(h.identities, o.fragment_fingerprints):
        if fp is not None and fp != ident.fingerprint:
            raise CorruptIndexError(
                f"segment file {o.path} is not the segment {what} describes: fragment "
                f"{ident.id}'s identity fingerprint is {ident.fingerprint} there, {fp} in the file")


def _read_at_random(buf: Any) -> None:
    """``MADV_RANDOM`` on a mapping opened for search only: a search reads
    the header, then a partition at a time, so the kernel's read-around of
    each fault (up to the device's read-ahead, 8 MiB here) read megabytes
    for a few pages. Before the first read of the mapping. A downloaded
    copy (not an ``mmap``) is left alone."""
    if isinstance(buf, mmap.mmap) and hasattr(mmap, "MADV_RANDOM"):
        buf.madvise(mmap.MADV_RANDOM)


def _declare_mapped(buf: Any, native: Any) -> None:
    """Declare a file mapping to the C reader (``set_mapped``), so that a
    verify or a merge drops the pages it has read through and holds a
    window of the file, not all of it (docs/distributed.md, "Memory"). A
    downloaded copy (not an ``mmap``) is memory of its own: never declared."""
    if isinstance(buf, mmap.mmap):
        native.set_mapped()


class OpenSegment:
    """A segment file mapped (local) or downloaded (object store) into a
    64-byte aligned buffer and validated by the C reader.

    ``OpenSegment(path)`` opens a local path or an object-store URI;
    ``OpenSegment(path, storage=st, key=k)`` opens key ``k`` of ``st``.
    With ``ranged=True`` on a storage that reads by range (an object store
    without a ``cache_dir``), only the segment's prefix is read
    (:class:`bitshard.ranged.RangedSegment`, kept in :attr:`ranged`): its
    partitions are attached when a search probes them, so such a segment
    serves search only (not verify, merge or remap). A file written with
    external centroids (docs/format.md) takes them from ``centroids`` (a
    float32 (k, d) array or an IvfModel) when given, else from
    ``artifacts/<its IVF fingerprint>.ivf`` of its index root (the parent of
    its ``segments/`` directory).
    """

    def __init__(self, path: str, *, storage: Optional[Storage] = None,
                 key: Optional[str] = None, ranged: bool = False,
                 centroids: Any = None) -> None:
        path = os.fspath(path)
        if storage is None or key is None:
            storage, key = _file_storage(path)
        self.path = path
        if isinstance(centroids, IvfModel):
            centroids = centroids.centroids
        self.ranged: Optional[RangedSegment] = None
        if ranged and storage.ranged_reads:
            st_, key_, given = storage, key, centroids
            self.ranged = RangedSegment(
                storage, key, path,
                centroids_for=lambda buf, size: _centroids_for(
                    buf, st_, key_, given,
                    lambda: _native.Segment(buf, size)))
            self._map = None
            self.size = self.ranged.size
            self.native = self.ranged.native
            self._read_table()
            return
        for attempt in (0, 1):
            self._map = storage.open_segment(key)
            if ranged:
                _read_at_random(self._map)
            self.size = len(self._map)
            try:
                buf = self._map
                cents = _centroids_for(buf, storage, key, centroids,
                                       lambda: _native.Segment(buf))
                self.native = _native.Segment(self._map, centroids=cents)
                _declare_mapped(self._map, self.native)
                # The open reads no partition (format 3); a local cache
                # file is verified whole, so that a damaged copy is
                # replaced here rather than refused by a later search.
                if storage.is_cached_copy(key):
                    self.native.verify()
                break
            except CorruptIndexError as e:
                # A bad locally cached copy is dropped and fetched once more.
                if attempt == 0 and storage.evict(key):
                    continue
                raise type(e)(f"{path}: {e}") from None
        self._read_table()

    def _read_table(self) -> None:
        """The header's info and the fragment table (the open read both,
        ranged or not)."""
        self.info = self.native.info()
        self.fragments = [fid for fid, _ in self.native.fragments()]
        #: Each fragment's identity fingerprint recorded in the file, 32 hex
        #: digits, or None (all zero: not recorded, e.g. a format 2 file).
        self.fragment_fingerprints: List[Optional[str]] = [
            None if fp == ZERO_IDENTITY else bytes(fp).hex()
            for fp in self.native.fragment_identities()]

    @classmethod
    def of(cls, root: Root, uuid: str, ranged: bool = False) -> "OpenSegment":
        """Segment ``uuid`` under index root ``root`` (``ranged``: see the
        class)."""
        st = storage_of(root)
        key = segment_key(uuid)
        return cls(st.path(key), storage=st, key=key, ranged=ranged)

    def handle(self, root: str, name: str) -> SegmentHandle:
        """The handle describing this file."""
        info = self.info
        return SegmentHandle(
            uuid=bytes(info["uuid"]).hex(),
            index_root=root,
            name=name,
            column=info["column"],
            fragment_ids=tuple(int(f) for f in self.fragments),
            num_rows=int(info["num_rows"]),
            num_bits=int(info["num_bits"]),
            metric=METRIC_NAMES[info["metric"]],
            dimension=int(info["dim"]),
            rotation_fingerprint=bytes(info["rotation_fingerprint"]).hex(),
            ivf_fingerprint=bytes(info["ivf_fingerprint"]).hex(),
            size_bytes=self.size,
        )

    def rotation(self) -> Rotation:
        """The rotation recorded in the segment."""
        i = self.info
        return Rotation(i["dim"], i["num_bits"], "float32", ROTATION_NAMES[i["rotation_kind"]],
                        i["rotation_seed"])

    def ivf_model(self) -> IvfModel:
        """The IVF model recorded in the segment."""
        i = self.info
        out = np.empty((i["num_partitions"], i["dim"]), dtype=np.float32)
        self.native.centroids(out)
        return IvfModel(out, METRIC_NAMES[i["metric"]])


def open_handle(h: SegmentHandle, root: Optional[Root] = None,
                claimed_by: str = "its handle", ranged: bool = False) -> OpenSegment:
    """Open a handle's file, through ``root``'s storage when it is the
    handle's index root (so that storage's options are used), and check
    that the file is the segment the handle describes: its own uuid,
    fragment list and row count (see :func:`check_file_identity`).
    ``claimed_by`` names the source of the handle in the message;
    ``ranged``: open for search only, reading partitions by range where the
    storage can (see :class:`OpenSegment`)."""
    o = None
    if root is not None:
        st = storage_of(root)
        if st.root == h.index_root:
            o = OpenSegment.of(st, h.uuid, ranged=ranged)
    if o is None:
        o = OpenSegment(h.path, ranged=ranged)
    check_file_identity(h, o, claimed_by)
    return o


def check_file_identity(h: SegmentHandle, o: OpenSegment, claimed_by: str) -> None:
    """CorruptIndexError naming the file, the field and both values unless
    the opened file ``o`` has the uuid, fragments and row count of ``h``. A
    valid segment copied over another (same artifacts, so every checksum
    and fingerprint passes) would otherwise return its rows twice and hide
    the real ones."""
    file_uuid = bytes(o.info["uuid"]).hex()
    file_frags = [int(f) for f in o.fragments]
    file_rows = int(o.info["num_rows"])
    for field, claim, actual in (("uuid", h.uuid, file_uuid),
                                 ("fragment_ids", [int(f) for f in h.fragment_ids], file_frags),
                                 ("num_rows", int(h.num_rows), file_rows)):
        if claim != actual:
            raise CorruptIndexError(
                f"segment file {o.path} is not the segment {claimed_by} describes: "
                f"{field} is {claim!r} there, {actual!r} in the file")
    if h.identities:
        ids = [i.id for i in h.identities]
        if ids != file_frags:
            raise CorruptIndexError(
                f"segment file {o.path} is not the segment {claimed_by} describes: "
                f"its fragment identities are of fragments {ids}, the file has {file_frags}")
        check_identity_fingerprints(h, o, claimed_by)


# ------------------------------------------------------------------ building


def _write_native(root: Root, uuid: str, name: str, write: Any,
                  centroids: Any = None) -> SegmentHandle:
    """Run ``write(path)`` (a C writer) for segment ``uuid`` and put the file
    in place: local roots are written in place; object stores get a local temp
    file, verified, uploaded whole, then removed. ``centroids``: the index's,
    to open a file written with external centroids (the temp file of an
    object-store root is not under the root)."""
    st = storage_of(root)
    key = segment_key(uuid)
    # The target's temp file (or upload directory) is held as a live
    # writer's until the block ends: cleanup leaves it (Storage.segment_target).
    with st.segment_target(key) as (target, upload):
        write(target)
        opened = OpenSegment(target, centroids=centroids)
        opened.native.verify()  # the open alone reads no partition (format 3)
        handle = opened.handle(st.root, name)
        del opened
        if upload:
            st.write_file(target, key)
    return handle


def write_segment(
    source: Any,
    column: str,
    name: str,
    root: Root,
    ivf: IvfModel,
    rotation: Rotation,
    fragment_ids: Sequence[int],
    uuid: str,
    batch_size: int = 65536,
    progress: Any = None,
    num_threads: int = 1,
    external_centroids: bool = False,
) -> SegmentHandle:
    """Encode the given fragments of ``source`` into one segment file.

    Streams the fragments batch by batch: memory is bounded by a batch plus
    the encoded segment, never by the raw vectors. ``num_threads`` threads
    encode each batch; the file is the same, byte for byte, for any count.
    ``external_centroids``: leave the centroids out of the file; they are
    stored once under the root (``artifacts/<ivf fingerprint>.ivf``) first.
    """
    frags = {f.id: f for f in source.fragments()}
    missing = [f for f in fragment_ids if f not in frags]
    if missing:
        raise InvalidInputError(f"fragment {missing[0]} is not in the source")
    if len(set(fragment_ids)) != len(fragment_ids):
        raise InvalidInputError("fragment_ids holds duplicates")
    ids = np.array(list(fragment_ids), dtype=np.uint64)
    rows = np.array([frags[f].physical_rows for f in fragment_ids], dtype=np.uint64)
    # What the fragments are at the version read: recorded in the segment's
    # fragment table (the fingerprint) and in the manifest (the record), so
    # a reader can tell when they change (bitshard.identity).
    idents = identity.identities(source, fragment_ids, column)
    dim = ivf.dimension
    builder = _native.Builder(
        dim,
        rotation.num_bits,
        METRICS[ivf.metric],
        0 if rotation.rotation_type == "fast" else 1,
        rotation.seed,
        ivf.centroids,
        ivf.num_partitions,
        column,
        bytes.fromhex(uuid),
        ids,
        rows,
    )
    builder.set_threads(max(1, min(int(num_threads), 256)))
    for ident in idents:
        builder.set_fragment_identity(ident.id, bytes.fromhex(ident.fingerprint))
    position = {int(f): i for i, f in enumerate(fragment_ids)}
    for batch in source.iter_batches(column, fragment_ids=list(fragment_ids), batch_size=batch_size):
        vec = batch.vectors
        if vec.shape[1] != dim:
            raise InvalidInputError(
                f"column {column!r} fragment {batch.fragment_id}: vectors have dimension "
                f"{vec.shape[1]}, the index has {dim}"
            )
        builder.add(vec, vec.shape[0], dim, position[int(batch.fragment_id)],
                    np.ascontiguousarray(batch.offsets, dtype=np.uint32))
        if progress is not None:
            progress.update(vec.shape[0])
    if external_centroids:
        store_shared_centroids(root, ivf)
        handle = _write_native(
            root, uuid, name, lambda p: builder.write(p, _native.WRITE_EXTERNAL_CENTROIDS),
            ivf.centroids)
    else:
        handle = _write_native(root, uuid, name, builder.write)
    return dataclasses.replace(handle, identities=idents, source_version=source.version)


#: The segment format version this library writes (docs/format.md).
SEGMENT_FORMAT_VERSION = 3


class FormatUpgradeWarning(UserWarning):
    """An index holds segments of an older format (version 2): each is read
    and checked whole when opened, and converted in memory. ``bitshard
    upgrade`` (:func:`bitshard.upgrade_index`) rewrites them without
    re-encoding."""


def needs_upgrade(o: "OpenSegment") -> bool:
    """True when the opened segment's file is of an older format than
    :data:`SEGMENT_FORMAT_VERSION`."""
    return int(o.info["format_version"]) < SEGMENT_FORMAT_VERSION


def upgrade_segments(handles: Sequence[SegmentHandle], root: Root) -> List[SegmentHandle]:
    """``handles`` with every segment of an older format rewritten as a new
    segment of the current format (a one-input merge: the rows' codes and
    factors are copied, nothing is re-encoded, and the file equals a build
    of the same rows). Segments already current are returned as they are."""
    out = []
    for h in handles:
        o = open_handle(h, root)
        if needs_upgrade(o):
            uuid = new_uuid(None)
            native = o.native
            new = _write_native(root, uuid, h.name,
                                lambda path: _native.merge([native], bytes.fromhex(uuid), path))
            # The same rows: the fragments' recorded identities carry over.
            rows = {int(f): int(r) for f, r in native.fragments()}
            out.append(dataclasses.replace(new, **merged_identities([h], new.fragment_ids,
                                                                    rows)))
        else:
            out.append(h)
        del o
    return out


def write_flags(natives: Sequence[Any], root: Root,
                external_centroids: Optional[bool] = None) -> Tuple[int, Any]:
    """The C write flags and the centroids to open the result with, for a
    merge or remap of ``natives`` (opened ``_native.Segment``) into ``root``.
    ``external_centroids`` None keeps the inputs' choice (external when any
    input's are); True stores the centroids under the root first."""
    info = natives[0].info()
    ext = any(bool(n.info()["external_centroids"]) for n in natives) \
        if external_centroids is None else bool(external_centroids)
    if not ext:
        return 0, None
    cents = np.empty((info["num_partitions"], info["dim"]), dtype=np.float32)
    natives[0].centroids(cents)
    store_shared_centroids(root, IvfModel(cents, METRIC_NAMES[info["metric"]]))
    return _native.WRITE_EXTERNAL_CENTROIDS, cents


def merge_segments(handles: Sequence[SegmentHandle], root: Root,
                   uuid: Optional[str] = None,
                   external_centroids: Optional[bool] = None) -> SegmentHandle:
    """Merge segments (same artifacts, disjoint fragments) into a new one.

    ``external_centroids``: write the result without its centroids (True),
    with them (False), or external when any input's are (None).
    Raises ArtifactMismatchError naming the artifact that differs.
    """
    if not handles:
        raise InvalidInputError("merge needs at least one segment")
    opened = [open_handle(h, root) for h in handles]
    uuid = new_uuid(uuid)
    natives = [o.native for o in opened]
    rows = {int(f): int(r) for o in opened for f, r in o.native.fragments()}
    flags, cents = write_flags(natives, root, external_centroids)
    # Flags only when set: a self-contained merge is the call it always was.
    extra = (flags,) if flags else ()
    merged = _write_native(root, uuid, handles[0].name,
                           lambda path: _native.merge(natives, bytes.fromhex(uuid), path, *extra),
                           cents)
    return dataclasses.replace(merged, **merged_identities(handles, merged.fragment_ids, rows))


def merged_identities(handles: Sequence[SegmentHandle], fragment_ids: Sequence[int],
                      rows: Dict[int, int]) -> Dict[str, Any]:
    """The ``identities`` and ``source_version`` of a segment made of
    ``handles`` covering ``fragment_ids`` (``rows``: each fragment's
    physical rows, from the files): the inputs' identities in that order.
    When no input has identities the result has none either (a format 1
    segment stays one), nor when an input without them has no source
    version (a handle made from its file: the commit fills them in); when
    only some have, the fragments of the others (format 1 entries, which
    know their source version) get an ``unrecorded`` record naming it, so
    they are still compared where that segment would have been. The source
    version is the inputs' when they agree, else None."""
    versions = {repr(h.source_version) for h in handles}
    version = handles[0].source_version if len(versions) == 1 else None
    bare = [h for h in handles if len(h.identities) != len(h.fragment_ids)]
    if len(bare) == len(handles) or any(h.source_version is None for h in bare):
        # No identities, or an input known only from its file (a resumed
        # build's): none; the commit takes them from its pinned source.
        return {"identities": (), "source_version": version}
    known: Dict[int, FragmentIdentity] = {}
    for h in handles:
        if len(h.identities) == len(h.fragment_ids):
            known.update((i.id, i) for i in h.identities)
        else:
            rec = {"kind": "unrecorded", "source_version": h.source_version}
            known.update((int(f), FragmentIdentity.of(f, rows[int(f)], rec))
                         for f in h.fragment_ids)
    return {"identities": tuple(known[int(f)] for f in fragment_ids), "source_version": version}


# ----------------------------------------------------------------- manifests


def _manifest_key(name: str, version: int) -> str:
    return names.manifest_key(name, version)


def _checksum(doc: Dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in doc.items() if k != "checksum"}, sort_keys=True)
    return f"{_native.hash64(body.encode(), 0):016x}"


def index_dir_names(root: Root) -> List[str]:
    """Names of the directories under ``indices/`` (committed or not).

    Only names that are one harmless path component are returned
    (:func:`bitshard.names.is_readable_index_name`; hidden ``.*`` entries are
    skipped); a legacy name that breaks the rule for new indexes gives a
    :class:`~bitshard.names.LegacyNameWarning`.
    """
    st = storage_of(root)
    out = []
    for e in st.list(INDICES_DIR):
        if not e.is_dir or e.name.startswith("."):
            continue
        if not names.is_readable_index_name(e.name):
            log.warning("ignoring directory %r under %s: not an index name", e.name,
                        st.path(INDICES_DIR))
            continue
        names.warn_legacy_name(e.name, st.path(INDICES_DIR))
        out.append(e.name)
    return sorted(out)


def list_index_names(root: Root) -> List[str]:
    """Names of the indexes with at least one committed manifest."""
    st = storage_of(root)
    return [n for n in index_dir_names(st) if latest_version(st, n) > 0]


def manifest_versions(root: Root, name: str) -> List[int]:
    """The manifest versions of index ``name`` present, ascending."""
    out = []
    for e in storage_of(root).list(names.index_dir_key(name)):
        v = None if e.is_dir else names.parse_manifest_file(e.name)
        if v is not None:
            out.append(v)
    return sorted(out)


def latest_version(root: Root, name: str) -> int:
    """The newest committed manifest version of ``name`` (0 if none)."""
    return max(manifest_versions(root, name), default=0)


def read_manifest(root: Root, name: str, version: Optional[int] = None) -> Dict[str, Any]:
    """Load and verify one manifest version (the latest by default)."""
    st = storage_of(root)
    v = latest_version(st, name) if version is None else version
    if v == 0:
        raise IndexNotFoundError(f"no index named {name!r}")
    key = _manifest_key(name, v)
    path = st.path(key)
    # Size, nesting depth, format, version, checksum, then every field's
    # type and range (bitshard.schema), before any field is used here.
    doc = schema.read_document(st.read_bytes(key), path, "manifest", MANIFEST_FORMAT,
                               MANIFEST_VERSION, schema.Manifest, _checksum)
    names.check_index_name(doc["name"], f"manifest {path}: field 'name'", error=CorruptIndexError)
    for i, e in enumerate(doc["segments"]):
        want = names.segment_key(e["uuid"])
        if e.get("file", want) != want:
            raise CorruptIndexError(f"manifest {path}: segments[{i}].file is {e['file']!r}, "
                                    f"the segment's uuid makes it {want!r}")
    _check_manifest_disjoint(doc, path)
    for i, e in enumerate(doc["segments"]):
        _check_identities(doc, i, e, path)
    return doc


def _check_identities(doc: Dict[str, Any], i: int, e: Dict[str, Any], path: str) -> None:
    """A format 2 entry's ``fragments`` each hold the fingerprint of their
    record; format 1 has none. (That they list the file's fragments is
    checked with the file: :func:`check_file_identity`.)"""
    frags = e.get("fragments")
    if frags is None:
        return
    if doc["format_version"] < 2:
        raise CorruptIndexError(f"manifest {path}: segments[{i}].fragments is a format 2 field, "
                                f"the manifest says format {doc['format_version']}")
    for j, f in enumerate(frags):
        fp = identity.fingerprint(f["record"])
        if f["identity"] != fp:
            raise CorruptIndexError(
                f"manifest {path}: segments[{i}].fragments[{j}].identity is {f['identity']}, "
                f"its record's fingerprint is {fp}")


def _check_manifest_disjoint(doc: Dict[str, Any], path: str) -> None:
    """No segment listed twice, no fragment in two entries (a checksum-valid
    manifest breaking this would return rows twice)."""
    seen: Dict[str, int] = {}
    owner: Dict[int, int] = {}
    for i, e in enumerate(doc["segments"]):
        u = e["uuid"]
        if u in seen:
            raise CorruptIndexError(
                f"manifest {path}: segment {u} is listed twice (segments[{seen[u]}] and "
                f"segments[{i}])")
        seen[u] = i
        for f in e["fragment_ids"]:
            if f in owner:
                j = owner[f]
                raise CorruptIndexError(
                    f"manifest {path}: fragment {f} is in two entries: segments[{j}] "
                    f"({doc['segments'][j]['uuid']}) and segments[{i}] ({u})")
            owner[f] = i


def check_same_artifacts(handles: Sequence[SegmentHandle], column: Optional[str] = None) -> None:
    """Refuse segments that do not share one code space (names what differs)."""
    if not handles:
        return
    first = handles[0]
    space = CodeSpace.of(first)
    for i, h in enumerate(handles[1:], 1):
        space.require_same(CodeSpace.of(h),
                           f"segment {i} ({h.uuid}) does not match segment 0 ({first.uuid})")
    if column is not None and first.column != column:
        raise ArtifactMismatchError(
            f"column differs: segments were built on {first.column!r}, commit names {column!r}"
        )
    seen: Dict[int, str] = {}
    for h in handles:
        for f in h.fragment_ids:
            if f in seen:
                raise InvalidInputError(
                    f"fragment {f} is covered by segments {seen[f]} and {h.uuid}"
                )
            seen[f] = h.uuid


def check_commit_name(root: Root, name: Any) -> str:
    """``name`` if a commit may use it: a new index needs the strict pattern
    of :mod:`bitshard.names`; an existing index with a legacy name may get
    new versions. InvalidInputError naming ``name`` and the value otherwise."""
    names.check_index_name(name, "name")
    if latest_version(root, name) == 0:
        names.check_index_name(name, "name", new=True)
    return name


def commit(
    root: Root,
    name: str,
    column: str,
    segments: Sequence[SegmentHandle],
    *,
    mode: str = "append",
    source_version: Any = None,
    expected_version: Optional[int] = None,
    source: Any = None,
    drift: Optional[Dict[str, Any]] = None,
) -> int:
    """Commit segments as index ``name``; returns the new manifest version.

    A handle without fragment identities (one made from its file alone, as
    a resumed build does) gets those of ``source`` when it is given: the
    caller's source must then be pinned to the version the segment was read
    at (a resumed build's is).

    ``drift`` (written by ``optimize_indices``, bitshard.upkeep) is stored
    in the manifest; an append without one keeps the previous version's.

    ``mode="append"`` adds the segments to the latest version (a delta
    commit: their fragments must not overlap what is there); ``"replace"``
    makes them the whole index. The commit is an exclusive create of version
    ``latest + 1`` (or ``expected_version + 1``): if another writer got there
    first, CommitConflictError is raised and nothing changes.
    """
    st = storage_of(root)
    # A new index needs a name of the strict pattern; an existing one with a
    # legacy name may still get new versions.
    check_commit_name(st, name)
    if source is not None:
        segments = [h if len(h.identities) == len(h.fragment_ids) else h.with_identities(source)
                    for h in segments]
    # Under the lock, cleanup cannot remove a segment between the check
    # below and the manifest that names it (see Storage.commit_lock).
    with st.commit_lock(exclusive=False):
        return _commit_locked(st, name, column, segments, mode, source_version,
                              expected_version, drift)


def _commit_locked(st: Storage, name: str, column: str, segments: Sequence[SegmentHandle],
                   mode: str, source_version: Any, expected_version: Optional[int],
                   drift: Optional[Dict[str, Any]] = None) -> int:
    root_s = st.root
    for h in segments:
        names.check_uuid(h.uuid, "segment handle uuid", InvalidInputError)
        if not st.exists(segment_key(h.uuid)):
            where = "" if h.index_root == root_s else f" (it was written under {h.index_root})"
            raise InvalidInputError(
                f"segment {h.uuid} has no file at {segment_path(st, h.uuid)}{where}: it was "
                f"never written there, or cleanup removed it as unreferenced before this "
                f"commit (cleanup's --older-than was shorter than the time from writing the "
                f"segment to committing it); write it again")
        # Re-read the file: a handle is a claim, the file is the truth.
        opened = OpenSegment.of(st, h.uuid)
        actual = opened.handle(root_s, name)
        diff = CodeSpace.of(actual).first_difference(CodeSpace.of(h))
        if diff is not None:
            raise CorruptIndexError(f"segment {h.uuid} does not match its handle: "
                                    f"{diff.describe()} (file vs handle)")
        if actual.fragment_ids != h.fragment_ids:
            raise CorruptIndexError(
                f"segment {h.uuid} does not match its handle: fragment_ids differ: "
                f"{list(actual.fragment_ids)} vs {list(h.fragment_ids)} (file vs handle)")
        # The records the manifest will hold are those the worker recorded.
        check_identity_fingerprints(h, opened, "its handle")
        del opened
    base = latest_version(st, name) if expected_version is None else expected_version
    existing: List[Dict[str, Any]] = []
    prev: Optional[Dict[str, Any]] = None
    if base > 0 and mode == "append":
        prev = read_manifest(st, name, base)
        existing = list(prev["segments"])
    if prev is not None and prev["format_version"] < 2:
        # Format 1 entries have no identities: they keep the version the
        # readers compare them at (bitshard.identity, "legacy" indexes).
        existing = [e if "source_version" in e else dict(e, source_version=prev["source_version"])
                    for e in existing]
    all_handles = [handle_from_json(st, name, prev["column"], e) for e in existing] if prev else []
    all_handles += list(segments)
    check_same_artifacts(all_handles, column)
    if prev is not None and prev["column"] != column:
        raise ArtifactMismatchError(
            f"column differs: index {name!r} is on {prev['column']!r}, commit names {column!r}"
        )
    doc: Dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "name": name,
        "column": column,
        "version": base + 1,
        "created_at": time.time(),
        "source_version": source_version,
        "segments": existing + [h.to_json() for h in segments],
    }
    if all_handles:
        h0 = all_handles[0]
        doc.update(
            metric=h0.metric,
            num_bits=h0.num_bits,
            dimension=h0.dimension,
            rotation_fingerprint=h0.rotation_fingerprint,
            ivf_fingerprint=h0.ivf_fingerprint,
        )
    if drift is None and prev is not None:
        drift = prev.get("drift")
    if drift is not None:
        doc["drift"] = drift
    doc["checksum"] = _checksum(doc)
    data = json.dumps(doc, sort_keys=True, indent=1).encode()
    try:
        # Atomic, and fails if the version exists: os.link locally, a
        # conditional PUT on an object store (bitshard.storage).
        st.create_exclusive(_manifest_key(name, base + 1), data)
    except FileExistsError:
        raise CommitConflictError(
            f"index {name!r} version {base + 1} was committed by another writer; "
            f"reload and retry"
        ) from None
    return base + 1


def handle_from_json(root: Root, name: str, column: str, e: Dict[str, Any],
                     default_source_version: Any = None) -> SegmentHandle:
    """The handle of a manifest entry. ``default_source_version`` is the
    source version of an entry that records none (a format 1 manifest's
    entries: pass the manifest's ``source_version``)."""
    return SegmentHandle(
        uuid=e["uuid"],
        index_root=_root_str(root),
        name=name,
        column=column,
        fragment_ids=tuple(e["fragment_ids"]),
        num_rows=e["num_rows"],
        num_bits=e["num_bits"],
        metric=e["metric"],
        dimension=e["dimension"],
        rotation_fingerprint=e["rotation_fingerprint"],
        ivf_fingerprint=e["ivf_fingerprint"],
        size_bytes=e.get("size_bytes", 0),
        identities=tuple(FragmentIdentity.from_json(f) for f in e.get("fragments") or ()),
        source_version=e.get("source_version", default_source_version),
    )


def committed_segments(root: Root, name: str, version: Optional[int] = None) -> List[SegmentHandle]:
    """The segments of a committed index version."""
    st = storage_of(root)
    doc = read_manifest(st, name, version)
    return [handle_from_json(st, name, doc["column"], e, doc.get("source_version"))
            for e in doc["segments"]]


def uncommitted_segments(root: Root) -> List[str]:
    """UUIDs of segment files that no manifest version of any index names."""
    st = storage_of(root)
    files = st.list(SEGMENTS_DIR)
    if not files:
        return []
    named: set = set()
    for name in list_index_names(st):
        for v in range(1, latest_version(st, name) + 1):
            try:
                named.update(e["uuid"] for e in read_manifest(st, name, v)["segments"])
            except (BitshardError, OSError):
                continue
    out = []
    for e in files:
        parsed = None if (e.is_dir or e.is_link) else names.parse_segment_file(e.name)
        if parsed is not None and not parsed[1] and parsed[0] not in named:
            out.append(parsed[0])
    return sorted(out)


def iter_fragments(handles: Iterable[SegmentHandle]) -> List[int]:
    """Every fragment covered by the given segments, sorted."""
    out: set = set()
    for h in handles:
        out.update(h.fragment_ids)
    return sorted(out)
