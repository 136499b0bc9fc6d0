"""Crash trials, small: eight SIGKILLed operations on a local index root
(tests/trials/crash_trials.py; ``make trials`` runs the full counts, local
and on a moto S3 server). Every trial must leave the index at its old or its
new version, ``bitshard verify`` passing, no committed row lost, and nothing
behind after ``bitshard cleanup --older-than 0``."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "trials"))
import crash_trials  # noqa: E402

pytest.importorskip("lance")


def test_crash_trials_local(tmp_path):
    # Kills at storage calls only: a kill after a random delay depends on the
    # machine's load (make trials draws both kinds).
    s = crash_trials.run(8, seed=20261202, root_kind="local", work=str(tmp_path / "w"),
                         modes=("point",))
    with open(s["log"]) as f:
        log = f.read()
    assert s["trials"] == 8, log
    assert s["failed"] == [], log
    # The trials did kill: the operations did not simply run to their end
    # (a resumed build's calls depend on where its first run died, so a drawn
    # call may lie past its end: the bound leaves room for that).
    assert s["outcomes"].get("killed", 0) >= 6, log
