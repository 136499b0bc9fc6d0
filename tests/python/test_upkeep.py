"""Upkeep on odd trees (issue 11, "Upkeep leftovers and odd trees"): cleanup
on directories named like segments, the temp files of killed manifest and
build-state writers, files or directories where the index root needs the
other kind, and verify on a manifest whose file name is not its version."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

import bitshard
from bitshard import index as idx
from bitshard.cli import main as cli_main
from bitshard.errors import CorruptIndexError

OLD = time.time() - 7200  # two hours ago: older than cleanup's default age


def _x() -> np.ndarray:
    return np.random.default_rng(5).normal(size=(300, 8)).astype(np.float32)


def _index(tmp_path):
    """A committed 1-bit index "idx" under tmp_path/root; returns (ds, root, segment uuid)."""
    root = str(tmp_path / "root")
    ds = bitshard.dataset(_x(), index_uri=root)
    ds.create_index("vector", "IVF_RQ", name="idx", num_partitions=2, num_bits=1)
    (seg,) = idx.committed_segments(root, "idx")
    return ds, root, seg.uuid


def _orphan(root: str, uuid: str) -> str:
    """An old, unreferenced copy of a segment (what cleanup removes)."""
    path = os.path.join(root, "segments", "ef" * 16 + ".bsseg")
    shutil.copy(os.path.join(root, "segments", uuid + ".bsseg"), path)
    os.utime(path, (OLD, OLD))
    return path


def _old(path: str) -> None:
    os.utime(path, (OLD, OLD))


def test_build_index_commits_when_another_manifest_is_unreadable(tmp_path, caplog):
    # The build's last step lists every manifest to decide which intermediate
    # segments it may delete; an unreadable one made it raise UnboundLocalError
    # after the commit. It now keeps them (for cleanup) and says why.
    ds, root, uuid = _index(tmp_path)
    p = os.path.join(root, "indices", "idx", "v00000001.json")
    with open(p, "rb") as f:
        body = f.read()
    with open(p, "wb") as f:
        f.write(body.replace(b'"num_bits": 1', b'"num_bits": 2', 1))
    out = bitshard.build_index(_x(), "vector", name="other", num_partitions=2, num_bits=1,
                               executor="serial", index_uri=root, progress=False)
    assert out.last_build_stats["version"] == 1
    assert "not removing the build's intermediate segments" in caplog.text
    (final,) = idx.committed_segments(root, "other")
    assert final.uuid == out.last_build_stats["final_segment"] and final.num_rows == 300
