/* Grouped small-M matmul for MoE experts on the CPU (float32).

   out[r, :] = x[r, :] @ W[e] for the rows r in [row_start[e], row_end[e]) of each expert e
   listed in `active`. x [R, K] and out [R, N] are row-major; the weights are packed as
   [E, N/NB, K, NB]: each NB-column panel of an expert is one contiguous stream, read once per
   call (the rows of that expert reuse it from L1/L2). At decode an expert sees a handful of
   rows and the step is bound by streaming the weights from DRAM; MKL's general sgemm reaches
   about half the DRAM bandwidth at that size (docs/benchmarks.md).

   Plain C with GCC vector extensions (AVX-512 or AVX2 code from -march=native); OpenMP from
   torch's own libgomp, already loaded in the process, so there is one thread pool.
   serve_app/kernels/cpu.py builds and loads it. */
#include <stdint.h>
#include <string.h>

#define NB 32 /* columns per panel: two 16-float vectors */
#define MB 8  /* rows per register tile: 16 accumulators */

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* ROWS x NB tile: out[m, 0:NB] = sum_k x[m, k] * panel[k, 0:NB]; ROWS is a constant so the
   accumulators stay in registers. */
#define TILE(ROWS)                                                                         \
    static void tile_##ROWS(const float *x, int64_t K, const float *panel, float *out,     \
                            int64_t ldo) {                                                 \
        v16 lo[ROWS], hi[ROWS];                                                            \
        for (int m = 0; m < ROWS; m++) lo[m] = hi[m] = (v16){0};                           \
        for (int64_t k = 0; k < K; k++) {                                                  \
            const v16 w0 = load16(panel + k * NB), w1 = load16(panel + k * NB + 16);       \
            for (int m = 0; m < ROWS; m++) {                                               \
                const float xv = x[m * K + k];                                             \
                lo[m] += xv * w0;                                                          \
                hi[m] += xv * w1;                                                          \
            }                                                                              \
        }                                                                                  \
        for (int m = 0; m < ROWS; m++) {                                                   \
            store16(out + m * ldo, lo[m]);                                                 \
            store16(out + m * ldo + 16, hi[m]);                                            \
        }                                                                                  \
    }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)

static void panel_rows(const float *x, int64_t n, int64_t K, const float *panel, float *out,
                       int64_t ldo) {
    for (int64_t r = 0; r < n; r += MB, x += MB * K, out += MB * ldo) {
        switch (n - r < MB ? n - r : MB) {
        case 1: tile_1(x, K, panel, out, ldo); break;
        case 2: tile_2(x, K, panel, out, ldo); break;
        case 3: tile_3(x, K, panel, out, ldo); break;
        case 4: tile_4(x, K, panel, out, ldo); break;
        case 5: tile_5(x, K, panel, out, ldo); break;
        case 6: tile_6(x, K, panel, out, ldo); break;
        case 7: tile_7(x, K, panel, out, ldo); break;
        default: tile_8(x, K, panel, out, ldo); break;
        }
    }
}

int64_t moeserve_panel_width(void) { return NB; }

void moeserve_grouped_mm(const float *x, int64_t K, const int64_t *row_start,
                         const int64_t *row_end, const int64_t *active, int64_t n_active,
                         const float *w, int64_t N, float *out, int num_threads) {
    const int64_t panels = N / NB;
    const int64_t tasks = n_active * panels;
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t e = active[t / panels], p = t % panels, r0 = row_start[e];
        panel_rows(x + r0 * K, row_end[e] - r0, K, w + (e * panels + p) * K * NB,
                   out + r0 * N + p * NB, N);
    }
}
