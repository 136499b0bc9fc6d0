/* RaBitQ encoding: code layout, factors, the estimator's error law, and
 * degenerate inputs (docs/rabitq.md). */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rabitq.h"
#include "testing.h"

static const uint32_t DIMS[] = {64, 128, 192, 768, 1536};
#define NDIMS (sizeof DIMS / sizeof DIMS[0])
#define DMAX 1536

static uint8_t g_bits[DMAX / 8], g_ext[8 * DMAX / 8];
static float g_scratch[2 * DMAX];

static int bit_of(const uint8_t *plane, uint32_t i) {
    return (plane[i >> 3] >> (i & 7)) & 1;
}

/* u_i read back from the 1-bit code and the B - 1 extra planes. */
static uint32_t decode_u(const uint8_t *bits, const uint8_t *ext, uint32_t D,
                         uint32_t B, uint32_t i) {
    uint32_t e = 0;
    if (B == 9) /* one byte per dimension */
        e = ext[i];
    else /* bit planes */
        for (uint32_t j = 0; j + 1 < B; j++)
            e |= (uint32_t)bit_of(ext + (size_t)j * (D / 8), i) << j;
    return ((uint32_t)bit_of(bits, i) << (B - 1)) + e;
}

static double decode_y(const uint8_t *bits, const uint8_t *ext, uint32_t D,
                       uint32_t B, uint32_t i) {
    return (double)decode_u(bits, ext, D, B, i) - ((1u << B) - 1) / 2.0;
}

static void gaussian(float *r, uint32_t D, uint64_t *st) {
    for (uint32_t i = 0; i < D; i++) r[i] = (float)test_rand_normal(st);
}

/* cos(y, r), and the factors recomputed from the decoded code in double. */
typedef struct ref_factors {
    double cos, s, f;
} ref_factors;

static ref_factors reference(const float *r, const uint8_t *bits,
                             const uint8_t *ext, uint32_t D, uint32_t B) {
    double ip = 0, yy = 0, rr = 0;
    for (uint32_t i = 0; i < D; i++) {
        double y = decode_y(bits, ext, D, B, i);
        ip += y * r[i];
        yy += y * y;
        rr += (double)r[i] * r[i];
    }
    ref_factors out = {0, 0, 0};
    if (rr == 0) return out;
    out.cos = ip / sqrt(yy * rr);
    out.s = rr / ip;
    double t = 1.0 / (out.cos * out.cos) - 1.0;
    out.f = sqrt(rr) * sqrt(t > 0 ? t : 0) / sqrt((double)D - 1);
    return out;
}

static int close_rel(double a, double b, double rel, double abs_tol) {
    return fabs(a - b) <= rel * fabs(b) + abs_tol;
}

static void test_codes_and_factors(void) {
    uint64_t st = 11;
    float r[DMAX];
    printf("mean cos(y, r) for Gaussian r:\n");
    for (size_t di = 0; di < NDIMS; di++) {
        const uint32_t D = DIMS[di];
        const int trials = D <= 192 ? 40 : 10;
        double mean_cos[10] = {0};
        for (int t = 0; t < trials; t++) {
            gaussian(r, D, &st);
            double prev_cos = -1;
            for (uint32_t B = 1; B <= 9; B++) {
                bs_factors f;
                memset(g_ext, 0xA5, sizeof g_ext);
                bs_rabitq_encode(r, D, B, g_bits, B > 1 ? g_ext : NULL, &f,
                                 g_scratch);
                /* The top bit of u is the sign of r; |y| = k + 1/2 with the
                 * sign of r. */
                int bad = 0;
                for (uint32_t i = 0; i < D; i++) {
                    uint32_t u = decode_u(g_bits, g_ext, D, B, i);
                    double y = decode_y(g_bits, g_ext, D, B, i);
                    if (bit_of(g_bits, i) != (r[i] > 0)) bad++;
                    if (u > (1u << B) - 1) bad++;
                    if ((r[i] > 0) != (y > 0)) bad++;
                }
                CHECK_MSG(bad == 0, "D=%u B=%u: %d malformed coordinates", D,
                          B, bad);
                ref_factors rf = reference(r, g_bits, g_ext, D, B);
                ref_factors r1 = reference(r, g_bits, g_ext, D, 1);
                double n2 = 0;
                for (uint32_t i = 0; i < D; i++) n2 += (double)r[i] * r[i];
                CHECK(close_rel(f.norm2, n2, 1e-6, 0));
                CHECK_MSG(close_rel(f.s1, r1.s, 1e-5, 0), "D=%u B=%u s1 %g vs %g",
                          D, B, f.s1, r1.s);
                CHECK_MSG(close_rel(f.f1, r1.f, 1e-4, 1e-7), "D=%u B=%u f1 %g vs %g",
                          D, B, f.f1, r1.f);
                /* What the search uses instead of a stored f1. */
                float f1d = bs_f1_from(f.norm2, f.s1, 0.25f * (float)D,
                                       1.0f / sqrtf((float)(D - 1)));
                CHECK_MSG(fabs(f1d - f.f1) <= 1e-4 * f.f1 + 1e-3 * sqrt(f.norm2 / (D - 1)),
                          "D=%u B=%u f1 from norm2 and s1 %g vs %g", D, B, f1d, f.f1);
                CHECK_MSG(close_rel(f.s_full, rf.s, 1e-5, 0),
                          "D=%u B=%u s_full %g vs %g", D, B, f.s_full, rf.s);
                CHECK_MSG(close_rel(f.f_full, rf.f, 1e-3, 1e-6),
                          "D=%u B=%u f_full %g vs %g", D, B, f.f_full, rf.f);
                if (B == 1) {
                    CHECK(f.s_full == f.s1 && f.f_full == f.f1);
                }
                /* More bits never fit worse (up to the grid's resolution). */
                CHECK_MSG(rf.cos >= prev_cos - 1e-6,
                          "D=%u B=%u cos %.8f < %.8f at B-1", D, B, rf.cos,
                          prev_cos);
                prev_cos = rf.cos;
                mean_cos[B] += rf.cos / trials;
            }
        }
        printf("  D=%4u:", D);
        for (uint32_t B = 1; B <= 9; B++) printf(" B%u %.6f", B, mean_cos[B]);
        printf("\n");
        /* sqrt(2/pi) = 0.798 for the 1-bit code of a Gaussian vector. */
        CHECK_MSG(mean_cos[1] > 0.76 && mean_cos[1] < 0.84, "D=%u cos1 %.4f", D,
                  mean_cos[1]);
        CHECK_MSG(mean_cos[2] > 0.92, "D=%u cos2 %.4f", D, mean_cos[2]);
        CHECK_MSG(mean_cos[4] > 0.99, "D=%u cos4 %.4f", D, mean_cos[4]);
        CHECK_MSG(mean_cos[9] > 0.99999, "D=%u cos9 %.7f", D, mean_cos[9]);
    }
}

/* Error of s <y, q> as an estimate of <r, q> over random pairs, in units of
 * f |q|: about a standard normal (docs/rabitq.md). */
static void test_estimator(void) {
    uint64_t st = 23;
    float r[DMAX], q[DMAX];
    const uint32_t dims[] = {128, 768};
    const uint32_t bits_list[] = {2, 4, 9};
    for (size_t di = 0; di < 2; di++) {
        const uint32_t D = dims[di];
        for (size_t bi = 0; bi < 3; bi++) {
            const uint32_t B = bits_list[bi];
            const int pairs = 3000;
            int in19_1 = 0, in3_1 = 0, in19_b = 0, in3_b = 0;
            double abs1 = 0, absb = 0;
            for (int p = 0; p < pairs; p++) {
                gaussian(r, D, &st);
                gaussian(q, D, &st);
                /* A non-centred residual and query, as real data gives. */
                for (uint32_t i = 0; i < D; i++) q[i] = 0.5f * q[i] + 0.1f;
                bs_factors f;
                bs_rabitq_encode(r, D, B, g_bits, g_ext, &f, g_scratch);
                double ip = 0, qq = 0, y1q = 0, yq = 0;
                for (uint32_t i = 0; i < D; i++) {
                    ip += (double)r[i] * q[i];
                    qq += (double)q[i] * q[i];
                    y1q += (bit_of(g_bits, i) - 0.5) * q[i];
                    yq += decode_y(g_bits, g_ext, D, B, i) * q[i];
                }
                double nq = sqrt(qq);
                double e1 = fabs(f.s1 * y1q - ip), eb = fabs(f.s_full * yq - ip);
                /* the bound as the search forms it (f1 from norm2, s1) */
                float f1d = bs_f1_from(f.norm2, f.s1, 0.25f * (float)D,
                                       1.0f / sqrtf((float)(D - 1)));
                in19_1 += e1 <= 1.9 * f1d * nq;
                in3_1 += e1 <= 3.0 * f1d * nq;
                in19_b += eb <= 1.9 * f.f_full * nq;
                in3_b += eb <= 3.0 * f.f_full * nq;
                abs1 += e1;
                absb += eb;
            }
            printf("estimator D=%u B=%u: 1-bit within 1.9f %.3f, 3f %.4f; "
                   "full within 1.9f %.3f, 3f %.4f; mean |err| ratio %.4f\n",
                   D, B, (double)in19_1 / pairs, (double)in3_1 / pairs,
                   (double)in19_b / pairs, (double)in3_b / pairs, absb / abs1);
            CHECK(in19_1 >= 0.90 * pairs);
            CHECK(in3_1 >= 0.99 * pairs);
            CHECK(in19_b >= 0.90 * pairs);
            CHECK(in3_b >= 0.99 * pairs);
            /* f scales with sqrt(1/cos^2 - 1): 0.75 at 1 bit, about 0.33
             * at 2 bits, 0.1 at 4, 0.003 at 9. */
            const double max_ratio = B == 2 ? 0.6 : B == 4 ? 0.2 : 0.01;
            CHECK_MSG(absb < max_ratio * abs1, "B=%u ratio %.4f", B, absb / abs1);
        }
    }
}

static int factors_finite(const bs_factors *f) {
    return isfinite(f->norm2) && isfinite(f->s1) && isfinite(f->f1) &&
           isfinite(f->s_full) && isfinite(f->f_full) && f->norm2 >= 0 &&
           f->s1 >= 0 && f->f1 >= 0 && f->s_full >= 0 && f->f_full >= 0;
}

static void test_zero_vector(void) {
    float r[DMAX] = {0};
    for (size_t di = 0; di < NDIMS; di++) {
        const uint32_t D = DIMS[di];
        for (uint32_t B = 1; B <= 9; B++) {
            bs_factors f;
            memset(&f, 0x7F, sizeof f);
            bs_rabitq_encode(r, D, B, g_bits, g_ext, &f, g_scratch);
            CHECK(f.norm2 == 0 && f.s1 == 0 && f.f1 == 0 && f.s_full == 0 &&
                  f.f_full == 0);
            /* Every y_i is -1/2 (r_i == 0 takes the non-positive side). */
            int bad = 0;
            for (uint32_t i = 0; i < D; i++)
                bad += decode_y(g_bits, g_ext, D, B, i) != -0.5;
            CHECK_MSG(bad == 0, "D=%u B=%u: %d coordinates not -1/2", D, B, bad);
        }
    }
    /* Negative zeros are zeros. */
    for (uint32_t i = 0; i < 64; i++) r[i] = -0.0f;
    bs_factors f;
    bs_rabitq_encode(r, 64, 4, g_bits, g_ext, &f, g_scratch);
    CHECK(f.norm2 == 0 && f.s_full == 0 && f.f_full == 0 && g_bits[0] == 0);
}

static void test_adversarial(void) {
    float r[DMAX];
    const uint32_t D = 768;
    enum { ONE_HOT, ONE_HOT_NEG, CONSTANT, CONSTANT_NEG, ALTERNATING, TINY,
           HUGE_, DENORMAL, OUTLIER, HALF_ZERO, NCASES };
    const char *names[] = {"one-hot", "one-hot negative", "constant",
                           "constant negative", "alternating", "1e-30",
                           "1e30", "denormal", "outlier", "half zero"};
    uint64_t st = 5;
    for (int c = 0; c < NCASES; c++) {
        for (uint32_t i = 0; i < D; i++) {
            switch (c) {
            case ONE_HOT: r[i] = i == 17 ? 1.0f : 0.0f; break;
            case ONE_HOT_NEG: r[i] = i == 700 ? -3.0f : 0.0f; break;
            case CONSTANT: r[i] = 0.25f; break;
            case CONSTANT_NEG: r[i] = -7.0f; break;
            case ALTERNATING: r[i] = (i & 1) ? 1.0f : -1.0f; break;
            case TINY: r[i] = (float)(1e-30 * test_rand_normal(&st)); break;
            case HUGE_: r[i] = (float)(1e30 * test_rand_normal(&st)); break;
            case DENORMAL: r[i] = (i % 3 == 0) ? 1e-40f : -3e-41f; break;
            case OUTLIER: r[i] = i == 3 ? 1e6f : (float)test_rand_normal(&st); break;
            case HALF_ZERO: r[i] = (i & 1) ? 0.0f : (float)test_rand_normal(&st); break;
            }
        }
        for (uint32_t B = 1; B <= 9; B++) {
            bs_factors f;
            bs_rabitq_encode(r, D, B, g_bits, g_ext, &f, g_scratch);
            CHECK_MSG(factors_finite(&f), "%s B=%u: %g %g %g %g %g", names[c], B,
                      f.norm2, f.s1, f.f1, f.s_full, f.f_full);
            CHECK_MSG(f.s1 > 0 && f.s_full > 0, "%s B=%u: s %g %g", names[c], B,
                      f.s1, f.s_full);
            ref_factors rf = reference(r, g_bits, g_ext, D, B);
            /* Codes that are exactly parallel to r have f == 0. */
            if (c == CONSTANT || c == CONSTANT_NEG || c == ALTERNATING)
                CHECK_MSG(f.f1 == 0 && f.f_full == 0 && fabs(rf.cos - 1) < 1e-12,
                          "%s B=%u f %g %g", names[c], B, f.f1, f.f_full);
            /* Denormal factors carry absolute, not relative, precision. */
            CHECK_MSG(close_rel(f.s_full, rf.s, 1e-5, 1e-44), "%s B=%u s %g vs %g",
                      names[c], B, f.s_full, rf.s);
            /* One-hot: the hot coordinate takes the top level. */
            if (c == ONE_HOT && B > 1)
                CHECK(decode_y(g_bits, g_ext, D, B, 17) == (1u << (B - 1)) - 0.5);
        }
    }
    /* 1e30 entries: |r|^2 does not fit a float and saturates. */
    for (uint32_t i = 0; i < D; i++) r[i] = 1e30f;
    bs_factors f;
    bs_rabitq_encode(r, D, 4, g_bits, g_ext, &f, g_scratch);
    CHECK(f.norm2 == FLT_MAX && factors_finite(&f));
    /* Every level is parallel to a constant vector (cos = 1): whichever the
     * search keeps, s <y, r> = |r|^2 gives s = 1e30 / |y_0|. */
    double y0 = fabs(decode_y(g_bits, g_ext, D, 4, 0));
    CHECK_MSG(close_rel(f.s_full, 1e30 / y0, 1e-5, 0), "s_full %g", f.s_full);
    CHECK(f.f_full == 0);
}

static void test_dots(void) {
    uint64_t st = 99;
    float r[DMAX], x[DMAX];
    for (size_t di = 0; di < NDIMS; di++) {
        const uint32_t D = DIMS[di];
        for (uint32_t B = 1; B <= 9; B++) {
            gaussian(r, D, &st);
            gaussian(x, D, &st);
            bs_factors f;
            bs_rabitq_encode(r, D, B, g_bits, g_ext, &f, g_scratch);
            double bx = 0, ex = 0, ax = 0;
            for (uint32_t i = 0; i < D; i++) {
                uint32_t u = decode_u(g_bits, g_ext, D, B, i);
                uint32_t e = u & ((1u << (B - 1)) - 1);
                bx += bit_of(g_bits, i) * (double)x[i];
                ex += e * (double)x[i];
                ax += fabs((double)x[i]);
            }
            float got_b = bs_bits_dot(g_bits, D, x);
            float got_e = bs_ext_dot(g_ext, D, B, x);
            CHECK_MSG(fabs(got_b - bx) <= 1e-5 * ax, "D=%u bits_dot %g vs %g", D,
                      got_b, bx);
            CHECK_MSG(fabs(got_e - ex) <= 1e-5 * ax * (1u << (B - 1)),
                      "D=%u B=%u ext_dot %g vs %g", D, B, got_e, ex);
            /* Deterministic: the same bits again. */
            float again = bs_ext_dot(g_ext, D, B, x);
            CHECK(memcmp(&again, &got_e, sizeof again) == 0);
        }
        /* B == 1 has no extra code. */
        CHECK(bs_ext_dot(NULL, D, 1, x) == 0.0f);
    }
}

static void test_deterministic(void) {
    uint64_t st = 3;
    float r[768];
    uint8_t bits2[96], ext2[8 * 96];
    gaussian(r, 768, &st);
    for (uint32_t B = 1; B <= 9; B++) {
        bs_factors f1, f2;
        bs_rabitq_encode(r, 768, B, g_bits, g_ext, &f1, g_scratch);
        memset(g_scratch, 0xFF, sizeof g_scratch); /* scratch is not state */
        bs_rabitq_encode(r, 768, B, bits2, ext2, &f2, g_scratch);
        CHECK(memcmp(g_bits, bits2, 96) == 0);
        CHECK(memcmp(g_ext, ext2, bs_ext_bytes(768, B)) == 0);
        CHECK(memcmp(&f1, &f2, sizeof f1) == 0);
    }
}

int main(void) {
    test_codes_and_factors();
    test_estimator();
    test_zero_vector();
    test_adversarial();
    test_dots();
    test_deterministic();
    TEST_MAIN_END();
}
