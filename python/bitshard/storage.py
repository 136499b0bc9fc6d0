"""Where an index lives: a local directory or an object-store prefix.

Everything under an index root is addressed by a key relative to the root
(``segments/<uuid>.bsseg``, ``indices/<name>/v00000001.json``, ...), so the
layout is the same on every backend. :meth:`Storage.for_uri` picks the
backend:

- :class:`LocalStorage` for a filesystem path (or ``file://``): ``os`` calls,
  ``mmap`` to read segments, ``os.link`` of a finished temp file to create a
  manifest exclusively. This is bitshard's original behaviour, byte for byte.
- :class:`ObjectStorage` for ``s3://bucket/prefix`` (AWS S3 and S3-compatible
  stores): ``pyarrow.fs.S3FileSystem`` moves the bytes (listing, reads,
  multipart uploads of segment files); manifests are created with a
  conditional PUT (``If-None-Match: *``) through boto3, which pyarrow cannot
  send; deletes go through boto3 too (pyarrow's ``delete_file`` leaves
  directory-marker objects behind).

Connection settings come from ``storage_options`` (see
:data:`STORAGE_OPTION_KEYS`) or the usual environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``); credentials not
given either way come from the AWS SDKs' default chain (``~/.aws``, instance
roles). ``cache_dir`` (or ``BITSHARD_CACHE_DIR``) keeps downloaded segment
files on local disk, keyed by root and uuid, and maps them instead of
holding them in memory. A process remembers the options it was given for a root, so a segment
URI under that root (a :class:`~bitshard.index.SegmentHandle` carries only
the root) opens with the same settings.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import threading
import time
import uuid as uuid_mod
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Type, Union
from urllib.parse import urlparse

import numpy as np

from .errors import (BitshardError, CorruptIndexError, InvalidInputError, MissingFileError,
                     StorageError)
from .names import PROBE_PREFIX, check_key, check_resolved_inside, local_path

__all__ = [
    "Storage",
    "LocalStorage",
    "ObjectStorage",
    "FileEntry",
    "is_object_uri",
    "join_uri",
    "STORAGE_OPTION_KEYS",
]

#: The alignment the C segment reader requires of a segment's buffer.
SEGMENT_ALIGN = 64

#: Accepted ``storage_options`` keys, by meaning. The first name of each
#: entry is pyarrow's; the others are the names boto3, Lance and
#: ``object_store`` use, so a Lance ``storage_options`` dict works as is.
STORAGE_OPTION_KEYS: Dict[str, Tuple[str, ...]] = {
    "endpoint_override": ("endpoint_override", "endpoint_url", "endpoint", "aws_endpoint",
                          "aws_endpoint_url"),
    "access_key": ("access_key", "aws_access_key_id", "access_key_id"),
    "secret_key": ("secret_key", "aws_secret_access_key", "secret_access_key"),
    "session_token": ("session_token", "aws_session_token", "token"),
    "region": ("region", "aws_region", "region_name"),
    "allow_http": ("allow_http", "aws_allow_http"),
    "virtual_hosted_style_request": ("virtual_hosted_style_request",
                                     "aws_virtual_hosted_style_request"),
    # bitshard's own: keep downloaded segments in this directory (see
    # ObjectStorage.open_segment); also the BITSHARD_CACHE_DIR variable.
    "cache_dir": ("cache_dir",),
    # bitshard's own: bytes of fetched partitions a Dataset keeps in memory
    # when segments are read by range (bitshard.ranged); also the
    # BITSHARD_PARTITION_CACHE_BYTES variable.
    "partition_cache_bytes": ("partition_cache_bytes",),
    # bitshard's own: the most bytes of segment files cache_dir holds (least
    # recently used removed first); also BITSHARD_CACHE_DIR_MAX_BYTES.
    "cache_dir_max_bytes": ("cache_dir_max_bytes",),
}
_ALIASES = {alias: key for key, names in STORAGE_OPTION_KEYS.items() for alias in names}
_OBJECT_SCHEMES = ("s3",)


def is_object_uri(x: Any) -> bool:
    """True for an object-store URI such as ``s3://bucket/prefix``."""
    if not isinstance(x, str) or "://" not in x:
        return False
    return urlparse(x).scheme.lower() not in ("", "file")


def join_uri(root: str, *parts: str) -> str:
    """``root/part/part``, for object-store URIs (always ``/``)."""
    return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts if p])


class FileEntry(NamedTuple):
    """One child of a listed directory (or common prefix)."""

    name: str          #: the child's name (no slashes)
    is_dir: bool       #: a directory / common prefix (a link to one counts)
    size: int          #: bytes (0 for directories)
    mtime: Optional[float]  #: modification time, seconds since the epoch
    is_link: bool = False   #: a symbolic link (local roots; never deleted by bitshard)


def _normalize_options(options: Optional[Dict[str, Any]], strict: bool = True) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for k, v in (options or {}).items():
        key = _ALIASES.get(str(k).lower())
        if key is None:
            if strict:
                raise InvalidInputError(
                    f"unknown storage option {k!r}; known: "
                    f"{sorted(n for names in STORAGE_OPTION_KEYS.values() for n in names)}")
            continue
        if v is None:
            continue
        out[key] = str(v)
    return out


# =========================================================================
# Backend errors: the one place they become BitshardErrors
# =========================================================================

# Words in a pyarrow S3 error's message (pyarrow raises a plain OSError that
# carries the AWS error name) and botocore error codes, by what happened.
_MISSING_WORDS = ("NO_SUCH_KEY", "NoSuchKey", "NO_SUCH_UPLOAD", "NoSuchUpload",
                  "Path does not exist")
_MISSING_CODES = ("NoSuchKey", "NoSuchUpload", "404", "NotFound")
_DENIED_WORDS = ("ACCESS_DENIED", "AccessDenied", "HTTP status 403")
_DENIED_CODES = ("AccessDenied", "403", "Forbidden", "AllAccessDisabled")
_BACKEND_MODULES = ("botocore", "boto3", "s3transfer", "urllib3")


def _backend_kind(e: BaseException) -> Optional[str]:
    """What a storage backend's exception means: ``"missing"`` (the file or
    object is not there), ``"denied"`` (permission), ``"failed"`` (anything
    else the backend reports: I/O, network, throttling, a read cut short);
    None for an exception that is not the backend's (a BitshardError, a bug)."""
    if isinstance(e, BitshardError):
        return None
    if type(e).__module__.split(".")[0] in _BACKEND_MODULES:
        resp = getattr(e, "response", None) or {}
        code = str(resp.get("Error", {}).get("Code", ""))
        status = str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _MISSING_CODES or status == "404":
            return "missing"
        if code in _DENIED_CODES or status == "403":
            return "denied"
        return "failed"
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, PermissionError):
        return "denied"
    if isinstance(e, OSError):
        text = str(e)
        if any(w in text for w in _MISSING_WORDS):
            return "missing"
        if any(w in text for w in _DENIED_WORDS):
            return "denied"
        return "failed"
    return None


def backend_error(path: str, verb: str, e: BaseException) -> BitshardError:
    """The BitshardError for backend exception ``e`` raised while bitshard
    was to ``verb`` ("read", "write", "list", "delete", ...) ``path``:
    MissingFileError (also a FileNotFoundError) when it is not there,
    StorageError (also an OSError) otherwise; the message names the path,
    the operation and the backend's own message."""
    err = _backend_error(path, verb, e)
    err.backend_error = e  # type: ignore[attr-defined]  # the original, for callers' own wording
    return err


def _backend_error(path: str, verb: str, e: BaseException) -> BitshardError:
    kind = _backend_kind(e)
    detail = f"{type(e).__name__}: {e}"
    if any(w in str(e) for w in ("NO_SUCH_UPLOAD", "NoSuchUpload")):
        return StorageError(
            f"cannot {verb} {path}: its multipart upload was aborted while it ran (by cleanup "
            f"with an age shorter than the upload takes, or by a bucket lifecycle rule); "
            f"write it again ({detail})")
    if kind == "missing":
        return MissingFileError(f"cannot {verb} {path}: it does not exist ({detail})")
    if kind == "denied":
        return StorageError(f"cannot {verb} {path}: permission denied ({detail})")
    return StorageError(f"cannot {verb} {path}: the storage backend failed ({detail})")


def missing_segment(path: str) -> MissingFileError:
    """The error for a segment file a manifest or a handle names but the
    root no longer holds."""
    return MissingFileError(
        f"segment file is missing: {path} (a manifest or a handle names it, but it was removed: "
        f"by hand, or by cleanup with an age shorter than a writer's write-to-commit time; "
        f"refresh() (or reopen the dataset) and rerun: a newer index version may no longer "
        f"name it; `bitshard verify` says whether the latest version is damaged; an "
        f"uncommitted segment must be written again)")


@contextmanager
def backend_errors(path: str, verb: str, keep: Tuple[Type[BaseException], ...] = (),
                   segment: bool = False) -> Iterator[None]:
    """Turn what a storage backend raises in the block into a BitshardError
    (:func:`backend_error`; :func:`missing_segment` for a segment file when
    ``segment``). BitshardErrors and the ``keep`` classes (a contract such
    as create_exclusive's FileExistsError) pass unchanged."""
    try:
        yield
    except keep:
        raise
    except Exception as e:  # noqa: BLE001 - classified; anything else is re-raised
        kind = _backend_kind(e)
        if kind is None:
            raise
        if segment and kind == "missing":
            raise missing_segment(path) from None
        raise backend_error(path, verb, e) from None


class Storage:
    """An index root on some backend; keys are relative to the root.

    Every method turns what its backend raises (``OSError`` and its
    subclasses, pyarrow's S3 errors, botocore's) into a BitshardError naming
    the path and the operation (:func:`backend_error`): ``MissingFileError``
    (a ``CorruptIndexError`` and a ``FileNotFoundError``) for a file that is
    not there, ``StorageError`` (an ``OSError``) for anything else. The
    documented exceptions (``FileNotFoundError`` of :meth:`read_bytes`,
    ``FileExistsError`` of :meth:`create_exclusive`) are such errors or pass
    as they are, so no backend error reaches a caller raw.
    """

    #: The root as given to :meth:`for_uri` (a path, or ``s3://bucket/prefix``).
    root: str
    #: True for a local filesystem root.
    is_local: bool

    # ---------------------------------------------------------- construction

    @staticmethod
    def for_uri(uri: Union[str, "os.PathLike[str]", "Storage"],
                storage_options: Optional[Dict[str, Any]] = None) -> "Storage":
        """The storage of an index root.

        Args:
            uri: a local path, ``file://`` URI, or ``s3://bucket/prefix``.
            storage_options: connection settings for an object store (keys in
                :data:`STORAGE_OPTION_KEYS`); ``None`` uses the options this
                process last saw for the root (or a root above it), else the
                environment.
        """
        if isinstance(uri, Storage):
            return uri
        text = os.fspath(uri)
        if not is_object_uri(text):
            if storage_options:
                raise InvalidInputError(
                    f"storage_options apply to object-store index roots, not to {text!r}")
            if text.startswith("file://"):
                text = urlparse(text).path
            return LocalStorage(text)
        scheme = urlparse(text).scheme.lower()
        if scheme not in _OBJECT_SCHEMES:
            raise InvalidInputError(
                f"unsupported index URI scheme {scheme!r} in {text!r}: indexes live on a local "
                f"path or on s3:// (AWS S3 or an S3-compatible store: MinIO, Ceph, R2, GCS "
                f"through its S3 endpoint, ...)")
        root = text.rstrip("/")
        if storage_options is None:
            opts = _registry_lookup(root)
        else:
            opts = _normalize_options(storage_options)
            _registry_add(root, opts)
        return ObjectStorage(root, opts)

    # -------------------------------------------------------------- the API

    def path(self, key: str) -> str:
        """The full path or URI of ``key`` (for messages and handles)."""
        raise NotImplementedError

    def list(self, prefix: str) -> List[FileEntry]:
        """The children of directory ``prefix`` (empty if it does not exist)."""
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        """The whole object; FileNotFoundError if it does not exist."""
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace ``key`` atomically (readers see old or new, whole)."""
        raise NotImplementedError

    def write_file(self, local_path: str, key: str) -> None:
        """Move a finished local file to ``key`` (the local file is removed)."""
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        """Remove ``key``; False if it did not exist."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def mtime(self, key: str) -> float:
        """Modification time (seconds since the epoch); FileNotFoundError if absent."""
        raise NotImplementedError

    def create_exclusive(self, key: str, data: bytes) -> None:
        """Create ``key`` holding ``data`` whole, or raise FileExistsError if it
        exists: of writers racing for one key exactly one succeeds."""
        raise NotImplementedError

    def open_segment(self, key: str) -> Any:
        """A read-only, 64-byte aligned buffer holding the whole file.

        Raises CorruptIndexError if the file is missing or empty.
        """
        raise NotImplementedError

    #: Segments are read by range (see ObjectStorage.ranged_reads).
    ranged_reads = False
    #: The ``partition_cache_bytes`` storage option (ObjectStorage).
    partition_cache_bytes: Optional[int] = None

    def open_ranged(self, key: str) -> Tuple[int, Any]:
        """``(size, handle)`` of segment ``key`` for :meth:`read_range`
        (backends with :attr:`ranged_reads`)."""
        raise NotImplementedError

    def read_range(self, key: str, offset: int, size: int, handle: Any = None) -> np.ndarray:
        """Bytes ``[offset, offset + size)`` of ``key``, 64-byte aligned
        (backends with :attr:`ranged_reads`)."""
        raise NotImplementedError

    def evict(self, key: str) -> bool:
        """Drop a locally cached copy of ``key`` (True if there was one)."""
        return False

    def is_cached_copy(self, key: str) -> bool:
        """True when :meth:`open_segment` of ``key`` maps a local cache file
        (which the reader then verifies whole: a damaged copy is evicted and
        fetched again, rather than found later by a search)."""
        return False

    @contextmanager
    def segment_target(self, key: str) -> Iterator[Tuple[str, bool]]:
        """Where the C writer should write the file of ``key``, as ``(path,
        upload)``, for the duration of the block; if ``upload`` the caller
        passes the finished file to :meth:`write_file` inside the block. The
        writer's temp file (or upload directory) is held as a live writer's
        while the block runs, so cleanup leaves it."""
        raise NotImplementedError
        yield  # pragma: no cover

    def delete_temp(self, key: str) -> bool:
        """Remove the temp file ``key`` a writer left, unless a live writer
        still holds it (local roots: its lock; an object store has none and
        writes no temp objects); True if removed."""
        return self.delete(key)

    def remove_empty_dir(self, prefix: str) -> None:
        """Remove directory ``prefix`` if it is empty (no-op on object stores)."""

    @contextmanager
    def commit_lock(self, exclusive: bool) -> Iterator[None]:
        """Held shared by a commit, from checking its segment files to creating
        its manifest, and exclusive by ``cleanup``, from reading the manifests
        to its last delete: so cleanup never removes a segment between a
        commit's check and its manifest (a committed version naming a deleted
        file). Commits do not exclude each other. A local root locks its
        directory (``flock``); an object store has no lock, so there cleanup
        must keep an age longer than any writer's write-to-commit time
        (docs/distributed.md)."""
        yield

    def __eq__(self, other: Any) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> Any:
        return (self.root,)


# =========================================================================
# Local directories
# =========================================================================


def _tree_error(root: str, path: str, action: str) -> CorruptIndexError:
    """The error for ``path`` (under ``root``) that cannot be ``action``
    ("read", "listed", "written") because the index root's tree has a file
    where a directory belongs, or a directory where a file belongs: names
    what is in the way, instead of the operating system's bare errno."""
    rel = os.path.relpath(path, root)
    cur = root
    for part in [] if rel == os.curdir else rel.split(os.sep):
        cur = os.path.join(cur, part)
        if cur != path and os.path.lexists(cur) and not os.path.isdir(cur):
            return CorruptIndexError(
                f"{path} cannot be {action}: {cur} is a file, where the index root needs a "
                f"directory (segments/, indices/, indices/<name>/ and builds/ are directories)")
    if os.path.isdir(path):
        return CorruptIndexError(
            f"{path} cannot be {action}: it is a directory, where the index root needs a file")
    return CorruptIndexError(
        f"{path} cannot be {action}: it is a file, where the index root needs a directory "
        f"(segments/, indices/, indices/<name>/ and builds/ are directories)")


def _fcntl() -> Any:
    """The fcntl module (POSIX), or None where there is none."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only

        return fcntl
    except ImportError:
        return None


# A local writer's temp file (a segment's ``<uuid>.bsseg.tmp``, a manifest's
# or a build state's ``<name>.<token>.tmp``) is created exclusively and held
# with an exclusive flock from its creation until it is renamed into place or
# removed: the kernel's proof that its writer is alive (it drops the lock when
# the process dies, even by SIGKILL). cleanup removes a temp file only after
# taking that lock itself (remove_dead_temp), so it never removes a live
# writer's, however short its age.


def _create_locked(path: str) -> int:
    """Create ``path`` exclusively, without following a link planted at the
    name, and hold an exclusive flock on it; returns the descriptor (closing
    it releases the lock). A cleanup that removed the name between the
    create and the lock (it took the lock first) makes us create it again."""
    fcntl = _fcntl()
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        fd = os.open(path, flags, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock: the age rule only
            _warn_no_lock(os.path.dirname(path), e)
            return fd
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def remove_dead_temp(path: str) -> bool:
    """Remove the local temp file ``path`` if no live writer holds it (see
    :func:`_create_locked`); True if removed. The name must still be the
    file locked when it is removed (a writer may have renamed it, and
    another created the name again)."""
    fcntl = _fcntl()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its writer is alive
            except OSError as e:  # no flock here: the age rule only
                _warn_no_lock(os.path.dirname(path), e)
        try:
            if not os.path.samestat(os.fstat(fd), os.lstat(path)):
                return False
        except FileNotFoundError:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> int:
    """Create the temp file ``path`` locked (:func:`_create_locked`), write
    ``data`` and flush it to disk before it is renamed or linked; returns the
    descriptor, which holds the lock until the caller closes it. A symbolic
    link planted at the (temp) name is not written through."""
    fd = _create_locked(path)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(path)
        os.close(fd)
        raise
    return fd


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class LocalStorage(Storage):
    """An index root on a local (or shared, POSIX) filesystem.

    Symbolic links: the root itself may be one. Below it, a read follows a
    link only if the resolved path stays under the resolved root (else
    CorruptIndexError); a write or delete checks that the file's directory
    resolves under the root, and :meth:`delete` removes only regular files,
    never a link or what it points to (docs/distributed.md, "Symbolic links").
    """

    is_local = True

    def __init__(self, root: str) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def __reduce__(self) -> Any:
        return (LocalStorage, (self.root,))

    def path(self, key: str) -> str:
        # names.local_path refuses a key that could leave the root.
        return local_path(self.root, key)

    def _read_path(self, key: str) -> str:
        """The path of ``key`` for reading: links resolved must stay inside."""
        path = self.path(key)
        check_resolved_inside(self.root, path)
        return path

    def _make_parent(self, path: str) -> None:
        """Create ``path``'s directory (and its parents) if absent."""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise _tree_error(self.root, path, "written") from None

    def _write_path(self, key: str) -> str:
        """The path of ``key`` for creating, replacing or removing: its
        directory (links resolved) must be inside the root."""
        path = self.path(key)
        check_resolved_inside(self.root, os.path.dirname(path))
        return path

    def list(self, prefix: str) -> List[FileEntry]:
        d = self.path(prefix)
        with backend_errors(d, "list"):
            try:
                check_resolved_inside(self.root, d)
                names = os.listdir(d)
            except FileNotFoundError:
                return []
            except NotADirectoryError:
                if not prefix:  # the root itself is a file: no index root here
                    return []
                raise _tree_error(self.root, d, "listed") from None
            out = []
            for n in names:
                p = os.path.join(d, n)
                link = False  # a name removed before lstat (a racing writer's temp file)
                try:
                    lst = os.lstat(p)
                    link = stat.S_ISLNK(lst.st_mode)
                    st = os.stat(p) if link else lst
                except FileNotFoundError:  # gone, or a dangling link
                    if not link:
                        continue
                    st = lst
                is_dir = stat.S_ISDIR(st.st_mode)
                out.append(FileEntry(n, is_dir, 0 if is_dir else st.st_size, st.st_mtime, link))
            return sorted(out)

    def read_bytes(self, key: str) -> bytes:
        path = self._read_path(key)
        with backend_errors(path, "read"):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except (IsADirectoryError, NotADirectoryError):
                raise _tree_error(self.root, path, "read") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        with backend_errors(path, "write"):
            self._make_parent(path)
            self._write_path(key)
            # A fresh name, created exclusively and locked: nothing planted
            # there is written through, and cleanup leaves it while we live.
            tmp = f"{path}.{uuid_mod.uuid4().hex}.tmp"
            for attempt in range(3):
                try:
                    fd = _write_synced(tmp, data)
                    break
                except FileNotFoundError:
                    # builds/ removed as empty by a build that just finished
                    # (remove_empty_dir) between our makedirs and our create.
                    if attempt == 2 or os.path.isdir(os.path.dirname(path)):
                        raise
                    self._make_parent(path)
            try:
                try:
                    os.replace(tmp, path)
                except IsADirectoryError:
                    raise _tree_error(self.root, path, "written") from None
            except BaseException:
                _unlink_quietly(tmp)
                raise
            finally:
                os.close(fd)

    def write_file(self, local_path: str, key: str) -> None:
        path = self.path(key)
        if os.path.abspath(local_path) != os.path.abspath(path):
            with backend_errors(path, "write"):
                self._make_parent(path)
                self._write_path(key)
                try:
                    os.replace(local_path, path)
                except IsADirectoryError:
                    raise _tree_error(self.root, path, "written") from None

    def delete(self, key: str) -> bool:
        path = self._write_path(key)
        with backend_errors(path, "delete"):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return False
            if not stat.S_ISREG(mode):
                raise CorruptIndexError(
                    f"refusing to delete {path}: not a regular file (a symbolic link or a "
                    f"directory); bitshard deletes only files it wrote")
            try:
                os.remove(path)
                return True
            except FileNotFoundError:
                return False

    def delete_temp(self, key: str) -> bool:
        path = self._write_path(key)
        with backend_errors(path, "delete"):
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    return False  # never a link or a directory
            except FileNotFoundError:
                return False  # renamed into place (or removed) since it was listed
            return remove_dead_temp(path)

    def exists(self, key: str) -> bool:
        return os.path.exists(self._read_path(key))

    def mtime(self, key: str) -> float:
        path = self._read_path(key)
        with backend_errors(path, "read the modification time of"):
            return os.path.getmtime(path)

    def create_exclusive(self, key: str, data: bytes) -> None:
        final = self.path(key)
        with backend_errors(final, "create", keep=(FileExistsError,)):
            self._make_parent(final)
            self._write_path(key)
            if os.path.isdir(final):  # not a version another writer committed
                raise _tree_error(self.root, final, "written")
            tmp = f"{final}.{uuid_mod.uuid4().hex}.tmp"
            fd = _write_synced(tmp, data)
            try:
                os.link(tmp, final)  # atomic, and fails if the key exists
            finally:
                _unlink_quietly(tmp)
                os.close(fd)

    def open_segment(self, key: str) -> Any:
        path = self.path(key)
        with backend_errors(path, "read", segment=True):
            try:
                check_resolved_inside(self.root, path)
                f = open(path, "rb")
            except (IsADirectoryError, NotADirectoryError):
                raise _tree_error(self.root, path, "read") from None
            with f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise CorruptIndexError(f"segment file is empty: {path}")
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # page-aligned

    @contextmanager
    def segment_target(self, key: str) -> Iterator[Tuple[str, bool]]:
        path = self.path(key)
        tmp = path + ".tmp"
        with backend_errors(path, "write"):
            self._make_parent(path)
            self._write_path(key)
            # The C writer opens "<path>.tmp" with fopen ("wb": it truncates
            # and writes the file created here, and renames it). Created here
            # exclusively and without following links (a link planted at that
            # name would have fopen write through it), and locked while the
            # writer runs, so cleanup leaves it (remove_dead_temp).
            if os.path.islink(tmp):
                raise CorruptIndexError(
                    f"refusing to write {path}: its temporary file {tmp} is a symbolic link")
            try:
                fd = _create_locked(tmp)
            except FileExistsError:
                # A dead writer's file of this uuid (the uuid may be the caller's).
                if not remove_dead_temp(tmp):
                    raise CorruptIndexError(
                        f"refusing to write {path}: its temporary file {tmp} is held by "
                        f"another live writer of the same segment uuid") from None
                fd = _create_locked(tmp)
        try:
            yield path, False
        finally:
            # The C writer renamed its temp file, or removed it on failure; a
            # failure before it opened the file leaves ours: remove it.
            try:
                if os.path.samestat(os.fstat(fd), os.lstat(tmp)):
                    os.unlink(tmp)
            except OSError:
                pass
            os.close(fd)

    def remove_empty_dir(self, prefix: str) -> None:
        try:
            path = self._write_path(prefix)
            if not os.path.islink(path):
                os.rmdir(path)
        except (OSError, CorruptIndexError):
            pass

    @contextmanager
    def commit_lock(self, exclusive: bool) -> Iterator[None]:
        # flock on the root directory itself: no lock file to leave behind,
        # and the kernel drops the lock when its holder dies (even SIGKILL).
        # Only the taking of the lock is translated: the block's own errors
        # pass through the yield as they are.
        fcntl = _fcntl()
        with backend_errors(self.root, "lock"):
            if not exclusive:
                os.makedirs(self.root, exist_ok=True)  # a first commit creates it anyway
            try:
                fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileNotFoundError:
                fd = -1  # no root, nothing to clean up
            if fd >= 0 and fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                except OSError as e:  # a filesystem without flock (some network mounts)
                    _warn_no_lock(self.root, e)
        try:
            yield
        finally:
            if fd >= 0:
                os.close(fd)  # releases the lock


_NO_LOCK_WARNED: set = set()


def _warn_no_lock(root: str, err: OSError) -> None:
    if root not in _NO_LOCK_WARNED:
        _NO_LOCK_WARNED.add(root)
        import logging  # noqa: PLC0415

        logging.getLogger("bitshard.storage").warning(
            "cannot lock index root %s (%s): cleanup with a short --older-than may remove a "
            "segment a concurrent commit is about to name", root, err)


# =========================================================================
# Object stores (S3 and S3-compatible)
# =========================================================================

_REGISTRY_LOCK = threading.Lock()
_REGISTRY: Dict[str, Dict[str, str]] = {}
_CLIENTS: Dict[Tuple[Any, ...], Any] = {}
_PROBED: Dict[Tuple[Any, ...], bool] = {}


def _registry_add(root: str, opts: Dict[str, str]) -> None:
    with _REGISTRY_LOCK:
        _REGISTRY[root] = dict(opts)


def _registry_lookup(uri: str) -> Dict[str, str]:
    """The options given for ``uri`` or the nearest root above it."""
    with _REGISTRY_LOCK:
        best = None
        for root in _REGISTRY:
            if uri == root or uri.startswith(root + "/"):
                if best is None or len(root) > len(best):
                    best = root
        return dict(_REGISTRY[best]) if best is not None else {}


def _evict_cache_files(cache_dir: str, room: int, keep: str) -> List[str]:
    """Remove segment files of ``cache_dir`` (every root's), least recently
    used first (oldest modification time), until the rest take at most
    ``room`` bytes; ``keep`` is never removed. Removal is an unlink only: a
    reader that mapped a removed file keeps reading its bytes (no SIGBUS).
    Temp files of downloads in progress are not counted or removed. Returns
    the paths removed."""
    files: List[Tuple[int, str, int]] = []
    try:
        roots = os.listdir(cache_dir)
    except FileNotFoundError:
        return []
    for r in roots:
        d = os.path.join(cache_dir, r)
        try:
            names = os.listdir(d)
        except (NotADirectoryError, FileNotFoundError):
            continue
        for name in names:
            if name.endswith(".tmp") or not name.endswith(".bsseg"):
                continue
            p = os.path.join(d, name)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, p, st.st_size))
    total = sum(f[2] for f in files)
    removed = []
    for _, p, n in sorted(files):
        if total <= room:
            break
        if p == keep:
            continue
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        total -= n
        removed.append(p)
    return removed


def _byte_count(name: str, value: Optional[str]) -> Optional[int]:
    """A storage option's byte count (a non-negative integer), or None."""
    if value is None or value == "":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise InvalidInputError(f"{name} must be an integer >= 0, got {value!r}")
    return n


def _aligned_empty(size: int) -> np.ndarray:
    """A uint8 array of ``size`` bytes whose data starts on a 64-byte boundary."""
    raw = np.empty(size + SEGMENT_ALIGN, dtype=np.uint8)
    off = (-raw.ctypes.data) % SEGMENT_ALIGN
    return raw[off:off + size]


class ObjectStorage(Storage):
    """An index root on S3 or an S3-compatible object store.

    Objects are immutable once written except the build state (rewritten
    whole by PUT, which is atomic). Manifests are created with a conditional
    PUT, ``If-None-Match: *``: the store refuses it with 412 if the key
    exists, so of writers racing for a manifest version exactly one lands.
    The writer then reads the manifest back and checks it holds its own
    bytes (on a store that checks the condition and writes in two unlocked
    steps, as moto's server does, the earlier of two racing writers then sees
    the later one's bytes and yields; this narrows that store's race to the
    rare case where the earlier writer's read-back lands before the later
    PUT, it does not close it), and the first exclusive create of a process
    checks once that the store honours the condition at all, refusing to
    commit on a store that ignores it.
    """

    is_local = False

    def __init__(self, root: str, options: Dict[str, str]) -> None:
        u = urlparse(root)
        self.root = root
        self.scheme = u.scheme.lower()
        self.bucket = u.netloc
        if not self.bucket:
            raise InvalidInputError(f"object-store URI {root!r} names no bucket")
        self.prefix = u.path.strip("/")
        self.options = dict(options)
        self._settings = self._resolve_settings(self.options)

    def __repr__(self) -> str:
        return f"ObjectStorage({self.root!r})"

    def __reduce__(self) -> Any:
        # Unpickling registers the options, as for_uri with options does.
        return (Storage.for_uri, (self.root, self.options))

    def _key(self) -> Any:
        return (self.root, tuple(sorted(self.options.items())))

    # ------------------------------------------------------------ settings

    @staticmethod
    def _resolve_settings(opts: Dict[str, str]) -> Dict[str, Any]:
        env = os.environ
        endpoint = opts.get("endpoint_override") or env.get("AWS_ENDPOINT_URL_S3") \
            or env.get("AWS_ENDPOINT_URL")
        region = opts.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        s: Dict[str, Any] = {
            "endpoint": endpoint, "region": region,
            "access_key": opts.get("access_key"), "secret_key": opts.get("secret_key"),
            "session_token": opts.get("session_token"),
            "virtual": str(opts.get("virtual_hosted_style_request", "")).lower()
            in ("1", "true", "yes"),
            "cache_dir": opts.get("cache_dir") or env.get("BITSHARD_CACHE_DIR") or None,
            "partition_cache_bytes": _byte_count(
                "partition_cache_bytes", opts.get("partition_cache_bytes")
                or env.get("BITSHARD_PARTITION_CACHE_BYTES")),
            "cache_dir_max_bytes": _byte_count(
                "cache_dir_max_bytes", opts.get("cache_dir_max_bytes")
                or env.get("BITSHARD_CACHE_DIR_MAX_BYTES")),
        }
        if endpoint and "://" not in endpoint:
            allow_http = str(opts.get("allow_http", "")).lower() in ("1", "true", "yes")
            s["endpoint"] = ("http://" if allow_http else "https://") + endpoint
        if bool(s["access_key"]) != bool(s["secret_key"]):
            raise InvalidInputError("storage_options need both an access key and a secret key")
        return s

    def _client_key(self) -> Tuple[Any, ...]:
        s = self._settings
        return (s["endpoint"], s["region"], s["access_key"], s["secret_key"],
                s["session_token"], s["virtual"])

    @property
    def fs(self) -> Any:
        """The ``pyarrow.fs.S3FileSystem`` (one per settings, per process)."""
        key = ("fs",) + self._client_key()
        fs = _CLIENTS.get(key)
        if fs is None:
            from pyarrow import fs as pafs  # noqa: PLC0415

            s = self._settings
            kw: Dict[str, Any] = {}
            if s["endpoint"]:
                u = urlparse(s["endpoint"])
                kw["endpoint_override"] = u.netloc + u.path.rstrip("/")
                kw["scheme"] = u.scheme or "https"
            region = s["region"]
            if region is None and not s["endpoint"]:
                try:
                    region = pafs.resolve_s3_region(self.bucket)
                except OSError:
                    region = None
            if region:
                kw["region"] = region
            if s["access_key"]:
                kw.update(access_key=s["access_key"], secret_key=s["secret_key"])
                if s["session_token"]:
                    kw["session_token"] = s["session_token"]
            if s["virtual"]:
                kw["force_virtual_addressing"] = True
            fs = pafs.S3FileSystem(**kw)
            _CLIENTS[key] = fs
        return fs

    @property
    def client(self) -> Any:
        """A boto3 S3 client (conditional PUT and delete)."""
        key = ("boto3",) + self._client_key()
        c = _CLIENTS.get(key)
        if c is None:
            try:
                import boto3  # noqa: PLC0415
                from botocore.config import Config  # noqa: PLC0415
            except ImportError:
                raise BitshardError(
                    "indexes on object storage need boto3 (for conditional writes): "
                    "pip install 'bitshard[s3]'") from None
            s = self._settings
            cfg = Config(s3={"addressing_style": "virtual" if s["virtual"] else "auto"},
                         retries={"max_attempts": 5, "mode": "standard"})
            kw: Dict[str, Any] = {"config": cfg}
            if s["endpoint"]:
                kw["endpoint_url"] = s["endpoint"]
            if s["region"]:
                kw["region_name"] = s["region"]
            if s["access_key"]:
                kw.update(aws_access_key_id=s["access_key"],
                          aws_secret_access_key=s["secret_key"],
                          aws_session_token=s["session_token"])
            c = boto3.session.Session().client("s3", **kw)
            _CLIENTS[key] = c
        return c

    # ---------------------------------------------------------------- keys

    # Every key is checked (names.check_key) before it becomes an object
    # name: no component may be empty, "." or "..", which some stores and
    # gateways normalise and which would then leave the index prefix.

    def object_key(self, key: str) -> str:
        """The S3 object key of ``key`` (bucket excluded)."""
        return "/".join(p for p in (self.prefix, check_key(key)) if p)

    def _fs_path(self, key: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, check_key(key)) if p)

    def path(self, key: str) -> str:
        return join_uri(self.root, check_key(key)) if key else self.root

    # ---------------------------------------------------------- operations

    def list(self, prefix: str) -> List[FileEntry]:
        from pyarrow import fs as pafs  # noqa: PLC0415

        sel = pafs.FileSelector(self._fs_path(prefix), allow_not_found=True, recursive=False)
        with backend_errors(self.path(prefix), "list"):
            try:
                infos = self.fs.get_file_info(sel)
            except FileNotFoundError:
                return []
        out = []
        for i in infos:
            name = i.path.rstrip("/").rsplit("/", 1)[-1]
            if not name:
                continue
            is_dir = i.type == pafs.FileType.Directory
            mtime = i.mtime.timestamp() if i.mtime is not None else None
            out.append(FileEntry(name, is_dir, 0 if is_dir else int(i.size or 0), mtime))
        return sorted(out)

    def read_bytes(self, key: str) -> bytes:
        with backend_errors(self.path(key), "read"):
            with self.fs.open_input_stream(self._fs_path(key)) as f:
                return f.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        # A PUT replaces an object whole: readers see the old or the new one.
        with backend_errors(self.path(key), "write"):
            with self.fs.open_output_stream(self._fs_path(key)) as f:
                f.write(data)

    def write_file(self, local_path: str, key: str) -> None:
        # Multipart for large files; the object appears only when complete.
        try:
            with backend_errors(self.path(key), "upload"):
                with open(local_path, "rb") as src, \
                        self.fs.open_output_stream(self._fs_path(key)) as dst:
                    while True:
                        chunk = src.read(16 << 20)
                        if not chunk:
                            break
                        dst.write(chunk)
        finally:
            try:
                os.remove(local_path)
            except FileNotFoundError:
                pass

    def delete(self, key: str) -> bool:
        if not self.exists(key):
            return False
        with backend_errors(self.path(key), "delete"):
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        return True

    def _info(self, key: str) -> Any:
        with backend_errors(self.path(key), "read the metadata of"):
            return self.fs.get_file_info(self._fs_path(key))

    def exists(self, key: str) -> bool:
        from pyarrow import fs as pafs  # noqa: PLC0415

        return self._info(key).type == pafs.FileType.File

    def mtime(self, key: str) -> float:
        from pyarrow import fs as pafs  # noqa: PLC0415

        i = self._info(key)
        if i.type != pafs.FileType.File:
            raise FileNotFoundError(self.path(key))
        return i.mtime.timestamp() if i.mtime is not None else time.time()

    def _conditional_put(self, object_key: str, data: bytes) -> bool:
        """PUT with ``If-None-Match: *``; False if the key exists."""
        from botocore.exceptions import ClientError  # noqa: PLC0415

        delay = 0.05
        for attempt in range(8):
            try:
                self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data,
                                       IfNoneMatch="*")
                return True
            except ClientError as e:
                err = e.response.get("Error", {})
                code = str(err.get("Code", ""))
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code == "PreconditionFailed" or status == 412:
                    return False
                if code == "ConditionalRequestConflict" or status == 409:
                    # Another conditional write to the key is in flight: wait
                    # for it to land (then we get 412) or fail (then we may).
                    time.sleep(delay * (attempt + 1))
                    continue
                if code in ("NotImplemented", "InvalidArgument") or status == 501:
                    raise BitshardError(
                        f"the object store at {self.root} does not support conditional writes "
                        f"(If-None-Match: *), so bitshard cannot commit there atomically: {e}"
                    ) from None
                raise
        raise BitshardError(f"conditional write of {object_key} kept conflicting; retry")

    def _probe_conditional_writes(self) -> None:
        """Once per process and store: a second conditional PUT of one key must
        fail. A store that ignores If-None-Match would let two commits of one
        version both succeed, so bitshard refuses to commit there."""
        pk = (self.bucket,) + self._client_key()
        if _PROBED.get(pk):
            return
        key = self.object_key(f"{PROBE_PREFIX}{uuid_mod.uuid4().hex}")
        try:
            if not self._conditional_put(key, b"1"):
                raise BitshardError(f"conditional-write probe {key} already existed")
            honoured = not self._conditional_put(key, b"2")
        finally:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except Exception:  # best effort
                pass
        if not honoured:
            raise BitshardError(
                f"the object store at {self.root} ignores conditional writes "
                f"(If-None-Match: *): two writers could both commit one index version, so "
                f"bitshard refuses to commit there")
        _PROBED[pk] = True

    def create_exclusive(self, key: str, data: bytes) -> None:
        with backend_errors(self.path(key), "create", keep=(FileExistsError,)):
            self._create_exclusive(key, data)

    def _create_exclusive(self, key: str, data: bytes) -> None:
        self._probe_conditional_writes()
        ok = self._conditional_put(self.object_key(key), data)
        if not ok:
            raise FileExistsError(self.path(key))
        # Read back: a correct store returns our bytes. Anything else means
        # another writer's object is there (a store whose condition check is not
        # atomic with the write); that writer holds the version, not us.
        try:
            got = self.read_bytes(key)
        except FileNotFoundError:
            got = None
        if got != bytes(data):
            raise FileExistsError(self.path(key))

    @property
    def ranged_reads(self) -> bool:  # type: ignore[override]
        """Segments are opened from their prefix and their partitions read
        by range when a search probes them (bitshard.ranged): on an object
        store without a ``cache_dir`` (with one, whole files are cached on
        disk and mapped)."""
        return not self._settings["cache_dir"]

    @property
    def partition_cache_bytes(self) -> Optional[int]:  # type: ignore[override]
        """The ``partition_cache_bytes`` option (or environment variable), or
        None when not given."""
        return self._settings["partition_cache_bytes"]

    def open_ranged(self, key: str) -> Tuple[int, Any]:
        """``(size, handle)`` of segment ``key`` for :meth:`read_range`: one
        HEAD request (pyarrow's random-access file, whose reads are ranged
        GETs and thread-safe; no boto3 is loaded for search).
        MissingFileError (:func:`missing_segment`) when it is not there."""
        path = self.path(key)
        with backend_errors(path, "read", segment=True):
            f = self.fs.open_input_file(self._fs_path(key))
            return int(f.size()), f

    def read_range(self, key: str, offset: int, size: int, handle: Any = None) -> np.ndarray:
        """Bytes ``[offset, offset + size)`` of object ``key`` (one ranged GET,
        through ``handle`` from :meth:`open_ranged` when given) in a read-only,
        64-byte aligned uint8 array. Thread-safe. A short answer (the object
        changed) is CorruptIndexError."""
        buf = _aligned_empty(size)
        if size == 0:
            return buf
        path = self.path(key)
        with backend_errors(path, "read", segment=True):
            f = handle if handle is not None else self.fs.open_input_file(self._fs_path(key))
            data = f.read_at(size, offset)
        got = len(data)
        if got != size:
            raise CorruptIndexError(f"segment file {path} changed while read ({got} of {size} "
                                    f"bytes at offset {offset})")
        buf[:] = np.frombuffer(data, dtype=np.uint8)
        buf.flags.writeable = False
        return buf

    def _cache_path(self, key: str) -> Optional[str]:
        d = self._settings["cache_dir"]
        if not d:
            return None
        root_id = hashlib.sha256(f"{self.root}".encode()).hexdigest()[:16]
        return os.path.join(os.path.expanduser(d), root_id, key.replace("/", "__"))

    def is_cached_copy(self, key: str) -> bool:
        return self._cache_path(key) is not None

    def evict(self, key: str) -> bool:
        p = self._cache_path(key)
        if p is None:
            return False
        try:
            os.remove(p)
            return True
        except FileNotFoundError:
            return False

    def open_segment(self, key: str) -> Any:
        """Download the object into a 64-byte aligned buffer (numpy uint8),
        or, with a ``cache_dir``, into a cache file that is then mapped. The
        caller's C reader verifies every checksum either way; a cached copy
        that fails is evicted (:meth:`evict`) and fetched again."""
        path = self.path(key)
        # A segment removed at any step (listed, then gone: NoSuchKey from
        # any call) is missing_segment; other backend errors StorageError.
        with backend_errors(path, "read", segment=True):
            return self._open_segment(key, path)

    def _open_segment(self, key: str, path: str) -> Any:
        from pyarrow import fs as pafs  # noqa: PLC0415

        info = self.fs.get_file_info(self._fs_path(key))
        if info.type != pafs.FileType.File:
            raise missing_segment(path)
        size = int(info.size or 0)
        if size == 0:
            raise CorruptIndexError(f"segment file is empty: {path}")
        cached = self._cache_path(key)
        bound = self._settings["cache_dir_max_bytes"]
        if cached is not None and (bound is None or size <= bound):
            return self._open_cached(key, cached, size)
        # No cache_dir, or a segment larger than the whole cache: in memory.
        buf = _aligned_empty(size)
        view = buf.data  # a writable memoryview of the aligned bytes
        got = 0
        with self.fs.open_input_file(self._fs_path(key)) as f:
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != size:
            raise CorruptIndexError(f"segment file {path} changed while read "
                                    f"({got} of {size} bytes)")
        buf.flags.writeable = False
        return buf

    def _open_cached(self, key: str, cached: str, size: int) -> Any:
        """Map the cache file of ``key``, downloading it first if absent or of
        another size (segments are immutable: a uuid names one content).

        The file is opened, then mapped through that descriptor, so that a
        concurrent eviction (an unlink) cannot come between: a mapping keeps
        its file's bytes after the unlink. Cache files are never truncated
        or rewritten in place (a new copy is renamed over the name), so a
        reader holding a mapping never sees its bytes change or vanish
        (no SIGBUS). With ``cache_dir_max_bytes``, a download first removes
        the least recently used cache files (by modification time, which
        each open refreshes) until the new one fits."""
        m = self._map_cached(cached, size)
        if m is not None:
            return m
        bound = self._settings["cache_dir_max_bytes"]
        if bound is not None:
            _evict_cache_files(os.path.expanduser(self._settings["cache_dir"]), bound - size,
                               keep=cached)
        d = os.path.dirname(cached)
        os.makedirs(d, exist_ok=True)
        # A reader killed while downloading left its temp file: remove
        # this key's whose reader is dead (a live one holds its lock).
        stem = os.path.basename(cached) + "."
        for n in os.listdir(d):
            if n.startswith(stem) and n.endswith(".tmp"):
                remove_dead_temp(os.path.join(d, n))
        tmp = f"{cached}.{os.getpid()}.{uuid_mod.uuid4().hex[:8]}.tmp"
        fd = _create_locked(tmp)
        try:
            with self.fs.open_input_stream(self._fs_path(key)) as src, \
                    os.fdopen(fd, "wb", closefd=False) as dst:
                while True:
                    chunk = src.read(16 << 20)
                    if not chunk:
                        break
                    dst.write(chunk)
            if os.fstat(fd).st_size != size:
                raise CorruptIndexError(
                    f"segment file {self.path(key)} changed while read")
            # Mapped before the rename: an eviction right after it cannot
            # take the bytes from under this reader.
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # page-aligned
            os.replace(tmp, cached)
        finally:
            _unlink_quietly(tmp)
            os.close(fd)
        return m

    @staticmethod
    def _map_cached(cached: str, size: int) -> Optional[mmap.mmap]:
        """The mapping of cache file ``cached`` when it exists with ``size``
        bytes (its modification time set to now: recently used), else None."""
        try:
            f = open(cached, "rb")
        except FileNotFoundError:
            return None
        with f:
            if os.fstat(f.fileno()).st_size != size:
                return None
            try:
                os.utime(f.fileno())
            except OSError:
                pass  # a read-only cache still serves; only its LRU order suffers
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # page-aligned

    @contextmanager
    def segment_target(self, key: str) -> Iterator[Tuple[str, bool]]:
        with backend_errors(self.path(key), "write"):
            d, fd = make_upload_dir()
        try:
            yield os.path.join(d, key.rsplit("/", 1)[-1]), True
        finally:
            import shutil  # noqa: PLC0415

            shutil.rmtree(d, ignore_errors=True)
            os.close(fd)  # after the directory is gone: reclaimers skip it until then

    def _upload_is_stale(self, u: Dict[str, Any], older_than_seconds: float) -> bool:
        """An incomplete upload is stale when it was started and its newest
        part was uploaded at least ``older_than_seconds`` ago (a live writer
        keeps adding parts; some stores, moto's server among them, report a
        fixed start time, so the parts' times are the better clock)."""
        now = time.time()
        times = [u["Initiated"]] if u.get("Initiated") is not None else []
        try:
            parts = self.client.list_parts(Bucket=self.bucket, Key=u["Key"],
                                           UploadId=u["UploadId"])
        except Exception as e:  # noqa: BLE001 - NoSuchUpload: it finished meanwhile
            if _backend_kind(e) == "missing":
                return False
            raise
        times += [p["LastModified"] for p in parts.get("Parts", []) if p.get("LastModified")]
        return all(now - t.timestamp() >= older_than_seconds for t in times)

    def abort_stale_uploads(self, prefix: str, older_than_seconds: float,
                            dry_run: bool = False) -> List[str]:
        """Abort the incomplete multipart uploads of segment files under
        ``prefix`` started at least ``older_than_seconds`` ago (a writer
        killed while uploading leaves one: invisible to listings, billed by
        the store); returns their keys. A store cannot tell a live upload
        from a dead one, so the age is the only guard, as for segments."""
        out: List[str] = []
        base = self.object_key(prefix).rstrip("/") + "/"
        with backend_errors(self.path(prefix), "list the multipart uploads of"):
            kw: Dict[str, Any] = {"Bucket": self.bucket, "Prefix": base}
            while True:
                page = self.client.list_multipart_uploads(**kw)
                for u in page.get("Uploads", []):
                    name = u["Key"][len(base):]
                    if "/" in name or _parse_segment_name(name) is None:
                        continue
                    if not self._upload_is_stale(u, older_than_seconds):
                        continue
                    if not dry_run:
                        try:
                            self.client.abort_multipart_upload(
                                Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                        except Exception as e:  # noqa: BLE001 - NoSuchUpload: done meanwhile
                            if _backend_kind(e) != "missing":
                                raise
                    out.append(f"{prefix}/{name}")
                if not page.get("IsTruncated"):
                    break
                kw["KeyMarker"] = page.get("NextKeyMarker", "")
                kw["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
        return out


# =========================================================================
# Local upload directories of object-store writers
# =========================================================================

#: The prefix of the local directory where a segment for an object store is
#: written before its upload (in the temp directory, ``$TMPDIR``).
UPLOAD_DIR_PREFIX = "bitshard-upload-"


def _upload_tmp_root() -> str:
    import tempfile  # noqa: PLC0415

    return tempfile.gettempdir()


def make_upload_dir() -> Tuple[str, int]:
    """A fresh ``$TMPDIR/bitshard-upload-*`` directory, held with an
    exclusive flock (the mark of a live writer, as for local temp files):
    ``(path, descriptor)``; closing the descriptor releases it. The first
    call of a process first reclaims the directories dead writers left."""
    import tempfile  # noqa: PLC0415

    global _UPLOAD_DIRS_RECLAIMED
    if not _UPLOAD_DIRS_RECLAIMED:
        _UPLOAD_DIRS_RECLAIMED = True
        try:
            reclaim_upload_dirs()
        except OSError:  # best effort: never fail a write for another's leftovers
            pass
    fcntl = _fcntl()
    while True:
        d = tempfile.mkdtemp(prefix=UPLOAD_DIR_PREFIX)
        try:
            fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            continue  # another process's reclaimer removed it before we held it
        if fcntl is None:
            return d, fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            return d, fd
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(d))
        except FileNotFoundError:
            same = False
        if same:
            return d, fd
        os.close(fd)  # a reclaimer took it between mkdtemp and the lock


_UPLOAD_DIRS_RECLAIMED = False


def reclaim_upload_dirs(older_than_seconds: float = 0, dry_run: bool = False,
                        tmp_root: Optional[str] = None) -> List[str]:
    """Remove the ``$TMPDIR/bitshard-upload-*`` directories of writers that
    died (killed while writing or uploading a segment for an object store),
    older than the age; a live writer's is locked (:func:`make_upload_dir`)
    and left. Returns the removed paths."""
    import shutil  # noqa: PLC0415

    fcntl = _fcntl()
    base = tmp_root or _upload_tmp_root()
    out: List[str] = []
    if fcntl is None:
        return out  # no proof a writer is dead
    try:
        entries = os.listdir(base)
    except FileNotFoundError:
        return out
    now = time.time()
    for n in sorted(entries):
        if not n.startswith(UPLOAD_DIR_PREFIX):
            continue
        d = os.path.join(base, n)
        try:
            fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
                         | getattr(os, "O_NOFOLLOW", 0))
        except OSError:  # gone, a link, not a directory, not ours to open
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer's (or no flock here: no proof)
            st = os.fstat(fd)
            try:
                if not os.path.samestat(st, os.lstat(d)):
                    continue
            except FileNotFoundError:
                continue
            if now - st.st_mtime < older_than_seconds:
                continue
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
            out.append(d)
        finally:
            os.close(fd)
    return out


def _parse_segment_name(name: str) -> Optional[Tuple[str, bool]]:
    from .names import parse_segment_file  # noqa: PLC0415

    return parse_segment_file(name)

