"""Exact search: numpy matmul over the raw float32 vectors (the same code that
makes the ground truth). Its "index" is the raw vectors themselves."""

from __future__ import annotations

import time

import numpy as np

FAMILY = "brute"


def available():
    return None


def variants(opts):
    return [{"label": "brute-force", "num_bits": 32}]


class Handle:
    def __init__(self, base: np.ndarray):
        self.base = np.ascontiguousarray(base, dtype=np.float32)
        self.norms = np.einsum("ij,ij->i", self.base, self.base)


def build(data, params, workdir):
    t = time.perf_counter()
    h = Handle(np.asarray(data.base))
    h.load_seconds = time.perf_counter() - t
    return h


def open(data, params, workdir):  # noqa: A001 - the interface's name
    return Handle(np.asarray(data.base))


def search(h, queries, k, sp):
    q = np.asarray(queries, dtype=np.float32)
    d2 = h.norms[None, :] - 2.0 * (q @ h.base.T)
    kk = min(k, d2.shape[1])
    part = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
    rows = np.arange(q.shape[0])[:, None]
    order = np.argsort(d2[rows, part], axis=1)
    return part[rows, order].astype(np.int64)


def sweep(params, opts):
    return [{"nprobes": None, "refine": None}]


def size(h):
    return int(h.base.nbytes)


def describe():
    return f"numpy {np.__version__}"
