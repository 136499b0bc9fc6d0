"""Segments, merges, manifests and commits: the index on storage.

Layout under an index root (by default ``<dataset>/_bitshard``)::

    segments/<uuid>.bsseg                 immutable segment files
    indices/<name>/v<NNNNNNNN>.json       manifest versions of index <name>

A segment is written before anything refers to it; a commit creates the next
manifest version with an exclusive create (``os.link`` of a finished temp
file), so a version appears whole or not at all, and of two writers racing
for one version exactly one wins; the other gets CommitConflictError.
"""

from __future__ import annotations

import json
import mmap
import os
import time
import uuid as uuid_mod
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

from . import _native
from .artifacts import (
    METRIC_NAMES,
    METRICS,
    ROTATION_NAMES,
    IvfModel,
    Rotation,
)
from .errors import (
    ArtifactMismatchError,
    BitshardError,
    CommitConflictError,
    CorruptIndexError,
    IndexNotFoundError,
    InvalidInputError,
)

MANIFEST_FORMAT = "bitshard-manifest"
MANIFEST_VERSION = 1
SEGMENT_SUFFIX = ".bsseg"


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

    @property
    def path(self) -> str:
        """Absolute path of the segment file."""
        return segment_path(self.index_root, self.uuid)

    def to_json(self) -> Dict[str, Any]:
        """The manifest entry of this segment."""
        return {
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


def segment_path(root: str, uuid: str) -> str:
    """Where segment ``uuid`` lives under ``root``."""
    return os.path.join(root, "segments", f"{uuid}{SEGMENT_SUFFIX}")


def new_uuid(index_uuid: Optional[str] = None) -> str:
    """A fresh segment uuid (32 hex digits), or a caller's, validated."""
    if index_uuid is None:
        return uuid_mod.uuid4().hex
    try:
        return uuid_mod.UUID(str(index_uuid)).hex
    except ValueError:
        raise InvalidInputError(f"index_uuid is not a UUID: {index_uuid!r}") from None


class OpenSegment:
    """A segment file mapped into memory and validated by the C reader."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise CorruptIndexError(f"segment file is missing: {path}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CorruptIndexError(f"segment file is empty: {path}")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.native = _native.Segment(self._map)
        except CorruptIndexError as e:
            raise type(e)(f"{path}: {e}") from None
        self.info = self.native.info()
        self.fragments = [fid for fid, _ in self.native.fragments()]

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
            size_bytes=os.path.getsize(self.path),
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


# ------------------------------------------------------------------ building


def write_segment(
    source: Any,
    column: str,
    name: str,
    root: str,
    ivf: IvfModel,
    rotation: Rotation,
    fragment_ids: Sequence[int],
    uuid: str,
    batch_size: int = 65536,
    progress: Any = None,
) -> SegmentHandle:
    """Encode the given fragments of ``source`` into one segment file.

    Streams the fragments batch by batch: memory is bounded by a batch plus
    the encoded segment, never by the raw vectors.
    """
    frags = {f.id: f for f in source.fragments()}
    missing = [f for f in fragment_ids if f not in frags]
    if missing:
        raise InvalidInputError(f"fragment {missing[0]} is not in the source")
    if len(set(fragment_ids)) != len(fragment_ids):
        raise InvalidInputError("fragment_ids holds duplicates")
    ids = np.array(list(fragment_ids), dtype=np.uint64)
    rows = np.array([frags[f].physical_rows for f in fragment_ids], dtype=np.uint64)
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
    path = segment_path(root, uuid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    builder.write(path)
    return OpenSegment(path).handle(root, name)


def merge_segments(handles: Sequence[SegmentHandle], root: str, uuid: Optional[str] = None) -> SegmentHandle:
    """Merge segments (same artifacts, disjoint fragments) into a new one.

    Raises ArtifactMismatchError naming the artifact that differs.
    """
    if not handles:
        raise InvalidInputError("merge needs at least one segment")
    opened = [OpenSegment(h.path) for h in handles]
    uuid = new_uuid(uuid)
    path = segment_path(root, uuid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _native.merge([o.native for o in opened], bytes.fromhex(uuid), path)
    return OpenSegment(path).handle(root, handles[0].name)


# ----------------------------------------------------------------- manifests


def _index_dir(root: str, name: str) -> str:
    return os.path.join(root, "indices", name)


def _manifest_path(root: str, name: str, version: int) -> str:
    return os.path.join(_index_dir(root, name), f"v{version:08d}.json")


def _checksum(doc: Dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in doc.items() if k != "checksum"}, sort_keys=True)
    return f"{_native.hash64(body.encode(), 0):016x}"


def list_index_names(root: str) -> List[str]:
    """Names of the indexes with at least one committed manifest."""
    d = os.path.join(root, "indices")
    if not os.path.isdir(d):
        return []
    return sorted(n for n in os.listdir(d) if latest_version(root, n) > 0)


def latest_version(root: str, name: str) -> int:
    """The newest committed manifest version of ``name`` (0 if none)."""
    d = _index_dir(root, name)
    if not os.path.isdir(d):
        return 0
    best = 0
    for fn in os.listdir(d):
        if fn.startswith("v") and fn.endswith(".json") and fn[1:-5].isdigit():
            best = max(best, int(fn[1:-5]))
    return best


def read_manifest(root: str, name: str, version: Optional[int] = None) -> Dict[str, Any]:
    """Load and verify one manifest version (the latest by default)."""
    v = latest_version(root, name) if version is None else version
    if v == 0:
        raise IndexNotFoundError(f"no index named {name!r}")
    path = _manifest_path(root, name, v)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptIndexError(f"manifest {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise CorruptIndexError(f"manifest {path} is not a bitshard manifest")
    if doc.get("format_version", 0) > MANIFEST_VERSION:
        from .errors import UnsupportedVersionError

        raise UnsupportedVersionError(
            f"manifest {path} has format version {doc.get('format_version')}, "
            f"this bitshard reads up to {MANIFEST_VERSION}"
        )
    if doc.get("checksum") != _checksum(doc):
        raise CorruptIndexError(f"manifest {path} fails its checksum")
    return doc


def check_same_artifacts(handles: Sequence[SegmentHandle], column: Optional[str] = None) -> None:
    """Refuse segments that do not share one code space (names what differs)."""
    if not handles:
        return
    first = handles[0]
    for i, h in enumerate(handles[1:], 1):
        for attr, label in (
            ("dimension", "dimension"),
            ("column", "column"),
            ("metric", "metric"),
            ("num_bits", "num_bits"),
            ("rotation_fingerprint", "rotation"),
            ("ivf_fingerprint", "centroids"),
        ):
            a, b = getattr(first, attr), getattr(h, attr)
            if a != b:
                raise ArtifactMismatchError(
                    f"segment {i} ({h.uuid}) does not match segment 0 ({first.uuid}): "
                    f"{label} differs: {a!r} vs {b!r}"
                )
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


def commit(
    root: str,
    name: str,
    column: str,
    segments: Sequence[SegmentHandle],
    *,
    mode: str = "append",
    source_version: Any = None,
    expected_version: Optional[int] = None,
) -> int:
    """Commit segments as index ``name``; returns the new manifest version.

    ``mode="append"`` adds the segments to the latest version (a delta
    commit: their fragments must not overlap what is there); ``"replace"``
    makes them the whole index. The commit is an exclusive create of version
    ``latest + 1`` (or ``expected_version + 1``): if another writer got there
    first, CommitConflictError is raised and nothing changes.
    """
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise InvalidInputError(f"bad index name {name!r}")
    for h in segments:
        if not os.path.exists(h.path):
            raise InvalidInputError(f"segment {h.uuid} has no file at {h.path}")
        # Re-read the file: a handle is a claim, the file is the truth.
        actual = OpenSegment(h.path).handle(root, name)
        if (actual.rotation_fingerprint, actual.ivf_fingerprint, actual.num_bits,
                actual.fragment_ids) != (h.rotation_fingerprint, h.ivf_fingerprint,
                                          h.num_bits, h.fragment_ids):
            raise CorruptIndexError(f"segment {h.uuid} does not match its handle")
    base = latest_version(root, name) if expected_version is None else expected_version
    existing: List[Dict[str, Any]] = []
    prev: Optional[Dict[str, Any]] = None
    if base > 0 and mode == "append":
        prev = read_manifest(root, name, base)
        existing = list(prev["segments"])
    all_handles = [handle_from_json(root, name, prev["column"], e) for e in existing] if prev else []
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
    doc["checksum"] = _checksum(doc)
    d = _index_dir(root, name)
    os.makedirs(d, exist_ok=True)
    final = _manifest_path(root, name, base + 1)
    tmp = f"{final}.{uuid_mod.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, sort_keys=True, indent=1)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, final)  # atomic, and fails if the version exists
    except FileExistsError:
        raise CommitConflictError(
            f"index {name!r} version {base + 1} was committed by another writer; "
            f"reload and retry"
        ) from None
    finally:
        os.unlink(tmp)
    return base + 1


def handle_from_json(root: str, name: str, column: str, e: Dict[str, Any]) -> SegmentHandle:
    """The handle of a manifest entry."""
    return SegmentHandle(
        uuid=e["uuid"],
        index_root=root,
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
    )


def committed_segments(root: str, name: str, version: Optional[int] = None) -> List[SegmentHandle]:
    """The segments of a committed index version."""
    doc = read_manifest(root, name, version)
    return [handle_from_json(root, name, doc["column"], e) for e in doc["segments"]]


def uncommitted_segments(root: str) -> List[str]:
    """UUIDs of segment files that no manifest version of any index names."""
    seg_dir = os.path.join(root, "segments")
    if not os.path.isdir(seg_dir):
        return []
    named: set = set()
    for name in list_index_names(root):
        for v in range(1, latest_version(root, name) + 1):
            try:
                named.update(e["uuid"] for e in read_manifest(root, name, v)["segments"])
            except BitshardError:
                continue
    return sorted(
        fn[: -len(SEGMENT_SUFFIX)]
        for fn in os.listdir(seg_dir)
        if fn.endswith(SEGMENT_SUFFIX) and fn[: -len(SEGMENT_SUFFIX)] not in named
    )


def iter_fragments(handles: Iterable[SegmentHandle]) -> List[int]:
    """Every fragment covered by the given segments, sorted."""
    out: set = set()
    for h in handles:
        out.update(h.fragment_ids)
    return sorted(out)
