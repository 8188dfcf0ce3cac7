/* Paged attention for decoding sequences on the CPU (float32), reading K/V in place.

   One query token per sequence attends to its context through its block table: no gather of
   the context into a contiguous buffer and no padding to the longest sequence. Each (sequence,
   KV head) task runs an online softmax over the context one block at a time for the G query
   heads that share the KV head (GQA), so it needs no buffer the size of the context.
   Layouts: q, out [n, H, D]; k_cache, v_cache [num_blocks, B, Hkv, D]; block_tables [n,
   max_blocks]; keys of sequence i are positions [start[i], ctx_lens[i]) (start > 0 for a
   sliding window). serve_app/kernels/cpu.py builds and loads it. */
#include <math.h>
#include <stdint.h>

#define MAX_GD 4096 /* G * D floats of accumulator per task (checked by the caller) */
#define MAX_B 64    /* block size */

static void decode_task(const float *q, const float *k_cache, const float *v_cache,
                        const int64_t *table, int64_t start, int64_t len, float *out,
                        int64_t G, int64_t D, int64_t B, int64_t Hkv, int64_t h, float scale) {
    float acc[MAX_GD], m[64], l[64], s[64 * MAX_B];
    for (int64_t g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.0f; }
    for (int64_t i = 0; i < G * D; i++) acc[i] = 0.0f;
    const int64_t row = Hkv * D; /* floats between consecutive tokens of a block */
    for (int64_t p0 = start - start % B; p0 < len; p0 += B) {
        const int64_t blk = table[p0 / B];
        const int64_t t0 = p0 < start ? start - p0 : 0;
        const int64_t t1 = len - p0 < B ? len - p0 : B;
        const float *kb = k_cache + blk * B * row + h * D;
        const float *vb = v_cache + blk * B * row + h * D;
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float mx = m[g];
            for (int64_t t = t0; t < t1; t++) {
                const float *kt = kb + t * row;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; d++) dot += qg[d] * kt[d];
                dot *= scale;
                s[g * MAX_B + t] = dot;
                if (dot > mx) mx = dot;
            }
            const float corr = expf(m[g] - mx); /* 0 on the first block (m = -inf) */
            float *ag = acc + g * D;
            l[g] *= corr;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) ag[d] *= corr;
            for (int64_t t = t0; t < t1; t++) {
                const float pr = expf(s[g * MAX_B + t] - mx);
                const float *vt = vb + t * row;
                l[g] += pr;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ag[d] += pr * vt[d];
            }
            m[g] = mx;
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = 1.0f / l[g];
        for (int64_t d = 0; d < D; d++) out[g * D + d] = acc[g * D + d] * inv;
    }
}

int64_t moeserve_paged_decode_limits(int64_t which) { return which == 0 ? MAX_GD : MAX_B; }

void moeserve_paged_decode(const float *q, const float *k_cache, const float *v_cache,
                           const int64_t *block_tables, int64_t max_blocks,
                           const int64_t *ctx_lens, const int64_t *starts, int64_t n,
                           int64_t H, int64_t Hkv, int64_t D, int64_t B, float scale,
                           float *out, int num_threads) {
    const int64_t G = H / Hkv;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t task = 0; task < n * Hkv; task++) {
        const int64_t i = task / Hkv, h = task % Hkv;
        decode_task(q + (i * H + h * G) * D, k_cache, v_cache, block_tables + i * max_blocks,
                    starts[i], ctx_lens[i], out + (i * H + h * G) * D, G, D, B, Hkv, h, scale);
    }
}
