"""Indexes on object storage: an S3-compatible server (moto's standalone
server, started here as its own process on a loopback port) holds the index
root; every result is compared with the same index on a local directory.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid as uuid_mod

import numpy as np
import pytest

import bitshard
from bitshard import index as idx
from bitshard.errors import CommitConflictError, CorruptIndexError, InvalidInputError
from bitshard.storage import LocalStorage, ObjectStorage, Storage

from conftest import clustered, lance_with_artifacts, run_threads, write_lance

pytest.importorskip("moto", reason="moto[server] is not installed (pip install 'bitshard[test]')")
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed")

BUCKET = "bitshard-test"
KEY_ID, SECRET = "testing-key", "testing-secret"
D = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1:<free port> with one bucket; yields the
    storage_options that reach it. The server is killed at teardown."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not answer within 60 s")
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID,
                              aws_secret_access_key=SECRET, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        opts = {"endpoint_override": endpoint, "access_key": KEY_ID, "secret_key": SECRET,
                "region": "us-east-1"}
        yield {"options": opts, "client": client, "endpoint": endpoint}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _prefix() -> str:
    return f"t-{uuid_mod.uuid4().hex[:12]}"


def _keys(s3, prefix):
    out = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return sorted(o["Key"][len(prefix) + 1:] for o in out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2000 x 32 vectors in 4 local Lance fragments, plus shared artifacts."""
    return lance_with_artifacts(tmp_path_factory.mktemp("os") / "v.lance", 2000, D, 500,
                                num_partitions=16, seed=5, ivf_seed=2, rotation_seed=7)


def _result(t):
    return t.column("_rowid").to_pylist(), t.column("_distance").to_numpy().tobytes()


def _local(data, tmp_path, name="idx"):
    uri, x, ivf, rot = data
    loc = bitshard.dataset(uri, index_uri=tmp_path / "local_idx")
    loc.create_index("vec", "IVF_RQ", name=name, ivf_centroids=ivf, rq_rotation=rot)
    return loc


# --------------------------------------------------------------- the storage


def test_storage_for_uri_and_options(s3, tmp_path):
    assert isinstance(Storage.for_uri(str(tmp_path)), LocalStorage)
    assert isinstance(Storage.for_uri(f"file://{tmp_path}"), LocalStorage)
    st = Storage.for_uri(f"s3://{BUCKET}/a/b/", s3["options"])
    assert isinstance(st, ObjectStorage) and st.root == f"s3://{BUCKET}/a/b"
    assert st.path("segments/x.bsseg") == f"s3://{BUCKET}/a/b/segments/x.bsseg"
    # A root below one this process was given options for inherits them.
    assert Storage.for_uri(f"s3://{BUCKET}/a/b/segments").options == st.options
    assert pickle.loads(pickle.dumps(st)) == st
    with pytest.raises(InvalidInputError, match="unknown storage option 'endpiont'"):
        Storage.for_uri(f"s3://{BUCKET}/x", {"endpiont": "http://x"})
    with pytest.raises(InvalidInputError, match="object-store"):
        Storage.for_uri(str(tmp_path), {"region": "us-east-1"})
    with pytest.raises(InvalidInputError, match="scheme"):
        Storage.for_uri("gs://bucket/x")
    # boto3/Lance spellings are accepted
    st2 = Storage.for_uri(f"s3://{BUCKET}/c", {
        "aws_endpoint": s3["endpoint"], "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET, "aws_region": "us-east-1"})
    st2.write_bytes("k", b"v")
    assert st2.read_bytes("k") == b"v" and st2.exists("k") and not st2.exists("nope")


def test_create_exclusive_and_aligned_segments(s3):
    st = Storage.for_uri(f"s3://{BUCKET}/{_prefix()}", s3["options"])
    st.create_exclusive("indices/i/v00000001.json", b"first")
    with pytest.raises(FileExistsError):
        st.create_exclusive("indices/i/v00000001.json", b"second")
    assert st.read_bytes("indices/i/v00000001.json") == b"first"
    assert [e.name for e in st.list("indices")] == ["i"] and st.list("indices")[0].is_dir
    assert [e.name for e in st.list("indices/i")] == ["v00000001.json"]
    assert st.list("nothing/here") == []
    # the probe object of the conditional-write check is gone again
    assert not [k for k in _keys(s3, st.prefix) if "probe" in k]
    st.write_bytes("segments/x.bsseg", b"\1" * 1000)
    buf = st.open_segment("segments/x.bsseg")
    assert len(buf) == 1000 and buf.ctypes.data % 64 == 0 and not buf.flags.writeable
    assert st.delete("segments/x.bsseg") and not st.delete("segments/x.bsseg")
    with pytest.raises(CorruptIndexError, match="missing"):
        st.open_segment("segments/x.bsseg")
    # deleting leaves no directory-marker objects behind
    assert _keys(s3, st.prefix) == ["indices/i/v00000001.json"]


# ------------------------------------------------------------ build, search


def test_create_index_on_s3_searches_like_local(s3, data, tmp_path):
    uri, x, ivf, rot = data
    prefix = _prefix()
    root = f"s3://{BUCKET}/{prefix}"
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    assert ds.index_root == root
    ds.create_index("vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot)
    keys = _keys(s3, prefix)
    seg = ds.describe_indices()[0]["segments"][0]
    assert keys == ["indices/idx/v00000001.json", f"segments/{seg['uuid']}.bsseg"]

    loc = _local(data, tmp_path)
    q = x[:12] + 0.1
    want = _result(loc.search("vec", q, k=10))
    # a fresh Dataset object (nothing cached), and one that travelled by pickle
    fresh = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    assert _result(fresh.search("vec", q, k=10)) == want
    assert _result(pickle.loads(pickle.dumps(fresh)).search("vec", q, k=10)) == want
    assert _result(fresh.search("vec", q, k=10, refine_factor=3)) == \
        _result(loc.search("vec", q, k=10, refine_factor=3))
    assert fresh.list_indices()[0]["version"] == 1
    assert bitshard.distributed.verify(uri, index_uri=root, storage_options=s3["options"]) == []

    # A fresh process that knows the store only from the environment.
    np.save(tmp_path / "q.npy", q)
    code = (
        "import sys, json, numpy as np, bitshard\n"
        "ds = bitshard.dataset(sys.argv[1], index_uri=sys.argv[2])\n"
        "t = ds.search('vec', np.load(sys.argv[3]), k=10)\n"
        "print(json.dumps([t.column('_rowid').to_pylist(),"
        " t.column('_distance').to_numpy().tobytes().hex()]))\n")
    env = dict(os.environ, AWS_ENDPOINT_URL=s3["endpoint"], AWS_ACCESS_KEY_ID=KEY_ID,
               AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1")
    p = subprocess.run([sys.executable, "-c", code, uri, root, str(tmp_path / "q.npy")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    rows, dist = json.loads(p.stdout)
    assert (rows, bytes.fromhex(dist)) == want


def test_distributed_flow_on_s3_equals_local_bit_for_bit(s3, data, tmp_path):
    uri, x, ivf, rot = data
    root = f"s3://{BUCKET}/{_prefix()}"
    u_a, u_b, u_m = (uuid_mod.uuid4().hex for _ in range(3))

    def flow(ds):
        frags = [f.id for f in ds.source.fragments()]
        a = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=ivf,
                                        rq_rotation=rot, fragment_ids=frags[:2], index_uuid=u_a)
        b = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=ivf,
                                        rq_rotation=rot, fragment_ids=frags[2:], index_uuid=u_b)
        b = pickle.loads(pickle.dumps(b))              # handles travel
        m = ds.merge_existing_index_segments([a, b], index_uuid=u_m)
        return ds.commit_existing_index_segments("idx", "vec", [m]), m

    remote, m_remote = flow(bitshard.dataset(uri, index_uri=root,
                                             storage_options=s3["options"]))
    local, m_local = flow(bitshard.dataset(uri, index_uri=tmp_path / "loc"))
    assert m_remote.path == f"{root}/segments/{u_m}.bsseg"
    assert m_remote.size_bytes == m_local.size_bytes
    # The segment files are identical, byte for byte.
    remote_bytes = s3["client"].get_object(
        Bucket=BUCKET, Key=f"{root[len('s3://' + BUCKET) + 1:]}/segments/{u_m}.bsseg")["Body"].read()
    assert remote_bytes == open(m_local.path, "rb").read()
    q = x[::97][:20]
    assert _result(remote.search("vec", q, k=10)) == _result(local.search("vec", q, k=10))
    # The worker-side pieces are not committed; cleanup removes them.
    assert sorted(idx.uncommitted_segments(remote.index_root)) == sorted([u_a, u_b])


def test_commit_race_on_s3_one_wins(s3, data):
    uri, x, ivf, rot = data
    root = f"s3://{BUCKET}/{_prefix()}"
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    segs = [ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=ivf,
                                        rq_rotation=rot, fragment_ids=[f]) for f in range(4)]
    for rnd in range(3):       # several rounds: each version has exactly one winner
        outcomes = []
        barrier = threading.Barrier(len(segs))

        def commit(seg):
            writer = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
            barrier.wait()
            try:
                idx.commit(writer.storage, "idx", "vec", [seg], mode="replace",
                           expected_version=rnd)
                outcomes.append(seg.uuid)
            except CommitConflictError:
                outcomes.append("conflict")

        run_threads(commit, segs)
        winners = [o for o in outcomes if o != "conflict"]
        assert len(winners) == 1 and len(outcomes) == len(segs), outcomes
        doc = idx.read_manifest(ds.storage, "idx")
        assert doc["version"] == rnd + 1
        assert [e["uuid"] for e in doc["segments"]] == winners   # the winner's manifest
    # and a plain second commit of an existing version is refused too
    with pytest.raises(CommitConflictError):
        idx.commit(ds.storage, "idx", "vec", [segs[0]], mode="replace", expected_version=0)


def test_corrupt_or_missing_segment_on_s3(s3, data):
    uri, x, ivf, rot = data
    prefix = _prefix()
    root = f"s3://{BUCKET}/{prefix}"
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    ds.create_index("vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot)
    u = ds.describe_indices()[0]["segments"][0]["uuid"]
    key = f"{prefix}/segments/{u}.bsseg"
    blob = bytearray(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read())
    blob[len(blob) // 2] ^= 0x40
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=bytes(blob))
    fresh = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    with pytest.raises(CorruptIndexError, match=f"s3://{BUCKET}/{prefix}/segments/{u}.bsseg"):
        fresh.search("vec", x[0], k=5)
    faults = bitshard.distributed.verify(uri, index_uri=root, storage_options=s3["options"])
    assert len(faults) == 1 and u in faults[0] and "checksum" in faults[0]
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=bytes(blob[:100]))   # truncated
    with pytest.raises(CorruptIndexError):
        bitshard.dataset(uri, index_uri=root, storage_options=s3["options"]).search(
            "vec", x[0], k=5)
    s3["client"].delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(CorruptIndexError, match="missing"):
        bitshard.dataset(uri, index_uri=root, storage_options=s3["options"]).search(
            "vec", x[0], k=5)
    # a corrupted manifest is named too
    mkey = f"{prefix}/indices/idx/v00000001.json"
    doc = s3["client"].get_object(Bucket=BUCKET, Key=mkey)["Body"].read()
    s3["client"].put_object(Bucket=BUCKET, Key=mkey, Body=doc.replace(b'"l2"', b'"dot"'))
    with pytest.raises(CorruptIndexError, match="checksum"):
        idx.read_manifest(fresh.storage, "idx")


@pytest.mark.parametrize("executor", ["processes", "serial"])
def test_build_index_on_s3(s3, data, tmp_path, executor):
    uri, x, ivf, rot = data
    prefix = _prefix()
    root = f"s3://{BUCKET}/{prefix}"
    ds = bitshard.build_index(uri, "vec", name="idx", ivf_centroids=ivf, rq_rotation=rot,
                              executor=executor, num_workers=2, fragments_per_task=1,
                              progress=False, index_uri=root, storage_options=s3["options"])
    st = ds.last_build_stats
    assert st["tasks"] == 4 and st["merges"] == 1 and st["version"] == 1
    # The leaves, the build state and the IVF file are gone; one segment is left.
    assert _keys(s3, prefix) == ["indices/idx/v00000001.json",
                                 f"segments/{st['final_segment']}.bsseg"]
    loc = _local(data, tmp_path)
    q = x[:15] - 0.05
    assert _result(ds.search("vec", q, k=10)) == _result(loc.search("vec", q, k=10))
    final = idx.OpenSegment(idx.segment_path(root, st["final_segment"]))
    assert final.ivf_model().fingerprint == ivf.fingerprint
    assert final.rotation().fingerprint == rot.fingerprint


def test_build_index_resumes_on_s3(s3, data, tmp_path, monkeypatch):
    """A build whose driver stopped after two tasks keeps its state on S3
    (builds/<name>.json, builds/<name>.ivf); the rerun reuses both segments."""
    uri, x, ivf, rot = data
    root = f"s3://{BUCKET}/{_prefix()}"
    calls = []

    def stop_after_two(stage, done, total):
        if stage == "encode":
            calls.append(done)
            if len(calls) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bitshard.build_index(uri, "vec", name="idx", ivf_centroids=ivf, rq_rotation=rot,
                             executor="serial", fragments_per_task=1, progress=stop_after_two,
                             index_uri=root, storage_options=s3["options"])
    st = Storage.for_uri(root)
    assert sorted(e.name for e in st.list("builds")) == ["idx.ivf", "idx.json"]
    ds = bitshard.build_index(uri, "vec", name="idx", ivf_centroids=ivf, rq_rotation=rot,
                              executor="serial", fragments_per_task=1, progress=False,
                              index_uri=root, storage_options=s3["options"])
    assert ds.last_build_stats["resumed"] and len(ds.last_build_stats["reused_segments"]) == 2
    assert st.list("builds") == []
    loc = _local(data, tmp_path)
    assert _result(ds.search("vec", x[:10], k=5)) == _result(loc.search("vec", x[:10], k=5))


def test_cleanup_on_s3(s3, data):
    uri, x, ivf, rot = data
    prefix = _prefix()
    root = f"s3://{BUCKET}/{prefix}"
    opts = s3["options"]
    ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
    ds.create_index("vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot)
    kept = ds.describe_indices()[0]["segments"][0]["uuid"]
    orphan = ds.create_index_uncommitted("vec", "IVF_RQ", name="idx", ivf_centroids=ivf,
                                         rq_rotation=rot, fragment_ids=[0])
    assert bitshard.cleanup(uri, index_uri=root, storage_options=opts) == []   # too young
    assert bitshard.cleanup(root, 0, storage_options=opts, dry_run=True) == [orphan.uuid]
    assert f"segments/{orphan.uuid}.bsseg" in _keys(s3, prefix)
    # A writer killed during its conditional-write probe leaves the probe
    # object at the root; cleanup removes it under the same age rule (and
    # leaves an object of another name alone).
    st = Storage.for_uri(root, opts)
    probe, other = ".bitshard-probe-" + "ab" * 16, ".bitshard-probe-notmine"
    st.write_bytes(probe, b"1")
    st.write_bytes(other, b"1")
    assert bitshard.cleanup(root, 3600, storage_options=opts) == []
    assert probe in _keys(s3, prefix)
    # the command line: --index-uri s3://... --storage-option KEY=VALUE
    from bitshard.cli import main

    argv = ["cleanup", uri, "--older-than", "0", "--index-uri", root]
    for k, v in opts.items():
        argv += ["--storage-option", f"{k}={v}"]
    assert main(argv) == 0
    assert _keys(s3, prefix) == [other, "indices/idx/v00000001.json", f"segments/{kept}.bsseg"]
    assert main(["verify", uri, "--index-uri", root]
                + [a for k, v in opts.items() for a in ("--storage-option", f"{k}={v}")]) == 0
    loc_hits = ds.search("vec", x[3], k=3)
    assert loc_hits.column("_rowid")[0].as_py() == 3


def test_store_that_ignores_conditional_writes_is_refused(s3, monkeypatch):
    """A store that ignores If-None-Match would let two writers commit one
    version: the first exclusive create of a process probes for that and
    refuses. A store that checks the condition non-atomically (the check and
    the write racing) is caught by reading the manifest back."""
    from bitshard import storage as storage_mod

    st = Storage.for_uri(f"s3://{BUCKET}/{_prefix()}", s3["options"])
    plain_put = lambda self, key, data: (  # noqa: E731
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data) and True)
    monkeypatch.setattr(storage_mod, "_PROBED", {})
    monkeypatch.setattr(ObjectStorage, "_conditional_put", plain_put)
    with pytest.raises(bitshard.BitshardError, match="ignores conditional writes"):
        st.create_exclusive("indices/i/v00000001.json", b"mine")
    assert not st.exists("indices/i/v00000001.json")

    # The condition "passed" but another writer's bytes are what the store holds.
    monkeypatch.setattr(storage_mod, "_PROBED", {(st.bucket,) + st._client_key(): True})

    def racing_put(self, key, data):
        self.client.put_object(Bucket=self.bucket, Key=key, Body=b"the other writer's")
        return True

    monkeypatch.setattr(ObjectStorage, "_conditional_put", racing_put)
    with pytest.raises(FileExistsError):
        st.create_exclusive("indices/i/v00000001.json", b"mine")


def test_segment_cache_dir(s3, data, tmp_path):
    """With cache_dir, segments are downloaded once to local files and mapped;
    a damaged cached copy is dropped and fetched again."""
    uri, x, ivf, rot = data
    root = f"s3://{BUCKET}/{_prefix()}"
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    ds.create_index("vec", "IVF_RQ", name="idx", ivf_centroids=ivf, rq_rotation=rot)
    u = ds.describe_indices()[0]["segments"][0]["uuid"]
    want = _result(ds.search("vec", x[:8], k=5))
    cache = tmp_path / "cache"
    opts = dict(s3["options"], cache_dir=str(cache))
    assert _result(bitshard.dataset(uri, index_uri=root, storage_options=opts)
                   .search("vec", x[:8], k=5)) == want
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert [p.name for p in files] == [f"segments__{u}.bsseg"]
    blob = bytearray(files[0].read_bytes())
    blob[len(blob) // 2] ^= 1
    files[0].write_bytes(bytes(blob))            # same size, bad checksum
    assert _result(bitshard.dataset(uri, index_uri=root, storage_options=opts)
                   .search("vec", x[:8], k=5)) == want
    assert files[0].read_bytes() != bytes(blob)  # fetched again


def test_lance_data_on_s3_keeps_its_index_beside_it(s3, data, tmp_path):
    """A Lance dataset on S3 opened with its own storage options: the index
    defaults to <dataset>/_bitshard on the same store, with the same options,
    and process-pool workers reopen both from their pickles."""
    import lance
    import pyarrow as pa

    uri, x, ivf, rot = data
    lance_opts = {"aws_endpoint": s3["endpoint"], "aws_access_key_id": KEY_ID,
                  "aws_secret_access_key": SECRET, "aws_region": "us-east-1",
                  "allow_http": "true"}
    prefix = _prefix()
    s3_uri = f"s3://{BUCKET}/{prefix}/v.lance"
    lance.write_dataset(pa.table({"vec": pa.FixedSizeListArray.from_arrays(
        pa.array(x.ravel()), D)}), s3_uri, storage_options=lance_opts, max_rows_per_file=500)
    ds = bitshard.dataset(lance.dataset(s3_uri, storage_options=lance_opts))
    assert ds.index_root == f"{s3_uri}/_bitshard"
    built = bitshard.build_index(ds, "vec", name="idx", ivf_centroids=ivf, rq_rotation=rot,
                                 executor="processes", num_workers=2, progress=False)
    assert any(k.startswith("v.lance/_bitshard/indices/idx/") for k in _keys(s3, prefix))
    local = _local(data, tmp_path)
    assert _result(built.search("vec", x[:6], k=5)) == _result(local.search("vec", x[:6], k=5))


def test_changed_data_under_an_s3_index_is_searched_exactly(s3, tmp_path):
    # Living datasets (tests/python/test_living.py) with the index root on
    # S3: the identity records travel in the manifest there, and a format 1
    # manifest is compared at its source version.
    import lance
    import pyarrow as pa

    x = clustered(800, D, seed=21)
    uri = write_lance(tmp_path / "l.lance", x, 200)
    root = f"s3://{BUCKET}/{_prefix()}"
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    ds.create_index("vec", num_partitions=4, num_bits=4)
    doc = idx.read_manifest(ds.storage, "vec_idx")
    assert doc["format_version"] == 2
    assert [f["id"] for f in doc["segments"][0]["fragments"]] == [0, 1, 2, 3]
    # The same manifest as format 1 wrote it, as version 2.
    old = dict(doc, format_version=1, version=2,
               segments=[{k: v for k, v in e.items() if k not in ("fragments", "source_version")}
                         for e in doc["segments"]])
    old["checksum"] = idx._checksum(old)
    ds.storage.create_exclusive("indices/vec_idx/v00000002.json", json.dumps(old).encode())

    new = (x * -1.0).astype(np.float32)
    lds = lance.dataset(uri)
    lds.drop_columns(["vec"])

    @lance.batch_udf(output_schema=pa.schema([pa.field("vec", pa.list_(pa.float32(), D))]))
    def udf(batch):
        ids = batch.column("id").to_numpy()
        return pa.record_batch([pa.FixedSizeListArray.from_arrays(
            pa.array(new[ids].ravel()), D)], names=["vec"])

    lance.dataset(uri).add_columns(udf, read_columns=["id"])
    fresh = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    (d,) = fresh.describe_indices()
    assert d["version"] == 2
    assert d["stale_fragments"] == [{"id": f, "reason": "column fields changed"}
                                    for f in range(4)]
    t = fresh.search("vec", new[333], k=1)
    assert t.column("_rowid").to_pylist() == [(1 << 32) | 133]
    assert t.column("_distance").to_pylist()[0] == pytest.approx(0.0, abs=1e-4)
    from bitshard.maintenance import verify_report
    rep = verify_report(uri, index_uri=root, storage_options=s3["options"])
    assert rep.faults == [] and len(rep.notices) == 4 and not rep.current


def test_optimize_indices_remaps_on_s3(s3, tmp_path):
    # Issue 12: the compaction remap with the index root on S3; the result
    # answers like a local fresh build with the same artifacts.
    import lance

    x = clustered(1500, D, seed=21)
    uri = write_lance(tmp_path / "c.lance", x, 300)
    root = f"s3://{BUCKET}/{_prefix()}"
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    ds.create_index("vec", "IVF_RQ", name="idx", num_partitions=4, num_bits=2)
    lance.dataset(uri).delete("id % 9 = 2")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=1000)
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    ds.optimize_indices()
    st = ds.last_optimize_stats["idx"]
    live = sum(1 for i in range(1500) if i % 9 != 2)
    assert (st["rows_read"], st["rows_remapped"], st["version"]) == (0, live, 2)
    (h,) = idx.committed_segments(ds.storage, "idx")
    o = idx.open_handle(h, ds.storage)
    loc = bitshard.dataset(uri, index_uri=tmp_path / "fresh")
    seg = loc.create_index_uncommitted("vec", ivf_centroids=o.ivf_model(), rq_rotation=o.rotation(),
                                       fragment_ids=list(h.fragment_ids), index_uuid=h.uuid)
    loc.commit_existing_index_segments("idx", "vec", [seg])
    q = x[:12] + 0.1
    assert _result(ds.search("vec", q, k=10)) == _result(loc.search("vec", q, k=10))
    assert ds.describe_indices()[0]["uncovered_fragments"] == []


def test_optimize_indices_on_s3_records_the_fingerprints_it_judges_by(s3, tmp_path):
    # Issue 12 with the index root on S3: after a compaction and an append,
    # optimize_indices writes a remapped segment and a delta whose files
    # carry the fingerprints of the fragments as they are now (the same as
    # the manifest's records), byte for byte a local fresh build's; when the
    # vector column is then replaced in place, describe_indices judges the
    # fragments stale from those file fingerprints, and the next upkeep
    # encodes every live row again, recording the new fingerprints.
    import lance
    import pyarrow as pa

    from bitshard import identity

    x = clustered(1500, D, seed=23)
    uri = write_lance(tmp_path / "f.lance", x, 300)
    root = f"s3://{BUCKET}/{_prefix()}"
    key_of = root[len(f"s3://{BUCKET}/"):]

    def dataset():
        return bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])

    def check_fingerprints(ds):
        doc = idx.read_manifest(ds.storage, "idx")
        for e, h in zip(doc["segments"], idx.committed_segments(ds.storage, "idx")):
            o = idx.open_handle(h, ds.storage)
            now = [identity.fingerprint(ds.source.fragment_identity(f, "vec"))
                   for f in h.fragment_ids]
            assert o.fragment_fingerprints == now
            assert [f["identity"] for f in e["fragments"]] == now

    ds = dataset()
    ds.create_index("vec", "IVF_RQ", name="idx", num_partitions=4, num_bits=4)
    lance.dataset(uri).delete("id % 9 = 2")
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=1000)
    more = clustered(400, D, seed=24)
    lance.write_dataset(pa.table({"id": pa.array(np.arange(1500, 1900)),
                                  "vec": pa.FixedSizeListArray.from_arrays(
                                      pa.array(more.ravel()), D)}), uri, mode="append")
    ds = dataset()
    ds.optimize_indices()
    st = ds.last_optimize_stats["idx"]
    live = sum(1 for i in range(1500) if i % 9 != 2)
    assert (st["rows_remapped"], st["rows_read"], st["rows_encoded"]) == (live, 400, 400)
    handles = idx.committed_segments(ds.storage, "idx")
    assert len(handles) == 2  # the remapped segment and the appended rows' delta
    check_fingerprints(ds)
    (d,) = ds.describe_indices()
    assert (d["stale_fragments"], d["uncovered_fragments"], d["missing_fragments"]) == ([], [], [])
    # Byte for byte a local fresh build with the same artifacts and layout.
    o = idx.open_handle(handles[0], ds.storage)
    loc = bitshard.dataset(uri, index_uri=tmp_path / "fresh")
    segs = []
    for h in handles:
        seg = loc.create_index_uncommitted("vec", ivf_centroids=o.ivf_model(),
                                           rq_rotation=o.rotation(),
                                           fragment_ids=list(h.fragment_ids), index_uuid=h.uuid)
        remote = s3["client"].get_object(Bucket=BUCKET,
                                         Key=f"{key_of}/segments/{h.uuid}.bsseg")["Body"].read()
        assert remote == open(seg.path, "rb").read()
        segs.append(seg)
    loc.commit_existing_index_segments("idx", "vec", segs)
    q = np.concatenate([x[:8], more[:8]]) + 0.1
    assert _result(ds.search("vec", q, k=10)) == _result(loc.search("vec", q, k=10))

    # The vector column replaced in place: every fragment is stale, judged
    # from the files' fingerprints; the upkeep re-encodes all live rows.
    new = (np.concatenate([x, more]) * -1.0).astype(np.float32)
    lds = lance.dataset(uri)
    lds.drop_columns(["vec"])

    @lance.batch_udf(output_schema=pa.schema([pa.field("vec", pa.list_(pa.float32(), D))]))
    def udf(batch):
        ids = batch.column("id").to_numpy()
        return pa.record_batch([pa.FixedSizeListArray.from_arrays(
            pa.array(new[ids].ravel()), D)], names=["vec"])

    lance.dataset(uri).add_columns(udf, read_columns=["id"])
    ds = dataset()
    frags = [f.id for f in ds.source.fragments()]
    (d,) = ds.describe_indices()
    assert d["stale_fragments"] == [{"id": f, "reason": "column fields changed"} for f in frags]
    ds.optimize_indices()
    st = ds.last_optimize_stats["idx"]
    assert (st["rows_remapped"], st["rows_read"]) == (0, live + 400)
    assert sorted(st["stale_fragments"]) == frags
    check_fingerprints(ds)
    (d,) = ds.describe_indices()
    assert (d["stale_fragments"], d["uncovered_fragments"]) == ([], [])
    t = ds.search("vec", new[333], k=1)
    assert t.column("_distance").to_pylist()[0] == pytest.approx(0.0, abs=1e-4)
