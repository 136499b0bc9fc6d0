/* The float dot products of the search (src/dot.h): SSE2 and AVX2 give the
 * scalar reference's bits exactly, on random input and on input built to
 * expose a change of summation order (cancelling magnitudes, denormals,
 * overflow to inf, every tail length); likewise the fused residual (q',
 * |q'|^2, sum q') against its three reference passes, and stage 2's
 * nibble tables (signed zeros too). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dot.h"
#include "testing.h"

#define NMAX 1600

static float g_q[NMAX], g_r[4][NMAX];
static float g_t[2][4 * NMAX];
static uint8_t g_e[NMAX];

static int same(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* kind 0: normal; 1: +-1e30 and 1 alternating (order-sensitive sums);
 * 2: denormals and zeros; 3: values whose products overflow to inf;
 * 4: +-0.0f, +-1 and +-2^-149 (signed-zero sums). */
static float value(uint64_t *st, int kind) {
    double u = test_rand_uniform(st);
    switch (kind) {
    case 1: return (test_rand_uniform(st) < 0.5 ? -1e30f : 1e30f) * (u < 0.5 ? 1.0f : 1e-30f);
    case 2: return u < 0.3 ? 0.0f : (float)(u * 1e-39);
    case 3: return u < 0.1 ? 3e38f : (float)(u * 4.0 - 2.0);
    case 4: {
        const float v[6] = {0.0f, -0.0f, 1.0f, -1.0f, 0x1p-149f, -0x1p-149f};
        return v[(int)(u * 6.0) % 6];
    }
    default: return (float)test_rand_normal(st);
    }
}

static void check_level(bs_simd_level level) {
    bs_dot_kernels k;
    bs_dot_kernels_get(level, &k);
    uint64_t st = 17;
    int bad = 0;
    for (int kind = 0; kind < 5; kind++) {
        for (uint32_t n = 1; n <= 70; n++) {
            for (uint32_t i = 0; i < n; i++) {
                g_q[i] = value(&st, kind);
                for (int r = 0; r < 4; r++) g_r[r][i] = value(&st, kind);
            }
            const float *const rows[4] = {g_r[0], g_r[1], g_r[2], g_r[3]};
            float want[4], got[4];
            bs_dot4_ref(g_q, rows, n, want);
            k.dot4(g_q, rows, n, got);
            for (int r = 0; r < 4; r++) {
                bad += !same(want[r], got[r]);
                bad += !same(want[r], bs_dot(g_q, rows[r], n));
            }
        }
        for (uint32_t D = 64; D <= NMAX; D += 64) {
            for (uint32_t i = 0; i < D; i++) {
                g_q[i] = value(&st, kind);
                g_e[i] = (uint8_t)(test_rand_uniform(&st) * 256.0);
            }
            if (kind == 1) g_e[D - 1] = 255;
            bad += !same(bs_u8_dot_ref(g_e, g_q, D), k.u8_dot(g_e, g_q, D));
            memset(g_t, 0xA5, sizeof g_t);
            bs_nibble_tables_ref(g_q, D, g_t[0]);
            k.nibble_tables(g_q, D, g_t[1]);
            bad += memcmp(g_t[0], g_t[1], (size_t)D * 4 * sizeof(float)) != 0;
        }
        /* q' and its two sums, against the three reference passes, for
         * every tail length and a whole vector, with and without b */
        for (uint32_t n = 1; n <= NMAX; n = n < 70 ? n + 1 : n + 253) {
            for (uint32_t i = 0; i < n; i++) {
                g_q[i] = value(&st, kind);
                g_r[0][i] = value(&st, kind);
            }
            for (int with_b = 0; with_b < 2; with_b++) {
                const float *b = with_b ? g_r[0] : NULL;
                float want_n2, want_s, got_n2, got_s;
                for (uint32_t i = 0; i < n; i++) g_r[1][i] = b ? g_q[i] - b[i] : g_q[i];
                want_n2 = bs_dot_ref(g_r[1], g_r[1], n);
                want_s = bs_sum(g_r[1], n);
                memset(g_r[2], 0xA5, sizeof g_r[2]);
                k.residual(g_q, b, n, g_r[2], &got_n2, &got_s);
                bad += memcmp(g_r[1], g_r[2], n * sizeof(float)) != 0;
                bad += !same(want_n2, got_n2) || !same(want_s, got_s);
                bs_residual_ref(g_q, b, n, g_r[3], &got_n2, &got_s);
                bad += memcmp(g_r[1], g_r[3], n * sizeof(float)) != 0;
                bad += !same(want_n2, got_n2) || !same(want_s, got_s);
            }
        }
    }
    CHECK_MSG(bad == 0, "level %s: %d results differ from the reference", bs_simd_name(level),
              bad);
}

/* The reference is the documented order, not merely some order. */
static void test_reference_order(void) {
    float a[16], b[16];
    for (int i = 0; i < 16; i++) {
        a[i] = (float)(i + 1);
        b[i] = 1.0f;
    }
    a[0] = 1e8f;
    a[8] = -1e8f; /* lane 0 twice: they cancel before meeting the rest */
    CHECK(bs_dot_ref(a, b, 16) == 126.0f);
    CHECK(bs_sum(a, 16) == 126.0f);
    float c[19];
    for (int i = 0; i < 19; i++) c[i] = 1.0f;
    c[16] = 1e8f;
    c[18] = -1e8f; /* the tail in order: c[17] is lost in 1e8 before -1e8 cancels it */
    CHECK(bs_sum(c, 19) == 16.0f);
    uint8_t e[64];
    float x[64];
    for (int i = 0; i < 64; i++) {
        e[i] = 1;
        x[i] = 1.0f;
    }
    x[0] = 1e8f;
    x[16] = -1e8f; /* lane 0 twice: cancels inside the lane */
    CHECK(bs_u8_dot_ref(e, x, 64) == 62.0f);
    /* nibble tables: highest bit first. Entry 15 is ((1 + 1) + 1e8) - 1e8
     * = 0 (the ones are lost in 1e8), not (-1e8 + 1e8) + 1 + 1 = 2. */
    float t[4 * 64];
    for (int i = 0; i < 64; i++) x[i] = (i % 4 == 0) ? -1e8f : (i % 4 == 1) ? 1e8f : 1.0f;
    bs_nibble_tables_ref(x, 64, t);
    CHECK(t[15] == 0.0f && t[14] == 1e8f && t[3] == 0.0f && t[12] == 2.0f);
    /* all -0.0f: every entry is +0.0f (+0.0f + -0.0f) */
    for (int i = 0; i < 64; i++) x[i] = -0.0f;
    bs_nibble_tables_ref(x, 64, t);
    int neg = 0;
    for (int i = 0; i < 4 * 64; i++) neg += signbit(t[i]) != 0;
    CHECK(neg == 0);
}

int main(void) {
    test_reference_order();
    check_level(BS_SIMD_SCALAR);
    if (bs_simd_supported(BS_SIMD_AVX2)) check_level(BS_SIMD_AVX2);
    TEST_MAIN_END();
}
