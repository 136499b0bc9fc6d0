"""Crash trials, small: eight SIGKILLed operations on a local index root
(tests/trials/crash_trials.py; ``make trials`` runs the full counts, local
and on a moto S3 server). Every trial must leave the index at its old or its
new version, ``bitshard verify`` passing, no committed row lost, and nothing
behind after ``bitshard cleanup --older-than 0``."""

from __future__ import annotations

import os
import sys

import pytest

import bitshard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "trials"))
import crash_trials  # noqa: E402

pytest.importorskip("lance")


def _cleanup_leaves(tmp_path, key: str) -> bool:
    """True if ``cleanup --older-than 0`` leaves the temp file ``key`` (what a
    writer killed at the wrong moment leaves) under a committed index root."""
    import numpy as np

    root = tmp_path / "probe"
    ds = bitshard.dataset(np.zeros((4, 8), np.float32) + np.arange(4)[:, None],
                          index_uri=str(root))
    ds.create_index("vector", "IVF_RQ", name="idx", num_partitions=1, num_bits=1)
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"{")
    bitshard.cleanup(str(root), 0)
    return path.exists()


def test_crash_trials_local(tmp_path):
    # Leftovers cleanup does not remove yet are reported (they are in the log)
    # but do not fail this test; once cleanup removes a kind, it must never
    # be left again. (Both are open: issue 11, "Upkeep leftovers".)
    known = []
    if _cleanup_leaves(tmp_path, "indices/idx/v00000002.json.0123abcd.tmp"):
        known.append("leftover-manifest-tmp")
    if _cleanup_leaves(tmp_path, "builds/idx.json.4242.tmp"):
        known.append("leftover-state-tmp")
    # Kills at storage calls only: a kill after a random delay depends on the
    # machine's load (make trials draws both kinds).
    s = crash_trials.run(8, seed=20261202, root_kind="local", work=str(tmp_path / "w"),
                         known=known, modes=("point",))
    with open(s["log"]) as f:
        log = f.read()
    assert s["trials"] == 8, log
    assert s["failed"] == [], log
    # The trials did kill: the operations did not simply run to their end
    # (a resumed build's calls depend on where its first run died, so a drawn
    # call may lie past its end: the bound leaves room for that).
    assert s["outcomes"].get("killed", 0) >= 6, log
