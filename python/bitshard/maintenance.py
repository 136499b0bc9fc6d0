"""Upkeep of an index root: :func:`cleanup` and :func:`verify`.

:func:`cleanup` removes segment files no manifest references (the leftovers
of failed build attempts and of superseded writers); :func:`verify` re-reads
every committed segment and reports each fault it finds. :func:`verify_report`
is :func:`verify` with the per-index summary the ``bitshard verify`` command
prints, as a :class:`VerifyReport`.

Both work on an index root however it was written (``build_index``,
``create_index`` or the uncommitted/merge/commit calls); see
docs/distributed.md, *Maintenance*.
"""

from __future__ import annotations

import logging
import os
import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from . import identity
from . import index as idx
from . import names, schema, validate
from .codespace import CodeSpace
from .dataset import Dataset, dataset
from .errors import BitshardError, CorruptIndexError, IndexNotFoundError
from .index import BUILDS_DIR, OpenSegment, SegmentHandle
from .storage import Storage, is_object_uri, reclaim_upload_dirs

__all__ = ["cleanup", "upgrade_index", "verify", "verify_report", "VerifyReport", "IndexSummary",
           "open_dataset", "referenced_uuids"]

PathLike = Union[str, "os.PathLike[str]"]

#: How a verify notice says to bring fragments back into the index.
_REINDEX = "run optimize_indices, or rebuild the index"

log = logging.getLogger("bitshard.maintenance")


@dataclass(frozen=True)
class IndexSummary:
    """What :func:`verify_report` found committed for one index."""

    name: str       #: the index name
    version: int    #: its latest manifest version
    segments: int   #: segments that manifest lists
    rows: int       #: rows those segments cover, as the manifest says


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_report`.

    ``faults`` is exactly what :func:`verify` returns: one human-readable
    line per fault, naming the index and the file (empty if everything checks
    out). ``notices`` lists what is not corrupt but not indexed and current
    either: fragments whose data changed since they were encoded (stale, or
    unverified), fragments the index covers that are no longer in the source
    (compacted or deleted), and source fragments no segment covers; search
    handles each correctly (exactly, or not at all) and ``optimize_indices``
    or a rebuild brings them back into the index. ``indexes`` summarises the
    latest readable manifest of each index checked, in name order.
    """

    faults: List[str] = dataclasses.field(default_factory=list)
    indexes: List[IndexSummary] = dataclasses.field(default_factory=list)
    notices: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no fault was found."""
        return not self.faults

    @property
    def current(self) -> bool:
        """True when nothing is corrupt and every source fragment is indexed
        with codes of its current data (what ``verify --strict`` requires)."""
        return not self.faults and not self.notices


def open_dataset(uri: Any, index_uri: Optional[PathLike] = None,
                 storage_options: Optional[Dict[str, Any]] = None) -> Dataset:
    """The :class:`Dataset` of ``uri`` (a path/URI or a Dataset), with its
    index root moved to ``index_uri`` and/or opened with ``storage_options``
    when they are given (a Dataset given alone is returned as it is)."""
    if isinstance(uri, Dataset):
        if index_uri is None and storage_options is None:
            return uri
        return Dataset(uri.source, index_uri=uri.index_root if index_uri is None else index_uri,
                       storage_options=storage_options)
    return dataset(uri, index_uri=index_uri, storage_options=storage_options)


def _is_index_root(st: Storage) -> bool:
    dirs = {e.name for e in st.list("") if e.is_dir}
    return "_versions" not in dirs and bool(dirs & {idx.INDICES_DIR, idx.SEGMENTS_DIR, BUILDS_DIR})


def _index_root(uri: Any, index_uri: Optional[PathLike] = None,
                storage_options: Optional[Dict[str, Any]] = None) -> Storage:
    """The storage of the index root that ``uri`` (data, Dataset, or an
    index root itself) or ``index_uri`` names."""
    def root_of(x: Any) -> Storage:
        text = os.fspath(x)
        return Storage.for_uri(text if is_object_uri(text) else os.path.abspath(text),
                               storage_options)

    if index_uri is not None:
        return root_of(index_uri)
    if isinstance(uri, Dataset):
        return uri.storage if storage_options is None else \
            Storage.for_uri(uri.index_root, storage_options)
    if isinstance(uri, (str, os.PathLike)):
        text = os.fspath(uri)
        st = root_of(text) if is_object_uri(text) else Storage.for_uri(os.path.abspath(text))
        if _is_index_root(st):
            return st
    return dataset(uri, storage_options=storage_options).storage


def referenced_uuids(root: Storage) -> set:
    """Every segment uuid any manifest version of any index under ``root``
    names (a set of 32-hex-digit strings).

    Raises:
        CorruptIndexError: a manifest cannot be read (nothing is then safe to
            delete).
    """
    out: set = set()
    for name in idx.index_dir_names(root):
        for v in idx.manifest_versions(root, name):
            try:
                doc = idx.read_manifest(root, name, v)
            except (BitshardError, OSError) as e:
                raise CorruptIndexError(
                    f"cannot read manifest v{v} of index {name!r} ({e}); refusing to decide "
                    f"which segments are unreferenced") from None
            out.update(entry["uuid"] for entry in doc["segments"])
    return out


def cleanup(
    uri: Any,
    older_than_seconds: float = 3600,
    *,
    index_uri: Optional[PathLike] = None,
    dry_run: bool = False,
    abandoned_builds: bool = False,
    storage_options: Optional[Dict[str, Any]] = None,
) -> List[str]:
    """Remove segment files that no manifest of any index references.

    A segment is removed when no manifest version of any index under the
    index root names it, no in-progress build (``builds/*.json``) lists it,
    and its file is older than ``older_than_seconds`` (so a build running
    now keeps its fresh segments). Leftover temp files of writers that died
    (``segments/*.bsseg.tmp``, ``indices/<name>/vNNNNNNNN.json.*.tmp``,
    ``builds/<name>.{json,ivf}.*.tmp``) are removed under the same age rule
    (not listed in the result, which names segments); on a local root a live
    writer holds a lock on its temp file and cleanup leaves it, whatever the
    age. On an object store, incomplete multipart uploads of segment files
    started longer ago than the age are aborted, and the local upload
    directories (``$TMPDIR/bitshard-upload-*``) of writers on this machine
    that died are removed.

    A build state (``builds/<name>.json``) that cannot be read makes cleanup
    remove nothing (its build's uncommitted segments are unknown) and raise
    CorruptIndexError naming it, unless ``abandoned_builds`` is set and it is
    older than the age: then it is dropped like any abandoned state.

    Cleanup first checks the tree: if ``segments/``, ``indices/``,
    ``indices/<name>/`` or ``builds/`` is a file, or a manifest's name is a
    directory, it removes nothing and raises CorruptIndexError naming it
    (manifests it cannot see would make their segments look unreferenced).

    Args:
        uri: the data (path/URI or :class:`Dataset`; its index root is used)
            or an index root itself (a directory or ``s3://bucket/prefix``).
        older_than_seconds: minimum age (by modification time), in seconds.
        index_uri: the index root, when it is not the data's default.
        dry_run: only report what would be removed.
        abandoned_builds: also drop build states not updated for
            ``older_than_seconds`` (their builds can then no longer resume) and
            so free their segments.
        storage_options: connection settings of an object-store index root.

    Returns:
        The sorted uuids (32 hex digits) of the removed segment files.

    Raises:
        CorruptIndexError: a manifest or a build state is unreadable, or the
            tree is not what bitshard writes; nothing is removed.
        StorageError: the storage backend failed (names the file).
    """
    validate.non_negative_number("older_than_seconds", older_than_seconds)
    st = _index_root(uri, index_uri, storage_options)
    # Commits hold this lock shared from checking their segments to creating
    # their manifest: no segment is removed in between (Storage.commit_lock).
    with st.commit_lock(exclusive=True):
        return _cleanup_locked(st, older_than_seconds, dry_run, abandoned_builds)


def _cleanup_locked(st: Storage, older_than_seconds: float, dry_run: bool,
                    abandoned_builds: bool) -> List[str]:
    _check_tree(st)
    seg_files = st.list(idx.SEGMENTS_DIR)
    referenced = referenced_uuids(st) if seg_files else set()
    now = time.time()
    # Before anything is removed: an unreadable build state stops cleanup.
    protected = _build_segments(st, now, older_than_seconds, dry_run, abandoned_builds)
    _remove_stale_temp_files(st, now, older_than_seconds, dry_run)
    _remove_stale_uploads(st, older_than_seconds, dry_run)
    if not seg_files:
        return []
    removed = set()
    for e in seg_files:
        fn = e.name
        # Only regular files named by a uuid are candidates: never a link
        # (nor what it points to), a directory, or a file of another name.
        parsed = None if (e.is_dir or e.is_link) else names.parse_segment_file(fn)
        if parsed is None:
            continue
        uuid, tmp = parsed
        if not tmp and (uuid in referenced or uuid in protected):
            continue
        key = f"{idx.SEGMENTS_DIR}/{fn}"
        if e.mtime is not None and now - e.mtime < older_than_seconds:
            continue
        # A live writer's temp file is locked: delete_temp leaves it.
        if not dry_run and not (st.delete_temp(key) if tmp else st.delete(key)):
            continue
        removed.add(uuid)
    return sorted(removed)


def _refuse(st: Storage, key: str, what: str) -> CorruptIndexError:
    return CorruptIndexError(
        f"cleanup removes nothing: {st.path(key)} is {what}; the index root's tree is not "
        f"what bitshard writes (segments/, indices/, indices/<name>/ and builds/ are "
        f"directories, manifests are files), so the segments a manifest names could be "
        f"taken for unreferenced. Repair or move it, then run cleanup again")


def _check_tree(st: Storage) -> None:
    """CorruptIndexError unless the index root's tree is what cleanup reads.

    A file in place of ``indices/`` (or of one index's directory, or a
    directory in place of a manifest) would hide manifests, and every segment
    they name would look unreferenced; a file in place of ``builds/`` would
    hide the builds in progress. Cleanup then removes nothing at all.
    """
    def files_only(entries: List[Any]) -> List[str]:
        # On an object store a key and a prefix may share a name: only a
        # name that is a file and nothing else is out of place.
        dirs = {e.name for e in entries if e.is_dir}
        return sorted({e.name for e in entries if not e.is_dir} - dirs)

    for n in files_only(st.list("")):
        if n in (idx.SEGMENTS_DIR, idx.INDICES_DIR, BUILDS_DIR):
            raise _refuse(st, n, "a file, not a directory")
    entries = st.list(idx.INDICES_DIR)
    for n in files_only(entries):
        if not n.startswith("."):
            raise _refuse(st, f"{idx.INDICES_DIR}/{n}", "a file, not an index's directory")
    for n in sorted({e.name for e in entries if e.is_dir}):
        if not names.is_readable_index_name(n):
            continue
        inner = st.list(f"{idx.INDICES_DIR}/{n}")
        plain = {e.name for e in inner if not e.is_dir}
        for e in inner:
            if e.is_dir and e.name not in plain and names.parse_manifest_file(e.name) is not None:
                raise _refuse(st, f"{idx.INDICES_DIR}/{n}/{e.name}",
                              "a directory, not a manifest file")


def _remove_stale_temp_files(st: Storage, now: float, older_than_seconds: float,
                             dry_run: bool) -> None:
    """Remove the temp files of manifest and build-state writers that died
    (``indices/<name>/vNNNNNNNN.json.<token>.tmp``, ``builds/<name>.json.<token>.tmp``,
    ``builds/<name>.ivf.<token>.tmp``), and the conditional-write probe
    objects of killed object-store writers (``.bitshard-probe-<hex>`` at the
    root), older than the age. Local commits
    hold the commit lock while their temp manifest exists, and cleanup holds
    it too: a live commit's temp file is never removed."""
    def stale(e: Any) -> bool:
        return not (e.is_dir or e.is_link) and (
            e.mtime is None or now - e.mtime >= older_than_seconds)

    keys = []
    for n in idx.index_dir_names(st):
        for e in st.list(f"{idx.INDICES_DIR}/{n}"):
            target = names.parse_temp_file(e.name)
            if target is not None and names.parse_manifest_file(target) is not None and stale(e):
                keys.append(f"{idx.INDICES_DIR}/{n}/{e.name}")
    for e in st.list(BUILDS_DIR):
        stem, ext = os.path.splitext(names.parse_temp_file(e.name) or "")
        if ext in (".json", ".ivf") and names.is_readable_index_name(stem) and stale(e):
            keys.append(f"{BUILDS_DIR}/{e.name}")
    keys += [e.name for e in st.list("") if names.is_probe_file(e.name) and stale(e)]
    for key in keys:
        if dry_run:
            log.info("cleanup would remove the leftover temp file %s", st.path(key))
        elif st.delete_temp(key):  # never a live writer's (Storage.delete_temp)
            log.info("cleanup removed the leftover temp file %s", st.path(key))


def _remove_stale_uploads(st: Storage, older_than_seconds: float, dry_run: bool) -> None:
    """On an object store: abort the incomplete multipart uploads of segment
    files started longer ago than the age (a writer killed while uploading),
    and remove the local upload directories (``$TMPDIR/bitshard-upload-*``)
    of writers on this machine that died (a live writer's is locked)."""
    if st.is_local:
        return
    for key in st.abort_stale_uploads(idx.SEGMENTS_DIR, older_than_seconds,  # type: ignore[attr-defined]
                                      dry_run):
        log.info("cleanup %s the incomplete upload of %s",
                 "would abort" if dry_run else "aborted", st.path(key))
    for d in reclaim_upload_dirs(older_than_seconds, dry_run):
        log.info("cleanup %s the upload directory %s of a writer that died",
                 "would remove" if dry_run else "removed", d)


def _build_segments(st: Storage, now: float, older_than_seconds: float, dry_run: bool,
                    abandoned_builds: bool) -> set:
    """The segment uuids the builds in progress list (protected from
    cleanup); with ``abandoned_builds``, the states older than the age are
    dropped first (and protect nothing)."""
    protected: set = set()
    builds = st.list(BUILDS_DIR)
    build_names = {e.name for e in builds}
    for e in builds:
        fn = e.name
        stem, ext = os.path.splitext(fn)
        if e.is_dir or e.is_link or ext not in (".ivf", ".json") \
                or not names.is_readable_index_name(stem):
            continue  # not a file a build wrote
        key = names.build_state_key(stem) if ext == ".json" else names.build_ivf_key(stem)
        if ext == ".ivf" and abandoned_builds and not dry_run \
                and stem + ".json" not in build_names:
            # the model file of a failed build that kept no state (in-memory source)
            if e.mtime is not None and now - e.mtime >= older_than_seconds:
                st.delete(key)
            continue
        if ext != ".json":
            continue
        age = now - (e.mtime if e.mtime is not None else now)
        try:
            doc = schema.read_build_state(st.read_bytes(key), st.path(key))
            uuids = set(doc["segments"].values()) | {m["uuid"] for m in doc["merges"]}
        except FileNotFoundError:
            continue  # its build finished (and dropped it) since the listing
        except (OSError, CorruptIndexError) as err:
            if abandoned_builds and age >= older_than_seconds:
                if not dry_run:
                    st.delete(key)
                    st.delete(names.build_ivf_key(stem))
                log.warning("cleanup: dropped the unreadable build state %s", st.path(key))
                continue
            # Which segments its build wrote is unknown: any uncommitted one
            # may be its, so none may be removed.
            raise CorruptIndexError(
                f"cleanup removes nothing: the build state {st.path(key)} cannot be read "
                f"({err}), so the uncommitted segments its build wrote cannot be told apart "
                f"from orphans. If no build of index {stem!r} runs, delete that file (a rerun "
                f"of the build then starts afresh), or run cleanup with abandoned_builds=True "
                f"(--abandoned-builds) to drop it when older than the age; then run cleanup "
                f"again") from None
        if abandoned_builds and age >= older_than_seconds:
            if not dry_run:
                st.delete(key)
                st.delete(names.build_ivf_key(stem))
            continue
        protected |= uuids
    return protected


def _selected_indexes(root: Any, name: Optional[str]) -> List[str]:
    """The committed index names a maintenance call looks at: all of them, or
    just ``name``, which must be one (IndexNotFoundError naming the ones there
    are)."""
    index_names = idx.list_index_names(root)
    if name is None:
        return index_names
    if name not in index_names:
        raise IndexNotFoundError(f"no index named {name!r}; have {index_names}")
    return [name]


def verify_report(uri: Any, *, index_uri: Optional[PathLike] = None,
                  name: Optional[str] = None,
                  storage_options: Optional[Dict[str, Any]] = None) -> VerifyReport:
    """:func:`verify`, returning the faults together with a summary of each
    index checked (see :class:`VerifyReport`). Same arguments and checks."""
    ds = open_dataset(uri, index_uri, storage_options)
    root = ds.storage
    index_names = _selected_indexes(root, name)
    source_frags = {f.id: f for f in ds.source.fragments()}
    faults: List[str] = []
    notices: List[str] = []
    summary: List[IndexSummary] = []
    for n in index_names:
        for v in idx.manifest_versions(root, n):
            try:
                version = idx.read_manifest(root, n, v)["version"]
            except (BitshardError, OSError) as err:
                faults.append(f"index {n!r}: manifest v{v}: {err}")
                continue
            if version != v:  # a manifest copied or renamed to another version's name
                faults.append(f"index {n!r}: manifest v{v}: "
                              f"{root.path(names.manifest_key(n, v))} says version {version!r}")
        try:
            doc = idx.read_manifest(root, n)
        except (BitshardError, OSError):
            continue  # reported above
        entries = doc.get("segments", [])
        summary.append(IndexSummary(name=n, version=doc["version"], segments=len(entries),
                                    rows=sum(e.get("num_rows", 0) for e in entries)))
        first: Optional[SegmentHandle] = None
        owner: Dict[int, str] = {}
        claimed = [idx.handle_from_json(root, n, doc["column"], e) for e in entries]
        try:
            stale = identity.stale_fragments(ds.source, doc, claimed)
        except (BitshardError, OSError) as err:
            faults.append(f"index {n!r}: cannot compare fragment identities: {err}")
            stale = {}
        for fid, why in sorted(stale.items()):
            notices.append(f"index {n!r}: fragment {fid} is stale ({why}): searched exactly "
                           f"until re-indexed ({_REINDEX})")
        moved, lost, compactions = _gone_fragments(ds, claimed, source_frags, faults, n)
        top: Dict[str, Any] = {k: doc.get(k) for k in (
            "metric", "num_bits", "dimension", "rotation_fingerprint", "ivf_fingerprint")}
        for e in entries:
            path = idx.segment_path(root, e["uuid"])
            where = f"index {n!r} segment {e['uuid']} ({path})"
            try:
                o = OpenSegment.of(root, e["uuid"])
            except (BitshardError, OSError) as err:
                faults.append(f"index {n!r}: {err}")
                continue
            # The open checks the header, artifacts, fragment table and
            # directory; every partition and the whole-file rules are
            # checked here.
            try:
                o.native.verify()
            except BitshardError as err:
                faults.append(f"index {n!r}: {path}: {err}")
            h = o.handle(root.root, n)
            space = CodeSpace.of(h)
            claims = idx.handle_from_json(root, n, doc["column"], e)
            for field in ("uuid", "fragment_ids", "num_rows"):
                a, b = getattr(claims, field), getattr(h, field)
                if (list(a) if field == "fragment_ids" else a) != \
                        (list(b) if field == "fragment_ids" else b):
                    faults.append(f"{where}: the manifest says {field}={a!r}, the file has {b!r}")
            for d in CodeSpace.of(claims).differences(space):
                faults.append(f"{where}: the manifest says {d.field}={d.ours!r}, "
                              f"the file has {d.theirs!r}")
            # The manifest's top-level fields (absent ones are not checked;
            # its column is the claim compared just above).
            for d in space.differences(CodeSpace(column=h.column, **top)):
                if d.theirs is not None:
                    faults.append(f"{where}: {d.field} is {d.ours!r}, the index's is "
                                  f"{d.theirs!r}")
            if first is None:
                first = h
            else:
                for d in space.differences(CodeSpace.of(first)):
                    faults.append(f"{where}: {d.label} differs from segment {first.uuid}: "
                                  f"{d.ours!r} vs {d.theirs!r}")
            try:  # the file's fingerprints are those of the manifest's records
                idx.check_identity_fingerprints(claims, o, "the manifest")
            except CorruptIndexError as err:
                faults.append(f"index {n!r}: {err}")
            recorded = {i.id: i.rows for i in claims.identities}
            for fid, rows in o.native.fragments():
                fid, rows = int(fid), int(rows)
                if fid in owner:
                    faults.append(f"{where}: fragment {fid} is also in segment {owner[fid]}")
                owner.setdefault(fid, h.uuid)
                if fid in recorded and recorded[fid] != rows:
                    faults.append(f"{where}: the manifest records {recorded[fid]} rows for "
                                  f"fragment {fid}, the file has {rows}")
                if fid not in source_frags and fid in moved:
                    # Rewritten by a compaction whose history is still there:
                    # its codes can follow the rows (bitshard.upkeep).
                    notices.append(f"{where}: fragment {fid} was rewritten by compact_files "
                                   f"(version(s) {compactions}) and is remappable: "
                                   f"optimize_indices moves its codes to the rows' new "
                                   f"addresses without re-encoding them")
                elif fid not in source_frags and fid in lost:
                    notices.append(f"{where}: fragment {fid} is not in the source and cannot "
                                   f"be remapped ({lost[fid]}); optimize_indices re-encodes "
                                   f"its rows where they are now")
                elif fid not in source_frags:
                    # Compacted away or deleted since the build: its rows are
                    # never returned; not a fault.
                    notices.append(f"{where}: fragment {fid} is not in the source (compacted "
                                   f"or deleted since the build); run optimize_indices")
                elif fid in stale:
                    pass  # a notice above: its data changed, so may its rows
                elif source_frags[fid].physical_rows != rows:
                    faults.append(f"{where}: fragment {fid} has {rows} rows in the segment, "
                                  f"{source_frags[fid].physical_rows} in the source")
        uncovered = sorted(set(source_frags) - set(idx.iter_fragments(claimed)))
        if uncovered:
            shown = uncovered if len(uncovered) <= 20 else uncovered[:20] + ["..."]
            notices.append(f"index {n!r}: {len(uncovered)} fragment(s) not indexed (searched "
                           f"exactly): {shown}; {_REINDEX}")
    return VerifyReport(faults=faults, indexes=summary, notices=notices)


def _gone_fragments(ds: Any, claimed: List[SegmentHandle], source_frags: Dict[int, Any],
                    faults: List[str], name: str) -> Any:
    """For the fragments an index covers that are no longer in the source:
    those a compaction moved and ``optimize_indices`` can remap (a set),
    those it cannot, with the reason (a dict), and the compactions' versions.
    Only Lance has compactions; nothing is read but the Lance history."""
    gone = set(idx.iter_fragments(claimed)) - set(source_frags)
    if not gone or ds.source.kind != "lance":
        return set(), {}, []
    from .upkeep import follow_compactions  # noqa: PLC0415

    try:
        hist, lost = follow_compactions(ds, claimed, gone, claimed[0].column)
    except (BitshardError, OSError) as err:
        faults.append(f"index {name!r}: cannot follow the compaction history: {err}")
        return set(), {}, []
    return set(hist.moves), lost, list(hist.compactions)


def upgrade_index(uri: Any, *, index_uri: Optional[PathLike] = None,
                  name: Optional[str] = None,
                  storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
    """Rewrite every segment of an older format (version 2) of the
    committed indexes (or of ``name``) in the current format, and commit
    the index with the new segments in their place.

    Nothing is re-encoded: each old segment is opened (converted in memory)
    and written again by a one-input merge under a new uuid, which gives
    the file a build of the same rows would (docs/format.md, "Versions").
    The answers of a search do not change. The old files stay until
    ``cleanup`` removes them.

    Args:
        uri: the data (path/URI or :class:`Dataset`).
        index_uri: the index root, when it is not the data's default.
        name: upgrade only this index.
        storage_options: connection settings of an object-store index root.

    Returns:
        ``{index name: segments rewritten}`` for every index looked at (0:
        already current, no new version committed).

    Raises:
        IndexNotFoundError: ``name`` is given and no such index is committed.
        CommitConflictError: another writer committed the index meanwhile.
    """
    ds = open_dataset(uri, index_uri, storage_options)
    root = ds.storage
    index_names = _selected_indexes(root, name)
    done: Dict[str, int] = {}
    for n in index_names:
        doc = idx.read_manifest(root, n)
        handles = idx.committed_segments(root, n, doc["version"])
        new = idx.upgrade_segments(handles, root)
        changed = sum(a.uuid != b.uuid for a, b in zip(handles, new))
        done[n] = changed
        if changed:
            idx.commit(root, n, doc["column"], new, mode="replace",
                       source_version=doc.get("source_version"),
                       expected_version=doc["version"])
    return done


def verify(uri: Any, *, index_uri: Optional[PathLike] = None,
           name: Optional[str] = None,
           storage_options: Optional[Dict[str, Any]] = None) -> List[str]:
    """Re-read every segment of every committed index and report faults.

    Checks, for the latest manifest of each index (or of ``name``): every
    manifest version passes its checksum and holds the version its file
    name says (``vNNNNNNNN.json``); every segment file exists, opens and
    verifies whole (the C reader checks every checksum and bound, every
    partition, and that no row is in two partitions); the manifest's
    claims (fragments, rows, bits, metric, dimension, fingerprints, column)
    match the file; all segments share one code space; no fragment is in two
    segments; a fragment still in the source whose identity is current has
    the source's row count. Fragments that are stale, gone from the source
    or not indexed are not faults (see :class:`VerifyReport`, ``notices``).

    Args:
        uri: the data (path/URI or :class:`Dataset`).
        index_uri: the index root, when it is not the data's default.
        name: verify only this index.
        storage_options: connection settings of an object-store index root.

    Returns:
        One human-readable line per fault, naming the index and the file;
        empty if everything checks out (``verify_report(...).faults``).

    Raises:
        IndexNotFoundError: ``name`` is given and no such index is committed.
    """
    return verify_report(uri, index_uri=index_uri, name=name,
                         storage_options=storage_options).faults
