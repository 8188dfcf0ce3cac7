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

#define NB 32     /* columns per panel: NB / VL native vectors */
#define MAX_MR 12 /* rows per register tile (AVX-512: 24 accumulators + 2 panel vectors) */

/* ROWS x NB tile over k in [0, kc): out[m, 0:NB] (+)= sum_k x[m, k] * panel[k, 0:NB]; ROWS
   is a constant so the accumulators stay in registers. */
#define NV (NB / VL) /* native vectors per panel row */
#define TILE(ROWS)                                                                         \
    static void tile_##ROWS(const float *x, int64_t ldx, int64_t kc, const float *panel,   \
                            float *out, int64_t ldo, int add) {                            \
        vn acc[ROWS][NV];                                                                  \
        for (int m = 0; m < ROWS; m++)                                                     \
            for (int j = 0; j < NV; j++) acc[m][j] = (vn){0};                              \
        for (int64_t k = 0; k < kc; k++) {                                                 \
            vn w[NV];                                                                      \
            for (int j = 0; j < NV; j++) w[j] = loadn(panel + k * NB + j * VL);            \
            for (int m = 0; m < ROWS; m++) {                                               \
                const vn xv = splat(x[m * ldx + k]);                                    \
                for (int j = 0; j < NV; j++) acc[m][j] += xv * w[j];                       \
            }                                                                              \
        }                                                                                  \
        for (int m = 0; m < ROWS; m++)                                                     \
            for (int j = 0; j < NV; j++) {                                                 \
                float *o = out + m * ldo + j * VL;                                         \
                storen(o, add ? acc[m][j] + loadn(o) : acc[m][j]);                         \
            }                                                                              \
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

/* A whole MoE expert MLP for the rows of every active expert, in one parallel region:
   phase 1, per (expert, gate panel p): the gate panel p and the up panel p + I/NB of w13 into
   gate_up [R, 2I], then act[:, p-th 32 columns] = silu(gate) * up (both halves were just
   computed by this task); phase 2, per (expert, panel of w2): y = act @ w2 into `down`, each
   row scaled by its routing weight and stored at row dest[r] of y (dest is a permutation
   into the (token, k) slots, so no two rows collide; the caller sums the k slots of a token).
   w13 [E, 2I/NB, D, NB], w2 [E, D/NB, I, NB]; I and D multiples of NB. */
void moeserve_moe_mlp(const float *x, int64_t D, const int64_t *row_start,
                      const int64_t *row_end, const int64_t *active, int64_t n_active,
                      const float *w13, const float *w2, int64_t I, const float *row_weight,
                      const int64_t *dest, float *gate_up, float *act, float *down, float *y,
                      int64_t mr, int64_t kc, int num_threads) {
    const int64_t p1 = I / NB, p2 = D / NB, N1 = 2 * I;
    if (mr < 1 || mr > MAX_MR) mr = 8;
    if (kc < 1) kc = D > I ? D : I;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_active * p1; t++) {
            const int64_t e = active[t / p1], p = t % p1, r0 = row_start[e], n = row_end[e] - r0;
            const float *we = w13 + e * 2 * p1 * D * NB;
            float *gu = gate_up + r0 * N1;
            panel_rows(x + r0 * D, n, D, we + p * D * NB, gu + p * NB, N1, mr, kc);
            panel_rows(x + r0 * D, n, D, we + (p + p1) * D * NB, gu + I + p * NB, N1, mr, kc);
            for (int64_t r = 0; r < n; r++)
                silu_mul(gu + r * N1 + p * NB, gu + r * N1 + I + p * NB,
                         act + (r0 + r) * I + p * NB, NB);
        }
        /* the implicit barrier of `omp for`: every act row is complete */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_active * p2; t++) {
            const int64_t e = active[t / p2], p = t % p2, r0 = row_start[e], n = row_end[e] - r0;
            float *dn = down + r0 * D + p * NB;
            panel_rows(act + r0 * I, n, I, w2 + (e * p2 + p) * I * NB, dn, D, mr, kc);
            for (int64_t r = 0; r < n; r++) {
                const float s = row_weight[r0 + r];
                float *yo = y + dest[r0 + r] * D + p * NB;
                for (int j = 0; j < NB; j += VL) storen(yo + j, loadn(dn + r * D + j) * s);
            }
        }
    }
}
