"""Argument rules (bitshard.validate): every entry point refuses the same
values with InvalidInputError naming the argument and the value, instead of
wrapping, exploding in numpy or the OS, or silently using a default."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest

import bitshard
from bitshard import InvalidInputError, cli
from bitshard.validate import MAX_K, UINT32_MAX

from conftest import clustered, write_lance


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """500 x 16 rows in 5 fragments, indexed with 4 partitions."""
    x = clustered(500, 16, clusters=4, seed=5)
    root = tmp_path_factory.mktemp("validate")
    ds = bitshard.dataset(x, fragment_size=100, index_uri=str(root / "idx"))
    ds.create_index("vector", "IVF_RQ", num_partitions=4, num_bits=4)
    return ds, x


def raises(message):
    return pytest.raises(InvalidInputError, match="^" + re.escape(message) + "$")


# ------------------------------------------------------------------ search


@pytest.mark.parametrize("kw, message", [
    (dict(nprobes=True), "nprobes must be an integer >= 1, got True"),
    (dict(nprobes=0), "nprobes must be an integer >= 1, got 0"),
    # numpy's MemoryError / "Maximum allowed dimension exceeded" before
    (dict(k=2**40), f"k must be at most {MAX_K}, got {2**40}"),
    (dict(k=2**63), f"k must be at most {MAX_K}, got {2**63}"),
    (dict(k=10, refine_factor=2**62),
     f"k * refine_factor must be at most {MAX_K}, got 10 * {2**62}"),
    (dict(k=MAX_K, refine_factor=2), f"k * refine_factor must be at most {MAX_K}, got "
                                     f"{MAX_K} * 2"),
    # a bare ValueError from int('a') before
    (dict(fragment_ids=["a"]), "fragment_ids must hold integers in [0, 2**32), got 'a' at "
                               "position 0"),
    (dict(fragment_ids=[0, 2**32]), "fragment_ids must hold integers in [0, 2**32), got "
                                    "4294967296 at position 1"),
    (dict(fragment_ids="0"), "fragment_ids must be a sequence of integers, got '0'"),
    (dict(fragment_ids=3), "fragment_ids must be a sequence of integers, got 3"),
    (dict(num_threads=0), "num_threads must be an integer >= 1, got 0"),
])
def test_search_arguments_refused_alike(small, kw, message):
    ds, x = small
    with raises(message):
        ds.search("vector", x[0], **kw)
    with raises(message):
        ds.searcher("vector", **kw)


def test_a_cached_search_does_not_skip_the_rules(small):
    """ds.search keeps prepared searchers by settings; k=True (== 1 as a key)
    must be refused even after a search with k=1."""
    ds, x = small
    ds.search("vector", x[0], k=1, nprobes=3)
    with raises("k must be an integer >= 1, got True"):
        ds.search("vector", x[0], k=True, nprobes=3)
    with raises("fragment_ids must hold integers in [0, 2**32), got '1' at position 0"):
        ds.search("vector", x[0], k=1, nprobes=3, fragment_ids=["1"])
    ds.search("vector", x[0], k=1, nprobes=3, fragment_ids=[1])


def test_nprobes_and_k_at_their_bounds(small):
    ds, x = small
    # nprobes above the partition count is capped, however large: the answer of
    # nprobes=4 (2**32+1 was read as 1 by the C extension; see test_native_args)
    s4 = ds.searcher("vector", k=5, nprobes=4)
    for n in (5, UINT32_MAX, 2**32 + 1, 2**70):
        big = ds.searcher("vector", k=5, nprobes=n)
        for a, b in zip(s4.search(x[:3]), big.search(x[:3])):
            assert a.tobytes() == b.tobytes()
        assert big.nprobes == n and big.stats["partitions_probed"] == 3 * 4
    # k above the row count: padded with NO_ROW / inf, as before
    rows, dists = ds.searcher("vector", k=700, nprobes=4).search(x[0])
    assert rows.shape == (700,) and len(set(rows[:500].tolist())) == 500
    assert (rows[500:] == bitshard.NO_ROW).all() and np.isinf(dists[500:]).all()
    assert ds.searcher("vector", k=MAX_K, refine_factor=1).k == MAX_K


# ------------------------------------------------------------------ builds


def test_create_index_num_partitions_zero_refused_like_build_index(small, tmp_path):
    """create_index(num_partitions=0) used the default silently."""
    ds, x = small
    with raises("num_partitions must be an integer >= 1, got 0"):
        ds.create_index("vector", "IVF_RQ", name="zero", num_partitions=0)
    with raises("num_partitions must be an integer >= 1, got 0"):
        bitshard.build_index(ds, "vector", name="zero", num_partitions=0, executor="serial",
                             index_uri=tmp_path / "b")
    with raises("num_partitions must be an integer >= 1, got 0"):
        bitshard.train_ivf(ds, "vector", 0)


@pytest.mark.parametrize("name", ["a" * 300, "é" * 128, "a\0b", "a/b", "a\\b", ".hidden"])
def test_index_names_refused_before_touching_disk(small, tmp_path, name):
    """300 characters gave OSError (file name too long), NUL a bare ValueError.
    Every entry point refuses a name that cannot be a path component with the
    message of bitshard.names, before any work."""
    ds, x = small
    c = bitshard.IvfModel(x[:4].copy())
    message = f"name is not a usable index name: {name!r}"
    with raises(message):
        ds.create_index("vector", "IVF_RQ", name=name, ivf_centroids=c)
    with raises(message):
        ds.create_index_uncommitted("vector", "IVF_RQ", name=name, ivf_centroids=c)
    with raises(message):
        bitshard.build_index(ds, "vector", name=name, ivf_centroids=c, executor="serial",
                             index_uri=tmp_path / "b")
    seg = ds.create_index_uncommitted("vector", "IVF_RQ", ivf_centroids=c)
    with raises(message):
        ds.commit_existing_index_segments(name, "vector", [seg])
    assert not (tmp_path / "b").exists()


def test_new_index_names_follow_the_strict_pattern(small, tmp_path):
    ds, x = small
    c = bitshard.IvfModel(x[:4].copy())
    fresh = bitshard.dataset(x, fragment_size=100, index_uri=str(tmp_path / "n"))
    with pytest.raises(InvalidInputError, match="^name must be 1 to 128 characters"):
        fresh.create_index("vector", "IVF_RQ", name="b" * 129, ivf_centroids=c)
    fresh.create_index("vector", "IVF_RQ", name="b" * 128, ivf_centroids=c, num_bits=1)
    assert [i["name"] for i in fresh.list_indices()] == ["b" * 128]


def test_ivf_centroids_path_that_does_not_exist(small, tmp_path):
    """It raised FileNotFoundError."""
    ds, x = small
    message = "ivf_centroids: cannot read 'notapath': No such file or directory"
    with raises(message):
        ds.create_index("vector", "IVF_RQ", name="p", ivf_centroids="notapath")
    with raises(message):
        ds.create_index_uncommitted("vector", "IVF_RQ", ivf_centroids="notapath")
    with raises(message):
        bitshard.build_index(ds, "vector", name="p", ivf_centroids="notapath",
                             executor="serial", index_uri=tmp_path / "b")
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    with pytest.raises(InvalidInputError, match=f"ivf_centroids: '{re.escape(str(bad))}' is "
                                                f"not a .npy array"):
        ds.create_index_uncommitted("vector", "IVF_RQ", ivf_centroids=str(bad))


@pytest.mark.parametrize("kw, message", [
    (dict(fragment_ids=["a"]), "fragment_ids must hold integers in [0, 2**32), got 'a' at "
                               "position 0"),
    (dict(fragment_ids=[1.0]), "fragment_ids must hold integers in [0, 2**32), got 1.0 at "
                               "position 0"),
    (dict(num_bits="x"), "num_bits must be an integer in 1..9, got 'x'"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(num_threads=1.5), "num_threads must be an integer >= 1, got 1.5"),
])
def test_create_index_uncommitted_arguments(small, kw, message):
    ds, x = small
    c = bitshard.IvfModel(x[:4].copy())
    with raises(message):
        ds.create_index_uncommitted("vector", "IVF_RQ", ivf_centroids=c, **kw)


@pytest.mark.parametrize("kw, message", [
    (dict(num_bits="x"), "num_bits must be an integer in 1..9, got 'x'"),
    (dict(num_bits=12), "num_bits must be in 1..9, got 12"),
    (dict(seed=-1), "seed must be an integer in [0, 2**64), got -1"),
    (dict(seed=2**64), f"seed must be an integer in [0, 2**64), got {2**64}"),
    (dict(seed=1.5), "seed must be an integer in [0, 2**64), got 1.5"),
    (dict(max_iters=2**32 + 1), "max_iters must be at most 4294967295, got 4294967297"),
    (dict(sample_rate=2.5), "sample_rate must be an integer >= 1, got 2.5"),
    (dict(num_partitions=2**32), "num_partitions must be at most 4294967295, got 4294967296"),
])
def test_build_arguments_refused_alike(small, tmp_path, kw, message):
    """The same rule in create_index, build_index and (where it applies)
    train_ivf; the seed and max_iters used to wrap in the C extension."""
    ds, x = small
    with raises(message):
        ds.create_index("vector", "IVF_RQ", name="t", **kw)
    with raises(message):
        bitshard.build_index(ds, "vector", name="t", executor="serial",
                             index_uri=tmp_path / "b", **kw)
    train = {k: v for k, v in kw.items() if k != "num_bits"}
    if train:
        with raises(message):
            bitshard.train_ivf(ds, "vector", train.pop("num_partitions", 4), **train)


def test_build_rq_rotation_rules():
    with raises("num_bits must be in 1..9, got 0"):
        bitshard.build_rq_rotation(16, num_bits=0)
    with raises("seed must be an integer in [0, 2**64), got -1"):
        bitshard.build_rq_rotation(16, seed=-1)
    with raises("dimension must be an integer >= 1, got True"):
        bitshard.build_rq_rotation(True)


# --------------------------------------------------------------------- CLI


def _cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    return e.value.code, err.getvalue()


@pytest.mark.parametrize("argv, message", [
    (["search", "--column", "vec", "--query-row", "0", "--nprobes", "0"],
     "argument --nprobes: nprobes must be an integer >= 1, got 0"),
    (["search", "--column", "vec", "--query-row", "0", "--k", str(2**40)],
     f"argument --k: k must be at most {MAX_K}, got {2**40}"),
    (["build", "--column", "vec", "--num-bits", "12"],
     "argument --num-bits: num_bits must be in 1..9, got 12"),
    (["build", "--column", "vec", "--seed", str(2**64)],
     f"argument --seed: seed must be an integer in [0, 2**64), got {2**64}"),
])
def test_cli_applies_the_same_rules(tmp_path, argv, message):
    uri = write_lance(tmp_path / "c.lance", clustered(50, 8, seed=1), 50)
    code, err = _cli(argv[0], uri, *argv[1:])
    assert code == 2 and err.rstrip().endswith(message) and "Traceback" not in err
