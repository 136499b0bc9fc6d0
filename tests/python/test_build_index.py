"""bitshard.build_index: the one-call distributed build on Ray, a process pool
or in-process; retries when workers die; resumable builds; cleanup; verify.

Every build is compared bit for bit (row ids and distance bytes, and the
segment file itself up to its uuid) with a single-process ``create_index``
that uses the same artifacts.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import bitshard
from bitshard import distributed as dist
from bitshard import index as idx
from bitshard.errors import BitshardError, CorruptIndexError, InvalidInputError
from bitshard.index import OpenSegment

from conftest import clustered, write_lance

D = 32
ROWS = 4000
NAME = "idx"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4000 x 32 clustered vectors in 8 Lance fragments of 500 rows."""
    x = clustered(ROWS, D, seed=21)
    uri = write_lance(tmp_path_factory.mktemp("bi") / "v.lance", x, 500)
    queries = x[:25] + np.random.default_rng(3).normal(size=(25, D)).astype(np.float32) * 0.3
    return uri, x, queries


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray with 2 CPUs for the whole module, started through the
    same helper build_index uses (so its start/stop logic is tested too)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # someone else's cluster: use it as it is
        yield ray
        return
    with dist.ray_session(2) as started:
        assert started and ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 2
        with dist.ray_session(8) as nested:  # already connected: used, not restarted
            assert not nested
        assert ray.is_initialized()
        yield ray
    assert not ray.is_initialized()


class _FakeRay:
    """Records ray.init's keyword arguments (start_ray's contract)."""

    def __init__(self):
        self.calls = []

    def init(self, **kw):
        self.calls.append(kw)


def test_start_ray_starts_its_own_unless_ray_address_names_one(monkeypatch):
    ray = _FakeRay()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dist.start_ray(ray, 3)
    # address="local": never a cluster recorded in Ray's temp directory,
    # which may be dead or someone else's
    assert ray.calls == [{"address": "local", "num_cpus": 3, "include_dashboard": False,
                          "log_to_driver": False}]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    dist.start_ray(ray, 3)
    # the cluster RAY_ADDRESS names (ray.init reads it), sized by the cluster
    assert ray.calls[1] == {"include_dashboard": False, "log_to_driver": False}


def _result(t):
    return t.column("_rowid").to_pylist(), t.column("_distance").to_numpy().tobytes()


def _final(ds, name=NAME):
    segs = idx.committed_segments(ds.index_root, name)
    assert len(segs) == 1
    return segs[0]


def assert_same_as_single_process(ds, uri, queries, tmp_path, name=NAME):
    """The committed index answers exactly like create_index with the same
    artifacts, and its one segment is that build's file up to the uuid."""
    seg = OpenSegment(_final(ds, name).path)
    single = bitshard.dataset(uri, index_uri=tmp_path / "single")
    single.create_index("vec", "IVF_RQ", name=name, ivf_centroids=seg.ivf_model(),
                        rq_rotation=seg.rotation())
    for kw in (dict(nprobes=4), dict(nprobes=16), dict(nprobes=8, refine_factor=2)):
        assert _result(ds.search("vec", queries, k=10, index=name, **kw)) == \
            _result(single.search("vec", queries, k=10, **kw)), kw
    a = open(seg.path, "rb").read()
    b = open(_final(single, name).path, "rb").read()
    assert len(a) == len(b)
    assert sum(x != y for x, y in zip(a, b)) <= 24  # the uuid and the checksum over it
    d = ds.describe_indices()[0]
    assert d["uncovered_fragments"] == [] and d["num_rows"] == ROWS


def _segment_files(root):
    return sorted(fn for fn in os.listdir(os.path.join(root, "segments")))


# ------------------------------------------------------------------ planning


def test_plan_tasks_balances_contiguous_groups():
    from bitshard.sources import FragmentInfo

    frags = [FragmentInfo(i, r, r) for i, r in enumerate([100, 100, 0, 400, 100, 100, 100, 100])]
    tasks = dist.plan_tasks(frags, num_workers=1)
    assert [f for t in tasks for f in t] == list(range(8))          # contiguous, all
    assert len(tasks) == 4
    rows = [sum(frags[f].num_rows for f in t) for t in tasks]
    assert max(rows) <= 400
    assert dist.plan_tasks(frags, 1, fragments_per_task=3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert dist.plan_tasks(frags, 100) == [[i] for i in range(8)]   # never more than fragments
    assert tasks == [[0, 1, 2], [3], [4, 5], [6, 7]]
    assert dist.plan_tasks([FragmentInfo(i, 0, 0) for i in range(5)], 1) == [[0, 1], [2], [3], [4]]
    assert dist._merge_plan_size(8, 8) == 1 and dist._merge_plan_size(9, 8) == 2
    assert dist._merge_plan_size(8, 3) == 4 and dist._merge_plan_size(1, 8) == 0


# ------------------------------------------------------------------ serial


def test_serial_build_identical_and_tree_merge(data, tmp_path, monkeypatch):
    uri, x, queries = data
    monkeypatch.setattr(dist, "MERGE_FAN_IN", 3)        # 8 segments -> 3 -> 1: two levels
    events = []
    ds = bitshard.build_index(uri, "vec", name=NAME, num_partitions=16, executor="serial",
                              fragments_per_task=1, seed=7, index_uri=tmp_path / "idx",
                              progress=lambda *e: events.append(e))
    st = ds.last_build_stats
    assert st["tasks"] == 8 and st["merges"] == 4 and st["version"] == 1
    # artifacts: trained like train_ivf, rotation seeded by seed
    assert st["ivf_fingerprint"] == bitshard.train_ivf(ds, "vec", 16, seed=7).fingerprint
    assert st["rotation_seed"] == 7
    assert_same_as_single_process(ds, uri, queries, tmp_path)
    # only the committed segment is left, and no build state
    assert _segment_files(ds.index_root) == [st["final_segment"] + ".bsseg"]
    assert not os.path.exists(os.path.join(ds.index_root, "builds"))
    # progress: train, encode in rows per task, merges, commit
    stages = [e[0] for e in events]
    assert stages[0] == "train" and stages[-1] == "commit"
    enc = [e for e in events if e[0] == "encode"]
    assert len(enc) == 8 and enc[-1][1:] == (ROWS, ROWS)
    assert [e[1:] for e in events if e[0] == "merge"] == [(i, 4) for i in range(1, 5)]
    assert dist.verify(ds) == []


def test_explicit_artifacts_and_argument_errors(data, tmp_path):
    uri, x, queries = data
    src = bitshard.dataset(uri)
    c = bitshard.train_ivf(src, "vec", 12, seed=1)
    rot = bitshard.build_rq_rotation(D, num_bits=3, seed=99)
    ds = bitshard.build_index(uri, "vec", ivf_centroids=c, rq_rotation=rot, executor="serial",
                              index_uri=tmp_path / "idx", progress=False)
    h = _final(ds, "vec_idx")
    assert (h.ivf_fingerprint, h.rotation_fingerprint, h.num_bits) == \
        (c.fingerprint, rot.fingerprint, 3)
    with pytest.raises(InvalidInputError, match="num_bits=1 conflicts"):
        bitshard.build_index(uri, "vec", ivf_centroids=c, rq_rotation=rot, num_bits=1,
                             executor="serial", index_uri=tmp_path / "x")
    with pytest.raises(InvalidInputError, match="executor must be one of"):
        bitshard.build_index(uri, "vec", executor="threads")
    with pytest.raises(InvalidInputError, match="index_type"):
        bitshard.build_index(uri, "vec", index_type="IVF_PQ")
    with pytest.raises(InvalidInputError, match="num_workers"):
        bitshard.build_index(uri, "vec", num_workers=0, executor="serial")
    with pytest.raises(InvalidInputError, match="num_partitions=5 conflicts"):
        bitshard.build_index(uri, "vec", ivf_centroids=c, num_partitions=5, executor="serial",
                             index_uri=tmp_path / "x")


def test_numpy_source_is_never_resumed(tmp_path):
    x = clustered(3000, 16, seed=4)
    root = tmp_path / "np_idx"
    ds = bitshard.build_index(x, "vector", num_partitions=8, executor="serial", seed=1,
                              index_uri=root, progress=False)
    assert ds.last_build_stats["num_rows"] == 3000 and not ds.last_build_stats["resumed"]
    hits = ds.search("vector", x[5], k=1)
    assert hits.column("_rowid")[0].as_py() == 5


# ------------------------------------------------------------ process pool


def test_processes_identical_after_sigkilled_worker(data, tmp_path, monkeypatch):
    uri, x, queries = data
    marker = tmp_path / "crashed"
    monkeypatch.setenv(dist.CRASH_ENV, f"sigkill:{marker}")
    ds = bitshard.build_index(uri, "vec", name=NAME, num_partitions=16, executor="processes",
                              num_workers=2, seed=5, index_uri=tmp_path / "idx", progress=False)
    assert marker.exists()                           # a worker did die
    st = ds.last_build_stats
    assert st["pool_restarts"] >= 1 and st["tasks"] == 8
    assert_same_as_single_process(ds, uri, queries, tmp_path)
    # The dead worker's segment was written but never committed; cleanup
    # removes it (and nothing committed), only once it is old enough.
    # (The pool also terminates the other worker: it may leave a .tmp file.)
    assert idx.uncommitted_segments(ds.index_root)
    orphans = {fn.split(".")[0] for fn in _segment_files(ds.index_root)} - {st["final_segment"]}
    assert set(idx.uncommitted_segments(ds.index_root)) <= orphans
    assert bitshard.cleanup(ds.index_root) == []     # younger than an hour
    assert set(bitshard.cleanup(uri, 0, index_uri=tmp_path / "idx", dry_run=True)) == orphans
    assert set(bitshard.cleanup(ds, older_than_seconds=0)) == orphans
    assert _segment_files(ds.index_root) == [st["final_segment"] + ".bsseg"]
    assert dist.verify(ds) == []


def test_processes_give_up_after_max_retries(data, tmp_path, monkeypatch):
    uri, x, queries = data
    monkeypatch.setenv(dist.CRASH_ENV, str(tmp_path / "crashed"))
    with pytest.raises(BitshardError, match="died 1 time"):
        bitshard.build_index(uri, "vec", num_partitions=8, executor="processes", num_workers=2,
                             max_retries=0, index_uri=tmp_path / "idx", progress=False)
    assert idx.list_index_names(str(tmp_path / "idx")) == []   # nothing committed


def test_worker_exception_is_reraised_not_retried(tmp_path):
    x = clustered(2000, 16, seed=2)
    x[1234, 3] = np.nan                                # fragment 2 (500 rows each), row 234
    uri = write_lance(tmp_path / "nan.lance", x, 500)
    c = bitshard.IvfModel(clustered(8, 16, seed=9))
    with pytest.raises(InvalidInputError, match="fragment 2 row 234"):
        bitshard.build_index(uri, "vec", ivf_centroids=c, executor="processes", num_workers=2,
                             index_uri=tmp_path / "idx", progress=False)


def test_failed_training_stops_the_prestarted_workers(data, tmp_path):
    """The process pool starts while the driver trains; a training error
    must not leave those workers behind."""
    import multiprocessing

    uri, _, _ = data
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(InvalidInputError, match="exceeds the number of rows"):
        bitshard.build_index(uri, "vec", num_partitions=ROWS + 1, executor="processes",
                             num_workers=2, index_uri=tmp_path / "idx", progress=False)
    left = {p.pid for p in multiprocessing.active_children()} - before
    assert not left


def test_pool_that_cannot_start_fails_fast_with_advice():
    """A driver read from stdin cannot be re-imported by spawned workers: say
    so at once instead of retrying."""
    import subprocess
    import sys

    script = ("import numpy as np, bitshard\n"
              "x = np.random.default_rng(0).normal(size=(600, 8)).astype('float32')\n"
              "bitshard.build_index(x, 'vector', num_partitions=2, executor='processes',\n"
              "                     num_workers=1, progress=False)\n")
    p = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert "worker processes died while starting" in p.stderr
    assert "a worker process died; restarting" not in p.stderr


# ---------------------------------------------------------------------- Ray


def test_ray_build_identical(ray_cluster, data, tmp_path):
    uri, x, queries = data
    ds = bitshard.build_index(uri, "vec", name=NAME, num_partitions=16, executor="ray",
                              seed=11, index_uri=tmp_path / "idx", progress=False)
    st = ds.last_build_stats
    assert st["num_workers"] == 2 and st["tasks"] == 8       # 4 tasks per worker
    assert ray_cluster.is_initialized()                      # not ours to stop
    assert_same_as_single_process(ds, uri, queries, tmp_path)


def test_ray_worker_death_is_retried(ray_cluster, data, tmp_path, monkeypatch):
    uri, x, queries = data
    marker = tmp_path / "crashed"
    monkeypatch.setenv(dist.CRASH_ENV, str(marker))
    ds = bitshard.build_index(uri, "vec", name=NAME, num_partitions=16, executor=None,
                              seed=11, index_uri=tmp_path / "idx", progress=False)
    assert marker.exists() and ds.last_build_stats["executor"] == "ray"
    assert_same_as_single_process(ds, uri, queries, tmp_path)
    final = ds.last_build_stats["final_segment"]
    assert final not in idx.uncommitted_segments(ds.index_root)
    assert len(idx.uncommitted_segments(ds.index_root)) >= 1   # the dead attempt's file


def test_ray_task_exception_is_reraised(ray_cluster, tmp_path):
    x = clustered(2000, 16, seed=2)
    x[777, 0] = np.inf
    uri = write_lance(tmp_path / "inf.lance", x, 500)
    c = bitshard.IvfModel(clustered(8, 16, seed=9))
    with pytest.raises(InvalidInputError, match="fragment 1 row 277"):
        bitshard.build_index(uri, "vec", ivf_centroids=c, executor="ray",
                             index_uri=tmp_path / "idx", progress=False)


# ---------------------------------------------------------------- resuming


class Interrupt(Exception):
    pass


def test_interrupted_build_resumes_reusing_finished_segments(data, tmp_path):
    uri, x, queries = data
    root = tmp_path / "idx"
    kw = dict(name=NAME, num_partitions=16, seed=None, index_uri=root)

    def stop_after_three(stage, done, total):
        if stage == "encode" and done >= 3 * 500:
            raise Interrupt

    with pytest.raises(Interrupt):   # the driver "dies" after 3 of 8 tasks
        bitshard.build_index(uri, "vec", executor="processes", num_workers=2,
                             fragments_per_task=1, progress=stop_after_three, **kw)
    state = json.loads((root / "builds" / f"{NAME}.json").read_text())
    assert len(state["tasks"]) == 8 and len(state["segments"]) == 3
    assert idx.list_index_names(str(root)) == []
    finished = sorted(state["segments"].values())
    mtimes = {u: os.stat(idx.segment_path(str(root), u)).st_mtime_ns for u in finished}
    # a random rotation seed was drawn (seed=None) and recorded
    assert bytes.fromhex(state["rotation"]) and state["rotation_seed"] == \
        bitshard.Rotation.from_bytes(bytes.fromhex(state["rotation"])).seed

    events, seen = [], {}

    def watch(stage, done, total):
        events.append((stage, done, total))
        if stage == "merge" and not seen:     # before the leaves are removed
            seen.update({u: os.stat(idx.segment_path(str(root), u)).st_mtime_ns
                         for u in finished})

    # Same call again (another executor and worker count do not matter).
    ds = bitshard.build_index(uri, "vec", executor="serial", progress=watch, **kw)
    st = ds.last_build_stats
    assert st["resumed"] and sorted(st["reused_segments"]) == finished
    assert seen == mtimes                                    # reused, not rewritten
    assert ("resume", 3, 8) in events
    assert [e for e in events if e[0] == "encode"][0][1] == 4 * 500  # 5 built, 3 reused
    assert st["rotation_seed"] == state["rotation_seed"]
    assert st["ivf_fingerprint"] == state["ivf_fingerprint"]
    assert not (root / "builds").exists()
    # identical to an uninterrupted build with the same artifacts
    assert_same_as_single_process(ds, uri, queries, tmp_path)


def test_resume_rejects_corrupt_segments_and_changed_settings(data, tmp_path):
    uri, x, queries = data
    root = tmp_path / "idx"

    def stop_after_four(stage, done, total):
        if stage == "encode" and done >= 4 * 500:
            raise Interrupt

    with pytest.raises(Interrupt):
        bitshard.build_index(uri, "vec", name=NAME, num_partitions=16, executor="serial",
                             fragments_per_task=1, seed=2, index_uri=root,
                             progress=stop_after_four)
    state = json.loads((root / "builds" / f"{NAME}.json").read_text())
    uuids = [state["segments"][str(i)] for i in range(4)]
    # corrupt one finished segment: the C reader's checksums catch it on reuse
    p = idx.segment_path(str(root), uuids[1])
    b = bytearray(open(p, "rb").read())
    b[len(b) // 2] ^= 0x10
    open(p, "wb").write(bytes(b))
    # ... and swap another for a segment of other fragments
    other = bitshard.dataset(uri, index_uri=root).create_index_uncommitted(
        "vec", ivf_centroids=bitshard.IvfModel.load(root / "builds" / f"{NAME}.ivf"),
        rq_rotation=bitshard.Rotation.from_bytes(bytes.fromhex(state["rotation"])),
        fragment_ids=[7])
    os.replace(other.path, idx.segment_path(str(root), uuids[2]))

    ds = bitshard.build_index(uri, "vec", name=NAME, num_partitions=16, executor="serial",
                              seed=2, index_uri=root, progress=False)
    assert sorted(ds.last_build_stats["reused_segments"]) == sorted([uuids[0], uuids[3]])
    assert_same_as_single_process(ds, uri, queries, tmp_path)

    # Interrupted again, then rerun with other settings: starts afresh.
    with pytest.raises(Interrupt):
        bitshard.build_index(uri, "vec", name=NAME, num_partitions=16, executor="serial",
                             fragments_per_task=1, seed=2, index_uri=root,
                             progress=stop_after_four)
    ds = bitshard.build_index(uri, "vec", name=NAME, num_partitions=8, executor="serial",
                              seed=2, index_uri=root, progress=False)
    assert not ds.last_build_stats["resumed"] and ds.last_build_stats["num_partitions"] == 8
    assert ds.describe_indices()[0]["version"] == 2


# ------------------------------------------------------------ cleanup, verify


def test_cleanup_protects_builds_and_refuses_unreadable_manifests(data, tmp_path):
    uri, x, queries = data
    root = tmp_path / "idx"

    def stop(stage, done, total):
        if stage == "encode" and done >= 2000:
            raise Interrupt

    with pytest.raises(Interrupt):
        bitshard.build_index(uri, "vec", num_partitions=8, executor="serial", seed=1,
                             fragments_per_task=2, index_uri=root, progress=stop)
    in_progress = set(idx.uncommitted_segments(str(root)))
    assert len(in_progress) == 2
    # a leftover temp file of a writer that died
    tmp = root / "segments" / ("ab" * 16 + ".bsseg.tmp")
    tmp.write_bytes(b"partial")
    assert bitshard.cleanup(root, 0) == ["ab" * 16]            # the build's segments stay
    assert set(idx.uncommitted_segments(str(root))) == in_progress
    assert bitshard.cleanup(root, 3600, abandoned_builds=True) == []   # state too young
    assert sorted(bitshard.cleanup(root, 0, abandoned_builds=True)) == sorted(in_progress)
    assert not (root / "builds" / "vec_idx.json").exists()
    # a manifest that cannot be read: nothing is safe to delete
    ds = bitshard.build_index(uri, "vec", num_partitions=8, executor="serial", seed=1,
                              index_uri=root, progress=False)
    mpath = root / "indices" / "vec_idx" / "v00000001.json"
    mpath.write_text(mpath.read_text().replace('"version": 1', '"version": 9'))
    with pytest.raises(CorruptIndexError, match="v1 of index 'vec_idx'"):
        bitshard.cleanup(root, 0)
    faults = dist.verify(ds)
    assert len(faults) == 1 and "manifest v1" in faults[0] and "checksum" in faults[0]
    with pytest.raises(InvalidInputError, match="older_than_seconds"):
        bitshard.cleanup(root, -1)


def test_verify_reports_each_fault(data, tmp_path):
    uri, x, queries = data
    root = tmp_path / "idx"
    ds = bitshard.build_index(uri, "vec", name=NAME, num_partitions=8, executor="serial",
                              seed=1, fragments_per_task=4, index_uri=root, progress=False)
    assert dist.verify(uri, index_uri=root) == []
    # commit two segments by hand, then break things behind the manifest's back
    seg = OpenSegment(_final(ds).path)
    a = ds.create_index_uncommitted("vec", name=NAME, ivf_centroids=seg.ivf_model(),
                                    rq_rotation=seg.rotation(), fragment_ids=[0, 1, 2, 3])
    b = ds.create_index_uncommitted("vec", name=NAME, ivf_centroids=seg.ivf_model(),
                                    rq_rotation=seg.rotation(), fragment_ids=[4, 5, 6, 7])
    ds.commit_existing_index_segments(NAME, "vec", [a, b], replace=True)
    assert dist.verify(ds) == []
    data_b = bytearray(open(b.path, "rb").read())
    data_b[len(data_b) - 100] ^= 1
    open(b.path, "wb").write(bytes(data_b))
    faults = dist.verify(ds)
    assert len(faults) == 1 and b.path in faults[0] and "checksum" in faults[0]
    os.remove(b.path)
    faults = dist.verify(ds)
    assert len(faults) == 1 and "missing" in faults[0] and b.path in faults[0]


# ---------------------------------------------------------------------- docs


def test_distributed_md_examples_run(tmp_path, monkeypatch, capsys):
    """The ```python blocks of docs/distributed.md run as written, in order."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "docs", "distributed.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/distributed.md block {i}", "exec"), env)
    assert env["stats"]["executor"] == "processes" and env["faults"] == []
