"""The exceptions bitshard raises. All derive from :class:`BitshardError`.

The native module maps each C status code to one of these classes, so a
failure deep in the engine surfaces with the engine's message intact.
"""

from __future__ import annotations

__all__ = [
    "BitshardError",
    "InvalidInputError",
    "CorruptIndexError",
    "UnsupportedVersionError",
    "ArtifactMismatchError",
    "CommitConflictError",
    "IndexNotFoundError",
    "UnsupportedCpuError",
    "MissingFileError",
    "StorageError",
]


class BitshardError(Exception):
    """Base class of every error bitshard raises on purpose."""


class InvalidInputError(BitshardError, ValueError):
    """Bad arguments or bad vectors: wrong dimension or dtype, NaN/Inf, nulls.

    The message names the column, the fragment and the row where it can.
    """


class CorruptIndexError(BitshardError):
    """An index file is truncated or its bytes fail a checksum or a bound."""


class MissingFileError(CorruptIndexError, FileNotFoundError):
    """A file the index root should hold is gone (a segment a manifest or a
    handle names, a manifest that was listed): the message names the file
    and what can have removed it. Also a ``FileNotFoundError``."""


class StorageError(BitshardError, OSError):
    """The storage backend failed an operation on the index root: permission
    denied, the object store unreachable or refusing the request, a read cut
    short. The message names the file (path or URI), the operation and the
    backend's own message. Also an ``OSError``."""


class UnsupportedVersionError(CorruptIndexError):
    """An index file was written by a newer format version than this reader."""


class ArtifactMismatchError(BitshardError, ValueError):
    """Segments from different code spaces met (merge, commit or query).

    The message names the artifact that differs (``rotation``, ``centroids``,
    ``metric``, ``num_bits``, ``dimension`` or ``column``) and both values.
    """


class CommitConflictError(BitshardError):
    """Another writer committed the same manifest version first; retry."""


class IndexNotFoundError(BitshardError, KeyError):
    """No committed index has the requested name (or column)."""


class UnsupportedCpuError(BitshardError):
    """BITSHARD_SIMD forced a kernel this CPU cannot run."""
