"""The compaction history of a Lance dataset: where the rows an index covers
went since the version it was built at.

pylance's ``compact_files`` rewrites groups of fragments into new ones. Its
transaction (``LanceDataset.read_transaction``) is a ``Rewrite`` whose groups
list the old fragments, each with a reference to its deletion file, and the
new fragments, but no row-address map. The map is rebuilt here from two facts
of pylance 14: a compaction drops the deleted rows and keeps the order of the
live ones, group by group (old fragments in the order listed, new fragments
filled in the order listed); so live row ``i`` of the concatenated old
fragments is row ``i`` of the concatenated new ones. The live rows of an old
fragment come from its deletion vector at the compaction's read version (no
deletion file: all its rows).

:func:`compaction_history` walks the transactions from the index's source
version to the version the source is pinned at and combines the rewrites it
meets (a row compacted twice follows both). A fragment's rows are remapped
only when the fragment was unchanged, by its identity record, from what the
index encoded to what the compaction read, and the fragment it landed in is
unchanged since; otherwise they are reported as *lost*, with the reason, and
the caller encodes their new rows again. Lost too: every moved row when a
transaction or a deletion file that is needed is gone (``cleanup_old_versions``
removes them, docs/usage.md "Living datasets").

Nothing here reads a vector: only manifests, transactions and deletion
vectors (row addresses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

__all__ = ["DROP", "History", "compaction_history"]

#: A row map entry: the row is gone (deleted, or not remappable).
DROP = np.uint64(0xFFFFFFFFFFFFFFFF)
_MASK = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)

#: The record of a Lance fragment (``FragmentMetadata``) for the indexed
#: column: what determines its vectors (bitshard.identity).
RecordFn = Callable[[Any], Dict[str, Any]]


@dataclass
class History:
    """Where the rows of indexed fragments went.

    Attributes:
        since, until: the Lance versions walked (exclusive, inclusive).
        moves: indexed fragment id -> uint64 array, one entry per physical
            row of the fragment: the row's row id at ``until``, or
            :data:`DROP` (deleted before or by the compaction, or moved into
            a fragment that changed since).
        lost: indexed fragment id -> why its rows cannot be remapped (they
            are re-encoded where they are now).
        compactions: the versions of the ``Rewrite`` transactions combined.
        dropped_rows: rows of ``moves`` dropped because the fragment they
            landed in changed after the compaction (re-encoded).
        gone: why the history could not be followed to the end (a version
            removed by cleanup), or None. Indexed fragments no longer in the
            source are then lost too.
    """

    since: int
    until: int
    moves: Dict[int, np.ndarray] = field(default_factory=dict)
    lost: Dict[int, str] = field(default_factory=dict)
    compactions: List[int] = field(default_factory=list)
    dropped_rows: int = 0
    gone: Optional[str] = None


def _is_rewrite(op: Any) -> bool:
    return type(op).__name__ == "Rewrite" and hasattr(op, "groups")


def _open_version(uri: str, version: int, storage_options: Optional[dict],
                  cache: Dict[int, Any]) -> Any:
    """The dataset at ``version`` (cached), or None when it can no longer be
    opened (cleaned up)."""
    if version not in cache:
        import lance  # noqa: PLC0415

        try:
            cache[version] = lance.dataset(uri, version=int(version),
                                           storage_options=storage_options)
        except Exception:  # noqa: BLE001 - a removed version: the history is gone
            cache[version] = None
    return cache[version]


def _live_offsets(old: Any, read: Any) -> Optional[np.ndarray]:
    """Sorted physical offsets of the live rows of old fragment ``old``
    (``FragmentMetadata`` from the transaction) at the compaction's read
    version ``read`` (a dataset, or None if it is gone); None when they
    cannot be known."""
    rows = int(old.physical_rows)
    if old.deletion_file is None:
        return np.arange(rows, dtype=np.uint64)
    if read is None:
        return None
    try:
        frag = read.get_fragment(int(old.id))
        if frag is None or frag.metadata.deletion_file != old.deletion_file:
            return None
        parts = [b.column("_rowaddr").to_numpy(zero_copy_only=False)
                 for b in frag.to_batches(columns=[], with_row_address=True)]
    except Exception:  # noqa: BLE001 - a deletion file removed by cleanup
        return None
    addr = np.concatenate(parts).astype(np.uint64) if parts else np.zeros(0, np.uint64)
    return addr & _MASK


def _group_steps(group: Any, read: Any) -> Optional[Dict[int, np.ndarray]]:
    """For each old fragment of a rewrite group, its physical offsets' new
    row ids (DROP for deleted rows); None when a deletion vector is gone or
    the counts do not add up (the map cannot be rebuilt)."""
    new_ids = []
    for n in group.new_fragments:
        r = np.arange(int(n.physical_rows), dtype=np.uint64)
        new_ids.append((np.uint64(int(n.id)) << _SHIFT) | r)
    targets = np.concatenate(new_ids) if new_ids else np.zeros(0, np.uint64)
    steps: Dict[int, np.ndarray] = {}
    at = 0
    for old in group.old_fragments:
        live = _live_offsets(old, read)
        if live is None:
            return None
        if at + live.size > targets.size:
            return None
        m = np.full(int(old.physical_rows), DROP, dtype=np.uint64)
        m[live.astype(np.int64)] = targets[at:at + live.size]
        steps[int(old.id)] = m
        at += live.size
    return steps if at == targets.size else None


def compaction_history(dataset: Any, since: int, indexed: Dict[int, Optional[Dict[str, Any]]],
                       record: RecordFn, storage_options: Optional[dict] = None) -> History:
    """Follow the indexed fragments through the compactions after ``since``.

    Args:
        dataset: the ``lance.LanceDataset`` at the version to follow to.
        since: the Lance version the index was built at.
        indexed: fragment id -> the identity record the index encoded it
            with (None when unknown: the record at ``since`` is used when
            that version can still be opened).
        record: the identity record of a ``FragmentMetadata``.
        storage_options: to reopen older versions.

    Returns:
        A :class:`History`. Fragments that no rewrite touched appear in
        neither ``moves`` nor ``lost``.
    """
    until = int(dataset.version)
    hist = History(int(since), until)
    cache: Dict[int, Any] = {until: dataset}
    uri = str(dataset.uri)
    known: Dict[int, Optional[Dict[str, Any]]] = dict(indexed)
    if any(r is None for r in known.values()):
        base = _open_version(uri, since, storage_options, cache)
        for f, r in list(known.items()):
            if r is None and base is not None:
                frag = base.get_fragment(int(f))
                known[f] = None if frag is None else record(frag.metadata)
    # Fragments made by a rewrite, with their record when made.
    products: Dict[int, Dict[str, Any]] = {}
    for v in range(int(since) + 1, until + 1):
        try:
            tx = dataset.read_transaction(v)
        except Exception:  # noqa: BLE001 - removed by cleanup_old_versions
            tx = None
        if tx is None:
            _lose_all(hist, f"the history after version {since} is gone (version {v} was "
                            f"removed by cleanup_old_versions)")
            return hist
        if not _is_rewrite(tx.operation):
            continue
        hist.compactions.append(v)
        read = None
        for group in tx.operation.groups:
            if any(o.deletion_file is not None for o in group.old_fragments) and read is None:
                read = _open_version(uri, int(tx.read_version), storage_options, cache)
            steps = _group_steps(group, read)
            _apply(hist, group, steps, v, known, products, record)
            for n in group.new_fragments:
                products[int(n.id)] = record(n)
    _check_products(hist, dataset, products, record)
    return hist


def _lose_all(hist: History, reason: str) -> None:
    """Every moved row is lost: the rows are re-encoded."""
    for f in list(hist.moves):
        hist.lost[f] = reason
    hist.moves.clear()
    hist.gone = reason


def _apply(hist: History, group: Any, steps: Optional[Dict[int, np.ndarray]], version: int,
           known: Dict[int, Optional[Dict[str, Any]]], products: Dict[int, Dict[str, Any]],
           record: RecordFn) -> None:
    olds = {int(o.id): o for o in group.old_fragments}
    # Rows moved by earlier rewrites into this group's old fragments move on,
    # if the fragment they are in did not change meanwhile.
    for f, a in hist.moves.items():
        frag = a >> _SHIFT
        for g, old in olds.items():
            hit = (a != DROP) & (frag == np.uint64(g))
            if not hit.any():
                continue
            same = g in products and products[g] == record(old)
            if steps is None or not same:
                hist.dropped_rows += int(hit.sum())
                a[hit] = DROP
            else:
                a[hit] = steps[g][(a[hit] & _MASK).astype(np.int64)]
    # Indexed fragments this rewrite reads for the first time.
    for g, old in olds.items():
        if g not in known or g in hist.moves or g in hist.lost:
            continue
        if steps is None:
            hist.lost[g] = (f"the deletion vector it had when compacted at version {version} is "
                            f"gone (cleanup_old_versions)")
        elif known[g] is None:
            hist.lost[g] = f"unverified: its state at version {hist.since} is gone"
        elif known[g] != record(old):
            hist.lost[g] = f"it changed before the compaction at version {version}"
        else:
            hist.moves[g] = steps[g]


def _check_products(hist: History, dataset: Any, products: Dict[int, Dict[str, Any]],
                    record: RecordFn) -> None:
    """Rows that landed in a fragment changed since (or gone) are dropped."""
    current: Dict[int, Optional[Dict[str, Any]]] = {}
    for a in hist.moves.values():
        live = a != DROP
        for p in np.unique(a[live] >> _SHIFT):
            p = int(p)
            if p not in current:
                frag = dataset.get_fragment(p)
                current[p] = None if frag is None else record(frag.metadata)
            if current[p] is None or current[p] != products.get(p):
                hit = live & ((a >> _SHIFT) == np.uint64(p))
                hist.dropped_rows += int(hit.sum())
                a[hit] = DROP
