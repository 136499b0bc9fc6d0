"""The ``bitshard`` command line (also ``python -m bitshard``).

::

    bitshard build URI --column vec [--name N] [--num-partitions K] [--num-bits B]
                   [--metric l2|cosine|dot] [--workers W] [--executor ray|processes|serial]
                   [--index-uri DIR|s3://BUCKET/PREFIX] [--storage-option KEY=VALUE ...] [--json]
    bitshard search URI --column vec (--query-file q.npy | --query-row N) [--k 10]
                   [--nprobes 20] [--refine-factor R] [--format table|json|csv]
    bitshard serve URI --column vec [--index N] [--num-actors N] [--num-cpus X]
                   [--ray-address ADDR]      (queries as JSON lines on stdin)
    bitshard describe URI [--json]
    bitshard optimize URI [--name N ...] [--num-indices-to-merge N] [--retrain] [--json]
    bitshard verify URI [--strict]
    bitshard upgrade URI [--name N]
    bitshard cleanup URI [--older-than SECONDS] [--dry-run]

Every command takes ``--index-uri`` (a directory or ``s3://bucket/prefix``)
and ``--storage-option KEY=VALUE`` (repeatable; object-store settings such
as ``endpoint_override``, ``region``, ``access_key``, ``secret_key``).

Exit codes: 0 success; 1 a bitshard error (the message, no traceback) or
``verify`` found faults (with ``--strict``: or notices: a fragment stale,
gone from the source or not indexed); 2 a usage error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from typing import Any, List, Optional, Sequence

__all__ = ["main", "build_parser"]


def _number(kind: Any, noun: str, minimum: Any) -> Any:
    """An argparse type: ``kind(text)`` that must be >= ``minimum``."""

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not v >= minimum:
            raise argparse.ArgumentTypeError(f"expected {noun} >= {minimum}, got {v}")
        return v

    return parse


_non_negative_int = _number(int, "an integer", 0)
_non_negative_float = _number(float, "a number", 0)


def _checked(rule: Any) -> Any:
    """An argparse type applying the library's own rule (bitshard.validate),
    so the command line refuses exactly what the Python API refuses, with
    the same message (a usage error, exit 2). ``--name`` is left to the
    library (a bitshard error, exit 1), as bitshard.names' tests expect."""
    from .errors import InvalidInputError  # noqa: PLC0415

    def check(text: str) -> Any:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return rule(v)
        except InvalidInputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return check


def _storage_option(text: str) -> Any:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _storage_options(args: argparse.Namespace) -> Optional[dict]:
    pairs = getattr(args, "storage_option", None)
    return dict(pairs) if pairs else None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``bitshard`` command."""
    from . import validate as rules  # noqa: PLC0415

    p = argparse.ArgumentParser(
        prog="bitshard",
        description="Build, query and maintain IVF_RQ (IVF + RaBitQ) vector indexes.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("uri", help="the data: a Lance dataset or Parquet file/directory")
        sp.add_argument("--index-uri", default=None,
                        help="where the indexes live: a directory or s3://bucket/prefix "
                             "(default: next to the data)")
        sp.add_argument("--storage-option", type=_storage_option, action="append",
                        default=None, metavar="KEY=VALUE",
                        help="object-store setting for the index root (repeatable), e.g. "
                             "endpoint_override=http://127.0.0.1:9000, region=us-east-1, "
                             "access_key=..., secret_key=...; default: AWS_* environment")

    b = sub.add_parser("build", help="build and commit an IVF_RQ index on many workers",
                       description="Train IVF centroids on a sample, encode the fragments on "
                                   "workers, merge and commit (bitshard.build_index). Rerunning "
                                   "an interrupted build resumes it.")
    common(b)
    b.add_argument("--column", required=True, help="the vector column")
    b.add_argument("--name", default=None, help="index name (default: <column>_idx)")
    b.add_argument("--num-partitions", type=_checked(rules.num_partitions), default=None,
                   help="IVF partitions (default: about sqrt(rows))")
    b.add_argument("--num-bits", type=_checked(rules.num_bits), default=None,
                   help="bits per dimension, 1..9 (default 9: see docs/decisions.md)")
    b.add_argument("--metric", choices=("l2", "cosine", "dot"), default="l2")
    b.add_argument("--workers", type=_checked(lambda n: rules.integer("num_workers", n)),
                   default=None,
                   help="worker processes / Ray CPUs (default: CPU count)")
    b.add_argument("--executor", choices=("ray", "processes", "serial"), default=None,
                   help="default: ray if installed, else processes")
    b.add_argument("--fragments-per-task",
                   type=_checked(lambda n: rules.integer("fragments_per_task", n)), default=None)
    b.add_argument("--sample-rate", type=_checked(rules.sample_rate), default=256,
                   help="training rows per partition (default 256)")
    b.add_argument("--max-iters", type=_checked(rules.max_iters), default=50)
    b.add_argument("--seed", type=_checked(rules.rotation_seed), default=None,
                   help="training seed, and the rotation seed (default: random rotation)")
    b.add_argument("--max-retries", type=_checked(lambda n: rules.integer("max_retries", n, 0)),
                   default=3,
                   help="retries of a task whose worker died (default 3)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress bars even when stderr is not a terminal")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    b.add_argument("--json", action="store_true", help="print the build's statistics as JSON")
    b.set_defaults(func=_cmd_build)

    s = sub.add_parser("search", help="nearest neighbours through a committed index")
    common(s)
    s.add_argument("--column", required=True, help="the indexed vector column")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--query-file", help=".npy file: one query (d,) or a batch (nq, d)")
    q.add_argument("--query-row", type=_non_negative_int,
                   help="use row N of the dataset (0-based, live rows in fragment order)")
    s.add_argument("--k", type=_checked(rules.k), default=10)
    s.add_argument("--nprobes", type=_checked(rules.nprobes), default=20,
                   help="partitions probed (capped at the partition count)")
    s.add_argument("--refine-factor", type=_checked(lambda r: rules.refine_factor(r, 1)),
                   default=None, help="rerank the k * R best exactly (k * R <= 2**20)")
    s.add_argument("--index", default=None, help="index name, when the column has several")
    s.add_argument("--columns", default=None,
                   help="comma-separated source columns to add to the results")
    s.add_argument("--format", choices=("table", "json", "csv"), default="table")
    s.set_defaults(func=_cmd_search)

    sv = sub.add_parser("serve", help="search through Ray actors that each hold a share of the "
                                      "index's partitions (bitshard.serve)",
                        description="Start a search service (docs/serve.md), then answer one "
                                    "JSON request per line of stdin with one JSON line on "
                                    "stdout, until end of input. A request is {\"q\": query or "
                                    "list of queries, and any of \"k\", \"nprobes\", "
                                    "\"refine_factor\", \"columns\", \"fragment_ids\", "
                                    "\"filter\", \"fast_search\", \"eps0\"} (the keywords of "
                                    "Dataset.search), or {\"refresh\": true}; the answer is "
                                    "the result Table's columns, or {\"error\": message}. The "
                                    "first line written says the service is ready.")
    common(sv)
    sv.add_argument("--column", required=True, help="the indexed vector column")
    sv.add_argument("--index", default=None, help="index name, when the column has several")
    sv.add_argument("--num-actors", type=_checked(lambda n: rules.integer("num_actors", n)),
                    default=None, help="actors, one partition share each (default: one per "
                                       "Ray node)")
    sv.add_argument("--num-cpus", type=_number(float, "a number", 0.0), default=1.0,
                    help="Ray CPUs each actor requests (default 1; fractions allowed)")
    sv.add_argument("--ray-address", default=None,
                    help="connect to this Ray cluster (default: start a local one)")
    sv.set_defaults(func=_cmd_serve)

    d = sub.add_parser("describe", help="the committed indexes, their segments and artifacts")
    common(d)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_describe)

    o = sub.add_parser("optimize", help="bring indexes up to date after appends, deletes and "
                                        "compaction (optimize_indices)",
                       description="Remap rows a compaction moved (no vector read), drop "
                                   "deleted rows, encode the rows no segment covers with the "
                                   "committed artifacts, and commit (Dataset.optimize_indices). "
                                   "Run it before cleanup_old_versions.")
    common(o)
    o.add_argument("--name", action="append", default=None,
                   help="optimize only this index (repeatable; default: all)")
    o.add_argument("--num-indices-to-merge", type=_non_negative_int, default=None, metavar="N",
                   help="merge the new rows with the latest N segments (default: a new delta)")
    o.add_argument("--retrain", action="store_true",
                   help="train new centroids on the current data and encode every row again")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=_cmd_optimize)

    v = sub.add_parser("verify", help="re-read every committed segment; exit 1 listing faults")
    common(v)
    v.add_argument("--name", default=None, help="verify only this index")
    v.add_argument("--strict", action="store_true",
                   help="also exit 1 unless every fragment is indexed and current")
    v.set_defaults(func=_cmd_verify)

    u = sub.add_parser("upgrade", help="rewrite segments of an older format in the current "
                                       "one (no re-encoding), committing a new index version")
    common(u)
    u.add_argument("--name", default=None, help="upgrade only this index")
    u.set_defaults(func=_cmd_upgrade)

    c = sub.add_parser("cleanup", help="remove segment files no manifest references")
    common(c)
    c.add_argument("--older-than", type=_non_negative_float, default=3600.0, metavar="SECONDS",
                   help="only files older than this (default 3600)")
    c.add_argument("--dry-run", action="store_true", help="list, do not remove")
    c.add_argument("--abandoned-builds", action="store_true",
                   help="also drop interrupted builds' state older than --older-than")
    c.set_defaults(func=_cmd_cleanup)
    return p


# ---------------------------------------------------------------- commands


def _cmd_build(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .distributed import build_index  # noqa: PLC0415

    t0 = time.perf_counter()
    ds = build_index(
        args.uri, args.column, name=args.name, num_partitions=args.num_partitions,
        num_bits=args.num_bits, metric=args.metric, num_workers=args.workers,
        executor=args.executor, fragments_per_task=args.fragments_per_task,
        sample_rate=args.sample_rate, max_iters=args.max_iters, seed=args.seed,
        progress=args.progress, index_uri=args.index_uri, max_retries=args.max_retries,
        storage_options=_storage_options(args),
    )
    st = ds.last_build_stats
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
    else:
        reused = len(st["reused_segments"])
        print(f"built index {args.name or args.column + '_idx'!r} on {args.column!r}: "
              f"{st['num_rows']} rows, {st['num_partitions']} partitions, {st['num_bits']} bit(s); "
              f"version {st['version']}, segment {st['final_segment']}")
        print(f"{st['tasks']} tasks ({reused} reused) and {st['merges']} merges on "
              f"{st['num_workers']} {st['executor']} worker(s) in "
              f"{time.perf_counter() - t0:.1f} s")
    return 0


def _query_row(ds: Any, column: str, n: int, parser: argparse.ArgumentParser) -> Any:
    import numpy as np  # noqa: PLC0415

    from .sources import make_rowids  # noqa: PLC0415

    src = ds.source
    at = n
    for f in src.fragments():
        if at < f.num_rows:
            off = src.logical_to_offsets(f.id, np.array([at], dtype=np.int64))
            rowid = make_rowids(f.id, np.asarray(off, dtype=np.uint32))
            return src.take(column, rowid)[0]
        at -= f.num_rows
    parser.error(f"--query-row {n} is out of range: the dataset has {src.num_rows()} rows")


def _cmd_search(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np  # noqa: PLC0415

    import bitshard  # noqa: PLC0415

    if args.query_file is not None:
        try:
            q = np.load(args.query_file, allow_pickle=False)
        except (OSError, ValueError) as e:
            parser.error(f"cannot read --query-file {args.query_file}: {e}")
        if q.ndim not in (1, 2) or q.dtype.kind not in "fiu":
            parser.error(f"--query-file must hold a numeric (d,) or (nq, d) array, "
                         f"got {q.dtype} {q.shape}")
    ds = bitshard.dataset(args.uri, index_uri=args.index_uri,
                          storage_options=_storage_options(args))
    if args.query_row is not None:
        q = _query_row(ds, args.column, args.query_row, parser)
    cols = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    t = ds.search(args.column, q, k=args.k, nprobes=args.nprobes,
                  refine_factor=args.refine_factor, columns=cols, index=args.index)
    qi = t.column("query_index").to_pylist() if "query_index" in t.column_names \
        else [0] * t.num_rows
    names = ["query", "rank", "_rowid", "_distance"] + (cols or [])
    records: List[List[Any]] = []
    rank, prev = 0, None
    data = {c: t.column(c).to_pylist() for c in ["_rowid", "_distance"] + (cols or [])}
    for i in range(t.num_rows):
        rank = rank + 1 if qi[i] == prev else 0
        prev = qi[i]
        records.append([qi[i], rank, data["_rowid"][i], data["_distance"][i]]
                       + [data[c][i] for c in (cols or [])])
    out = sys.stdout
    if args.format == "json":
        json.dump([dict(zip(names, r)) for r in records], out, default=str)
        out.write("\n")
    elif args.format == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(names)
        w.writerows(records)
    else:
        cells = [names] + [[_cell(v) for v in r] for r in records]
        widths = [max(len(row[j]) for row in cells) for j in range(len(names))]
        for row in cells:
            out.write("  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    return 0


#: The request keys of ``bitshard serve`` passed to Service.search.
_SERVE_KEYS = ("k", "nprobes", "refine_factor", "columns", "fragment_ids", "filter",
               "fast_search", "eps0")


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import numpy as np  # noqa: PLC0415

    from .errors import BitshardError  # noqa: PLC0415
    from .service import _ray, serve  # noqa: PLC0415

    if not args.num_cpus > 0:
        parser.error(f"--num-cpus must be > 0, got {args.num_cpus}")
    if args.ray_address is not None:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=args.ray_address, log_to_driver=False)
    svc = serve(args.uri, args.column, args.index, args.num_actors, index_uri=args.index_uri,
                storage_options=_storage_options(args), num_cpus=args.num_cpus)
    out = sys.stdout
    try:
        out.write(json.dumps({"ready": True, "index": svc.index_name,
                              "version": svc.index_version, "actors": svc.num_actors}) + "\n")
        out.flush()
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError(f"a request must be a JSON object, got {line.strip()[:80]}")
                if req.get("refresh"):
                    svc.refresh()
                    answer: Any = {"refreshed": True, "version": svc.index_version}
                else:
                    unknown = sorted(set(req) - set(_SERVE_KEYS) - {"q"})
                    if unknown or "q" not in req:
                        raise ValueError(f"a request needs \"q\" and takes {list(_SERVE_KEYS)}; "
                                         f"got {sorted(req)}")
                    kw = {key: req[key] for key in _SERVE_KEYS if key in req}
                    t = svc.search(np.asarray(req["q"], dtype=np.float32), **kw)
                    answer = t.to_pydict()
            except (BitshardError, ValueError, TypeError) as e:
                answer = {"error": str(e)}
            out.write(json.dumps(answer, default=str) + "\n")
            out.flush()
    finally:
        svc.close()
    return 0


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.7g}"
    return str(v)


def _cmd_describe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import bitshard  # noqa: PLC0415

    ds = bitshard.dataset(args.uri, index_uri=args.index_uri,
                          storage_options=_storage_options(args))
    info = ds.describe_indices()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    if not info:
        print(f"no committed indexes under {ds.index_root}")
        return 0
    for d in info:
        print(f"index {d['name']!r} on column {d['column']!r} (version {d['version']})")
        print(f"  IVF_RQ: metric {d['metric']}, {d['num_bits']} bit(s), dimension "
              f"{d['dimension']}, {d['num_rows']} rows in {len(d['segments'])} segment(s)")
        print(f"  rotation {d['rotation_fingerprint']}  centroids {d['ivf_fingerprint']}")
        for s in d["segments"]:
            frags = s["fragment_ids"]
            shown = ", ".join(map(str, frags[:8])) + (", ..." if len(frags) > 8 else "")
            print(f"  segment {s['uuid']}: {s['num_rows']} rows, {len(frags)} fragment(s) "
                  f"[{shown}], {s['size_bytes']} bytes")
        if d["uncovered_fragments"]:
            print(f"  fragments not indexed (searched exactly): {d['uncovered_fragments']}")
        for st in d.get("stale_fragments", []):
            print(f"  fragment {st['id']} is stale (searched exactly): {st['reason']}")
        if d.get("missing_fragments"):
            print(f"  fragments no longer in the source (never returned; run "
                  f"optimize_indices): {d['missing_fragments']}")
        dr = d.get("drift")
        if dr is not None and dr["ratio"] is not None:
            print(f"  drift: {dr['new_rows']} row(s) encoded by upkeep since training, mean "
                  f"residual {dr['new_mean_residual']:.4g} vs {dr['indexed_mean_residual']:.4g} "
                  f"for the {dr['indexed_rows']} indexed row(s) (x{dr['ratio']:.3f}; retrain "
                  f"with optimize_indices(retrain=True) when it grows)")
    return 0


def _cmd_optimize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import bitshard  # noqa: PLC0415

    ds = bitshard.dataset(args.uri, index_uri=args.index_uri,
                          storage_options=_storage_options(args))
    ds.optimize_indices(index_names=args.name, num_indices_to_merge=args.num_indices_to_merge,
                        retrain=args.retrain)
    stats = ds.last_optimize_stats
    if args.json:
        print(json.dumps(stats, indent=1, default=str))
        return 0
    for name, st in stats.items():
        if not st["committed"]:
            print(f"index {name!r} version {st['version']}: nothing to do")
            continue
        print(f"index {name!r} version {st['base_version']} -> {st['version']}: "
              f"{st['rows_remapped']} row(s) remapped, {st['rows_encoded']} encoded "
              f"({st['rows_read']} read from the source), {st['rows_dropped']} dropped; "
              f"{st['segments_after']} segment(s)")
        if st["history_gone"]:
            print(f"  {st['history_gone']}: those rows were encoded again")
    return 0


def _cmd_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .maintenance import verify_report  # noqa: PLC0415

    report = verify_report(args.uri, index_uri=args.index_uri, name=args.name,
                           storage_options=_storage_options(args))
    for f in report.faults:
        print(f"FAULT: {f}")
    for n in report.notices:
        print(f"NOTICE: {n}")
    for s in report.indexes:
        print(f"index {s.name!r} version {s.version}: {s.segments} segment(s), "
              f"{s.rows} rows")
    if report.faults:
        print(f"verify: {len(report.faults)} fault(s)", file=sys.stderr)
        return 1
    if args.strict and report.notices:
        print(f"verify: {len(report.notices)} notice(s) (--strict: every fragment must be "
              f"indexed and current)", file=sys.stderr)
        return 1
    print("verify: ok" if report.indexes else "verify: no committed indexes")
    return 0


def _cmd_upgrade(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .maintenance import upgrade_index  # noqa: PLC0415

    done = upgrade_index(args.uri, index_uri=args.index_uri, name=args.name,
                         storage_options=_storage_options(args))
    for n, count in done.items():
        print(f"index {n!r}: {count} segment(s) rewritten" if count else
              f"index {n!r}: already current")
    if not done:
        print("upgrade: no committed indexes")
    return 0


def _cmd_cleanup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .maintenance import cleanup  # noqa: PLC0415

    removed = cleanup(args.uri, args.older_than, index_uri=args.index_uri,
                      dry_run=args.dry_run, abandoned_builds=args.abandoned_builds,
                      storage_options=_storage_options(args))
    for u in removed:
        print(u)
    verb = "would remove" if args.dry_run else "removed"
    print(f"cleanup: {verb} {len(removed)} unreferenced segment file(s)", file=sys.stderr)
    return 0


# -------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    from .errors import BitshardError  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("bitshard: %(message)s"))
    logger = logging.getLogger("bitshard")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return int(args.func(args, parser))
    except BitshardError as e:
        print(f"bitshard: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bitshard: interrupted", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
