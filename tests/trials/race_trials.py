"""Racing writers and upkeep: many processes commit to one index while
others search it and run ``cleanup``, then check what every one of them saw.

One round: index ``idx`` starts at version 1 (one segment over fragment 0).
``--writers`` processes each own a disjoint slice of the other fragments and
commit it group by group (1-2 fragments a segment): write the segment, then
append-commit it (a delta commit), retrying the same segment after a
``CommitConflictError``; writer 0 also merges the committed segments now and
then (``optimize_indices``: a replace commit at an expected version).
Meanwhile ``--searchers`` processes search rows of every fragment again and
again and two cleaners run ``bitshard.cleanup`` in a loop.

Two rounds per run:

- ``default-age``: the cleaners use the default age (3600 s). Every commit
  must land or get ``CommitConflictError``, nothing else.
- ``age-0``: one cleaner uses ``older_than_seconds=0``, so it may remove a
  writer's segment between its write and its commit. Then a commit may also
  fail with a clear error naming the missing segment (the writer rewrites the
  segment and retries); nothing else.

In both rounds: a search never fails and never returns a wrong row (each
queried row is its own nearest neighbour at distance 0; through the index
alone, ``fast_search``, as soon as its fragment was committed before the
search began); every commit reported as landed is in the final manifest (no
committed data lost); the final manifest covers each fragment once;
``bitshard verify`` exits 0; ``cleanup --older-than 0`` then leaves only
manifests and the segments they name.

Usage::

    python tests/trials/race_trials.py --root local --writers 8 --commits 6
    python tests/trials/race_trials.py --root s3 --writers 4 --commits 4   # a moto server

Exit status 0 when no round found anything outside ``--known``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crash_trials as ct  # noqa: E402  (roots, the moto server, leftovers)

NAME = "idx"
COLUMN = "vec"
D = 16
ROWS = 40
PARTITIONS = 8
K = 5
NO_ROW = 2**64 - 1


def _setup_env(opts: Optional[Dict[str, str]], root: str) -> None:
    from bitshard.storage import Storage

    if opts:
        Storage.for_uri(root, opts)


def _artifacts(cfg: Dict[str, Any]) -> Tuple[Any, Any]:
    import bitshard

    ivf = bitshard.IvfModel.from_bytes(open(cfg["ivf"], "rb").read())
    rot = bitshard.Rotation.from_bytes(bytes.fromhex(cfg["rotation"]))
    return ivf, rot


def _is_removed_segment_error(e: BaseException) -> bool:
    """The clear error of a commit whose uncommitted segment cleanup removed."""
    from bitshard.errors import BitshardError

    msg = str(e)
    return isinstance(e, BitshardError) and (
        "has no file at" in msg or "segment file is missing" in msg
        or ("cannot rename" in msg and ".bsseg" in msg))


def writer(i: int, cfg: Dict[str, Any], groups: List[List[int]], out: Any) -> None:
    """Commit each group of fragments; report every attempt's outcome."""
    import bitshard
    from bitshard import index as idx
    from bitshard.errors import CommitConflictError

    _setup_env(cfg["opts"], cfg["root"])
    ivf, rot = _artifacts(cfg)
    ds = bitshard.dataset(cfg["data"], index_uri=cfg["root"], storage_options=cfg["opts"])
    rng = random.Random(f"{cfg['seed']}:w{i}")
    events: List[Dict[str, Any]] = []
    cfg["start"].wait()
    for gi, g in enumerate(groups):
        seg = None
        for attempt in range(200):
            try:
                if seg is None:
                    seg = ds.create_index_uncommitted(COLUMN, "IVF_RQ", name=NAME,
                                                      ivf_centroids=ivf, rq_rotation=rot,
                                                      fragment_ids=g, num_threads=1)
                v = idx.commit(ds.storage, NAME, COLUMN, [seg], mode="append")
                events.append({"kind": "landed", "version": v, "uuid": seg.uuid,
                               "fragments": g, "attempts": attempt + 1})
                break
            except CommitConflictError:
                events.append({"kind": "conflict"})
            except Exception as e:  # noqa: BLE001 - classified below
                if _is_removed_segment_error(e):
                    events.append({"kind": "segment-removed", "error": str(e)})
                    seg = None  # write it again
                else:
                    events.append({"kind": "unexpected", "error": repr(e),
                                   "trace": traceback.format_exc()[-800:]})
                    seg = None
            time.sleep(rng.uniform(0, 0.01))
        else:
            events.append({"kind": "gave-up", "fragments": g})
        if i == 0 and gi % 2 == 1:
            try:
                ds.optimize_indices(NAME)
                events.append({"kind": "merged"})
            except CommitConflictError:
                events.append({"kind": "merge-conflict"})
            except Exception as e:  # noqa: BLE001
                if _is_removed_segment_error(e):
                    events.append({"kind": "merge-segment-removed", "error": str(e)})
                else:
                    events.append({"kind": "unexpected", "error": f"optimize: {e!r}",
                                   "trace": traceback.format_exc()[-800:]})
    out.put(("writer", i, events))


def searcher(i: int, cfg: Dict[str, Any], out: Any) -> None:
    """Search rows of every fragment until told to stop; check each answer."""
    import numpy as np

    import bitshard
    from bitshard import index as idx

    _setup_env(cfg["opts"], cfg["root"])
    ds = bitshard.dataset(cfg["data"], index_uri=cfg["root"], storage_options=cfg["opts"])
    x = np.load(cfg["vectors"])
    frag_ids = cfg["frag_ids"]
    rng = np.random.default_rng(abs(hash((cfg["seed"], i))) % 2**32)
    stats = {"searches": 0, "failures": []}
    cfg["start"].wait()
    while not cfg["stop"].is_set():
        rows = rng.choice(len(x), size=8, replace=False)
        try:
            doc = idx.read_manifest(ds.storage, NAME)
            covered = {f for e in doc["segments"] for f in e["fragment_ids"]}
            ds.refresh()
            # Through the index alone (fast_search), and through the index plus
            # an exact scan of uncovered fragments, restricted to the queried
            # rows' fragments (scanning every uncovered fragment is slow while
            # many are, and the searches are to overlap many commits).
            for fast in (True, False):
                frags = None if fast else sorted({frag_ids[r // ROWS] for r in rows})
                t = ds.search(COLUMN, x[rows], k=K, nprobes=PARTITIONS, refine_factor=10,
                              index=NAME, fast_search=fast, fragment_ids=frags)
                ids = t.column("_rowid").to_numpy()
                dist = t.column("_distance").to_numpy()
                qi = t.column("query_index").to_numpy()
                for j, r in enumerate(rows):
                    mine = qi == j
                    frag = frag_ids[r // ROWS]
                    want = (frag << 32) | (int(r) % ROWS)
                    got = ids[mine]
                    valid = [int(g) for g in got if int(g) != NO_ROW]
                    if len(set(valid)) != len(valid) or any(
                            (g >> 32) not in frag_ids or (g & 0xFFFFFFFF) >= ROWS for g in valid):
                        stats["failures"].append(f"row {r}: invalid rows {valid}")
                    must = (not fast) or frag in covered
                    if must and (not len(got) or int(got[0]) != want or dist[mine][0] > 1e-3):
                        stats["failures"].append(
                            f"row {r} (fragment {frag}, fast={fast}, v{doc['version']}): "
                            f"top hit {hex(int(got[0])) if len(got) else None} at "
                            f"{dist[mine][0] if len(got) else None}")
            stats["searches"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            stats["failures"].append(f"search raised {e!r}")
        if len(stats["failures"]) > 20:
            break
    out.put(("searcher", i, stats))


def cleaner(i: int, cfg: Dict[str, Any], age: float, out: Any) -> None:
    """Run cleanup at ``age`` until told to stop."""
    import bitshard

    _setup_env(cfg["opts"], cfg["root"])
    stats: Dict[str, Any] = {"age": age, "runs": 0, "removed": 0, "failures": []}
    cfg["start"].wait()
    while not cfg["stop"].is_set():
        try:
            stats["removed"] += len(bitshard.cleanup(cfg["root"], age,
                                                     storage_options=cfg["opts"]))
            stats["runs"] += 1
        except Exception as e:  # noqa: BLE001
            stats["failures"].append(repr(e))
            if len(stats["failures"]) > 20:
                break
        time.sleep(0.005)
    out.put(("cleaner", i, stats))


# =========================================================================
# The parent
# =========================================================================


class Race:
    """Data, artifacts and roots of a run."""

    def __init__(self, roots: Any, work: str, fragments: int, seed: int) -> None:
        import numpy as np
        import pyarrow as pa
        import lance

        import bitshard

        self.roots = roots
        self.work = work
        self.seed = seed
        self.opts = roots.options
        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(16, D)).astype(np.float32) * 3
        n = fragments * ROWS
        self.x = (centres[rng.integers(0, 16, n)]
                  + rng.normal(size=(n, D)).astype(np.float32)).astype(np.float32)
        self.data = os.path.join(work, f"race-{fragments}.lance")
        shutil.rmtree(self.data, ignore_errors=True)
        lance.write_dataset(pa.table({
            "id": np.arange(n),
            COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(self.x.ravel()), D),
        }), self.data, max_rows_per_file=ROWS, max_rows_per_group=ROWS)
        self.vectors = os.path.join(work, "race-vectors.npy")
        np.save(self.vectors, self.x)
        ds = bitshard.dataset(self.data)
        self.frag_ids = [f.id for f in ds.source.fragments()]
        assert len(self.frag_ids) == fragments
        self.ivf = bitshard.train_ivf(ds, COLUMN, PARTITIONS, seed=3)
        self.rot = bitshard.build_rq_rotation(dimension=D, num_bits=4, seed=5)
        self.ivf_path = os.path.join(work, "race-ivf.bin")
        with open(self.ivf_path, "wb") as f:
            f.write(self.ivf.to_bytes())

    def round(self, label: str, writers: int, commits: int, searchers: int,
              ages: Sequence[float], allowed: Sequence[str], known: Sequence[str],
              log: Any) -> Dict[str, Any]:
        """One race; returns its summary (``findings``: kind -> details)."""
        import bitshard
        from bitshard import index as idx
        from bitshard.cli import main as cli_main

        t0 = time.perf_counter()
        root = self.roots.root(f"race-{self.seed}-{label}")
        self.roots.drop(root)
        ds = bitshard.dataset(self.data, index_uri=root, storage_options=self.opts)
        first = ds.create_index_uncommitted(COLUMN, "IVF_RQ", name=NAME, ivf_centroids=self.ivf,
                                            rq_rotation=self.rot, fragment_ids=[self.frag_ids[0]])
        ds.commit_existing_index_segments(NAME, COLUMN, [first], replace=True)
        rng = random.Random(f"{self.seed}:{label}")
        rest = self.frag_ids[1:]
        slices = [rest[w::writers] for w in range(writers)]
        plans = []
        for s in slices:
            groups, j = [], 0
            while j < len(s) and len(groups) < commits:
                n = rng.choice((1, 2))
                groups.append(s[j:j + n])
                j += n
            plans.append(groups)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        cfg = {"root": root, "data": self.data, "opts": self.opts, "ivf": self.ivf_path,
               "rotation": self.rot.to_bytes().hex(), "vectors": self.vectors,
               "frag_ids": self.frag_ids, "seed": self.seed,
               "start": ctx.Event(), "stop": ctx.Event()}
        procs = [ctx.Process(target=writer, args=(w, cfg, plans[w], out))
                 for w in range(writers)]
        others = [ctx.Process(target=searcher, args=(s, cfg, out)) for s in range(searchers)]
        others += [ctx.Process(target=cleaner, args=(c, cfg, a, out)) for c, a in enumerate(ages)]
        for p in procs + others:
            p.start()
        time.sleep(1.0)  # let them import before the start signal
        cfg["start"].set()
        results: List[Tuple[str, int, Any]] = []

        def collect(n: int, limit: float) -> None:
            import queue  # noqa: PLC0415

            deadline = time.monotonic() + limit
            while len(results) < n:
                try:
                    results.append(out.get(timeout=2))
                except queue.Empty:
                    dead = [p for p in procs + others if p.exitcode not in (None, 0)]
                    if dead or time.monotonic() > deadline:
                        cfg["stop"].set()
                        raise RuntimeError(f"race {label}: {len(results)} of {n} reports; "
                                           f"exit codes {[p.exitcode for p in procs + others]}")

        collect(writers, 900)
        cfg["stop"].set()
        collect(writers + len(others), 300)
        for p in procs + others:
            p.join(timeout=60)
        seconds = time.perf_counter() - t0

        findings: Dict[str, List[str]] = {}

        def find(kind: str, detail: str) -> None:
            findings.setdefault(kind, []).append(detail)

        counts: Dict[str, int] = {}
        landed: List[Dict[str, Any]] = []
        for role, i, res in results:
            if role == "writer":
                for e in res:
                    counts[e["kind"]] = counts.get(e["kind"], 0) + 1
                    if e["kind"] == "landed":
                        landed.append(e)
                    elif e["kind"] not in ("conflict", "merged", "merge-conflict") \
                            and e["kind"] not in allowed:
                        find(f"writer-{e['kind']}", f"writer {i}: {e.get('error', e)}")
            elif role == "searcher":
                counts["searches"] = counts.get("searches", 0) + res["searches"]
                for f in res["failures"][:5]:
                    find("search", f"searcher {i}: {f}")
            else:
                counts[f"cleanups-age-{res['age']:g}"] = res["runs"]
                counts[f"removed-age-{res['age']:g}"] = res["removed"]
                for f in res["failures"][:5]:
                    find("cleanup", f"cleaner {i} (age {res['age']:g}): {f}")
        # No committed data lost; every fragment covered once.
        st = ds.storage
        try:
            doc = idx.read_manifest(st, NAME)
            covered = [f for e in doc["segments"] for f in e["fragment_ids"]]
            dup = sorted({f for f in covered if covered.count(f) > 1})
            if dup:
                find("covered-twice", f"fragments {dup} are in two segments of v{doc['version']}")
            want = {self.frag_ids[0]} | {f for e in landed for f in e["fragments"]}
            missing = sorted(want - set(covered))
            if missing:
                find("lost-commit", f"fragments {missing} were committed, v{doc['version']} "
                                    f"does not cover them")
            extra = sorted(set(covered) - want)
            if extra:
                find("phantom", f"fragments {extra} are covered but no commit landed them")
            for e in landed:
                m = idx.read_manifest(st, NAME, e["version"])
                if e["uuid"] not in {s["uuid"] for s in m["segments"]}:
                    find("lost-commit", f"v{e['version']} does not hold segment {e['uuid']} "
                                        f"its writer was told landed")
            planned = {f for p in plans for g in p for f in g} | {self.frag_ids[0]}
            if "gave-up" not in counts and set(covered) != planned:
                find("lost-commit", f"covered {sorted(set(covered))} != planned "
                                    f"{sorted(planned)}")
            counts["final_version"] = doc["version"]
            counts["landed"] = len(landed)
        except Exception as e:  # noqa: BLE001
            find("final-manifest", repr(e))
        opt = [a for k, v in (self.opts or {}).items() for a in ("--storage-option", f"{k}={v}")]
        rc, text = ct._cli(cli_main, ["verify", self.data, "--index-uri", root] + opt)
        if rc != 0:
            find("verify", text.strip()[-600:])
        rc, text = ct._cli(cli_main, ["cleanup", self.data, "--index-uri", root,
                                      "--older-than", "0"] + opt)
        if rc != 0:
            find("cleanup", text.strip()[-600:])
        names = set()
        for v in idx.manifest_versions(st, NAME):
            names.update(e["uuid"] for e in idx.read_manifest(st, NAME, v)["segments"])
        for key in sorted(self.roots.files(root)):
            parts = key.split("/")
            base = parts[-1]
            if parts[0] == "indices" and base.endswith(".json") and base[1:-5].isdigit():
                continue
            if parts[0] == "segments" and base.endswith(".bsseg") and base[:-6] in names:
                continue
            kind = ("leftover-manifest-tmp" if parts[0] == "indices" and base.endswith(".tmp")
                    else "leftover-segment-tmp" if base.endswith(".bsseg.tmp")
                    else "leftover-segment" if parts[0] == "segments" else "leftover-other")
            find(kind, key)
        summary = {"round": label, "root": self.roots.kind, "writers": writers,
                   "commits_per_writer": commits, "searchers": searchers, "cleaner_ages": list(ages),
                   "seconds": round(seconds, 1), "counts": counts,
                   "findings": {k: v[:5] for k, v in findings.items()},
                   "failed": sorted(k for k in findings if k not in known)}
        log.write(json.dumps(summary, sort_keys=True) + "\n")
        log.flush()
        self.roots.drop(root)
        return summary


def run(root_kind: str, writers: int, commits: int, searchers: int, seed: int,
        work: Optional[str] = None, known: Sequence[str] = (),
        log_path: Optional[str] = None, rounds: Sequence[str] = ("default-age", "age-0")
        ) -> List[Dict[str, Any]]:
    """Both rounds (or ``rounds``); returns their summaries."""
    work = work or tempfile.mkdtemp(prefix=f"bitshard-race-{root_kind}-")
    os.makedirs(work, exist_ok=True)
    log_path = log_path or os.path.join(work, f"race-{root_kind}-{seed}.log")
    roots: Any = ct.LocalRoots(work) if root_kind == "local" else ct.S3Roots(work)
    out = []
    try:
        race = Race(roots, work, 1 + writers * commits * 2, seed)
        with open(log_path, "a") as log:
            for r in rounds:
                if r == "default-age":
                    out.append(race.round(r, writers, commits, searchers, (3600.0, 3600.0),
                                          (), known, log))
                else:
                    out.append(race.round(r, writers, commits, searchers, (3600.0, 0.0),
                                          ("segment-removed", "merge-segment-removed"),
                                          known, log))
    finally:
        roots.close()
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", choices=("local", "s3"), default="local")
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--commits", type=int, default=6, help="commits per writer")
    p.add_argument("--searchers", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", default=None)
    p.add_argument("--log", default=None)
    p.add_argument("--rounds", default="default-age,age-0")
    p.add_argument("--known", default="")
    a = p.parse_args(argv)
    res = run(a.root, a.writers, a.commits, a.searchers, a.seed, a.work,
              [k for k in a.known.split(",") if k], a.log, a.rounds.split(","))
    print(json.dumps(res, indent=1, sort_keys=True))
    return 1 if any(r["failed"] for r in res) else 0


if __name__ == "__main__":
    sys.exit(main())
