"""Crash trials: SIGKILL a process at random points while it writes segments,
merges, commits, resumes a build and cleans up, then check what is left.

Each trial copies a prepared index root (index ``idx``: version 1 with one
segment, version 2 with a second one, six of twelve fragments uncovered),
starts a child process that runs one operation on it and kills the child's
whole process group (``os.killpg(.., SIGKILL)``: a pool's workers die with
their driver) at a random point:

- ``point`` kills: the child wraps the storage calls it makes (the Storage
  methods, the segment writer, ``os.link/unlink/replace/remove``, the
  build-state writer; no hook is added to the library) and kills itself at
  the n-th of them, n drawn uniformly from the calls an unkilled run of the
  same operation makes (counted once per operation, with ``--trace``);
- ``delay`` kills: the parent kills the child a random time (uniform over
  the unkilled run's duration) after telling it to start, which also
  lands inside the C segment writer and inside the build's workers.

The operations: ``delta`` (encode uncovered fragments, append-commit them),
``merge`` (``optimize_indices``: merge the committed segments, replace-commit),
``build`` (``bitshard.build_index`` with the serial or the processes executor,
replacing the index), ``resume`` (a build killed once, then the rerun that
resumes it is the one killed), ``cleanup`` (``bitshard cleanup --older-than 0``,
with and without ``--abandoned-builds``, over orphan segments and, at random,
a killed build's leftovers).

After each kill the parent checks (each failed check is a finding, logged
with the trial's seed so it can be replayed with ``--only``):

1. the index opens at the version it had before the operation or the one
   after it, never between: the newest manifest is the old one byte for byte,
   or version old+1 holding exactly what the operation commits;
2. ``bitshard verify`` exits 0;
3. no committed row is lost: every fragment the old version covered is
   still covered; each sampled row of a covered fragment is its own nearest
   neighbour at distance 0 through the index alone (``fast_search``), and
   the answers at the old version are the old answers bit for bit;
4. after resuming an interrupted build to its end (the build's answers are
   then those of a single-process build with the same artifacts, bit for
   bit) and ``bitshard cleanup --older-than 0``, nothing is left under the
   root but the manifests and the segments they name (temp files of
   segments, manifests and build states, build states, orphans all count).

Usage::

    python tests/trials/crash_trials.py --trials 100 --seed 1 --root local
    python tests/trials/crash_trials.py --trials 20 --seed 1 --root s3   # a moto server
    python tests/trials/crash_trials.py --only 17 --seed 1 -v            # replay trial 17

The log (``--log``, default ``crash-trials-<root>-<seed>.log`` in the work
directory) has one line per trial: seed, operation, kill, what was found.
Exit status 0 when no trial found anything outside ``--known``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

NAME = "idx"
COLUMN = "vec"
D = 32
FRAGMENTS = 12
ROWS_PER_FRAGMENT = 100
PARTITIONS = 16
NUM_BITS = 4
K = 5
#: Fragments of the prepared index: v1 = [0, 1, 2]; v2 adds [3, 4, 5].
V1_FRAGS = [0, 1, 2]
V2_FRAGS = [3, 4, 5]
OPS = ("delta", "merge", "build", "resume", "cleanup")
BUCKET = "bitshard-trials"
KEY_ID, SECRET = "testing-key", "testing-secret"

#: Kinds of findings the harness reports; the ``leftover-*`` ones name what
#: was left behind after ``cleanup --older-than 0``.
FINDING_KINDS = (
    "torn-version", "verify", "lost-rows", "wrong-answer", "search-error",
    "resume-failed", "cleanup-failed", "leftover-manifest-tmp", "leftover-state-tmp",
    "leftover-segment-tmp", "leftover-build-state", "leftover-segment", "leftover-probe",
    "leftover-other",
    "leftover-multipart", "leftover-local-upload", "child-error", "harness-error",
)


# =========================================================================
# Child side: run one operation, with kill points around storage calls
# =========================================================================


class _Points:
    """Counts the storage calls of this process; kills the process group at
    call number ``kill_at`` (0-based), and/or records every call's name."""

    def __init__(self, kill_at: Optional[int], trace: Optional[str]) -> None:
        self.n = 0
        self.kill_at = kill_at
        self.trace: Optional[List[str]] = [] if trace else None
        self.trace_path = trace
        self.active = False

    def hit(self, name: str) -> None:
        if not self.active:
            return
        if self.trace is not None:
            self.trace.append(name)
        if self.kill_at is not None and self.n == self.kill_at:
            _kill_group()
        self.n += 1


def _kill_group() -> None:
    sys.stdout.flush()
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _kind(path: Any) -> str:
    """A short name for what a storage call touches (for the trace)."""
    p = str(path)
    base = p.rsplit("/", 1)[-1]
    if ".bsseg" in base:
        return "segment-tmp" if base.endswith(".tmp") else "segment"
    if "/builds/" in p or p.startswith("builds/"):
        return "state-tmp" if base.endswith(".tmp") else ("ivf" if ".ivf" in base else "state")
    if base.startswith("v") and ".json" in base:
        return "manifest-tmp" if base.endswith(".tmp") else "manifest"
    return "other"


def _install_points(points: _Points) -> None:
    """Wrap the calls through which bitshard changes an index root."""
    import bitshard.build_state as build_state
    import bitshard.index as idx
    import bitshard.storage as storage

    def wrap_fn(owner: Any, attr: str, label: str, path_arg: int) -> None:
        orig = getattr(owner, attr)

        def wrapper(*a: Any, **kw: Any) -> Any:
            what = _kind(a[path_arg]) if len(a) > path_arg else "other"
            points.hit(f"before {label} {what}")
            out = orig(*a, **kw)
            points.hit(f"after {label} {what}")
            return out

        setattr(owner, attr, wrapper)

    for a in ("link", "unlink", "replace", "remove", "rename"):
        wrap_fn(os, a, f"os.{a}", 0 if a in ("unlink", "remove") else 1)
    wrap_fn(storage, "_write_synced", "write-synced", 0)
    for cls in (storage.LocalStorage, storage.ObjectStorage):
        for attr, arg in (("write_bytes", 1), ("write_file", 2), ("delete", 1),
                          ("create_exclusive", 1)):
            wrap_fn(cls, attr, f"{cls.__name__}.{attr}", arg)
    wrap_fn(storage.ObjectStorage, "_conditional_put", "conditional-put", 1)
    wrap_fn(idx, "_write_native", "write-segment", 1)
    wrap_fn(build_state, "_write_json_atomic", "save-state", 1)


def child_main(spec: Dict[str, Any]) -> int:
    """Run ``spec["op"]``; print ``ready`` before waiting for a line on stdin
    and ``done <seconds>`` after."""
    os.environ["BITSHARD_CACHE_DIR"] = ""
    import numpy as np

    import bitshard
    from bitshard.cli import main as cli_main
    from bitshard.storage import Storage

    points = _Points(spec.get("kill_at"), spec.get("trace"))
    _install_points(points)
    opts = spec.get("storage_options")
    if opts:
        Storage.for_uri(spec["root"], opts)
    ivf = bitshard.IvfModel.from_bytes(open(spec["ivf"], "rb").read())
    rot = bitshard.Rotation.from_bytes(bytes.fromhex(spec["rotation"]))
    ds = bitshard.dataset(spec["data"], index_uri=spec["root"], storage_options=opts)
    ds.source.fragments()
    np.zeros(1)
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    points.active = True
    op = spec["op"]
    if op == "delta":
        segs = [ds.create_index_uncommitted(COLUMN, "IVF_RQ", name=NAME, ivf_centroids=ivf,
                                            rq_rotation=rot, fragment_ids=g, num_threads=1)
                for g in spec["groups"]]
        ds.commit_existing_index_segments(NAME, COLUMN, segs)
    elif op == "merge":
        ds.optimize_indices(NAME)
    elif op in ("build", "resume"):
        bitshard.build_index(spec["data"], COLUMN, name=NAME, ivf_centroids=ivf,
                             rq_rotation=rot, executor=spec["executor"], num_workers=2,
                             fragments_per_task=1, progress=False, index_uri=spec["root"],
                             storage_options=opts)
    elif op == "cleanup":
        argv = ["cleanup", spec["data"], "--index-uri", spec["root"], "--older-than", "0"]
        if spec.get("abandoned"):
            argv.append("--abandoned-builds")
        for k, v in (opts or {}).items():
            argv += ["--storage-option", f"{k}={v}"]
        rc = cli_main(argv)
        if rc != 0:
            print(f"cleanup exited {rc}", flush=True)
            return 3
    else:
        raise SystemExit(f"unknown op {op!r}")
    points.active = False
    if points.trace is not None:
        with open(points.trace_path, "w") as f:
            json.dump(points.trace, f)
    print(f"done {time.perf_counter() - t0:.4f}", flush=True)
    return 0


# =========================================================================
# Roots: a local directory, or a prefix on a moto S3 server
# =========================================================================


class LocalRoots:
    """Trial roots as directories under ``work``."""

    kind = "local"
    options: Optional[Dict[str, str]] = None

    def __init__(self, work: str) -> None:
        self.work = work

    def root(self, label: str) -> str:
        return os.path.join(self.work, "roots", label)

    def copy(self, src: str, dst: str) -> None:
        shutil.copytree(src, dst)

    def files(self, root: str) -> Dict[str, int]:
        """Every file under ``root``: relative key -> size."""
        out = {}
        for d, _, names in os.walk(root):
            for n in names:
                p = os.path.join(d, n)
                out[os.path.relpath(p, root).replace(os.sep, "/")] = os.path.getsize(p)
        return out

    def read(self, root: str, key: str) -> bytes:
        with open(os.path.join(root, key), "rb") as f:
            return f.read()

    def multipart(self, root: str) -> List[str]:
        return []

    def drop(self, root: str) -> None:
        shutil.rmtree(root, ignore_errors=True)

    def close(self) -> None:
        pass


class S3Roots:
    """Trial roots as prefixes of a bucket on a moto server started here
    (as tests/python/test_object_store.py starts it)."""

    kind = "s3"

    def __init__(self, work: str) -> None:
        import boto3

        self.work = work
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = open(os.path.join(work, "moto.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not answer within 60 s")
                time.sleep(0.2)
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY_ID,
                                   aws_secret_access_key=SECRET, region_name="us-east-1")
        self.client.create_bucket(Bucket=BUCKET)
        self.options = {"endpoint_override": self.endpoint, "access_key": KEY_ID,
                        "secret_key": SECRET, "region": "us-east-1"}

    def root(self, label: str) -> str:
        return f"s3://{BUCKET}/{label}"

    def _prefix(self, root: str) -> str:
        return root[len(f"s3://{BUCKET}/"):]

    def _keys(self, prefix: str) -> List[Dict[str, Any]]:
        out, token = [], None
        while True:
            kw = {"Bucket": BUCKET, "Prefix": prefix + "/"}
            if token:
                kw["ContinuationToken"] = token
            r = self.client.list_objects_v2(**kw)
            out += r.get("Contents", [])
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]

    def copy(self, src: str, dst: str) -> None:
        sp, dp = self._prefix(src), self._prefix(dst)
        for o in self._keys(sp):
            self.client.copy_object(Bucket=BUCKET, Key=dp + o["Key"][len(sp):],
                                    CopySource={"Bucket": BUCKET, "Key": o["Key"]})

    def files(self, root: str) -> Dict[str, int]:
        p = self._prefix(root)
        return {o["Key"][len(p) + 1:]: int(o["Size"]) for o in self._keys(p)}

    def read(self, root: str, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET,
                                      Key=f"{self._prefix(root)}/{key}")["Body"].read()

    def multipart(self, root: str) -> List[str]:
        r = self.client.list_multipart_uploads(Bucket=BUCKET, Prefix=self._prefix(root) + "/")
        return [u["Key"] for u in r.get("Uploads", [])]

    def drop(self, root: str) -> None:
        p = self._prefix(root)
        for u in self.client.list_multipart_uploads(
                Bucket=BUCKET, Prefix=p + "/").get("Uploads", []):
            self.client.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"],
                                               UploadId=u["UploadId"])
        for o in self._keys(p):
            self.client.delete_object(Bucket=BUCKET, Key=o["Key"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# =========================================================================
# Parent side
# =========================================================================


class Trials:
    """Prepared data, artifacts and template roots; runs trials."""

    def __init__(self, roots: Any, work: str, verbose: bool = False,
                 log: Any = None, modes: Sequence[str] = ("point", "delay")) -> None:
        import numpy as np
        import pyarrow as pa
        import lance

        import bitshard

        self.roots = roots
        self.work = work
        self.verbose = verbose
        self.modes = tuple(modes)
        self.logf = log
        self.opts = roots.options
        rng = np.random.default_rng(11)
        centres = rng.normal(size=(24, D)).astype(np.float32) * 3
        n = FRAGMENTS * ROWS_PER_FRAGMENT
        self.x = (centres[rng.integers(0, 24, n)]
                  + rng.normal(size=(n, D)).astype(np.float32)).astype(np.float32)
        self.data = os.path.join(work, "data.lance")
        if not os.path.exists(self.data):
            lance.write_dataset(pa.table({
                "id": np.arange(n),
                COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(self.x.ravel()), D),
            }), self.data, max_rows_per_file=ROWS_PER_FRAGMENT,
                max_rows_per_group=ROWS_PER_FRAGMENT)
        ds = bitshard.dataset(self.data)
        self.frag_ids = [f.id for f in ds.source.fragments()]
        assert len(self.frag_ids) == FRAGMENTS, self.frag_ids
        self.ivf = bitshard.train_ivf(ds, COLUMN, PARTITIONS, seed=3)
        self.rot = bitshard.build_rq_rotation(dimension=D, num_bits=NUM_BITS, seed=5)
        self.ivf_path = os.path.join(work, "ivf.bin")
        with open(self.ivf_path, "wb") as f:
            f.write(self.ivf.to_bytes())
        # Queries: four rows of every fragment (row i's nearest neighbour is i).
        self.qrows = np.array([f * ROWS_PER_FRAGMENT + o for f in range(FRAGMENTS)
                               for o in (0, 33, 66, 99)])
        # The template: v1 = one segment over V1_FRAGS, v2 adds one over V2_FRAGS.
        self.template = roots.root("template")
        tds = self._ds(self.template)
        a = tds.create_index_uncommitted(COLUMN, "IVF_RQ", name=NAME, ivf_centroids=self.ivf,
                                         rq_rotation=self.rot, fragment_ids=self._f(V1_FRAGS))
        tds.commit_existing_index_segments(NAME, COLUMN, [a], replace=True)
        b = tds.create_index_uncommitted(COLUMN, "IVF_RQ", name=NAME, ivf_centroids=self.ivf,
                                         rq_rotation=self.rot, fragment_ids=self._f(V2_FRAGS))
        tds.commit_existing_index_segments(NAME, COLUMN, [b])
        # The reference: a single-process build over everything, same artifacts.
        ref = self._ds(roots.root("reference"))
        ref.create_index(COLUMN, "IVF_RQ", name=NAME, ivf_centroids=self.ivf,
                         rq_rotation=self.rot)
        self.reference = self._answers(ref, fast=False)
        self.calibration: Dict[Tuple[str, str], Tuple[int, float]] = {}

    # ------------------------------------------------------------- helpers

    def _f(self, positions: Sequence[int]) -> List[int]:
        return [self.frag_ids[p] for p in positions]

    def _ds(self, root: str) -> Any:
        import bitshard

        return bitshard.dataset(self.data, index_uri=root, storage_options=self.opts)

    def _answers(self, ds: Any, fast: bool) -> Tuple[bytes, bytes, bytes]:
        t = ds.search(COLUMN, self.x[self.qrows], k=K, nprobes=PARTITIONS, refine_factor=10,
                      index=NAME, fast_search=fast)
        return (t.column("_rowid").to_numpy().tobytes(),
                t.column("_distance").to_numpy().tobytes(),
                t.column("query_index").to_numpy().tobytes())

    def log(self, line: str) -> None:
        if self.logf is not None:
            self.logf.write(line + "\n")
            self.logf.flush()
        if self.verbose:
            print(line, flush=True)

    # ------------------------------------------------------------ children

    def _spec(self, op: str, root: str, **kw: Any) -> Dict[str, Any]:
        spec = {"op": op, "root": root, "data": self.data, "ivf": self.ivf_path,
                "rotation": self.rot.to_bytes().hex(), "storage_options": self.opts}
        spec.update(kw)
        return spec

    def run_child(self, spec: Dict[str, Any], delay: Optional[float] = None,
                  timeout: float = 300) -> Tuple[str, str, float]:
        """Run a child to its end or its kill: ``(outcome, output, seconds)``;
        outcome is ``done``, ``killed`` or ``error``."""
        env = dict(os.environ)
        tmp = os.path.join(self.work, "tmp")
        os.makedirs(tmp, exist_ok=True)
        env["TMPDIR"] = tmp  # so a killed upload's local temp files can be found
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                              json.dumps(spec)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env, text=True)
        try:
            line = p.stdout.readline()
            if line.strip() != "ready":
                out = line + p.stdout.read()
                p.wait()
                return "error", out, 0.0
            p.stdin.write("go\n")
            p.stdin.flush()
            t0 = time.perf_counter()
            if delay is not None:
                time.sleep(delay)
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out, _ = p.communicate(timeout=timeout)
        except BaseException:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
            raise
        dt = time.perf_counter() - t0
        # A pool's workers may outlive an unkilled driver's exit by a moment.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if p.returncode == -signal.SIGKILL:
            return "killed", out, dt
        if p.returncode == 0 and "done" in out:
            return "done", out, dt
        return "error", out, dt

    def calibrate(self, op: str, executor: str, spec: Dict[str, Any], root: str) -> Tuple[int, float]:
        """Kill points and seconds of an unkilled run of ``op`` (once per op)."""
        key = (op, executor)
        if key not in self.calibration:
            trace = os.path.join(self.work, f"trace-{op}-{executor}.json")
            probe = self.roots.root(f"calibrate-{op}-{executor}-{random.getrandbits(32):08x}")
            self._prepare(op, probe, spec, random.Random(0))
            s = dict(spec, root=probe, trace=trace, kill_at=None)
            outcome, out, dt = self.run_child(s)
            if outcome != "done":
                raise RuntimeError(f"calibration run of {op} failed:\n{out}")
            with open(trace) as f:
                n = len(json.load(f))
            self.calibration[key] = (n, dt)
            self.log(f"# calibrated {op}/{executor}: {n} kill points, {dt:.3f} s")
            self.roots.drop(probe)
        return self.calibration[key]

    def _prepare(self, op: str, root: str, spec: Dict[str, Any], rng: random.Random) -> None:
        """Put ``root`` in the state the operation starts from."""
        self.roots.copy(self.template, root)
        if op == "cleanup":
            ds = self._ds(root)
            for g in ([6], [7, 8]):   # orphans: written, never committed
                ds.create_index_uncommitted(COLUMN, "IVF_RQ", name=NAME, ivf_centroids=self.ivf,
                                            rq_rotation=self.rot, fragment_ids=self._f(g))
        if op == "resume" or (op == "cleanup" and spec.get("with_build")):
            # a build killed at a random point first
            n, dt = self.calibration.get(("build", "serial"), (0, 0.0))
            s = self._spec("build", root, executor="serial")
            if n:
                s["kill_at"] = rng.randrange(n)
            outcome, out, _ = self.run_child(s, delay=None if n else rng.uniform(0, 2.0))
            if outcome == "error":
                raise RuntimeError(f"preparing {op}: the first build failed:\n{out}")

    # --------------------------------------------------------------- state

    def snapshot(self, root: str) -> Dict[str, Any]:
        """What the checks compare against: manifests' bytes, covered
        fragments, answers."""
        from bitshard import index as idx

        ds = self._ds(root)
        st = ds.storage
        versions = idx.manifest_versions(st, NAME)
        manifests = {v: self.roots.read(root, f"indices/{NAME}/v{v:08d}.json") for v in versions}
        latest = max(versions)
        doc = idx.read_manifest(st, NAME, latest)
        covered = sorted(f for e in doc["segments"] for f in e["fragment_ids"])
        return {"version": latest, "manifests": manifests, "doc": doc, "covered": covered,
                "answers": self._answers(ds, fast=False),
                "fast": self._answers(ds, fast=True)}

    def expected_new(self, op: str, before: Dict[str, Any], spec: Dict[str, Any]
                     ) -> Optional[List[List[int]]]:
        """The fragment lists of the segments version old+1 must hold (None:
        the operation commits nothing)."""
        old = [list(e["fragment_ids"]) for e in before["doc"]["segments"]]
        if op == "delta":
            return old + [list(g) for g in spec["groups"]]
        if op == "merge":
            return [[f for g in old for f in g]]
        if op in ("build", "resume"):
            return [list(self.frag_ids)]
        return None

    def check(self, root: str, op: str, before: Dict[str, Any], spec: Dict[str, Any],
              stage: str) -> List[Tuple[str, str]]:
        """The checks after a kill; returns findings ``(kind, detail)``."""
        import numpy as np

        from bitshard import index as idx
        from bitshard.cli import main as cli_main

        found: List[Tuple[str, str]] = []
        ds = self._ds(root)
        st = ds.storage
        # 1. old or new, never between
        versions = idx.manifest_versions(st, NAME)
        latest = max(versions) if versions else 0
        old_v = before["version"]
        for v, data in before["manifests"].items():
            if v not in versions or self.roots.read(root, f"indices/{NAME}/v{v:08d}.json") != data:
                found.append(("torn-version", f"{stage}: manifest v{v} changed or vanished"))
        want = self.expected_new(op, before, spec)
        at_new = False
        if latest == old_v:
            pass
        elif latest == old_v + 1 and want is not None:
            try:
                doc = idx.read_manifest(st, NAME, latest)
                got = [list(e["fragment_ids"]) for e in doc["segments"]]
                if got != want:
                    found.append(("torn-version", f"{stage}: v{latest} holds segments over "
                                                  f"{got}, the operation commits {want}"))
                at_new = True
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                found.append(("torn-version", f"{stage}: v{latest} does not open: {e!r}"))
        else:
            found.append(("torn-version", f"{stage}: latest version {latest}, expected "
                                          f"{old_v} or {old_v + 1} ({op})"))
        # 2. verify exits 0
        rc, out = _cli(cli_main, ["verify", self.data, "--index-uri", root] + self._opt_args())
        if rc != 0:
            found.append(("verify", f"{stage}: verify exited {rc}: {out.strip()[-400:]}"))
        # 3. no committed row lost; answers right
        try:
            doc = idx.read_manifest(st, NAME)
            covered = sorted(f for e in doc["segments"] for f in e["fragment_ids"])
            lost = sorted(set(before["covered"]) - set(covered))
            if lost:
                found.append(("lost-rows", f"{stage}: fragments {lost} no longer covered"))
            fresh = self._ds(root)
            fast = self._answers(fresh, fast=True)
            full = self._answers(fresh, fast=False)
            if doc["version"] == old_v and (fast, full) != (before["fast"], before["answers"]):
                found.append(("wrong-answer", f"{stage}: answers at the old version v{old_v} "
                                              f"differ from before"))
            if covered == sorted(self.frag_ids) and len(doc["segments"]) == 1 \
                    and full != self.reference:
                found.append(("wrong-answer", f"{stage}: a single segment over every fragment "
                                              f"answers unlike the single-process build"))
            rowids = np.frombuffer(fast[0], dtype=np.uint64)
            dists = np.frombuffer(fast[1], dtype=np.float32)
            qi = np.frombuffer(fast[2], dtype=np.int32)
            cov = set(covered)
            for i, r in enumerate(self.qrows):
                mine = qi == i
                ids, ds_ = rowids[mine], dists[mine]
                frag = self.frag_ids[r // ROWS_PER_FRAGMENT]
                want_id = (frag << 32) | (r % ROWS_PER_FRAGMENT)
                if frag in cov and (len(ids) != K or int(ids[0]) != want_id or ds_[0] > 1e-3):
                    found.append(("lost-rows", f"{stage}: row {r} (fragment {frag}) is not its "
                                               f"own nearest neighbour through the index: "
                                               f"{[hex(int(x)) for x in ids]} at {list(ds_)}"))
                    break
                frags_hit = {int(x) >> 32 for x in ids if int(x) != 2**64 - 1}
                if not frags_hit <= cov:
                    found.append(("wrong-answer", f"{stage}: fast search returned rows of "
                                                  f"uncovered fragments {frags_hit - cov}"))
                    break
        except Exception as e:  # noqa: BLE001
            found.append(("search-error", f"{stage}: {e!r}"))
        del at_new
        return found

    def _opt_args(self) -> List[str]:
        return [a for k, v in (self.opts or {}).items()
                for a in ("--storage-option", f"{k}={v}")]

    def leftovers(self, root: str) -> List[Tuple[str, str]]:
        """Files under ``root`` that are neither a manifest nor a segment a
        manifest names, by kind."""
        from bitshard import index as idx

        st = self._ds(root).storage
        named = set()
        for v in idx.manifest_versions(st, NAME):
            named.update(e["uuid"] for e in idx.read_manifest(st, NAME, v)["segments"])
        found = []
        for key in sorted(self.roots.files(root)):
            parts = key.split("/")
            base = parts[-1]
            if parts[0] == "indices" and len(parts) == 3 and base.startswith("v") \
                    and base.endswith(".json") and base[1:-5].isdigit():
                continue
            if parts[0] == "segments" and len(parts) == 2 and base.endswith(".bsseg") \
                    and base[:-6] in named:
                continue
            if parts[0] == "indices" and base.endswith(".tmp"):
                kind = "leftover-manifest-tmp"
            elif parts[0] == "builds" and base.endswith(".tmp"):
                kind = "leftover-state-tmp"
            elif parts[0] == "builds":
                kind = "leftover-build-state"
            elif parts[0] == "segments" and base.endswith(".tmp"):
                kind = "leftover-segment-tmp"
            elif parts[0] == "segments":
                kind = "leftover-segment"
            elif len(parts) == 1 and base.startswith(".bitshard-probe-"):
                kind = "leftover-probe"  # an object store's conditional-write probe
            else:
                kind = "leftover-other"
            found.append((kind, key))
        for key in self.roots.multipart(root):
            found.append(("leftover-multipart", key))
        return found

    # --------------------------------------------------------------- trial

    def trial(self, i: int, seed: int) -> Tuple[str, List[Tuple[str, str]], float]:
        """Run trial ``i`` of a run seeded ``seed``; returns (description,
        findings, seconds)."""
        from bitshard.cli import main as cli_main

        t0 = time.perf_counter()
        rng = random.Random(f"{seed}:{i}")
        op = OPS[i % len(OPS)] if i < len(OPS) else rng.choice(OPS)
        executor = "serial"
        extra: Dict[str, Any] = {}
        if op in ("build", "resume"):
            executor = rng.choice(("serial", "serial", "processes"))
            extra["executor"] = executor
        elif op == "delta":
            free = [p for p in range(FRAGMENTS) if p not in V1_FRAGS + V2_FRAGS]
            rng.shuffle(free)
            n1 = rng.randint(1, 3)
            groups = [sorted(free[:n1])]
            if rng.random() < 0.5:
                groups.append(sorted(free[n1:n1 + rng.randint(1, 2)]))
            extra["groups"] = [self._f(g) for g in groups]
        elif op == "cleanup":
            extra["abandoned"] = rng.random() < 0.5
            extra["with_build"] = rng.random() < 0.5
        root = self.roots.root(f"trial-{seed}-{i}")
        self.roots.drop(root)
        shutil.rmtree(os.path.join(self.work, "tmp"), ignore_errors=True)
        spec = self._spec(op, root, **extra)
        # Calibrate the killed op (and the build a resume starts from).
        if op in ("resume",) or extra.get("with_build"):
            self.calibrate("build", "serial", self._spec("build", "", executor="serial"), "")
        n_points, seconds = self.calibrate(op, executor, spec, root)
        self._prepare(op, root, spec, rng)
        before = self.snapshot(root)
        mode = rng.choice(self.modes)
        if mode == "point" and n_points:
            spec["kill_at"] = rng.randrange(n_points)
            kill = f"point {spec['kill_at']}/{n_points}"
            delay = None
        else:
            delay = rng.uniform(0, seconds)
            kill = f"delay {delay:.3f}/{seconds:.3f}s"
        tmp = os.path.join(self.work, "tmp")
        outcome, out, _ = self.run_child(spec, delay=delay)
        desc = f"trial {i} seed {seed}: {op}" + (f"/{executor}" if op in ("build", "resume")
                                                 else "") + f" {json.dumps(extra)} kill {kill}"
        findings: List[Tuple[str, str]] = []
        if outcome == "error":
            findings.append(("child-error", out.strip()[-600:]))
        desc += f" -> {outcome}"
        findings += self.check(root, op, before, spec, "after the kill")
        # Recovery: finish an interrupted build (the resume), then clean up.
        st = self._ds(root).storage
        if st.exists(f"builds/{NAME}.json") or st.exists(f"builds/{NAME}.ivf"):
            try:
                import bitshard

                bitshard.build_index(self.data, COLUMN, name=NAME, ivf_centroids=self.ivf,
                                     rq_rotation=self.rot, executor="serial",
                                     fragments_per_task=1, progress=False, index_uri=root,
                                     storage_options=self.opts)
                mid = self.snapshot(root)
                if mid["answers"] != self.reference:
                    findings.append(("resume-failed", "the resumed build answers unlike the "
                                                      "single-process build"))
            except Exception as e:  # noqa: BLE001
                findings.append(("resume-failed", repr(e)))
        # cleanup runs as on the child's machine: its temp directory is the
        # child's, where a killed upload leaves its local directory.
        import tempfile

        saved_tmp, tempfile.tempdir = tempfile.tempdir, tmp if os.path.isdir(tmp) else None
        try:
            rc, cout = _cli(cli_main, ["cleanup", self.data, "--index-uri", root,
                                       "--older-than", "0", "--abandoned-builds"]
                            + self._opt_args())
        finally:
            tempfile.tempdir = saved_tmp
        if rc != 0:
            findings.append(("cleanup-failed", f"cleanup exited {rc}: {cout.strip()[-300:]}"))
        # Local temp files a killed upload left (outside the index root) that
        # cleanup did not remove.
        if os.path.isdir(tmp):
            for n in sorted(os.listdir(tmp)):
                if n.startswith("bitshard-upload-"):
                    findings.append(("leftover-local-upload", os.path.join(tmp, n)))
                shutil.rmtree(os.path.join(tmp, n), ignore_errors=True)
        findings += self.leftovers(root)
        after = self.snapshot(root)
        findings += [(k, d) for k, d in self.check(root, "cleanup", after, {}, "after cleanup")]
        self.roots.drop(root)
        return desc, findings, time.perf_counter() - t0


def _cli(main: Any, argv: List[str]) -> Tuple[int, str]:
    """Run the ``bitshard`` command line in this process: (exit code, output)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = int(e.code or 0)
        except Exception:  # noqa: BLE001 - a traceback is a finding too
            traceback.print_exc()
            rc = -1
    return rc, buf.getvalue()


def run(trials: int, seed: int, root_kind: str, work: Optional[str] = None,
        only: Optional[int] = None, known: Sequence[str] = (), verbose: bool = False,
        log_path: Optional[str] = None, modes: Sequence[str] = ("point", "delay")
        ) -> Dict[str, Any]:
    """Run the trials; returns a summary dict (counts per finding kind,
    seconds, the trials with findings). ``modes``: the kinds of kill drawn
    from (``point`` kills do not depend on timing)."""
    own = work is None
    work = work or tempfile.mkdtemp(prefix=f"bitshard-crash-{root_kind}-")
    os.makedirs(work, exist_ok=True)
    log_path = log_path or os.path.join(work, f"crash-trials-{root_kind}-{seed}.log")
    t0 = time.perf_counter()
    roots: Any = LocalRoots(work) if root_kind == "local" else S3Roots(work)
    summary: Dict[str, Any] = {"root": root_kind, "seed": seed, "trials": 0, "outcomes": {},
                               "findings": {}, "failed": [], "log": log_path}
    with open(log_path, "a") as logf:
        try:
            t = Trials(roots, work, verbose=verbose, log=logf, modes=modes)
            t.log(f"# crash trials: {trials} on {root_kind}, seed {seed}, work {work}")
            which = [only] if only is not None else range(trials)
            for i in which:
                try:
                    desc, findings, dt = t.trial(i, seed)
                except Exception:  # noqa: BLE001
                    desc, findings, dt = f"trial {i} seed {seed}", [
                        ("harness-error", traceback.format_exc()[-1500:])], 0.0
                summary["trials"] += 1
                outcome = desc.rsplit("-> ", 1)[-1] if "-> " in desc else "?"
                summary["outcomes"][outcome] = summary["outcomes"].get(outcome, 0) + 1
                t.log(f"{desc} ({dt:.1f}s): "
                      + ("ok" if not findings else "; ".join(f"{k}: {d}" for k, d in findings)))
                for k, _ in findings:
                    summary["findings"][k] = summary["findings"].get(k, 0) + 1
                if any(k not in known for k, _ in findings):
                    summary["failed"].append(desc)
        finally:
            roots.close()
            summary["seconds"] = round(time.perf_counter() - t0, 1)
            logf.write(f"# summary: {json.dumps(summary, sort_keys=True)}\n")
    if own and not summary["failed"]:
        shutil.rmtree(os.path.join(work, "roots"), ignore_errors=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--root", choices=("local", "s3"), default="local")
    p.add_argument("--work", default=None, help="work directory (default: a new temp dir)")
    p.add_argument("--log", default=None, help="log file (default: in the work directory)")
    p.add_argument("--only", type=int, default=None, help="run only trial N (replay)")
    p.add_argument("--known", default="", help="comma-separated finding kinds that are "
                                               "reported but do not fail the run")
    p.add_argument("--modes", default="point,delay",
                   help="kinds of kill: point (at a storage call), delay (after a time)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        return child_main(json.loads(a.child))
    known = [k for k in a.known.split(",") if k]
    s = run(a.trials, a.seed, a.root, a.work, a.only, known, a.verbose, a.log,
            a.modes.split(","))
    print(json.dumps(s, indent=1, sort_keys=True))
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
