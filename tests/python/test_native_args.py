"""The C extension's integer arguments are read without wrapping: every
integer argument of every binding refuses a negative value, a value one past
its C parameter's range and a value far beyond it with InvalidInputError
naming the argument and the value (the unchecked formats used before turned
nprobes=2**32+1 into 1). Buffers too short for the counts are refused the
same way, before C reads them."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import bitshard
from bitshard import InvalidInputError, _native
from bitshard.index import OpenSegment

from conftest import clustered

U32 = 2**32 - 1
U64 = 2**64 - 1
INT = 2**31 - 1
SIZE = sys.maxsize
DIM = 16


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A committed 1-bit index over 400 rows: its segment, searcher and data."""
    x = clustered(400, DIM, clusters=4, seed=1)
    ds = bitshard.dataset(x, index_uri=str(tmp_path_factory.mktemp("native") / "idx"))
    ds.create_index("vector", "IVF_RQ", name="i", num_partitions=4, num_bits=1)
    h = ds.describe_indices()[0]["segments"][0]
    seg = OpenSegment.of(ds.storage, h["uuid"]).native
    return {"x": x, "seg": seg, "searcher": _native.Searcher([seg]), "ds": ds}


def _f32(n):
    return np.zeros(n, np.float32)


def _u64(n):
    return np.zeros(n, np.uint64)


def _params(kw):
    """The shared search settings tuple, with any of them from kw."""
    a = dict(k=10, nprobes=2, eps0=1.9, refine_factor=0, segment_mask=None,
             allowed_rowids=None, allowed_fragments=None, denied_rowids=None)
    a.update((key, kw.pop(key)) for key in list(kw) if key in a)
    return tuple(a.values())


def _search(p, **kw):
    params = _params(kw)
    a = dict(q=p["x"][0], params=params, out_rowids=_u64(400), out_estimates=_f32(400),
             out_lower_bounds=_f32(400), stats=None)
    a.update(kw)
    return p["searcher"].search(*a.values())


def _batch(p, **kw):
    params = _params(kw)
    a = dict(Q=p["x"][:2], nq=2, num_threads=1, params=params, out_rowids=_u64(800),
             out_estimates=_f32(800), out_lower_bounds=_f32(800), out_counts=_u64(2),
             stats=None)
    a.update(kw)
    return p["searcher"].search_batch_into(*a.values())


def _rotation(p, **kw):
    a = dict(kind=0, dim=DIM, seed=7)
    a.update(kw)
    return _native.Rotation(*a.values())


def _apply(p, **kw):
    a = dict(x=_f32(DIM), n=1, in_dim=DIM, out=_f32(64))
    a.update(kw)
    return _native.Rotation(0, DIM, 7).apply(*a.values())


def _builder_args(**kw):
    a = dict(dim=DIM, num_bits=1, metric=0, rotation_kind=0, rotation_seed=7,
             centroids=_f32(DIM), num_partitions=1, column="v", uuid=bytes(16),
             fragment_ids=_u64(1), fragment_rows=np.array([4], np.uint64))
    a.update(kw)
    return a


def _builder(p, **kw):
    return _native.Builder(*_builder_args(**kw).values())


def _add(p, **kw):
    a = dict(x=_f32(4 * DIM), n=4, dim=DIM, fragment_index=0,
             offsets=np.arange(4, dtype=np.uint32))
    a.update(kw)
    return _native.Builder(*_builder_args().values()).add(*a.values())


def _set_threads(p, **kw):
    return _native.Builder(*_builder_args().values()).set_threads(kw["threads"])


def _kmeans(p, **kw):
    a = dict(x=p["x"], n=400, d=DIM, k=2, metric=0, max_iters=2, seed=1,
             out=_f32(2 * DIM), threads=1)
    a.update(kw)
    return _native.kmeans_train(*a.values())


def _fingerprint(p, **kw):
    a = dict(centroids=_f32(DIM), k=1, d=DIM, metric=0)
    a.update(kw)
    return _native.ivf_fingerprint(*a.values())


def _exact(p, **kw):
    a = dict(metric=0, q=_f32(DIM), x=_f32(2 * DIM), n=2, dim=DIM, out=_f32(2))
    a.update(kw)
    return _native.exact_distances(*a.values())


def _gate(p, **kw):
    a = dict(lb=_f32(3), d=_f32(3), heap=_f32(4), heap_n=0, k=4)
    a.update(kw)
    return _native.rerank_gate(*a.values())


def _gated(p, **kw):
    a = dict(metric=0, Q=_f32(DIM), dim=DIM, vecs=_f32(DIM), index=_u64(1),
             lower_bounds=_f32(4), counts=np.array([1], np.uint64), pos=_u64(1),
             end=np.array([1], np.uint64), k=2, heaps=_f32(2), heap_n=_u64(1), dists=_f32(4),
             done=np.zeros(1, np.uint8))
    a.update(kw)
    return _native.rerank_gated(*a.values())


def _gated_array(p, **kw):
    a = dict(metric=0, Q=_f32(DIM), dim=DIM, array=_f32(2 * DIM), fragment_size=2,
             rowids=_u64(4), lower_bounds=_f32(4), counts=np.array([1], np.uint64), k=2,
             kept=_u64(1), dists=_f32(4))
    a.update(kw)
    return _native.rerank_gated_array(*a.values())


def _top_k(p, **kw):
    a = dict(rowids=_u64(4), dists=_f32(4), counts=np.array([3], np.uint64), k=2,
             out_rowids=_u64(2), out_dists=_f32(2))
    a.update(kw)
    return _native.top_k(*a.values())


#: (call, argument, lowest, highest) for every integer argument of every binding.
INTEGER_ARGS = [
    (_rotation, "kind", 0, INT), (_rotation, "dim", 0, U32), (_rotation, "seed", 0, U64),
    (_apply, "n", 0, SIZE), (_apply, "in_dim", 0, U32),
    (_builder, "dim", 0, U32), (_builder, "num_bits", 0, U32), (_builder, "metric", 0, INT),
    (_builder, "rotation_kind", 0, INT), (_builder, "rotation_seed", 0, U64),
    (_builder, "num_partitions", 0, U32),
    (_add, "n", 0, SIZE), (_add, "dim", 0, U32), (_add, "fragment_index", 0, U32),
    (_set_threads, "threads", 1, U32),
    (_search, "k", 0, U32), (_search, "nprobes", 0, U32), (_search, "refine_factor", 0, U32),
    (_batch, "nq", 0, SIZE), (_batch, "num_threads", 1, SIZE), (_batch, "k", 0, U32),
    (_batch, "nprobes", 0, U32), (_batch, "refine_factor", 0, U32),
    (_kmeans, "n", 0, SIZE), (_kmeans, "d", 0, U32), (_kmeans, "k", 0, U32),
    (_kmeans, "metric", 0, INT), (_kmeans, "max_iters", 0, U32), (_kmeans, "seed", 0, U64),
    (_kmeans, "threads", 0, U32),
    (_fingerprint, "k", 0, U32), (_fingerprint, "d", 0, U32), (_fingerprint, "metric", 0, INT),
    (lambda p, **kw: _native.hash64(b"abc", kw["seed"]), "seed", 0, U64),
    (lambda p, **kw: _native.padded_dim(kw["dim"]), "dim", 0, U32),
    (_exact, "metric", 0, INT), (_exact, "n", 0, SIZE), (_exact, "dim", 0, U32),
    (_gate, "heap_n", 0, U32), (_gate, "k", 1, U32),
    (_gated, "metric", 0, INT), (_gated, "dim", 1, U32), (_gated, "k", 1, U32),
    (_gated_array, "metric", 0, INT), (_gated_array, "dim", 1, U32),
    (_gated_array, "k", 1, U32), (_gated_array, "fragment_size", 1, U32),
    (_top_k, "k", 1, U32),
    (lambda p, **kw: _native.set_blas_threads(kw["threads"]), "threads", 1, INT),
]


@pytest.mark.parametrize("call,name,lo,hi", INTEGER_ARGS,
                         ids=[f"{c.__name__}-{n}" for c, n, _, _ in INTEGER_ARGS])
@pytest.mark.parametrize("where", ["below", "above", "huge"])
def test_integer_argument_out_of_range_is_refused(parts, call, name, lo, hi, where):
    value = {"below": lo - 1, "above": hi + 1, "huge": 2**100}[where]
    with pytest.raises(InvalidInputError) as e:
        call(parts, **{name: value})
    assert str(e.value) == f"{name} must be an integer in [{lo}, {hi}], got {value}"


@pytest.mark.parametrize("call,name,lo,hi", INTEGER_ARGS[:3],
                         ids=[n for _, n, _, _ in INTEGER_ARGS[:3]])
def test_integer_argument_of_another_type_is_a_type_error(parts, call, name, lo, hi):
    with pytest.raises(TypeError, match=f"^{name} must be an integer, got float$"):
        call(parts, **{name: 1.0})


def test_integer_arguments_at_their_bounds_are_read_exactly(parts):
    # The largest seed is a valid seed, not -1 wrapped; numpy integers count.
    assert _rotation(parts, seed=U64).fingerprint == _rotation(parts, seed=np.uint64(U64)) \
        .fingerprint != _rotation(parts, seed=0).fingerprint
    assert _native.hash64(b"abc", U64) != _native.hash64(b"abc", 0)
    assert _native.padded_dim(np.int64(65)) == 128


def test_nprobes_past_32_bits_no_longer_probes_one_partition(parts):
    """nprobes=2**32+1 was read as 1: the C search now refuses it, and the
    package caps it at the partition count, as any nprobes above it."""
    stats = np.zeros(4, np.uint64)
    with pytest.raises(InvalidInputError,
                       match=r"^nprobes must be an integer in \[0, 4294967295\], "
                             r"got 4294967297$"):
        _search(parts, nprobes=2**32 + 1, stats=stats)
    assert stats[0] == 0
    ds, q = parts["ds"], parts["x"][:3]
    s = ds.searcher("vector", k=5, nprobes=2**32 + 1)
    s.search(q[0])
    assert s.stats["partitions_probed"] == 4
    want = ds.search("vector", q, k=5, nprobes=4)
    assert ds.search("vector", q, k=5, nprobes=2**32 + 1).equals(want)


def test_short_buffers_are_refused_before_c_reads_them(parts):
    with pytest.raises(InvalidInputError, match="^x holds 16 items, needs at least 32$"):
        _exact(parts, x=_f32(DIM))
    # n * dim past 64 bits does not wrap into a small length
    with pytest.raises(InvalidInputError, match="^x holds 32 items, needs at least "):
        _exact(parts, n=2**62, out=_f32(2))
    with pytest.raises(InvalidInputError, match="^uuid holds 15 items, needs 16$"):
        _builder(parts, uuid=bytes(15))
    with pytest.raises(InvalidInputError, match="^out_counts holds 1 items, needs at least 2$"):
        _batch(parts, out_counts=_u64(1))
    with pytest.raises(InvalidInputError, match="^dim is 8, the builder's rows have 16$"):
        _add(parts, dim=8)
    with pytest.raises(TypeError, match="^q must hold float32, got format 'd' of 8 bytes$"):
        _search(parts, q=np.zeros(DIM))
    with pytest.raises(TypeError, match="^params must be a tuple, got list$"):
        _search(parts, params=[10, 2, 1.9, 0, None, None, None, None])


def test_rerank_bindings_refuse_inconsistent_buffers_before_c_reads_them(parts):
    """The 1-bit rerank's bindings check every length and index first; their
    valid calls give the gate's answers."""
    with pytest.raises(InvalidInputError, match="^index holds 2 items, the round offers 1$"):
        _gated(parts, index=_u64(2))
    with pytest.raises(InvalidInputError, match=r"^index\[0\] = 1 is past the 1 vectors$"):
        _gated(parts, index=np.array([1], np.uint64))
    with pytest.raises(InvalidInputError, match="^query 0: need pos <= end <= counts <= 4 "):
        _gated(parts, end=np.array([2], np.uint64))
    with pytest.raises(InvalidInputError, match="^heaps holds 1 items, needs 2$"):
        _gated(parts, heaps=_f32(1))
    with pytest.raises(InvalidInputError, match="^counts\\[0\\] = 5 is above 4$"):
        _gated_array(parts, counts=np.array([5], np.uint64))
    with pytest.raises(InvalidInputError, match="^out_dists holds 1 items, needs 2$"):
        _top_k(parts, out_dists=_f32(1))
    pos, done, dists = _u64(1), np.zeros(1, np.uint8), _f32(4)
    q = np.arange(DIM, dtype=np.float32)
    assert _gated(parts, Q=q, pos=pos, done=done, dists=dists) is None
    assert pos[0] == 1 and done[0] == 1 and dists[0] == np.float32((q * q).sum())
    # a row id past the array (fragment 1 row 0 is row 2 of 2) comes back
    kept = _u64(1)
    rows = np.array([1 << 32, 0, 0, 0], np.uint64)
    assert _gated_array(parts, rowids=rows, kept=kept) == (0, 1 << 32)
    assert _gated_array(parts, rowids=_u64(4), kept=kept) == (1, None) and kept[0] == 1
    out_r, out_d = _u64(2), _f32(2)
    _top_k(parts, rowids=np.array([7, 3, 5, 0], np.uint64),
           dists=np.array([1, 0.5, 0.5, 9], np.float32), out_rowids=out_r, out_dists=out_d)
    assert out_r.tolist() == [3, 5] and out_d.tolist() == [0.5, 0.5]
