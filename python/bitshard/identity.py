"""Fragment identities: what a segment encoded, so a reader can tell when the
data under it changed.

When a worker encodes a fragment it records the fragment's *identity record*
at the source version it read (a small JSON object), and the record's
*fingerprint* (32 hex digits). A reader computes the record of the same
fragment at the version it searches and compares: a different record means
the fragment is *stale* (its codes describe data that is no longer there)
and its rows are searched exactly (see docs/usage.md, *Living datasets*).

The record is what determines the indexed column's values of the fragment,
and nothing else, so that a change to another column (``add_columns`` of a
new column, a delete) does not make an index stale:

- Lance (``kind: "lance"``): ``physical_rows``; ``fields``, the Lance field
  ids of the column (with its children's) in the dataset's schema;
  ``files``, every data file of the fragment holding one of those fields,
  in the fragment's order, as ``{path, size, version, base_id, columns}``
  (``columns``: the ``[field id, column index]`` pairs of those fields in
  the file); ``overlays``, every data overlay whose file holds one of those
  fields, as ``{file, committed_version}``. The deletion file is left out:
  deletions are handled row by row from the source's deletion vectors.
- Parquet (``kind: "parquet"``): the file's ``path`` relative to the
  dataset root, its ``size`` in bytes and its modification time
  ``mtime_ns``, as listed when the source was opened.
- In-memory data (``kind: "memory"``): ``physical_rows`` (the data cannot
  change under a Dataset).
- ``kind: "unrecorded"``, ``source_version``: a fragment of a segment
  written before identities were recorded, merged with recorded ones; it
  is compared at that version like a format 1 segment.

The fingerprint is the project's 16-byte fingerprint (docs/format.md,
*Fingerprints*): two XXH64 hashes, seeds ``0x62732D66702D6C6F`` and
``0x62732D66702D6869``, each little-endian, over ASCII
``bs-fragment-identity-v1`` followed by the record's canonical JSON
(:func:`canonical_json`). :func:`fingerprint` is the one place that computes
it (a segment file format storing it per fragment calls the same function).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import _native

__all__ = [
    "FragmentIdentity",
    "canonical_json",
    "fingerprint",
    "fingerprint_bytes",
    "identity_of",
    "identities",
    "difference",
    "stale_fragments",
    "missing_fragments",
    "unverified_warning",
    "UNVERIFIED",
]

#: The prefix hashed before a record's canonical JSON.
DOMAIN = b"bs-fragment-identity-v1"
_SEED_LO = 0x62732D66702D6C6F  # "bs-fp-lo"
_SEED_HI = 0x62732D66702D6869  # "bs-fp-hi"

#: The reason prefix of a fragment whose identity cannot be checked.
UNVERIFIED = "unverified"


def canonical_json(record: Dict[str, Any]) -> str:
    """The canonical JSON text of a record: keys sorted, no spaces, ASCII
    only (non-ASCII characters escaped), so equal records give equal text."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def fingerprint_bytes(record: Dict[str, Any]) -> bytes:
    """The 16-byte fingerprint of a record (see the module docstring)."""
    data = DOMAIN + canonical_json(record).encode("ascii")
    return struct.pack("<QQ", _native.hash64(data, _SEED_LO), _native.hash64(data, _SEED_HI))


def fingerprint(record: Dict[str, Any]) -> str:
    """The fingerprint of a record as 32 lowercase hex digits."""
    return fingerprint_bytes(record).hex()


@dataclass(frozen=True)
class FragmentIdentity:
    """The identity of one fragment at the version a worker read.

    Attributes:
        id: the fragment id.
        rows: its physical rows (offsets ``0 <= o < rows``).
        record: the identity record, as canonical JSON text
            (:func:`canonical_json`; text keeps the handle hashable).
        fingerprint: :func:`fingerprint` of the record, 32 hex digits.
    """

    id: int
    rows: int
    record: str
    fingerprint: str

    @classmethod
    def of(cls, fragment_id: int, rows: int, record: Dict[str, Any]) -> "FragmentIdentity":
        """The identity of a fragment with this record."""
        return cls(int(fragment_id), int(rows), canonical_json(record), fingerprint(record))

    @property
    def record_dict(self) -> Dict[str, Any]:
        """The record as a dict."""
        return json.loads(self.record)

    def to_json(self) -> Dict[str, Any]:
        """The manifest form: ``{"id", "rows", "identity", "record"}``."""
        return {"id": self.id, "rows": self.rows, "identity": self.fingerprint,
                "record": self.record_dict}

    @classmethod
    def from_json(cls, e: Dict[str, Any]) -> "FragmentIdentity":
        """The identity of a manifest entry's ``fragments[i]`` (validated by
        :mod:`bitshard.schema` and ``read_manifest`` before it gets here)."""
        return cls(int(e["id"]), int(e["rows"]), canonical_json(e["record"]), e["identity"])


def identity_of(source: Any, fragment_id: int, column: str) -> FragmentIdentity:
    """The identity of one fragment of ``source`` (at the version the source
    is pinned to) for vector column ``column``."""
    info = source.fragment(fragment_id)
    return FragmentIdentity.of(info.id, info.physical_rows,
                               source.fragment_identity(info.id, column))


def identities(source: Any, fragment_ids: Iterable[int], column: str
               ) -> Tuple[FragmentIdentity, ...]:
    """:func:`identity_of` for each fragment, in the order given."""
    return tuple(identity_of(source, f, column) for f in fragment_ids)


def difference(recorded: Dict[str, Any], current: Dict[str, Any]) -> Optional[str]:
    """Why a fragment whose record was ``recorded`` is stale now that it is
    ``current``; None when they are the same. The reasons, checked in this
    order: ``"source kind changed"``, ``"path changed"`` (Parquet: another
    file now has the id), ``"physical rows changed"``, ``"file changed"``
    (Parquet: size or modification time), ``"column fields changed"`` (the
    column was dropped and added again), ``"data files changed"``,
    ``"overlay"`` (a data overlay on the column was added or replaced)."""
    if canonical_json(recorded) == canonical_json(current):
        return None
    if recorded.get("kind") != current.get("kind"):
        return "source kind changed"
    if recorded.get("path") != current.get("path"):
        return "path changed"
    if recorded.get("physical_rows") != current.get("physical_rows"):
        return "physical rows changed"
    if recorded.get("kind") == "parquet":
        return "file changed"
    if recorded.get("fields") != current.get("fields"):
        return "column fields changed"
    if recorded.get("files") != current.get("files"):
        return "data files changed"
    if recorded.get("overlays") != current.get("overlays"):
        return "overlay"
    return "identity changed"


# ------------------------------------------------------------ Lance records


def _lance_file(f: Any, fields: set) -> Optional[Dict[str, Any]]:
    """The record of a Lance data file if it holds one of ``fields``."""
    pairs = [[int(fid), int(ci)] for fid, ci in zip(f.fields, f.column_indices or [])
             if int(fid) in fields]
    if not pairs and not any(int(fid) in fields for fid in f.fields):
        return None
    if not pairs:  # column_indices absent (older files): the field ids alone
        pairs = [[int(fid), -1] for fid in f.fields if int(fid) in fields]
    size = getattr(f, "file_size_bytes", None)
    base = getattr(f, "base_id", None)
    return {"path": str(f.path), "size": None if size is None else int(size),
            "version": f"{int(f.file_major_version)}.{int(f.file_minor_version)}",
            "base_id": None if base is None else int(base), "columns": pairs}


def lance_field_ids(lance_schema: Any, column: str) -> List[int]:
    """The Lance field ids of ``column`` and its children, sorted."""
    out: List[int] = []

    def walk(field: Any) -> None:
        out.append(int(field.id()))
        for c in field.children():
            walk(c)

    for field in lance_schema.fields():
        if field.name() == column:
            walk(field)
    return sorted(out)


def lance_record(metadata: Any, field_ids: Sequence[int]) -> Dict[str, Any]:
    """The identity record of a Lance fragment (``FragmentMetadata``) for the
    column with ``field_ids`` (see the module docstring)."""
    fields = set(int(f) for f in field_ids)
    files = [r for r in (_lance_file(f, fields) for f in metadata.files) if r is not None]
    overlays = []
    for o in getattr(metadata, "overlays", None) or []:
        r = _lance_file(o.data_file, fields)
        if r is not None:
            cv = o.committed_version
            overlays.append({"file": r, "committed_version": None if cv is None else int(cv)})
    return {"kind": "lance", "physical_rows": int(metadata.physical_rows),
            "fields": sorted(fields), "files": files, "overlays": overlays}


# ---------------------------------------------------------------- staleness


def _legacy_version(doc: Dict[str, Any], h: Any) -> Any:
    """The source version a segment without identities is compared at: its
    entry's ``source_version`` (format 2, copied from a format 1 manifest),
    else the manifest's."""
    return h.source_version if h.source_version is not None else doc.get("source_version")


def stale_fragments(source: Any, doc: Dict[str, Any], handles: Sequence[Any],
                    opened: Optional[Sequence[Any]] = None) -> Dict[int, str]:
    """The fragments of ``source`` covered by ``handles`` (the segments of
    manifest ``doc``) whose codes must not be used: fragment id -> reason.

    ``opened``: the handles' open segment files (``OpenSegment``, same
    order; None for one that could not be opened), when the caller has
    them. A fragment whose file records an
    identity fingerprint (segment format 3 written since fingerprints are
    recorded) is current when the fingerprint of its current record equals
    it; otherwise the manifest's record, when there is one, names the
    reason (:func:`difference`), else the fragment's record at the
    segment's recorded Lance version does, when that version can still be
    opened and that record's fingerprint is the file's; else the reason is
    ``"identity changed"``.
    A fragment without a fingerprint in its file falls back to the
    manifest: a segment with identities (manifest format 2) is compared
    fragment by fragment with the source's current records (:func:`difference`
    gives the reason). A segment without them (format 1) is compared with the records
    at its recorded source version: the same version is current; a Lance
    version that can still be opened is compared fragment by fragment;
    otherwise every fragment is ``"unverified: ..."`` (the reason says why).
    Fragments no longer in the source are not listed (their rows are never
    returned; see :func:`missing_fragments`)."""
    column = doc["column"]
    present = {f.id for f in source.fragments()}
    out: Dict[int, str] = {}
    legacy: Dict[str, Tuple[Any, List[int]]] = {}  # repr(version) -> (version, fragments)
    # Fragments whose file fingerprint differs and that have no record in
    # the manifest: repr(version) -> (version, {fragment: fingerprint}).
    unnamed: Dict[str, Tuple[Any, Dict[int, str]]] = {}
    for i, h in enumerate(handles):
        fps: List[Optional[str]] = [None] * len(h.fragment_ids)
        if opened is not None and opened[i] is not None \
                and len(opened[i].fragment_fingerprints) == len(fps):
            fps = list(opened[i].fragment_fingerprints)
        manifest = {x.id: x for x in h.identities} \
            if len(h.identities) == len(h.fragment_ids) else {}
        for f, fp in zip(h.fragment_ids, fps):
            if fp is None or int(f) not in present:
                continue
            current = source.fragment_identity(int(f), column)
            if fingerprint(current) != fp:
                rec = manifest.get(int(f))
                out[int(f)] = (difference(rec.record_dict, current) if rec is not None
                               else None) or "identity changed"
                if rec is None:
                    v = _legacy_version(doc, h)
                    unnamed.setdefault(repr(v), (v, {}))[1][int(f)] = fp
        if all(fp is not None for fp in fps) and fps:
            continue  # every fragment was checked against its file
        if manifest:
            fp_of = dict(zip((int(f) for f in h.fragment_ids), fps))
            for ident in h.identities:
                if ident.id not in present or fp_of.get(ident.id) is not None:
                    continue
                rec = ident.record_dict
                if rec.get("kind") == "unrecorded":  # merged from a format 1 segment
                    v = rec.get("source_version")
                    legacy.setdefault(repr(v), (v, []))[1].append(ident.id)
                    continue
                why = difference(rec, source.fragment_identity(ident.id, column))
                if why is not None:
                    out[ident.id] = why
        else:
            v = _legacy_version(doc, h)
            legacy.setdefault(repr(v), (v, []))[1].extend(
                int(f) for f, fp in zip(h.fragment_ids, fps) if f in present and fp is None)
    for v, frags in legacy.values():
        if frags:
            out.update(_legacy_check(source, column, v, frags))
    for v, file_fps in unnamed.values():
        out.update(_name_from_version(source, column, v, file_fps))
    return out


def _name_from_version(source: Any, column: str, version: Any, fps: Dict[int, str]
                       ) -> Dict[int, str]:
    """Reasons for stale fragments ``fps`` (id -> the file's fingerprint)
    that the manifest has no record of: the difference between the
    fragment's record at the segment's recorded Lance ``version`` and now,
    when that version can still be opened and its record is the one the
    file's fingerprint was made from; nothing otherwise (the reason stays
    "identity changed")."""
    if source.kind != "lance" or not isinstance(version, int) or version == source.version:
        return {}
    try:
        old = source.at_version(version)
        old_present = {f.id for f in old.fragments()}
    except Exception:  # cleaned up, or unreadable: nothing to name it by
        return {}
    out: Dict[int, str] = {}
    for f, fp in fps.items():
        if f not in old_present:
            continue
        then = old.fragment_identity(f, column)
        if fingerprint(then) == fp:
            why = difference(then, source.fragment_identity(f, column))
            if why is not None:
                out[f] = why
    return out


def _legacy_check(source: Any, column: str, version: Any, frags: List[int]
                  ) -> Dict[int, str]:
    """Reasons for fragments ``frags`` of a segment without identities,
    recorded at source version ``version``."""
    if source.kind in ("numpy", "table"):
        return {}  # in-memory data cannot change under its source
    if version is None:
        return {f: f"{UNVERIFIED}: the index recorded no source version" for f in frags}
    if version == source.version:
        return {}
    if source.kind != "lance":
        return {f: f"{UNVERIFIED}: the {source.kind} files changed since the index was built "
                   f"(version {version}) and it recorded no fragment identities" for f in frags}
    try:
        old = source.at_version(version)
        old_present = {f.id for f in old.fragments()}
    except Exception:  # cleaned up, or unreadable: nothing to compare with
        return {f: f"{UNVERIFIED}: source version {version} no longer exists" for f in frags}
    out: Dict[int, str] = {}
    for f in frags:
        if f not in old_present:
            out[f] = f"{UNVERIFIED}: fragment {f} is not in source version {version}"
            continue
        why = difference(old.fragment_identity(f, column), source.fragment_identity(f, column))
        if why is not None:
            out[f] = why
    return out


def missing_fragments(source: Any, handles: Sequence[Any]) -> List[int]:
    """Fragments the segments cover that are no longer in the source
    (compacted away or deleted since the build), sorted."""
    present = {f.id for f in source.fragments()}
    return sorted({int(f) for h in handles for f in h.fragment_ids} - present)


def unverified_warning(name: str, stale: Dict[int, str]) -> Optional[str]:
    """The one warning about an index's unverified fragments (None if
    there are none): how many, why, and how to re-index."""
    unv = sorted(f for f, why in stale.items() if why.startswith(UNVERIFIED))
    if not unv:
        return None
    shown = unv if len(unv) <= 10 else unv[:10] + ["..."]
    return (f"index {name!r}: {len(unv)} fragment(s) {shown} cannot be verified "
            f"({stale[unv[0]]}): their rows are searched exactly, not from the index; "
            f"rebuild the index (ds.create_index(..., replace=True), bitshard.build_index or "
            f"`bitshard build`) to record what it covers")
