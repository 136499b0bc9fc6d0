"""No storage-backend error reaches a caller raw, and cleanup never removes
what a live writer holds (issue 11: trust, the remaining upkeep items).

- Every public call that touches an index root (search, merge, commit,
  optimize_indices, verify, cleanup, build_index), with each backend call it
  makes failing in turn (missing file, permission denied, I/O error; on S3
  NoSuchKey, AccessDenied and a connection error), raises a BitshardError
  whose message names the file, never the backend's bare exception.
- A segment removed while a merge reads it (cleanup racing optimize_indices
  on S3) is MissingFileError naming the file and what to do.
- A live writer's temp files (build state, segment) survive
  ``cleanup --older-than 0``; a dead writer's are removed.
- An unreadable build state stops cleanup; abandoned_builds drops it.
- Killed uploads: stale multipart uploads are aborted and dead writers'
  ``$TMPDIR/bitshard-upload-*`` directories removed; live ones are left.
- optimize_indices commits new versions of a legacy-named index.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import traceback
import warnings

import numpy as np
import pytest

import bitshard
from bitshard import index as idx
from bitshard import names, storage
from bitshard.errors import (BitshardError, CorruptIndexError, MissingFileError,
                             StorageError)
from bitshard.storage import LocalStorage, ObjectStorage

from conftest import lance_with_artifacts, unreadable_build_state_message

D = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """800 x 16 vectors in 4 Lance fragments, and shared artifacts."""
    return lance_with_artifacts(tmp_path_factory.mktemp("se") / "v.lance", 800, D, 200,
                                num_partitions=4, seed=9, ivf_seed=1, rotation_seed=2)


def _two_segment_index(ds, ivf, rot, name="idx"):
    a = ds.create_index_uncommitted("vec", name=name, ivf_centroids=ivf, rq_rotation=rot,
                                    fragment_ids=[0, 1], num_threads=1)
    b = ds.create_index_uncommitted("vec", name=name, ivf_centroids=ivf, rq_rotation=rot,
                                    fragment_ids=[2, 3], num_threads=1)
    ds.commit_existing_index_segments(name, "vec", [a])
    ds.commit_existing_index_segments(name, "vec", [b])
    return a, b


# ------------------------------------------------- injected backend faults


class _Faults:
    """Counts backend calls; the ``at``-th raises ``make()``."""

    def __init__(self) -> None:
        self.n = 0
        self.at = -1
        self.make = None
        self.fired = False

    def hit(self) -> None:
        n = self.n
        self.n += 1
        if n == self.at:
            self.fired = True
            raise self.make()


class _Proxy:
    """A module (or object) whose listed functions go through ``faults``."""

    def __init__(self, inner, faults, fns) -> None:
        self._inner, self._faults, self._fns = inner, faults, set(fns)

    def __getattr__(self, attr):
        value = getattr(self._inner, attr)
        if attr in self._fns and callable(value):
            faults = self._faults

            def call(*a, **kw):
                faults.hit()
                return value(*a, **kw)
            return call
        return value


_OS_CALLS = ("listdir", "lstat", "stat", "open", "replace", "link", "unlink", "remove",
             "makedirs", "fstat", "fsync", "rmdir")
_LOCAL_FAULTS = [
    lambda: FileNotFoundError(errno.ENOENT, "No such file or directory (injected)"),
    lambda: PermissionError(errno.EACCES, "Permission denied (injected)"),
    lambda: OSError(errno.EIO, "Input/output error (injected)"),
]


def _local_ops(data):
    uri, x, ivf, rot = data

    def search(root):
        bitshard.dataset(uri, index_uri=root).search("vec", x[:2], k=3)

    def merge(root):
        ds = bitshard.dataset(uri, index_uri=root)
        ds.merge_existing_index_segments(idx.committed_segments(ds.storage, "idx"))

    def commit(root):
        ds = bitshard.dataset(uri, index_uri=root)
        seg = ds.create_index_uncommitted("vec", name="idx2", ivf_centroids=ivf,
                                          rq_rotation=rot, fragment_ids=[0], num_threads=1)
        ds.commit_existing_index_segments("idx2", "vec", [seg])

    def optimize(root):
        bitshard.dataset(uri, index_uri=root).optimize_indices("idx")

    def verify(root):
        bitshard.maintenance.verify(uri, index_uri=root)

    def cleanup(root):
        bitshard.cleanup(root, 0)

    def build(root):
        bitshard.build_index(uri, "vec", name="b", index_uri=root, ivf_centroids=ivf,
                             rq_rotation=rot, executor="serial", fragments_per_task=2,
                             progress=False)

    return [search, merge, commit, optimize, verify, cleanup, build]


def _check_surface(op, run, faults, fault_kinds, where):
    """Run ``op`` once to count its backend calls, then once per call with
    that call failing; returns the failures (a raw exception, or a storage
    error not naming the file)."""
    bad = []
    faults.at = -1
    faults.n = 0
    run(op, None)
    total = faults.n
    assert total > 0, op.__name__
    for at in range(total):
        faults.n, faults.at, faults.fired = 0, at, False
        faults.make = fault_kinds[at % len(fault_kinds)]
        try:
            run(op, at)
        except BitshardError as e:
            if isinstance(e, (StorageError, MissingFileError)) and where(at) not in str(e):
                bad.append(f"{op.__name__} call {at}: does not name the file: {e!r}")
        except Exception:  # noqa: BLE001 - what this test exists to catch
            bad.append(f"{op.__name__} call {at}: {traceback.format_exc(limit=-3)}")
    return bad, total


def test_no_raw_backend_error_from_a_public_call_on_a_local_root(data, tmp_path, monkeypatch):
    uri, x, ivf, rot = data
    template = str(tmp_path / "template")
    ds = bitshard.dataset(uri, index_uri=template)
    _two_segment_index(ds, ivf, rot)
    faults = _Faults()
    monkeypatch.setattr(storage, "os", _Proxy(os, faults, _OS_CALLS))
    monkeypatch.setattr(storage, "open", _Proxy(__import__("builtins"), faults,
                                                 ("open",)).open, raising=False)
    monkeypatch.setattr(storage, "mmap", _Proxy(__import__("mmap"), faults, ("mmap",)))
    roots = {}

    def run(op, at):
        root = str(tmp_path / f"{op.__name__}-{at}")
        shutil.copytree(template, root)  # not through bitshard.storage: not counted
        roots[at] = root
        op(root)

    failures, counts = [], {}
    for op in _local_ops(data):
        bad, counts[op.__name__] = _check_surface(op, run, faults, _LOCAL_FAULTS,
                                                  lambda at: roots[at])
        failures += bad
    assert failures == [], "\n".join(failures[:10])
    # every call was reached (the fault count is what was tried)
    assert all(n >= 3 for n in counts.values()), counts


def test_backend_error_messages():
    path = "/r/segments/x.bsseg"
    e = storage.backend_error(path, "read", PermissionError(13, "Permission denied"))
    assert isinstance(e, StorageError) and isinstance(e, OSError)
    assert str(e) == (f"cannot read {path}: permission denied "
                      f"(PermissionError: [Errno 13] Permission denied)")
    e = storage.backend_error(path, "read", OSError(
        "AWS Error NO_SUCH_KEY during GetObject operation: The specified key does not exist."))
    assert isinstance(e, MissingFileError) and isinstance(e, FileNotFoundError)
    assert isinstance(e, CorruptIndexError)
    assert str(e) == (f"cannot read {path}: it does not exist (OSError: AWS Error NO_SUCH_KEY "
                      f"during GetObject operation: The specified key does not exist.)")
    e = storage.backend_error(path, "upload", OSError(
        "AWS Error NO_SUCH_UPLOAD during UploadPart operation"))
    assert isinstance(e, StorageError) and str(e).startswith(
        f"cannot upload {path}: its multipart upload was aborted while it ran (by cleanup")
    e = storage.backend_error(path, "write", OSError(errno.ENOSPC, "No space left on device"))
    assert str(e) == (f"cannot write {path}: the storage backend failed "
                      f"(OSError: [Errno 28] No space left on device)")
    # not the backend's: passes as it is
    assert storage._backend_kind(ValueError("x")) is None
    assert storage._backend_kind(CorruptIndexError("x")) is None


# ------------------------------------------------ live writers' temp files


def test_cleanup_at_age_0_leaves_a_live_build_state_save(data, tmp_path, monkeypatch):
    """The build state's temp file is written outside the commit lock; cleanup
    --older-than 0 between its write and its rename used to remove it, and
    the build failed with a raw FileNotFoundError."""
    uri, x, ivf, rot = data
    root = str(tmp_path / "root")
    real_replace = os.replace
    raced = []

    def racing_replace(src, dst):
        if "/builds/" in src and src.endswith(".tmp") and not raced:
            raced.append(src)
            bitshard.cleanup(root, 0)            # the racing cleanup
            assert os.path.exists(src), "cleanup removed a live writer's temp file"
        return real_replace(src, dst)

    monkeypatch.setattr(storage, "os", _Proxy(os, _Faults(), ()))
    monkeypatch.setattr(storage.os, "replace", racing_replace, raising=False)
    ds = bitshard.build_index(uri, "vec", name="b", index_uri=root, ivf_centroids=ivf,
                              rq_rotation=rot, executor="serial", fragments_per_task=2,
                              progress=False)
    assert raced and raced[0].startswith(os.path.join(root, "builds", "b."))
    assert len(ds.search("vec", x[0], k=3)) == 3


_HOLDER = textwrap.dedent("""
    import sys, time
    from bitshard import storage
    st = storage.LocalStorage(sys.argv[1])
    kind, key = sys.argv[2], sys.argv[3]
    if kind == "segment":
        with st.segment_target(key):
            print("held", flush=True)
            time.sleep(600)
    else:
        import os
        os.makedirs(os.path.dirname(st.path(key)), exist_ok=True)
        fd = storage._write_synced(st.path(key), b"{}")
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.mark.parametrize("kind,key", [
    ("segment", "segments/" + "ab" * 16 + ".bsseg"),
    ("state", "builds/b.json.0123abcd.tmp"),
    ("manifest", "indices/idx/v00000003.json.0123abcd.tmp"),
])
def test_cleanup_removes_a_temp_file_only_once_its_writer_died(data, tmp_path, kind, key):
    uri, x, ivf, rot = data
    root = str(tmp_path / "root")
    ds = bitshard.dataset(uri, index_uri=root)
    _two_segment_index(ds, ivf, rot)
    tmp = os.path.join(root, *key.split("/")) + (".tmp" if kind == "segment" else "")
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, root, kind, key],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        past = time.time() - 7200
        os.utime(tmp, (past, past))
        assert bitshard.cleanup(root, 0) == []
        assert os.path.exists(tmp)               # alive: left, whatever the age
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    removed = bitshard.cleanup(root, 0)
    assert not os.path.exists(tmp)               # dead: removed
    assert removed == (["ab" * 16] if kind == "segment" else [])
    assert bitshard.maintenance.verify(uri, index_uri=root) == []


def test_a_segment_write_survives_cleanup_at_age_0(data, tmp_path, monkeypatch):
    """cleanup at age 0 while a segment is being written leaves its temp file
    (the C writer then renames it) instead of failing the write."""
    uri, x, ivf, rot = data
    root = str(tmp_path / "root")
    ds = bitshard.dataset(uri, index_uri=root)
    _two_segment_index(ds, ivf, rot)
    real = idx._native.merge
    seen = []

    def racing_merge(natives, uuid, path):
        bitshard.cleanup(root, 0)
        seen.append(os.path.exists(path + ".tmp"))
        return real(natives, uuid, path)

    monkeypatch.setattr(idx._native, "merge", racing_merge)
    ds.optimize_indices("idx")
    assert seen == [True]
    assert idx.manifest_versions(root, "idx") == [1, 2, 3]
    assert bitshard.maintenance.verify(uri, index_uri=root) == []


# ----------------------------------------------- unreadable build states


def test_unreadable_build_state_protects_every_uncommitted_segment(data, tmp_path):
    uri, x, ivf, rot = data
    root = str(tmp_path / "root")
    ds = bitshard.dataset(uri, index_uri=root)
    _two_segment_index(ds, ivf, rot)
    orphan = ds.create_index_uncommitted("vec", name="b", ivf_centroids=ivf, rq_rotation=rot,
                                         fragment_ids=[0], num_threads=1)
    state = os.path.join(root, "builds", "b.json")
    os.makedirs(os.path.dirname(state))
    with open(state, "w") as f:
        f.write('{"format": "bitshard-build", "format_version": 1, "segm')
    with pytest.raises(CorruptIndexError) as e:
        bitshard.cleanup(root, 0)
    assert str(e.value) == unreadable_build_state_message(
        state, f"build state {state} is not valid JSON: Unterminated string starting at: "
               f"line 1 column 51 (char 50)", "b")
    assert os.path.exists(orphan.path)
    # the command line says the same and exits 1
    from bitshard.cli import main as cli_main
    assert cli_main(["cleanup", root, "--older-than", "0"]) == 1
    # a state younger than the age is not abandoned yet: still refused
    with pytest.raises(CorruptIndexError, match="cannot be read"):
        bitshard.cleanup(root, 3600, abandoned_builds=True)
    assert os.path.exists(orphan.path) and os.path.exists(state)
    # abandoned_builds drops it once older than the age; its segments go too
    assert bitshard.cleanup(root, 0, abandoned_builds=True) == [orphan.uuid]
    assert not os.path.exists(state)
    assert bitshard.maintenance.verify(uri, index_uri=root) == []


# ----------------------------------------------------- legacy index names


def _rename_index(root, old, new):
    src = os.path.join(root, "indices", old)
    dst = os.path.join(root, "indices", new)
    os.makedirs(dst)
    for fn in sorted(os.listdir(src)):
        doc = json.load(open(os.path.join(src, fn)))
        doc["name"] = new
        doc["checksum"] = idx._checksum(doc)
        json.dump(doc, open(os.path.join(dst, fn), "w"))
    shutil.rmtree(src)


def test_optimize_indices_commits_to_a_legacy_named_index(data, tmp_path):
    uri, x, ivf, rot = data
    root = str(tmp_path / "root")
    ds = bitshard.dataset(uri, index_uri=root)
    _two_segment_index(ds, ivf, rot)
    want = ds.search("vec", x[:4], k=5)
    for legacy in ("my idx", "-dash", "a..b", "é" * 70):
        old = "idx" if legacy == "my idx" else prev
        _rename_index(root, old, legacy)
        with pytest.warns(names.LegacyNameWarning):
            ds = bitshard.dataset(uri, index_uri=root)
            before = idx.latest_version(root, legacy)
            # two segments again, so that optimize has something to merge
            ds.commit_existing_index_segments(legacy, "vec", [
                ds.create_index_uncommitted("vec", name=legacy, ivf_centroids=ivf,
                                            rq_rotation=rot, fragment_ids=[0, 1],
                                            num_threads=1),
                ds.create_index_uncommitted("vec", name=legacy, ivf_centroids=ivf,
                                            rq_rotation=rot, fragment_ids=[2, 3],
                                            num_threads=1)], replace=True)
            ds.optimize_indices(legacy)
            assert idx.latest_version(root, legacy) == before + 2
            assert len(idx.committed_segments(root, legacy)) == 1
            got = ds.search("vec", x[:4], k=5, index=legacy)
        assert got.column("_rowid").equals(want.column("_rowid"))
        prev = legacy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", names.LegacyNameWarning)
        assert bitshard.maintenance.verify(uri, index_uri=root) == []


# --------------------------------------------------------- on an S3 server


def _s3_fixture():
    pytest.importorskip("moto", reason="moto[server] is not installed")
    import test_object_store
    return test_object_store


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    tos = _s3_fixture()
    yield from tos.s3.__wrapped__(tmp_path_factory)


def _s3_root(s3, what):
    import uuid as uuid_mod
    return f"s3://{_s3_fixture().BUCKET}/{what}-{uuid_mod.uuid4().hex[:12]}"


def _s3_faults():
    from botocore.exceptions import ClientError, EndpointConnectionError
    return [
        lambda: OSError("When reading information for key 'k' in bucket 'b': AWS Error "
                        "NO_SUCH_KEY during GetObject operation: The specified key does not "
                        "exist. (injected)"),
        lambda: OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied "
                        "(injected)"),
        lambda: ClientError({"Error": {"Code": "NoSuchKey", "Message": "injected"},
                             "ResponseMetadata": {"HTTPStatusCode": 404}}, "DeleteObject"),
        lambda: EndpointConnectionError(endpoint_url="http://127.0.0.1:1 (injected)"),
    ]


_FS_CALLS = ("get_file_info", "open_input_stream", "open_input_file", "open_output_stream")
_CLIENT_CALLS = ("put_object", "delete_object", "list_multipart_uploads", "list_parts",
                 "abort_multipart_upload")


def test_no_raw_backend_error_from_a_public_call_on_s3(s3, data, monkeypatch):
    uri, x, ivf, rot = data
    opts = s3["options"]
    faults = _Faults()
    real_fs, real_client = ObjectStorage.fs.fget, ObjectStorage.client.fget
    monkeypatch.setattr(ObjectStorage, "fs", property(
        lambda self: _Proxy(real_fs(self), faults, _FS_CALLS)))
    monkeypatch.setattr(ObjectStorage, "client", property(
        lambda self: _Proxy(real_client(self), faults, _CLIENT_CALLS)))
    roots = {}
    template = _s3_root(s3, "template")
    faults.at = -1
    _two_segment_index(bitshard.dataset(uri, index_uri=template, storage_options=opts),
                       ivf, rot)
    client, bucket = s3["client"], _s3_fixture().BUCKET
    tprefix = template.split("/", 3)[3] + "/"
    tkeys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=tprefix)["Contents"]]

    def run(op, at):
        # A copy of the template made by the test's own client (not faulted).
        root = _s3_root(s3, f"{op.__name__}-{at}")
        prefix = root.split("/", 3)[3] + "/"
        for k in tkeys:
            client.copy_object(Bucket=bucket, Key=prefix + k[len(tprefix):],
                               CopySource={"Bucket": bucket, "Key": k})
        storage.Storage.for_uri(root, opts)  # the ops find the options by root
        roots[at] = root
        op(root)

    failures, counts = [], {}
    for op in _local_ops(data):
        bad, counts[op.__name__] = _check_surface(op, run, faults, _s3_faults(),
                                                  lambda at: roots[at])
        failures += bad
    assert failures == [], "\n".join(failures[:10])
    assert all(n >= 3 for n in counts.values()), counts


def test_a_segment_removed_while_optimize_reads_it_on_s3(s3, data, monkeypatch):
    """Issue 11: cleanup(older_than 0) racing optimize_indices on S3 removed a
    segment being merged, and a raw ``OSError: AWS Error NO_SUCH_KEY`` escaped."""
    uri, x, ivf, rot = data
    root = _s3_root(s3, "gone")
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    a, b = _two_segment_index(ds, ivf, rot)
    st = ds.storage
    real_fs = ObjectStorage.fs.fget
    victim = st._fs_path(idx.segment_key(b.uuid))

    class Racing:
        """The object vanishes between its metadata read and its download."""

        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, attr):
            return getattr(self.fs, attr)

        def open_input_file(self, path):
            if path == victim:
                s3["client"].delete_object(Bucket=st.bucket, Key=st.object_key(
                    idx.segment_key(b.uuid)))
            return self.fs.open_input_file(path)

    monkeypatch.setattr(ObjectStorage, "fs", property(lambda self: Racing(real_fs(self))))
    with pytest.raises(MissingFileError) as e:
        ds.optimize_indices("idx")
    assert str(e.value).startswith(
        f"segment file is missing: {b.path} (a manifest or a handle names it, but it was "
        f"removed: by hand, or by cleanup with an age shorter than a writer's write-to-commit "
        f"time; refresh() (or reopen the dataset) and rerun")
    assert idx.manifest_versions(st, "idx") == [1, 2]     # nothing committed


def test_cleanup_aborts_stale_multipart_uploads_on_s3(s3, data):
    uri, x, ivf, rot = data
    root = _s3_root(s3, "mpu")
    ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
    _two_segment_index(ds, ivf, rot)
    st = ds.storage
    client = s3["client"]
    key = st.object_key(f"segments/{'cd' * 16}.bsseg")
    up = client.create_multipart_upload(Bucket=st.bucket, Key=key)
    client.upload_part(Bucket=st.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1,
                       Body=b"x" * 1024)
    other = client.create_multipart_upload(Bucket=st.bucket, Key=st.object_key("notes.txt"))

    def uploads():
        got = client.list_multipart_uploads(Bucket=st.bucket, Prefix=st.object_key("") + "/")
        return sorted(u["Key"] for u in got.get("Uploads", []))

    assert uploads() == sorted([key, st.object_key("notes.txt")])
    # younger than the age: left (a store cannot tell a live upload from a
    # dead one). moto reports every upload as started in 2010; its parts'
    # times are real, and a part uploaded within the age keeps it.
    assert bitshard.cleanup(root, 3600, storage_options=s3["options"]) == []
    assert uploads() == sorted([key, st.object_key("notes.txt")])
    assert bitshard.cleanup(root, 1e10, storage_options=s3["options"]) == []
    assert uploads() == sorted([key, st.object_key("notes.txt")])
    assert st.abort_stale_uploads("segments", 0, dry_run=True) == [f"segments/{'cd' * 16}.bsseg"]
    assert bitshard.cleanup(root, 0, storage_options=s3["options"]) == []
    # only a segment's upload is bitshard's to abort
    assert uploads() == [st.object_key("notes.txt")]
    client.abort_multipart_upload(Bucket=st.bucket, Key=st.object_key("notes.txt"),
                                  UploadId=other["UploadId"])
    assert bitshard.maintenance.verify(uri, index_uri=root, storage_options=s3["options"]) == []


_UPLOADER = textwrap.dedent("""
    import sys, time
    from bitshard import storage
    d, fd = storage.make_upload_dir()
    open(d + "/x.bsseg", "wb").write(b"bytes")
    print(d, flush=True)
    time.sleep(600)
""")


def test_dead_writers_upload_directories_are_reclaimed(s3, data, tmp_path, monkeypatch):
    uri, x, ivf, rot = data
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    live = subprocess.Popen([sys.executable, "-c", _UPLOADER], stdout=subprocess.PIPE,
                            text=True, env=env)
    dead = subprocess.Popen([sys.executable, "-c", _UPLOADER], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        live_dir = live.stdout.readline().strip()
        dead_dir = dead.stdout.readline().strip()
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert os.path.isdir(live_dir) and os.path.isdir(dead_dir)
        other = tmpdir / "bitshard-upload-notadir"
        other.write_bytes(b"")                     # not a directory: left
        monkeypatch.setattr(storage, "_upload_tmp_root", lambda: str(tmpdir))
        root = _s3_root(s3, "dirs")
        ds = bitshard.dataset(uri, index_uri=root, storage_options=s3["options"])
        _two_segment_index(ds, ivf, rot)
        assert bitshard.cleanup(root, 0, storage_options=s3["options"]) == []
        assert sorted(os.listdir(tmpdir)) == sorted([os.path.basename(live_dir),
                                                     "bitshard-upload-notadir"])
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    # a writer's own first upload directory reclaims what dead writers left
    assert storage.reclaim_upload_dirs(tmp_root=str(tmpdir)) == [live_dir]
    assert os.listdir(tmpdir) == ["bitshard-upload-notadir"]


def test_optimize_indices_commits_to_a_legacy_named_index_on_s3(s3, data):
    uri, x, ivf, rot = data
    root = _s3_root(s3, "legacy")
    opts = s3["options"]
    ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
    _two_segment_index(ds, ivf, rot)
    want = ds.search("vec", x[:4], k=5)
    st, client = ds.storage, s3["client"]
    for v in (1, 2):
        doc = json.loads(st.read_bytes(f"indices/idx/v{v:08d}.json"))
        doc["name"] = "my idx"
        doc["checksum"] = idx._checksum(doc)
        client.put_object(Bucket=st.bucket, Key=st.object_key(f"indices/my idx/v{v:08d}.json"),
                          Body=json.dumps(doc).encode())
        client.delete_object(Bucket=st.bucket, Key=st.object_key(f"indices/idx/v{v:08d}.json"))
    with pytest.warns(names.LegacyNameWarning):
        ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
        ds.optimize_indices("my idx")
        assert idx.manifest_versions(st, "my idx") == [1, 2, 3]
        got = ds.search("vec", x[:4], k=5)
    assert got.column("_rowid").equals(want.column("_rowid"))


def test_a_dead_readers_cache_temp_file_is_removed_by_the_next_download(s3, data, tmp_path):
    """With cache_dir, a segment is downloaded to ``<cache file>.<pid>.<hex>.tmp``
    first; a reader killed meanwhile left it forever. The next download of
    that segment removes the dead readers' temp files (a live one is locked)."""
    uri, x, ivf, rot = data
    root = _s3_root(s3, "cache")
    opts = dict(s3["options"], cache_dir=str(tmp_path / "cache"))
    ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
    a, b = _two_segment_index(ds, ivf, rot)
    st = ds.storage
    cached = st._cache_path(idx.segment_key(a.uuid))
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    dead = f"{cached}.4242.0badf00d.tmp"
    with open(dead, "wb") as f:
        f.write(b"partial")
    live = f"{cached}.4343.00c0ffee.tmp"
    fd = storage._create_locked(live)
    try:
        if os.path.exists(cached):
            os.remove(cached)
        assert len(bitshard.dataset(uri, index_uri=root, storage_options=opts)
                   .search("vec", x[0], k=3)) == 3
        assert os.path.exists(cached)
        assert not os.path.exists(dead)
        assert os.path.exists(live)
    finally:
        os.close(fd)
        os.remove(live)


def test_ivf_model_files_give_named_errors(data, tmp_path):
    """IvfModel.save / IvfModel.load on a path that cannot be written or read
    raised the operating system's bare error."""
    uri, x, ivf, rot = data
    missing = str(tmp_path / "nope.ivf")
    with pytest.raises(MissingFileError) as e:
        bitshard.IvfModel.load(missing)
    assert str(e.value) == (f"cannot read {missing}: it does not exist (FileNotFoundError: "
                            f"[Errno 2] No such file or directory: '{missing}')")
    with pytest.raises(MissingFileError, match=f"^cannot read {tmp_path}/c.npy: it does not "):
        bitshard.IvfModel.load(str(tmp_path / "c.npy"))
    with pytest.raises(StorageError) as e:
        bitshard.IvfModel.load(str(tmp_path))
    assert str(e.value).startswith(f"cannot read {tmp_path}: the storage backend failed "
                                   f"(IsADirectoryError: ")
    target = str(tmp_path / "no-dir" / "m.ivf")
    with pytest.raises(MissingFileError, match=f"^cannot write {target}: it does not exist"):
        ivf.save(target)
    blocker = tmp_path / "taken"
    blocker.mkdir()
    with pytest.raises(StorageError, match=f"^cannot write {blocker}: the storage backend"):
        ivf.save(str(blocker))
    assert sorted(os.listdir(tmp_path)) == ["taken"]      # no temp file left
    ivf.save(str(tmp_path / "ok.ivf"))
    assert bitshard.IvfModel.load(str(tmp_path / "ok.ivf")) == ivf
