/* Exact distances for reranking (bitshard.h, bs_exact_distances): summed
 * in double in one fixed order, so every caller gets the same bits. */
#include <math.h>

#include "bitshard.h"
#include "error.h"

bs_status bs_exact_distances(bs_metric metric, const float *q, const float *x,
                             size_t n, uint32_t dim, float *out, bs_error *err) {
    if ((n > 0 && (q == NULL || x == NULL || out == NULL)) || dim == 0)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "bad arguments to exact distances");
    if (metric != BS_METRIC_L2 && metric != BS_METRIC_COSINE && metric != BS_METRIC_DOT)
        return bs_fail(err, BS_ERR_INVALID_ARGUMENT, "unknown metric %d", (int)metric);
    double qn = 0.0;
    for (uint32_t j = 0; j < dim; j++) qn += (double)q[j] * q[j];
    for (size_t i = 0; i < n; i++) {
        const float *v = x + i * dim;
        double acc = 0.0, vn = 0.0;
        if (metric == BS_METRIC_L2) {
            for (uint32_t j = 0; j < dim; j++) {
                double d = (double)q[j] - (double)v[j];
                acc += d * d;
            }
            out[i] = (float)acc;
            continue;
        }
        for (uint32_t j = 0; j < dim; j++) {
            acc += (double)q[j] * v[j];
            vn += (double)v[j] * v[j];
        }
        if (metric == BS_METRIC_DOT) {
            out[i] = (float)(1.0 - acc);
        } else if (qn == 0.0 || vn == 0.0) {
            out[i] = 1.0f; /* a zero vector has no direction: cos taken as 0 */
        } else {
            out[i] = (float)(1.0 - acc / (sqrt(qn) * sqrt(vn)));
        }
    }
    return BS_OK;
}
