"""``optimize_indices``: the index follows the data (docs/usage.md, "Living
datasets").

For each index, against the source at the version it is pinned to:

1. Segments whose fragments are all still in the source, unchanged, are
   kept as they are (rows deleted since are skipped at search time).
2. Segments with a fragment that a compaction moved, that was deleted, or
   whose data changed (stale) are *remapped* (``bs_segment_remap``): their
   codes are written under the rows' new addresses (bitshard.compaction
   rebuilds the map from the Lance history), deleted rows and stale
   fragments' rows are dropped. No vector of a remapped row is read.
3. Live rows no segment covers after that (appended fragments, the rows of
   stale fragments, rows of a new fragment that came from nowhere indexed,
   rows whose history is gone) are read and encoded with the committed
   artifacts, row by row: a fragment that mixes remapped and uncovered rows
   gets both in one segment.
4. ``num_indices_to_merge`` decides how many of the kept segments are merged
   with the new ones (pylance's meaning); ``retrain=True`` trains new
   centroids and rebuilds everything.

The result is committed as a replace at the version read
(``expected_version``): a writer that committed meanwhile wins and the
upkeep raises CommitConflictError saying it can be rerun.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _native, identity
from . import index as idx
from .artifacts import METRICS, IvfModel, Rotation
from .compaction import DROP, History, _distinct, compaction_history
from .errors import CommitConflictError, InvalidInputError
from .index import OpenSegment, SegmentHandle

__all__ = ["optimize_index"]

_SHIFT = np.uint64(32)
_MASK = np.uint64(0xFFFFFFFF)
#: Rows read and encoded per batch for uncovered rows.
BATCH = 65536


def _rowids(fid: int, offsets: np.ndarray) -> np.ndarray:
    return (np.uint64(fid) << _SHIFT) | offsets.astype(np.uint64)


def _record_fn(source: Any, column: str) -> Any:
    """The identity record of a Lance ``FragmentMetadata`` for ``column``
    (bitshard.identity), with the column's field ids at the pinned version."""
    fields = identity.lance_field_ids(source.dataset.lance_schema, column)
    return lambda meta: identity.lance_record(meta, fields)


def _segment_map(o: OpenSegment, source_frags: Dict[int, Any], stale: Dict[int, str],
                 hist: Optional[History], live: Any) -> np.ndarray:
    """An affected segment's row map: current fragments keep their rows
    (deleted ones dropped), moved fragments follow the history, stale and
    lost ones are dropped."""
    parts = []
    for fid, rows in o.native.fragments():
        fid, rows = int(fid), int(rows)
        if fid in source_frags and fid not in stale:
            m = np.full(rows, DROP, dtype=np.uint64)
            offs = live(fid)
            m[offs.astype(np.int64)] = _rowids(fid, offs)
        elif hist is not None and fid in hist.moves and fid not in source_frags:
            m = hist.moves[fid].copy()
            if m.size != rows:  # the fragment had other rows when indexed
                m = np.full(rows, DROP, dtype=np.uint64)
        else:
            m = np.full(rows, DROP, dtype=np.uint64)
        parts.append(m)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def optimize_index(ds: Any, name: str, num_indices_to_merge: Optional[int],
                   retrain: bool) -> Dict[str, Any]:
    """Run the upkeep of index ``name`` of Dataset ``ds``; returns its stats
    (see :meth:`bitshard.Dataset.optimize_indices`)."""
    t0 = time.perf_counter()
    st = ds.storage
    source = ds.source
    doc = idx.read_manifest(st, name)
    base_version = doc["version"]
    column = doc["column"]
    handles = idx.committed_segments(st, name, base_version)
    stats: Dict[str, Any] = {
        "name": name, "base_version": base_version, "version": base_version,
        "committed": False, "segments_before": len(handles), "segments_after": len(handles),
        "rows_remapped": 0, "rows_encoded": 0, "rows_read": 0, "rows_dropped": 0,
        "stale_fragments": {}, "lost_fragments": {}, "compactions": [],
        "history_gone": None, "retrained": bool(retrain),
        "seconds_history": 0.0, "seconds_encode": 0.0, "seconds_write": 0.0,
        "seconds_commit": 0.0,
    }
    if not handles:
        return stats
    opened = [idx.open_handle(h, st) for h in handles]
    ivf: IvfModel = opened[0].ivf_model()
    rot: Rotation = opened[0].rotation()
    source_frags = {f.id: f for f in source.fragments()}
    tmp = tempfile.mkdtemp(prefix="bitshard-upkeep-")
    try:
        out: Optional[List[SegmentHandle]]
        if retrain:
            out = _retrain(ds, name, column, ivf, rot, source_frags, stats)
        else:
            out = _upkeep(ds, doc, name, column, handles, opened, ivf, rot, source_frags,
                          num_indices_to_merge, tmp, stats)
        if out is None:
            stats["seconds"] = time.perf_counter() - t0
            return stats
        drift = _drift(doc, opened, out, st, retrain, stats)
        ds._indexes.invalidate()  # our own commit: see it next search
        t_commit = time.perf_counter()
        try:
            # New segments get their fragments' identities at the version
            # read (remapped rows landed in fragments checked unchanged).
            v = idx.commit(st, name, column, out, mode="replace",
                           source_version=source.version, expected_version=base_version,
                           drift=drift, source=source)
        except CommitConflictError:
            raise CommitConflictError(
                f"optimize_indices lost a race on index {name!r}: another writer committed "
                f"version {base_version + 1} after this upkeep read version {base_version}; "
                f"nothing was changed, run optimize_indices again") from None
        stats.update(version=v, committed=True, segments_after=len(out),
                     segments=[h.uuid for h in out],
                     seconds_commit=time.perf_counter() - t_commit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _drift(doc: Dict[str, Any], opened: List[OpenSegment], out: List[SegmentHandle], st: Any,
           retrain: bool, stats: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest's drift record after this upkeep: the rows encoded by
    upkeeps since the centroids were last applied to every row, and those
    indexed rows, each with the sum of their residual norms (the rows' mean
    distance to their centroid; bitshard.upkeep docs)."""
    if retrain:
        segs = [idx.open_handle(h, st) for h in out]
        return {"indexed_rows": sum(int(o.info["num_rows"]) for o in segs),
                "indexed_residual_sum": sum(o.native.residual_sum() for o in segs),
                "new_rows": 0, "new_residual_sum": 0.0}
    prev = doc.get("drift")
    if prev is None:
        prev = {"indexed_rows": sum(int(o.info["num_rows"]) for o in opened),
                "indexed_residual_sum": sum(o.native.residual_sum() for o in opened),
                "new_rows": 0, "new_residual_sum": 0.0}
    return dict(prev, new_rows=prev["new_rows"] + stats["rows_encoded"],
                new_residual_sum=prev["new_residual_sum"] + stats.get("new_residual_sum", 0.0))


def drift_report(record: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A manifest's drift record as describe_indices reports it: rows and
    mean residual norm of the indexed and of the newly encoded rows, and
    their ratio (new / indexed; None without new rows). None when no
    upkeep has run since the index was built."""
    if record is None:
        return None
    ir, nr = int(record["indexed_rows"]), int(record["new_rows"])
    im = record["indexed_residual_sum"] / ir if ir else None
    nm = record["new_residual_sum"] / nr if nr else None
    return {"indexed_rows": ir, "indexed_mean_residual": im, "new_rows": nr,
            "new_mean_residual": nm,
            "ratio": nm / im if (nm is not None and im) else None}


def _retrain(ds: Any, name: str, column: str, ivf: IvfModel, rot: Rotation,
             source_frags: Dict[int, Any], stats: Dict[str, Any]) -> List[SegmentHandle]:
    """New centroids (same count, metric) trained on the current data, and
    every fragment encoded again with them and the same rotation."""
    from .dataset import train_ivf  # noqa: PLC0415

    new_ivf = train_ivf(ds, column, ivf.num_partitions, ivf.metric)
    frags = sorted(source_frags)
    seg = idx.write_segment(ds.source, column, name, ds.storage, new_ivf, rot, frags,
                            idx.new_uuid())
    n = sum(source_frags[f].num_rows for f in frags)
    stats.update(rows_encoded=n, rows_read=n)
    return [seg]


def _upkeep(ds: Any, doc: Dict[str, Any], name: str, column: str,
            handles: List[SegmentHandle],
            opened: List[OpenSegment], ivf: IvfModel, rot: Rotation,
            source_frags: Dict[int, Any], n_merge: Optional[int], tmp: str,
            stats: Dict[str, Any]) -> Optional[List[SegmentHandle]]:
    source = ds.source
    live_cache: Dict[int, np.ndarray] = {}

    def live(fid: int) -> np.ndarray:
        if fid not in live_cache:
            live_cache[fid] = np.asarray(source.live_offsets(fid), dtype=np.uint32)
        return live_cache[fid]

    # ---- which fragments changed
    # The same check the search makes when it opens the index version.
    stale: Dict[int, str] = identity.stale_fragments(source, doc, handles, opened)
    gone = {f for h in handles for f in h.fragment_ids if f not in source_frags}
    hist: Optional[History] = None
    if gone and source.kind == "lance":
        t_hist = time.perf_counter()
        hist = _history(ds, handles, gone, column, stats)
        stats["seconds_history"] = time.perf_counter() - t_hist
    affected = [i for i, h in enumerate(handles)
                if any(f in gone or f in stale for f in h.fragment_ids)]
    kept = [i for i in range(len(handles)) if i not in set(affected)]
    stats["stale_fragments"] = dict(stale)
    # ---- the remap inputs: affected segments with their maps
    covered_by_kept = {f for i in kept for f in handles[i].fragment_ids}
    maps = [_segment_map(opened[i], source_frags, stale, hist, live) for i in affected]
    if covered_by_kept:  # rows moved into a fragment a kept segment covers stay there
        kept_ids = np.array(sorted(covered_by_kept), np.uint64)
        for m in maps:
            m[(m != DROP) & np.isin(m >> _SHIFT, kept_ids)] = DROP
    # ---- the fragments the new segments cover, and the rows to encode
    mapped: set = set()
    for m in maps:
        mapped.update(int(f) for f in _distinct(m[m != DROP] >> _SHIFT))
    remap_frags = sorted(f for f in source_frags if f in mapped)
    remap_frags += sorted(f for h_i in affected for f in handles[h_i].fragment_ids
                          if f in source_frags and f not in mapped and f not in stale
                          and f not in remap_frags)
    delta_frags = sorted(f for f in source_frags
                         if f not in covered_by_kept and f not in remap_frags)
    encode = _rows_to_encode(maps, remap_frags + delta_frags, source_frags, live)
    n_remapped = int(sum(int((m != DROP).sum()) for m in maps))
    stats["rows_remapped"] = n_remapped
    stats["rows_dropped"] = int(sum(int((m == DROP).sum()) for m in maps))
    # ---- the merge plan (pylance's num_indices_to_merge)
    if n_merge is None or n_merge == 0:
        n_keep_merge = 0
    else:
        n_keep_merge = min(int(n_merge), len(kept))
    nothing_new = not affected and not encode
    if nothing_new and n_keep_merge < 2:
        return None  # nothing changed, nothing to merge
    merged_kept = kept[len(kept) - n_keep_merge:] if n_keep_merge else []
    stay = [handles[i] for i in kept if i not in merged_kept]
    # ---- encode the uncovered rows (the only vectors read)
    e_frags = remap_frags + delta_frags
    e_seg: Optional[OpenSegment] = None
    if encode:
        t_enc = time.perf_counter()
        e_seg = _encode_rows(source, column, ivf, rot, e_frags, source_frags, encode, tmp,
                             stats, live)
        stats["seconds_encode"] = time.perf_counter() - t_enc
    # ---- remap: affected (+ encoded rows) (+ merged kept segments)
    inputs: List[Any] = [opened[i].native for i in affected]
    in_maps: List[np.ndarray] = list(maps)
    outputs: List[SegmentHandle] = []
    t_write = time.perf_counter()
    if n_keep_merge == 0:
        # The remapped fragments in one segment, the wholly new ones in a delta.
        if remap_frags:
            ins, ms = list(inputs), list(in_maps)
            if e_seg is not None:
                ins.append(e_seg.native)
                ms.append(_identity_map(e_seg, encode, remap_frags))
            outputs.append(_remap(ds, name, column, ins, ms, remap_frags, source_frags))
        if delta_frags and e_seg is not None and any(f in encode for f in delta_frags):
            dfr = [f for f in delta_frags if f in encode]
            outputs.append(_remap(ds, name, column, [e_seg.native],
                                  [_identity_map(e_seg, encode, dfr)], dfr, source_frags))
    else:
        frags = list(e_frags)
        for i in merged_kept:
            inputs.append(opened[i].native)
            in_maps.append(_segment_map(opened[i], source_frags, {}, None, live))
            frags += list(handles[i].fragment_ids)
        if e_seg is not None:
            inputs.append(e_seg.native)
            in_maps.append(_identity_map(e_seg, encode))
        if inputs:
            outputs.append(_remap(ds, name, column, inputs, in_maps, frags, source_frags))
    stats["seconds_write"] = time.perf_counter() - t_write
    return stay + outputs


def _rows_to_encode(maps: List[np.ndarray], frags: List[int], source_frags: Dict[int, Any],
                    live: Any) -> Dict[int, np.ndarray]:
    """Drop from ``maps`` (in place) the targets that are not live rows of
    ``frags`` (deleted since the compaction), and return, per fragment of
    ``frags``, the sorted offsets of its live rows no map reaches: the
    rows to encode. One ordinal space over ``frags`` (their physical rows
    end to end) keeps this to a few passes over the maps."""
    ids = np.array(sorted(frags), np.uint64)
    phys = np.array([source_frags[int(f)].physical_rows for f in ids], np.int64)
    start = np.zeros(ids.size + 1, np.int64)
    np.cumsum(phys, out=start[1:])
    is_live = np.zeros(int(start[-1]), bool)
    for i, f in enumerate(ids):
        is_live[start[i] + live(int(f)).astype(np.int64)] = True
    reached = np.zeros(is_live.size, bool)
    for m in maps:
        o, ok = _ordinals(m, ids, start, phys)
        ok[ok] = is_live[o[ok]]
        m[~ok] = DROP
        reached[o[ok]] = True
    want = is_live & ~reached
    out: Dict[int, np.ndarray] = {}
    for i, f in enumerate(ids):
        w = np.flatnonzero(want[start[i]:start[i + 1]])
        if w.size:
            out[int(f)] = w.astype(np.uint32)
    return out


def _ordinals(m: np.ndarray, ids: np.ndarray, start: np.ndarray,
              phys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Each entry of the row map ``m``: its ordinal in the space of
    fragments ``ids`` (sorted; fragment i's rows from ``start[i]``, ``phys[i]``
    of them), and whether it has one (not DROP, in ``ids``, within the
    fragment). Fragment ids are small counters, so a table from id to start
    makes this one gather per entry; ids too large for a table are looked
    up by binary search."""
    top = int(ids.max()) if ids.size else -1
    off = (m & _MASK).astype(np.int64)
    if top < 1 << 22:
        base = np.full(top + 2, -1, np.int64)  # [top + 1]: DROP and ids above top
        base[ids.astype(np.int64)] = start[:-1]
        limit = np.zeros(top + 2, np.int64)
        limit[ids.astype(np.int64)] = phys
        fid = np.minimum(m >> _SHIFT, np.uint64(top + 1)).astype(np.intp)
        b = base[fid]
        return b + off, (b >= 0) & (off < limit[fid])
    fid = m >> _SHIFT
    pos = np.minimum(np.searchsorted(ids, fid), ids.size - 1)
    return start[pos] + off, (m != DROP) & (ids[pos] == fid) & (off < phys[pos])


def _identity_map(o: OpenSegment, encoded: Dict[int, np.ndarray],
                  only: Optional[Sequence[int]] = None) -> np.ndarray:
    """The map of a segment onto itself, for the rows it encoded (of the
    fragments in ``only``, when given; the others' rows are dropped)."""
    keep = None if only is None else {int(f) for f in only}
    total = sum(int(rows) for _, rows in o.native.fragments())
    m = np.full(total, DROP, dtype=np.uint64)
    at = 0
    for fid, rows in o.native.fragments():
        offs = encoded.get(int(fid))
        if offs is not None and (keep is None or int(fid) in keep):
            m[at + offs.astype(np.int64)] = _rowids(int(fid), offs)
        at += int(rows)
    return m


def _remap(ds: Any, name: str, column: str, inputs: List[Any], maps: List[np.ndarray],
           frags: List[int], source_frags: Dict[int, Any]) -> SegmentHandle:
    """One remap call writing a segment over ``frags`` (current fragments),
    in fragment id order (as a build over them writes)."""
    frags = sorted(frags)
    ids = np.array(frags, dtype=np.uint64)
    nrows = np.array([source_frags[f].physical_rows for f in frags], dtype=np.uint64)
    uuid = idx.new_uuid()
    maps = [np.ascontiguousarray(m, dtype=np.uint64) for m in maps]
    # The index's choice of external centroids carries over (index.write_flags).
    flags, cents = idx.write_flags(inputs, ds.storage)
    # The new fragments' identities at the version read, as a build over
    # them records: rows were remapped only into fragments the compaction
    # made and that are unchanged since (bitshard.compaction), so these are
    # also their records when the compaction wrote them.
    idents = identity.identities(ds.source, frags, column)
    fps = b"".join(bytes.fromhex(i.fingerprint) for i in idents)
    handle = idx._write_native(ds.storage, uuid, name, lambda path: _native.remap(
        inputs, maps, ids, nrows, bytes.fromhex(uuid), path, flags, fps), cents)
    return dataclasses.replace(handle, identities=idents, source_version=ds.source.version)


def _encode_rows(source: Any, column: str, ivf: IvfModel, rot: Rotation, frags: List[int],
                 source_frags: Dict[int, Any], encode: Dict[int, np.ndarray], tmp: str,
                 stats: Dict[str, Any], live: Any = None) -> OpenSegment:
    """A local temporary segment over ``frags`` holding only the rows in
    ``encode`` (read from the source, encoded with the committed artifacts).
    A fragment whose every live row is to be encoded (``live(f)``: its
    live offsets; an appended fragment) is read by a scan, as a build
    reads it, the others by row address."""
    ids = np.array(frags, dtype=np.uint64)
    rows = np.array([source_frags[f].physical_rows for f in frags], dtype=np.uint64)
    uuid = idx.new_uuid()
    dim = ivf.dimension
    b = _native.Builder(dim, rot.num_bits, METRICS[ivf.metric],
                        0 if rot.rotation_type == "fast" else 1, rot.seed, ivf.centroids,
                        ivf.num_partitions, column, bytes.fromhex(uuid), ids, rows)
    b.set_threads(max(1, min(os.cpu_count() or 1, 256)))
    pos = {f: i for i, f in enumerate(frags)}
    n = 0
    for f in frags:
        offs = encode.get(f)
        if offs is None:
            continue
        if live is not None and offs.size == live(f).size:
            # offs is a subset of the live rows: equal sizes, the same rows
            for batch in source.iter_batches(column, fragment_ids=[f], batch_size=BATCH):
                x = np.ascontiguousarray(batch.vectors, dtype=np.float32)
                b.add(x, x.shape[0], dim, pos[f], np.ascontiguousarray(batch.offsets,
                                                                       dtype=np.uint32))
                n += x.shape[0]
            continue
        for s in range(0, offs.size, BATCH):
            o = offs[s:s + BATCH]
            x = np.ascontiguousarray(source.take(column, _rowids(f, o)), dtype=np.float32)
            b.add(x, x.shape[0], dim, pos[f], np.ascontiguousarray(o, dtype=np.uint32))
            n += x.shape[0]
    path = os.path.join(tmp, f"{uuid}.bsseg")
    b.write(path)
    stats["rows_encoded"] += n
    stats["rows_read"] += n
    out = OpenSegment(path)
    stats["new_residual_sum"] = out.native.residual_sum()
    return out


def _history(ds: Any, handles: List[SegmentHandle], gone: set, column: str,
             stats: Dict[str, Any]) -> History:
    """The compaction history of the fragments no longer in the source."""
    hist, lost = follow_compactions(ds, handles, gone, column)
    stats["compactions"] = list(hist.compactions)
    stats["history_gone"] = hist.gone
    stats["lost_fragments"] = lost
    stats["rows_dropped_after_compaction"] = hist.dropped_rows
    return hist


def follow_compactions(ds: Any, handles: List[SegmentHandle], gone: set, column: str
                       ) -> Tuple[History, Dict[int, str]]:
    """The compaction history (bitshard.compaction) of fragments ``gone``
    (covered by ``handles``, no longer in the Lance source), and the ones
    among them whose rows cannot be remapped, with the reason. Reads no
    vector. Used by optimize_indices and by verify's notices."""
    source = ds.source
    versions = [h.source_version for h in handles
                if any(f in gone for f in h.fragment_ids) and isinstance(h.source_version, int)]
    doc_version = idx.read_manifest(ds.storage, handles[0].name).get("source_version")
    since = min(versions) if versions else doc_version
    indexed: Dict[int, Optional[Dict[str, Any]]] = {}
    for h in handles:
        idents = {i.id: i for i in h.identities}
        for f in h.fragment_ids:
            if f in gone:
                rec = idents.get(f)
                indexed[f] = None if rec is None else rec.record_dict
    if not isinstance(since, int):
        raise InvalidInputError(f"index {handles[0].name!r} records no Lance source version: "
                                f"its moved rows cannot be followed")
    hist = compaction_history(source.dataset, since, indexed, _record_fn(source, column),
                              getattr(source, "_storage_options", None))
    lost = dict(hist.lost)
    for f in gone:
        if f not in hist.moves and f not in lost and hist.gone is not None:
            lost[f] = hist.gone
    return hist, lost
