"""Writes the seed corpus of fuzz_query_values (fuzz/fuzz_query_values.c):
one small case per hard value (NaN, +-Inf, +-0.0, 2**40 and its neighbours,
FLT_MAX, subnormals) in each place it can appear (centroid, row, query),
the refused eps0 values, all-equal, all-zero and query-equals-row cases,
and ordinary builds across dimension, bits, metric and rotation.
Deterministic; run from the repository root after changing the layout:
    python3 fuzz/gen_corpus_query_values.py fuzz/corpus/query_values
Layout (one byte each): dimension index, bits - 1, metric | rotation << 2 |
mode << 3, rows - 1, partitions - 1, k - 1, nprobes - 1, refine factor,
eps0 index; then centroids, rows and query as value selectors (see
fuzz_draw_value: < 16 a hard case, 16..31 four raw bytes follow, else
(s - 144) / 16)."""

from __future__ import annotations

import os
import random
import struct
import sys

DIMS = [1, 2, 3, 5, 8, 16, 31, 64, 65, 100]
HARD = {"zero": 0, "negzero": 1, "nan": 4, "inf": 5, "neginf": 6, "max": 7,
        "negmax": 8, "above": 9, "below": 10, "fltmax": 11, "subnormal": 12,
        "negsubnormal": 13, "fltmin": 14, "huge": 15}


def case(dim_i, bits, metric, rotation, mode, rows, parts, k, nprobes, refine, eps_i,
         values):
    head = bytes([dim_i, bits - 1, metric | rotation << 2 | mode << 3, rows - 1,
                  parts - 1, k - 1, nprobes - 1, refine, eps_i])
    return head + bytes(values)


def ordinary(rng, n):
    return [rng.randrange(32, 256) for _ in range(n)]


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20261202)
    files = {}
    dim_i, dim = 3, 5
    rows, parts = 6, 2
    n_cent, n_rows = parts * dim, rows * dim
    # One hard value in each place, in a 4-bit l2 build probing everything.
    for name, sel in HARD.items():
        for place, at in (("centroid", 1), ("row", n_cent + 2), ("query", n_cent + n_rows + 3)):
            v = ordinary(rng, n_cent + n_rows + dim)
            v[at] = sel
            files[f"{place}_{name}"] = case(dim_i, 4, 0, 0, 0, rows, parts, 5, 2, 0, 0, v)
    # Raw float bits: a NaN with a payload, a negative subnormal, 2**40 + 1 ulp.
    for name, bits in (("nanpayload", 0x7FC12345), ("subnormal_bits", 0x80000001),
                       ("above_bits", 0x53800001)):
        v = ordinary(rng, n_cent + n_rows) + [16] + list(struct.pack("<I", bits)) + \
            ordinary(rng, dim - 1)
        files[f"raw_{name}"] = case(dim_i, 2, 1, 0, 0, rows, parts, 3, 2, 0, 0, v)
    # Every value at the edge: rows and query of +-2**40 for each metric and bits.
    for metric in range(3):
        for bits in (1, 4, 9):
            v = [7 if i % 2 else 8 for i in range(n_cent + n_rows + dim)]
            files[f"edge_m{metric}_b{bits}"] = case(dim_i, bits, metric, 0, 0, rows, parts,
                                                    4, 2, 0, 2, v)
    # All rows equal, all rows zero, query equal to a row.
    for mode, name in ((1, "allequal"), (2, "allzero"), (3, "queryisrow")):
        for metric in range(3):
            v = ordinary(rng, n_cent + n_rows + dim)
            files[f"{name}_m{metric}"] = case(dim_i, 3, metric, 1, mode, rows, parts, 4, 2,
                                              0, 0, v)
    # Subnormal-only and zero-only vectors under cosine.
    v = [12] * (n_cent + n_rows + dim)
    files["allsubnormal_cos"] = case(dim_i, 9, 1, 0, 0, rows, parts, 3, 2, 0, 0, v)
    v = [0] * (n_cent + n_rows + dim)
    files["allzero_query_cos"] = case(dim_i, 1, 1, 0, 0, rows, parts, 3, 2, 0, 0, v)
    # eps0: each entry of the table, refused ones included.
    for eps_i in range(8):
        files[f"eps0_{eps_i}"] = case(dim_i, 1, 0, 0, 0, rows, parts, 3, 2, 0, eps_i,
                                      ordinary(rng, n_cent + n_rows + dim))
    # Ordinary builds across shapes: each dimension, bits, metric, rotation.
    for i, d in enumerate(DIMS):
        bits = 1 + (i % 9)
        r, p = 3 + i * 3, 1 + i % 4
        files[f"shape_d{d}_b{bits}"] = case(i, bits, i % 3, (i // 3) % 2, 0, r, p,
                                            1 + i, 1 + (i * 7) % 4, i % 4, 0,
                                            ordinary(rng, (p + r + 1) * d))
    for name, data in sorted(files.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{len(files)} files in {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus/query_values")
