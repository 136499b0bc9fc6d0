"""Names read from disk, and the keys and paths built from them.

Every file under an index root is addressed by a key relative to the root
(``segments/<uuid>.bsseg``, ``indices/<name>/v<NNNNNNNN>.json``,
``builds/<name>.json``, ``builds/<name>.ivf``). The parts of those keys come
from callers and from files an attacker may have written (a manifest's
segment uuids, a build state's uuids, the names a directory listing
returns), so this module is the one place where such a part is checked
before it becomes a key, and where a key is checked before it becomes a
path. Nothing built from on-disk content can then name a file outside the
index root, whatever the file says.

The rules (documented in docs/format.md, "Names and keys"):

- a segment uuid is exactly 32 lowercase hex digits (:data:`UUID_PATTERN`);
- a new index name matches :data:`INDEX_NAME_PATTERN`: 1 to 128 ASCII
  letters, digits, ``_``, ``.`` and ``-``, not starting with ``.`` or ``-``
  and holding no ``..``. An index created before this rule whose name breaks
  it stays readable (with a :class:`LegacyNameWarning`) as long as its name
  is one harmless path component (:func:`is_readable_index_name`);
- a manifest version is an int in 1..:data:`MAX_VERSION`, stored in a file
  named ``v`` + exactly 8 decimal digits + ``.json``;
- a key is ``/``-separated components, none of them empty, ``.`` or ``..``,
  none holding a backslash or a NUL (:func:`check_key`); :func:`local_path`
  also checks that the joined path stays under the root.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional, Tuple, Type

from .errors import BitshardError, CorruptIndexError, InvalidInputError

__all__ = [
    "UUID_PATTERN",
    "INDEX_NAME_PATTERN",
    "MAX_VERSION",
    "LegacyNameWarning",
    "is_uuid",
    "check_uuid",
    "is_index_name",
    "is_readable_index_name",
    "check_index_name",
    "check_version",
    "parse_manifest_file",
    "parse_segment_file",
    "parse_temp_file",
    "segment_key",
    "index_dir_key",
    "manifest_key",
    "build_state_key",
    "build_ivf_key",
    "ivf_artifact_key",
    "check_key",
    "local_path",
    "check_resolved_inside",
]

SEGMENTS_DIR = "segments"
INDICES_DIR = "indices"
BUILDS_DIR = "builds"
#: Shared artifacts: ``artifacts/<ivf fingerprint>.ivf``, the centroids of
#: segments written with external centroids (docs/format.md).
ARTIFACTS_DIR = "artifacts"
SEGMENT_SUFFIX = ".bsseg"

#: A segment uuid: the 16 bytes of the segment's header uuid, as hex.
UUID_PATTERN = r"[0-9a-f]{32}"
#: A new index name. ``..`` is refused separately.
INDEX_NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
#: The largest manifest version (file names hold 8 decimal digits).
MAX_VERSION = 99_999_999
#: The longest legacy index name read (a file name limit on common filesystems).
MAX_LEGACY_NAME_BYTES = 255

_UUID_RE = re.compile(UUID_PATTERN, re.ASCII)
_NAME_RE = re.compile(INDEX_NAME_PATTERN, re.ASCII)
_MANIFEST_FILE_RE = re.compile(r"v([0-9]{8})\.json", re.ASCII)
_SEGMENT_FILE_RE = re.compile(r"([0-9a-f]{32})\.bsseg(\.tmp)?", re.ASCII)
# A writer's temp file: the final name, a dot, a token (a random hex uuid
# now; a process id in older versions), ".tmp".
# The object a store's conditional-write probe writes and deletes at the
# index root (storage.ObjectStorage); a process killed in between leaves it.
PROBE_PREFIX = ".bitshard-probe-"
_PROBE_FILE_RE = re.compile(r"\.bitshard-probe-[0-9a-f]{32}", re.ASCII)
_TEMP_FILE_RE = re.compile(r"(.+)\.([0-9a-f]{1,64})\.tmp", re.ASCII | re.DOTALL)

ErrorType = Type[BitshardError]


class LegacyNameWarning(UserWarning):
    """An existing index's name breaks :data:`INDEX_NAME_PATTERN`: it is
    read, but no new index may be created with such a name."""


# ------------------------------------------------------------------ uuids


def is_uuid(value: object) -> bool:
    """True if ``value`` is a str of exactly 32 lowercase hex digits."""
    return isinstance(value, str) and _UUID_RE.fullmatch(value) is not None


def check_uuid(value: object, what: str, error: ErrorType = CorruptIndexError) -> str:
    """``value`` if it is a segment uuid (32 lowercase hex digits), else
    ``error`` naming ``what`` (the argument, or the file and field) and the value."""
    if not is_uuid(value):
        raise error(f"{what} must be a segment uuid (32 lowercase hex digits), got {value!r}")
    return value  # type: ignore[return-value]


# ------------------------------------------------------------ index names


def is_index_name(value: object) -> bool:
    """True if ``value`` is a valid name for a new index."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None \
        and ".." not in value


def is_readable_index_name(value: object) -> bool:
    """True if ``value`` is a valid index name, or a name older versions
    could create that is still one harmless path component: non-empty, at
    most 255 UTF-8 bytes, not starting with ``.``, without ``/``, ``\\`` or NUL."""
    if not isinstance(value, str) or not value or value.startswith("."):
        return False
    if any(c in value for c in "/\\\0"):
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_LEGACY_NAME_BYTES
    except UnicodeEncodeError:  # lone surrogates (undecodable listing bytes)
        return False


def check_index_name(value: object, what: str = "name", *, new: bool = False,
                     error: ErrorType = InvalidInputError) -> str:
    """``value`` if it may name an index, else ``error`` naming ``what``.

    Args:
        value: the name.
        what: the argument name (or file and field) for the message.
        new: the name is for an index about to be created: it must match
            :data:`INDEX_NAME_PATTERN`. Otherwise a legacy name
            (:func:`is_readable_index_name`) is accepted too.
        error: the exception class raised.
    """
    if is_index_name(value):
        return value  # type: ignore[return-value]
    if new:
        raise error(
            f"{what} must be 1 to 128 characters of A-Z a-z 0-9 _ . - not starting with '.' "
            f"or '-' and without '..' (pattern {INDEX_NAME_PATTERN}), got {value!r}")
    if not is_readable_index_name(value):
        raise error(f"{what} is not a usable index name: {value!r}")
    return value  # type: ignore[return-value]


def warn_legacy_name(name: str, where: str) -> None:
    """Warn that index ``name`` (found at ``where``) breaks the naming rule."""
    if not is_index_name(name):
        warnings.warn(
            f"index name {name!r} ({where}) does not match {INDEX_NAME_PATTERN}: it is read, "
            f"but new indexes may not have such a name; rebuild it under a valid name",
            LegacyNameWarning, stacklevel=3)


# --------------------------------------------------------------- versions


def check_version(value: object, what: str = "version",
                  error: ErrorType = InvalidInputError) -> int:
    """``value`` as an int if it is a manifest version (1..MAX_VERSION)."""
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 1 <= value <= MAX_VERSION:
        raise error(f"{what} must be an integer in 1..{MAX_VERSION}, got {value!r}")
    return int(value)


# ------------------------------------------------------------ file names


def parse_manifest_file(file_name: str) -> Optional[int]:
    """The version of a manifest file name ``vNNNNNNNN.json``, or None for
    any other name (which is then not a manifest)."""
    m = _MANIFEST_FILE_RE.fullmatch(file_name)
    if m is None:
        return None
    v = int(m.group(1))
    return v if v >= 1 else None


def parse_segment_file(file_name: str) -> Optional[Tuple[str, bool]]:
    """``(uuid, is_temp)`` of ``<uuid>.bsseg`` or ``<uuid>.bsseg.tmp`` (a
    writer's unfinished file), or None for any other name."""
    m = _SEGMENT_FILE_RE.fullmatch(file_name)
    if m is None:
        return None
    return m.group(1), m.group(2) is not None


def parse_temp_file(file_name: str) -> Optional[str]:
    """The final name a writer's temp file ``<final>.<hex token>.tmp`` was
    for (``v00000002.json`` for ``v00000002.json.5f0e....tmp``), or None for
    any other name. Storage.write_bytes and create_exclusive write such a
    file and rename or link it into place; a writer killed in between leaves
    it behind."""
    m = _TEMP_FILE_RE.fullmatch(file_name)
    return None if m is None else m.group(1)


def is_probe_file(file_name: str) -> bool:
    """True for the name of a conditional-write probe object
    (``.bitshard-probe-<32 hex>``)."""
    return _PROBE_FILE_RE.fullmatch(file_name) is not None


# ------------------------------------------------------------------- keys


def segment_key(uuid: str, error: ErrorType = CorruptIndexError) -> str:
    """``segments/<uuid>.bsseg``; ``error`` if ``uuid`` is not a uuid."""
    return f"{SEGMENTS_DIR}/{check_uuid(uuid, 'segment uuid', error)}{SEGMENT_SUFFIX}"


def index_dir_key(name: str) -> str:
    """``indices/<name>`` (a new or legacy name; InvalidInputError otherwise)."""
    return f"{INDICES_DIR}/{check_index_name(name, 'index name')}"


def manifest_key(name: str, version: int) -> str:
    """``indices/<name>/v<NNNNNNNN>.json``."""
    v = check_version(version, "manifest version")
    return f"{index_dir_key(name)}/v{v:08d}.json"


def build_state_key(name: str) -> str:
    """``builds/<name>.json``: the state of a build of index ``name``."""
    return f"{BUILDS_DIR}/{check_index_name(name, 'index name')}.json"


def build_ivf_key(name: str) -> str:
    """``builds/<name>.ivf``: the IVF model of a build of index ``name``."""
    return f"{BUILDS_DIR}/{check_index_name(name, 'index name')}.ivf"


def ivf_artifact_key(fingerprint: str) -> str:
    """``artifacts/<fingerprint>.ivf``: the IVF model (``IvfModel.to_bytes``)
    shared by the segments whose header names that IVF fingerprint (32
    lowercase hex digits; CorruptIndexError otherwise: it comes from a file)."""
    if not is_uuid(fingerprint):
        raise CorruptIndexError(
            f"IVF fingerprint must be 32 lowercase hex digits, got {fingerprint!r}")
    return f"{ARTIFACTS_DIR}/{fingerprint}.ivf"


def check_key(key: str) -> str:
    """``key`` if it is a relative key of ``/``-separated components, none
    empty, ``.`` or ``..``, none holding a backslash or NUL ("" is the root).
    Every storage backend calls this before turning a key into a path or an
    object name; a failure means an unchecked name got this far, so it is
    refused as corrupt input rather than followed."""
    if not isinstance(key, str):
        raise CorruptIndexError(f"refusing index-root key {key!r}: not a str")
    if key == "":
        return key
    for part in key.split("/"):
        if part in ("", ".", "..") or "\\" in part or "\0" in part:
            raise CorruptIndexError(
                f"refusing index-root key {key!r}: component {part!r} could leave the index root")
    return key


def local_path(root: str, key: str) -> str:
    """The filesystem path of ``key`` under directory ``root``, checked to
    stay under ``root`` (lexically; symbolic links: :func:`check_resolved_inside`)."""
    check_key(key)
    if not key:
        return root
    path = os.path.join(root, *key.split("/"))
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.abspath(path))
    if not full.startswith(base.rstrip(os.sep) + os.sep):
        raise CorruptIndexError(f"refusing path {path!r}: it is not under the index root {root!r}")
    return path


def check_resolved_inside(root: str, path: str) -> None:
    """CorruptIndexError unless ``path`` (symbolic links resolved) is the
    resolved ``root`` or under it. The root itself may be a link; nothing
    below it may lead out of it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise CorruptIndexError(
            f"{path} resolves to {real}, outside the index root {real_root}: bitshard does not "
            f"follow symbolic links out of the index root")
