"""Sources: where the vectors live, and how bitshard reads them.

A :class:`Source` wraps a Lance dataset, a Parquet file or directory, a
``pyarrow.Table`` or a numpy array behind one interface:

* fragments with stable integer ids (:meth:`Source.fragments`);
* row ids ``(fragment_id << 32) | offset`` (uint64), where ``offset`` is the
  row's *physical* position inside its fragment (for Lance: the row address,
  which stays put when earlier rows are deleted);
* streaming, validated float32 vector batches (:meth:`Source.iter_batches`);
* exact vectors and other columns by row id (:meth:`Source.take`,
  :meth:`Source.take_table`), a seeded uniform sample (:meth:`Source.sample`)
  and row ids matching a filter (:meth:`Source.filter_rowids`).

Every vector that leaves this module has been checked: a null vector, a null
element, a NaN or an infinity, or a row of the wrong length raises
:class:`~bitshard.errors.InvalidInputError` naming the column, the fragment
and the row (the physical offset). float16 and float64 columns are converted
to float32.

Sources pickle small: Lance and Parquet sources carry their URI and version and
reopen lazily in the receiving process; in-memory sources carry their data.

See docs/sources.md for the choices made here.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bitshard import validate
from bitshard.errors import InvalidInputError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_FRAGMENT_SIZE",
    "FragmentInfo",
    "VectorBatch",
    "Source",
    "LanceSource",
    "ParquetSource",
    "NumpySource",
    "TableSource",
    "open_source",
    "make_rowids",
    "split_rowids",
]

#: Default number of rows per batch yielded by :meth:`Source.iter_batches`.
DEFAULT_BATCH_SIZE = 65536
#: Default number of rows per fragment for in-memory (numpy / Table) sources.
DEFAULT_FRAGMENT_SIZE = 65536
#: Name of the vector column of a numpy source unless ``column=`` names it.
NUMPY_COLUMN = "vector"
#: Pseudo-column accepted by :meth:`Source.take_table`: the bitshard row id.
ROWID_COLUMN = "_rowid"

_OFFSET_MASK = np.uint64(0xFFFFFFFF)
_MAX_OFFSETS = 1 << 32
_FLOAT_TYPES: dict[pa.DataType, np.dtype] = {
    pa.float16(): np.dtype(np.float16),
    pa.float32(): np.dtype(np.float32),
    pa.float64(): np.dtype(np.float64),
}
_LIVE_CACHE_FRAGMENTS = 16
_EXPECTED_TYPE = (
    "fixed_size_list<float16|float32|float64> (a list<float16|float32|float64> "
    "whose rows all have one length is accepted too)"
)


# ----------------------------------------------------------------------------
# Small public value types
# ----------------------------------------------------------------------------


class FragmentInfo(NamedTuple):
    """One fragment of a source.

    Attributes
    ----------
    id : int
        The fragment id (``0 <= id < 2**32``); the high half of its row ids.
    physical_rows : int
        The range of offsets in the fragment: valid offsets are
        ``0 <= offset < physical_rows``. For Lance this counts deleted rows
        too; for the other kinds it equals ``num_rows``.
    num_rows : int
        Rows that are live (not deleted) in the fragment.
    """

    id: int
    physical_rows: int
    num_rows: int


class VectorBatch(NamedTuple):
    """A batch of validated vectors from one fragment.

    Attributes
    ----------
    fragment_id : int
        The fragment the rows belong to.
    offsets : numpy.ndarray
        uint32, shape ``(n,)``: physical offsets of the rows within the
        fragment, strictly increasing.
    vectors : numpy.ndarray
        float32, shape ``(n, d)``, C-contiguous. It may be a read-only,
        zero-copy view of Arrow memory: copy it before writing to it.
    """

    fragment_id: int
    offsets: np.ndarray
    vectors: np.ndarray

    @property
    def rowids(self) -> np.ndarray:
        """uint64, shape ``(n,)``: ``(fragment_id << 32) | offsets``."""
        return make_rowids(self.fragment_id, self.offsets)

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.offsets.shape[0])


def make_rowids(fragment_id: int, offsets: np.ndarray) -> np.ndarray:
    """Row ids ``(fragment_id << 32) | offsets`` as uint64, shape ``(n,)``."""
    offs = np.asarray(offsets, dtype=np.uint64)
    return (np.uint64(int(fragment_id)) << np.uint64(32)) | offs


def split_rowids(rowids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split uint64 row ids into ``(fragment_ids, offsets)``, both int64 ``(n,)``."""
    r = np.asarray(rowids, dtype=np.uint64)
    return (r >> np.uint64(32)).astype(np.int64), (r & _OFFSET_MASK).astype(np.int64)


# ----------------------------------------------------------------------------
# Argument checks and vector validation (shared by every kind)
# ----------------------------------------------------------------------------


def _as_rowids(rowids: Any) -> np.ndarray:
    """Coerce to a 1-D uint64 array, refusing non-integers and negatives."""
    if isinstance(rowids, (pa.Array, pa.ChunkedArray)):
        rowids = rowids.to_numpy(zero_copy_only=False)
    arr = np.asarray(rowids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidInputError(f"rowids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"rowids must be integers (uint64), got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and (arr < 0).any():
        bad = int(arr[np.argmax(arr < 0)])
        raise InvalidInputError(f"row id {bad} is negative")
    return arr.astype(np.uint64, copy=False)


def _vector_type_info(column: str, typ: pa.DataType) -> tuple[str, np.dtype, Optional[int]]:
    """(``"fixed"`` | ``"list"``, element numpy dtype, dimension or None)."""
    if pa.types.is_fixed_size_list(typ):
        kind, size = "fixed", typ.list_size
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        kind, size = "list", None
    else:
        raise InvalidInputError(f"column {column!r} has type {typ}; bitshard needs {_EXPECTED_TYPE}")
    value_type = typ.value_type
    if value_type not in _FLOAT_TYPES:
        raise InvalidInputError(
            f"column {column!r} has type {typ} (elements {value_type}); bitshard needs {_EXPECTED_TYPE}"
        )
    if size is not None and size <= 0:
        raise InvalidInputError(f"column {column!r} has type {typ}: vectors of dimension 0")
    return kind, _FLOAT_TYPES[value_type], size


Locator = Callable[[int], str]


def _frag_locator(fragment_id: int, offsets: np.ndarray) -> Locator:
    return lambda i: f"fragment {fragment_id} row {int(offsets[i])}"


def _rows_locator(fragment_ids: np.ndarray, offsets: np.ndarray) -> Locator:
    return lambda i: f"fragment {int(fragment_ids[i])} row {int(offsets[i])}"


def _check_finite_f32(vecs: np.ndarray, column: str, locate: Locator,
                      original: Optional[np.ndarray] = None) -> np.ndarray:
    """Validate a float (n, d) array against the accepted-values rule
    (finite, |value| <= validate.MAX_ABS_VALUE) and return it as C-contiguous float32.
    A refusal names the column, fragment, row, dimension and value."""
    if original is None:
        original = vecs
    if vecs.dtype != np.float32:
        with np.errstate(over="ignore", invalid="ignore"):
            vecs = vecs.astype(np.float32)
    vecs = np.ascontiguousarray(vecs)
    bad = validate.first_refused_value(vecs)
    if bad is not None:
        i, j = bad
        orig = original[i, j]
        if np.isfinite(vecs[i, j]):
            raise InvalidInputError(
                f"column {column!r} {locate(i)}: value {float(orig):g} at dimension {j} "
                f"is too large {validate.ACCEPTED_VALUES}"
            )
        if np.isfinite(orig):
            raise InvalidInputError(
                f"column {column!r} {locate(i)}: non-finite value at dimension {j} "
                f"({float(orig)!r} overflows float32)"
            )
        raise InvalidInputError(
            f"column {column!r} {locate(i)}: non-finite value at dimension {j} ({float(orig)!r})"
        )
    return vecs


def _arrow_to_vectors(arr: Union[pa.Array, pa.ChunkedArray], column: str, dim: int,
                      locate: Locator) -> np.ndarray:
    """Validate an Arrow list column and return float32 (n, dim), C-contiguous."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    n = len(arr)
    kind, _, size = _vector_type_info(column, arr.type)
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if arr.null_count:
        i = int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))
        raise InvalidInputError(f"column {column!r} {locate(i)}: null vector")
    if kind == "fixed":
        if size != dim:
            raise InvalidInputError(
                f"column {column!r} {locate(0)}: vector has {size} values, expected {dim}"
            )
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        wrong = lengths != dim
        if wrong.any():
            i = int(np.argmax(wrong))
            raise InvalidInputError(
                f"column {column!r} {locate(i)}: vector has {int(lengths[i])} values, expected {dim}"
            )
    values = arr.flatten()  # respects slicing; no null lists at this point
    if values.null_count:
        k = int(np.argmax(values.is_null().to_numpy(zero_copy_only=False)))
        raise InvalidInputError(
            f"column {column!r} {locate(k // dim)}: null vector (null value at dimension {k % dim})"
        )
    flat = values.to_numpy(zero_copy_only=False)
    return _check_finite_f32(flat.reshape(n, dim), column, locate)


def _groups(sorted_keys: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(key, start, stop) runs of equal values in a sorted int array."""
    if sorted_keys.size == 0:
        return
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate(([0], cuts))
    stops = np.concatenate((cuts, [sorted_keys.size]))
    for s, e in zip(starts.tolist(), stops.tolist()):
        yield int(sorted_keys[s]), s, e


# ----------------------------------------------------------------------------
# Source: the common interface and the logic shared by all kinds
# ----------------------------------------------------------------------------


class Source:
    """Where the vectors live. Create one with :func:`open_source`.

    Attributes
    ----------
    kind : str
        ``"lance"``, ``"parquet"``, ``"numpy"`` or ``"table"``.
    uri : str or None
        Where the data is (absolute path or URI); None for in-memory data.
    version : int, str or None
        What the data was when the source was opened: the Lance dataset
        version (int), a token hashing the Parquet files' names, sizes and
        modification times (str), or None for in-memory data. Segments record
        it to pin themselves to the data they were built from.
    column : str or None
        The default vector column: used when a method gets ``column=None``.
    """

    kind: str = ""

    def __init__(self, column: Optional[str]) -> None:
        self._column = column
        self._fragments: Optional[list[FragmentInfo]] = None
        self._frag_index: Optional[dict[int, FragmentInfo]] = None
        self._dims: dict[str, int] = {}

    # -- identity ------------------------------------------------------------

    @property
    def uri(self) -> Optional[str]:
        """The data's location (str), or None for in-memory data."""
        return None

    @property
    def version(self) -> Union[int, str, None]:
        """The pinned version (see the class docstring)."""
        return None

    @property
    def column(self) -> Optional[str]:
        """The default vector column, or None if there is no single obvious one."""
        return self._column

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of the source's columns."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} kind={self.kind!r} uri={self.uri!r} "
                f"version={self.version!r} column={self._column!r}>")

    # -- fragments -----------------------------------------------------------

    def fragments(self) -> list[FragmentInfo]:
        """The source's fragments, sorted by id. Cached: a source is pinned."""
        if self._fragments is None:
            frags = sorted(self._list_fragments(), key=lambda f: f.id)
            self._fragments = frags
            self._frag_index = {f.id: f for f in frags}
        return list(self._fragments)

    def _list_fragments(self) -> list[FragmentInfo]:
        raise NotImplementedError

    def fragment_identity(self, fragment_id: int, column: Optional[str] = None) -> dict:
        """The identity record of one fragment for vector column ``column``
        at the pinned version: a small JSON-able dict that changes when the
        column's values in the fragment may have changed (see
        :mod:`bitshard.identity`). In-memory data cannot change under a
        source: its record is the row count."""
        info = self.fragment(fragment_id)
        return {"kind": "memory", "physical_rows": int(info.physical_rows)}

    def num_rows(self) -> int:
        """Total live rows over all fragments."""
        return sum(f.num_rows for f in self.fragments())

    def fragment(self, fragment_id: int) -> FragmentInfo:
        """The :class:`FragmentInfo` of one fragment; InvalidInputError if unknown."""
        self.fragments()
        assert self._frag_index is not None
        if isinstance(fragment_id, (bool, np.bool_)) or not isinstance(fragment_id, (int, np.integer)):
            raise InvalidInputError(f"fragment id must be an integer, got {fragment_id!r}")
        info = self._frag_index.get(int(fragment_id))
        if info is None:
            known = sorted(self._frag_index)
            shown = known if len(known) <= 20 else known[:20] + ["..."]
            raise InvalidInputError(
                f"fragment {fragment_id!r} does not exist in this {self.kind} source "
                f"({len(known)} fragments: {shown})"
            )
        return info

    def _resolve_fragment_ids(self, fragment_ids: Any) -> list[FragmentInfo]:
        if fragment_ids is None:
            return self.fragments()
        if isinstance(fragment_ids, (int, np.integer)):
            fragment_ids = [fragment_ids]
        out: list[FragmentInfo] = []
        seen: set[int] = set()
        for fid in fragment_ids:
            info = self.fragment(fid)
            if info.id in seen:
                raise InvalidInputError(f"fragment {info.id} is listed twice in fragment_ids")
            seen.add(info.id)
            out.append(info)
        return out

    # -- columns -------------------------------------------------------------

    def _resolve_column(self, column: Optional[str]) -> str:
        if column is None:
            if self._column is None:
                raise InvalidInputError(
                    "no vector column given and the source has no default one; pass column="
                )
            return self._column
        if not isinstance(column, str):
            raise InvalidInputError(f"column must be a str, got {type(column).__name__}")
        if self.schema.get_field_index(column) < 0:
            names = self.schema.names
            raise InvalidInputError(f"column {column!r} not found; the source has columns {names}")
        return column

    def _type_info(self, column: Optional[str]) -> tuple[str, str, np.dtype, Optional[int]]:
        col = self._resolve_column(column)
        kind, dtype, size = _vector_type_info(col, self.schema.field(col).type)
        return col, kind, dtype, size

    def vector_dtype(self, column: Optional[str] = None) -> np.dtype:
        """The element dtype of a vector column as stored: float16, float32 or float64.

        Vectors are always handed out as float32; this tells what they were.
        Raises InvalidInputError if the column is missing or not a vector column.
        """
        return self._type_info(column)[2]

    def vector_dim(self, column: Optional[str] = None) -> int:
        """The dimension d (values per vector) of a vector column.

        For fixed_size_list columns it is the list size. For variable list
        columns it is the length of the first non-null row in (fragment id,
        offset) order; every row is checked against it when read.
        Raises InvalidInputError if the column is missing, not a vector column,
        or (variable lists) has no non-null row.
        """
        col, kind, _, size = self._type_info(column)
        if size is not None:
            return size
        if col not in self._dims:
            self._dims[col] = self._first_list_length(col)
        return self._dims[col]

    def _first_list_length(self, column: str) -> int:
        for info in self.fragments():
            if info.num_rows == 0:
                continue
            for _, arr in self._iter_raw(info.id, [column], 1024):
                a = arr[0]
                if isinstance(a, pa.ChunkedArray):
                    a = a.combine_chunks()
                valid = a.is_valid().to_numpy(zero_copy_only=False)
                if valid.any():
                    i = int(np.argmax(valid))
                    return int(pc.list_value_length(a.slice(i, 1))[0].as_py())
        raise InvalidInputError(f"column {column!r}: no non-null vector to take the dimension from")

    # -- streaming -----------------------------------------------------------

    def iter_batches(self, column: Optional[str] = None,
                     fragment_ids: Optional[Iterable[int]] = None,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[VectorBatch]:
        """Stream validated float32 vectors, fragment by fragment.

        Parameters
        ----------
        column : str, optional
            The vector column (default: the source's default column).
        fragment_ids : iterable of int, optional
            Fragments to read, in this order (default: all, by id). Unknown
            or repeated ids raise InvalidInputError before anything is read.
        batch_size : int
            Upper bound on rows per batch (Lance may yield fewer).

        Yields
        ------
        VectorBatch
            ``offsets`` uint32 ``(n,)`` physical offsets, ``vectors`` float32
            ``(n, d)``. Empty fragments yield nothing. Memory use is bounded
            by the batch size, not by the fragment size.

        Raises
        ------
        InvalidInputError
            On a null vector or element, a NaN/Inf, or a row whose length is
            not d; the message names the column, fragment and row (offset).
        """
        col = self._resolve_column(column)
        batch_size = validate.positive_integer("batch_size", batch_size)
        frags = self._resolve_fragment_ids(fragment_ids)
        dim = self.vector_dim(col)
        return self._iter_vectors(col, dim, frags, batch_size)

    def _iter_vectors(self, col: str, dim: int, frags: list[FragmentInfo],
                      batch_size: int) -> Iterator[VectorBatch]:
        for info in frags:
            if info.num_rows == 0:
                continue
            for offsets, arrays in self._iter_raw(info.id, [col], batch_size):
                if len(offsets) == 0:
                    continue
                vecs = _arrow_to_vectors(arrays[0], col, dim, _frag_locator(info.id, offsets))
                yield VectorBatch(info.id, offsets, vecs)

    def _iter_raw(self, fragment_id: int, columns: list[str],
                  batch_size: int) -> Iterator[tuple[np.ndarray, list[Any]]]:
        """Yield (uint32 offsets, [arrow arrays, one per column]) for one fragment."""
        raise NotImplementedError

    # -- random access -------------------------------------------------------

    def _check_rowids(self, rowids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split and bounds-check *sorted* row ids; returns (fragment ids, offsets), int64."""
        fids, offs = split_rowids(rowids)
        self.fragments()
        assert self._frag_index is not None
        for fid, s, e in _groups(fids):
            info = self._frag_index.get(fid)
            if info is None:
                raise InvalidInputError(
                    f"row id {int(rowids[s])}: fragment {fid} does not exist in this "
                    f"{self.kind} source"
                )
            last = int(offs[e - 1])
            if last >= info.physical_rows:
                raise InvalidInputError(
                    f"row id {int(rowids[e - 1])}: fragment {fid} row {last} is out of range "
                    f"(the fragment has {info.physical_rows} rows)"
                )
        return fids, offs

    def float32_rows(self, column: Optional[str]) -> Optional[tuple[np.ndarray, int]]:
        """``(array, fragment_size)`` when the column is held in memory as one
        C-contiguous float32 array of shape (rows, d), fragment i being rows
        ``[i * fragment_size, (i + 1) * fragment_size)``: the 1-bit rerank
        then reads candidates' rows straight from it (checking each against
        the accepted-values rule) instead of through :meth:`take`. None
        here; a numpy source of float32 says so."""
        return None

    def take(self, column: Optional[str], rowids: Any) -> np.ndarray:
        """Exact vectors for row ids, in the order given (duplicates allowed).

        Parameters
        ----------
        column : str or None
            The vector column (None: the default column).
        rowids : array-like of uint64, shape ``(n,)``
            ``(fragment_id << 32) | offset``.

        Returns
        -------
        numpy.ndarray
            float32, shape ``(n, d)``, C-contiguous, validated like
            :meth:`iter_batches`.

        Raises
        ------
        InvalidInputError
            A row id whose fragment does not exist, whose offset is out of
            range or whose row is deleted; or a bad vector.
        """
        col = self._resolve_column(column)
        dim = self.vector_dim(col)
        ids = _as_rowids(rowids)
        if ids.size == 0:
            return np.zeros((0, dim), dtype=np.float32)
        uniq, inverse = np.unique(ids, return_inverse=True)
        fids, offs = self._check_rowids(uniq)
        table = self._take_unique(uniq, fids, offs, [col])
        vecs = _arrow_to_vectors(table.column(col), col, dim, _rows_locator(fids, offs))
        return np.ascontiguousarray(vecs[inverse.reshape(-1)])

    def take_table(self, rowids: Any, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """The requested columns for row ids, one row per id in the order given.

        Parameters
        ----------
        rowids : array-like of uint64, shape ``(n,)``
        columns : list of str, optional
            Column names (default: every column of the schema). The
            pseudo-column ``"_rowid"`` gives the row ids themselves (uint64).
            Values are returned as stored: no vector validation here.

        Returns
        -------
        pyarrow.Table with ``n`` rows and the columns in the order asked.
        """
        if columns is None:
            columns = list(self.schema.names)
        if isinstance(columns, str):
            columns = [columns]
        columns = list(columns)
        data_cols = []
        for c in columns:
            if c == ROWID_COLUMN and self.schema.get_field_index(c) < 0:
                continue
            data_cols.append(self._resolve_column(c))
        if len(set(columns)) != len(columns):
            raise InvalidInputError(f"columns {columns} name a column twice")
        ids = _as_rowids(rowids)
        uniq, inverse = np.unique(ids, return_inverse=True)
        if uniq.size:
            fids, offs = self._check_rowids(uniq)
            if data_cols or self.kind == "lance":  # Lance: also detects deleted rows
                table = self._take_unique(uniq, fids, offs, data_cols)
            else:
                table = pa.table({})
        else:
            table = self.schema.empty_table().select(data_cols)
        if data_cols:
            table = table.take(pa.array(inverse.reshape(-1).astype(np.int64)))
        out = []
        for c in columns:
            if c in data_cols:
                out.append(table.column(c))
            else:
                out.append(pa.chunked_array([pa.array(ids, pa.uint64())]))
        return pa.table(out, names=columns)

    def _take_unique(self, uniq: np.ndarray, fids: np.ndarray, offs: np.ndarray,
                     columns: list[str]) -> pa.Table:
        """Rows for sorted unique, bounds-checked row ids; same order, columns as asked."""
        raise NotImplementedError

    @property
    def stable_row_ids(self) -> bool:
        """True for a Lance dataset written with ``enable_stable_row_ids=True``:
        its ``_rowid`` is then not the row address (bitshard's row id)."""
        return False

    def lance_row_ids(self, rowids: Any) -> np.ndarray:
        """The ``_rowid`` that Lance gives the rows at these bitshard row ids
        (row addresses), uint64, in the order given: the stable row ids of a
        dataset that has them, else the row ids themselves (a copy)."""
        return _as_rowids(rowids).astype(np.uint64, copy=True)

    def _take_logical(self, fids: np.ndarray, logical: np.ndarray,
                      columns: list[str]) -> pa.Table:
        """Rows at *live* positions (``0 <= logical < num_rows``) of fragments.

        ``(fids, logical)`` pairs are sorted and unique; rows come back in
        that order. Without deletions, live positions are the offsets.
        """
        offs = np.asarray(logical, dtype=np.int64)
        fids = np.asarray(fids, dtype=np.int64)
        uniq = (fids.astype(np.uint64) << np.uint64(32)) | offs.astype(np.uint64)
        return self._take_unique(uniq, fids, offs, columns)

    def logical_to_offsets(self, fragment_id: int, logical: np.ndarray) -> np.ndarray:
        """Physical offsets (int64) of the live rows at positions ``logical``
        (0-based among a fragment's live rows); equal where nothing is deleted."""
        return np.asarray(logical, dtype=np.int64)

    # -- sampling ------------------------------------------------------------

    def sample(self, column: Optional[str], n: int, seed: int = 0) -> np.ndarray:
        """A uniform random sample of up to ``n`` live rows, without replacement.

        Positions are drawn uniformly over all live rows of all fragments
        (so each fragment contributes in proportion to its live rows) and
        only those rows are read. Same source version + same ``n`` and
        ``seed`` -> the same rows, on any machine.

        Returns
        -------
        numpy.ndarray
            float32, shape ``(min(n, num_rows), d)``, rows in row-id order,
            validated like :meth:`iter_batches`.
        """
        col = self._resolve_column(column)
        dim = self.vector_dim(col)
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InvalidInputError(f"n must be a non-negative integer, got {n!r}")
        frags = [f for f in self.fragments() if f.num_rows > 0]
        total = sum(f.num_rows for f in frags)
        m = min(int(n), total)
        if m == 0:
            return np.zeros((0, dim), dtype=np.float32)
        rng = np.random.default_rng(seed)
        if m == total:
            picks = np.arange(total, dtype=np.int64)
        else:
            picks = np.sort(rng.choice(total, size=m, replace=False, shuffle=False).astype(np.int64))
        starts = np.cumsum([0] + [f.num_rows for f in frags], dtype=np.int64)
        which = np.searchsorted(starts, picks, side="right") - 1
        fids = np.array([f.id for f in frags], dtype=np.int64)[which]
        logical = picks - starts[which]
        table = self._take_logical(fids, logical, [col])

        def locate(i: int) -> str:
            fid = int(fids[i])
            off = self.logical_to_offsets(fid, logical[i:i + 1])[0]
            return f"fragment {fid} row {int(off)}"

        return _arrow_to_vectors(table.column(col), col, dim, locate)

    # -- filtering -----------------------------------------------------------

    def filter_rowids(self, filter: Any, fragment_ids: Optional[Iterable[int]] = None) -> np.ndarray:
        """Sorted uint64 row ids of live rows matching a filter (for prefiltering).

        Parameters
        ----------
        filter : str, pyarrow.compute.Expression or None
            A SQL-like string (``"category = 'a' AND price < 10"``; Lance
            sources only) or a pyarrow Expression (every kind). None matches
            every live row.
        fragment_ids : iterable of int, optional
            Restrict to these fragments.

        Returns
        -------
        numpy.ndarray, uint64, shape ``(m,)``, sorted ascending.
        """
        frags = self._resolve_fragment_ids(fragment_ids)
        if filter is not None and not isinstance(filter, (str, pc.Expression)):
            raise InvalidInputError(
                f"filter must be a str or a pyarrow.compute.Expression, got {type(filter).__name__}"
            )
        if isinstance(filter, str) and not filter.strip():
            filter = None
        if isinstance(filter, str):
            raise InvalidInputError(
                f"string filters need a Lance source; this is a {self.kind} source: "
                f"pass a pyarrow.compute.Expression (e.g. pc.field('x') > 3) instead of {filter!r}"
            )
        parts = [np.zeros(0, dtype=np.uint64)]
        for info in frags:
            if info.num_rows == 0:
                continue
            if filter is None:
                parts.append(make_rowids(info.id, self.live_offsets(info.id)))
                continue
            parts.append(self._filter_fragment(info, filter))
        out = np.concatenate(parts)
        out.sort()
        return out

    def live_offsets(self, fragment_id: int) -> np.ndarray:
        """Sorted uint32 offsets of the live rows of a fragment."""
        info = self.fragment(fragment_id)
        return np.arange(info.physical_rows, dtype=np.uint32)

    def _filter_columns(self) -> list[str]:
        """Columns read to evaluate an Expression: all but list-typed ones."""
        return [f.name for f in self.schema
                if not (pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type)
                        or pa.types.is_large_list(f.type))]

    def _filter_fragment(self, info: FragmentInfo, expr: pc.Expression) -> np.ndarray:
        cols = self._filter_columns()
        if len(cols) < len(self.schema.names):
            try:
                return self._filter_fragment_cols(info, expr, cols)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                pass  # maybe the filter names a list column: retry with every column
        try:
            return self._filter_fragment_cols(info, expr, list(self.schema.names))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise InvalidInputError(f"cannot evaluate filter {expr}: {e}") from None

    def _filter_fragment_cols(self, info: FragmentInfo, expr: pc.Expression,
                              cols: list[str]) -> np.ndarray:
        parts = [np.zeros(0, dtype=np.uint64)]
        for offsets, arrays in self._iter_raw(info.id, cols, DEFAULT_BATCH_SIZE):
            if len(offsets) == 0:
                continue
            names = cols + ["__bitshard_offset"]
            t = pa.table(list(arrays) + [pa.array(offsets, pa.uint32())], names=names)
            kept = t.filter(expr).column("__bitshard_offset").to_numpy(zero_copy_only=False)
            parts.append(make_rowids(info.id, kept))
        return np.concatenate(parts)

    # -- pickling ------------------------------------------------------------

    _TRANSIENT: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in self._TRANSIENT:
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_transient()

    def _reset_transient(self) -> None:
        pass


# ----------------------------------------------------------------------------
# Lance
# ----------------------------------------------------------------------------


def _import_lance():
    try:
        import lance  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - pylance is a dependency
        raise InvalidInputError(f"reading Lance datasets needs pylance: {e}") from None
    return lance


class LanceSource(Source):
    """A Lance dataset, pinned to one version.

    Fragment ids are Lance's. Offsets are physical row positions within the
    fragment (the low half of Lance's row address), so they stay put when
    rows are deleted; ``physical_rows`` counts deleted rows. bitshard row ids
    are Lance *row addresses*: they equal Lance's ``_rowid`` unless the
    dataset uses stable row ids, in which case they differ and bitshard's are
    the addresses. Pickles as (uri, version, storage_options) and reopens
    lazily at that version.
    """

    kind = "lance"
    _TRANSIENT = ("_ds", "_lock", "_live_cache", "_starts", "_metadata", "_field_ids",
                  "_rowid_cache")

    def __init__(self, ds: Any, column: Optional[str],
                 storage_options: Optional[dict] = None) -> None:
        super().__init__(column)
        self._uri = str(ds.uri)
        self._version = int(ds.version)
        if storage_options is None:
            # Carry the options the dataset was opened with (object-store
            # credentials) so that a worker can reopen it; None if there were none.
            try:
                opts = ds.initial_storage_options  # a property in newer pylance
                storage_options = opts() if callable(opts) else opts
            except Exception:  # older pylance: the caller passes storage_options=
                storage_options = None
        self._storage_options = storage_options
        self._schema = ds.schema
        stable = getattr(ds, "has_stable_row_ids", None)
        if stable is None:  # older pylance: look at the fragments' row id metadata
            stable = any(getattr(f.metadata, "row_id_meta", None) is not None
                         for f in ds.get_fragments())
        self._stable_row_ids = bool(stable)
        self._ds = ds
        self._reset_transient(keep_ds=True)

    def _reset_transient(self, keep_ds: bool = False) -> None:
        if not keep_ds:
            self._ds = None
        self._lock = threading.Lock()
        self._live_cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._rowid_cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = \
            collections.OrderedDict()
        self._starts: Optional[dict[int, int]] = None
        self._metadata: Optional[dict[int, Any]] = None
        self._field_ids: dict[str, list[int]] = {}

    @property
    def uri(self) -> str:
        """The dataset URI, as Lance reports it."""
        return self._uri

    @property
    def version(self) -> int:
        """The Lance dataset version this source reads."""
        return self._version

    @property
    def schema(self) -> pa.Schema:
        """The Lance dataset's Arrow schema."""
        return self._schema

    def at_version(self, version: int) -> "LanceSource":
        """The same dataset at another version (InvalidInputError when that
        version cannot be opened, e.g. after ``cleanup_old_versions``)."""
        lance = _import_lance()
        try:
            ds = lance.dataset(self._uri, version=int(version),
                               storage_options=self._storage_options)
        except Exception as e:
            raise InvalidInputError(
                f"cannot open Lance dataset {self._uri} at version {version}: {e}") from None
        return LanceSource(ds, self._column, self._storage_options)

    @property
    def dataset(self):
        """The ``lance.LanceDataset`` at the pinned version (opened on first use)."""
        if self._ds is None:
            lance = _import_lance()
            try:
                self._ds = lance.dataset(self._uri, version=self._version,
                                         storage_options=self._storage_options)
            except Exception as e:
                raise InvalidInputError(
                    f"cannot reopen Lance dataset {self._uri} at version {self._version}: {e}"
                ) from None
        return self._ds

    def _list_fragments(self) -> list[FragmentInfo]:
        out = []
        for f in self.dataset.get_fragments():
            phys = int(f.physical_rows)
            out.append(FragmentInfo(int(f.fragment_id), phys, phys - int(f.num_deletions)))
        return out

    def fragment_identity(self, fragment_id: int, column: Optional[str] = None) -> dict:
        """The identity record of a Lance fragment for ``column``: the data
        files and data overlays holding the column's fields, and the
        physical row count, at the pinned version (the deletion file is
        left out; see :mod:`bitshard.identity`)."""
        from bitshard import identity  # noqa: PLC0415

        col = self._resolve_column(column)
        self.fragment(fragment_id)  # InvalidInputError naming an unknown id
        with self._lock:
            meta = self._metadata
            if meta is None:
                meta = {int(f.fragment_id): f.metadata for f in self.dataset.get_fragments()}
                self._metadata = meta
            fields = self._field_ids.get(col)
            if fields is None:
                fields = identity.lance_field_ids(self.dataset.lance_schema, col)
                self._field_ids[col] = fields
        return identity.lance_record(meta[int(fragment_id)], fields)

    def _lance_fragment(self, fragment_id: int):
        frag = self.dataset.get_fragment(int(fragment_id))
        if frag is None:
            raise InvalidInputError(f"fragment {fragment_id} does not exist in this lance source")
        return frag

    def _iter_raw(self, fragment_id, columns, batch_size):
        frag = self._lance_fragment(fragment_id)
        for batch in frag.to_batches(columns=list(columns), with_row_address=True,
                                     batch_size=int(batch_size)):
            addr = batch.column("_rowaddr").to_numpy(zero_copy_only=False)
            offsets = (addr & _OFFSET_MASK).astype(np.uint32)
            yield offsets, [batch.column(c) for c in columns]

    def _has_deletions(self, fragment_id: int) -> bool:
        info = self.fragment(fragment_id)
        return info.num_rows != info.physical_rows

    @property
    def stable_row_ids(self) -> bool:
        """Whether the dataset has stable row ids (see :class:`Source`)."""
        return self._stable_row_ids

    def lance_row_ids(self, rowids: Any) -> np.ndarray:
        """Lance's ``_rowid`` of the rows at these addresses (see
        :class:`Source`). With stable row ids, looked up in the fragments'
        maps of live offsets to row ids (read from Lance's row id metadata,
        cached for 16 fragments); a deleted or unknown address is refused as
        by :meth:`take`."""
        ids = _as_rowids(rowids)
        if not self._stable_row_ids:
            return ids.astype(np.uint64, copy=True)
        uniq, inverse = np.unique(ids, return_inverse=True)
        if not uniq.size:
            return np.zeros(0, dtype=np.uint64)
        fids, offs = self._check_rowids(uniq)
        return self._stable_ids_unique(uniq, fids, offs)[inverse.reshape(-1)]

    def live_offsets(self, fragment_id: int) -> np.ndarray:
        """Sorted uint32 offsets of the live rows of a fragment (small LRU cache)."""
        if not self._has_deletions(fragment_id):
            return super().live_offsets(fragment_id)
        with self._lock:
            hit = self._live_cache.get(fragment_id)
            if hit is not None:
                self._live_cache.move_to_end(fragment_id)
                return hit
        parts = [o for o, _ in self._iter_raw(fragment_id, [], DEFAULT_BATCH_SIZE)]
        live = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
        with self._lock:
            self._live_cache[fragment_id] = live
            while len(self._live_cache) > _LIVE_CACHE_FRAGMENTS:
                self._live_cache.popitem(last=False)
        return live

    def _deleted_error(self, rowid: int) -> InvalidInputError:
        fid, off = int(rowid) >> 32, int(rowid) & 0xFFFFFFFF
        return InvalidInputError(
            f"row id {int(rowid)}: fragment {fid} row {off} is deleted "
            f"(Lance dataset version {self._version})"
        )

    def _take_unique(self, uniq, fids, offs, columns):
        if not self._stable_row_ids:
            # Row ids are row addresses: one _take_rows call. It drops deleted
            # rows silently, so ask for _rowaddr back and compare.
            want = list(columns) + ([] if "_rowaddr" in columns else ["_rowaddr"])
            t = self.dataset._take_rows(pa.array(uniq, pa.uint64()), columns=want)
            got = t.column("_rowaddr").to_numpy(zero_copy_only=False).astype(np.uint64)
            if got.shape != uniq.shape or not np.array_equal(got, uniq):
                missing = np.setdiff1d(uniq, got)
                if missing.size:
                    raise self._deleted_error(int(missing[0]))
                order = np.argsort(got, kind="stable")  # defensive: restore id order
                t = t.take(pa.array(order))
            return t.select(list(columns))
        # Stable row ids: Lance's _rowid is not the address. Map the addresses
        # to stable ids (the fragments' maps, cached) and take by those: one
        # _take_rows call (LanceDataset.take by position is far slower on a
        # dataset with deletions: seconds for 500 rows, measured in pylance 14).
        ids = self._stable_ids_unique(uniq, fids, offs)
        want = list(columns) + ([] if "_rowaddr" in columns else ["_rowaddr"])
        t = self.dataset._take_rows(pa.array(ids, pa.uint64()), columns=want)
        got = t.column("_rowaddr").to_numpy(zero_copy_only=False).astype(np.uint64)
        if not np.array_equal(got, uniq):  # pragma: no cover - the maps said they exist
            raise InvalidInputError(
                f"Lance dataset {self._uri} version {self._version}: taking {uniq.size} rows "
                f"by stable row id returned other rows")
        return t.select(list(columns))

    def _stable_ids_of(self, fragment_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(sorted uint32 offsets of the live rows, their uint64 stable row
        ids) of a fragment: one scan of its row id and address columns
        (metadata, no data file), cached for 16 fragments (12 bytes a row)."""
        with self._lock:
            hit = self._rowid_cache.get(fragment_id)
            if hit is not None:
                self._rowid_cache.move_to_end(fragment_id)
                return hit
        offs, ids = [], []
        for b in self._lance_fragment(fragment_id).to_batches(
                columns=[], with_row_id=True, with_row_address=True,
                batch_size=DEFAULT_BATCH_SIZE):
            a = b.column("_rowaddr").to_numpy(zero_copy_only=False)
            offs.append((a & _OFFSET_MASK).astype(np.uint32))
            ids.append(b.column("_rowid").to_numpy(zero_copy_only=False).astype(np.uint64))
        o = np.concatenate(offs) if offs else np.zeros(0, np.uint32)
        i = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
        order = np.argsort(o, kind="stable")  # defensive: Lance yields them in order
        got = (o[order], i[order])
        with self._lock:
            self._rowid_cache[fragment_id] = got
            while len(self._rowid_cache) > _LIVE_CACHE_FRAGMENTS:
                self._rowid_cache.popitem(last=False)
        return got

    def _stable_ids_unique(self, uniq: np.ndarray, fids: np.ndarray,
                           offs: np.ndarray) -> np.ndarray:
        """Stable row ids of sorted unique, bounds-checked addresses; a deleted
        row is refused."""
        out = np.empty(uniq.shape, dtype=np.uint64)
        for fid, s, e in _groups(fids):
            live, ids = self._stable_ids_of(int(fid))
            o = offs[s:e].astype(np.int64)
            pos = np.searchsorted(live, o)
            ok = pos < live.size
            ok[ok] = live[pos[ok]] == o[ok]
            if not ok.all():
                raise self._deleted_error(int(uniq[s + int(np.argmin(ok))]))
            out[s:e] = ids[pos]
        return out

    def _dataset_starts(self) -> dict[int, int]:
        """Fragment id -> position of its first live row in dataset (manifest) order."""
        if self._starts is None:
            starts, pos = {}, 0
            for f in self.dataset.get_fragments():
                starts[int(f.fragment_id)] = pos
                pos += int(f.physical_rows) - int(f.num_deletions)
            self._starts = starts
        return self._starts

    def _take_logical(self, fids, logical, columns):
        fids = np.asarray(fids, dtype=np.int64)
        if any(self._has_deletions(int(f)) for f in np.unique(fids)):
            # LanceDataset.take by position is slow on fragments with
            # deletions (seconds for 500 rows in pylance 14): turn the live
            # positions into physical offsets (each fragment's live offsets,
            # from its deletion vector, no data read) and take by row
            # address, one _take_rows call, in the order of the pairs.
            logical = np.asarray(logical, dtype=np.int64)
            offs = np.empty(fids.shape, dtype=np.int64)
            for fid in np.unique(fids):
                sel = fids == fid
                offs[sel] = self.logical_to_offsets(int(fid), logical[sel])
            ids = (fids.astype(np.uint64) << np.uint64(32)) | offs.astype(np.uint64)
            order = np.argsort(ids, kind="stable")
            t = self._take_unique(ids[order], fids[order], offs[order], list(columns))
            return t.take(pa.array(np.argsort(order, kind="stable")))
        # LanceDataset.take indexes live rows in dataset order: one call for all
        # fragments (much faster than LanceFragment.take, fragment by fragment).
        starts = self._dataset_starts()
        fids = np.asarray(fids, dtype=np.int64)
        base = np.array([starts[int(f)] for f in np.unique(fids)], dtype=np.int64)
        base = base[np.searchsorted(np.unique(fids), fids)]
        idx = base + np.asarray(logical, dtype=np.int64)
        return self.dataset.take(pa.array(idx, pa.int64()), columns=list(columns))

    def logical_to_offsets(self, fragment_id, logical):
        logical = np.asarray(logical, dtype=np.int64)
        if not self._has_deletions(fragment_id):
            return logical
        return self.live_offsets(fragment_id)[logical].astype(np.int64)

    def filter_rowids(self, filter: Any, fragment_ids: Optional[Iterable[int]] = None) -> np.ndarray:
        """Sorted uint64 row ids (row addresses) of live rows matching ``filter``.

        ``filter`` is a Lance SQL string (``"id < 10 AND tag = 'x'"``), a
        pyarrow Expression, or None (every live row). Evaluated by Lance's
        scanner with ``with_row_address=True``. An invalid filter raises
        InvalidInputError carrying Lance's message.
        """
        frags = None if fragment_ids is None else self._resolve_fragment_ids(fragment_ids)
        if filter is not None and not isinstance(filter, (str, pc.Expression)):
            raise InvalidInputError(
                f"filter must be a str or a pyarrow.compute.Expression, got {type(filter).__name__}"
            )
        if isinstance(filter, str) and not filter.strip():
            filter = None
        kwargs: dict[str, Any] = {}
        if frags is not None:
            if not frags:
                return np.zeros(0, dtype=np.uint64)
            kwargs["fragments"] = [self._lance_fragment(f.id) for f in frags]
        try:
            scanner = self.dataset.scanner(columns=[], filter=filter, with_row_address=True, **kwargs)
            parts = [b.column("_rowaddr").to_numpy(zero_copy_only=False)
                     for b in scanner.to_batches()]
        except InvalidInputError:
            raise
        except Exception as e:
            raise InvalidInputError(f"filter {filter!r} failed on Lance dataset {self._uri}: {e}") from None
        out = np.concatenate(parts).astype(np.uint64) if parts else np.zeros(0, dtype=np.uint64)
        out.sort()
        return out


# ----------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------


def _split_uri(uri: str) -> tuple[Any, str, str]:
    """(pyarrow filesystem, path within it, normalised uri)."""
    import pyarrow.fs as pafs  # noqa: PLC0415

    parsed = urlparse(uri)
    if len(parsed.scheme) > 1 and parsed.scheme != "file":
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/"), uri.rstrip("/")
    path = parsed.path if parsed.scheme == "file" else uri
    path = os.path.abspath(os.path.expanduser(path))
    return pafs.LocalFileSystem(), path, path


def _parquet_listing(fs: Any, base: str, files: list[str]) -> list[list[Any]]:
    """``[relative name, size, mtime_ns]`` of each file (None, None for a
    file that is gone)."""
    infos = fs.get_file_info(files) if files else []
    items = []
    for f, info in zip(files, infos):
        rel = os.path.relpath(f, base) if f != base else os.path.basename(f)
        mtime = info.mtime_ns if info.type.name == "File" else None
        size = info.size if info.type.name == "File" else None
        items.append([rel, size, mtime])
    return items


def _parquet_token(fs: Any, base: str, files: list[str],
                   listing: Optional[list[list[Any]]] = None) -> str:
    """A stable version token: hash of relative names, sizes and mtimes."""
    items = _parquet_listing(fs, base, files) if listing is None else listing
    blob = json.dumps(items, separators=(",", ":")).encode()
    return "parquet-" + hashlib.sha256(blob).hexdigest()[:32]


class ParquetSource(Source):
    """A Parquet file, or a directory of Parquet files read with pyarrow.

    One file is one fragment. The files are the ones ``pyarrow.dataset``
    discovers under the directory (recursively, skipping names starting with
    ``_`` or ``.``), sorted by path. A fragment id belongs to a file path: by
    default id = position in that order; a Dataset whose indexes recorded
    ids for paths gives those files their recorded ids and the others fresh
    ones (:meth:`adopt_fragment_ids`), so a new file whose name sorts first
    renumbers nothing. Ids are fixed when the source is opened (they travel
    with the pickle).
    ``version`` hashes the files' relative names, sizes and mtimes; a source
    unpickled elsewhere checks it on first use and refuses to read files that
    changed.
    """

    kind = "parquet"
    _TRANSIENT = ("_meta", "_verified", "_lock")

    def __init__(self, uri: str, column: Optional[str]) -> None:
        super().__init__(column)
        import pyarrow.dataset as pds  # noqa: PLC0415

        fs, path, norm = _split_uri(uri)
        info = fs.get_file_info(path)
        if info.type.name == "NotFound":
            raise InvalidInputError(f"no such file or directory: {uri}")
        try:
            if info.type.name == "File":
                files = [path]
                base = os.path.dirname(path)
            else:
                d = pds.dataset(path, filesystem=fs, format="parquet")
                files = sorted(d.files)
                base = path
            if not files:
                raise InvalidInputError(f"no Parquet files found under {uri}")
            schema = pds.dataset(files[0], filesystem=fs, format="parquet").schema
        except InvalidInputError:
            raise
        except Exception as e:
            raise InvalidInputError(f"cannot read Parquet at {uri}: {e}") from None
        if len(files) >= _MAX_OFFSETS:
            raise InvalidInputError(f"{len(files)} Parquet files: at most 2**32 fragments")
        self._fs = fs
        self._uri = norm
        self._base = base
        self._files = files
        #: Fragment id of each file (position in ``files``), and back.
        self._ids = list(range(len(files)))
        self._pos = {i: i for i in range(len(files))}
        self._schema = schema
        self._listing = _parquet_listing(fs, base, files)
        self._version = _parquet_token(fs, base, files, self._listing)
        self._reset_transient()
        self._verified = True

    def _reset_transient(self) -> None:
        self._meta: dict[int, Any] = {}
        self._verified = False
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        """The absolute path or URI the source was opened from."""
        return self._uri

    @property
    def version(self) -> str:
        """Hash of the files' relative names, sizes and modification times."""
        return self._version

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema (of the first file)."""
        return self._schema

    @property
    def files(self) -> list[str]:
        """The Parquet files, in fragment id order (paths within the filesystem)."""
        return [self._files[self._pos[i]] for i in sorted(self._pos)]

    def fragment_paths(self) -> dict[int, str]:
        """Fragment id -> the file's path relative to the dataset root."""
        return {fid: self._listing[pos][0] for fid, pos in self._pos.items()}

    def adopt_fragment_ids(self, ids_by_path: dict[str, int]) -> None:
        """Give each file whose relative path is in ``ids_by_path`` that
        fragment id, and every other file a fresh id above all of those (in
        path order). A Dataset calls this before any use, with the ids its
        indexes recorded; a path's id then never changes."""
        used: set[int] = set()
        ids: list[Optional[int]] = []
        for rel, _size, _mtime in self._listing:
            fid = ids_by_path.get(rel)
            if fid is not None and int(fid) not in used and 0 <= int(fid) < _MAX_OFFSETS:
                used.add(int(fid))
                ids.append(int(fid))
            else:
                ids.append(None)
        nxt = max([int(v) for v in ids_by_path.values()] + [-1]) + 1
        out = []
        for fid in ids:
            if fid is None:
                fid, nxt = nxt, nxt + 1
            out.append(fid)
        if nxt > _MAX_OFFSETS:
            raise InvalidInputError(f"Parquet source {self._uri}: fragment ids past 2**32 - 1")
        self._ids = out
        self._pos = {fid: pos for pos, fid in enumerate(out)}
        self._fragments = None
        self._frag_index = None
        self._meta = {}

    def fragment_identity(self, fragment_id: int, column: Optional[str] = None) -> dict:
        """The identity record of a Parquet fragment: its file's path
        relative to the dataset root, size in bytes and modification time
        (ns), as listed when the source was opened (the column plays no
        part: a file is rewritten whole)."""
        self.fragment(fragment_id)  # InvalidInputError naming an unknown id
        rel, size, mtime = self._listing[self._pos[int(fragment_id)]]
        return {"kind": "parquet", "path": rel, "size": size, "mtime_ns": mtime}

    def _verify(self) -> None:
        if self._verified:
            return
        now = _parquet_token(self._fs, self._base, self._files)
        if now != self._version:
            raise InvalidInputError(
                f"Parquet source {self._uri} changed since it was opened "
                f"(version {self._version}, now {now}): reopen it"
            )
        self._verified = True

    def _file(self, fragment_id: int):
        """A pyarrow.parquet.ParquetFile for a fragment, reusing a cached footer."""
        import pyarrow.parquet as pq  # noqa: PLC0415

        self._verify()
        fid = int(fragment_id)
        if fid not in self._pos:
            raise InvalidInputError(f"fragment {fragment_id} does not exist in this parquet source")
        path = self._files[self._pos[fid]]
        meta = self._meta.get(fid)
        try:
            f = self._fs.open_input_file(path)
            pf = pq.ParquetFile(f, metadata=meta)
        except Exception as e:
            raise InvalidInputError(f"cannot read Parquet file {path} (fragment {fid}): {e}") from None
        if meta is None:
            with self._lock:
                self._meta[fid] = pf.metadata
        return pf

    def _list_fragments(self) -> list[FragmentInfo]:
        def rows(i: int) -> FragmentInfo:
            n = self._file(i).metadata.num_rows
            if n >= _MAX_OFFSETS:
                raise InvalidInputError(
                    f"Parquet file {self._files[self._pos[i]]} has {n} rows: at most 2**32 - 1 "
                    f"per fragment"
                )
            return FragmentInfo(i, n, n)

        self._verify()
        if len(self._files) <= 4:
            return [rows(i) for i in self._ids]
        with ThreadPoolExecutor(max_workers=min(16, len(self._files))) as pool:
            return list(pool.map(rows, self._ids))

    def _iter_raw(self, fragment_id, columns, batch_size):
        pf = self._file(fragment_id)
        start = 0
        missing = [c for c in columns if pf.schema_arrow.get_field_index(c) < 0]
        if missing:
            raise InvalidInputError(
                f"column {missing[0]!r} not found in Parquet file "
                f"{self._files[self._pos[int(fragment_id)]]} "
                f"(fragment {fragment_id})"
            )
        if not columns:
            n = pf.metadata.num_rows
            for s in range(0, n, batch_size):
                yield np.arange(s, min(n, s + batch_size), dtype=np.uint32), []
            return
        for batch in pf.iter_batches(batch_size=int(batch_size), columns=list(columns)):
            n = batch.num_rows
            yield np.arange(start, start + n, dtype=np.uint32), [batch.column(c) for c in columns]
            start += n

    def _take_unique(self, uniq, fids, offs, columns):
        tables = []
        for fid, s, e in _groups(fids):
            tables.append(self._take_file(fid, offs[s:e], columns))
        return pa.concat_tables(tables)

    def _take_file(self, fragment_id: int, offsets: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows at sorted unique offsets of one file, reading only the row groups hit."""
        pf = self._file(fragment_id)
        md = pf.metadata
        bounds = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)],
                           dtype=np.int64)
        rg_of = np.searchsorted(bounds, offsets, side="right") - 1
        parts = []
        for rg, s, e in _groups(rg_of):
            want = offsets[s:e] - bounds[rg]
            pos = 0
            for batch in pf.iter_batches(batch_size=DEFAULT_BATCH_SIZE, row_groups=[rg],
                                         columns=list(columns)):
                n = batch.num_rows
                lo, hi = np.searchsorted(want, [pos, pos + n])
                if hi > lo:
                    parts.append(pa.Table.from_batches([batch]).take(pa.array(want[lo:hi] - pos)))
                pos += n
        if not parts:
            return self._schema.empty_table().select(list(columns))
        return pa.concat_tables(parts)


# ----------------------------------------------------------------------------
# In-memory sources
# ----------------------------------------------------------------------------


class _MemorySource(Source):
    """Shared logic of in-memory sources: fixed-size fragments of ``fragment_size`` rows."""

    def __init__(self, column: Optional[str], nrows: int, fragment_size: int) -> None:
        super().__init__(column)
        self._nrows = int(nrows)
        self._fragment_size = int(fragment_size)

    @property
    def fragment_size(self) -> int:
        """Rows per fragment: fragment i holds rows [i*fs, (i+1)*fs)."""
        return self._fragment_size

    def _list_fragments(self) -> list[FragmentInfo]:
        fs = self._fragment_size
        out = []
        for i, start in enumerate(range(0, self._nrows, fs)):
            n = min(fs, self._nrows - start)
            out.append(FragmentInfo(i, n, n))
        return out

    def _positions(self, fids: np.ndarray, offs: np.ndarray) -> np.ndarray:
        return fids.astype(np.int64) * self._fragment_size + offs.astype(np.int64)


class NumpySource(_MemorySource):
    """An in-memory numpy array of shape (n, d), float16/float32/float64.

    The single column is named ``"vector"`` (or the ``column=`` given to
    :func:`open_source`) and typed fixed_size_list<float, d>. Fragment i holds
    rows ``[i * fragment_size, (i + 1) * fragment_size)``; offsets count from
    the fragment start. Pickles with its data.
    """

    kind = "numpy"
    _TRANSIENT = ("_table_cache",)

    def __init__(self, array: np.ndarray, column: Optional[str], fragment_size: int) -> None:
        name = column if column is not None else NUMPY_COLUMN
        if not isinstance(name, str):
            raise InvalidInputError(f"column must be a str, got {type(name).__name__}")
        if array.ndim != 2:
            raise InvalidInputError(f"numpy source must have shape (n, d), got shape {array.shape}")
        if array.dtype not in (np.float16, np.float32, np.float64):
            raise InvalidInputError(
                f"numpy source has dtype {array.dtype}; bitshard needs float16, float32 or float64"
            )
        if array.shape[1] == 0:
            raise InvalidInputError(f"numpy source has shape {array.shape}: vectors of dimension 0")
        super().__init__(name, array.shape[0], fragment_size)
        self._array = array
        self._schema = pa.schema([pa.field(name, pa.list_(pa.from_numpy_dtype(array.dtype),
                                                          array.shape[1]))])
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._table_cache: Optional[pa.Table] = None

    @property
    def schema(self) -> pa.Schema:
        """One column: fixed_size_list<float16|float32|float64, d>."""
        return self._schema

    @property
    def array(self) -> np.ndarray:
        """The wrapped array, shape (n, d)."""
        return self._array

    def _to_arrow(self, rows: np.ndarray) -> pa.Array:
        rows = np.ascontiguousarray(rows)
        return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), self._array.shape[1])

    def _iter_vectors(self, col, dim, frags, batch_size):
        fs = self._fragment_size
        for info in frags:
            base = info.id * fs
            for s in range(0, info.num_rows, batch_size):
                e = min(info.num_rows, s + batch_size)
                offsets = np.arange(s, e, dtype=np.uint32)
                raw = self._array[base + s: base + e]
                vecs = _check_finite_f32(raw, col, _frag_locator(info.id, offsets))
                yield VectorBatch(info.id, offsets, vecs)

    def _iter_raw(self, fragment_id, columns, batch_size):
        info = self.fragment(fragment_id)
        base = info.id * self._fragment_size
        for s in range(0, info.num_rows, batch_size):
            e = min(info.num_rows, s + batch_size)
            arrays = [self._to_arrow(self._array[base + s: base + e]) for _ in columns]
            yield np.arange(s, e, dtype=np.uint32), arrays

    def take(self, column, rowids):
        col = self._resolve_column(column)
        ids = _as_rowids(rowids)
        d = self._array.shape[1]
        if ids.size == 0:
            return np.zeros((0, d), dtype=np.float32)
        uniq, inverse = np.unique(ids, return_inverse=True)
        fids, offs = self._check_rowids(uniq)
        raw = self._array[self._positions(fids, offs)]
        vecs = _check_finite_f32(raw, col, _rows_locator(fids, offs))
        return np.ascontiguousarray(vecs[inverse.reshape(-1)])

    def float32_rows(self, column):
        self._resolve_column(column)
        a = self._array
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            return None
        return a.view(np.ndarray), self._fragment_size

    def _take_unique(self, uniq, fids, offs, columns):
        rows = self._to_arrow(self._array[self._positions(fids, offs)])
        return pa.table([rows for _ in columns], names=list(columns))


class TableSource(_MemorySource):
    """An in-memory ``pyarrow.Table`` (or RecordBatch), in fixed-size fragments.

    Fragment i holds rows ``[i * fragment_size, (i + 1) * fragment_size)``.
    Any column may be the vector column; the others are available to
    :meth:`take_table` and Expression filters. Pickles with its data.
    """

    kind = "table"

    def __init__(self, table: pa.Table, column: Optional[str], fragment_size: int) -> None:
        super().__init__(column, table.num_rows, fragment_size)
        self._table = table

    @property
    def schema(self) -> pa.Schema:
        """The table's schema."""
        return self._table.schema

    @property
    def table(self) -> pa.Table:
        """The wrapped table."""
        return self._table

    def _iter_raw(self, fragment_id, columns, batch_size):
        info = self.fragment(fragment_id)
        base = info.id * self._fragment_size
        for s in range(0, info.num_rows, batch_size):
            e = min(info.num_rows, s + batch_size)
            sl = self._table.slice(base + s, e - s)
            yield np.arange(s, e, dtype=np.uint32), [sl.column(c) for c in columns]

    def _take_unique(self, uniq, fids, offs, columns):
        pos = pa.array(self._positions(fids, offs))
        return self._table.select(list(columns)).take(pos)


# ----------------------------------------------------------------------------
# open_source
# ----------------------------------------------------------------------------


def _default_vector_column(schema: pa.Schema) -> Optional[str]:
    """The only fixed_size_list<float> column, if there is exactly one."""
    cands = [f.name for f in schema
             if pa.types.is_fixed_size_list(f.type) and f.type.value_type in _FLOAT_TYPES]
    return cands[0] if len(cands) == 1 else None


def _finish(src: Source, column: Optional[str]) -> Source:
    if column is not None:
        src._type_info(column)  # validates presence and type (no I/O)
        src._column = column
    elif src._column is None:
        src._column = _default_vector_column(src.schema)
    return src


def _looks_like_lance(fs: Any, path: str) -> bool:
    info = fs.get_file_info(path.rstrip("/") + "/_versions")
    return info.type.name == "Directory"


def open_source(x: Any, column: Optional[str] = None, fragment_size: Optional[int] = None, *,
                version: Union[int, str, None] = None,
                storage_options: Optional[dict] = None) -> Source:
    """Open the vectors wherever they live.

    Parameters
    ----------
    x :
        * a path or URI (str or os.PathLike) to a Lance dataset (a directory
          ending ``.lance`` or holding ``_versions/``), a Parquet file, or a
          directory of Parquet files; remote URIs (``s3://...``) go through
          Lance or ``pyarrow.fs``;
        * a ``lance.LanceDataset`` (its checked-out version is pinned);
        * a ``pyarrow.Table`` or ``pyarrow.RecordBatch``;
        * a numpy array of shape ``(n, d)``, float16/float32/float64 (column
          ``"vector"`` unless ``column=`` names it).
    column : str, optional
        The default vector column. Checked now (exists, is a float list
        column). If omitted, the only fixed_size_list<float> column, if any.
    fragment_size : int, optional
        Rows per fragment for in-memory data (default 65536, at most 2**32);
        fragment i = rows ``[i * fragment_size, (i + 1) * fragment_size)``.
        Refused for Lance and Parquet, whose fragments are their own.
    version : int or str, optional
        Lance only: the version (or tag) to open (default: the latest).
    storage_options : dict, optional
        Lance only: passed to ``lance.dataset`` (object store credentials).

    Returns
    -------
    Source

    Raises
    ------
    InvalidInputError
        An unsupported type (named in the message), a path that does not
        exist or cannot be read, or a bad ``column`` / ``fragment_size``.
    """
    lance: Any = None
    try:
        import lance as _lance  # noqa: PLC0415

        lance = _lance
    except ImportError:  # pragma: no cover
        pass

    in_memory = isinstance(x, (np.ndarray, pa.Table, pa.RecordBatch))
    if fragment_size is not None and not in_memory:
        raise InvalidInputError(
            "fragment_size applies only to in-memory sources (numpy arrays and pyarrow Tables)"
        )
    if (version is not None or storage_options is not None) and in_memory:
        raise InvalidInputError("version and storage_options apply only to Lance sources")

    if in_memory:
        fs_rows = DEFAULT_FRAGMENT_SIZE if fragment_size is None else \
            validate.positive_integer("fragment_size", fragment_size, upper=_MAX_OFFSETS)
        if isinstance(x, np.ndarray):
            return NumpySource(x, column, fs_rows)
        table = pa.Table.from_batches([x]) if isinstance(x, pa.RecordBatch) else x
        return _finish(TableSource(table, None, fs_rows), column)

    if lance is not None and isinstance(x, lance.LanceDataset):
        if version is not None:
            raise InvalidInputError("version= is for URIs; check out the LanceDataset instead")
        return _finish(LanceSource(x, None, storage_options), column)

    if isinstance(x, (str, os.PathLike)):
        uri = os.fspath(x)
        if isinstance(uri, bytes):
            uri = uri.decode()
        if uri.rstrip("/").endswith(".lance"):
            is_lance, norm = True, _split_uri(uri)[2] if "://" not in uri else uri.rstrip("/")
        else:
            fs, path, norm = _split_uri(uri)
            is_lance = _looks_like_lance(fs, path)
        if not is_lance and (version is not None or storage_options is not None):
            raise InvalidInputError(f"version and storage_options apply only to Lance sources: {uri}")
        if is_lance:
            if lance is None:
                raise InvalidInputError(f"reading the Lance dataset {uri} needs pylance")
            try:
                ds = lance.dataset(norm, version=version, storage_options=storage_options)
            except Exception as e:
                raise InvalidInputError(f"cannot open Lance dataset {uri}: {e}") from None
            return _finish(LanceSource(ds, None, storage_options), column)
        return _finish(ParquetSource(uri, None), column)

    raise InvalidInputError(
        f"cannot open a source from a {type(x).__module__}.{type(x).__qualname__}: expected a "
        "path or URI (Lance dataset, Parquet file or directory), a lance.LanceDataset, a "
        "pyarrow.Table or a numpy array of shape (n, d)"
    )
