/* Grouped matmul for MoE experts and dense projections on the CPU (float32).

   out[r, :] = x[r, :] @ W[e] for the rows r in [row_start[e], row_end[e]) of each expert e
   listed in `active` (a dense projection is one expert over all rows). x [R, K] and out
   [R, N] are row-major; the weights are packed as [E, N/NB, K, NB]: each NB-column panel of
   an expert is one contiguous stream, read once per call. A task is one (expert, panel); it
   walks K in chunks of `kc` (the panel chunk stays in L1 while every row tile of the expert
   passes over it) and the rows in register tiles of `mr` rows x NB columns.
   At decode an expert sees a handful of rows and the step is bound by streaming the weights
   from DRAM; for prefill the tiles are compute-bound. Both blocking choices come from the
   caller (serve_app/kernels/tuning.py derives them from the CPU's caches and registers).

   Plain C with GCC vector extensions; OpenMP from torch's own libgomp, already loaded in the
   process, so there is one thread pool. serve_app/kernels/cpu.py builds and loads it. */
#include "simd.h"

#define NB 32     /* columns per panel: two 16-float vectors */
#define MAX_MR 12 /* rows per register tile: 24 accumulators + 2 panel vectors of 32 */

/* ROWS x NB tile over k in [0, kc): out[m, 0:NB] (+)= sum_k x[m, k] * panel[k, 0:NB]; ROWS
   is a constant so the accumulators stay in registers. */
#define TILE(ROWS)                                                                         \
    static void tile_##ROWS(const float *x, int64_t ldx, int64_t kc, const float *panel,   \
                            float *out, int64_t ldo, int add) {                            \
        v16 lo[ROWS], hi[ROWS];                                                            \
        for (int m = 0; m < ROWS; m++) lo[m] = hi[m] = (v16){0};                           \
        for (int64_t k = 0; k < kc; k++) {                                                 \
            const v16 w0 = load16(panel + k * NB), w1 = load16(panel + k * NB + 16);       \
            for (int m = 0; m < ROWS; m++) {                                               \
                const float xv = x[m * ldx + k];                                           \
                lo[m] += xv * w0;                                                          \
                hi[m] += xv * w1;                                                          \
            }                                                                              \
        }                                                                                  \
        for (int m = 0; m < ROWS; m++) {                                                   \
            if (add) {                                                                     \
                lo[m] += load16(out + m * ldo);                                            \
                hi[m] += load16(out + m * ldo + 16);                                       \
            }                                                                              \
            store16(out + m * ldo, lo[m]);                                                 \
            store16(out + m * ldo + 16, hi[m]);                                            \
        }                                                                                  \
    }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)

typedef void (*tile_fn)(const float *, int64_t, int64_t, const float *, float *, int64_t, int);
static const tile_fn TILES[MAX_MR + 1] = {
    0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6,
    tile_7, tile_8, tile_9, tile_10, tile_11, tile_12,
};

static void panel_rows(const float *x, int64_t n, int64_t K, const float *panel, float *out,
                       int64_t ldo, int64_t mr, int64_t kc) {
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kn = K - k0 < kc ? K - k0 : kc;
        for (int64_t r = 0; r < n; r += mr) {
            const int64_t rows = n - r < mr ? n - r : mr;
            TILES[rows](x + r * K + k0, K, kn, panel + k0 * NB, out + r * ldo, ldo, k0 > 0);
        }
    }
}

int64_t moeserve_panel_width(void) { return NB; }
int64_t moeserve_max_row_tile(void) { return MAX_MR; }

void moeserve_grouped_mm(const float *x, int64_t K, const int64_t *row_start,
                         const int64_t *row_end, const int64_t *active, int64_t n_active,
                         const float *w, int64_t N, float *out, int64_t mr, int64_t kc,
                         int num_threads) {
    const int64_t panels = N / NB;
    const int64_t tasks = n_active * panels;
    if (mr < 1 || mr > MAX_MR) mr = 8;
    if (kc < 1) kc = K;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t t = 0; t < tasks; t++) {
        const int64_t e = active[t / panels], p = t % panels, r0 = row_start[e];
        panel_rows(x + r0 * K, row_end[e] - r0, K, w + (e * panels + p) * K * NB,
                   out + r0 * N + p * NB, N, mr, kc);
    }
}
