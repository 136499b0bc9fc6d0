"""Where a query spends its time, in instructions (callgrind), stage by stage.

Wall-clock profiles are worthless on a loaded shared machine; instruction
counts are not. Three steps (the exact commands are in bench/README.md):

    python -m bench.qprofile build --dataset fashion-mnist --bits 9 --workdir W
    valgrind --tool=callgrind --zero-before=getppid --dump-before=getpgrp \\
        --callgrind-out-file=W/cg-9-64.out \\
        python -m bench.qprofile run --dataset fashion-mnist --bits 9 --workdir W --nprobes 64
    python -m bench.qprofile table W/cg-9-64.out.1 --stats W/stats-9-64.json

``run`` answers ``--queries`` queries one at a time through a prepared
searcher (``ds.searcher``, as the harness's single-thread loop does), after
one warm-up query that probes every partition (so the lazy first-touch
check of each partition is not in the loop) and one at the measured setting; it calls ``os.getppid()`` just before the loop and
``os.getpgrp()`` just after, so callgrind zeroes its counters on the first and
dumps on the second: the dump (``<out>.1``) holds exactly the timed loop,
Python included. The searcher's own counters (codes per stage) go to
``--stats``.

``table`` splits that dump into stages. Every instruction executed by a
function defined in src/search.c (bs_search and whatever the compiler left
out of line) is charged by its source line to the enclosing function
(inlined code keeps its own file and line in the debug info), and a call made
from there to another function is charged whole (inclusive) to a stage named
after the callee, or else after the calling function. Everything outside
bs_search is "Python + numpy" (the searcher's Python code, the interpreter, the
result arrays and, for 1 bit, the Python side of the exact rerank), except the
rerank's own C calls (exact_distances, rerank_gate). The library must be built
with debug info for the line split: ``CFLAGS=-g pip install --no-build-isolation
--no-deps --target DIR .`` (the same -O3 code as a release build) and
``PYTHONPATH=DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

# enclosing function (in src/) -> stage
STAGE_OF_FUNCTION = {
    "bs_search": "driver",
    "check_search_args": "query checks + rotation",
    "query_ctx_init": "driver",
    "reserve_scratch": "driver",
    "prepare_query": "query checks + rotation",
    "probe_prepare": "per-probe terms",
    "probe_tables": "per-probe terms",
    "scan_probe": "per-probe terms",
    "probe_query": "per-probe terms",
    "touch_partition": "candidate filtering",
    "scan_partition": "candidate filtering",
    "pass_mask": "candidate filtering",
    "bs_heap_push_bounded": "candidate filtering",
    "bs_f1_from": "candidate filtering",
    "keep_under_threshold": "candidate filtering",
    "bs_grow": "candidate filtering",
    "refine_extra_bits": "stage-2 extra bits",
    "prefetch_extra": "stage-2 extra bits",
    "prefetch_read": "stage-2 extra bits",
    "cand_partition": "stage-2 extra bits",
    "full_estimate": "stage-2 extra bits",
    "nibble_tables": "stage-2 extra bits",
    "fastscan_code_dot": "stage-2 extra bits",
    "plane_dot": "stage-2 extra bits",
    "resolve_rowid": "row-id lookups",
    "bs_segment_rowid": "row-id lookups",
    "keep_top_estimates": "top-k by estimate",
    "emit": "sort + emit",
}
# calls whose stage depends on the caller: since 5071307 the query's one
# lookup table (of qt = Pq - Pm, through bs_residual_*) is built in
# prepare_query, and bs_residual_* is also each probe's q' (probe_prepare)
STAGE_OF_CALL_IN = {
    ("prepare_query", "bs_residual"): "query table",
    ("prepare_query", "bs_query_lut_build"): "query table",
}
# inlined code whose lines are in a header outside any function we can map:
# in search.c the SSE intrinsics are pass_mask's four-at-a-time threshold
# test (stage 1's filter) and rabitq.h's is bs_f1_from (the bound of a
# candidate); prefetch_read is the only other user and counts little.
STAGE_OF_HEADER = {
    "xmmintrin.h": "candidate filtering",
    "emmintrin.h": "candidate filtering",
    "rabitq.h": "candidate filtering",
}
# callee symbol (prefix) -> stage, for calls out of search.c
STAGE_OF_CALLEE = [
    ("bs_fastscan_", "stage-1 scan"),
    ("bs_lower_bounds", "lower bounds"),
    ("bs_choose_probes", "probe selection"),
    ("bs_probe", "probe selection"),
    ("approx_keys", "probe selection"),
    ("bs_rotation", "query checks + rotation"),
    ("bs_query_lut_build", "query table"),
    ("bs_lut_fill", "query table"),
    ("bs_lut_sums", "query table"),
    ("bs_residual", "per-probe terms"),
    ("bs_segment_check_partition", "candidate filtering"),
    ("bs_segment_partition", "candidate filtering"),
    ("bs_segment_rowid", "row-id lookups"),
    ("bs_sort_best", "sort + emit"),
    ("sort_cands", "sort + emit"),
]
STAGE_ORDER = ["probe selection", "query checks + rotation", "query table", "per-probe terms",
               "stage-1 scan",
               "lower bounds", "candidate filtering", "stage-2 extra bits", "row-id lookups",
               "top-k by estimate", "sort + emit", "driver", "other C in bs_search",
               "exact rerank (C)", "Python + numpy", "total"]


# ------------------------------------------------------------------- workload

#: Queries of the harness's datasets (``python -m bench`` prepares them with
#: 1000): ``run`` measures the first ``--queries`` and warms up on the next.
HARNESS_QUERIES = 1000


def _dataset(spec: str, queries: int):
    """The harness's cached dataset, prepared with its 1000 queries; the
    first ``queries`` (at most 999) are measured, the next one warms up.

    Asking ``prepare`` for more queries would make another dataset (a text
    set's base starts after its queries, so its rows shift by one) that an
    index built by ``build`` from the 1000-query one does not match: its
    recall came out 0.0001."""
    from .datasets import default_cache_dir, prepare

    if not 1 <= queries < HARNESS_QUERIES:
        raise SystemExit(f"--queries {queries}: use 1 to {HARNESS_QUERIES - 1} (the harness's "
                         f"datasets have {HARNESS_QUERIES} queries and one more warms up)")
    return prepare(spec, None, HARNESS_QUERIES, default_cache_dir(), 0, log=lambda *a: None)


def cmd_build(a) -> int:
    if a.system == "rabitqlib":
        from .systems import rabitqlib_sys

        data = _dataset(a.dataset, a.queries)
        wd = os.path.join(a.workdir, f"rabitqlib-{a.bits}bit")
        os.makedirs(wd, exist_ok=True)
        rabitqlib_sys.build(data, {"num_bits": a.bits, "partitions": a.partitions}, wd)
        return 0
    import bitshard

    data = _dataset(a.dataset, a.queries)
    src = np.load(data.base_npy, mmap_mode="r")
    uri = os.path.join(a.workdir, f"index-{a.bits}bit")
    ds = bitshard.dataset(src, index_uri=uri, fragment_size=data.fragment_rows)
    t = time.perf_counter()
    ds.create_index("vector", "IVF_RQ", name="idx", num_partitions=a.partitions,
                    num_bits=a.bits, metric="l2")
    print(f"built {uri} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return 0


def _run_rabitqlib(a) -> int:
    """The same loop over rabitqlib's IvfIndex.search (one query per call,
    one thread, its default estimator), for the instruction count per query."""
    from .systems import rabitqlib_sys

    data = _dataset(a.dataset, a.queries)
    wd = os.path.join(a.workdir, f"rabitqlib-{a.bits}bit")
    h = rabitqlib_sys.open(data, {"num_bits": a.bits}, wd)
    sp = {"nprobes": a.nprobes}
    Q = np.ascontiguousarray(data.queries[:a.queries + 1], dtype=np.float32)
    rabitqlib_sys.search_ids(h, Q[a.queries:a.queries + 1], a.k, sp)
    raw = []
    os.getppid()  # callgrind: --zero-before=getppid
    for i in range(a.queries):
        raw.append(rabitqlib_sys.search_ids(h, Q[i:i + 1], a.k, sp))
    os.getpgrp()  # callgrind: --dump-before=getpgrp
    pos = rabitqlib_sys.ids_to_positions(h, raw, a.k)
    hits = sum(len(set(pos[i]) & set(data.gt[i, :a.k])) for i in range(a.queries))
    out = {"dataset": data.name, "system": "rabitqlib", "bits": a.bits, "nprobes": a.nprobes,
           "k": a.k, "queries": a.queries, "partitions": a.partitions,
           "recall_at_k": hits / (a.k * a.queries), "per_query": {}}
    if a.stats:
        with open(a.stats, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out), file=sys.stderr)
    return 0


def cmd_run(a) -> int:
    if a.system == "rabitqlib":
        return _run_rabitqlib(a)
    import bitshard

    data = _dataset(a.dataset, a.queries)
    src = np.load(data.base_npy, mmap_mode="r")
    uri = os.path.join(a.workdir, f"index-{a.bits}bit")
    ds = bitshard.dataset(src, index_uri=uri, fragment_size=data.fragment_rows)
    Q = np.ascontiguousarray(data.queries[:a.queries + 1], dtype=np.float32)
    # Every partition is checked the first time a search touches it
    # (docs/format.md, "Validation"): a one-time cost per opened index, which
    # one search probing all of them pays here, outside the measured loop,
    # as a long-running searcher has.
    ds.searcher("vector", k=a.k, nprobes=a.partitions).search(Q[a.queries])
    s = ds.searcher("vector", k=a.k, nprobes=a.nprobes)
    s.search(Q[a.queries])  # warm-up: not one of the measured queries
    before = dict(s.stats)
    got = np.empty((a.queries, a.k), dtype=np.uint64)
    os.getppid()  # callgrind: --zero-before=getppid
    for i in range(a.queries):
        got[i] = s.search(Q[i])[0]
    os.getpgrp()  # callgrind: --dump-before=getpgrp
    after = dict(s.stats)
    fr = data.fragment_rows
    pos = (got >> np.uint64(32)).astype(np.int64) * fr + (got & np.uint64(0xFFFFFFFF)).astype(np.int64)
    hits = sum(len(set(pos[i]) & set(data.gt[i, :a.k])) for i in range(a.queries))
    out = {"dataset": data.name, "bits": a.bits, "nprobes": a.nprobes, "k": a.k,
           "queries": a.queries, "partitions": a.partitions,
           "recall_at_k": hits / (a.k * a.queries),
           "per_query": {key: (after[key] - before.get(key, 0)) / a.queries for key in after},
           "bitshard": bitshard.__version__, "kernel": bitshard.simd_level()}
    if a.stats:
        with open(a.stats, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out), file=sys.stderr)
    return 0


# -------------------------------------------------------------------- parsing

def function_ranges(path: str) -> List[Tuple[int, int, str]]:
    """(first line, last line, name) of each function defined in a C file."""
    out = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    head = re.compile(r"^[A-Za-z_][\w\s\*]*?\b(\w+)\s*\(")
    i = 0
    while i < len(lines):
        ln = lines[i]
        m = head.match(ln)
        if m and not ln.startswith(("typedef", "struct", "#")):
            j, opened = i, False
            while j < len(lines):
                opened = opened or "{" in lines[j]
                if not opened and lines[j].rstrip().endswith(";"):
                    break  # a prototype
                if lines[j] == "}":
                    out.append((i + 1, j + 1, m.group(1)))
                    break
                j += 1
            i = j + 1
            continue
        i += 1
    return out


class _Ranges:
    def __init__(self, src: str):
        self.src = src
        self.cache: Dict[str, List[Tuple[int, int, str]]] = {}

    def name(self, file: str, line: int) -> Optional[str]:
        base = os.path.basename(file)
        if base not in self.cache:
            self.cache[base] = function_ranges(os.path.join(self.src, base))
        for a, b, n in self.cache[base]:
            if a <= line <= b:
                return n
        return None


def dump_summary(path: str) -> Optional[int]:
    """The ``summary:`` line of a callgrind dump: the instructions executed
    between the zeroing and the dump. The sum of the dump's cost lines
    (``totals:``) can be larger: the dump after ``--zero-before`` also
    carries cost of the Python frames that were running when the counters
    were zeroed (about 22k a query in a 200-query loop at nprobes 8 on
    WordNet, 4.4M in all), so the total and "Python + numpy" come from the
    summary."""
    with open(path, errors="replace") as f:
        for ln in f:
            if ln.startswith("summary:"):
                return int(ln.split()[1])
            if ln.startswith(("fn=", "fl=", "ob=")):
                break
    return None


def parse_callgrind(path: str):
    """Self costs and call costs of a callgrind dump (--dump-instr=no, first event).

    Yields records (kind, fn_file, file, fn, line, cost, callee) with kind
    "self" or "call" (the inclusive cost of a call made from that line);
    fn_file is the file the function is in, file the line's own (an inlined
    function's)."""
    names = {"fl": {}, "fn": {}, "ob": {}}
    alias = {"fi": "fl", "fe": "fl", "cfi": "fl", "cfl": "fl", "cfn": "fn", "cob": "ob"}
    cur = {"ob": "", "fl": "", "fi": "", "fn": "", "fnfl": ""}
    callee = None
    pending_call = False
    last = 0
    with open(path, errors="replace") as f:
        for raw in f:
            ln = raw.rstrip("\n")
            if not ln:
                continue
            c0 = ln[0]
            if c0.isdigit() or c0 in "+-*":
                parts = ln.split()
                p = parts[0]
                if p == "*":
                    pos = last
                elif p[0] in "+-":
                    pos = last + int(p)
                else:
                    pos = int(p)
                last = pos
                cost = int(parts[1]) if len(parts) > 1 else 0
                if pending_call:
                    yield ("call", cur["fnfl"], cur["fi"], cur["fn"], pos, cost, callee)
                    pending_call = False
                else:
                    yield ("self", cur["fnfl"], cur["fi"], cur["fn"], pos, cost, None)
                continue
            m = re.match(r"^(\w+)=(.*)$", ln)
            if not m:
                continue
            key, val = m.group(1), m.group(2)
            if key == "calls":
                pending_call = True
                continue
            kind = alias.get(key, key)
            if kind not in names:
                continue
            mm = re.match(r"^\((\d+)\)(?:\s+(.*))?$", val)
            if mm:
                idx, nm = mm.group(1), mm.group(2)
                if nm is not None:
                    names[kind][idx] = nm
                val = names[kind].get(idx, idx)
            if key == "fn":
                cur["fn"] = val
                cur["fi"] = cur["fl"]
                cur["fnfl"] = cur["fl"]
            elif key == "fl":
                cur["fl"] = val
                cur["fi"] = val
            elif key in ("fi", "fe"):
                cur["fi"] = val
            elif key == "ob":
                cur["ob"] = val
            elif key == "cfn":
                callee = val


def stage_table(path: str, src: str = SRC, detail: Optional[Dict] = None) -> Dict[str, int]:
    """Instructions per stage over the whole dump (see the module docstring);
    ``detail`` (a dict) also gets them per (stage, function or callee)."""
    ranges = _Ranges(src)
    search_fns = set()
    recs = list(parse_callgrind(path))
    # functions whose body is in search.c (bs_search and its out-of-line helpers)
    total = sum(r[5] for r in recs if r[0] == "self")
    for kind, fnfl, file, fn, line, cost, callee in recs:
        if fnfl and os.path.basename(fnfl) == "search.c":
            search_fns.add(fn)
    out: Dict[str, int] = defaultdict(int)
    in_search = 0
    for kind, fnfl, file, fn, line, cost, callee in recs:
        if kind == "call" and callee is not None and callee.split(".")[0] == "bs_search" \
                and fn not in search_fns:
            in_search += cost
        if kind == "call" and callee and fn not in search_fns:
            base = callee.split(".")[0]
            if base in ("bs_exact_distances", "bs_rerank_gate"):
                out["exact rerank (C)"] += cost
        if fn not in search_fns or kind == "total":
            continue
        if kind == "call" and callee in search_fns:
            continue  # counted in the callee's own lines
        stage, label = None, None
        if kind == "call":
            base = callee.split(".")[0]
            encl = ranges.name(file, line) if file else None
            for (caller, pre), st in STAGE_OF_CALL_IN.items():
                if encl == caller and base.startswith(pre):
                    stage, label = st, base + "()"
            for pre, st in ([] if stage else STAGE_OF_CALLEE):
                if base.startswith(pre):
                    stage, label = st, base + "()"
                    break
        if stage is None:
            encl = ranges.name(file, line) if file else None
            stage = STAGE_OF_FUNCTION.get(encl or "", None)
            if stage is None and encl is None and file:
                stage = STAGE_OF_HEADER.get(os.path.basename(file))
                encl = os.path.basename(file) if stage else None
            label = (encl or "?") + (" -> " + callee.split(".")[0] + "()" if kind == "call" else "")
            if stage is None:
                stage = "other C in bs_search"
        out[stage] += cost
        if detail is not None:
            detail[(stage, label)] = detail.get((stage, label), 0) + cost
    accounted = sum(v for k2, v in out.items() if k2 != "exact rerank (C)")
    out["other C in bs_search"] += in_search - accounted
    total = dump_summary(path) or total
    out["Python + numpy"] = total - in_search - out["exact rerank (C)"]
    out["total"] = total
    return dict(out)


def cmd_table(a) -> int:
    if a.top:
        for path in a.dumps:
            nq = 1
            for sp in a.stats or []:
                with open(sp) as f:
                    js = json.load(f)
                if f"-{js['bits']}-{js['nprobes']}." in os.path.basename(path):
                    nq = js["queries"]
            total, top = top_functions(path, a.top)
            print(f"## {path}: {total / nq:,.0f} instructions per query ({nq} queries)")
            for v, fn in top:
                print(f"{v / nq:12,.0f} {100 * v / total:5.1f}%  {fn[:110]}")
            print()
        return 0
    rows = []
    for path in a.dumps:
        st = None
        sp = a.stats or []
        det: Dict = {}
        tab = stage_table(path, a.src, det)
        base = os.path.basename(path)
        for s in sp:
            with open(s) as f:
                js = json.load(f)
            if f"-{js['bits']}-{js['nprobes']}." in base:
                st = js
        rows.append((path, tab, st, det))
    for path, tab, st, det in rows:
        nq = st["queries"] if st else 1
        codes = st["per_query"]["codes_scanned"] if st else 0
        print(f"## {path}" + (f": {st['bits']}-bit, nprobes {st['nprobes']}, recall@{st['k']} "
                              f"{st['recall_at_k']:.3f}, per query: {st['per_query']}" if st else ""))
        print(f"{'stage':28s} {'Ir/query':>12s} {'Ir/code':>9s} {'share':>6s}")
        for name in STAGE_ORDER:
            v = tab.get(name, 0)
            if not v and name not in ("total",):
                continue
            pq = v / nq
            pc = pq / codes if codes else float("nan")
            print(f"{name:28s} {pq:12,.0f} {pc:9.2f} {100 * v / tab['total']:5.1f}%")
        if a.detail:
            print("  by function (inside bs_search):")
            for (stage, label), v in sorted(det.items(), key=lambda x: -x[1]):
                if v / tab["total"] >= 0.002:
                    print(f"  {stage:26s} {label:44s} {v / nq:12,.0f} {v / nq / codes if codes else 0:8.2f}")
        print()
    if a.markdown:
        print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"dump": p, "stages": t, "stats": s,
                        "detail": {f"{k[0]} | {k[1]}": v for k, v in d.items()}}
                       for p, t, s, d in rows], f, indent=1)
    return 0


def top_functions(path: str, n: int = 15) -> Tuple[int, List[Tuple[int, str]]]:
    """(total, the n functions with the most own instructions) of a dump: for
    a system that is not bitshard (rabitqlib), whose stages have no names here."""
    own: Dict[str, int] = defaultdict(int)
    for kind, _, _, fn, _, cost, _ in parse_callgrind(path):
        if kind == "self":
            own[fn] += cost
    total = dump_summary(path) or sum(own.values())
    return total, sorted(((v, k) for k, v in own.items()), reverse=True)[:n]


def markdown(rows) -> str:
    """One column per dump: thousands of instructions per query, and per code
    scanned at stage 1 in parentheses."""
    head = ["stage"]
    for _, _, st, _ in rows:
        head.append(f"{st['bits']}-bit np{st['nprobes']}" if st else "?")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in STAGE_ORDER:
        if not any(t.get(name, 0) for _, t, _, _ in rows):
            continue
        cells = [name]
        for _, t, st, _ in rows:
            nq = st["queries"] if st else 1
            codes = st["per_query"]["codes_scanned"] if st else 0
            v = t.get(name, 0) / nq
            cells.append(f"{v / 1000:,.1f}k ({v / codes:.2f})" if codes else f"{v / 1000:,.1f}k")
        lines.append("| " + " | ".join(cells) + " |")
    for key, label in (("codes_scanned", "codes scanned / query"),
                       ("codes_stage2", "codes at stage 2 / query"),
                       ("exact_reads", "exact reads / query")):
        lines.append("| " + " | ".join([label] + [f"{st['per_query'][key]:,.1f}" if st else "?"
                                                  for _, _, st, _ in rows]) + " |")
    lines.append("| " + " | ".join(["recall@10 (these queries)"] + [
        f"{st['recall_at_k']:.3f}" if st else "?" for _, _, st, _ in rows]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.qprofile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("build", "run"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", default="fashion-mnist")
        p.add_argument("--bits", type=int, default=9)
        p.add_argument("--partitions", type=int, default=256)
        p.add_argument("--workdir", required=True)
        p.add_argument("--queries", type=int, default=100)
        p.add_argument("--nprobes", type=int, default=64)
        p.add_argument("--k", type=int, default=10)
        p.add_argument("--stats", help="write the searcher's counters here (run)")
        p.add_argument("--system", choices=("bitshard", "rabitqlib"), default="bitshard")
    p = sub.add_parser("table")
    p.add_argument("dumps", nargs="+", help="callgrind dumps of the loop (<out>.1)")
    p.add_argument("--stats", nargs="*", help="the run's --stats files (matched by -<bits>-<nprobes>)")
    p.add_argument("--src", default=SRC)
    p.add_argument("--json")
    p.add_argument("--detail", action="store_true", help="also per function inside bs_search")
    p.add_argument("--markdown", action="store_true", help="also one markdown table of all dumps")
    p.add_argument("--top", type=int, default=0,
                   help="instead: the functions with the most own instructions, per query "
                        "(any system; --stats gives the query count)")
    a = ap.parse_args(argv)
    return {"build": cmd_build, "run": cmd_run, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
