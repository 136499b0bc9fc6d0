"""Tests of bitshard.sources: Lance, Parquet, numpy and Table sources.

Run: PYTHONPATH=python python -m pytest tests/python/test_sources.py -q
"""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bitshard.errors import InvalidInputError
from bitshard.sources import (
    FragmentInfo,
    Source,
    VectorBatch,
    make_rowids,
    open_source,
    split_rowids,
)

lance = pytest.importorskip("lance")

D = 4


def vectors(n: int, d: int = D, dtype=np.float32, start: int = 0) -> np.ndarray:
    """Row i is [i, i + .25, i + .5, ...]: exact in float16 for i < 512, identifies the row."""
    i = np.arange(start, start + n, dtype=np.float64)[:, None]
    return (i + 0.25 * np.arange(d)[None, :]).astype(dtype)


def fsl(arr: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])


def make_table(n: int, dtype=np.float32, start: int = 0) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    return pa.table({
        "id": pa.array(ids),
        "cat": pa.array(["a" if i % 2 == 0 else "b" for i in ids]),
        "vec": fsl(vectors(n, dtype=dtype, start=start)),
    })


def write_lance(path, n=35, rows_per_file=10, dtype=np.float32, **kw):
    return lance.write_dataset(make_table(n, dtype), str(path), max_rows_per_file=rows_per_file, **kw)


def row_index(vecs: np.ndarray) -> np.ndarray:
    """Invert `vectors`: the original row number of each vector."""
    return np.rint(vecs[:, 0]).astype(np.int64)


def collect(src: Source, column=None, **kw) -> tuple[np.ndarray, np.ndarray]:
    rowids, vecs = [], []
    for b in src.iter_batches(column, **kw):
        assert isinstance(b, VectorBatch)
        assert b.offsets.dtype == np.uint32
        assert b.vectors.dtype == np.float32 and b.vectors.flags.c_contiguous
        assert b.vectors.shape == (len(b.offsets), src.vector_dim(column))
        assert np.all(np.diff(b.offsets.astype(np.int64)) > 0)
        rowids.append(b.rowids)
        vecs.append(b.vectors)
    if not rowids:
        return np.zeros(0, np.uint64), np.zeros((0, D), np.float32)
    return np.concatenate(rowids), np.concatenate(vecs)


def raises(match: str):
    return pytest.raises(InvalidInputError, match=re.escape(match))


# ----------------------------------------------------------------------------
# row ids
# ----------------------------------------------------------------------------


def test_rowid_helpers():
    r = make_rowids(3, np.array([0, 7, 2**32 - 1], dtype=np.uint32))
    assert r.dtype == np.uint64
    assert r.tolist() == [3 << 32, (3 << 32) | 7, (3 << 32) | (2**32 - 1)]
    f, o = split_rowids(r)
    assert f.tolist() == [3, 3, 3] and o.tolist() == [0, 7, 2**32 - 1]


# ----------------------------------------------------------------------------
# Lance
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_lance_basic(tmp_path, dtype):
    ds = write_lance(tmp_path / "v.lance", dtype=dtype)
    src = open_source(str(tmp_path / "v.lance"))
    assert src.kind == "lance"
    assert src.uri.endswith("v.lance")
    assert src.version == ds.version and isinstance(src.version, int)
    assert src.column == "vec"  # the only fixed_size_list<float> column
    assert src.schema.names == ["id", "cat", "vec"]
    assert src.vector_dim("vec") == D
    assert src.vector_dtype("vec") == np.dtype(dtype)
    assert src.fragments() == [FragmentInfo(0, 10, 10), FragmentInfo(1, 10, 10),
                               FragmentInfo(2, 10, 10), FragmentInfo(3, 5, 5)]
    rowids, vecs = collect(src, "vec", batch_size=4)
    f, o = split_rowids(rowids)
    assert f.tolist() == [i // 10 for i in range(35)]
    assert o.tolist() == [i % 10 for i in range(35)]
    np.testing.assert_array_equal(vecs, vectors(35).astype(dtype).astype(np.float32))


def test_lance_batches_stream_and_select(tmp_path):
    write_lance(tmp_path / "v.lance")
    src = open_source(tmp_path / "v.lance", column="vec")  # os.PathLike
    batches = list(src.iter_batches("vec", fragment_ids=[2, 0], batch_size=3))
    assert [b.fragment_id for b in batches] == [2, 2, 2, 2, 0, 0, 0, 0]
    assert max(len(b) for b in batches) <= 3
    assert batches[0].offsets.tolist() == [0, 1, 2]
    assert row_index(batches[0].vectors).tolist() == [20, 21, 22]


def test_lance_take_round_trip(tmp_path):
    write_lance(tmp_path / "v.lance")
    src = open_source(str(tmp_path / "v.lance"))
    rowids, vecs = collect(src)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rowids))
    order = np.concatenate([order, order[:5]])  # duplicates too
    got = src.take("vec", rowids[order])
    assert got.dtype == np.float32 and got.shape == (len(order), D)
    np.testing.assert_array_equal(got, vecs[order])
    assert src.take("vec", np.zeros(0, np.uint64)).shape == (0, D)
    t = src.take_table(rowids[order[:6]], ["id", "_rowid", "cat"])
    assert t.column_names == ["id", "_rowid", "cat"]
    assert t.column("id").to_pylist() == order[:6].tolist()
    assert t.column("_rowid").to_pylist() == rowids[order[:6]].tolist()
    assert t.column("_rowid").type == pa.uint64()


def test_lance_dataset_object_and_version_pinning(tmp_path):
    ds = write_lance(tmp_path / "v.lance", n=20)
    src = open_source(ds)
    v = src.version
    lance.write_dataset(make_table(10, start=20), str(tmp_path / "v.lance"), mode="append")
    assert src.version == v
    assert len(src.fragments()) == 2
    # the pickled source reopens at the pinned version, not the latest
    src2 = pickle.loads(pickle.dumps(src))
    assert src2.version == v and len(src2.fragments()) == 2
    assert len(collect(src2)[0]) == 20
    latest = open_source(str(tmp_path / "v.lance"))
    assert latest.version > v and len(latest.fragments()) == 3
    old = open_source(str(tmp_path / "v.lance"), version=v)
    assert old.version == v and len(old.fragments()) == 2


def test_lance_deletions_keep_physical_offsets(tmp_path):
    ds = write_lance(tmp_path / "v.lance")
    ds.delete("id < 5 OR id = 12")
    src = open_source(str(tmp_path / "v.lance"))
    assert src.fragments()[:2] == [FragmentInfo(0, 10, 5), FragmentInfo(1, 10, 9)]
    rowids, vecs = collect(src, batch_size=4)
    f, o = split_rowids(rowids)
    live = [i for i in range(35) if not (i < 5 or i == 12)]
    assert row_index(vecs).tolist() == live
    assert f.tolist() == [i // 10 for i in live]
    assert o.tolist() == [i % 10 for i in live]  # physical addresses, not live positions
    # row ids agree with Lance's own row addresses
    lt = lance.dataset(str(tmp_path / "v.lance")).to_table(columns=["id"], with_row_address=True)
    assert sorted(lt.column("_rowaddr").to_pylist()) == rowids.tolist()
    # take still works by address, in any order
    order = np.random.default_rng(1).permutation(len(rowids))
    np.testing.assert_array_equal(src.take("vec", rowids[order]), vecs[order])
    # deleted rows are refused
    with raises("fragment 0 row 3 is deleted"):
        src.take("vec", [3])
    with raises("fragment 1 row 2 is deleted"):
        src.take_table(np.array([(1 << 32) | 2], np.uint64), ["id"])


def test_lance_whole_fragment_deleted(tmp_path):
    ds = write_lance(tmp_path / "v.lance")
    ds.delete("id < 10")
    src = open_source(str(tmp_path / "v.lance"))
    assert [f.id for f in src.fragments()] == [1, 2, 3]  # ids are stable, not renumbered
    rowids, vecs = collect(src)
    assert row_index(vecs).tolist() == list(range(10, 35))
    with raises("fragment 0 does not exist"):
        list(src.iter_batches("vec", fragment_ids=[0]))
    with raises("fragment 0 does not exist"):
        src.take("vec", [0])


def test_lance_stable_row_ids_use_addresses(tmp_path):
    ds = write_lance(tmp_path / "v.lance", enable_stable_row_ids=True)
    ds.delete("id < 3 OR id = 15")
    ds.optimize.compact_files(target_rows_per_fragment=100)  # moves rows: new addresses
    ds = lance.dataset(str(tmp_path / "v.lance"))
    ds.delete("id = 20")
    ds = lance.write_dataset(make_table(6, start=35), str(tmp_path / "v.lance"), mode="append")
    src = open_source(ds)
    assert [f.num_rows for f in src.fragments()] == [30, 6]
    rowids, vecs = collect(src)
    live = [i for i in range(41) if not (i < 3 or i in (15, 20))]
    assert row_index(vecs).tolist() == live
    lt = ds.to_table(columns=["id"], with_row_address=True, with_row_id=True)
    assert sorted(lt.column("_rowaddr").to_pylist()) == rowids.tolist()
    assert lt.column("_rowid").to_pylist() != lt.column("_rowaddr").to_pylist()
    order = np.random.default_rng(2).permutation(len(rowids))
    np.testing.assert_array_equal(src.take("vec", rowids[order]), vecs[order])
    t = src.take_table(rowids[order[:5]], ["id"])
    assert t.column("id").to_pylist() == [live[i] for i in order[:5]]
    np.testing.assert_array_equal(row_index(src.sample("vec", 100, seed=0)), live)
    # the address of the deleted row 20 is refused
    frag = src.fragments()[0]
    deleted = [o for o in range(frag.physical_rows)
               if make_rowids(frag.id, [o])[0] not in set(rowids.tolist())]
    assert len(deleted) == 1
    with raises("is deleted"):
        src.take("vec", make_rowids(frag.id, deleted))


def test_lance_null_and_nonfinite_vectors(tmp_path):
    vec = vectors(30)
    vec[23, 2] = np.nan
    arr = fsl(vec)
    mask = np.zeros(30, bool)
    mask[17] = True
    arr_null = pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), D, mask=pa.array(mask))
    t = pa.table({"id": np.arange(30), "vec": arr_null, "ok": arr})
    lance.write_dataset(t, str(tmp_path / "n.lance"), max_rows_per_file=10)
    src = open_source(str(tmp_path / "n.lance"), column="ok")
    with raises("column 'vec' fragment 1 row 7: null vector"):
        list(src.iter_batches("vec"))
    with raises("column 'ok' fragment 2 row 3: non-finite value at dimension 2"):
        list(src.iter_batches("ok"))
    with raises("column 'vec' fragment 1 row 7: null vector"):
        src.take("vec", [(1 << 32) | 7])
    # rows before the bad ones are fine
    assert len(src.take("ok", [(2 << 32) | 2])) == 1


def test_lance_null_element(tmp_path):
    # 12 vectors; vector 10 (fragment 2 row 0 with 5 rows per file) has a null at dimension 2
    values = pa.array([1.0] * 40 + [1.0, 2.0, None, 4.0] + [1.0] * 4, pa.float32())
    t = pa.table({"vec": pa.FixedSizeListArray.from_arrays(values, D)})
    lance.write_dataset(t, str(tmp_path / "n.lance"), max_rows_per_file=5)
    src = open_source(str(tmp_path / "n.lance"))
    with raises("column 'vec' fragment 2 row 0: null vector (null value at dimension 2)"):
        list(src.iter_batches())


def test_lance_filter_rowids(tmp_path):
    ds = write_lance(tmp_path / "v.lance")
    ds.delete("id = 21")
    src = open_source(str(tmp_path / "v.lance"))
    got = src.filter_rowids("id >= 18 AND id < 24")
    assert got.dtype == np.uint64
    assert got.tolist() == [(1 << 32) | 8, (1 << 32) | 9, (2 << 32) | 0, (2 << 32) | 2, (2 << 32) | 3]
    assert src.filter_rowids(pc.field("id") >= 33).tolist() == [(3 << 32) | 3, (3 << 32) | 4]
    assert src.filter_rowids("cat = 'a'", fragment_ids=[1]).tolist() == \
        [(1 << 32) | o for o in (0, 2, 4, 6, 8)]
    assert len(src.filter_rowids(None)) == 34
    assert src.filter_rowids("id < 0").size == 0
    with raises("nosuch"):
        src.filter_rowids("nosuch > 3")
    with raises("failed"):
        src.filter_rowids("id >")
    with raises("fragment 9 does not exist"):
        src.filter_rowids("id > 1", fragment_ids=[9])
    # the ids round-trip through take
    ids = src.filter_rowids("id >= 30")
    np.testing.assert_array_equal(row_index(src.take("vec", ids)), np.arange(30, 35))


def test_lance_pickle(tmp_path):
    write_lance(tmp_path / "v.lance")
    src = open_source(str(tmp_path / "v.lance"))
    src.fragments()
    blob = pickle.dumps(src)
    assert len(blob) < 4096  # uri + version, not the data
    src2 = pickle.loads(blob)
    assert (src2.kind, src2.uri, src2.version, src2.column) == (src.kind, src.uri, src.version, src.column)
    r1, v1 = collect(src)
    r2, v2 = collect(src2)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(src2.take("vec", r1[::-1]), v1[::-1])


def test_lance_refuses_fragment_size(tmp_path):
    write_lance(tmp_path / "v.lance")
    with raises("fragment_size applies only to in-memory"):
        open_source(str(tmp_path / "v.lance"), fragment_size=10)


# ----------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------


def write_parquet_dir(path, sizes=(12, 0, 7), dtype=np.float32, row_group_size=5):
    """Files named so that sorted order != write order; returns the row start of each file."""
    path.mkdir()
    names = [f"part-{i:02d}.parquet" for i in range(len(sizes))]
    starts, s = [], 0
    for name, n in zip(names, sizes):
        pq.write_table(make_table(n, dtype, start=s), str(path / name), row_group_size=row_group_size)
        starts.append(s)
        s += n
    return starts


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_parquet_dir(tmp_path, dtype):
    starts = write_parquet_dir(tmp_path / "pq", dtype=dtype)
    (tmp_path / "pq" / "_SUCCESS").write_text("")  # ignored, like pyarrow.dataset does
    src = open_source(str(tmp_path / "pq"))
    assert src.kind == "parquet" and src.uri == str(tmp_path / "pq")
    assert isinstance(src.version, str) and src.version
    assert src.vector_dtype() == np.dtype(dtype) and src.vector_dim() == D
    assert src.fragments() == [FragmentInfo(0, 12, 12), FragmentInfo(1, 0, 0), FragmentInfo(2, 7, 7)]
    assert [os.path.basename(f) for f in src.files] == ["part-00.parquet", "part-01.parquet",
                                                        "part-02.parquet"]
    rowids, vecs = collect(src, batch_size=4)
    f, o = split_rowids(rowids)
    assert f.tolist() == [0] * 12 + [2] * 7
    assert o.tolist() == list(range(12)) + list(range(7))
    np.testing.assert_array_equal(row_index(vecs), np.arange(19))
    # the empty fragment yields nothing
    assert list(src.iter_batches("vec", fragment_ids=[1])) == []
    # take reads only the row groups it needs, in the order asked
    order = np.random.default_rng(3).permutation(19)
    np.testing.assert_array_equal(src.take("vec", rowids[order]), vecs[order])
    t = src.take_table(rowids[order], ["cat", "id"])
    assert t.column("id").to_pylist() == order.tolist()
    assert starts == [0, 12, 12]


def test_parquet_single_file_and_version_token(tmp_path):
    p = tmp_path / "one.parquet"
    pq.write_table(make_table(9), str(p), row_group_size=4)
    src = open_source(p)
    assert src.kind == "parquet" and src.fragments() == [FragmentInfo(0, 9, 9)]
    assert open_source(str(p)).version == src.version  # stable
    blob = pickle.dumps(src)
    src2 = pickle.loads(blob)
    np.testing.assert_array_equal(collect(src2)[1], collect(src)[1])
    # rewrite the file: a new token, and the stale pickle refuses to read
    pq.write_table(make_table(10), str(p), row_group_size=4)
    os.utime(p, ns=(1, 1))
    assert open_source(p).version != src.version
    stale = pickle.loads(blob)
    with raises("changed since it was opened"):
        list(stale.iter_batches())


def test_parquet_many_files_nested(tmp_path):
    root = tmp_path / "pq"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    names = ["b/x.parquet", "a/z.parquet", "a/y.parquet", "c.parquet", "b/w.parquet", "d.parquet"]
    for k, name in enumerate(names):
        pq.write_table(make_table(3, start=10 * k), str(root / name))
    src = open_source(root)
    rel = [os.path.relpath(f, root) for f in src.files]
    assert rel == sorted(names)  # fragment id = position in sorted path order
    assert [f.id for f in src.fragments()] == list(range(6))
    for fid, name in enumerate(rel):
        k = names.index(name)
        t = src.take_table(make_rowids(fid, [0, 2]), ["id", "_rowid"])
        assert t.column("id").to_pylist() == [10 * k, 10 * k + 2]
    t = src.take_table(make_rowids(5, [1, 0]), ["_rowid"])
    assert t.column("_rowid").to_pylist() == [(5 << 32) | 1, 5 << 32]
    with raises("out of range"):
        src.take_table(make_rowids(5, [3]), ["_rowid"])


def test_parquet_filter_rowids(tmp_path):
    write_parquet_dir(tmp_path / "pq")
    src = open_source(str(tmp_path / "pq"))
    got = src.filter_rowids(pc.field("id") >= 10)
    assert got.dtype == np.uint64
    expect = [(0 << 32) | 10, (0 << 32) | 11] + [(2 << 32) | o for o in range(7)]
    assert got.tolist() == expect
    assert src.filter_rowids(pc.field("cat") == "b", fragment_ids=[2]).tolist() == \
        [(2 << 32) | o for o in range(7) if (12 + o) % 2 == 1]
    with raises("string filters need a Lance source"):
        src.filter_rowids("id > 3")
    with raises("cannot evaluate filter"):
        src.filter_rowids(pc.field("nosuch") > 1)
    assert len(src.filter_rowids(None)) == 19


def test_parquet_errors(tmp_path):
    with raises("no such file or directory"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with raises("no Parquet files"):
        open_source(str(tmp_path / "empty"))
    write_parquet_dir(tmp_path / "pq")
    src = open_source(str(tmp_path / "pq"))
    with raises("row id 12: fragment 0 row 12 is out of range (the fragment has 12 rows)"):
        src.take("vec", [12])
    with raises("row id 12884901888: fragment 3 does not exist"):
        src.take("vec", [3 << 32])
    with raises("fragment 1 row 0 is out of range"):
        src.take("vec", [1 << 32])


# ----------------------------------------------------------------------------
# numpy and Table
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_fragments(dtype):
    arr = vectors(25, dtype=dtype)
    src = open_source(arr, fragment_size=10)
    assert (src.kind, src.uri, src.version, src.column) == ("numpy", None, None, "vector")
    assert src.schema.field("vector").type == pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), D)
    assert src.vector_dtype() == np.dtype(dtype)
    assert src.fragments() == [FragmentInfo(0, 10, 10), FragmentInfo(1, 10, 10), FragmentInfo(2, 5, 5)]
    rowids, vecs = collect(src, "vector", batch_size=4)
    f, o = split_rowids(rowids)
    assert f.tolist() == [i // 10 for i in range(25)] and o.tolist() == [i % 10 for i in range(25)]
    np.testing.assert_array_equal(vecs, arr.astype(np.float32))
    order = np.random.default_rng(4).permutation(25)
    np.testing.assert_array_equal(src.take("vector", rowids[order]), vecs[order])
    np.testing.assert_array_equal(src.take(None, rowids[order]), vecs[order])
    t = src.take_table(rowids[:3], ["vector", "_rowid"])
    assert t.column("_rowid").to_pylist() == rowids[:3].tolist()
    assert t.column("vector").to_pylist()[1] == arr[1].tolist()


def test_numpy_defaults_and_column_name():
    src = open_source(np.zeros((70000, 2), np.float32))
    assert [f.num_rows for f in src.fragments()] == [65536, 70000 - 65536]
    named = open_source(vectors(3), column="emb")
    assert named.column == "emb" and named.schema.names == ["emb"]
    with raises("column 'vector' not found"):
        named.vector_dim("vector")
    empty = open_source(np.zeros((0, D), np.float32))
    assert empty.fragments() == [] and list(empty.iter_batches()) == []
    assert empty.sample(None, 10, seed=1).shape == (0, D)


def test_numpy_nonfinite_messages():
    arr = vectors(25)
    arr[13, 2] = np.inf
    src = open_source(arr, fragment_size=10)
    with raises("column 'vector' fragment 1 row 3: non-finite value at dimension 2"):
        list(src.iter_batches())
    assert len(list(src.iter_batches(fragment_ids=[0, 2]))) == 2
    with raises("fragment 1 row 3: non-finite value at dimension 2"):
        src.take(None, [(1 << 32) | 3, 0])
    big = vectors(3, dtype=np.float64)
    big[2, 1] = 1e39
    with raises("column 'vector' fragment 0 row 2: non-finite value at dimension 1 "
                "(1e+39 overflows float32)"):
        list(open_source(big).iter_batches())
    nan = vectors(3)
    nan[0, 3] = np.nan
    with raises("fragment 0 row 0: non-finite value at dimension 3 (nan)"):
        open_source(nan).sample(None, 3, seed=0)


def test_table_variable_lists():
    rows = [[float(i)] * D for i in range(12)]
    t = pa.table({"id": np.arange(12), "v": pa.array(rows, pa.list_(pa.float64()))})
    src = open_source(t, column="v", fragment_size=5)
    assert src.kind == "table" and src.vector_dim("v") == D and src.vector_dtype("v") == np.float64
    rowids, vecs = collect(src, "v")
    assert vecs.shape == (12, D) and row_index(vecs).tolist() == list(range(12))
    bad = list(rows)
    bad[7] = [1.0] * (D + 1)
    src = open_source(pa.table({"v": pa.array(bad, pa.list_(pa.float32()))}), fragment_size=5)
    assert src.column is None  # variable lists are never picked by default
    with raises("column 'v' fragment 1 row 2: vector has 5 values, expected 4"):
        list(src.iter_batches("v"))
    bad[7] = None
    src = open_source(pa.table({"v": pa.array(bad, pa.list_(pa.float32()))}), fragment_size=5)
    with raises("column 'v' fragment 1 row 2: null vector"):
        list(src.iter_batches("v"))
    bad[7] = [1.0, None, 2.0, 3.0]
    src = open_source(pa.table({"v": pa.array(bad, pa.list_(pa.float32()))}), fragment_size=5)
    with raises("column 'v' fragment 1 row 2: null vector (null value at dimension 1)"):
        list(src.iter_batches("v"))


def test_table_filter_and_take_table():
    src = open_source(make_table(23), fragment_size=10)
    assert src.column == "vec"
    got = src.filter_rowids(pc.field("id").isin([3, 13]))
    assert got.tolist() == [3, (1 << 32) | 3]
    got = src.filter_rowids(pc.field("id") > 18)
    assert got.tolist() == [(1 << 32) | 9] + [(2 << 32) | o for o in range(3)]
    with raises("string filters need a Lance source"):
        src.filter_rowids("id > 3")
    t = src.take_table(got[::-1])
    assert t.column_names == ["id", "cat", "vec"]
    assert t.column("id").to_pylist() == [22, 21, 20, 19]


# ----------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------


def test_sample_determinism_and_uniformity(tmp_path):
    ds = write_lance(tmp_path / "v.lance", n=300, rows_per_file=70)
    ds.delete("id % 3 = 0")
    src = open_source(str(tmp_path / "v.lance"))
    a = src.sample("vec", 50, seed=7)
    b = pickle.loads(pickle.dumps(src)).sample("vec", 50, seed=7)
    c = src.sample("vec", 50, seed=8)
    assert a.shape == (50, D) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rows = row_index(a)
    assert len(set(rows.tolist())) == 50  # without replacement
    assert all(r % 3 != 0 for r in rows)  # never a deleted row
    assert np.all(np.diff(rows) > 0)  # row-id order
    everything = src.sample("vec", 10_000, seed=0)
    assert row_index(everything).tolist() == [i for i in range(300) if i % 3]
    # roughly uniform across fragments
    counts = np.bincount(row_index(src.sample("vec", 150, seed=1)) // 70, minlength=5)
    assert counts.min() > 0


def test_sample_error_names_physical_row(tmp_path):
    vec = vectors(30)
    vec[17, 1] = np.nan
    t = pa.table({"id": np.arange(30), "vec": fsl(vec)})
    ds = lance.write_dataset(t, str(tmp_path / "n.lance"), max_rows_per_file=10)
    ds.delete("id < 15")  # fragment 1 keeps rows 5..9: row 17 is live position 2
    src = open_source(str(tmp_path / "n.lance"))
    with raises("column 'vec' fragment 1 row 7: non-finite value at dimension 1"):
        src.sample("vec", 100, seed=0)


def test_sample_same_rows_across_kinds(tmp_path):
    arr = vectors(40)
    src_np = open_source(arr, fragment_size=10)
    src_tb = open_source(pa.table({"vector": fsl(arr)}), fragment_size=10)
    np.testing.assert_array_equal(src_np.sample(None, 13, seed=3), src_tb.sample("vector", 13, seed=3))
    (tmp_path / "pq").mkdir()
    for i in range(4):
        pq.write_table(pa.table({"vector": fsl(arr[i * 10:(i + 1) * 10])}),
                       str(tmp_path / "pq" / f"{i}.parquet"), row_group_size=3)
    src_pq = open_source(str(tmp_path / "pq"))
    np.testing.assert_array_equal(src_np.sample(None, 13, seed=3), src_pq.sample(None, 13, seed=3))
    lance.write_dataset(pa.table({"vector": fsl(arr)}), str(tmp_path / "l.lance"), max_rows_per_file=10)
    src_l = open_source(str(tmp_path / "l.lance"))
    np.testing.assert_array_equal(src_np.sample(None, 13, seed=3), src_l.sample(None, 13, seed=3))
    with raises("n must be a non-negative integer"):
        src_np.sample(None, -1, seed=0)


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------


def test_unknown_types():
    with raises("cannot open a source from a builtins.dict"):
        open_source({"vec": [1, 2]})
    with raises("builtins.list"):
        open_source([[1.0, 2.0]])
    with raises("shape (n, d), got shape (3,)"):
        open_source(np.zeros(3, np.float32))
    with raises("dtype int64"):
        open_source(np.zeros((3, 2), np.int64))
    with raises("fragment_size must be a positive integer"):
        open_source(np.zeros((3, 2), np.float32), fragment_size=0)


def test_column_errors(tmp_path):
    t = make_table(10)
    t = t.append_column("ints", pa.FixedSizeListArray.from_arrays(pa.array(np.arange(40, dtype=np.int32)), D))
    src = open_source(t)
    with raises("column 'nope' not found; the source has columns ['id', 'cat', 'vec', 'ints']"):
        src.vector_dim("nope")
    with raises("column 'id' has type int64; bitshard needs fixed_size_list"):
        src.vector_dtype("id")
    with raises("column 'ints' has type fixed_size_list<item: int32>[4] (elements int32)"):
        list(src.iter_batches("ints"))
    with raises("column 'cat' has type string"):
        open_source(t, column="cat")
    with raises("column 'nope' not found"):
        src.take_table([0], ["id", "nope"])
    lance.write_dataset(t, str(tmp_path / "t.lance"))
    with raises("column 'id' has type int64"):
        open_source(str(tmp_path / "t.lance"), column="id")


def test_fragment_and_rowid_errors():
    src = open_source(vectors(25), fragment_size=10)
    with raises("fragment 5 does not exist in this numpy source"):
        list(src.iter_batches(fragment_ids=[0, 5]))
    with raises("fragment 1 is listed twice"):
        src.iter_batches(fragment_ids=[1, 1])
    with raises("fragment id must be an integer"):
        src.iter_batches(fragment_ids=["0"])
    with raises("batch_size must be a positive integer"):
        src.iter_batches(batch_size=0)
    with raises("row id 42949672960: fragment 10 does not exist"):
        src.take(None, [10 << 32])
    with raises("row id 8589934597: fragment 2 row 5 is out of range (the fragment has 5 rows)"):
        src.take(None, [(2 << 32) | 5])
    with raises("row id -1 is negative"):
        src.take(None, [-1])
    with raises("rowids must be integers"):
        src.take(None, [1.5])


def test_memory_sources_pickle():
    arr = vectors(25)
    for src in (open_source(arr, fragment_size=10), open_source(make_table(25), fragment_size=10)):
        src2 = pickle.loads(pickle.dumps(src))
        assert (src2.kind, src2.column, src2.fragments()) == (src.kind, src.column, src.fragments())
        np.testing.assert_array_equal(collect(src2)[1], collect(src)[1])


def test_lance_sample_with_deletions_takes_by_address(tmp_path, monkeypatch):
    # LanceDataset.take by position is slow on fragments with deletions:
    # sample() maps live positions to offsets and takes by row address. The
    # rows are those the positions name, checked against Lance's own scan of
    # each fragment (independent of either take path).
    ds = write_lance(tmp_path / "s.lance", n=3000, rows_per_file=500)
    ds.delete("id % 3 = 1 OR (id >= 1000 AND id < 1400)")
    src = open_source(str(tmp_path / "s.lance"))

    def boom(*a, **k):
        raise AssertionError("LanceDataset.take by position was used")

    monkeypatch.setattr(type(src.dataset), "take", boom)
    frags = [f for f in src.fragments() if f.num_rows > 0]
    live_ids = {f.id: lance.dataset(str(tmp_path / "s.lance")).get_fragment(f.id)
                .to_table(columns=["id"]).column("id").to_numpy() for f in frags}
    total = sum(f.num_rows for f in frags)
    assert total == 3000 - 1000 - 400 + len([i for i in range(1000, 1400) if i % 3 == 1])
    for n, seed in ((1, 0), (50, 0), (700, 3), (total, 1)):
        got = src.sample("vec", n, seed=seed)
        rng = np.random.default_rng(seed)
        picks = np.arange(total) if n == total else \
            np.sort(rng.choice(total, size=n, replace=False, shuffle=False))
        starts = np.cumsum([0] + [f.num_rows for f in frags])
        which = np.searchsorted(starts, picks, side="right") - 1
        want = [live_ids[frags[w].id][p - starts[w]] for w, p in zip(which, picks)]
        assert row_index(got).tolist() == [int(i) for i in want]
    # without deletions the position path is kept (one take for all fragments)
    clean = open_source(write_lance(tmp_path / "c.lance", n=100, rows_per_file=30))
    with pytest.raises(AssertionError, match="by position was used"):
        clean.sample("vec", 10, seed=0)
