"""``python -m bench``: bitshard against pylance, FAISS, rabitqlib and exact search
on the same vectors with the same number of partitions, in one run.

Every measurement runs in a child process (``bench.worker``): one peer that
crashes costs only its own rows (recorded with a note), and each build's peak
RSS is that child's own (``os.wait4``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from . import report
from .datasets import REAL_DATASETS, default_cache_dir, prepare
from .systems import FAMILIES, load

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "RAYON_NUM_THREADS",
               "LANCE_CPU_THREADS", "BITSHARD_NUM_THREADS")


# Every variant, in the order a time budget keeps them: the leaders of each
# family at the recall targets first (bitshard and rabitqlib at 9 and 4 bits,
# then FAISS's and pylance's best on real sets), the rest after.
PRIORITY = (
    "bitshard-9bit", "rabitqlib-ivf-9bit", "bitshard-4bit", "rabitqlib-ivf-4bit",
    "faiss-ivfrabitq-9bit", "faiss-ivfrabitq-1bit+refine", "pylance-ivfrq-9bit",
    "bitshard-1bit-npy", "faiss-ivfrabitq-fs-4bit", "faiss-ivfrabitq-4bit", "pylance-ivfrq-4bit",
    "bitshard-1bit", "rabitqlib-ivf-1bit", "pylance-ivfrq-1bit", "faiss-ivfrabitq-1bit",
    "faiss-ivfrabitq-fs-1bit", "brute-force",
    "bitshard", "rabitqlib", "faiss", "pylance", "brute")  # anything else of the families


def log(*a):
    print(*a, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", action="append",
                    help="synthetic-128|synthetic-384|synthetic-768|synthetic-1536|hdf5:<path>|"
                         "wordnet|fashion-mnist|gcide|real (repeatable or comma-separated; "
                         "'real' = wordnet,fashion-mnist,gcide; default: real, --synthetic: "
                         "synthetic-128 and synthetic-768, --quick: synthetic-128)")
    ap.add_argument("--synthetic", action="store_true",
                    help="the secondary view: synthetic-128 and synthetic-768 as default datasets")
    ap.add_argument("--rows", type=int, help="rows per dataset (default per dataset)")
    ap.add_argument("--queries", type=int, help="queries (default 1000, --quick 200)")
    ap.add_argument("--partitions", type=int,
                    help="IVF partitions for every system (default: power of two near sqrt(rows))")
    ap.add_argument("--threads", default="1,all",
                    help="search thread settings, e.g. '1,all' or '1' or '1,2'")
    ap.add_argument("--systems", default=",".join(PRIORITY),
                    help="families (bitshard,pylance,faiss,rabitqlib,brute) or variant labels "
                         "(e.g. bitshard-1bit,faiss-ivfrabitq-4bit), in priority order: "
                         "with --budget-min the last ones are the first skipped "
                         "(default: every variant, leaders first)")
    ap.add_argument("--budget-min", type=float,
                    default=float(os.environ.get("BENCH_BUDGET_MIN") or 0) or None,
                    help="wall-time budget of the whole run in minutes (default: $BENCH_BUDGET_MIN, "
                         "else none): datasets share it, builds that do not fit are skipped, "
                         "sweeps are shortened, and what was skipped is reported")
    ap.add_argument("--runs", type=int, default=3,
                    help="search runs per system and thread count, interleaved across systems; "
                         "each point's QPS is the median (default 3)")
    ap.add_argument("--quick", action="store_true", help="a small CI-sized run (~2-3 minutes)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    ap.add_argument("--cache", default=default_cache_dir(), help="dataset cache directory")
    ap.add_argument("--workdir", default=None,
                    help="where indexes are built (default: a temp dir, removed per variant)")
    ap.add_argument("--keep", action="store_true", help="keep the built indexes")
    ap.add_argument("--workers", type=int, default=None,
                    help="workers for distributed builds (default: cores); 0 disables them")
    ap.add_argument("--no-ray", action="store_true", help="skip lance-ray's distributed build")
    ap.add_argument("--dist-bits", default="1",
                    help="bit widths whose distributed builds are measured (default 1; e.g. 1,4)")
    ap.add_argument("--build-repeats", type=int, default=None,
                    help="builds per variant (single-process and distributed), the fastest "
                         "kept: one build on a shared machine can be 30-50%% slow "
                         "(default 2, --quick 1)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds per search sweep (default 40, --quick 6)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument("--bitshard-source", choices=("lance", "numpy", "both"), default="both",
                    help="what bitshard indexes and reranks from: the Lance dataset, the numpy "
                         "array, or both (default: Lance for every variant, plus 1 bit on numpy)")
    ap.add_argument("--no-profile", action="store_true",
                    help="skip the cProfile pass over bitshard's build and search")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the OS page cache before each cold open (root only)")
    a = ap.parse_args(argv)
    a.command = "python -m bench " + " ".join(
        shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    ds = []
    default = (["synthetic-128"] if a.quick else
               ["synthetic-128", "synthetic-768"] if a.synthetic else ["real"])
    for x in a.dataset or default:
        for s in x.split(","):
            ds += list(REAL_DATASETS) if s == "real" else ([s] if s else [])
    a.dataset = ds
    a.runs = max(1, a.runs if not a.quick else 1)
    if a.quick:
        a.rows = a.rows or 20_000
    a.queries = a.queries or (200 if a.quick else 1000)
    a.budget = a.budget or (10.0 if a.quick else 30.0)
    a.dist_bits = [int(b) for b in str(a.dist_bits).split(",") if b.strip()]
    a.workers = (os.cpu_count() or 1) if a.workers is None else a.workers
    if a.quick:
        a.no_ray = True        # Ray's start-up alone is most of a quick run
        a.no_profile = True
    return a


def default_partitions(n: int) -> int:
    p = 1 << max(0, int(round(math.log2(max(1.0, math.sqrt(n))))))
    return max(1, min(p, n // 40 or 1))


def thread_list(spec: str) -> List[int]:
    out = []
    for t in spec.split(","):
        t = t.strip()
        if t:
            out.append((os.cpu_count() or 1) if t == "all" else int(t))
    return list(dict.fromkeys(out))


def child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for v in THREAD_VARS:
        env[v] = str(threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("LANCE_LOG", "error")
    env["RUST_LOG"] = env.get("RUST_LOG", "error")
    env["TQDM_DISABLE"] = "1"
    env["RAY_DEDUP_LOGS"] = "0"
    return env


def _best_build(run: Any, repeats: int, wdir: str) -> Any:
    """Build ``repeats`` times into a fresh ``wdir`` each time; the fastest
    build's result (the last build's index stays in ``wdir``), the largest
    peak RSS, the first error, and every build's seconds."""
    best, peak, times = None, 0, []
    for r in range(repeats):
        if r:
            shutil.rmtree(wdir, ignore_errors=True)
            os.makedirs(wdir)
        res, p, err = run()
        peak = max(peak, p or 0)
        if err:
            return res, peak, err, times
        times.append(res["build_seconds"])
        if best is None or res["build_seconds"] < best["build_seconds"]:
            best = dict(res)
    if best is not None and res is not None:
        # the index on disk is the last build's: report its size
        best["index_bytes"] = res["index_bytes"]
    return best, peak, None, times


def run_child(spec: Dict[str, Any], threads: int, timeout: float,
              tmpdir: str) -> Tuple[Optional[dict], Optional[int], Optional[str]]:
    """Run bench.worker on spec in a new session; (result, peak RSS bytes, error note)."""
    fd, spec_path = tempfile.mkstemp(prefix="spec-", suffix=".json", dir=tmpdir)
    out_path = spec_path[:-5] + ".out.json"
    log_path = spec_path[:-5] + ".log"
    spec = dict(spec, out=out_path)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    with open(log_path, "w") as lf:
        p = subprocess.Popen([sys.executable, "-m", "bench.worker", spec_path], cwd=ROOT,
                             env=child_env(threads), stdout=lf, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + timeout
    rusage, status, timed_out = None, None, False
    tree_peak = 0
    try:
        import psutil

        proc = psutil.Process(p.pid)
    except Exception:  # psutil missing, or the child already gone
        proc = None
    while True:
        pid, status, rusage = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            break
        if proc is not None:
            tree_peak = max(tree_peak, _tree_rss(proc))
        if time.monotonic() > deadline:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the child's own session: it and its workers
            except ProcessLookupError:
                pass
            _, status, rusage = os.wait4(p.pid, 0)
            break
        time.sleep(0.05)
    p.returncode = 0  # reaped by wait4 above
    # Peak RSS: the child's own VmHWM when it reports it (exact, its own address
    # space). ru_maxrss from wait4 / RUSAGE_CHILDREN is kept only as a fallback:
    # Linux carries the forking parent's high-water mark into it.
    peak = rusage.ru_maxrss * 1024 if rusage else None
    result, err = None, None
    if os.path.exists(out_path):
        with open(out_path) as f:
            result = json.load(f)
        if result.get("vm_hwm_bytes"):
            peak = result["vm_hwm_bytes"]
        result["tree_peak_rss_bytes"] = tree_peak or None
        if result.get("error"):
            err = result["error"]
    if timed_out:
        err = f"timed out after {timeout:.0f} s"
    elif result is None:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        with open(log_path, errors="replace") as f:
            tail = " / ".join(f.read().strip().splitlines()[-3:])
        err = f"child died (signal {sig}, exit {code}): {tail[-300:]}"
    return result, peak, err


def _tree_rss(proc) -> int:
    """RSS summed over a process and its descendants (sampled every 50 ms)."""
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except Exception:
        return 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except Exception:
            pass
    return total


def select_variants(args, opts) -> List[Tuple[str, dict, Optional[str]]]:
    """(family, variant, why-not) for every variant the --systems selection names,
    in the selection's order (a label where it is named, else its family's place)."""
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    out = []
    for fam in FAMILIES:
        try:
            mod = load(fam)
        except Exception as e:
            if fam in wanted:
                out.append((fam, {"label": fam, "num_bits": None}, f"import of bench module failed: {e}"))
            continue
        why = mod.available()
        try:
            vs = mod.variants(opts)
        except Exception as e:
            vs, why = [{"label": fam, "num_bits": None}], why or f"variants() failed: {e}"
        for v in vs:
            if fam in wanted or v["label"] in wanted:
                out.append((fam, v, why))
    rank = {w: i for i, w in reversed(list(enumerate(wanted)))}
    return sorted(out, key=lambda x: rank.get(x[1]["label"], rank.get(x[0], len(wanted))))


def dist_modes(fam: str, v: dict, mod, args) -> List[str]:
    if args.workers <= 0 or not hasattr(mod, "build_distributed"):
        return []
    bits = tuple(args.dist_bits)
    if fam in ("bitshard", "pylance"):
        if v.get("source") == "numpy":
            return []  # the same flow as bitshard-1bit; measured there
        modes = ["processes"] if v.get("num_bits") in bits else []
        if fam == "pylance" and v.get("num_bits") == 1 and not args.no_ray:
            modes.append("ray")
        return modes
    if fam == "faiss" and v["label"] == "faiss-ivfrabitq-1bit" and not args.quick:
        return ["processes"]
    return []


class Budget:
    """The run's wall-time budget (``--budget-min``): each dataset gets the time
    left divided by the datasets left, so time one set does not use passes on."""

    # a search child's fixed cost (process start, imports, open, warm-up), seconds
    CHILD_OVERHEAD = 8.0
    # the least sweep budget worth a child (seconds at one thread)
    MIN_SWEEP = 4.0

    def __init__(self, minutes: Optional[float]):
        self.total = minutes * 60.0 if minutes else None
        self.t0 = time.monotonic()
        self.skipped: List[str] = []

    def left(self) -> float:
        if self.total is None:
            return float("inf")
        return self.total - (time.monotonic() - self.t0)

    def share(self, datasets_left: int) -> float:
        return self.left() / max(1, datasets_left)

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        log(f"  budget: {what}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    work_root = args.workdir or tempfile.mkdtemp(prefix="bitshard-bench-")
    os.makedirs(work_root, exist_ok=True)
    specdir = tempfile.mkdtemp(prefix="specs-", dir=work_root)
    threads = thread_list(args.threads)
    all_cores = os.cpu_count() or 1
    rows: List[dict] = []
    profiles: List[dict] = []
    budget = Budget(args.budget_min)
    env_note = (f"{platform.node()} {platform.machine()} {all_cores} cores ({_cpu_desc()}); "
                f"python {platform.python_version()}")
    log(f"bitshard bench: {', '.join(args.dataset)}; threads {threads}; {args.runs} runs per "
        f"point; budget {f'{args.budget_min:g} min' if args.budget_min else 'none'}; "
        f"work dir {work_root}")
    t_start = time.perf_counter()
    for di, dspec in enumerate(args.dataset):
        share = budget.share(len(args.dataset) - di)
        ds_deadline = time.monotonic() + share
        if share < 60:
            budget.skip(f"{dspec}: not run ({share:.0f} s of budget left for it)")
            rows.append({"system": "-", "family": None, "dataset": dspec, "recall_at_10": None,
                         "notes": ["skipped: time budget spent"]})
            continue
        try:
            # a text set's first embedding may take at most half the dataset's share
            data = prepare(dspec, args.rows, args.queries, args.cache, args.seed, log,
                           embed_deadline=(time.monotonic() + share / 2
                                           if budget.total is not None else None))
        except Exception as e:
            log(f"dataset {dspec}: {type(e).__name__}: {e}")
            rows.append({"system": "-", "family": None, "dataset": dspec, "recall_at_10": None,
                         "notes": [f"dataset failed: {type(e).__name__}: {e}"]})
            continue
        if data.meta.get("rows_wanted"):
            budget.skip(f"{data.name}: {data.n} rows instead of {data.meta['rows_wanted']} (the "
                        "embedding stopped at half the dataset's share; the next run embeds "
                        "the rest)")
        parts = args.partitions or default_partitions(data.n)
        opts = {"partitions": parts, "quick": args.quick, "k": args.k,
                "bitshard_source": args.bitshard_source}
        log(f"\n== {data.name}: {data.n} x {data.dim}, {data.queries.shape[0]} queries, "
            f"{parts} partitions"
            + (f"; {max(0.0, ds_deadline - time.monotonic()) / 60:.1f} min of budget ==" if
               budget.total else " =="))
        base_row = {"dataset": data.name, "dim": data.dim, "rows": data.n,
                    "queries": int(data.queries.shape[0]), "partitions": parts, "k": args.k}
        built = _build_all(rows, base_row, data, opts, parts, args, threads, all_cores,
                           work_root, specdir, budget, ds_deadline)
        _search_rounds(rows, built, data, args, threads, all_cores, specdir, budget,
                       ds_deadline)
        for b in built:
            _compare_checks(rows, b["label"], data, b["dist_checks"], args.k, b["spec"],
                            specdir, args)
            if b["fam"] == "bitshard" and not args.no_profile:
                prof = _profile(b["spec"], rows, b["label"], data.name, b["v"], all_cores, args,
                                specdir)
                if prof:
                    profiles.append(prof)
                    with open(os.path.splitext(args.out)[0] + "-profile.json", "w") as f:
                        json.dump(profiles, f, indent=1, default=_json_default)
            if not args.keep:
                shutil.rmtree(b["spec"]["workdir"], ignore_errors=True)
        _write(args.out, rows)
    _finish(rows, profiles, env_note, args, t_start, budget)
    if not args.workdir:
        shutil.rmtree(work_root, ignore_errors=True)
    return 0


def _sweep_budgets(args, threads: List[int]) -> Dict[int, float]:
    """Seconds per search sweep at each thread count (all cores get half)."""
    return {th: (args.budget if th == 1 else args.budget / 2) for th in threads}


def _search_cost(args, threads, sweep_1: float) -> float:
    """Worst-case seconds of one system's searches in one run at sweep budget
    ``sweep_1`` (a child may overrun its budget by half)."""
    return sum(Budget.CHILD_OVERHEAD + 1.5 * (sweep_1 if th == 1 else sweep_1 / 2)
               for th in threads)


def _build_all(rows, base_row, data, opts, parts, args, threads, all_cores, work_root, specdir,
               budget, ds_deadline) -> List[dict]:
    """Build every selected variant (kept on disk for the search runs), in
    priority order; with a budget, a variant whose build and least search time
    would not fit in the dataset's share is skipped. Returns the built ones."""
    built: List[dict] = []
    build_times: List[float] = []
    for fam, v, why in select_variants(args, opts):
        label = v["label"]
        params = dict(v, partitions=parts)
        vrow = dict(base_row, system=label, family=fam, num_bits=v.get("num_bits"),
                    build_params=params, notes=[])
        if why:
            log(f"  {label}: skipped: {why}")
            for th in threads:
                rows.append(dict(vrow, threads=th, recall_at_10=None, qps=None,
                                 notes=[f"skipped: {why}"]))
            _write(args.out, rows)
            continue
        if budget.total is not None:
            est_build = max(build_times) if build_times else 30.0
            least = args.runs * _search_cost(args, threads, Budget.MIN_SWEEP)
            need = est_build + (len(built) + 1) * least
            if built and time.monotonic() + need > ds_deadline:
                budget.skip(f"{data.name} {label}: not built (needs ~{need:.0f} s with the "
                            f"{len(built)} built before it, "
                            f"{max(0.0, ds_deadline - time.monotonic()):.0f} s left)")
                for th in threads:
                    rows.append(dict(vrow, threads=th, recall_at_10=None, qps=None,
                                     notes=["skipped: time budget"]))
                continue
        wdir = os.path.join(work_root, f"{data.name}-{label}")
        shutil.rmtree(wdir, ignore_errors=True)
        os.makedirs(wdir)
        spec = {"family": fam, "params": params, "data_path": data.path, "workdir": wdir,
                "k": args.k, "opts": opts, "threads": all_cores}
        t = time.perf_counter()
        repeats = max(1, args.build_repeats or (1 if args.quick else 2))
        la0 = os.getloadavg()[0]
        res, peak, err, times = _best_build(
            lambda: run_child(dict(spec, phase="build"), all_cores, args.timeout, specdir),
            repeats, wdir)
        build_times.append(time.perf_counter() - t)
        if err:
            log(f"  {label}: build FAILED: {err[:300]}")
            for th in threads:
                rows.append(dict(vrow, threads=th, recall_at_10=None, qps=None,
                                 peak_rss_bytes=peak, notes=[f"build failed: {err}"]))
            _write(args.out, rows)
            shutil.rmtree(wdir, ignore_errors=True)
            continue
        vrow.update(build_seconds=res["build_seconds"], build_seconds_all=times,
                    index_bytes=res["index_bytes"],
                    bytes_per_vector=res["index_bytes"] / data.n, peak_rss_bytes=peak,
                    rss_before_build_bytes=res.get("rss_before_build_bytes"),
                    build_threads=all_cores, loadavg_build=res.get("loadavg_end"),
                    loadavg_build_before_after=[la0, os.getloadavg()[0]],
                    version=res.get("version"))
        if (res.get("loadavg_end") or 0) > all_cores + 0.5:
            vrow["notes"].append(f"machine busy during build: load average "
                                 f"{res['loadavg_end']:.1f} on {all_cores} cores")
        log(f"  {label}: built in {res['build_seconds']:.2f} s, "
            f"{res['index_bytes'] / data.n:.1f} B/vector, peak RSS {peak / 2**20:.0f} MB "
            f"({time.perf_counter() - t:.0f} s wall)")
        dist_checks = _distributed_builds(fam, v, label, params, spec, vrow, data, args,
                                          work_root, all_cores, specdir, repeats)
        built.append({"fam": fam, "v": v, "label": label, "spec": spec, "vrow": vrow,
                      "dist_checks": dist_checks})
    return built


def _search_rounds(rows, built, data, args, threads, all_cores, specdir, budget,
                   ds_deadline) -> None:
    """The search runs: ``args.runs`` rounds, each searching every built system
    at every thread count (the order of the systems rotated by one each round,
    so none is always first after the builds). The first round sweeps under the
    time budget; the later ones replay its points on the same queries. Each
    point's QPS is the median over the rounds; the 1-minute load average before
    and after every search child is kept in the rows."""
    if not built:
        return
    sweeps = _sweep_budgets(args, threads)
    if budget.total is not None:
        # fit the rounds in what is left of the dataset's share: shorten the sweeps
        left = ds_deadline - time.monotonic()
        per_sys = left / args.runs / len(built)
        fixed = Budget.CHILD_OVERHEAD * len(threads)
        scale = sum(1.5 * (1 if th == 1 else 0.5) for th in threads)
        s1 = max(Budget.MIN_SWEEP, min(args.budget, (per_sys - fixed) / scale))
        if s1 < args.budget:
            log(f"  budget: sweeps shortened to {s1:.0f} s (one thread) to fit "
                f"{args.runs} runs of {len(built)} systems in {left:.0f} s")
        sweeps = {th: (s1 if th == 1 else s1 / 2) for th in threads}
    results: Dict[Tuple[str, int], List[dict]] = {}
    loads: Dict[Tuple[str, int], List[List[float]]] = {}
    errors: Dict[Tuple[str, int], str] = {}
    for rnd in range(args.runs):
        order = built[rnd % len(built):] + built[:rnd % len(built)]
        for b in order:
            for th in threads:
                key = (b["label"], th)
                if key in errors:
                    continue
                first = results.get(key)
                if rnd and not (first and first[0]["points"]):
                    continue  # its first run failed, was skipped or measured nothing
                if budget.total is not None and time.monotonic() > ds_deadline + 30:
                    budget.skip(f"{data.name} {b['label']} threads={th}: run {rnd + 1} of "
                                f"{args.runs} not done (the dataset's share is spent)")
                    continue
                if args.drop_caches:
                    _drop_caches(b["vrow"])
                spec = dict(b["spec"], phase="search", threads=th, thin=th > 1,
                            budget_seconds=sweeps[th])
                if rnd:
                    spec["plan"] = [{"setting": p["setting"], "queries": p["queries_measured"]}
                                    for p in first[0]["points"]]
                la0 = os.getloadavg()[0]
                sres, _, serr = run_child(spec, th, args.timeout, specdir)
                la1 = os.getloadavg()[0]
                loads.setdefault(key, []).append([la0, la1])
                if serr:
                    log(f"  {b['label']}: search threads={th} run {rnd + 1} FAILED: "
                        f"{serr[:300]}")
                    if not rnd:
                        errors[key] = serr
                    continue
                results.setdefault(key, []).append(sres)
                pts = sres["points"]
                log(f"  {b['label']}: threads={th} run {rnd + 1}: {len(pts)} settings, max "
                    f"recall {max((p['recall_at_10'] for p in pts), default=float('nan')):.3f}, "
                    f"max QPS {max((p['qps'] or 0 for p in pts), default=0):,.0f}, load "
                    f"{la0:.1f} -> {la1:.1f}")
    for b in built:
        for th in threads:
            key = (b["label"], th)
            _point_rows(rows, b["vrow"], th, results.get(key), loads.get(key, []),
                        errors.get(key), all_cores)
    _write(args.out, rows)


def _median(xs: List[float]) -> Optional[float]:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def _point_rows(rows, vrow, th, runs, loads, err, all_cores) -> None:
    """One row per setting of a system at a thread count: the first run's
    recall and counters, the median QPS (and cold time) over the runs."""
    if err or not runs:
        rows.append(dict(vrow, threads=th, recall_at_10=None, qps=None,
                         notes=vrow["notes"] + [f"search failed: {err}" if err else
                                                "skipped: time budget"],
                         loadavg_runs=loads))
        return
    first = runs[0]
    snotes = list(first.get("notes", []))
    la = max([x for pair in loads for x in pair]
             + [max(r.get("loadavg_start") or 0, r.get("loadavg_end") or 0) for r in runs])
    if la > all_cores + 0.5:
        snotes.append(f"machine busy during search: load average up to {la:.1f} on "
                      f"{all_cores} cores (QPS not trustworthy)")
    if len(runs) > 1:
        snotes.append(f"QPS: median of {len(runs)} runs")
    for i, pt in enumerate(first["points"]):
        sp = pt["setting"]
        same = [r["points"][i] for r in runs
                if i < len(r["points"]) and r["points"][i]["setting"] == sp]
        qps_runs = [p["qps"] for p in same]
        rec_runs = {round(p["recall_at_10"], 9) for p in same}
        notes = vrow["notes"] + snotes
        if len(rec_runs) > 1:
            notes = notes + [f"recall differs between runs: {sorted(rec_runs)}"]
        row = dict(vrow, threads=th, nprobes=sp.get("nprobes"), refine=sp.get("refine"),
                   search_params=sp, recall_at_10=pt["recall_at_10"], qps=_median(qps_runs),
                   qps_runs=qps_runs, runs=len(same),
                   queries_measured=pt["queries_measured"],
                   cold_first_result_seconds=_median(
                       [r["cold_first_result_seconds"] for r in runs]),
                   cold_open_seconds=_median([r["cold_open_seconds"] for r in runs]),
                   cold_with_import_seconds=_median(
                       [r["cold_first_result_seconds"] + (r.get("import_seconds") or 0)
                        for r in runs]),
                   import_seconds=first.get("import_seconds"), loadavg_search=la,
                   loadavg_runs=loads, notes=notes)
        for key in pt:
            if key.endswith("_per_query") or key == "codes_per_second":
                row[key] = pt[key]
        rows.append(row)


def _distributed_builds(fam, v, label, params, spec, vrow, data, args, work_root, all_cores,
                        specdir, repeats) -> list:
    """Build the variant distributed in every mode it supports; note the
    times and memory in ``vrow``; return the (mode, recall check) pairs."""
    mod = load(fam)
    dist_checks = []
    for mode in dist_modes(fam, v, mod, args):
        ddir = os.path.join(work_root, f"{data.name}-{label}-dist-{mode}")
        shutil.rmtree(ddir, ignore_errors=True)
        os.makedirs(ddir)
        dparams = dict(params, dist=mode)
        dist_spec = dict(spec, phase="build_dist", params=dparams, workdir=ddir,
                         workers=args.workers)
        dres, dpeak, derr, dtimes = _best_build(
            lambda: run_child(dist_spec, all_cores, args.timeout, specdir), repeats,
            ddir)
        key = "build_seconds_distributed" if mode == "processes" else "build_seconds_lance_ray"
        if derr:
            vrow["notes"].append(f"distributed build ({mode}) failed: {derr[:600]}")
            log(f"  {label}: distributed ({mode}) FAILED: {derr[:300]}")
        elif dres.get("skipped"):
            vrow["notes"].append(f"distributed ({mode}) skipped: {dres['skipped']}")
        else:
            vrow[key] = dres["build_seconds"]
            vrow[key + "_all"] = dtimes
            vrow["distributed_workers"] = args.workers
            # all the build's processes together (sampled sum over the tree)
            vrow[("peak_rss_distributed_bytes" if mode == "processes"
                  else "peak_rss_lance_ray_bytes")] = dres.get("tree_peak_rss_bytes") or dpeak
            chk = dres.get("check") or {}
            if chk:
                dist_checks.append((mode, chk))
            vrow["notes"].append(
                f"distributed ({mode}): {dres.get('note')}; {dres['build_seconds']:.2f} s; "
                f"index {dres['index_bytes']} B; recall@10 "
                f"{chk.get('recall_at_10', float('nan')):.4f} at {chk.get('setting')} "
                f"on {chk.get('queries')} queries")
            log(f"  {label}: distributed ({mode}, {args.workers} workers) "
                f"{dres['build_seconds']:.2f} s; check recall "
                f"{chk.get('recall_at_10', float('nan')):.3f}")
        if not args.keep:
            shutil.rmtree(ddir, ignore_errors=True)
    return dist_checks


def _finish(rows, profiles, env_note, args, t_start, budget) -> None:
    """Write the rows, the plot and the summary files; log the summary."""
    run = {"command": args.command.strip(), "runs": args.runs, "budget_min": args.budget_min,
           "skipped_by_budget": budget.skipped, "wall_seconds": time.perf_counter() - t_start}
    for r in rows:
        r.setdefault("notes", [])
        r["env"] = env_note
    # The run block (command, budget, what the budget skipped) is the same for
    # every row: written once, on the first row, it kept real.json 2.5 MB smaller.
    # Readers take the first row that has one (report.py).
    if rows:
        rows[0]["run"] = run
    _write(args.out, rows)
    png = os.path.splitext(args.out)[0] + ".png"
    perr = report.plot(rows, png)
    text, heads = report.summarize(rows, profiles)
    with open(os.path.splitext(args.out)[0] + "-summary.md", "w") as f:
        f.write(report.markdown(rows))
    summary_path = os.path.splitext(args.out)[0] + "-summary"
    with open(summary_path + ".txt", "w") as f:
        f.write(text.lstrip() + "\n")
    with open(summary_path + ".json", "w") as f:
        json.dump(heads, f, indent=1, default=str)
    log(text)
    log(f"\nrows: {args.out}\nplot: {png if not perr else perr}\nsummary: {summary_path}.txt"
        f"\ntotal {time.perf_counter() - t_start:.0f} s")


def _compare_checks(rows, label, data, checks, k, spec, specdir, args) -> None:
    """Put the single-process index's recall at the distributed check's setting
    (same first queries) beside it: a merged index should answer the same."""
    if not checks:
        return
    for mode, chk in checks:
        nq = chk.get("queries") or 0
        res, _, err = run_child(dict(spec, phase="check", setting=chk["setting"], check_queries=nq),
                                1, args.timeout, specdir)
        if err or res is None:
            note = f"distributed ({mode}) check: single-process comparison failed: {err}"
        else:
            single = res.get("recall_at_10")
            dist = chk.get("recall_at_10")
            same = "same as" if single is not None and dist is not None and abs(single - dist) < 1e-9 \
                else "vs"
            note = (f"distributed ({mode}) check: recall@10 {dist:.4f} {same} single-process "
                    f"{single:.4f} at {chk['setting']} on {nq} queries")
        for r in rows:
            if r.get("system") == label and r.get("dataset") == data.name:
                r["notes"] = list(r.get("notes", [])) + [note]
        log(f"  {label}: {note}")


def _profile(spec, rows, label, dname, v, all_cores, args, specdir) -> Optional[dict]:
    """cProfile bitshard's build (1 and 4 bits) and single-thread search at the
    setting nearest recall 0.90; the top entries go into the rows' notes."""
    mine = [r for r in rows if r.get("system") == label and r.get("dataset") == dname
            and r.get("threads") == 1 and r.get("recall_at_10") is not None]
    if not mine:
        return None
    near = report.setting_at(mine, 0.90)
    pspec = dict(spec, phase="profile", setting=near["search_params"], threads=1,
                 profile_build=v.get("num_bits") == 1 and v.get("source") != "numpy",
                 profile_queries=min(200, near.get("queries") or 200))
    pres, _, perr = run_child(pspec, 1, args.timeout, specdir)
    if perr:
        log(f"  {label}: profile FAILED: {perr[:200]}")
        return None
    pres = {"system": label, "dataset": dname, "recall_at_setting": near["recall_at_10"], **pres}
    parts = []
    if pres.get("build"):
        b = pres["build"]
        parts.append(f"profile build {b['seconds']:.1f} s: " + ", ".join(
            f"{e['function']} {100 * (e['share'] or 0):.0f}%" for e in b["top"][:3]))
    s = pres["search"]
    parts.append(f"profile search {s['ms_per_query']:.2f} ms/query at {s['setting']}: " + ", ".join(
        f"{e['function']} {100 * (e['share'] or 0):.0f}%" for e in s["top"][:4]))
    note = "; ".join(parts)
    for r in rows:
        if r.get("system") == label and r.get("dataset") == dname:
            r["notes"] = list(r.get("notes", [])) + [note]
    log(f"  {label}: {note}")
    return pres


def _cpu_desc() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
    except OSError:
        return platform.processor() or "?"
    model = next((ln.split(":", 1)[1].strip() for ln in txt.splitlines()
                  if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in txt.splitlines()
                      if ln.startswith("flags")), []))
    simd = [f for f in ("avx2", "avx512f", "avx512_vpopcntdq", "avx512bw") if f in flags]
    return f"{model}; {' '.join(simd) or 'no avx2'}"


def _drop_caches(vrow):
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        note = f"could not drop caches: {e}"
        if note not in vrow["notes"]:
            vrow["notes"].append(note)


def _write(path: str, rows: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
    except ImportError:  # pragma: no cover
        pass
    return str(o)
