/* Probe selection (probe.h). The keys are |q|^2 - 2 <q, c> + |c|^2 for l2
 * (the squared distance) and -<q, c> for dot and cosine (which search by
 * inner product on unit vectors); the nprobe smallest win, ties to the
 * lower partition id. */
#include "probe.h"

#include <math.h>
#include <string.h>

#include "alloc.h"
#include "error.h"
#include "scratch.h"

/* The float16 probe pre-pass runs for at least this many centroids and
 * when at most 1 / PREPASS_MAX_FRACTION of them are probed (else most
 * would need their exact key anyway) ... */
#define PREPASS_MIN_LIST 64
#define PREPASS_MAX_FRACTION 8
/* ... and for at least this many dimensions: below, the float centroids
 * (256 x 128 x 4 = 128 KB) stay in L2 and the pre-pass's bookkeeping ate
 * its gain (measured at d = 128: 1% slower; at d = 768: 3-5% faster). */
#define PREPASS_MIN_DIM 256

bs_status bs_probe_index_init(bs_probe_index *pi, const float *centroids,
                              uint32_t num_partitions, uint32_t dim, bs_metric metric,
                              const bs_dot_kernels *dots, bs_error *err) {
    memset(pi, 0, sizeof *pi);
    pi->dim = dim;
    pi->num_partitions = num_partitions;
    pi->metric = metric;
    pi->centroids = centroids;
    pi->dots = *dots;
    pi->centroid_norm2 = bs_alloc(num_partitions, sizeof(float));
    if (pi->centroid_norm2 == NULL) return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    for (uint32_t c = 0; c < num_partitions; c++) {
        const float *v = centroids + (size_t)c * dim;
        pi->centroid_norm2[c] = bs_dot(v, v, dim);
    }
    /* The float16 copy exists where it pays: a CPU with F16C, enough
     * centroids to skip most of, and every coordinate inside float16's
     * range (|x| < 65504; the bound below assumes no overflow). Without it
     * probe selection scans the float centroids, with the same result. */
    if (dots->to_f16 == NULL || num_partitions < PREPASS_MIN_LIST || dim < PREPASS_MIN_DIM)
        return BS_OK;
    const size_t cells = (size_t)num_partitions * dim;
    for (size_t i = 0; i < cells; i++)
        if (!(fabsf(centroids[i]) < 65504.0f)) return BS_OK;
    pi->centroids_f16 = bs_alloc(cells, sizeof(uint16_t));
    pi->centroid_norm = bs_alloc(num_partitions, sizeof(float));
    if (pi->centroids_f16 == NULL || pi->centroid_norm == NULL) {
        bs_probe_index_free(pi);
        return bs_fail(err, BS_ERR_NO_MEMORY, "out of memory");
    }
    dots->to_f16(centroids, cells, pi->centroids_f16);
    for (uint32_t c = 0; c < num_partitions; c++) {
        /* |c| from above: the bound needs no smaller value */
        const float *v = centroids + (size_t)c * dim;
        double n2 = 0.0;
        for (uint32_t i = 0; i < dim; i++) n2 += (double)v[i] * (double)v[i];
        pi->centroid_norm[c] = (float)(sqrt(n2) * (1.0 + 0x1p-20));
    }
    return BS_OK;
}

void bs_probe_index_free(bs_probe_index *pi) {
    BS_FREE(pi->centroid_norm2);
    BS_FREE(pi->centroids_f16);
    BS_FREE(pi->centroid_norm);
}

int bs_probe_scratch_reserve(bs_probe_scratch *ps, const bs_probe_index *pi,
                             uint32_t nprobe) {
    return bs_grow((void **)&ps->probes, &ps->cap_probes, nprobe, sizeof(uint32_t)) &&
           bs_match_cap((void **)&ps->keys, ps->cap_probes, sizeof(float)) &&
           bs_grow((void **)&ps->approx, &ps->cap_approx, pi->num_partitions,
                   sizeof(float)) &&
           bs_match_cap((void **)&ps->approx_err, ps->cap_approx, sizeof(float)) &&
           bs_match_cap((void **)&ps->near, ps->cap_approx, sizeof(uint32_t));
}

void bs_probe_scratch_free(bs_probe_scratch *ps) {
    free(ps->probes);
    free(ps->keys);
    free(ps->approx);
    free(ps->approx_err);
    free(ps->near);
}

/* Keeps the nprobe smallest keys seen, in order; a key equal to a kept
 * one goes after it, so among equal keys the centroid offered first wins.
 * Offered in increasing centroid order, that is the lowest id. */
static void offer_probe(uint32_t *probes, float *keys, uint32_t *have, uint32_t nprobe,
                        uint32_t c, float key) {
    if (*have == nprobe && key >= keys[*have - 1]) return;
    uint32_t pos = *have < nprobe ? (*have)++ : nprobe - 1;
    while (pos > 0 && keys[pos - 1] > key) {
        keys[pos] = keys[pos - 1];
        probes[pos] = probes[pos - 1];
        pos--;
    }
    keys[pos] = key;
    probes[pos] = c;
}

/* qn = |q|^2, ip = <q, c>. */
static float probe_key(const bs_probe_index *pi, float qn, float ip, uint32_t c) {
    return pi->metric == BS_METRIC_L2 ? qn - 2.0f * ip + pi->centroid_norm2[c] : -ip;
}

/* An insertion list over one pass, O(num_partitions) typically. */
void bs_choose_probes_exact(const bs_probe_index *pi, bs_probe_scratch *ps, const float *q,
                            uint32_t nprobe) {
    const float qn = bs_dot(q, q, pi->dim);
    const size_t d = pi->dim;
    const uint32_t num_partitions = pi->num_partitions;
    const float *cen = pi->centroids;
    uint32_t have = 0;
    float ips[4];
    for (uint32_t c = 0; c < num_partitions; c++) {
        if (c % 4 == 0) {
            if (c + 4 <= num_partitions) {
                const float *const rows[4] = {cen + c * d, cen + (c + 1) * d,
                                              cen + (c + 2) * d, cen + (c + 3) * d};
                pi->dots.dot4(q, rows, pi->dim, ips);
            } else {
                for (uint32_t j = c; j < num_partitions; j++)
                    ips[j - c] = bs_dot(q, cen + j * d, pi->dim);
            }
        }
        offer_probe(ps->probes, ps->keys, &have, nprobe, c, probe_key(pi, qn, ips[c % 4], c));
    }
}

/* Per-query constants of the pre-pass's error bound e_j = (A + B |c_j|)
 * |c_j| + C (see approx_keys). */
typedef struct prepass_bound {
    float A, B, C;
} prepass_bound;

/* e_j: float16 rounding moves each coordinate by at most 2^-11 of itself
 * or 2^-25 (subnormals), so |<q, c - c16>| <= 2^-11 |q||c| + 2^-25 sum|q_i|;
 * each float dot is within gamma_d |q||c| (Higham 3.1, any order, FMA or
 * not), with |c16| <= (1 + 2^-11)|c| + 2^-25 sqrt(d); the key's two outer
 * operations round by 2^-24 (|q| + |c|)^2 each, in either computation.
 * All of it is doubled: rounding of this bound and of a_j +- e_j. Here |q|
 * and the query's terms are folded into per-query constants (rounded up:
 * doubled again, which also covers evaluating e_j in float). */
static prepass_bound prepass_bound_for(const bs_probe_index *pi, const float *q, float qn) {
    const size_t d = pi->dim;
    float qabs = 0.0f;
    for (size_t i = 0; i < d; i++) qabs += fabsf(q[i]);
    const double u = 0x1p-24, gamma = (double)d * u / (1.0 - (double)d * u);
    const double qnorm = sqrt((double)qn) * (1.0 + 4.0 * u);
    const double qabs_up = (double)qabs * (1.0 + gamma) + 1e-30;
    const double l2 = pi->metric == BS_METRIC_L2 ? 1.0 : 0.0;
    /* 2 ip_err = 2 [(2^-11 + gamma (2 + 2^-11)) |q||c| + 2^-25 sum|q_i|
     *               + gamma |q| 2^-25 sqrt(d)]; outer = 4u (|q| + |c|)^2 */
    const double ka = 2.0 * (0x1p-11 + gamma * (2.0 + 0x1p-11)) * qnorm * (1.0 + 4.0 * u);
    prepass_bound b;
    b.A = (float)(4.0 * (ka + l2 * 8.0 * u * qnorm));
    b.B = (float)(4.0 * l2 * 4.0 * u);
    b.C = (float)(4.0 * (2.0 * (0x1p-25 * qabs_up +
                                gamma * qnorm * 0x1p-25 * sqrt((double)d)) +
                         l2 * 4.0 * u * qnorm * qnorm) +
                  1e-30);
    return b;
}

/* a_j, each centroid's key from its float16 copy, and e_j, its error
 * bound, into ps->approx and ps->approx_err. */
static void approx_keys(const bs_probe_index *pi, bs_probe_scratch *ps, const float *q,
                        float qn) {
    const uint32_t num_partitions = pi->num_partitions;
    const size_t d = pi->dim;
    const uint16_t *c16 = pi->centroids_f16;
    const prepass_bound eb = prepass_bound_for(pi, q, qn);
    float *a = ps->approx, *e = ps->approx_err;
    float ips[4];
    for (uint32_t c = 0; c < num_partitions; c += 4) {
        if (c + 4 <= num_partitions) {
            const uint16_t *const rows[4] = {c16 + c * d, c16 + (c + 1) * d,
                                             c16 + (c + 2) * d, c16 + (c + 3) * d};
            pi->dots.dot4_f16(q, rows, pi->dim, ips);
        } else {
            for (uint32_t j = c; j < num_partitions; j++) {
                const uint16_t *const rows[4] = {c16 + j * d, c16 + j * d,
                                                 c16 + j * d, c16 + j * d};
                float t[4];
                pi->dots.dot4_f16(q, rows, pi->dim, t);
                ips[j - c] = t[0];
            }
        }
        for (uint32_t j = c; j < num_partitions && j < c + 4; j++) {
            const float cn = pi->centroid_norm[j];
            a[j] = probe_key(pi, qn, ips[j - c], j);
            e[j] = (eb.A + eb.B * cn) * cn + eb.C;
        }
    }
}

/* The same probes through the float16 pre-pass. Each centroid's key from
 * its float16 copy, a_j, is within e_j of the exact key; U, the nprobe-th
 * smallest a_j + e_j, bounds the exact nprobe-th smallest key from above.
 * A centroid with a_j - e_j > U has an exact key > U, so the exact scan
 * could not have picked it (not even on a tie). The others ("near", in
 * increasing id) get their exact keys, computed exactly as the full scan
 * computes them (dot4 and bs_dot give a row the same bits whatever rows
 * accompany it), and go through the same insertion list: the same probes,
 * in the same order, as bs_choose_probes_exact. tests/c/test_search.c
 * checks it on adversarial centroids. */
void bs_choose_probes(const bs_probe_index *pi, bs_probe_scratch *ps, const float *q,
                      uint32_t nprobe) {
    if (pi->centroids_f16 == NULL ||
        (size_t)nprobe * PREPASS_MAX_FRACTION > pi->num_partitions) {
        bs_choose_probes_exact(pi, ps, q, nprobe);
        return;
    }
    const uint32_t num_partitions = pi->num_partitions;
    const size_t d = pi->dim;
    const float qn = bs_dot(q, q, pi->dim);
    approx_keys(pi, ps, q, qn);
    const float *a = ps->approx, *e = ps->approx_err;
    /* U: the nprobe-th smallest a_j + e_j (an insertion list again). */
    uint32_t have = 0;
    for (uint32_t c = 0; c < num_partitions; c++)
        offer_probe(ps->probes, ps->keys, &have, nprobe, c, a[c] + e[c]);
    const float U = ps->keys[nprobe - 1];
    uint32_t nnear = 0;
    for (uint32_t c = 0; c < num_partitions; c++)
        if (!(a[c] - e[c] > U)) ps->near[nnear++] = c;
    /* exact keys of the near ones, in increasing id */
    const float *cen = pi->centroids;
    const uint32_t *near = ps->near;
    have = 0;
    for (uint32_t t = 0; t < nnear; t += 4) {
        float exact[4];
        if (t + 4 <= nnear) {
            const float *const rows[4] = {cen + near[t] * d, cen + near[t + 1] * d,
                                          cen + near[t + 2] * d, cen + near[t + 3] * d};
            pi->dots.dot4(q, rows, pi->dim, exact);
        } else {
            for (uint32_t j = t; j < nnear; j++)
                exact[j - t] = bs_dot(q, cen + near[j] * d, pi->dim);
        }
        for (uint32_t j = t; j < nnear && j < t + 4; j++)
            offer_probe(ps->probes, ps->keys, &have, nprobe, near[j],
                        probe_key(pi, qn, exact[j - t], near[j]));
    }
}
