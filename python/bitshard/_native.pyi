"""Type stubs of the C extension (see _native.c). Buffers are numpy arrays or
any C-contiguous buffer of the stated dtype; outputs are written in place."""

from typing import Any, List, Optional, Sequence, Tuple

Buffer = Any  # a C-contiguous buffer (numpy array, bytes, mmap)

class Rotation:
    padded_dim: int
    fingerprint: bytes
    def __init__(self, kind: int, dim: int, seed: int) -> None: ...
    def apply(self, x: Buffer, n: int, in_dim: int, out: Buffer) -> None: ...

class Builder:
    def __init__(
        self,
        dim: int,
        num_bits: int,
        metric: int,
        rotation_kind: int,
        rotation_seed: int,
        centroids: Buffer,
        num_partitions: int,
        column: str,
        uuid: bytes,
        fragment_ids: Buffer,
        fragment_rows: Buffer,
    ) -> None: ...
    def add(self, x: Buffer, n: int, dim: int, fragment_index: int, offsets: Buffer) -> None: ...
    def write(self, path: str) -> None: ...
    def set_threads(self, n: int) -> None: ...

class Segment:
    def __init__(self, data: Buffer) -> None: ...
    def info(self) -> dict[str, Any]: ...
    def fragments(self) -> List[Tuple[int, int]]: ...
    def centroids(self, out: Buffer) -> None: ...
    def residual_sum(self) -> float: ...

#: The settings of a prepared search, shared by Searcher.search and
#: Searcher.search_batch_into: (k, nprobes, eps0, refine_factor, segment_mask,
#: allowed_rowids, allowed_fragments, denied_rowids); the four buffers may be None.
SearchParams = Tuple[int, int, float, int, Optional[Buffer], Optional[Buffer],
                     Optional[Buffer], Optional[Buffer]]

class Searcher:
    def __init__(self, segments: Sequence[Segment]) -> None: ...
    def search(
        self,
        q: Buffer,
        params: SearchParams,
        out_rowids: Buffer,
        out_estimates: Buffer,
        out_lower_bounds: Optional[Buffer],
        stats: Optional[Buffer],
    ) -> int: ...
    def search_batch_into(
        self,
        Q: Buffer,
        nq: int,
        num_threads: int,
        params: SearchParams,
        out_rowids: Buffer,
        out_estimates: Buffer,
        out_lower_bounds: Optional[Buffer],
        out_counts: Buffer,
        stats: Optional[Buffer],
    ) -> None: ...

def kmeans_train(
    x: Buffer, n: int, d: int, k: int, metric: int, max_iters: int, seed: int, out: Buffer,
    threads: int = ...,
) -> None: ...
def ivf_fingerprint(centroids: Buffer, k: int, d: int, metric: int) -> bytes: ...
def hash64(data: bytes, seed: int = ...) -> int: ...
ROTATION_MATRIX_MAX_DIM: int

def padded_dim(dim: int) -> int: ...
def merge(segments: Sequence[Segment], uuid: bytes, path: str) -> None: ...
def remap(segments: Sequence[Segment], maps: Sequence[Buffer], fragment_ids: Buffer,
          fragment_rows: Buffer, uuid: bytes, path: str) -> None: ...
def exact_distances(metric: int, q: Buffer, x: Buffer, n: int, dim: int, out: Buffer) -> None: ...
def rerank_gate(lb: Buffer, d: Buffer, heap: Buffer, heap_n: int, k: int) -> Tuple[int, int]: ...
def set_blas_threads(n: int) -> None: ...
def simd_level() -> str: ...
def version() -> int: ...
