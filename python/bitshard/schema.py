"""The schemas of bitshard's JSON documents on disk, and their one reader.

Two kinds of JSON document live under an index root: manifests
(``indices/<name>/v<NNNNNNNN>.json``) and build states
(``builds/<name>.json``). Their bytes come from disk or an object store, so
a hostile or buggy writer may have put anything there; a checksum proves
only that the bytes are some writer's. Every such document goes through
:func:`read_document` before any field is used:

1. at most :data:`MAX_DOCUMENT_BYTES` bytes;
2. brackets nested at most :data:`MAX_DEPTH` deep (scanned before parsing,
   so no parser recurses on hostile input);
3. valid UTF-8 JSON whose top level is an object;
4. ``format`` is the kind's and ``format_version`` an int this code reads
   (a newer one: :class:`~bitshard.errors.UnsupportedVersionError`);
5. for manifests, the checksum (so bit rot is reported as such);
6. every field the readers use has its type and range (a msgspec
   :class:`msgspec.Struct` per kind: :class:`Manifest`,
   :class:`BuildState`; unknown extra fields are allowed and ignored).

Any failure is :class:`~bitshard.errors.CorruptIndexError` naming the file
and the field (msgspec's ``$.segments[3].num_rows`` path), never a bare
``KeyError``/``TypeError``/``RecursionError``. The readers then use the
validated dict exactly as before.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Callable, Dict, List, Literal, Optional, Type, Union

import msgspec
import numpy as np
from msgspec import Meta, Struct

from .errors import CorruptIndexError, UnsupportedVersionError
from .names import MAX_VERSION, UUID_PATTERN

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_DEPTH",
    "MAX_SEGMENTS",
    "Manifest",
    "SegmentEntry",
    "FragmentEntry",
    "BuildState",
    "read_document",
    "read_build_state",
    "json_depth",
]

#: The ``format`` and newest ``format_version`` of build states.
BUILD_STATE_FORMAT = "bitshard-build"
BUILD_STATE_VERSION = 1

#: The largest manifest or build state read, in bytes (a manifest entry
#: takes about 400 bytes plus 12 per fragment, and in format 2 its identity
#: record: about 300 bytes per Lance fragment).
MAX_DOCUMENT_BYTES = 256 << 20
#: The deepest nesting of arrays and objects read. Today's documents nest 11
#: deep (``{"segments": [{"fragments": [{"record": {"overlays": [{"file":
#: {"columns": [[...]]}}]}}]}]}``); the rest is headroom.
MAX_DEPTH = 16
#: The most segments one manifest may list.
MAX_SEGMENTS = 100_000
#: The most tasks one build state may list (one per fragment at most).
MAX_TASKS = 10_000_000

_U32_MAX = 2**32 - 1

U32 = Annotated[int, Meta(ge=0, le=_U32_MAX)]
# (msgspec takes no bound above int64; it refuses ints above 2**64 - 1 itself.)
U64 = Annotated[int, Meta(ge=0)]
# Patterns end in \Z, not $: msgspec searches with Python's re, where $ also
# matches before a final newline ("<uuid>\n" would pass).
Uuid = Annotated[str, Meta(pattern=f"^{UUID_PATTERN}\\Z")]
Fingerprint = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}\Z")]
Metric = Literal["l2", "cosine", "dot"]
NumBits = Annotated[int, Meta(ge=1, le=9)]
Dimension = Annotated[int, Meta(ge=1, le=_U32_MAX)]
Column = Annotated[str, Meta(min_length=1, max_length=1024)]
Name = Annotated[str, Meta(min_length=1, max_length=255)]
Timestamp = Annotated[float, Meta(ge=0)]
SourceVersion = Union[int, str, None]


# ------------------------------------------------------------- manifests


class LanceFileRecord(Struct, forbid_unknown_fields=True):
    """A Lance data file in an identity record (bitshard.identity)."""

    path: Annotated[str, Meta(min_length=1, max_length=4096)]
    size: Optional[U64]
    version: Annotated[str, Meta(max_length=32)]
    base_id: Optional[U32]
    columns: List[Annotated[List[int], Meta(min_length=2, max_length=2)]]


class LanceOverlayRecord(Struct, forbid_unknown_fields=True):
    """A Lance data overlay in an identity record."""

    file: LanceFileRecord
    committed_version: Optional[U64]


class LanceRecord(Struct, tag_field="kind", tag="lance", forbid_unknown_fields=True):
    """The identity record of a Lance fragment (bitshard.identity)."""

    physical_rows: U32
    fields: List[int]
    files: List[LanceFileRecord]
    overlays: List[LanceOverlayRecord]


class ParquetRecord(Struct, tag_field="kind", tag="parquet", forbid_unknown_fields=True):
    """The identity record of a Parquet fragment (bitshard.identity)."""

    path: Annotated[str, Meta(min_length=1, max_length=4096)]
    size: Optional[U64]
    mtime_ns: Optional[int]


class MemoryRecord(Struct, tag_field="kind", tag="memory", forbid_unknown_fields=True):
    """The identity record of an in-memory fragment (bitshard.identity)."""

    physical_rows: U32


class UnrecordedRecord(Struct, tag_field="kind", tag="unrecorded", forbid_unknown_fields=True):
    """A fragment whose identity was never recorded (its segment was written
    before manifest format 2 and then merged with recorded ones): compared
    at ``source_version`` like a format 1 segment."""

    source_version: SourceVersion


class FragmentEntry(Struct, forbid_unknown_fields=True):
    """One fragment of a segment entry (manifest format 2): its id, physical
    rows, and identity at the version the segment was read."""

    id: U32
    rows: U32
    identity: Fingerprint
    record: Union[LanceRecord, ParquetRecord, MemoryRecord, UnrecordedRecord]


class SegmentEntry(Struct):
    """One segment of a manifest: what the file must be (checked at open).
    ``fragments`` and ``source_version`` are format 2's."""

    uuid: Uuid
    fragment_ids: Annotated[List[U32], Meta(max_length=_U32_MAX)]
    num_rows: U32
    num_bits: NumBits
    metric: Metric
    dimension: Dimension
    rotation_fingerprint: Fingerprint
    ivf_fingerprint: Fingerprint
    file: Optional[str] = None
    size_bytes: U64 = 0
    fragments: Optional[Annotated[List[FragmentEntry], Meta(max_length=_U32_MAX)]] = None
    source_version: SourceVersion = None


class Drift(Struct, forbid_unknown_fields=True):
    """How far rows encoded by upkeep lie from the centroids, against the
    rows indexed when the centroids were last applied to everything (written
    by ``optimize_indices``; sums of residual norms, see bitshard.upkeep)."""

    indexed_rows: U64
    indexed_residual_sum: Annotated[float, Meta(ge=0, le=1e300)]
    new_rows: U64
    new_residual_sum: Annotated[float, Meta(ge=0, le=1e300)]


class Manifest(Struct):
    """A manifest version (``indices/<name>/v<NNNNNNNN>.json``)."""

    format: Literal["bitshard-manifest"]
    format_version: Annotated[int, Meta(ge=1, le=2)]
    name: Name
    column: Column
    version: Annotated[int, Meta(ge=1, le=MAX_VERSION)]
    segments: Annotated[List[SegmentEntry], Meta(max_length=MAX_SEGMENTS)]
    checksum: Annotated[str, Meta(pattern=r"^[0-9a-f]{16}\Z")]
    created_at: Optional[Timestamp] = None
    source_version: SourceVersion = None
    metric: Optional[Metric] = None
    num_bits: Optional[NumBits] = None
    dimension: Optional[Dimension] = None
    rotation_fingerprint: Optional[Fingerprint] = None
    ivf_fingerprint: Optional[Fingerprint] = None
    drift: Optional[Drift] = None


# ----------------------------------------------------------- build states


class BuildParams(Struct):
    """The settings of a ``build_index`` call (what makes "the same call")."""

    column: Column
    metric: Metric
    num_partitions: Optional[Annotated[int, Meta(ge=1, le=_U32_MAX)]]
    num_bits: Optional[NumBits]
    sample_rate: Annotated[int, Meta(ge=1)]
    max_iters: Annotated[int, Meta(ge=1)]
    seed: Optional[int]
    ivf_centroids: Optional[Fingerprint]
    rq_rotation: Optional[Annotated[str, Meta(pattern=r"^([0-9a-f]{2})*\Z")]]
    #: absent in states written before the size bound (never resumed by a
    #: call that has it: the params differ)
    max_segment_bytes: Optional[Annotated[int, Meta(ge=1)]] = None
    shared_centroids: Optional[bool] = None


class BuildSource(Struct):
    """The source a build is pinned to."""

    kind: Annotated[str, Meta(min_length=1, max_length=64)]
    uri: Optional[str]
    version: SourceVersion


class BuildTask(Struct):
    """One encode task: contiguous fragments."""

    id: Annotated[int, Meta(ge=0, le=MAX_TASKS)]
    fragment_ids: List[U32]
    num_rows: U64


class BuildMerge(Struct):
    """A finished merge: its input segments and the segment it wrote."""

    inputs: Annotated[List[Uuid], Meta(min_length=1)]
    uuid: Uuid


class BuildState(Struct):
    """The state of an unfinished ``build_index`` (``builds/<name>.json``)."""

    format: Literal["bitshard-build"]
    format_version: Annotated[int, Meta(ge=1, le=1)]
    name: Name
    index_type: Literal["IVF_RQ"]
    params: BuildParams
    source: BuildSource
    rotation: Annotated[str, Meta(min_length=2, pattern=r"^([0-9a-f]{2})*\Z")]
    rotation_seed: U64
    ivf_file: Name
    ivf_fingerprint: Fingerprint
    tasks: Annotated[List[BuildTask], Meta(max_length=MAX_TASKS)]
    segments: Dict[Annotated[str, Meta(pattern=r"^(0|[1-9][0-9]{0,8})\Z")], Uuid]
    merges: List[BuildMerge]
    created_at: Optional[Timestamp] = None
    updated_at: Optional[Timestamp] = None


# ---------------------------------------------------------------- reading

#: The string literals of JSON (to blank out before counting brackets).
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text ``data``.

    Strings are removed first (a bracket inside a string does not nest),
    matched left to right as a JSON parser reads them, so for any input the
    depth a parser reaches before it succeeds or stops at an error is at
    most this.
    """
    text = _JSON_STRING.sub(b'""', data)
    brackets = np.frombuffer(text.translate(None, delete=_NOT_BRACKETS), dtype=np.uint8)
    if brackets.size == 0:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def read_document(data: bytes, path: str, kind: str, fmt: str, max_version: int,
                  schema: Type[Struct],
                  checksum: Optional[Callable[[Dict[str, Any]], str]] = None) -> Dict[str, Any]:
    """Validate the bytes of a JSON document and return it as a dict.

    Args:
        data: the file's bytes.
        path: the file's path or URI (for messages).
        kind: ``"manifest"`` or ``"build state"`` (for messages).
        fmt: the value its ``format`` field must have.
        max_version: the newest ``format_version`` this code reads.
        schema: the :class:`msgspec.Struct` of the kind.
        checksum: for documents with a ``checksum`` field, the function
            computing it from the dict.

    Raises:
        CorruptIndexError: naming ``path`` and the field.
        UnsupportedVersionError: a newer ``format_version``.
    """
    def bad(what: str) -> CorruptIndexError:
        return CorruptIndexError(f"{kind} {path}: {what}")

    if len(data) > MAX_DOCUMENT_BYTES:
        raise bad(f"{len(data)} bytes, more than the {MAX_DOCUMENT_BYTES} a {kind} may have")
    depth = json_depth(data)
    if depth > MAX_DEPTH:
        raise bad(f"nested {depth} deep, more than the {MAX_DEPTH} a {kind} may be")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptIndexError(f"{kind} {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise bad(f"the top level is a JSON {type(doc).__name__}, not an object")
    if doc.get("format") != fmt:
        raise CorruptIndexError(f"{kind} {path} is not a bitshard {kind}: field 'format' is "
                                f"{doc.get('format')!r}, not {fmt!r}")
    fv = doc.get("format_version")
    if isinstance(fv, bool) or not isinstance(fv, int) or fv < 1:
        raise bad(f"field 'format_version' must be an integer >= 1, got {fv!r}")
    if fv > max_version:
        raise UnsupportedVersionError(
            f"{kind} {path} has format version {fv}, this bitshard reads up to {max_version}")
    if checksum is not None and doc.get("checksum") != checksum(doc):
        raise CorruptIndexError(f"{kind} {path} fails its checksum")
    try:
        msgspec.convert(doc, schema, strict=True)
    except msgspec.ValidationError as e:
        raise bad(f"bad field: {e}") from None
    return doc


def read_build_state(data: bytes, path: str) -> Dict[str, Any]:
    """A build state's bytes, validated (:func:`read_document` with
    :class:`BuildState`, then: task ids are 0..n-1 in order, and every
    finished segment is keyed by a task id). CorruptIndexError naming the
    file and the field."""
    doc = read_document(data, path, "build state", BUILD_STATE_FORMAT, BUILD_STATE_VERSION,
                        BuildState)
    tasks = doc["tasks"]
    for i, t in enumerate(tasks):
        if t["id"] != i:
            raise CorruptIndexError(f"build state {path}: tasks[{i}].id is {t['id']}, not {i}")
    for k in doc["segments"]:
        if int(k) >= len(tasks):
            raise CorruptIndexError(f"build state {path}: segments[{k!r}] names no task "
                                    f"(there are {len(tasks)})")
    return doc
