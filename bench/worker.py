"""One measurement in its own process: ``python -m bench.worker SPEC.json``.

Phases:
    build       build one system's index (the parent reads this process's peak RSS)
    build_dist  the distributed build with N workers, where the system has one
    search      reopen the index (cold time to first result), then the sweep of
                search settings: recall@10 and QPS, one query at a time when
                threads == 1, the whole batch through the system's batch call
                otherwise. With spec["plan"] (a list of {"setting", "queries"}:
                an earlier run's points) exactly those settings on exactly that
                many queries, without a time cap, so that repeated runs of a
                point do the same work and their QPS can be compared

The result is a JSON object written to spec["out"]; an exception is written
there too (as "error") so the parent records it as a note.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np


def _status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc/self/status.

    VmHWM belongs to the address space made at exec, so unlike ru_maxrss (which
    Linux carries over from the forking parent) it is this process's own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_now() -> int:
    return _status_bytes("VmRSS")


def recall_at(ids: np.ndarray, gt: np.ndarray, k: int) -> float:
    hits = 0
    for row, truth in zip(ids, gt):
        hits += len(set(int(x) for x in row[:k] if x >= 0) & set(int(x) for x in truth[:k]))
    return hits / float(k * len(gt)) if len(gt) else float("nan")


def _add_stats(acc, st):
    if not st:
        return acc
    acc = dict(acc or {})
    for key, v in st.items():
        if isinstance(v, (int, float)):
            acc[key] = acc.get(key, 0) + v
    return acc


def phase_build(mod, data, spec):
    params, workdir = spec["params"], spec["workdir"]
    if hasattr(mod, "prepare"):
        mod.prepare(data, params, workdir)  # untimed: copies of the source, not the index
    rss_before = _rss_now()
    t = time.perf_counter()
    h = mod.build(data, params, workdir)
    took = time.perf_counter() - t
    out = {"build_seconds": took, "index_bytes": int(mod.size(h)),
           "rss_before_build_bytes": rss_before}
    if isinstance(h, dict) and h.get("build_seconds_override"):
        out["build_seconds"] = h["build_seconds_override"]
    return out


def phase_build_dist(mod, data, spec):
    params, workdir = spec["params"], spec["workdir"]
    if hasattr(mod, "prepare"):
        mod.prepare(data, params, workdir)
    t = time.perf_counter()
    res = mod.build_distributed(data, params, workdir, int(spec["workers"]))
    took = time.perf_counter() - t
    h, note = res
    if h is None:
        return {"skipped": note}
    if isinstance(h, dict) and h.get("build_seconds_override"):
        took = h["build_seconds_override"]
    out = {"build_seconds": took, "index_bytes": int(mod.size(h)), "note": note}
    # sanity: the merged index answers like a single-process one (recall at one setting)
    sw = mod.sweep(params, spec["opts"])
    if sw and sw[0].get("nprobes") is not None:
        sp = dict(sw[min(len(sw) - 1, len(sw) // 2)])
        h2 = mod.open(data, params, workdir)
        nq = min(100, data.queries.shape[0])
        ids = mod.search(h2, data.queries[:nq], spec["k"], sp)
        out["check"] = {"setting": sp, "recall_at_10": recall_at(ids, data.gt[:nq], spec["k"]),
                        "queries": nq}
    return out


def _group_key(sp):
    return json.dumps({k: v for k, v in sp.items() if k != "nprobes"}, sort_keys=True)


def phase_search(mod, data, spec):
    params, workdir, k = spec["params"], spec["workdir"], int(spec["k"])
    threads = int(spec["threads"])
    budget = float(spec.get("budget_seconds", 60))
    Q = np.ascontiguousarray(data.queries, dtype=np.float32)
    gt = data.gt[:, :k]
    nq = Q.shape[0]
    plan = spec.get("plan")
    limits = {}
    if plan:
        sweep = [p["setting"] for p in plan]
        limits = {json.dumps(p["setting"], sort_keys=True): int(p["queries"]) for p in plan}
    else:
        sweep = mod.sweep(params, spec["opts"])
    if not plan and spec.get("thin") and len(sweep) > 4:
        # all-cores pass: every other setting of each group, keeping the last
        groups = {}
        for sp in sweep:
            groups.setdefault(_group_key(sp), []).append(sp)
        sweep = [sp for g in groups.values() for i, sp in enumerate(g) if i % 2 == 0 or i == len(g) - 1]

    # interleave the groups (refine settings), cheapest nprobes first, so that a
    # budget cut loses the top of every curve rather than a whole curve
    pos = {}
    keyed = []
    if plan:
        pos = None  # keep the planned order
    for sp in (sweep if pos is not None else []):
        g = _group_key(sp)
        pos[g] = pos.get(g, -1) + 1
        keyed.append((pos[g], len(keyed), sp))
    if pos is not None:
        sweep = [sp for _, _, sp in sorted(keyed, key=lambda x: (x[0], x[1]))]

    # every setting gets an equal share of the budget (at least 100 queries, or
    # all of them), so a slow system still gets its whole curve, on fewer queries
    min_queries = min(100, nq)
    point_cap = max(0.5, budget / max(1, len(sweep)))

    t0 = time.perf_counter()
    h = mod.open(data, params, workdir)
    t_open = time.perf_counter() - t0
    mod.search(h, Q[:1], k, sweep[0])
    cold = time.perf_counter() - t0
    out = {"cold_first_result_seconds": cold, "cold_open_seconds": t_open,
           "import_seconds": spec.get("_import_seconds"), "points": [], "notes": []}
    deadline = time.perf_counter() + 1.5 * budget  # the shares overrun a little
    saturated = set()
    cut = []
    for sp in sweep:
        g = _group_key(sp)
        if g in saturated and not plan:
            continue
        # a planned point runs on exactly its queries, never cut by the clock
        limit = limits.get(json.dumps(sp, sort_keys=True), nq) if plan else nq
        if not plan and time.perf_counter() > deadline:
            out["notes"].append(f"time budget ({budget:.0f} s) spent: settings from {sp} on skipped")
            break
        warm = Q[: min(5, nq)]
        mod.search(h, warm if threads > 1 else warm[:1], k, sp)
        got = np.full((nq, k), -1, dtype=np.int64)
        st_acc = None
        done = 0
        # A system that counts on its own (stats_since) is asked once per
        # setting, outside the timed loop; others after every call.
        per_call = hasattr(mod, "stats") and not hasattr(mod, "stats_since")
        mark = mod.stats_mark(h, sp) if hasattr(mod, "stats_since") else None
        # A system whose ids are not positions (row ids, internal ids) may
        # hand back its own ids (search_ids) and map them after the clock
        # stops (ids_to_positions): the mapping is the benchmark's
        # bookkeeping, not part of a search.
        ids_fn = getattr(mod, "search_ids", None) if threads == 1 else None
        raw = []
        t = time.perf_counter()
        cap = float("inf") if plan else point_cap
        if ids_fn is not None:
            while done < limit:
                raw.append(ids_fn(h, Q[done:done + 1], k, sp))
                done += 1
                if done >= min_queries and done % 20 == 0 and time.perf_counter() - t > cap:
                    break
        elif threads == 1:
            while done < limit:
                got[done] = mod.search(h, Q[done:done + 1], k, sp)[0]
                if per_call:
                    st_acc = _add_stats(st_acc, mod.stats(h))
                done += 1
                if done >= min_queries and done % 20 == 0 and time.perf_counter() - t > cap:
                    break
        else:
            step = max(1, min(nq // 4, min_queries))  # batches of 100: the cap can act
            while done < limit:
                e = min(limit, done + step)
                got[done:e] = mod.search(h, Q[done:e], k, sp)
                if per_call:
                    st_acc = _add_stats(st_acc, mod.stats(h))
                done = e
                if done >= min_queries and time.perf_counter() - t > cap:
                    break
        el = time.perf_counter() - t
        if raw:
            got[:done] = mod.ids_to_positions(h, raw, k)
        if mark is not None:
            st_acc = mod.stats_since(h, sp, mark)
        rec = recall_at(got[:done], gt[:done], k)
        pt = {"setting": sp, "recall_at_10": rec, "qps": done / el if el > 0 else None,
              "queries_measured": done, "seconds": el}
        if st_acc:
            per_q = {f"{key}_per_query": v / done for key, v in st_acc.items()}
            pt.update(per_q)
            if "codes_scanned" in st_acc and el > 0:
                pt["codes_per_second"] = st_acc["codes_scanned"] / el
        out["points"].append(pt)
        if rec >= 0.998:
            saturated.add(g)
        if done < nq and not plan:
            cut.append(sp)
    if cut:
        out["notes"].append(f"{len(cut)} settings measured on fewer than all {nq} queries "
                            f"(point cap {point_cap:.0f} s), from {cut[0]}")
    return out


def _top(prof, total, n=10):
    """The n functions with the most own time, as (share, seconds, calls, name)."""
    import pstats

    st = pstats.Stats(prof)
    rows = []
    for (fn, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        short = f"{os.path.basename(fn)}:{line}({name})" if fn != "~" else name
        rows.append((tt, nc, short))
    rows.sort(reverse=True)
    return [{"share": tt / total if total else None, "seconds": tt, "calls": nc, "function": nm}
            for tt, nc, nm in rows[:n]]


def phase_profile(mod, data, spec):
    """cProfile of a build and of single-query searches at one setting: where the time goes."""
    import cProfile

    params, workdir, k = spec["params"], spec["workdir"], int(spec["k"])
    out = {}
    if spec.get("profile_build", True):
        if hasattr(mod, "prepare"):
            mod.prepare(data, params, workdir)
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        mod.build(data, params, workdir)
        prof.disable()
        took = time.perf_counter() - t
        out["build"] = {"seconds": took, "top": _top(prof, took)}
    h = mod.open(data, params, workdir)
    sp = spec["setting"]
    Q = np.ascontiguousarray(data.queries[: int(spec.get("profile_queries", 200))], dtype=np.float32)
    for i in range(min(5, Q.shape[0])):
        mod.search(h, Q[i:i + 1], k, sp)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for i in range(Q.shape[0]):
        mod.search(h, Q[i:i + 1], k, sp)
    prof.disable()
    took = time.perf_counter() - t
    out["search"] = {"setting": sp, "queries": int(Q.shape[0]), "seconds": took,
                     "ms_per_query": 1000 * took / max(1, Q.shape[0]), "top": _top(prof, took)}
    return out


def main(argv=None):
    argv = argv or sys.argv[1:]
    with open(argv[0]) as f:
        spec = json.load(f)
    result = {}
    try:
        t = time.perf_counter()
        from .datasets import open_data
        from .systems import load

        mod = load(spec["family"])
        why = mod.available()
        if why:
            raise RuntimeError(why)
        spec["_import_seconds"] = time.perf_counter() - t
        result["loadavg_start"] = os.getloadavg()[0]
        if hasattr(mod, "describe"):
            try:
                result["version"] = mod.describe()
            except Exception as e:
                result["version"] = f"unknown ({type(e).__name__}: {e})"
        if hasattr(mod, "set_threads"):
            mod.set_threads(int(spec["threads"]))
        data = open_data(spec["data_path"])
        phase = spec["phase"]
        if phase == "build":
            result.update(phase_build(mod, data, spec))
        elif phase == "build_dist":
            result.update(phase_build_dist(mod, data, spec))
        elif phase == "search":
            result.update(phase_search(mod, data, spec))
        elif phase == "check":
            h = mod.open(data, spec["params"], spec["workdir"])
            nq = int(spec["check_queries"])
            ids = mod.search(h, data.queries[:nq], int(spec["k"]), spec["setting"])
            result["recall_at_10"] = recall_at(ids, data.gt[:nq], int(spec["k"]))
        elif phase == "profile":
            result.update(phase_profile(mod, data, spec))
        else:
            raise ValueError(f"unknown phase {phase!r}")
    except BaseException as e:  # recorded, never raised to the parent
        result.update({"error": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": traceback.format_exc()[-4000:]})
    result["vm_hwm_bytes"] = _status_bytes("VmHWM")
    result["loadavg_end"] = os.getloadavg()[0]
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, default=_jsonable)
    os.replace(tmp, spec["out"])
    return 0


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
