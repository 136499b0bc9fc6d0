"""Shared artifacts: the things that define an index's code space.

Every segment built from the same artifacts can be merged and searched with
every other; any other combination is refused. Artifacts are small,
picklable (they travel to Ray workers), serialise with ``to_bytes`` /
``from_bytes`` and carry a fingerprint over their canonical bytes.
"""

from __future__ import annotations

import os
import secrets
import struct
from typing import Any, Optional, Union

import numpy as np

from . import _native, validate
from .errors import CorruptIndexError, InvalidInputError

__all__ = [
    "Rotation",
    "IvfModel",
    "build_rq_rotation",
    "build_rq_model",
    "METRICS",
    "DEFAULT_ROTATION_SEED",
]

#: Metric names and their C codes.
METRICS = {"l2": 0, "cosine": 1, "dot": 2}
METRIC_NAMES = {v: k for k, v in METRICS.items()}
ROTATION_TYPES = {"fast": 0, "matrix": 1}
ROTATION_NAMES = {v: k for k, v in ROTATION_TYPES.items()}
DTYPES = ("float16", "float32", "float64")

#: The seed used when a segment is built without an explicit rotation, so
#: that independent workers still agree (the ASCII of "bitshard").
DEFAULT_ROTATION_SEED = 0x6269747368617264

_ROT_MAGIC = b"BSROT\x00\x00\x01"
_ROT_STRUCT = struct.Struct("<8sIIIIQ")  # magic, dim, bits, kind, dtype, seed
_IVF_MAGIC = b"BSIVF\x00\x00\x01"
_IVF_STRUCT = struct.Struct("<8sIII")  # magic, k, d, metric


def metric_code(metric: str) -> int:
    """The C code of a metric name (``l2``, ``cosine``, ``dot``)."""
    if not isinstance(metric, str) or metric.lower() not in METRICS:
        raise InvalidInputError(
            f"unknown metric {metric!r}; expected one of {sorted(METRICS)}"
        )
    return METRICS[metric.lower()]


class Rotation:
    """The RaBitQ rotation shared by every segment of an index.

    Attributes:
        dimension: the vector dimension d (>= 1).
        padded_dimension: D, d rounded up to a multiple of 64; codes have D bits.
        num_bits: bits per dimension of the codes (1..9).
        dtype: the dtype of the source vectors (informative; codes are the same).
        rotation_type: ``"fast"`` (sign flips + Walsh-Hadamard) or ``"matrix"``.
        seed: the 64-bit seed the transform is drawn from.
        fingerprint: 32 hex digits over (type, dimension, padded dimension, seed).
    """

    __slots__ = ("dimension", "num_bits", "dtype", "rotation_type", "seed", "_handle")

    def __init__(
        self,
        dimension: int,
        num_bits: int = 1,
        dtype: str = "float32",
        rotation_type: str = "fast",
        seed: int = DEFAULT_ROTATION_SEED,
    ) -> None:
        self.dimension = validate.dimension(dimension)
        self.num_bits = validate.num_bits(num_bits)
        try:
            dtype_name = np.dtype(dtype).name
        except TypeError:
            dtype_name = repr(dtype)
        if dtype_name not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.dtype = dtype_name
        if rotation_type not in ROTATION_TYPES:
            raise InvalidInputError(
                f"rotation_type must be 'fast' or 'matrix', got {rotation_type!r}"
            )
        self.rotation_type = rotation_type
        if rotation_type == "matrix":
            # The C library refuses this size only when the transform is
            # first made; refuse it here, where the argument is given.
            D = int(_native.padded_dim(self.dimension))
            if D > _native.ROTATION_MATRIX_MAX_DIM:
                raise InvalidInputError(
                    f"matrix rotation dimension must be <= {_native.ROTATION_MATRIX_MAX_DIM} "
                    f"(padded dimension {D} for dimension {self.dimension} is too large; "
                    "use the fast rotation)")
        self.seed = validate.rotation_seed(seed)
        self._handle: Any = None

    @property
    def handle(self) -> Any:
        """The native transform (created on first use, not pickled)."""
        if self._handle is None:
            self._handle = _native.Rotation(
                ROTATION_TYPES[self.rotation_type], self.dimension, self.seed
            )
        return self._handle

    @property
    def padded_dimension(self) -> int:
        """D: the code length in bits (a multiple of 64)."""
        return int(_native.padded_dim(self.dimension))

    @property
    def fingerprint(self) -> str:
        """32 hex digits identifying the transform."""
        return bytes(self.handle.fingerprint).hex()

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Rotate rows: ``x`` float32 (n, d) or (n, D) -> float32 (n, D)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        out = np.empty((x.shape[0], self.padded_dimension), dtype=np.float32)
        self.handle.apply(x, x.shape[0], x.shape[1], out)
        return out

    def to_bytes(self) -> bytes:
        """Canonical, versioned bytes (32 + 8 checksum); see docs/format.md."""
        body = _ROT_STRUCT.pack(
            _ROT_MAGIC,
            self.dimension,
            self.num_bits,
            ROTATION_TYPES[self.rotation_type],
            DTYPES.index(self.dtype),
            self.seed,
        )
        return body + struct.pack("<Q", _native.hash64(body, 0))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Rotation":
        """Inverse of :meth:`to_bytes`; raises CorruptIndexError on bad bytes."""
        data = bytes(data)
        if len(data) != _ROT_STRUCT.size + 8:
            raise CorruptIndexError(
                f"rotation bytes must be {_ROT_STRUCT.size + 8} long, got {len(data)}"
            )
        body, (check,) = data[:-8], struct.unpack("<Q", data[-8:])
        magic, dim, bits, kind, dtype, seed = _ROT_STRUCT.unpack(body)
        if magic != _ROT_MAGIC:
            raise CorruptIndexError(f"not rotation bytes (magic {magic!r})")
        if _native.hash64(body, 0) != check:
            raise CorruptIndexError("rotation bytes fail their checksum")
        if kind not in ROTATION_NAMES or dtype >= len(DTYPES):
            raise CorruptIndexError(f"rotation bytes hold unknown kind {kind} or dtype {dtype}")
        try:
            return cls(dim, bits, DTYPES[dtype], ROTATION_NAMES[kind], seed)
        except InvalidInputError as e:
            raise CorruptIndexError(f"rotation bytes hold bad values: {e}") from None

    def with_bits(self, num_bits: int) -> "Rotation":
        """The same transform with another bit width."""
        return Rotation(self.dimension, num_bits, self.dtype, self.rotation_type, self.seed)

    def __reduce__(self) -> Any:
        return (Rotation.from_bytes, (self.to_bytes(),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rotation) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __repr__(self) -> str:
        return (
            f"Rotation(dimension={self.dimension}, num_bits={self.num_bits}, "
            f"dtype={self.dtype!r}, rotation_type={self.rotation_type!r}, seed={self.seed:#x})"
        )


def build_rq_rotation(
    dimension: int,
    num_bits: int = 1,
    dtype: str = "float32",
    rotation_type: str = "fast",
    seed: Optional[int] = None,
) -> Rotation:
    """Mint the rotation every worker of a distributed build must share.

    Args:
        dimension: vector dimension d (>= 1; any value, padding is internal).
        num_bits: bits per dimension of the RaBitQ codes, 1..9.
        dtype: dtype of the source vectors: float16, float32 or float64.
        rotation_type: ``"fast"`` (O(d log d)) or ``"matrix"`` (dense, O(d^2)).
        seed: 64-bit seed; ``None`` draws a fresh random one and records it.

    Returns:
        A picklable :class:`Rotation`; its few bytes regenerate the transform.
    """
    if seed is None:
        seed = secrets.randbits(64)
    rot = Rotation(dimension, num_bits, dtype, rotation_type, seed)
    rot.handle  # validate in C now, not on a worker later
    return rot


def build_rq_model(
    dimension: int, num_bits: int = 1, dtype: str = "float32", seed: Optional[int] = None
) -> Rotation:
    """Alias of :func:`build_rq_rotation`, named as in pylance."""
    return build_rq_rotation(dimension, num_bits=num_bits, dtype=dtype, seed=seed)


class IvfModel:
    """IVF centroids (float32, shape (k, d)) and the metric they partition for.

    Attributes:
        centroids: read-only float32 array (num_partitions, dimension).
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``.
        fingerprint: 32 hex digits over (k, d, metric, centroid bytes).
    """

    __slots__ = ("centroids", "metric", "_fingerprint")

    def __init__(self, centroids: Any, metric: str = "l2") -> None:
        arr = np.asarray(centroids)
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise InvalidInputError(
                f"centroids must be a 2-D array (num_partitions, dimension), got shape {arr.shape}"
            )
        if arr.dtype.kind != "f":
            raise InvalidInputError(f"centroids must be floating point, got {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        bad = validate.first_refused_value(arr)
        if bad is not None:
            v = float(arr[bad])
            if not np.isfinite(v):
                raise InvalidInputError(
                    f"centroids hold a non-finite value at partition {bad[0]}, "
                    f"dimension {bad[1]}")
            raise InvalidInputError(
                f"centroids hold a value too large ({v:g}) at partition {bad[0]}, "
                f"dimension {bad[1]} {validate.ACCEPTED_VALUES}")
        metric_code(metric)
        arr.setflags(write=False)
        self.centroids = arr
        self.metric = metric.lower()
        self._fingerprint: Optional[str] = None

    @property
    def num_partitions(self) -> int:
        """k, the number of partitions."""
        return int(self.centroids.shape[0])

    @property
    def dimension(self) -> int:
        """d, the vector dimension."""
        return int(self.centroids.shape[1])

    @property
    def fingerprint(self) -> str:
        """32 hex digits identifying the centroids and metric."""
        if self._fingerprint is None:
            k, d = self.centroids.shape
            self._fingerprint = bytes(
                _native.ivf_fingerprint(self.centroids, k, d, METRICS[self.metric])
            ).hex()
        return self._fingerprint

    def to_bytes(self) -> bytes:
        """Versioned bytes: header, float32 centroids, 8-byte checksum."""
        k, d = self.centroids.shape
        body = _IVF_STRUCT.pack(_IVF_MAGIC, k, d, METRICS[self.metric]) + self.centroids.astype(
            "<f4"
        ).tobytes()
        return body + struct.pack("<Q", _native.hash64(body, 0))

    @classmethod
    def from_bytes(cls, data: bytes) -> "IvfModel":
        """Inverse of :meth:`to_bytes`; raises CorruptIndexError on bad bytes."""
        data = bytes(data)
        if len(data) < _IVF_STRUCT.size + 8:
            raise CorruptIndexError(f"IVF model bytes too short ({len(data)})")
        body, (check,) = data[:-8], struct.unpack("<Q", data[-8:])
        magic, k, d, metric = _IVF_STRUCT.unpack(body[: _IVF_STRUCT.size])
        if magic != _IVF_MAGIC:
            raise CorruptIndexError(f"not IVF model bytes (magic {magic!r})")
        if _native.hash64(body, 0) != check:
            raise CorruptIndexError("IVF model bytes fail their checksum")
        if len(body) != _IVF_STRUCT.size + 4 * k * d or metric not in METRIC_NAMES:
            raise CorruptIndexError("IVF model bytes have inconsistent sizes or metric")
        cent = np.frombuffer(body, dtype="<f4", offset=_IVF_STRUCT.size).reshape(k, d)
        try:
            return cls(cent, METRIC_NAMES[metric])
        except InvalidInputError as e:
            # Checksum-valid bytes holding values IvfModel() refuses (k or d 0,
            # NaN, a value above 2**40) are a damaged file, not a bad argument.
            raise CorruptIndexError(f"IVF model bytes hold bad values: {e}") from None

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`to_bytes` to a file (atomically, via a temp file).

        Raises:
            MissingFileError, StorageError: the file cannot be written (names
                it and the operating system's reason).
        """
        from .storage import backend_errors  # noqa: PLC0415 - storage imports numpy only

        p = os.fspath(path)
        tmp = f"{p}.tmp{os.getpid()}"
        with backend_errors(p, "write"):
            try:
                with open(tmp, "wb") as f:
                    f.write(self.to_bytes())
                os.replace(tmp, p)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "IvfModel":
        """Read a file written by :meth:`save` (or a .npy array of centroids).

        Raises:
            MissingFileError, StorageError: the file cannot be read (names it).
            CorruptIndexError: its bytes are not an IVF model.
        """
        from .storage import backend_errors  # noqa: PLC0415

        p = os.fspath(path)
        with backend_errors(p, "read"):
            if p.endswith(".npy"):
                return cls(np.load(p))
            with open(p, "rb") as f:
                return cls.from_bytes(f.read())

    def __reduce__(self) -> Any:
        return (IvfModel.from_bytes, (self.to_bytes(),))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IvfModel) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        k, d = self.centroids.shape
        return f"IvfModel(num_partitions={k}, dimension={d}, metric={self.metric!r})"


def as_ivf_model(ivf_centroids: Any, metric: str) -> IvfModel:
    """Accept an IvfModel, an array (k, d) or a path to a saved model / .npy."""
    if isinstance(ivf_centroids, IvfModel):
        if ivf_centroids.metric != metric.lower():
            raise InvalidInputError(
                f"the IVF model was trained for metric {ivf_centroids.metric!r}, "
                f"the index asks for {metric!r}"
            )
        return ivf_centroids
    if isinstance(ivf_centroids, (str, os.PathLike)):
        try:
            model = IvfModel.load(ivf_centroids)
        except OSError as e:
            # the operating system's reason (MissingFileError and StorageError
            # keep the error they translate in ``backend_error``)
            orig = getattr(e, "backend_error", e)
            raise InvalidInputError(
                f"ivf_centroids: cannot read {os.fspath(ivf_centroids)!r}: "
                f"{getattr(orig, 'strerror', None) or orig}") from None
        except ValueError as e:  # np.load of a file that is not an array
            if isinstance(e, InvalidInputError):
                raise
            raise InvalidInputError(
                f"ivf_centroids: {os.fspath(ivf_centroids)!r} is not a .npy array: {e}") from None
        return IvfModel(model.centroids, metric)
    return IvfModel(ivf_centroids, metric)
