/* Probe selection: the nprobes partitions whose centroids are nearest a
 * query (docs/rabitq.md, "The staged scan", step 2), through a float16
 * pre-pass where it pays, with the same answer as the full float scan
 * (docs/algorithms.md, "Probe selection"). Internal to the library. */
#ifndef BS_PROBE_H
#define BS_PROBE_H

#include <stddef.h>
#include <stdint.h>

#include "bitshard.h"
#include "dot.h"

/* What probe selection reads of an index: its centroids and their norms,
 * computed once per searcher. */
typedef struct bs_probe_index {
    uint32_t dim;
    uint32_t num_partitions;
    bs_metric metric;
    const float *centroids; /* num_partitions * dim, not owned */
    float *centroid_norm2;  /* num_partitions: |c|^2 in float (bs_dot) */
    /* The pre-pass: float16 centroids, half the bytes of the scan that
     * dominates a high-dimensional query, and |c| rounded up; NULL when the
     * CPU lacks F16C, the index is too small for it to pay, or a centroid
     * does not fit float16. */
    uint16_t *centroids_f16;
    float *centroid_norm;
    bs_dot_kernels dots;
} bs_probe_index;

/* Fills pi for num_partitions centroids of dim floats (which must outlive
 * it). On failure pi holds nothing to free. */
bs_status bs_probe_index_init(bs_probe_index *pi, const float *centroids,
                              uint32_t num_partitions, uint32_t dim, bs_metric metric,
                              const bs_dot_kernels *dots, bs_error *err);
void bs_probe_index_free(bs_probe_index *pi);

/* Buffers reused across queries: the chosen partitions and their keys,
 * and the pre-pass's per-centroid keys, error bounds and survivors. */
typedef struct bs_probe_scratch {
    uint32_t *probes;  /* the answer, nearest first */
    float *keys;       /* the probes' keys; same capacity as probes */
    size_t cap_probes;
    float *approx;     /* per centroid: the pre-pass key ... */
    float *approx_err; /* ... and its error bound */
    uint32_t *near;    /* centroids the pre-pass could not rule out */
    size_t cap_approx;
} bs_probe_scratch;

/* 0 when out of memory. */
int bs_probe_scratch_reserve(bs_probe_scratch *ps, const bs_probe_index *pi,
                             uint32_t nprobe);
void bs_probe_scratch_free(bs_probe_scratch *ps);

/* The nprobe (<= num_partitions) partitions nearest q (dim floats,
 * normalised for cosine) into ps->probes, nearest first, ties to the lower
 * id: smallest |q - c|^2 for l2, largest <q, c> for dot and cosine.
 * bs_choose_probes uses the pre-pass where it pays; bs_choose_probes_exact
 * always scans the float centroids. Both give the same probes in the same
 * order. ps must be reserved for nprobe. */
void bs_choose_probes(const bs_probe_index *pi, bs_probe_scratch *ps, const float *q,
                      uint32_t nprobe);
void bs_choose_probes_exact(const bs_probe_index *pi, bs_probe_scratch *ps, const float *q,
                            uint32_t nprobe);

#endif
