"""bitshard.serve: search fanned out over partition shares answers exactly
like Dataset.search.

First the shares run in this process (no Ray), over many settings, bit
widths and share counts; then a service on a three-node Ray cluster started
here, with the index root on the moto S3 server of test_object_store.py and
the data on a local path every node reads; an actor killed mid-service is
restarted and its queries retried; refresh moves to a newer index version.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import time
import warnings

import lance
import numpy as np
import pyarrow as pa
import pytest

import bitshard
from bitshard import service as sv
from bitshard.dataset import DEFAULT_EPS0
from bitshard.errors import InvalidInputError
from bitshard.searcher import SearchOptions

from conftest import clustered, write_lance

D = 32
NPART = 16

#: Search settings compared: the keywords of Dataset.search.
SETTINGS = [
    dict(k=10, nprobes=4),
    dict(k=1, nprobes=1),
    dict(k=25, nprobes=NPART),
    dict(k=10, nprobes=4, refine_factor=3),
    dict(k=10, nprobes=6, filter="id % 3 = 0"),
    dict(k=10, nprobes=4, fragment_ids=[0, 2, 3, 6]),
    dict(k=10, nprobes=4, fast_search=True),
    dict(k=5, nprobes=8, columns=["id"], eps0=0.5),
    dict(k=10, nprobes=5, num_threads=3),
]


def _data(tmp_path, bits_list, index_uri=None, storage_options=None, executor="serial"):
    """A Lance dataset of 6 fragments indexed at each width of ``bits_list``
    (index ``b<bits>``), then 40 rows deleted and a fragment appended: the
    plan has deleted rows (never returned) and an uncovered fragment
    (searched exactly unless fast_search)."""
    everything = clustered(3_300, D, seed=3)
    x, extra = everything[:3_000], everything[3_000:]
    uri = write_lance(tmp_path / "data.lance", x, 500)
    for bits in bits_list:
        bitshard.build_index(uri, "vec", name=f"b{bits}", num_partitions=NPART, num_bits=bits,
                             seed=7, executor=executor, num_workers=2, index_uri=index_uri,
                             storage_options=storage_options, progress=False)
    lance.dataset(uri).delete("id < 40")
    lance.write_dataset(pa.table({
        "id": pa.array(np.arange(3_000, 3_300, dtype=np.int64)),
        "vec": pa.FixedSizeListArray.from_arrays(pa.array(extra.ravel()), D)}),
        uri, mode="append")
    rng = np.random.default_rng(11)
    queries = (everything[rng.integers(0, len(everything), 24)]
               + 0.3 * rng.normal(size=(24, D))).astype(np.float32)
    return uri, queries


def _same(got: pa.Table, want: pa.Table) -> None:
    assert got.column_names == want.column_names
    assert got.num_rows == want.num_rows
    for name in got.column_names:
        a = got.column(name).to_numpy()
        b = want.column(name).to_numpy()
        if a.dtype == np.float32:  # bit for bit, not within a tolerance
            a, b = a.view(np.uint32), b.view(np.uint32)
        np.testing.assert_array_equal(a, b, err_msg=name)


class _InProcess:
    """Stands for a Service: its shares are _ShareActor objects in this
    process, its front the service's own _FrontSearcher."""

    def __init__(self, ds, num_shares):
        self.ds = ds
        self.view = sv._FrontView(ds.storage, ds.source, ds.index_root)
        self.state = [pickle.dumps((ds, self.view.versions()))]
        self.actors = [sv._ShareActor(i, num_shares) for i in range(num_shares)]

    def _scan(self, Q, options, allowed_rows, k, limit):
        # The service's two rounds (Service._scan), the actors called in
        # this process; every other batch's round 2 finds its codes gone
        # (as on a restarted actor) and scans again.
        opts = dict(options)
        opts["num_threads"] = opts["num_threads"] or 1
        self.batches = getattr(self, "batches", 0) + 1
        token = f"batch{self.batches}"
        args = (1, self.state, "vec", opts, allowed_rows, Q)
        ubs = [a.thresholds(token, *args) for a in self.actors]
        t = sv.global_thresholds(ubs, k)
        if self.batches % 2 == 0:
            for a in self.actors:
                a._pending.clear()
        return [(u, *a.survivors(token, t, limit, *args)) for u, a in zip(ubs, self.actors)]

    def search(self, index, q, columns=None, **kw):
        s = self.searcher(index, **kw)
        q = np.asarray(q)
        return self.ds._hits_table(s.search_lists(q), q.ndim, columns)

    def searcher(self, index, **kw):
        return sv._FrontSearcher(self.view, "vec", SearchOptions(
            k=kw.get("k", 10), nprobes=kw.get("nprobes", 20),
            refine_factor=kw.get("refine_factor"), index=index,
            fragment_ids=kw.get("fragment_ids"), filter=kw.get("filter"),
            fast_search=kw.get("fast_search", False),
            eps0=kw.get("eps0", DEFAULT_EPS0),
            num_threads=None), self)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    return _data(tmp_path_factory.mktemp("serve_local"), [1, 4, 9])


@pytest.mark.parametrize("bits", [1, 4, 9])
@pytest.mark.parametrize("num_shares", [1, 2, 3, 5])
def test_shares_answer_like_one_process(local_data, bits, num_shares):
    uri, Q = local_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bitshard.UncoveredRowsWarning)
        ds = bitshard.dataset(uri)
        front = _InProcess(ds, num_shares)
        for kw in SETTINGS:
            want = ds.search("vec", Q, index=f"b{bits}", **kw)
            _same(front.search(f"b{bits}", Q, **kw), want)
            want1 = ds.search("vec", Q[3], index=f"b{bits}", **kw)
            _same(front.search(f"b{bits}", Q[3], **kw), want1)
            # and before any rerank: the candidate lists themselves (the
            # final Table rarely shows a wrong threshold, these do)
            kw.pop("columns", None)
            single = ds.searcher("vec", index=f"b{bits}", **kw)
            shared = front.searcher(f"b{bits}", **kw)
            gated = bits == 1 and kw.get("refine_factor") is None
            got = shared._scan_batch(shared._native, Q, gated)
            want2 = single._scan_batch(single._native, Q, gated)
            # (rowids, estimates, lower bounds, counts): query i's candidates
            # are the first counts[i] of row i; the padding past them differs
            np.testing.assert_array_equal(got[3], want2[3])
            assert (got[2] is None) == (want2[2] is None) == (not gated)
            for a, b in zip(got[:3], want2[:3]):
                if a is None:
                    continue
                for qi, n in enumerate(want2[3].astype(np.int64)):
                    x, y = a[qi, :n], b[qi, :n]
                    np.testing.assert_array_equal(x.view(np.uint32 if x.dtype == np.float32
                                                         else x.dtype),
                                                  y.view(np.uint32 if y.dtype == np.float32
                                                         else y.dtype))
    # the settings reach the cases that matter: deleted rows exist and the
    # appended fragment is searched exactly (it answers some queries)
    t = ds.search("vec", Q, index=f"b{bits}", k=10, nprobes=4)
    ids = ds.source.take_table(t.column("_rowid").to_numpy(), ["id"]).column("id").to_numpy()
    assert (ids >= 3_000).any()
    assert len(ds.source.fragments()) == 7


def test_round_two_keeps_what_the_front_would_keep_of_one_share():
    # select_survivors against a plain loop: within the threshold, then the
    # best `limit` by (estimate, row id) with a repeated row id counted once
    # (its better copy), on random lists with ties and repeats.
    rng = np.random.default_rng(5)
    for limit, repeats in [(None, True), (1, True), (3, True), (10, True), (1, False),
                           (3, False), (10, False), (3, False)]:
        counts = rng.integers(0, 12, 7)
        n = int(counts.sum())
        # repeats: row ids drawn from 6 (the sort of every code); else
        # distinct (the partition to the limit-th estimate, then its ties)
        rows = (rng.integers(0, 6, n) if repeats else rng.permutation(n)).astype(np.uint64)
        ests = rng.integers(0, 4, n).astype(np.float32)
        lbs = (ests - rng.integers(0, 3, n)).astype(np.float32)
        t = rng.integers(-1, 4, 7).astype(np.float32)
        got = sv.select_survivors(counts, rows, ests, lbs, t, limit)
        at = 0
        want = ([], [], [], [])
        for i, c in enumerate(counts):
            items = [(float(ests[j]), int(rows[j]), float(lbs[j])) for j in range(at, at + c)
                     if lbs[j] <= t[i]]
            at += c
            if limit is not None:
                seen, best = set(), []
                for e, r, lb in sorted(items, key=lambda x: (x[0], x[1])):
                    if r not in seen:
                        seen.add(r)
                        best.append((e, r, lb))
                items = best[:limit]
            want[0].append(len(items))
            for e, r, lb in items:
                want[1].append(r)
                want[2].append(e)
                want[3].append(lb)
        np.testing.assert_array_equal(got[0], want[0])
        if limit is None:  # the share's own order
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[3], want[3])
        else:  # by (estimate, row id) within each query
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[2], want[2])


def test_share_mask_partitions():
    m = [sv.share_mask(10, i, 3) for i in range(3)]
    np.testing.assert_array_equal(m[0], [1, 0, 0, 1, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(sum(m), np.ones(10))


def test_native_share_arguments(local_data):
    uri, Q = local_data
    ds = bitshard.dataset(uri)
    s = ds.searcher("vec", index="b4", k=5, nprobes=4, fast_search=True)
    native = s._native
    p = s._params
    bad = p + (np.ones(NPART - 1, np.uint8), True)
    r = np.empty((1, 4096), np.uint64)
    e = np.empty((1, 4096), np.float32)
    with pytest.raises(InvalidInputError, match=r"^partition_mask holds 15 items, needs 16$"):
        native.search_batch_into(Q[:1], 1, 1, bad, r, e, None, np.empty(1, np.uint64), None,
                                 np.empty(5, np.float32))
    good = p + (np.ones(NPART, np.uint8), True)
    with pytest.raises(InvalidInputError, match=r"^out_upper_bounds holds 4 items, needs at "
                                                r"least 5$"):
        native.search_batch_into(Q[:1], 1, 1, good, r, e, None, np.empty(1, np.uint64), None,
                                 np.empty(4, np.float32))
    # one share holding every partition: its upper bounds are the search's,
    # and its candidates (unranked) hold the k answers
    ub = np.empty(5, np.float32)
    counts = np.empty(1, np.uint64)
    native.search_batch_into(Q[:1], 1, 1, good, r, e, None, counts, None, ub)
    assert 5 <= counts[0] <= 4096
    assert np.all(np.diff(ub) >= 0) and np.isfinite(ub).all()
    rows, _ = s.search(Q[0])
    got = set(r[0, :int(counts[0])].tolist())
    assert set(rows.tolist()) <= got


def test_serve_bad_arguments(local_data):
    uri, _ = local_data
    for kw, msg in [(dict(num_cpus=0), "num_cpus must be a finite number > 0, got 0"),
                    (dict(num_cpus=float("inf")), "num_cpus must be a finite number > 0, got inf"),
                    (dict(num_cpus="1"), "num_cpus must be a finite number > 0, got '1'"),
                    (dict(num_actors=0), "num_actors must be an integer >= 1, got 0"),
                    (dict(max_restarts=-1), "max_restarts must be an integer >= 0, got -1"),
                    (dict(num_threads=0), "num_threads must be an integer >= 1, got 0")]:
        with pytest.raises(InvalidInputError) as e:
            bitshard.serve(uri, "vec", **kw)
        assert str(e.value) == msg


def test_service_search_takes_the_arguments_of_dataset_search():
    """The same settings, defaults and kinds (the service has no ``column``
    or ``index``: they are its own; no ``with_stats``), built and checked
    by the one SearchOptions.from_arguments(...).checked()."""
    import inspect

    def params(f, drop):
        return [(p.name, p.default, p.kind) for p in inspect.signature(f).parameters.values()
                if p.name not in drop]

    assert params(sv.Service.search, {"self"}) == params(
        bitshard.Dataset.search, {"self", "column", "index", "with_stats"})


# ------------------------------------------------------------------- on Ray

ray = pytest.importorskip("ray")
pytest.importorskip("moto", reason="moto[server] is not installed (pip install 'bitshard[test]')")
from test_object_store import BUCKET, s3  # noqa: E402,F401  (the moto server fixture)


@pytest.fixture(scope="module")
def cluster():
    """Three Ray nodes in this machine (fractional CPUs: the machine has 2)."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # No Python workers started ahead of need: on 2 cores, three nodes'
    # prestarted workers slow each node's start past Ray's own deadline.
    saved = {v: os.environ.get(v) for v in ("RAY_enable_worker_prestart",
                                             "RAY_prestart_worker_first_driver")}
    os.environ.update({v: "0" for v in saved})
    # Ray gives a node 30 s to register; a machine busy with other jobs can
    # miss that, so the cluster is started again (at most three times).
    for attempt in range(3):
        c = None
        try:
            c = Cluster(initialize_head=True,
                        head_node_args={"num_cpus": 1, "include_dashboard": False})
            c.add_node(num_cpus=1)
            c.add_node(num_cpus=1)
            c.wait_for_nodes()
            break
        except Exception as e:  # noqa: BLE001  (Ray raises a bare Exception)
            if c is not None:
                c.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


@pytest.fixture(scope="module")
def s3_data(tmp_path_factory, s3, cluster):
    root = f"s3://{BUCKET}/serve-{os.getpid()}"
    uri, Q = _data(tmp_path_factory.mktemp("serve_s3"), [1, 4, 9], index_uri=root,
                   storage_options=s3["options"], executor="ray")
    return uri, Q, root, s3["options"]


def test_service_on_three_nodes(s3_data):
    uri, Q, root, opts = s3_data
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    for bits in (1, 4, 9):
        ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
        with bitshard.serve(uri, "vec", f"b{bits}", index_uri=root, storage_options=opts,
                            num_cpus=0.25) as svc:
            assert svc.num_actors == 3 and svc.index_name == f"b{bits}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", bitshard.UncoveredRowsWarning)
                for kw in SETTINGS:
                    _same(svc.search(Q, **kw), ds.search("vec", Q, index=f"b{bits}", **kw))
                _same(svc.search(Q[0], k=7), ds.search("vec", Q[0], index=f"b{bits}", k=7))
            # one actor a node, each with the segments' prefixes open and
            # only its own share of the probed partitions fetched by range:
            # the shares' bytes add up to what one process fetched for the
            # same searches (no cache_dir: segments are read by range)
            mem = svc.memory()
            assert len({m["node_id"] for m in mem}) == 3
            assert all(m["segment_bytes"] > 0 and m["rss_bytes"] > 0 for m in mem)
            one = ds._indexes.partition_cache.stats()["bytes"]
            assert one > 0 and all(0 < m["partition_cache_bytes"] < one for m in mem)
            assert sum(m["partition_cache_bytes"] for m in mem) == one


def test_dead_actor_is_restarted_and_retried(s3_data):
    uri, Q, root, opts = s3_data
    ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bitshard.UncoveredRowsWarning)
        want = ds.search("vec", Q, index="b4", k=10, nprobes=6)
        with bitshard.serve(uri, "vec", "b4", 2, index_uri=root, storage_options=opts,
                            num_cpus=0.25) as svc:
            _same(svc.search(Q, k=10, nprobes=6), want)
            pids = svc.actor_pids()
            os.kill(pids[1], signal.SIGKILL)
            _same(svc.search(Q, k=10, nprobes=6), want)   # retried on the restarted actor
            new = svc.actor_pids()
            assert new[0] == pids[0] and new[1] != pids[1]


def test_service_refuses_what_search_refuses(s3_data):
    """Bad settings get Dataset.search's error (type and message), before
    any actor is called."""
    from bitshard.errors import BitshardError

    uri, Q, root, opts = s3_data
    ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
    bad = [dict(k=0), dict(k=True), dict(k="3"), dict(nprobes=0), dict(nprobes=2.5),
           dict(refine_factor=0), dict(eps0=-1.0), dict(eps0=float("nan")),
           dict(num_threads=0), dict(fragment_ids=[-1]), dict(fragment_ids="0"),
           dict(exact_cache_bytes=-1), dict(columns=["nope"])]
    with bitshard.serve(uri, "vec", "b4", 1, index_uri=root, storage_options=opts,
                        num_cpus=0.25) as svc, warnings.catch_warnings():
        warnings.simplefilter("ignore", bitshard.UncoveredRowsWarning)
        for kw in bad:
            with pytest.raises(BitshardError) as want:
                ds.search("vec", Q, index="b4", **kw)
            with pytest.raises(BitshardError) as got:
                svc.search(Q, **kw)
            assert (type(got.value), str(got.value)) == (type(want.value), str(want.value)), kw


def test_front_keeps_a_bounded_lru_of_searchers(s3_data, monkeypatch):
    uri, Q, root, opts = s3_data
    monkeypatch.setattr(sv, "MAX_FRONT_SEARCHERS", 3)
    ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bitshard.UncoveredRowsWarning)
        with bitshard.serve(uri, "vec", "b4", 1, index_uri=root, storage_options=opts,
                            num_cpus=0.25) as svc:
            def ks():
                return [key[1] for key in svc._searchers]   # key: (index, k, nprobes, ...)

            for k in (1, 2, 3):
                svc.search(Q[:2], k=k, nprobes=4)
            assert ks() == [1, 2, 3]
            two = list(svc._searchers.values())[1]
            svc.search(Q[:2], k=2, nprobes=4)          # used again: the most recent
            assert ks() == [1, 3, 2]
            svc.search(Q[:2], k=4, nprobes=4)          # a fourth drops the least recent
            assert ks() == [3, 2, 4]
            assert svc._searchers[next(k for k in svc._searchers if k[1] == 2)] is two
            svc.search(Q[:2], k=5, nprobes=4, filter="id % 2 = 0")   # a filter's: not kept
            assert ks() == [3, 2, 4]
            # made again after being dropped: the same answer
            _same(svc.search(Q, k=1, nprobes=4), ds.search("vec", Q, index="b4", k=1, nprobes=4))
            assert ks() == [2, 4, 1]


def test_refresh_moves_to_the_new_version(s3_data, tmp_path):
    uri, Q, root, opts = s3_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bitshard.UncoveredRowsWarning)
        ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
        before = ds.search("vec", Q, index="b9", k=10, nprobes=4)
        with bitshard.serve(uri, "vec", "b9", 2, index_uri=root, storage_options=opts,
                            num_cpus=0.25) as svc:
            v0 = svc.index_version
            ds.optimize_indices(index_names=["b9"])     # indexes the appended fragment
            ds2 = bitshard.dataset(uri, index_uri=root, storage_options=opts)
            after = ds2.search("vec", Q, index="b9", k=10, nprobes=4)
            _same(svc.search(Q, k=10, nprobes=4), before)       # still pinned
            svc.refresh()
            assert svc.index_version > v0
            _same(svc.search(Q, k=10, nprobes=4), after)
        with pytest.raises(InvalidInputError, match="^this bitshard service is closed$"):
            svc.search(Q)


def test_cli_serve(s3_data, monkeypatch, capsys):
    from bitshard.cli import main

    uri, Q, root, opts = s3_data
    ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
    want = ds.search("vec", Q[:2], index="b4", k=3, nprobes=4, fast_search=True)
    lines = [json.dumps({"q": Q[:2].tolist(), "k": 3, "nprobes": 4, "fast_search": True}),
             json.dumps({"q": Q[0].tolist(), "bogus": 1}),
             json.dumps({"q": Q[0].tolist(), "k": 0})]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    args = ["serve", uri, "--column", "vec", "--index", "b4", "--num-actors", "2",
            "--num-cpus", "0.25", "--index-uri", root]
    for key, v in opts.items():
        args += ["--storage-option", f"{key}={v}"]
    assert main(args) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert out[0] == {"ready": True, "index": "b4", "version": ds.describe_indices()[
        [d["name"] for d in ds.describe_indices()].index("b4")]["version"], "actors": 2}
    assert out[1] == json.loads(json.dumps(want.to_pydict()))
    assert out[2] == {"error": "a request needs \"q\" and takes ['k', 'nprobes', "
                               "'refine_factor', 'columns', 'fragment_ids', 'filter', "
                               "'fast_search', 'eps0']; got ['bogus', 'q']"}
    assert out[3] == {"error": "k must be an integer >= 1, got 0"}
    assert ray.is_initialized()                   # the cluster was not ours to stop


def test_serve_md_examples_run(cluster, tmp_path, monkeypatch, capsys):
    """The ```python blocks of docs/serve.md run as written, in order."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "docs", "serve.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 1
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/serve.md block {i}", "exec"), env)
    assert env["table"].num_rows == 15 and "_distance" in capsys.readouterr().out
    assert ray.is_initialized()                   # the cluster was not the example's to stop


def test_a_lost_node_s_actors_are_restarted_elsewhere_and_retried(s3_data, cluster):
    """A whole node removed (its raylet and every process on it gone): the
    actor it hosted is restarted on a node still alive, the batch retried,
    the answers equal one process's. Last in this file: it leaves the
    cluster two nodes."""
    uri, Q, root, opts = s3_data
    ds = bitshard.dataset(uri, index_uri=root, storage_options=opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bitshard.UncoveredRowsWarning)
        want = {bits: ds.search("vec", Q, index=f"b{bits}", k=10, nprobes=6, filter="id % 3 = 0")
                for bits in (1, 9)}
        with bitshard.serve(uri, "vec", "b1", 3, index_uri=root, storage_options=opts,
                            num_cpus=0.25) as svc1, \
                bitshard.serve(uri, "vec", "b9", 3, index_uri=root, storage_options=opts,
                               num_cpus=0.25) as svc9:
            svcs = {1: svc1, 9: svc9}
            for bits, svc in svcs.items():
                _same(svc.search(Q, k=10, nprobes=6, filter="id % 3 = 0"), want[bits])
            before = {bits: [m["node_id"] for m in svc.memory()] for bits, svc in svcs.items()}
            head = cluster.head_node.node_id
            assert len(set(before[1])) == 3 and set(before[1]) == set(before[9])
            lost = next(n for n in cluster.list_all_nodes() if n.node_id != head)
            assert lost.node_id in before[1]
            cluster.remove_node(lost)
            for bits, svc in svcs.items():
                _same(svc.search(Q, k=10, nprobes=6, filter="id % 3 = 0"), want[bits])
                after = [m["node_id"] for m in svc.memory()]
                alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
                assert lost.node_id not in alive and set(after) <= alive
                # only the lost node's actor moved
                assert [a for a, b in zip(after, before[bits]) if b != lost.node_id] == \
                    [b for b in before[bits] if b != lost.node_id]
                _same(svc.search(Q[3], k=4, nprobes=16), ds.search(
                    "vec", Q[3], index=f"b{bits}", k=4, nprobes=16))
