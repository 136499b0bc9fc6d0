"""Argument validators: every public entry point checks its arguments here.

Each function takes the argument's name (where it is not fixed) and the
value, returns the value normalised (a Python ``int`` for numpy integers),
and raises :class:`~bitshard.errors.InvalidInputError` naming the argument
and the value. Keeping the rules in one module keeps them the same in every
entry point (``Dataset.search``, ``Dataset.searcher``, ``create_index``,
``create_index_uncommitted``, ``train_ivf``, ``build_index``,
``build_rq_rotation``, the command line). docs/usage.md has the table of
rules ("Argument rules"); change a rule here and there together.

Bounds that are not about meaning come from what the C library takes: counts
it receives as 32-bit unsigned integers (``max_iters``, ``num_partitions``)
are refused above ``UINT32_MAX``, and seeds (64-bit) outside [0, 2**64),
here, before the call. ``nprobes`` is the exception: any value above the
partition count means every partition, so it is capped, not refused (the
searcher caps it at UINT32_MAX before the C call and C at the count).
"""

from __future__ import annotations

import math
import os
from typing import Any, List, NamedTuple, Optional, Tuple

import numpy as np

from . import names
from .errors import InvalidInputError

#: Threads a build or a batch search uses at most (larger counts are capped).
MAX_THREADS = 256
#: Vector dimensions the rotation accepts (the C library's bound).
MAX_DIMENSION = 65536
#: The largest count the C library takes as a 32-bit unsigned integer.
UINT32_MAX = 2**32 - 1
#: Results per query at most: ``k``, and ``k * refine_factor`` (the candidates
#: kept for an exact rerank), are refused above it. A search allocates its
#: output (12 bytes per result per query) and its candidate lists (16 bytes
#: per candidate) up front, so an unbounded k turns a typo into a MemoryError
#: or a numpy "maximum dimension" error. 2**20 is 10^4 times the k of any
#: nearest-neighbour workload we know; at the cap a query needs 12 MiB of
#: output and at most 16 MiB of candidates per 2**20 (the candidate arrays
#: are also capped at the rows the index holds), and every candidate count
#: stays far inside the C library's 32-bit counts.
MAX_K = 2**20


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


def integer(name: str, value: Any, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """An integer >= ``minimum`` (and <= ``maximum`` when given)."""
    if not _is_int(value) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be at most {maximum}, got {int(value)}")
    return int(value)


def optional_integer(name: str, value: Any, minimum: int = 1,
                     maximum: Optional[int] = None) -> Optional[int]:
    """``None``, or an integer >= ``minimum`` (and <= ``maximum``)."""
    return None if value is None else integer(name, value, minimum, maximum)


def k(value: Any) -> int:
    """Neighbours per query: an integer in 1..MAX_K. A k above the rows an
    index holds is allowed: the answer is padded with ``NO_ROW`` / inf."""
    return integer("k", value, 1, MAX_K)


def nprobes(value: Any) -> int:
    """Partitions probed: an integer >= 1; above the index's partition count
    (however large) it means every partition."""
    return integer("nprobes", value)


def num_partitions(value: Any) -> int:
    """IVF partitions: an integer in 1..UINT32_MAX."""
    return integer("num_partitions", value, 1, UINT32_MAX)


def max_iters(value: Any) -> int:
    """k-means iterations at most: an integer in 1..UINT32_MAX."""
    return integer("max_iters", value, 1, UINT32_MAX)


def sample_rate(value: Any) -> int:
    """Training rows per partition: an integer >= 1 (the sample is capped at
    the row count)."""
    return integer("sample_rate", value)


def positive_integer(name: str, value: Any, upper: Optional[int] = None) -> int:
    """An integer >= 1 (and <= ``upper`` when given); a source's sizes."""
    if not _is_int(value):
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    v = int(value)
    if v <= 0 or (upper is not None and v > upper):
        limit = f" and at most {upper}" if upper is not None else ""
        raise InvalidInputError(f"{name} must be a positive integer{limit}, got {v}")
    return v


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is True or False, else InvalidInputError naming it."""
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be True or False, got {value!r}")
    return value


def non_negative_number(name: str, value: Any) -> float:
    """A real number >= 0 (an age in seconds)."""
    if isinstance(value, bool) or not isinstance(
            value, (int, float, np.integer, np.floating)) or value < 0:
        raise InvalidInputError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def refine_factor(value: Any, k: int) -> Optional[int]:
    """``None`` (no exact rerank of the k * r best) or an integer >= 1 with
    ``k * refine_factor`` <= MAX_K (``k`` already checked)."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise InvalidInputError(f"refine_factor must be None or >= 1, got {value!r}")
    if k * int(value) > MAX_K:
        raise InvalidInputError(
            f"k * refine_factor must be at most {MAX_K}, got {k} * {int(value)}")
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
    """A thread count: all cores for ``None``; an integer >= 1, capped at
    MAX_THREADS."""
    if value is None:
        return min(os.cpu_count() or 1, MAX_THREADS)
    return min(integer("num_threads", value), MAX_THREADS)


def optional_thread_count(value: Any) -> Optional[int]:
    """``None`` (the caller's default) or :func:`thread_count`."""
    return None if value is None else thread_count(value)


def fragment_ids(value: Any) -> List[int]:
    """A sequence of fragment ids, each an integer in [0, 2**32) (callers
    treat ``None``, every fragment, first)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InvalidInputError(f"fragment_ids must be a sequence of integers, got {value!r}")
    out = []
    for i, f in enumerate(value):
        if not _is_int(f) or not 0 <= f <= UINT32_MAX:
            raise InvalidInputError(
                f"fragment_ids must hold integers in [0, 2**32), got {f!r} at position {i}")
        out.append(int(f))
    return out


def index_name(value: Any) -> str:
    """An index name that can be a path component (bitshard.names: non-empty,
    at most 255 bytes of UTF-8, no ``/``, ``\\`` or NUL, no leading ``.``),
    checked before any work. A commit then also requires a new index's name
    to match the strict pattern of :mod:`bitshard.names`
    (``index.check_commit_name``); an existing index with an older name may
    still be rebuilt."""
    return names.check_index_name(value, "name")


def optional_num_bits(value: Any) -> Optional[int]:
    """``None`` (the default width) or :func:`num_bits`."""
    return None if value is None else num_bits(value)


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


def optional_seed(value: Any) -> Optional[int]:
    """``None`` or a seed: an integer in [0, 2**64)."""
    return None if value is None else rotation_seed(value)


def kmeans_seed(value: Any) -> int:
    """The k-means sampling seed: an integer in [0, 2**64) (``None``: 0)."""
    return 0 if value is None else rotation_seed(value)


def rotation_for(rq_rotation: Any, bits: Optional[int], dim: int, column: str) -> Any:
    """A caller's rotation for column ``column`` of dimension ``dim``: a
    :class:`~bitshard.Rotation` of that dimension, whose bit width is
    ``bits`` when that is given."""
    from .artifacts import Rotation  # noqa: PLC0415 (artifacts imports this module)

    if not isinstance(rq_rotation, Rotation):
        raise InvalidInputError(
            f"rq_rotation must be a bitshard.Rotation, got {type(rq_rotation).__name__}")
    if bits is not None and num_bits(bits) != rq_rotation.num_bits:
        raise InvalidInputError(
            f"num_bits={bits} conflicts with the rotation's num_bits={rq_rotation.num_bits}")
    if rq_rotation.dimension != dim:
        raise InvalidInputError(
            f"rq_rotation has dimension {rq_rotation.dimension}, column {column!r} has {dim}")
    return rq_rotation


def ivf_for(ivf: Any, dim: int, column: str, partitions: Optional[int] = None) -> Any:
    """A caller's IVF model for column ``column`` of dimension ``dim`` (with
    ``partitions`` partitions when the caller also gave ``num_partitions``)."""
    if ivf.dimension != dim:
        raise InvalidInputError(
            f"ivf_centroids have dimension {ivf.dimension}, column {column!r} has {dim}")
    if partitions is not None and ivf.num_partitions != partitions:
        raise InvalidInputError(
            f"num_partitions={partitions} conflicts with ivf_centroids "
            f"({ivf.num_partitions} partitions)")
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


class SearchSettings(NamedTuple):
    """The query-independent numbers of a search, checked and normalised."""

    k: int
    nprobes: int
    refine_factor: Optional[int]
    eps0: float
    num_threads: Optional[int]
    fragment_ids: Optional[List[int]]


def search_settings(k_value: Any, nprobes_value: Any, refine_value: Any, eps0_value: Any,
                    threads_value: Any, fragments_value: Any) -> SearchSettings:
    """The settings of ``Dataset.search`` / ``Dataset.searcher`` (k, nprobes,
    refine_factor, eps0, num_threads, fragment_ids), each checked by its rule
    above, in that order."""
    checked_k = k(k_value)
    return SearchSettings(
        checked_k, nprobes(nprobes_value), refine_factor(refine_value, checked_k),
        eps0(eps0_value), optional_thread_count(threads_value),
        None if fragments_value is None else fragment_ids(fragments_value))
