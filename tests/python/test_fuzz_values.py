"""Property-based fuzzing of build and search with adversarial float values:
NaN, infinities, huge finite values, 2**40 and the floats either side of it,
subnormals, -0.0, all-equal and all-zero vectors, through
``bitshard.dataset(numpy)``, ``create_index`` and ``search``. Each call either
raises InvalidInputError exactly when the accepted-values rule (finite,
|v| <= 2**40 after rounding to float32; docs/usage.md) refuses an input, or
answers validly: row ids that exist, each once, finite distances sorted by
(distance, row id), min(k, rows) of them when every partition is probed, and
the same answer from the scalar kernel. The C side of the same checks, with
every SIMD kernel, is fuzz/fuzz_query_values.c."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bitshard
from bitshard import InvalidInputError

EDGE = 2.0 ** 40
F32 = np.float32
HARD = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), EDGE, -EDGE,
        float(np.nextafter(F32(EDGE), F32(np.inf))), float(np.nextafter(F32(EDGE), F32(0))),
        float(np.finfo(F32).max), float(np.finfo(F32).smallest_subnormal), -1e-40,
        float(np.finfo(F32).tiny), 1e20]
# float64 values either side of the float32 rounding of 2**40: the first
# rounds down to 2**40 (accepted), the second up past it (refused).
HARD64 = [EDGE + 1.0, EDGE * (1 + 2.0 ** -23)]

values = st.sampled_from(HARD) | st.floats(-8, 8, width=32)


def accepted(a: np.ndarray) -> bool:
    a = np.asarray(a, dtype=np.float32)
    return bool(np.all(np.isfinite(a)) and np.all(np.abs(a) <= EDGE))


@st.composite
def cases(draw):
    dim = draw(st.sampled_from([1, 2, 3, 5, 8, 17]))
    rows = draw(st.integers(1, 24))
    mode = draw(st.sampled_from(["free", "allequal", "allzero"]))
    flat = draw(st.lists(values, min_size=rows * dim, max_size=rows * dim))
    x = np.array(flat, dtype=np.float32).reshape(rows, dim)
    if mode == "allequal":
        x[:] = x[0]
    elif mode == "allzero":
        x[:] = 0.0
    qdtype = draw(st.sampled_from(["float32", "float64"]))
    qvals = st.sampled_from(HARD + HARD64) if qdtype == "float64" else values
    q = np.array(draw(st.lists(qvals, min_size=dim, max_size=dim)), dtype=qdtype)
    if draw(st.booleans()):
        q = x[draw(st.integers(0, rows - 1))].astype(qdtype)  # a tie at distance 0
    return dict(
        x=x, q=q,
        metric=draw(st.sampled_from(["l2", "cosine", "dot"])),
        bits=draw(st.sampled_from([1, 2, 4, 9])),
        parts=draw(st.integers(1, min(3, rows))),
        k=draw(st.integers(1, 12)),
        refine=draw(st.sampled_from([None, 1, 3])),
        train=draw(st.booleans()),
    )


def _answers(ds, c, simd):
    with pytest.MonkeyPatch.context() as mp:
        if simd:
            mp.setenv("BITSHARD_SIMD", simd)
        else:
            mp.delenv("BITSHARD_SIMD", raising=False)
        t = ds.search("vector", c["q"], k=c["k"], nprobes=c["parts"],
                      refine_factor=c["refine"], num_threads=1)
    return t.column("_rowid").to_numpy(), t.column("_distance").to_numpy()


@settings(max_examples=120, deadline=None)
@given(c=cases())
def test_build_and_search_adversarial_values(c):
    x, rows = c["x"], c["x"].shape[0]
    with tempfile.TemporaryDirectory() as d:
        ds = bitshard.dataset(x, index_uri=d)
        if not accepted(x):
            with pytest.raises(InvalidInputError, match=r"non-finite|too large"):
                ds.create_index("vector", num_partitions=c["parts"], num_bits=c["bits"],
                                metric=c["metric"], seed=1, num_threads=1)
            return
        if c["train"]:
            cent = bitshard.train_ivf(ds, "vector", c["parts"], metric=c["metric"], seed=1,
                                      num_threads=1).centroids
            # k-means keeps split centroids inside the accepted range
            # (test_trained_centroids_stay_accepted below).
            assert np.all(np.abs(cent) <= EDGE), cent
        else:
            cent = x[np.arange(c["parts"]) % rows]
        ds.create_index("vector", num_bits=c["bits"], metric=c["metric"],
                        ivf_centroids=cent, num_threads=1)
        if not accepted(c["q"]):
            with pytest.raises(InvalidInputError, match=r"^query"):
                _answers(ds, c, None)
            return
        ids, dist = _answers(ds, c, None)
        assert ids.size == min(c["k"], rows)  # every partition probed
        assert len(set(ids.tolist())) == ids.size
        assert np.all(ids < rows), ids  # one fragment: row ids are offsets
        assert np.all(np.isfinite(dist)), dist
        order = np.lexsort((ids, dist))
        assert np.array_equal(order, np.arange(ids.size)), (ids, dist)
        sids, sdist = _answers(ds, c, "scalar")
        assert np.array_equal(ids, sids)
        assert np.array_equal(dist.view(np.uint32), sdist.view(np.uint32))


@pytest.mark.parametrize("value", [-EDGE])
def test_trained_centroids_stay_accepted(tmp_path, value):
    """Found by test_build_and_search_adversarial_values: two equal rows at
    -2**40 and two partitions. The rows are accepted, so create_index must
    succeed, but the trained centroids hold a value beyond 2**40."""
    x = np.full((2, 1), value, dtype=np.float32)
    ds = bitshard.dataset(x, index_uri=tmp_path)
    ds.create_index("vector", num_partitions=2, num_bits=1, metric="l2", seed=1)
    assert ds.search("vector", x[0], k=2).num_rows == 2
