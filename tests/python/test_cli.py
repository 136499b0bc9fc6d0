"""The ``bitshard`` command line: a round trip through subprocesses (build ->
describe -> search -> verify -> cleanup; the other formats and options run
in-process through ``cli.main``), corruption found by verify, and the exit
codes (2 usage, 1 bitshard error, no traceback)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bitshard
from bitshard import cli
from bitshard import index as idx

from conftest import clustered, write_lance


def run(*args, check=True):
    """``python -m bitshard ARGS`` in a subprocess; returns CompletedProcess."""
    p = subprocess.run([sys.executable, "-m", "bitshard", *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def inproc(*args):
    """``bitshard ARGS`` in this process (faster); returns stdout, asserts exit 0."""
    out, err = io.StringIO(), io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    assert code == 0, err.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A Lance dataset (3000 x 32, 6 fragments) indexed through the CLI."""
    x = clustered(3000, 32, seed=8)
    uri = write_lance(tmp_path_factory.mktemp("cli") / "c.lance", x, 500)
    p = run("build", uri, "--column", "vec", "--num-partitions", "8", "--num-bits", "2",
            "--executor", "processes", "--workers", "2", "--seed", "4", "--json")
    stats = json.loads(p.stdout)
    return uri, x, stats


def test_build_and_describe(built):
    uri, x, stats = built
    assert stats["num_rows"] == 3000 and stats["num_bits"] == 2 and stats["version"] == 1
    assert stats["executor"] == "processes" and stats["tasks"] == 6
    p = run("describe", uri)
    assert "index 'vec_idx' on column 'vec' (version 1)" in p.stdout
    assert f"segment {stats['final_segment']}: 3000 rows, 6 fragment(s)" in p.stdout
    d = json.loads(inproc("describe", uri, "--json"))
    assert d[0]["name"] == "vec_idx" and d[0]["num_bits"] == 2
    assert d[0]["segments"][0]["uuid"] == stats["final_segment"]


def test_search_formats_match_the_api(built, tmp_path):
    uri, x, stats = built
    q = x[:3] + 0.05
    np.save(tmp_path / "q.npy", q)
    want = bitshard.dataset(uri).search("vec", q, k=5, nprobes=4, columns=["id"])
    got = json.loads(run("search", uri, "--column", "vec", "--query-file", tmp_path / "q.npy",
                         "--k", "5", "--nprobes", "4", "--columns", "id",
                         "--format", "json").stdout)
    assert [r["_rowid"] for r in got] == want.column("_rowid").to_pylist()
    assert np.array([r["_distance"] for r in got], np.float32).tobytes() == \
        want.column("_distance").to_numpy().tobytes()
    assert [r["query"] for r in got] == [0] * 5 + [1] * 5 + [2] * 5
    assert [r["rank"] for r in got] == list(range(5)) * 3
    assert [r["id"] for r in got] == want.column("id").to_pylist()
    rows = list(csv.DictReader(io.StringIO(
        inproc("search", uri, "--column", "vec", "--query-row", 1234, "--k", "3",
               "--refine-factor", "2", "--format", "csv"))))
    assert len(rows) == 3 and int(rows[0]["_rowid"]) == (2 << 32) | 234   # itself first
    assert float(rows[0]["_distance"]) == 0.0
    table = inproc("search", uri, "--column", "vec", "--query-row", 0, "--k", "2")
    lines = table.splitlines()
    assert lines[0].split() == ["query", "rank", "_rowid", "_distance"] and len(lines) == 3


def test_verify_then_corruption_is_named(built, tmp_path):
    uri, x, stats = built
    out = inproc("verify", uri)
    assert "verify: ok" in out and "1 segment(s), 3000 rows" in out
    # flip a byte in a copy of the index, so the other tests keep a good one
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(bitshard.dataset(uri).index_root, root)
    path = idx.segment_path(str(root), stats["final_segment"])
    b = bytearray(open(path, "rb").read())
    b[len(b) // 2] ^= 0x40
    open(path, "wb").write(bytes(b))
    p = run("verify", uri, "--index-uri", root, check=False)
    assert p.returncode == 1
    assert "FAULT:" in p.stdout and path in p.stdout and "checksum mismatch" in p.stdout
    assert "Traceback" not in p.stderr


def test_cleanup_dry_run_and_remove(built):
    uri, x, stats = built
    ds = bitshard.dataset(uri)
    frags = [0, 1]
    seg = ds.create_index_uncommitted(
        "vec", ivf_centroids=idx.OpenSegment(idx.segment_path(ds.index_root, stats["final_segment"])).ivf_model(),
        fragment_ids=frags)
    assert inproc("cleanup", uri) == ""             # younger than an hour: kept
    assert inproc("cleanup", uri, "--older-than", "0", "--dry-run").split() == [seg.uuid]
    assert os.path.exists(seg.path)
    p = run("cleanup", uri, "--older-than", "0")
    assert p.stdout.split() == [seg.uuid] and not os.path.exists(seg.path)
    assert "removed 1 unreferenced" in p.stderr
    assert os.path.exists(idx.segment_path(ds.index_root, stats["final_segment"]))


def test_exit_codes(built, tmp_path, capsys):
    uri, x, stats = built
    # usage errors: 2 (argparse), in a subprocess and in-process
    p = run("search", uri, "--column", "vec", check=False)     # no query
    assert p.returncode == 2 and "one of the arguments --query-file --query-row" in p.stderr
    assert "Traceback" not in p.stderr
    for argv in (["build", uri], ["search", uri, "--column", "vec", "--query-row", "1",
                                  "--format", "xml"],
                 ["cleanup", uri, "--older-than", "-5"], ["frobnicate"],
                 ["search", uri, "--column", "vec", "--query-file", tmp_path / "nope.npy"],
                 ["search", uri, "--column", "vec", "--query-row", "99999"]):
        with pytest.raises(SystemExit) as e:
            cli.main([str(a) for a in argv])
        assert e.value.code == 2, argv
    # bitshard errors: 1, the message and no traceback
    capsys.readouterr()
    assert cli.main(["describe", str(tmp_path / "missing.lance")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bitshard: error: cannot open Lance dataset") and "Traceback" not in err
    assert cli.main(["search", uri, "--column", "vec", "--query-row", "0",
                     "--index", "nope"]) == 1
    assert "no index named 'nope'" in capsys.readouterr().err
    np.save(tmp_path / "q.npy", np.zeros(7, np.float32))
    assert cli.main(["search", uri, "--column", "vec", "--query-file",
                     str(tmp_path / "q.npy")]) == 1
    assert "dimension 7" in capsys.readouterr().err


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "bitshard")
    if not os.path.exists(exe):
        pytest.skip("console script not installed next to this interpreter")
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "build" in p.stdout and "cleanup" in p.stdout
