"""Argument validators: every public entry point checks its arguments here.

Each function takes the argument's name (where it is not fixed) and the
value, returns the value normalised (a Python ``int`` for numpy integers),
and raises :class:`~bitshard.errors.InvalidInputError` naming the argument
and the value. Keeping the rules in one module keeps them the same in every
entry point (``Dataset.search``, ``Dataset.searcher``, ``create_index``,
``create_index_uncommitted``, ``train_ivf``, ``build_index``,
``build_rq_rotation``, the command line).
"""

from __future__ import annotations

import math
import os
from typing import Any, List, Optional, Tuple

import numpy as np

from .errors import InvalidInputError

#: Threads a build or a batch search uses at most.
MAX_THREADS = 256
#: Vector dimensions the rotation accepts (the C library's bound).
MAX_DIMENSION = 65536


#: The largest accepted magnitude of a vector element, 2**40 (the C library's
#: BS_MAX_ABS_VALUE). Every element of data rows, training samples, centroids
#: and queries is finite and at most this in magnitude: within it no norm, dot
#: product or distance of the index overflows float32 (docs/usage.md, "What
#: values are accepted").
MAX_ABS_VALUE = 2.0**40
#: The rule as it ends every refusal message (the same text as in C).
ACCEPTED_VALUES = "(accepted: finite, |value| <= 2**40 = 1099511627776.0)"
#: The largest accepted eps0 (the C library's BS_MAX_EPS0).
MAX_EPS0 = 1000.0


def _is_int(value: Any) -> bool:
    """A Python or numpy integer; ``bool`` is refused (``True`` is not 1 here)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """An integer >= ``minimum``."""
    if not _is_int(value) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def optional_integer(name: str, value: Any, minimum: int = 1) -> Optional[int]:
    """``None``, or an integer >= ``minimum``."""
    return None if value is None else integer(name, value, minimum)


def positive_integer(name: str, value: Any, upper: Optional[int] = None) -> int:
    """An integer >= 1 (and <= ``upper`` when given); a source's sizes."""
    if not _is_int(value):
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    v = int(value)
    if v <= 0 or (upper is not None and v > upper):
        limit = f" and at most {upper}" if upper is not None else ""
        raise InvalidInputError(f"{name} must be a positive integer{limit}, got {v}")
    return v


def non_negative_number(name: str, value: Any) -> float:
    """A real number >= 0 (an age in seconds)."""
    if isinstance(value, bool) or not isinstance(
            value, (int, float, np.integer, np.floating)) or value < 0:
        raise InvalidInputError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def refine_factor(value: Any) -> Optional[int]:
    """``None`` (no exact rerank of the k * r best) or an integer >= 1."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise InvalidInputError(f"refine_factor must be None or >= 1, got {value!r}")
    return int(value)


def eps0(value: Any) -> float:
    """The bound width in standard deviations: a finite number >= 0 and at
    most MAX_EPS0 (wider bounds could overflow float32 for accepted vectors)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(value)) or value < 0:
        raise InvalidInputError(f"eps0 must be a finite number >= 0, got {value!r}")
    if value > MAX_EPS0:
        raise InvalidInputError(f"eps0 must be at most {MAX_EPS0:g}, got {value!r}")
    return float(value)


def thread_count(value: Any) -> int:
    """A build's thread count: all cores for ``None``, at most MAX_THREADS."""
    if value is None:
        return min(os.cpu_count() or 1, MAX_THREADS)
    return min(integer("num_threads", value), MAX_THREADS)


def training_sizes(sample_rate: Any, max_iters: Any) -> None:
    """``train_ivf``'s sample rate and iteration count, both >= 1."""
    if sample_rate < 1 or max_iters < 1:
        raise InvalidInputError(
            f"sample_rate and max_iters must be >= 1, got {sample_rate} and {max_iters}"
        )


def fragment_ids(value: Any) -> List[int]:
    """A list of fragment ids (callers treat ``None``, every fragment, first)."""
    return [int(f) for f in value]


def num_bits(value: Any) -> int:
    """Bits per dimension of the codes: an integer in 1..9."""
    if not _is_int(value):
        raise InvalidInputError(f"num_bits must be an integer in 1..9, got {value!r}")
    if not 1 <= int(value) <= 9:
        raise InvalidInputError(f"num_bits must be in 1..9, got {int(value)}")
    return int(value)


def dimension(value: Any) -> int:
    """A vector dimension: an integer in 1..MAX_DIMENSION."""
    if not _is_int(value):
        raise InvalidInputError(f"dimension must be an integer >= 1, got {value!r}")
    if int(value) < 1 or int(value) > MAX_DIMENSION:
        raise InvalidInputError(f"dimension must be in 1..{MAX_DIMENSION}, got {int(value)}")
    return int(value)


def rotation_seed(value: Any) -> int:
    """A rotation seed: an integer in [0, 2**64)."""
    if not _is_int(value) or not 0 <= int(value) < 2**64:
        raise InvalidInputError(f"seed must be an integer in [0, 2**64), got {value!r}")
    return int(value)


def kmeans_seed(value: Any) -> int:
    """The k-means sampling seed (``None``: 0)."""
    return 0 if value is None else int(value)


def rotation_for(rq_rotation: Any, bits: Optional[int], dim: int, column: str) -> Any:
    """A caller's rotation for column ``column`` of dimension ``dim``: a
    :class:`~bitshard.Rotation` of that dimension, whose bit width is
    ``bits`` when that is given."""
    from .artifacts import Rotation  # noqa: PLC0415 (artifacts imports this module)

    if not isinstance(rq_rotation, Rotation):
        raise InvalidInputError(
            f"rq_rotation must be a bitshard.Rotation, got {type(rq_rotation).__name__}")
    if bits is not None and int(bits) != rq_rotation.num_bits:
        raise InvalidInputError(
            f"num_bits={bits} conflicts with the rotation's num_bits={rq_rotation.num_bits}")
    if rq_rotation.dimension != dim:
        raise InvalidInputError(
            f"rq_rotation has dimension {rq_rotation.dimension}, column {column!r} has {dim}")
    return rq_rotation


def ivf_for(ivf: Any, dim: int, column: str) -> Any:
    """A caller's IVF model for column ``column`` of dimension ``dim``."""
    if ivf.dimension != dim:
        raise InvalidInputError(
            f"ivf_centroids have dimension {ivf.dimension}, column {column!r} has {dim}")
    return ivf


def first_refused_value(vecs: np.ndarray) -> Optional[Tuple[int, int]]:
    """(row, dimension) of the first element of float32 (n, d) ``vecs``, in
    row-major order, that the accepted-values rule refuses (NaN, +-Inf, or a
    magnitude above MAX_ABS_VALUE); None when every element is accepted."""
    if vecs.size == 0:
        return None
    # NaN propagates through max and min and fails both comparisons, so two
    # reductions (no temporary array) settle the common, accepted case.
    if vecs.max() <= MAX_ABS_VALUE and vecs.min() >= -MAX_ABS_VALUE:
        return None
    i, j = np.argwhere(~(np.abs(vecs) <= MAX_ABS_VALUE))[0]
    return int(i), int(j)
