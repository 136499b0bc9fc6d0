"""The shared artifacts: rotation and IVF model."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import bitshard
from bitshard import CorruptIndexError, InvalidInputError


@pytest.mark.parametrize("kind", ["fast", "matrix"])
@pytest.mark.parametrize("dim", [1, 3, 7, 64, 65, 100, 128, 768])
def test_rotation_preserves_norms_and_inner_products(kind, dim):
    rot = bitshard.build_rq_rotation(dim, rotation_type=kind, seed=42)
    rng = np.random.default_rng(dim)
    x = rng.normal(size=(20, dim)).astype(np.float32)
    y = rot.apply(x)
    assert y.shape == (20, rot.padded_dimension)
    assert rot.padded_dimension % 64 == 0 and rot.padded_dimension >= dim
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-4, atol=1e-4 * dim)


@pytest.mark.parametrize("kind", ["fast", "matrix"])
def test_rotation_is_deterministic_and_seed_sensitive(kind):
    a = bitshard.build_rq_rotation(100, rotation_type=kind, seed=7)
    b = bitshard.build_rq_rotation(100, rotation_type=kind, seed=7)
    c = bitshard.build_rq_rotation(100, rotation_type=kind, seed=8)
    x = np.random.default_rng(0).normal(size=(5, 100)).astype(np.float32)
    assert a.to_bytes() == b.to_bytes() and a.fingerprint == b.fingerprint
    assert np.array_equal(a.apply(x), b.apply(x))
    assert a.fingerprint != c.fingerprint
    assert not np.allclose(a.apply(x), c.apply(x))


def test_rotation_round_trips_and_pickles():
    rot = bitshard.build_rq_rotation(384, num_bits=4, dtype="float16")
    assert rot.seed is not None and 0 <= rot.seed < 2**64
    again = bitshard.Rotation.from_bytes(rot.to_bytes())
    assert again == rot and again.fingerprint == rot.fingerprint
    assert (again.dimension, again.num_bits, again.dtype, again.rotation_type, again.seed) == (
        384, 4, "float16", "fast", rot.seed)
    p = pickle.loads(pickle.dumps(rot))
    assert p == rot and p.fingerprint == rot.fingerprint


def test_seed_none_draws_fresh_seeds():
    seeds = {bitshard.build_rq_rotation(64).seed for _ in range(5)}
    assert len(seeds) == 5


def test_build_rq_model_alias():
    m = bitshard.build_rq_model(128, 2, "float32")
    assert isinstance(m, bitshard.Rotation) and m.num_bits == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dimension=0), "dimension must be in 1..65536, got 0"),
        (dict(dimension=-3), "got -3"),
        (dict(dimension=64, num_bits=0), "num_bits must be in 1..9, got 0"),
        (dict(dimension=64, num_bits=10), "num_bits must be in 1..9, got 10"),
        (dict(dimension=64, rotation_type="random"), "rotation_type must be 'fast' or 'matrix'"),
        (dict(dimension=64, dtype="int8"), "dtype must be one of"),
    ],
)
def test_rotation_bad_arguments(kwargs, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bitshard.build_rq_rotation(**kwargs)


def test_rotation_corrupt_bytes():
    data = bytearray(bitshard.build_rq_rotation(64, seed=1).to_bytes())
    with pytest.raises(CorruptIndexError, match="long"):
        bitshard.Rotation.from_bytes(bytes(data[:-1]))
    data[12] ^= 1
    with pytest.raises(CorruptIndexError, match="checksum"):
        bitshard.Rotation.from_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match="magic"):
        bitshard.Rotation.from_bytes(b"X" * len(data))


def test_ivf_model_round_trip_and_fingerprint(tmp_path):
    c = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    m = bitshard.IvfModel(c, "cosine")
    again = bitshard.IvfModel.from_bytes(m.to_bytes())
    assert again.fingerprint == m.fingerprint and again.metric == "cosine"
    assert np.array_equal(again.centroids, c)
    assert pickle.loads(pickle.dumps(m)).fingerprint == m.fingerprint
    assert bitshard.IvfModel(c, "l2").fingerprint != m.fingerprint
    c2 = c.copy()
    c2[3, 3] = np.nextafter(c2[3, 3], np.float32(10))
    assert bitshard.IvfModel(c2, "cosine").fingerprint != m.fingerprint
    m.save(tmp_path / "ivf.bin")
    assert bitshard.IvfModel.load(tmp_path / "ivf.bin") == m
    bad = bytearray(m.to_bytes())
    bad[40] ^= 0xFF
    with pytest.raises(CorruptIndexError, match="checksum"):
        bitshard.IvfModel.from_bytes(bytes(bad))


def test_ivf_model_bad_input():
    with pytest.raises(InvalidInputError, match="2-D"):
        bitshard.IvfModel(np.zeros(5, np.float32))
    with pytest.raises(InvalidInputError, match="non-finite value at partition 1, dimension 2"):
        c = np.zeros((3, 4), np.float32)
        c[1, 2] = np.nan
        bitshard.IvfModel(c)
    with pytest.raises(InvalidInputError, match="unknown metric"):
        bitshard.IvfModel(np.zeros((3, 4), np.float32), "hamming")
