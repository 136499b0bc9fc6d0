"""One-call distributed index builds, and the maintenance that goes with them.

:func:`build_index` runs the whole distributed flow of docs/distributed.md:

1. on the driver: train the IVF model on a sample (:func:`bitshard.train_ivf`)
   and mint the rotation (:func:`bitshard.build_rq_rotation`);
2. group the source's fragments into tasks and encode each task into a
   segment on a worker (``create_index_uncommitted``); workers open the data
   themselves (a Lance/Parquet source pickles as its URI and pinned version),
   the driver never ships vectors;
3. merge the segments as a tree (groups of :data:`MERGE_FAN_IN`), the merges
   themselves running as worker tasks;
4. commit the final segment with ``commit_existing_index_segments(replace=True)``
   (several segments when one file would exceed ``max_segment_bytes``).

Workers are Ray tasks, processes of a local ``ProcessPoolExecutor`` (spawn
start method) or, for debugging, the driver itself. A task whose worker dies
is retried; segments of failed attempts are never committed
(:func:`cleanup` removes them later). A build records its progress under the
index root in ``builds/<name>.json`` (plus ``builds/<name>.ivf``), so running
the same call again after the driver died reuses the artifacts and every
finished, verified segment (:class:`bitshard.build_state.BuildState`).
``build_index`` itself is a short driver over named phases (argument checks,
build state and artifacts, encode, merge tree, commit and clean): see the
comment above it. ``last_build_stats`` holds the
:class:`BuildStats` of the build as a dict.

:func:`cleanup` and :func:`verify` live in :mod:`bitshard.maintenance` and
are importable from here as before.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from . import _native
from . import index as idx
from .artifacts import IvfModel, Rotation, as_ivf_model, build_rq_rotation, metric_code
from . import validate
from .codespace import CodeSpace
from .build_state import BUILD_STATE_FORMAT, BUILD_STATE_VERSION, BuildState  # noqa: F401
from .dataset import DEFAULT_NUM_BITS, Dataset, _default_num_partitions, train_ivf
from .errors import BitshardError, CorruptIndexError, InvalidInputError
from .index import BUILDS_DIR, OpenSegment, SegmentHandle  # noqa: F401 (re-exported)
from .maintenance import cleanup, open_dataset, referenced_uuids, verify
from .progress import Progress
from .storage import Storage

__all__ = ["build_index", "BuildStats", "cleanup", "verify", "ray_session", "EXECUTORS",
           "MERGE_FAN_IN", "DEFAULT_MAX_SEGMENT_BYTES", "segment_size_bound"]

log = logging.getLogger("bitshard.distributed")

#: The executors :func:`build_index` knows.
EXECUTORS = ("ray", "processes", "serial")
#: Segments merged per merge task; more segments are merged as a tree.
MERGE_FAN_IN = 8
#: Encode tasks planned per worker when ``fragments_per_task`` is not given.
TASKS_PER_WORKER = 4
#: The default bound on one segment file's bytes (``max_segment_bytes``):
#: 16 GiB, so that no worker writes, holds as a temp file or uploads more
#: (S3 takes 5 GB in one PUT; a larger file goes up in parts).
DEFAULT_MAX_SEGMENT_BYTES = 16 << 30
#: Test hook: when set to a file path, the first worker task that finds the
#: file absent creates it and dies (``os._exit(1)``; with a ``sigkill:``
#: prefix it SIGKILLs itself) right after writing its segment. The driver
#: reads the variable and hands it to the workers with each task; it is
#: ignored by the ``serial`` executor.
CRASH_ENV = "BITSHARD_TEST_CRASH_ONCE"

PathLike = Union[str, "os.PathLike[str]"]


# =========================================================================
# Worker side: the code that runs inside Ray tasks and pool processes
# =========================================================================

_IVF_CACHE: Dict[Tuple[str, str], IvfModel] = {}


def _load_ivf(storage: Storage, key: str, fingerprint: str, metric: str) -> IvfModel:
    """The build's IVF model, loaded once per worker process and checked."""
    path = storage.path(key)
    ckey = (path, fingerprint)
    model = _IVF_CACHE.get(ckey)
    if model is None:
        model = as_ivf_model(IvfModel.from_bytes(storage.read_bytes(key)), metric)
        if model.fingerprint != fingerprint:
            raise CorruptIndexError(
                f"IVF model file {path} has fingerprint {model.fingerprint}, the build "
                f"expects {fingerprint} (was the build restarted with other settings?)"
            )
        _IVF_CACHE.clear()
        _IVF_CACHE[ckey] = model
    return model


def _maybe_crash(marker: Optional[str]) -> None:
    """The fault-injection hook of :data:`CRASH_ENV` (tests only)."""
    if not marker:
        return
    sig = marker.startswith("sigkill:")
    path = marker[len("sigkill:"):] if sig else marker
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    if sig:
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


def _warm() -> int:
    """A worker's first task, submitted while the driver still trains: the
    imports the first encode task would otherwise pay after training
    (``lance`` with pyarrow.dataset and pandas: ~0.5 s) overlap it."""
    try:
        import lance  # noqa: F401, PLC0415
    except ImportError:  # numpy/Parquet sources need no Lance
        pass
    from . import sources  # noqa: F401, PLC0415
    return os.getpid()


#: malloc arenas a worker process keeps (glibc; see _limit_malloc_arenas).
WORKER_MALLOC_ARENAS = 2
_arenas_limited = False


def _limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas in a worker process at
    :data:`WORKER_MALLOC_ARENAS` (``mallopt(M_ARENA_MAX)``), once.

    The source reader's threads each take an arena of their own (up to 8
    per core), and memory freed into one is not reused by the others: a
    worker's resident memory grew by 30 to 80 MB with every encode task
    (632 MB after 8 tasks of 125,000 x 128 rows, against 432 MB with 2
    arenas, where it stays). Only in worker processes, never in the
    caller's own; a no-op where the C library is not glibc."""
    global _arenas_limited
    if _arenas_limited:
        return
    _arenas_limited = True
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is not None and hasattr(libc, "gnu_get_libc_version"):
            mallopt(-8, WORKER_MALLOC_ARENAS)  # M_ARENA_MAX
    except OSError:  # pragma: no cover - no C library to ask
        pass


def _run_task(spec: Dict[str, Any], shared: Any) -> SegmentHandle:
    """Entry point of every worker task: encode fragments or merge segments."""
    # One task per core: the BLAS inside assignment must not start a thread
    # per core in every worker (oversubscription slowed builds 3x).
    # (Not in the driver itself: the serial executor runs tasks there.)
    threads = None  # the serial executor, in the driver: all cores
    if spec.get("driver_pid") not in (None, os.getpid()):
        _native.set_blas_threads(1)
        _limit_malloc_arenas()
        threads = 1
    if spec["kind"] == "encode":
        ds: Dataset = shared
        ivf = _load_ivf(ds.storage, spec["ivf_key"], spec["ivf_fingerprint"], spec["metric"])
        handle = ds.create_index_uncommitted(
            spec["column"], "IVF_RQ", name=spec["name"], ivf_centroids=ivf,
            rq_rotation=Rotation.from_bytes(spec["rotation"]),
            fragment_ids=spec["fragment_ids"], metric=spec["metric"], num_threads=threads,
            external_centroids=bool(spec.get("external_centroids", False)),
        )
    elif spec["kind"] == "merge":
        inputs = list(spec["inputs"])
        idx.check_same_artifacts(inputs)
        handle = idx.merge_segments(
            inputs, Storage.for_uri(spec["index_root"], spec.get("storage_options")))
    else:  # pragma: no cover - a programming error
        raise InvalidInputError(f"unknown task kind {spec['kind']!r}")
    _maybe_crash(spec.get("crash_marker"))
    return handle


# =========================================================================
# Executors: run a list of task specs, report each result as it arrives
# =========================================================================

OnDone = Callable[[int, SegmentHandle], None]


class _SerialRunner:
    """Runs tasks in the driver, one after the other (for debugging)."""

    name = "serial"
    restarts = 0

    def run(self, specs: Sequence[Dict[str, Any]], shared: Any, on_done: OnDone) -> None:
        for i, spec in enumerate(specs):
            on_done(i, _run_task(spec, shared))

    def close(self) -> None:
        pass


class _PoolRunner:
    """A ``ProcessPoolExecutor`` (spawn) that survives its workers dying.

    When a worker dies the pool breaks and every unfinished future fails
    with ``BrokenProcessPool``; the runner keeps the results that did
    arrive, starts a new pool and resubmits the rest. A task may be in an
    unfinished batch at most ``max_retries + 1`` times.
    """

    name = "processes"

    def __init__(self, num_workers: int, max_retries: int) -> None:
        self.num_workers = max(1, int(num_workers))
        self.max_retries = int(max_retries)
        self.pool: Optional[ProcessPoolExecutor] = None
        self._warming: List[Any] = []
        self.restarts = 0

    def _kill(self) -> None:
        pool, self.pool = self.pool, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)

    def prestart(self, n: int) -> None:
        """Launch ``n`` workers now, without waiting: they start and import
        while the driver does other work (training); :meth:`run` checks
        them before its first task."""
        if self.pool is None:
            n = max(1, min(self.num_workers, int(n)))
            self.pool = ProcessPoolExecutor(
                max_workers=n, mp_context=multiprocessing.get_context("spawn"))
            # one per worker: a busy worker makes the pool start the next
            self._warming = [self.pool.submit(_warm) for _ in range(n)]

    def _start(self, n: int) -> ProcessPoolExecutor:
        """A new pool whose workers have all started (a spawn pool launches
        every process on the first submit; a no-op task proves they run)."""
        self.prestart(n)
        pool = self.pool
        assert pool is not None
        warming, self._warming = self._warming, []
        try:
            for f in warming:
                f.result()
        except BrokenProcessPool:
            self.pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise BitshardError(
                "the worker processes died while starting (start method 'spawn' re-imports "
                "the driver's __main__ module): guard the driver script's code with "
                "`if __name__ == \"__main__\":`, do not pipe it through stdin, or use "
                "executor='serial' or 'ray'") from None
        return pool

    def run(self, specs: Sequence[Dict[str, Any]], shared: Any, on_done: OnDone) -> None:
        pending = dict(enumerate(specs))
        attempts = {i: 0 for i in pending}
        while pending:
            if self.pool is None or self._warming:
                self.pool = self._start(min(self.num_workers, len(pending)))
            broken = False
            futs: Dict[Any, int] = {}
            try:
                try:
                    for i, spec in pending.items():
                        futs[self.pool.submit(_run_task, spec, shared)] = i
                except BrokenProcessPool:
                    broken = True
                not_done = set(futs)
                while not_done:
                    done, not_done = wait(not_done, return_when=FIRST_COMPLETED)
                    for f in sorted(done, key=lambda f: futs[f]):
                        i = futs[f]
                        exc = f.exception()
                        if exc is None:
                            on_done(i, f.result())
                            del pending[i]
                        elif isinstance(exc, BrokenProcessPool):
                            broken = True
                        else:
                            raise exc
            except BaseException:
                self._kill()
                raise
            if broken:
                self.restarts += 1
                self._kill()
                for i in pending:
                    attempts[i] += 1
                worst = max((attempts[i] for i in pending), default=0)
                if worst > self.max_retries:
                    raise BitshardError(
                        f"{len(pending)} task(s) did not finish: a worker process died "
                        f"{worst} time(s) while they ran (max_retries={self.max_retries})"
                    )
                log.warning("a worker process died; restarting the pool and resubmitting "
                            "%d unfinished task(s)", len(pending))

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def start_ray(ray: Any, num_cpus: Optional[int]) -> None:
    """Connect this process to Ray: to the cluster ``RAY_ADDRESS`` names when
    the variable is set (``num_cpus`` is then the cluster's business), else to
    a new local Ray of ``num_cpus`` CPUs (all when None) that only this
    process uses.

    The local start passes ``address="local"``: without it, ``ray.init``
    attaches to whatever cluster the newest ``ray start`` on this machine
    recorded under the Ray temp directory, which may be another program's,
    or dead (a crashed head leaves the record behind, and every later start
    then fails), and refuses ``num_cpus`` when it does attach.
    """
    with warnings.catch_warnings():
        # Ray starts its daemons with fork+exec, which is safe for Lance.
        warnings.filterwarnings("ignore", message="lance is not fork-safe")
        if os.environ.get("RAY_ADDRESS"):
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False)


@contextmanager
def ray_session(num_workers: Optional[int] = None) -> Iterator[bool]:
    """Use the Ray cluster this process is connected to, or start a local one.

    If ``ray.is_initialized()`` is false, connects to the cluster named by
    the ``RAY_ADDRESS`` environment variable when it is set (as ``ray job
    submit`` sets it), else starts a local Ray of its own with
    ``num_cpus=num_workers or os.cpu_count()`` (see :func:`start_ray`), and
    shuts it down when the block ends; otherwise uses the existing
    connection (e.g. ``ray.init(address=...)``) and leaves it alone. Wrap
    several :func:`build_index` calls in one session to pay Ray's start-up
    once.

    Yields:
        True if this call started Ray (and will shut it down).
    """
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise InvalidInputError(
            "executor='ray' needs Ray: pip install 'bitshard[ray]'") from None
    started = False
    if not ray.is_initialized():
        start_ray(ray, int(num_workers or os.cpu_count() or 1))
        started = True
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


class _RayRunner:
    """Ray tasks (``num_cpus=1``); Ray retries a task whose worker died up to
    ``max_retries`` times. Exceptions raised by the task are not retried."""

    name = "ray"
    restarts = 0

    def __init__(self, num_workers: int, max_retries: int) -> None:
        import ray  # noqa: PLC0415

        self._ray = ray
        self.max_retries = int(max_retries)
        self._session = ray_session(num_workers)
        self.started = self._session.__enter__()
        try:
            self._fn = ray.remote(_run_task).options(
                num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)
        except BaseException:
            self.close()
            raise

    def run(self, specs: Sequence[Dict[str, Any]], shared: Any, on_done: OnDone) -> None:
        ray = self._ray
        shared_ref = ray.put(shared)
        refs = {self._fn.remote(spec, shared_ref): i for i, spec in enumerate(specs)}
        waiting = list(refs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                for r in ready:
                    try:
                        result = ray.get(r)
                    except ray.exceptions.RayTaskError as e:
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, BaseException):
                            raise cause from None
                        raise BitshardError(f"a build task failed: {e}") from None
                    except ray.exceptions.RayError as e:
                        raise BitshardError(
                            f"a build task failed after {self.max_retries} retries "
                            f"({type(e).__name__}): {e}") from None
                    on_done(refs[r], result)
        except BaseException:
            for r in waiting:
                try:
                    ray.cancel(r, force=True)
                except Exception:  # already finished or gone
                    pass
            raise

    def close(self) -> None:
        self._session.__exit__(None, None, None)


def _choose_executor(executor: Optional[str]) -> str:
    if executor is None:
        try:
            import ray  # noqa: F401, PLC0415

            return "ray"
        except ImportError:
            return "processes"
    e = str(executor).lower()
    if e not in EXECUTORS:
        raise InvalidInputError(f"executor must be one of {EXECUTORS} or None, got {executor!r}")
    if e == "ray":
        try:
            import ray  # noqa: F401, PLC0415
        except ImportError:
            raise InvalidInputError(
                "executor='ray' needs Ray: pip install 'bitshard[ray]'") from None
    return e


def _resolve_workers(executor: str, num_workers: Optional[int]) -> int:
    if num_workers is not None:
        return validate.integer("num_workers", num_workers)
    if executor == "serial":
        return 1
    if executor == "ray":
        import ray  # noqa: PLC0415

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def _make_runner(executor: str, num_workers: int, max_retries: int) -> Any:
    if executor == "ray":
        return _RayRunner(num_workers, max_retries)
    if executor == "processes":
        return _PoolRunner(num_workers, max_retries)
    return _SerialRunner()


# =========================================================================
# Planning
# =========================================================================


def plan_tasks(fragments: Sequence[Any], num_workers: int,
               fragments_per_task: Optional[int] = None) -> List[List[int]]:
    """Group fragments (sorted by id) into contiguous encode tasks.

    Args:
        fragments: the source's ``FragmentInfo`` list.
        num_workers: workers the build expects (sets the default task count).
        fragments_per_task: fixed fragments per task; ``None`` balances live
            rows over about ``TASKS_PER_WORKER * num_workers`` tasks (never
            more tasks than fragments).

    Returns:
        A list of fragment-id lists, in fragment-id order, covering every
        fragment (empty ones included) exactly once.
    """
    frags = sorted(fragments, key=lambda f: f.id)
    if not frags:
        return []
    if fragments_per_task is not None:
        n = int(fragments_per_task)
        return [[f.id for f in frags[i:i + n]] for i in range(0, len(frags), n)]
    target = max(1, min(len(frags), TASKS_PER_WORKER * max(1, int(num_workers))))
    remaining = sum(f.num_rows for f in frags)
    groups: List[List[int]] = []
    cur: List[int] = []
    acc = 0
    for i, f in enumerate(frags):
        groups_left = target - len(groups)          # the current group included
        if cur and groups_left > 1:
            # Close the group when this fragment would take it past its fair
            # share of the rows left, or when every remaining group needs one
            # of the remaining fragments.
            ideal = remaining / groups_left
            if acc + f.num_rows / 2.0 > ideal or len(frags) - i <= groups_left - 1:
                groups.append(cur)
                remaining -= acc
                cur, acc = [], 0
        cur.append(f.id)
        acc += f.num_rows
    groups.append(cur)
    return groups


def _merge_plan_size(n: int, fan_in: int) -> int:
    """How many merge tasks a tree over ``n`` segments takes."""
    merges = 0
    while n > 1:
        groups = -(-n // fan_in)
        merges += sum(1 for g in range(groups) if min(fan_in, n - g * fan_in) > 1)
        n = groups
    return merges


def segment_size_bound(num_rows: int, num_partitions: int, dimension: int, num_bits: int,
                       num_fragments: int, column_len: int = 1024,
                       external_centroids: bool = False) -> int:
    """An upper bound on the bytes of a segment file of ``num_rows`` rows
    (docs/format.md, "Layout"): the header, the centroids (none when
    external), the fragment table, the directory, and per row ``D/8 + 12``
    bytes of code and factors plus 4 of ordinal (``(B-1) D/8 + 4`` more when B > 1),
    plus at most one partial 32-row block and 64-byte paddings in each
    partition that holds a row. A merge of segments is never larger than the
    sum of their sizes (its blocks and paddings only fill up), which is how
    the merge tree keeps to ``max_segment_bytes``."""
    a64 = lambda x: -(-int(x) // 64) * 64  # noqa: E731
    D = a64(dimension)
    per_row = D // 8 + 12 + 4 + ((num_bits - 1) * D // 8 + 4 if num_bits > 1 else 0)
    per_part = 4 * D + 384 + 63 + (126 if num_bits > 1 else 0)
    fixed = (a64(200 + column_len + 8) + (0 if external_centroids else
                                          a64(num_partitions * dimension * 4))
             + a64(num_fragments * 32) + a64(num_partitions * 64))
    return fixed + num_rows * per_row + min(num_partitions, num_rows) * per_part


def bound_tasks(tasks: List[List[int]], rows_of: Dict[int, int],
                size_of: Callable[[int, int], int], max_bytes: int) -> List[List[int]]:
    """``tasks`` with every task whose segment could exceed ``max_bytes``
    (``size_of(rows, fragments)``, an upper bound) cut into consecutive
    parts that cannot; a fragment is never split. InvalidInputError naming
    the fragment when one alone could exceed it."""
    out: List[List[int]] = []
    for t in tasks:
        cur: List[int] = []
        rows = 0
        for f in t:
            alone = size_of(rows_of[f], 1)
            if alone > max_bytes:
                raise InvalidInputError(
                    f"max_segment_bytes is {max_bytes}, but fragment {f} alone ({rows_of[f]} "
                    f"rows) may take up to {alone} bytes and a task never splits a fragment")
            if cur and size_of(rows + rows_of[f], len(cur) + 1) > max_bytes:
                out.append(cur)
                cur, rows = [], 0
            cur.append(f)
            rows += rows_of[f]
        out.append(cur)
    return out


def merge_groups(sizes: Sequence[int], fan_in: int, max_bytes: int) -> List[List[int]]:
    """One level of the merge tree: consecutive groups of at most ``fan_in``
    segment indexes whose sizes sum to at most ``max_bytes`` (a segment
    already at the bound stays alone)."""
    groups: List[List[int]] = []
    cur: List[int] = []
    acc = 0
    for i, size in enumerate(sizes):
        if cur and (len(cur) == fan_in or acc + size > max_bytes):
            groups.append(cur)
            cur, acc = [], 0
        cur.append(i)
        acc += size
    if cur:
        groups.append(cur)
    return groups


# =========================================================================
# build_index: an orchestrator over named phases
# =========================================================================
#
# 1. argument checks: _check_arguments (no data needed), then _open_job
#    (against the source);
# 2. build state and artifacts: _artifacts resumes an interrupted build of
#    the same call (_resume) or trains / mints and records a new one
#    (_new_state); the record itself is a BuildState (bitshard.build_state);
# 3. encode: _encode, a segment per task on the workers;
# 4. merge tree: _merge_tree, one _merge_level at a time;
# 5. commit and clean: _commit_and_clean.


def _source_identity(ds: Dataset) -> Dict[str, Any]:
    s = ds.source
    return {"kind": s.kind, "uri": s.uri, "version": s.version}


def _verify_segment(root: Storage, uuid: str, fragment_ids: Sequence[int], num_rows: int,
                    space: CodeSpace, name: str) -> Optional[SegmentHandle]:
    """The handle of a finished segment if its file opens and verifies whole
    (every checksum, every partition: the open alone reads no partition) and
    it is what the build expects; else None."""
    try:
        o = OpenSegment.of(root, uuid)
        o.native.verify()
        h = o.handle(root.root, name)
        del o
    except (BitshardError, OSError) as e:
        log.warning("not reusing segment %s: %s", uuid, e)
        return None
    got = {"uuid": h.uuid, "fragment_ids": list(h.fragment_ids), "num_rows": h.num_rows}
    want = {"uuid": uuid, "fragment_ids": list(fragment_ids), "num_rows": num_rows}
    diff = sorted([k for k in want if got[k] != want[k]]
                  + [d.field for d in CodeSpace.of(h).differences(space)])
    if diff:
        log.warning("not reusing segment %s: %s differ from the build's", uuid, ", ".join(diff))
        return None
    return h


@dataclass
class BuildStats:
    """What one :func:`build_index` call did; ``ds.last_build_stats`` holds
    it as a dict (:meth:`as_dict`), with these fields as keys."""

    executor: str                #: "ray", "processes" or "serial"
    num_workers: int             #: workers the build planned for
    resumed: bool = False        #: an interrupted build's state was reused
    #: uuids of encoded segments reused from the interrupted build
    reused_segments: List[str] = field(default_factory=list)
    #: uuids of merged segments reused from the interrupted build
    reused_merges: List[str] = field(default_factory=list)
    pool_restarts: int = 0       #: process pools restarted after a worker died
    #: seconds per phase: "artifacts", "encode", "merge", "commit", "total"
    seconds: Dict[str, float] = field(default_factory=dict)
    rotation_seed: Optional[int] = None         #: the rotation's seed
    ivf_fingerprint: Optional[str] = None       #: the IVF model's fingerprint
    rotation_fingerprint: Optional[str] = None  #: the rotation's fingerprint
    tasks: Optional[int] = None                 #: encode tasks in the plan
    merges: Optional[int] = None                #: merge tasks in the plan
    #: uuid of the committed segment; None when the index is several
    final_segment: Optional[str] = None
    #: uuids of the committed segments, in fragment order
    final_segments: List[str] = field(default_factory=list)
    max_segment_bytes: Optional[int] = None     #: the bound on one segment file
    shared_centroids: Optional[bool] = None     #: segments written with external centroids
    version: Optional[int] = None               #: the committed manifest version
    num_rows: Optional[int] = None              #: rows in the committed segment
    num_partitions: Optional[int] = None        #: IVF partitions
    num_bits: Optional[int] = None              #: bits per dimension of the codes

    def as_dict(self) -> Dict[str, Any]:
        """A plain dict of every field (what ``last_build_stats`` holds)."""
        return asdict(self)


def _check_name(name: str, st: Storage) -> str:
    """A new index needs a name of the strict pattern; an existing index
    with a legacy name may be rebuilt under it."""
    return idx.check_commit_name(st, name)


@dataclass(frozen=True)
class _BuildOptions:
    """The arguments of :func:`build_index` that are checked without the data."""

    metric: str                          #: lower case
    executor: str                        #: one of EXECUTORS
    workers: int                         #: >= 1
    sample_rate: int
    max_iters: int
    max_retries: int
    fragments_per_task: Optional[int]
    num_partitions: Optional[int]
    max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES
    shared_centroids: Optional[bool] = None   #: None: when the bound splits the index


def _check_arguments(index_type: str, metric: str, sample_rate: int, max_iters: int,
                     max_retries: int, fragments_per_task: Optional[int],
                     num_partitions: Optional[int], executor: Optional[str],
                     num_workers: Optional[int],
                     max_segment_bytes: Optional[int] = DEFAULT_MAX_SEGMENT_BYTES,
                     shared_centroids: Optional[bool] = None) -> _BuildOptions:
    """Phase 1a: the checks that need no data; InvalidInputError naming the
    argument and its value."""
    if str(index_type).upper() != "IVF_RQ":
        raise InvalidInputError(f"index_type must be 'IVF_RQ', got {index_type!r}")
    metric_code(metric)
    metric = metric.lower()
    sample_rate = validate.sample_rate(sample_rate)
    max_iters = validate.max_iters(max_iters)
    max_retries = validate.integer("max_retries", max_retries, minimum=0)
    fragments_per_task = validate.optional_integer("fragments_per_task", fragments_per_task)
    if num_partitions is not None:
        num_partitions = validate.num_partitions(num_partitions)
    max_segment_bytes = DEFAULT_MAX_SEGMENT_BYTES if max_segment_bytes is None \
        else validate.integer("max_segment_bytes", max_segment_bytes, minimum=1)
    if shared_centroids is not None:
        shared_centroids = validate.boolean("shared_centroids", shared_centroids)
    executor = _choose_executor(executor)
    workers = _resolve_workers(executor, num_workers)
    return _BuildOptions(metric=metric, executor=executor, workers=workers,
                         sample_rate=sample_rate, max_iters=max_iters, max_retries=max_retries,
                         fragments_per_task=fragments_per_task, num_partitions=num_partitions,
                         max_segment_bytes=max_segment_bytes, shared_centroids=shared_centroids)


@dataclass
class _BuildJob:
    """One :func:`build_index` call: its checked inputs and what the phases
    share. ``ivf``, ``rot`` and ``space`` are set by the artifacts phase."""

    ds: Dataset
    name: str
    column: str
    opts: _BuildOptions
    prog: Progress
    dim: int                             #: the column's dimension
    frags: List[Any]                     #: the source's FragmentInfo list
    user_ivf: Optional[IvfModel]         #: the caller's ivf_centroids, if any
    user_rotation: Optional[Rotation]    #: the caller's rq_rotation, if any
    num_bits: Optional[int]
    seed: Optional[int]
    params: Dict[str, Any]               #: what makes "the same call" (build state)
    ident: Dict[str, Any]                #: the source's kind, uri and version
    stats: BuildStats
    crash_marker: Optional[str]          #: CRASH_ENV, handed to the workers
    ivf: Optional[IvfModel] = None
    rot: Optional[Rotation] = None
    _space: Optional[CodeSpace] = None
    #: segments written with external centroids (set by the artifacts phase)
    external: bool = False

    @property
    def storage(self) -> Storage:
        """The index root."""
        return self.ds.storage

    @property
    def space(self) -> CodeSpace:
        """The code space every segment of the build must have."""
        assert self._space is not None, "set by the artifacts phase"
        return self._space

    @property
    def rows_of(self) -> Dict[int, int]:
        """Live rows per fragment id."""
        return {f.id: f.num_rows for f in self.frags}

    def use_artifacts(self, ivf: IvfModel, rot: Rotation) -> None:
        """Record the build's IVF model and rotation (in the stats too)."""
        self.ivf, self.rot = ivf, rot
        self.stats.rotation_seed = rot.seed
        self.stats.ivf_fingerprint = ivf.fingerprint
        self.stats.rotation_fingerprint = rot.fingerprint
        self._space = CodeSpace(dimension=self.dim, column=self.column, metric=self.opts.metric,
                                num_bits=rot.num_bits, rotation_fingerprint=rot.fingerprint,
                                ivf_fingerprint=ivf.fingerprint)
        shared = self.opts.shared_centroids
        if shared is None:
            # Shared when the whole index could not be one file.
            shared = self.size_bound(sum(self.rows_of.values()), len(self.frags), False) \
                > self.opts.max_segment_bytes
        self.external = bool(shared)
        self.stats.shared_centroids = self.external
        self.stats.max_segment_bytes = self.opts.max_segment_bytes

    def size_bound(self, rows: int, fragments: int, external: Optional[bool] = None) -> int:
        """segment_size_bound for a segment of this build."""
        assert self.ivf is not None and self.rot is not None
        return segment_size_bound(rows, self.ivf.num_partitions, self.dim, self.rot.num_bits,
                                  fragments, len(self.column.encode()),
                                  self.external if external is None else external)


def _open_job(ds: Dataset, column: str, name: Optional[str], opts: _BuildOptions,
              prog: Progress, num_bits: Optional[int], ivf_centroids: Any,
              rq_rotation: Optional[Rotation], seed: Optional[int]) -> _BuildJob:
    """Phase 1b: the checks against the source (name, column, fragments, the
    caller's artifacts), and the settings a rerun must match to resume."""
    num_bits, seed = validate.optional_num_bits(num_bits), validate.optional_seed(seed)
    name = _check_name(name or f"{column}_idx", ds.storage)
    source = ds.source
    dim = source.vector_dim(column)
    frags = source.fragments()
    if not frags:
        raise InvalidInputError(f"the source has no fragments to index ({source.uri})")
    metric, num_partitions = opts.metric, opts.num_partitions
    user_ivf = None if ivf_centroids is None else as_ivf_model(ivf_centroids, metric)
    if user_ivf is not None:
        validate.ivf_for(user_ivf, dim, column, num_partitions)
    if rq_rotation is not None:
        validate.rotation_for(rq_rotation, num_bits, dim, column)
    params = {
        "column": column, "metric": metric, "num_partitions": num_partitions,
        "num_bits": None if num_bits is None else int(num_bits),
        "sample_rate": int(opts.sample_rate), "max_iters": int(opts.max_iters),
        "seed": None if seed is None else int(seed),
        "ivf_centroids": None if user_ivf is None else user_ivf.fingerprint,
        "rq_rotation": None if rq_rotation is None else rq_rotation.to_bytes().hex(),
        "max_segment_bytes": int(opts.max_segment_bytes),
        "shared_centroids": opts.shared_centroids,
    }
    return _BuildJob(
        ds=ds, name=name, column=column, opts=opts, prog=prog, dim=dim, frags=frags,
        user_ivf=user_ivf, user_rotation=rq_rotation, num_bits=num_bits, seed=seed,
        params=params, ident=_source_identity(ds),
        stats=BuildStats(executor=opts.executor, num_workers=opts.workers),
        crash_marker=(os.environ.get(CRASH_ENV) or None) if opts.executor != "serial" else None)


class _Workers:
    """The build's task runner (see :func:`_make_runner`), made on first use."""

    def __init__(self, opts: _BuildOptions) -> None:
        self.opts = opts
        self.runner: Any = None

    def get(self) -> Any:
        """The runner, started now if it was not."""
        if self.runner is None:
            self.runner = _make_runner(self.opts.executor, self.opts.workers,
                                       int(self.opts.max_retries))
        return self.runner

    def close(self, stats: Optional[BuildStats] = None) -> None:
        """Stop the runner if it started (its pool restarts go to ``stats``)."""
        runner, self.runner = self.runner, None
        if runner is not None:
            if stats is not None:
                stats.pool_restarts = runner.restarts
            runner.close()


def _resume(job: _BuildJob) -> Optional[Tuple[BuildState, IvfModel, Rotation]]:
    """Phase 2a: the state of an interrupted build of the same call and its
    artifacts, if it can be resumed; else None (why not is logged)."""
    state = BuildState.load(job.storage, job.name)
    if state is None:
        return None
    why = state.mismatch(job.params, job.ident)
    if why is None:
        try:
            ivf, rot = state.artifacts(job.opts.metric, list(job.rows_of))
        except (BitshardError, OSError, KeyError, ValueError, TypeError) as e:
            why = f"its artifacts are unusable ({e})"
    if why is not None:
        log.warning("starting build %r afresh, not resuming: %s", job.name, why)
        return None
    job.stats.resumed = True
    log.info("resuming build %r: %d of %d tasks were finished", job.name,
             len(state.finished_segments()), len(state.tasks))
    return state, ivf, rot


def _new_state(job: _BuildJob) -> Tuple[BuildState, IvfModel, Rotation]:
    """Phase 2b: train the IVF model and mint the rotation (unless the caller
    gave them), plan the encode tasks and record all that in a new state."""
    ds, source, column, opts = job.ds, job.ds.source, job.column, job.opts
    if job.user_ivf is not None:
        ivf = job.user_ivf
    else:
        k = opts.num_partitions or _default_num_partitions(source.num_rows())
        with job.prog.step("train", f"train IVF (k={k}, sample {k * int(opts.sample_rate)} rows)"):
            ivf = train_ivf(ds, column, k, opts.metric, opts.sample_rate, opts.max_iters, job.seed)
    if job.user_rotation is not None:
        rot = job.user_rotation
    else:
        rot = build_rq_rotation(job.dim,
                                DEFAULT_NUM_BITS if job.num_bits is None else int(job.num_bits),
                                dtype=source.vector_dtype(column).name, seed=job.seed)
    job.use_artifacts(ivf, rot)
    tasks = bound_tasks(plan_tasks(job.frags, opts.workers, opts.fragments_per_task),
                        job.rows_of, job.size_bound, opts.max_segment_bytes)
    state = BuildState.create(job.storage, job.name, job.params, job.ident, ivf, rot, tasks,
                              job.rows_of)
    return state, ivf, rot


def _artifacts(job: _BuildJob, workers: _Workers) -> BuildState:
    """Phase 2: the build state and its artifacts, resumed or new."""
    resumed = _resume(job)
    t0 = time.perf_counter()
    if resumed is None and job.opts.executor == "processes":
        # Worker start-up (a new interpreter, imports) overlaps training.
        workers.get().prestart(min(job.opts.workers, len(job.frags)))
    try:
        state, ivf, rot = resumed if resumed is not None else _new_state(job)
    except BaseException:
        workers.close()  # the pre-started workers
        raise
    job.stats.seconds["artifacts"] = time.perf_counter() - t0
    job.use_artifacts(ivf, rot)
    if job.external:
        # Before any segment that names them is written.
        idx.store_shared_centroids(job.storage, ivf)
    return state


def _reuse_leaves(job: _BuildJob, state: BuildState) -> Dict[int, SegmentHandle]:
    """The segments of finished tasks that still verify, by task id; the
    others are forgotten (their tasks run again)."""
    leaves: Dict[int, SegmentHandle] = {}
    for tid, uuid in state.finished_segments():
        t = state.tasks[tid]
        h = _verify_segment(job.storage, uuid, t["fragment_ids"], t["num_rows"], job.space,
                            job.name)
        if h is None:
            state.forget_segment(tid)
        else:
            leaves[tid] = h
            job.stats.reused_segments.append(uuid)
    return leaves


def _encode(job: _BuildJob, state: BuildState, workers: _Workers) -> List[SegmentHandle]:
    """Phase 3: one segment per task, in task order (reused or encoded on
    the workers; each is recorded in the state as it arrives)."""
    t0 = time.perf_counter()
    tasks = state.tasks
    leaves = _reuse_leaves(job, state)
    todo = [t for t in tasks if t["id"] not in leaves]
    total_rows = sum(t["num_rows"] for t in tasks)
    if todo:
        workers.get()  # start the workers (Ray) before the bar measures rows/s
    bar = job.prog.bar("encode", total_rows, "encode", unit="rows", unit_scale=True,
                       initial=total_rows - sum(t["num_rows"] for t in todo))
    if leaves and job.prog.callback is not None:
        job.prog.callback("resume", len(leaves), len(tasks))
    try:
        if todo:
            assert job.ivf is not None and job.rot is not None
            specs = [{
                "kind": "encode", "task_id": t["id"], "column": job.column, "name": job.name,
                "fragment_ids": list(t["fragment_ids"]), "metric": job.opts.metric,
                "ivf_key": state.ivf_key, "ivf_fingerprint": job.ivf.fingerprint,
                "rotation": job.rot.to_bytes(), "crash_marker": job.crash_marker,
                "driver_pid": os.getpid(), "external_centroids": job.external,
            } for t in todo]

            def encoded(i: int, h: SegmentHandle) -> None:
                t = todo[i]
                diff = CodeSpace.of(h).first_difference(job.space)
                if list(h.fragment_ids) != list(t["fragment_ids"]) or diff is not None:
                    what = "fragment_ids differ" if diff is None else diff.describe()
                    raise CorruptIndexError(
                        f"task {t['id']} returned segment {h.uuid} that does not match it: "
                        f"{what}")
                leaves[t["id"]] = h
                state.record_segment(t["id"], h.uuid)
                bar.update(t["num_rows"])

            workers.get().run(specs, job.ds, encoded)
    finally:
        bar.close()
    job.stats.seconds["encode"] = time.perf_counter() - t0
    return [leaves[t["id"]] for t in tasks]


def _merge_level(job: _BuildJob, state: BuildState, workers: _Workers,
                 level: List[SegmentHandle], recorded: Dict[Tuple[str, ...], str],
                 mbar: Any) -> List[SegmentHandle]:
    """One level of the merge tree: each consecutive group of at most
    :data:`MERGE_FAN_IN` segments whose sizes sum to at most
    ``max_segment_bytes`` becomes one (a group of one passes through; a
    merge the state recorded is reused if it verifies)."""
    groups = [[level[i] for i in g] for g in
              merge_groups([h.size_bytes for h in level], MERGE_FAN_IN,
                           job.opts.max_segment_bytes)]
    nxt: List[Optional[SegmentHandle]] = [None] * len(groups)
    specs, slots = [], []
    for gi, g in enumerate(groups):
        if len(g) == 1:
            nxt[gi] = g[0]
            continue
        key = tuple(h.uuid for h in g)
        frag_ids = [f for h in g for f in h.fragment_ids]
        nrows = sum(h.num_rows for h in g)
        if key in recorded:
            h = _verify_segment(job.storage, recorded[key], frag_ids, nrows, job.space,
                                job.name)
            if h is not None:
                nxt[gi] = h
                job.stats.reused_merges.append(h.uuid)
                mbar.update(1)
                continue
        specs.append({"kind": "merge", "inputs": list(g), "index_root": job.ds.index_root,
                      "storage_options": job.ds.storage_options,
                      "crash_marker": job.crash_marker, "driver_pid": os.getpid()})
        slots.append(gi)
    if specs:
        def merged(i: int, h: SegmentHandle) -> None:
            g = groups[slots[i]]
            if list(h.fragment_ids) != [f for x in g for f in x.fragment_ids]:
                raise CorruptIndexError(
                    f"merge returned segment {h.uuid} with the wrong fragments")
            nxt[slots[i]] = h
            state.record_merge([x.uuid for x in g], h.uuid)
            mbar.update(1)

        workers.get().run(specs, None, merged)
    out = [h for h in nxt if h is not None]
    assert len(out) == len(groups)
    return out


def _merge_tree(job: _BuildJob, state: BuildState, workers: _Workers,
                level: List[SegmentHandle]) -> List[SegmentHandle]:
    """Phase 4: merge the task segments as a tree, level by level, into one,
    or into several when merging more would exceed ``max_segment_bytes``
    (a level that merges nothing ends the tree)."""
    t0 = time.perf_counter()
    recorded = state.recorded_merges()
    mbar = job.prog.bar("merge", _merge_plan_size(len(level), MERGE_FAN_IN), "merge",
                        unit="merge")
    merges = 0
    try:
        while len(level) > 1:
            nxt = _merge_level(job, state, workers, level, recorded, mbar)
            if len(nxt) == len(level):
                break
            olds = {x.uuid for x in level}
            merges += sum(1 for h in nxt if h.uuid not in olds)  # a lone one passes
            level = nxt
    finally:
        mbar.close()
    job.stats.merges = merges
    job.stats.seconds["merge"] = time.perf_counter() - t0
    return level


def _commit_and_clean(job: _BuildJob, state: BuildState, finals: List[SegmentHandle]) -> None:
    """Phase 5: commit ``finals`` as the index's new version; then delete the
    build's intermediate segments (no manifest references them) and its state."""
    t0 = time.perf_counter()
    st = job.storage
    job.ds.commit_existing_index_segments(job.name, job.column, finals, replace=True)
    version = idx.latest_version(st, job.name)
    if job.prog.callback is not None:
        job.prog.callback("commit", 1, 1)
    ours = state.segment_uuids()
    for f in finals:
        ours.discard(f.uuid)
    try:
        referenced = referenced_uuids(st)
    except BitshardError as e:  # leave them for cleanup()
        log.warning("not removing the build's intermediate segments: %s", e)
        ours, referenced = set(), set()
    for u in sorted(ours - referenced):
        try:
            st.delete(idx.segment_key(u))
        except BitshardError as e:  # not a file the build wrote: leave it
            log.warning("not removing intermediate segment %s: %s", u, e)
    state.discard()
    assert job.ivf is not None and job.rot is not None
    s = job.stats
    s.seconds["commit"] = time.perf_counter() - t0
    s.tasks = len(state.tasks)
    s.final_segments = [f.uuid for f in finals]
    s.final_segment = finals[0].uuid if len(finals) == 1 else None
    s.version, s.num_rows = version, sum(f.num_rows for f in finals)
    s.num_partitions, s.num_bits = job.ivf.num_partitions, job.rot.num_bits


def build_index(
    uri: Any,
    column: str,
    name: Optional[str] = None,
    index_type: str = "IVF_RQ",
    num_partitions: Optional[int] = None,
    num_bits: Optional[int] = None,
    metric: str = "l2",
    num_workers: Optional[int] = None,
    executor: Optional[str] = None,
    fragments_per_task: Optional[int] = None,
    ivf_centroids: Any = None,
    rq_rotation: Optional[Rotation] = None,
    sample_rate: int = 256,
    max_iters: int = 50,
    seed: Optional[int] = None,
    progress: Any = None,
    index_uri: Optional[PathLike] = None,
    max_retries: int = 3,
    storage_options: Optional[Dict[str, Any]] = None,
    max_segment_bytes: Optional[int] = DEFAULT_MAX_SEGMENT_BYTES,
    shared_centroids: Optional[bool] = None,
) -> Dataset:
    """Build and commit an IVF_RQ index on many workers, in one call.

    The committed index answers every query bit for bit like
    ``ds.create_index(column, "IVF_RQ", ivf_centroids=..., rq_rotation=...)``
    with the same artifacts (see ``ds.last_build_stats`` for what was used).

    Args:
        uri: the data: a Lance/Parquet path or URI, a :class:`Dataset`, or
            anything :func:`bitshard.dataset` accepts (an in-memory array is
            pickled to every worker; prefer a path for large data).
        column: the vector column (fixed-size list of float16/32/64, d dims).
        name: index name (default ``<column>_idx``).
        index_type: must be ``"IVF_RQ"``.
        num_partitions: IVF partitions k when centroids are trained (default
            about sqrt(rows)).
        num_bits: bits per dimension of the codes, 1..9 (default 9, or the
            bit width of ``rq_rotation``).
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``.
        num_workers: workers (processes, or CPUs of the local Ray started
            here; default ``os.cpu_count()``, or the CPUs of a Ray cluster
            already connected). Also sets the default task count.
        executor: ``"ray"``, ``"processes"`` or ``"serial"`` (in the driver);
            ``None`` picks Ray if it is importable, else processes.
        fragments_per_task: fragments per encode task (default: contiguous
            groups balancing rows over about 4 tasks per worker).
        ivf_centroids: an :class:`IvfModel`, a (k, d) float array or a path;
            ``None`` trains one on the driver with :func:`bitshard.train_ivf`.
        rq_rotation: a :class:`Rotation`; ``None`` mints one with
            :func:`bitshard.build_rq_rotation` (seed ``seed``, or a random one
            recorded in the segments and the build state).
        sample_rate: training rows per partition (sample = k * sample_rate).
        max_iters: k-means iterations at most.
        seed: training seed (default 0) and, if given, the rotation seed.
        progress: ``None`` (bars when stderr is a terminal), ``True``,
            ``False``, or a callable ``progress(stage, done, total)``; see
            :mod:`bitshard.progress`.
        index_uri: where indexes live (default: next to the data): a
            directory every worker can reach, or an object-store prefix
            (``s3://bucket/prefix``).
        max_retries: retries of a task whose worker process died.
        storage_options: connection settings of an object-store index root
            (see :func:`bitshard.dataset`); they travel to the workers.
        max_segment_bytes: the most bytes one segment file may take (default
            :data:`DEFAULT_MAX_SEGMENT_BYTES`, 16 GiB; ``None`` is the
            default). Tasks are cut so that none can write more (a bound
            from the rows, :func:`segment_size_bound`), and the merge tree
            merges only segments whose sizes sum to at most it, so no worker
            writes or uploads a larger file; when one file would exceed it
            the index is committed as several segments, each holding every
            partition of its fragments, searched together with the answers
            of one. A fragment that alone could exceed it is refused.
        shared_centroids: write the segments with external centroids, shared
            under the index root (``artifacts/<ivf fingerprint>.ivf``;
            docs/format.md); ``None`` (default) does when the index would not
            fit one segment, so its segments pay for the centroids once.

    Returns:
        The :class:`Dataset`, with the index committed (a new manifest version
        replacing any previous one of that name) and ``last_build_stats``: a
        dict (a :class:`BuildStats` as a dict) with the executor, worker and
        task counts, the segments reused from an interrupted run, pool
        restarts, the committed segment's uuid, the manifest version and the
        seconds spent per phase.

    Raises:
        InvalidInputError: bad arguments.
        BitshardError: a task failed (its exception is re-raised), or a task's
            worker died more than ``max_retries`` times.
        CommitConflictError: another writer committed the index meanwhile.
    """
    t_start = time.perf_counter()
    # 1. argument checks: first those that need no data, then against the source
    opts = _check_arguments(index_type, metric, sample_rate, max_iters, max_retries,
                            fragments_per_task, num_partitions, executor, num_workers,
                            max_segment_bytes, shared_centroids)
    prog = Progress(progress)
    ds = open_dataset(uri, index_uri, storage_options)
    job = _open_job(ds, column, name, opts, prog, num_bits, ivf_centroids, rq_rotation, seed)
    workers = _Workers(opts)
    # 2. build state and artifacts: resume the same call's interrupted build, or train
    state = _artifacts(job, workers)
    try:
        leaves = _encode(job, state, workers)             # 3. a segment per task
        finals = _merge_tree(job, state, workers, leaves)  # 4. merged as a tree
    finally:
        workers.close(job.stats)
    _commit_and_clean(job, state, finals)                 # 5. commit, delete the rest
    job.stats.seconds["total"] = time.perf_counter() - t_start
    ds.last_build_stats = job.stats.as_dict()
    return ds
