"""The systems under test, one module each, all with the same small interface.

A system module defines:

    FAMILY                    the module's short name ("faiss", "pylance", ...)
    variants(opts) -> [dict]  one dict per index configuration to measure:
                              {"label": str, "num_bits": int|None, ...build params}
    build(data, params, workdir) -> handle
                              build the index over data.base (or data.lance_uri) and
                              persist it under workdir (runs in its own process; the
                              parent reads its peak RSS)
    open(data, params, workdir) -> handle
                              reopen the persisted index (in a new process)
    search(handle, queries, k, sp) -> int64 array (nq, k)
                              positions in data.base, -1 where fewer than k came back
    sweep(params, opts) -> [dict]
                              search settings to measure, cheapest first within each
                              group; "nprobes" and "refine" are the common keys
    size(handle) -> int       bytes of the index on disk (row ids included)

and optionally:

    set_threads(n)            applied in every child before any work
    stats(handle) -> dict     counters of the last search call (stage counts)
    build_distributed(data, params, workdir, workers) -> (handle, notes)
    available() -> str|None   None when importable, else why not
    prepare(data, params, workdir)
                              untimed set-up before a build (e.g. a private copy
                              of the Lance dataset that the build writes into)
    describe() -> str         the library's version (and kernel), for the rows

``opts`` is a dict with partitions, quick, threads, k, bitshard_source, ...
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, List

FAMILIES = ["bitshard", "pylance", "faiss", "rabitqlib", "brute"]
_MODULES = {
    "bitshard": "bench.systems.bitshard_sys",
    "pylance": "bench.systems.pylance_sys",
    "faiss": "bench.systems.faiss_sys",
    "rabitqlib": "bench.systems.rabitqlib_sys",
    "brute": "bench.systems.brute",
}


def load(family: str) -> ModuleType:
    return importlib.import_module(_MODULES[family])


def nprobes_grid(partitions: int, quick: bool = False) -> List[int]:
    grid = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    if quick:
        grid = [1, 2, 4, 8, 16, 32, 64]
    out = [g for g in grid if g <= partitions]
    if partitions not in out and partitions <= grid[-1]:
        out.append(partitions)
    return out


def dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            fp = os.path.join(root, f)
            if not os.path.islink(fp):
                total += os.path.getsize(fp)
    return total


def sweep_grid(partitions: int, quick: bool, refines: List, extra: Dict = None) -> List[Dict]:
    """nprobes x refine, grouped by refine (cheapest nprobes first in each group)."""
    out = []
    for r in refines:
        for p in nprobes_grid(partitions, quick):
            sp = {"nprobes": p, "refine": r}
            if extra:
                sp.update(extra)
            out.append(sp)
    return out
