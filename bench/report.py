"""Reading the rows: QPS at a recall (interpolated on each curve), the ratios the
issue asks for, the text summary and the recall/QPS plot."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

TARGETS = (0.90, 0.95, 0.99)
PEERS_FAST = ("pylance", "faiss")
# issue 13's targets, bitshard's best / the peer's best at the same recall:
# one thread, vs rabitqlib and vs the best of pylance and FAISS, at every
# recall target; all cores (batch), vs rabitqlib at 0.90 and 0.95 only.
TARGET_VS_RABITQLIB = {1: 1.3, "all": 1.2}
TARGET_VS_PYLANCE_FAISS = {1: 3.0}
ALL_CORES_TARGETS = (0.90, 0.95)
NOT_REACHED = "not reached"
BEATEN = "not reached (beaten)"


def _target(table: dict, threads: int, recall: float) -> Optional[float]:
    if threads == 1:
        return table.get(1)
    return table.get("all") if recall in ALL_CORES_TARGETS else None


CUT = "not measured (sweep cut by the time budget)"
CUT_MARK = "spent: settings from"  # the worker's note when the budget cut a sweep


def ratio_cell(bs: Optional[float], peer: Optional[float], peer_cut: bool = False,
               bs_cut: bool = False) -> str:
    """bitshard's QPS over the peer's at one recall: a peer whose curve never
    reaches the recall while bitshard's does is beaten there, unless the time
    budget cut the peer's sweep before its last settings (``peer_cut``): then
    the recall was not measured and nobody is beaten."""
    if bs and peer:
        return f"{bs / peer:.2f}x"
    if bs:
        return "peer " + (CUT if peer_cut else BEATEN)
    if peer:
        return "bitshard " + (CUT if bs_cut else NOT_REACHED)
    return "neither reaches"


def cut_short(curves, at, fams, t) -> bool:
    """Whether a system of ``fams`` misses recall t only because the budget cut
    its sweep (so that it might have reached it)."""
    return any(c["family"] in fams and c["cut"] and not at[n][t] for n, c in curves.items())


def frontier(points: Iterable[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The recall/QPS Pareto front, by recall ascending (QPS then descending)."""
    pts = sorted({(r, q) for r, q in points if r is not None and q and q > 0},
                 key=lambda p: (-p[0], -p[1]))
    front, best_q = [], -1.0
    for r, q in pts:  # from the highest recall down: keep points faster than all above
        if q > best_q:
            front.append((r, q))
            best_q = q
    return sorted(front)


def qps_at(points: Iterable[Tuple[float, float]], target: float) -> Optional[float]:
    """QPS at recall ``target`` on the curve: log-QPS interpolated linearly in recall
    between the two front points around it; the fastest point above the target
    when none is below; None when the curve never reaches it."""
    front = frontier(points)
    if not front or front[-1][0] < target:
        return None
    above = [p for p in front if p[0] >= target]
    below = [p for p in front if p[0] < target]
    hi = above[0]
    if not below or hi[0] == target:
        return hi[1]
    lo = below[-1]
    w = (target - lo[0]) / (hi[0] - lo[0])
    return math.exp(math.log(lo[1]) + w * (math.log(hi[1]) - math.log(lo[1])))


def setting_at(rows: List[dict], target: float) -> dict:
    """The fastest row whose recall reaches target; the closest one if none does."""
    ok = [r for r in rows if (r.get("recall_at_10") or 0) >= target and r.get("qps")]
    if ok:
        return max(ok, key=lambda r: r["qps"])
    return min(rows, key=lambda r: abs((r.get("recall_at_10") or 0) - target))


def _fmt(x, nd=0, unit=""):
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "-"
    return f"{x:,.{nd}f}{unit}"


def _curves(rows, dataset, threads) -> "OrderedDict[str, dict]":
    out: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        if r.get("dataset") != dataset or r.get("threads") != threads:
            continue
        c = out.setdefault(r["system"], {"family": r.get("family"), "points": [], "row": r,
                                         "cut": False})
        if any(CUT_MARK in n for n in r.get("notes") or []):
            c["cut"] = True
        if r.get("recall_at_10") is not None and r.get("qps"):
            c["points"].append((r["recall_at_10"], r["qps"]))
    return out


def _build_rows(rows, dataset) -> Dict[str, dict]:
    out = {}
    for r in rows:
        if r.get("dataset") == dataset and r["system"] not in out:
            out[r["system"]] = r
    return out


def _short(ratio: Optional[float], target: float, bs: Optional[float] = 1.0) -> str:
    """" SHORT by ..." when a ratio misses its target; bitshard not reaching the
    recall (``bs`` None) misses it whatever the peer does."""
    if not bs:
        return " SHORT (bitshard does not reach this recall)"
    if ratio is None or ratio >= target:
        return ""
    return f" SHORT by {target / ratio:.2f}x"


def summarize(rows: List[dict], profiles: Optional[List[dict]] = None) -> Tuple[str, List[dict]]:
    """The text summary, and one dict per (dataset) of the headline ratios."""
    lines, heads = [], []
    run = next((r.get("run") for r in rows if r.get("run")), None) or {}
    datasets = list(OrderedDict((r["dataset"], None) for r in rows if r.get("dataset")))
    for ds in datasets:
        some = next(r for r in rows if r.get("dataset") == ds)
        d, n = some.get("dim"), some.get("rows")
        lines.append("")
        if n is None:
            # the set could not be prepared (a missing package, a download):
            # its failure row says why, and the other sets still get a summary
            notes = "; ".join(some.get("notes") or []) or "no rows"
            lines.append(f"== {ds}: not measured: {notes} ==")
            heads.append({"dataset": ds, "dim": d, "rows": n})
            continue
        lines.append(f"== {ds}: {n:,} x {d}, {some.get('partitions')} partitions, "
                     f"{some.get('queries')} queries, k=10 ==")
        builds = _build_rows(rows, ds)
        thread_set = sorted({r["threads"] for r in rows if r.get("dataset") == ds
                             and r.get("threads") is not None})
        head = {"dataset": ds, "dim": d, "rows": n}
        for th in thread_set:
            _thread_lines(rows, ds, th, builds, head, lines)
        _build_lines(builds, n, d, some, head, lines)
        _stage_lines(rows, ds, profiles, head, lines)
        heads.append(head)
    versions = OrderedDict((r.get("version"), None) for r in rows if r.get("version"))
    env = next((r.get("env") for r in rows if r.get("env")), None)
    if env or versions:
        lines.insert(0, f"machine: {env or '?'}; " + "; ".join(versions))
    loads = [max(r.get("loadavg_build") or 0, r.get("loadavg_search") or 0) for r in rows]
    if loads and max(loads) > 0:
        lines.insert(1, f"load average seen during the run: up to {max(loads):.1f} "
                        "(rows with a load above the core count carry a note)")
    if run.get("command"):
        lines.insert(1, f"command: {run['command']} ({run.get('runs')} runs per point, "
                        f"{(run.get('wall_seconds') or 0) / 60:.1f} min)")
    if run.get("skipped_by_budget"):
        lines.append("")
        lines.append(f"== skipped to keep the time budget ({run.get('budget_min'):g} min) ==")
        lines.extend(run["skipped_by_budget"])
    failures = [r for r in rows if r.get("recall_at_10") is None and r.get("notes")]
    if failures:
        lines.append("")
        lines.append("== failures and skips ==")
        seen = set()
        for r in failures:
            key = (r.get("dataset"), r["system"], r.get("threads"))
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"{r.get('dataset')} {r['system']} threads={r.get('threads')}: "
                         + " | ".join(r["notes"])[:400])
    return "\n".join(lines), heads


def best_at(curves, at, fams, t) -> Tuple[Optional[float], Optional[str]]:
    """The fastest of the families' systems at recall t, and its name."""
    cand = [(v[t], name) for name, v in at.items() if curves[name]["family"] in fams and v[t]]
    return max(cand) if cand else (None, None)


def _thread_lines(rows, ds, th, builds, head, lines) -> None:
    """The table and the ratio lines of one dataset at one thread count."""
    curves = _curves(rows, ds, th)
    lines.append(f"-- threads={th} --")
    lines.append(f"{'system':30s} {'QPS@0.90':>11s} {'QPS@0.95':>11s} {'QPS@0.99':>11s} "
                 f"{'max rec':>7s} {'build s':>7s} {'B/vec':>7s} {'RSS MB':>7s} "
                 f"{'cold s':>6s} {'load before->after per run':>s}")
    at: Dict[str, Dict[float, Optional[float]]] = {}
    for name, c in curves.items():
        at[name] = {t: qps_at(c["points"], t) for t in TARGETS}
        b = builds.get(name, {})
        mx = max((p[0] for p in c["points"]), default=None)
        cells = [_fmt(at[name][t]) if at[name][t] else
                 (("cut" if c["cut"] else "n/r") if c["points"] else "-") for t in TARGETS]
        lines.append(
            f"{name:30s} {cells[0]:>11s} {cells[1]:>11s} {cells[2]:>11s} "
            f"{_fmt(mx, 3):>7s} {_fmt(b.get('build_seconds'), 1):>7s} "
            f"{_fmt(b.get('bytes_per_vector'), 1):>7s} "
            f"{_fmt((b.get('peak_rss_bytes') or 0) / 2**20 if b.get('peak_rss_bytes') else None, 0):>7s} "
            f"{_fmt(c['row'].get('cold_first_result_seconds'), 2):>6s} "
            f"{_loads(c['row'].get('loadavg_runs'))}")
    lines.append("(QPS: median of the runs, interpolated on each system's recall/QPS front; "
                 "n/r = the curve never reaches that recall, which counts as beaten; cut = not "
                 "reached before the time budget cut the sweep, so not measured)")
    for t in TARGETS:
        bs, bsn = best_at(curves, at, ("bitshard",), t)
        pf, pfn = best_at(curves, at, PEERS_FAST, t)
        rq, rqn = best_at(curves, at, ("rabitqlib",), t)
        r1 = bs / pf if bs and pf else None
        r2 = bs / rq if bs and rq else None
        t_pf = _target(TARGET_VS_PYLANCE_FAISS, th, t)
        t_rq = _target(TARGET_VS_RABITQLIB, th, t)
        have_pf = any(curves[n]["family"] in PEERS_FAST for n in curves)
        have_rq = any(curves[n]["family"] == "rabitqlib" for n in curves)
        bcut = cut_short(curves, at, ("bitshard",), t)
        rcut = cut_short(curves, at, ("rabitqlib",), t)
        pcut = cut_short(curves, at, PEERS_FAST, t)
        parts = [f"recall {t:.2f}: bitshard best {_fmt(bs)} ({bsn or NOT_REACHED})"]
        if have_rq:
            parts.append(f"rabitqlib {_fmt(rq)} ({rqn or NOT_REACHED}) -> "
                         f"{ratio_cell(bs, rq, rcut, bcut)}"
                         + (f" [target >= {t_rq}x]{_short(r2, t_rq, bs)}" if t_rq else ""))
        if have_pf:
            parts.append(f"best pylance/FAISS {_fmt(pf)} ({pfn or NOT_REACHED}) -> "
                         f"{ratio_cell(bs, pf, pcut, bcut)}"
                         + (f" [target >= {t_pf}x]{_short(r1, t_pf, bs)}" if t_pf else ""))
        lines.append("; ".join(parts))
        head[f"t{th}_r{int(round(t * 100))}"] = {
            "bitshard": bs, "bitshard_system": bsn,
            "best_pylance_faiss": pf, "peer_system": pfn, "ratio_vs_pylance_faiss": r1,
            "vs_pylance_faiss": ratio_cell(bs, pf, pcut, bcut) if have_pf else None,
            "rabitqlib": rq, "rabitqlib_system": rqn, "ratio_vs_rabitqlib": r2,
            "vs_rabitqlib": ratio_cell(bs, rq, rcut, bcut) if have_rq else None}


def _loads(runs) -> str:
    if not runs:
        return "-"
    return " ".join(f"{a:.1f}->{b:.1f}" for a, b in runs)


def _build_lines(builds, n, d, some, head, lines) -> None:
    """Build throughput against pylance, and the 1-bit index size."""
    # build throughput and size
    for bits in (1, 4, 9):
        b, p = builds.get(f"bitshard-{bits}bit"), builds.get(f"pylance-ivfrq-{bits}bit")
        if b and p:
            for key, what in (("build_seconds", "single process"),
                              ("build_seconds_distributed", "distributed")):
                if b.get(key) and p.get(key):
                    ratio = p[key] / b[key]
                    lines.append(f"build throughput {bits}-bit ({what}): bitshard "
                                 f"{n / b[key]:,.0f} rows/s vs pylance {n / p[key]:,.0f} "
                                 f"rows/s -> {ratio:.2f}x [target >= 2x]{_short(ratio, 2.0)}")
                    head[f"build_ratio_{bits}bit_{'dist' if 'dist' in key else 'single'}"] = ratio
    b1 = builds.get("bitshard-1bit")
    if b1 and b1.get("bytes_per_vector") and d:
        target = d / 8 + 16
        over = b1["bytes_per_vector"] - target
        lines.append(f"bitshard-1bit index: {b1['bytes_per_vector']:.1f} bytes/vector vs target "
                     f"d/8+16 = {target:.0f} -> {b1['bytes_per_vector'] / target:.2f}x of target"
                     + (f"  SHORT: {over:.1f} bytes/vector over" if over > 0 else "")
                     + (f" (the IVF centroids alone, P x d float32, are "
                        f"{some.get('partitions') * d * 4 / n:.1f} bytes/vector at this size)"
                        if some.get("partitions") and n else ""))
        head["bitshard_1bit_bytes_per_vector"] = b1["bytes_per_vector"]
        head["target_bytes_per_vector"] = target


def _stage_lines(rows, ds, profiles, head, lines) -> None:
    """bitshard's staged-scan counts near recall 0.90, and its profiles."""
    # stage counts of bitshard near recall 0.9 (single thread)
    for r in rows:
        if r.get("dataset") == ds and r.get("family") == "bitshard" and r.get("threads") == 1 \
                and r.get("codes_scanned_per_query") is not None:
            head.setdefault("_stage_rows", []).append(r)
    st = head.pop("_stage_rows", [])
    if st:
        lines.append("bitshard staged scan (threads=1, the fastest setting reaching recall 0.90, "
                     "per variant):")
        for name in OrderedDict((r["system"], None) for r in st):
            r = setting_at([r for r in st if r["system"] == name], 0.90)
            lines.append(
                f"  {name}: nprobes={r.get('nprobes')} refine={r.get('refine')} "
                f"recall={_fmt(r.get('recall_at_10'), 3)}: codes scanned/query "
                f"{_fmt(r.get('codes_scanned_per_query'))}, stage 2 "
                f"{_fmt(r.get('codes_stage2_per_query'), 1)}, reranked "
                f"{_fmt(r.get('candidates_per_query'), 1)}; "
                f"{_fmt((r.get('codes_per_second') or 0) / 1e6, 1)} M codes/s end to end")
    for pr in profiles or []:
        if pr.get("dataset") != ds:
            continue
        lines.append(f"profile of {pr['system']}:")
        if pr.get("build"):
            b = pr["build"]
            lines.append(f"  build {b['seconds']:.1f} s: " + "; ".join(
                f"{e['function']} {100 * (e['share'] or 0):.0f}%" for e in b["top"][:4]))
        sr = pr.get("search") or {}
        if sr:
            lines.append(f"  search {sr['ms_per_query']:.2f} ms/query at {sr['setting']} "
                         f"(recall {pr.get('recall_at_setting', float('nan')):.3f}): " + "; ".join(
                             f"{e['function']} {100 * (e['share'] or 0):.0f}%"
                             for e in sr["top"][:6]))


COLORS = {"bitshard": ["#d62728", "#ff7f0e", "#8c564b", "#e377c2"],
          "pylance": ["#1f77b4", "#17becf", "#6baed6"],
          "faiss": ["#2ca02c", "#98df8a", "#006d2c", "#bcbd22", "#74c476", "#31a354"],
          "rabitqlib": ["#9467bd", "#c5b0d5", "#54278f"],
          "brute": ["#000000"]}


def plot(rows: List[dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # pragma: no cover
        return f"no plot: {e}"
    panels = list(OrderedDict(((r["dataset"], r["threads"]), None) for r in rows
                              if r.get("recall_at_10") is not None and r.get("qps")))
    if not panels:
        return "no plot: no measured points"
    ncol = min(2, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(7.5 * ncol, 5.2 * nrow), squeeze=False)
    for ax, (ds, th) in zip(axes.flat, panels):
        used: Dict[str, int] = {}
        curves = _curves(rows, ds, th)
        for name, c in curves.items():
            pts = sorted(c["points"], key=lambda p: p[1])
            if not pts:
                continue
            fam = c["family"] or "brute"
            i = used.get(fam, 0)
            used[fam] = i + 1
            col = COLORS.get(fam, ["#7f7f7f"])[i % len(COLORS.get(fam, ["#7f7f7f"]))]
            front = frontier(pts)
            ls = "-" if fam == "bitshard" else "--"
            lw = 2.2 if fam == "bitshard" else 1.3
            ax.plot([p[1] for p in front], [p[0] for p in front], ls, color=col, lw=lw,
                    marker="o", ms=3.5, label=name)
            ax.scatter([p[1] for p in pts], [p[0] for p in pts], s=6, color=col, alpha=0.35)
            # the whole curve: every setting, by nprobes within each reranking setting
            groups: Dict[str, List[Tuple[float, float, float]]] = {}
            for r in rows:
                if (r.get("dataset") == ds and r.get("threads") == th and r["system"] == name
                        and r.get("recall_at_10") is not None and r.get("qps")):
                    g = str({k: v for k, v in (r.get("search_params") or {}).items()
                             if k != "nprobes"})
                    groups.setdefault(g, []).append((r.get("nprobes") or 0, r["qps"],
                                                     r["recall_at_10"]))
            for g in groups.values():
                g.sort()
                ax.plot([x[1] for x in g], [x[2] for x in g], "-", color=col, lw=0.6, alpha=0.35)
        ax.set_xscale("log")
        ax.set_xlabel("queries per second (log)")
        ax.set_ylabel("recall@10")
        some = next(r for r in rows if r.get("dataset") == ds)
        ax.set_title(f"{ds} ({some.get('rows'):,} x {some.get('dim')}), "
                     f"{'1 thread' if th == 1 else f'{th} threads (batch)'}; "
                     "bold: front, thin: all settings")
        for t in TARGETS:
            ax.axhline(t, color="#999999", lw=0.6, ls=":")
        ax.grid(True, which="both", alpha=0.25)
        ax.set_ylim(max(0.0, min([p[0] for c in curves.values() for p in c["points"]] + [0.9]) - 0.02),
                    1.005)
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def markdown(rows: List[dict]) -> str:
    """The headline tables in Markdown (for bench/README.md): per dataset and
    thread count, every system's QPS at each recall target, then bitshard's
    best against rabitqlib's and against the best of pylance and FAISS."""
    out = []
    run = next((r.get("run") for r in rows if r.get("run")), None) or {}
    datasets = list(OrderedDict((r["dataset"], None) for r in rows if r.get("dataset")))
    for ds in datasets:
        some = next(r for r in rows if r.get("dataset") == ds)
        if some.get("rows") is None:
            continue
        builds = _build_rows(rows, ds)
        for th in sorted({r["threads"] for r in rows if r.get("dataset") == ds
                          and r.get("threads") is not None}):
            curves = _curves(rows, ds, th)
            if not any(c["points"] for c in curves.values()):
                continue
            out.append(f"**{ds}** ({some['rows']:,} x {some['dim']}, {some.get('partitions')} "
                       f"partitions, {some.get('queries')} queries, k = 10), "
                       f"{'one thread' if th == 1 else f'{th} threads (batch)'}:")
            out.append("")
            out.append("| system | QPS@0.90 | QPS@0.95 | QPS@0.99 | max recall | build s | "
                       "B/vector | load 1-min before->after, per run |")
            out.append("|---|---|---|---|---|---|---|---|")
            at = {}
            for name, c in curves.items():
                at[name] = {t: qps_at(c["points"], t) for t in TARGETS}
                b = builds.get(name, {})
                mx = max((p[0] for p in c["points"]), default=None)
                cells = [_fmt(at[name][t]) if at[name][t] else
                         (("not measured (budget)" if c["cut"] else NOT_REACHED) if c["points"] else "-")
                         for t in TARGETS]
                note = "" if c["points"] else " (" + "; ".join(c["row"].get("notes") or [])[:80] + ")"
                out.append(f"| {name}{note} | " + " | ".join(cells)
                           + f" | {_fmt(mx, 3)} | {_fmt(b.get('build_seconds'), 1)} | "
                           f"{_fmt(b.get('bytes_per_vector'), 1)} | "
                           f"{_loads(c['row'].get('loadavg_runs'))} |")
            out.append("")
            out.append("| recall | bitshard best | rabitqlib best | bitshard / rabitqlib | "
                       "best of pylance, FAISS | bitshard / pylance-FAISS |")
            out.append("|---|---|---|---|---|---|")
            for t in TARGETS:
                bs, bsn = best_at(curves, at, ("bitshard",), t)
                rq, rqn = best_at(curves, at, ("rabitqlib",), t)
                pf, pfn = best_at(curves, at, PEERS_FAST, t)
                t_rq = _target(TARGET_VS_RABITQLIB, th, t)
                t_pf = _target(TARGET_VS_PYLANCE_FAISS, th, t)

                def cell(q, n):
                    return f"{_fmt(q)} ({n})" if q else NOT_REACHED

                bcut = cut_short(curves, at, ("bitshard",), t)
                rcut = cut_short(curves, at, ("rabitqlib",), t)
                pcut = cut_short(curves, at, PEERS_FAST, t)
                out.append(f"| {t:.2f} | {cell(bs, bsn)} | {cell(rq, rqn)} | "
                           f"{ratio_cell(bs, rq, rcut, bcut)}"
                           + (f" (target {t_rq}x)" if t_rq else "")
                           + f" | {cell(pf, pfn)} | {ratio_cell(bs, pf, pcut, bcut)}"
                           + (f" (target {t_pf}x)" if t_pf else "") + " |")
            out.append("")
    if run.get("skipped_by_budget"):
        out.append(f"Skipped to keep the time budget ({run.get('budget_min'):g} min): "
                   + "; ".join(run["skipped_by_budget"]) + ".")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    """``python -m bench.report bench/results/latest.json``: redo the summary and the
    plot from saved rows (and ``*-profile.json`` beside them, if any)."""
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser(prog="python -m bench.report")
    ap.add_argument("rows", help="a results JSON written by python -m bench")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    with open(a.rows) as f:
        rows = json.load(f)
    stem = os.path.splitext(a.rows)[0]
    profiles = []
    if os.path.exists(stem + "-profile.json"):
        with open(stem + "-profile.json") as f:
            profiles = json.load(f)
    text, heads = summarize(rows, profiles)
    with open(stem + "-summary.txt", "w") as f:
        f.write(text.lstrip() + "\n")
    with open(stem + "-summary.json", "w") as f:
        json.dump(heads, f, indent=1, default=str)
    with open(stem + "-summary.md", "w") as f:
        f.write(markdown(rows))
    if not a.no_plot:
        err = plot(rows, stem + ".png")
        if err:
            print(err)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
