/* RMSNorm on the CPU (float32), optionally fused with the residual add before it.

   out[r] = w * y / sqrt(mean(y^2) + eps) for each row y of length `dim` (a multiple of 16),
   where y = x[r], or y = x[r] + res[r] (then also written to sum_out[r]: the residual stream).
   One pass over a row instead of torch's five ops (pow, mean, add, rsqrt, two muls), each its
   own parallel region. Rows of x may be strided: x is [tokens, heads, dim] with a token stride
   `x_stride` (the q or k columns of a fused qkv projection); res, sum_out and out are
   contiguous. Small calls (a decode step's few rows) run on the calling thread: no parallel
   region and no barrier. serve_app/kernels/cpu.py builds and loads it. */
#include <math.h>

#include "simd.h"

#define PARALLEL_MIN_FLOATS 65536

void moeserve_rms_norm(const float *x, int64_t x_stride, int64_t heads, const float *res,
                       const float *w, float eps, int64_t tokens, int64_t dim, float *sum_out,
                       float *out, int num_threads) {
    const int64_t rows = tokens * heads;
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (rows * dim >= PARALLEL_MIN_FLOATS)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + (r / heads) * x_stride + (r % heads) * dim;
        float *o = out + r * dim;
        vn ss = (vn){0};
        if (res != NULL) {
            const float *rr = res + r * dim;
            float *sr = sum_out + r * dim;
            for (int64_t i = 0; i < dim; i += VL) {
                const vn y = loadn(xr + i) + loadn(rr + i);
                storen(sr + i, y);
                ss += y * y;
            }
            xr = sr;
        } else {
            for (int64_t i = 0; i < dim; i += VL) {
                const vn y = loadn(xr + i);
                ss += y * y;
            }
        }
        const float inv = 1.0f / sqrtf(hsumn(ss) / (float)dim + eps);
        for (int64_t i = 0; i < dim; i += VL) storen(o + i, loadn(w + i) * (loadn(xr + i) * inv));
    }
}
