/* Grouped matmul over weight-only quantized experts (int8 per channel, int4 per group) on the
   CPU, float32 activations and accumulation.

   out[r, :] = x[r, :] @ dequant(W[e]) for the rows r in [row_start[e], row_end[e]) of each
   expert e in `active`, blocked as grouped_mm.c's float kernel: a task is one (expert,
   NB-column panel), it walks K in chunks of `kc` and the rows in register tiles of `mr` rows x
   NB columns. The weights stay quantized in memory (1 or 1/2 byte a weight instead of 4: decode
   streams them from DRAM) and are widened to floats in registers, once per K row of the panel
   for all rows of the tile.
   - int8: panels [E, N/NB, K, NB] int8, scales [E, N]; the tile accumulates x * q and scales
     the NB columns once at the end of each K chunk.
   - int4: panels [E, N/NB, K, NB/2] bytes, byte j of a K row holding column j (low nibble) and
     column j + 16 (high nibble); scales and zeros [E, N/NB, K/G, 2, NB] (G the group size,
     a multiple of 16 dividing K); w = (q - 8) * scale + zero, as torch's int4pack ops.
   - bf16: panels [E, N/NB, K/2, NB, 2] bf16 bits (K even): the two K rows of a pair
     interleaved per column (the VNNI layout of SGLang's CPU bf16 GEMM, `convert_weight_packed`,
     which avx512_bf16's `vdpbf16ps` multiplies as it is). A 32-bit lane holds (w[k], w[k+1]) of
     one column: w[k] = lane << 16 and w[k+1] = lane & 0xffff0000 as float bits, two integer ops
     per weight vector pair, no conversion instruction. Where the CPU has avx512_bf16 (and the
     native 16-float width) the tile rounds the activations to bf16 once per call and
     accumulates with vdpbf16ps instead (fp32 accumulation either way).
   serve_app/kernels/quant.py packs the weights and loads this. */
#include "simd.h"
#include <stdlib.h>

#define NB 32
#define MAX_MR 12

typedef uint8_t v16u8 __attribute__((vector_size(16)));

/* Bytes -> VL floats (simd.h's native vector, or the width a test forces). GCC lowers a generic
   char -> float vector conversion to scalar code, so the ISA's own widening is used where it
   matches the width; the generic conversion remains for a forced width the ISA lacks. */
#if VL == 16 && defined(__AVX512F__)
#include <immintrin.h>
static inline vn widen_s8(const int8_t *p) {
    return (vn)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)p)));
}
/* bytes [part * VL, part * VL + VL) of b */
static inline vn widen_u8(v16u8 b, int part) {
    (void)part;
    return (vn)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)b));
}
#elif VL == 8 && defined(__AVX2__)
#include <immintrin.h>
static inline vn widen_s8(const int8_t *p) {
    return (vn)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)p)));
}
static inline vn widen_u8(v16u8 b, int part) {
    const __m128i i = part ? _mm_srli_si128((__m128i)b, 8) : (__m128i)b;
    return (vn)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(i));
}
#else
typedef int8_t vns8 __attribute__((vector_size(VL)));
typedef uint8_t vnu8 __attribute__((vector_size(VL)));
static inline vn widen_s8(const int8_t *p) {
    vns8 b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vn);
}
static inline vn widen_u8(v16u8 b, int part) {
    vnu8 h;
    memcpy(&h, (const uint8_t *)&b + part * VL, sizeof h);
    return __builtin_convertvector(h, vn);
}
#endif
#define NV (NB / VL) /* vectors per panel row */

/* One K row of an int8 panel: NB weights as NV vectors. */
static inline void row_q8(const int8_t *p, vn *w) {
    for (int j = 0; j < NV; j++) w[j] = widen_s8(p + j * VL);
}

/* One K row of an int4 panel (NB/2 bytes: low nibbles columns 0..15, high 16..31) as floats
   0..15 (the group's scale and zero are applied by the tile). */
static inline void row_q4(const uint8_t *p, vn *w) {
    v16u8 b;
    memcpy(&b, p, sizeof b);
    const v16u8 lo = b & 15, hi = b >> 4;
    for (int j = 0; j < NV; j++) {
        const int col = j * VL; /* columns col .. col + VL */
        w[j] = widen_u8(col < 16 ? lo : hi, (col % 16) / VL);
    }
}

/* out[m, 0:NB] (+)= the tile's rows (inlined: `rows` is a constant in each tile). */
static inline __attribute__((always_inline)) void store_tile(vn acc[][NV], int rows, float *out,
                                                             int64_t ldo, int add) {
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < NV; j++) {
            float *o = out + m * ldo + j * VL;
            storen(o, add ? acc[m][j] + loadn(o) : acc[m][j]);
        }
}

/* ROWS x NB tile over k in [0, kc) of an int8 panel; ROWS constant so the accumulators stay in
   registers. out (+)= (sum_k x * q) * scale. */
#define TILE_Q8(ROWS)                                                                          \
    static void q8_##ROWS(const float *x, int64_t ldx, int64_t kc, const int8_t *panel,        \
                          const float *scale, int64_t group, const float *sz, float *out,      \
                          int64_t ldo, int add) {                                              \
        (void)group; (void)sz;                                                                 \
        vn acc[ROWS][NV] = {0}, w[NV];                                                         \
        for (int64_t k = 0; k < kc; k++) {                                                     \
            row_q8(panel + k * NB, w);                                                         \
            for (int m = 0; m < ROWS; m++) {                                                   \
                const float xv = x[m * ldx + k];                                               \
                for (int j = 0; j < NV; j++) acc[m][j] += xv * w[j];                           \
            }                                                                                  \
        }                                                                                      \
        for (int m = 0; m < ROWS; m++)                                                         \
            for (int j = 0; j < NV; j++) acc[m][j] *= loadn(scale + j * VL);                   \
        store_tile(acc, ROWS, out, ldo, add);                                                  \
    }

/* The same over an int4 panel: kc is a multiple of the group, and `sz` points at the scales and
   zeros of the chunk's first group. The K loop multiplies the raw nibbles (0..15) and each
   group's scale and zero are applied once at its end: sum_k x (q s + z') = s sum_k x q +
   z' sum_k x, z' = zero - 8 s, so a K row costs its widening and the rows' FMAs, no dequantizing
   FMA per weight vector. Each group's part is added to `out` (L1-resident) at the group's end,
   so the tile holds no second set of accumulators. */
#define TILE_Q4(ROWS)                                                                          \
    static void q4_##ROWS(const float *x, int64_t ldx, int64_t kc, const int8_t *panel_s,      \
                          const float *scale, int64_t group, const float *sz, float *out,      \
                          int64_t ldo, int add) {                                              \
        (void)scale;                                                                           \
        const uint8_t *panel = (const uint8_t *)panel_s;                                       \
        for (int64_t g0 = 0; g0 < kc; g0 += group) {                                           \
            vn acc[ROWS][NV] = {0}, w[NV];                                                     \
            float xs[ROWS];                                                                    \
            for (int m = 0; m < ROWS; m++) {                                                   \
                vn v = {0};                                                                    \
                for (int64_t k = g0; k < g0 + group; k += VL) v += loadn(x + m * ldx + k);     \
                xs[m] = hsumn(v);                                                              \
            }                                                                                  \
            for (int64_t k = g0; k < g0 + group; k++) {                                        \
                row_q4(panel + k * (NB / 2), w);                                               \
                for (int m = 0; m < ROWS; m++) {                                               \
                    const float xv = x[m * ldx + k];                                           \
                    for (int j = 0; j < NV; j++) acc[m][j] += xv * w[j];                       \
                }                                                                              \
            }                                                                                  \
            const float *gs = sz + (g0 / group) * 2 * NB;                                      \
            for (int m = 0; m < ROWS; m++)                                                     \
                for (int j = 0; j < NV; j++) {                                                 \
                    const vn s = loadn(gs + j * VL);                                           \
                    const vn z = loadn(gs + NB + j * VL) - 8.0f * s;                           \
                    acc[m][j] = acc[m][j] * s + xs[m] * z;                                     \
                }                                                                              \
            store_tile(acc, ROWS, out, ldo, add || g0 > 0);                                    \
        }                                                                                      \
    }

/* VL columns of one K-row pair of a bf16 panel (4 bytes a column): the rows k and k + 1 as
   float vectors (bf16 is the top half of a float's bits). */
typedef uint32_t vnu __attribute__((vector_size(VL * 4)));
static inline void bf16_pair(const uint16_t *p, vn *w0, vn *w1) {
    vnu v;
    memcpy(&v, p, sizeof v);
    const vnu lo = v << 16, hi = v & 0xffff0000u;
    memcpy(w0, &lo, sizeof lo);
    memcpy(w1, &hi, sizeof hi);
}

/* Rows of a bf16 tile: its accumulators (NV a row), two activation broadcasts a row (hoisted out
   of the column loop by GCC), two weight vectors and the mask within the ISA's 16 (AVX2) or 32
   (AVX-512) vector registers: 2 rows on AVX2, 7 on AVX-512. At AVX2's default 3 rows the tile
   spilled five accumulators to the stack inside its K loop (objdump). */
#define B16_MR (((VL == 16 ? 32 : 16) - 3) / (NV + 2))

/* ROWS x NB tile over k in [0, kc) (kc even) of a bf16 panel; out (+)= x @ w. */
#define TILE_BF16(ROWS)                                                                        \
    static void b16_##ROWS(const float *x, int64_t ldx, int64_t kc, const int8_t *panel_s,     \
                           const float *scale, int64_t group, const float *sz, float *out,     \
                           int64_t ldo, int add) {                                             \
        (void)scale; (void)group; (void)sz;                                                    \
        const uint16_t *panel = (const uint16_t *)panel_s;                                     \
        vn acc[ROWS][NV] = {0};                                                                \
        for (int64_t k = 0; k < kc; k += 2) {                                                  \
            for (int j = 0; j < NV; j++) { /* column vector outer: 2 weight registers live */  \
                vn w0, w1;                                                                     \
                bf16_pair(panel + k * NB + 2 * j * VL, &w0, &w1);                              \
                for (int m = 0; m < ROWS; m++) { /* two FMAs (not mul, FMA and add) */       \
                    acc[m][j] += x[m * ldx + k] * w0;                                          \
                    acc[m][j] += x[m * ldx + k + 1] * w1;                                      \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        store_tile(acc, ROWS, out, ldo, add);                                                  \
    }

#define TILES_OF(T) T(1) T(2) T(3) T(4) T(5) T(6) T(7) T(8) T(9) T(10) T(11) T(12)
TILES_OF(TILE_Q8)
TILES_OF(TILE_Q4)
TILES_OF(TILE_BF16)

typedef void (*qtile_fn)(const float *, int64_t, int64_t, const int8_t *, const float *, int64_t,
                         const float *, float *, int64_t, int);
static const qtile_fn Q8[MAX_MR + 1] = {0, q8_1, q8_2, q8_3, q8_4, q8_5, q8_6,
                                        q8_7, q8_8, q8_9, q8_10, q8_11, q8_12};
static const qtile_fn Q4[MAX_MR + 1] = {0, q4_1, q4_2, q4_3, q4_4, q4_5, q4_6,
                                        q4_7, q4_8, q4_9, q4_10, q4_11, q4_12};
static const qtile_fn B16[MAX_MR + 1] = {0, b16_1, b16_2, b16_3, b16_4, b16_5, b16_6,
                                         b16_7, b16_8, b16_9, b16_10, b16_11, b16_12};


#if VL == 16 && defined(__AVX512BF16__)
/* avx512_bf16: x here is the call's activations as bf16 pairs (see to_bf16_pairs), a uint32 at
   each even k holding (x[k], x[k + 1]); vdpbf16ps adds x[k] * w[k] + x[k + 1] * w[k + 1] into
   each fp32 lane, the panel's pair layout read as it is. */
#define DPBF16 1
#define TILE_DP(ROWS)                                                                          \
    static void dp_##ROWS(const float *x, int64_t ldx, int64_t kc, const int8_t *panel_s,      \
                          const float *scale, int64_t group, const float *sz, float *out,      \
                          int64_t ldo, int add) {                                              \
        (void)scale; (void)group; (void)sz;                                                    \
        const uint16_t *panel = (const uint16_t *)panel_s;                                     \
        const uint32_t *xp = (const uint32_t *)x;                                              \
        __m512 acc[ROWS][NV];                                                                  \
        for (int m = 0; m < ROWS; m++)                                                         \
            for (int j = 0; j < NV; j++) acc[m][j] = _mm512_setzero_ps();                      \
        for (int64_t k = 0; k < kc; k += 2) {                                                  \
            __m512i w[NV];                                                                     \
            for (int j = 0; j < NV; j++) w[j] = _mm512_loadu_si512(panel + k * NB + 2 * j * VL); \
            for (int m = 0; m < ROWS; m++) {                                                   \
                const __m512i xv = _mm512_set1_epi32((int)xp[m * ldx + k]);                    \
                for (int j = 0; j < NV; j++)                                                   \
                    acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xv, (__m512bh)w[j]);     \
            }                                                                                  \
        }                                                                                      \
        vn r[ROWS][NV];                                                                        \
        memcpy(r, acc, sizeof r);                                                              \
        store_tile(r, ROWS, out, ldo, add);                                                    \
    }
TILES_OF(TILE_DP)
static const qtile_fn DP[MAX_MR + 1] = {0, dp_1, dp_2, dp_3, dp_4, dp_5, dp_6,
                                        dp_7, dp_8, dp_9, dp_10, dp_11, dp_12};

/* rows [0, n) of x [n, K] (K even) -> xp [n, K] uint32, xp[r, k] for even k the bf16 pair
   (x[r, k], x[r, k + 1]) rounded to nearest even (odd k unused: the float path's indexing). */
static void to_bf16_pairs(const float *x, int64_t n, int64_t K, uint32_t *xp, int threads) {
#pragma omp parallel for num_threads(threads)
    for (int64_t r = 0; r < n; r++)
        for (int64_t k = 0; k < K; k += 2) {
            uint32_t a, b;
            memcpy(&a, x + r * K + k, 4);
            memcpy(&b, x + r * K + k + 1, 4);
            a = (a + 0x7fff + ((a >> 16) & 1)) >> 16;
            b = (b + 0x7fff + ((b >> 16) & 1)) >> 16;
            xp[r * K + k] = a | (b << 16);
        }
}
#endif

/* bits 8, 4 or 16 (bf16; `tiles` B16, or DP over bf16 pairs in x). For int8 `scale` is the
   panel's NB column scales; for int4 `sz` the panel's [K/G, 2, NB] scales and zeros. */
static void qpanel_rows(int bits, const qtile_fn *tiles, const float *x, int64_t n, int64_t K,
                        const int8_t *panel, const float *scale, int64_t group, const float *sz,
                        float *out, int64_t ldo, int64_t mr, int64_t kc) {
    const int64_t row_bytes = bits == 16 ? 2 * NB : bits == 8 ? NB : NB / 2;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kn = K - k0 < kc ? K - k0 : kc;
        const float *chunk_sz = bits == 4 ? sz + (k0 / group) * 2 * NB : sz;
        for (int64_t r = 0; r < n; r += mr) {
            const int64_t rows = n - r < mr ? n - r : mr;
            tiles[rows](x + r * K + k0, K, kn, panel + k0 * row_bytes, scale, group, chunk_sz,
                        out + r * ldo, ldo, k0 > 0);
        }
    }
}

int64_t moeserve_quant_panel_width(void) { return NB; }

/* Whether the bf16 tiles are avx512_bf16's (vdpbf16ps over bf16 pairs of the activations): the
   fused MLP below widens instead, so its callers keep the grouped calls there. */
int64_t moeserve_quant_has_dpbf16(void) {
#ifdef DPBF16
    return 1;
#else
    return 0;
#endif
}

/* One matrix's layout: N outputs over K inputs, its panel bytes and the blocking it takes. */
typedef struct {
    int bits;
    int64_t K, panels, panel_bytes, groups, group, mr, kc;
} qmat;

static qmat qmat_of(int bits, int64_t N, int64_t K, int64_t group, int64_t mr, int64_t kc) {
    qmat m = {bits, K, N / NB, K * (bits == 16 ? 2 * NB : bits == 8 ? NB : NB / 2),
              bits == 4 ? K / group : 1, group, mr, kc};
    if (m.mr < 1 || m.mr > MAX_MR) m.mr = 3;
    if (m.kc < 1 || m.kc > K) m.kc = K;
    if (bits == 4) m.kc = m.kc < group ? group : m.kc / group * group; /* whole groups */
    if (bits == 16) m.kc = m.kc < 2 ? 2 : m.kc / 2 * 2;                 /* whole K-row pairs */
    if (bits == 16 && m.mr > B16_MR) m.mr = B16_MR;
    return m;
}

/* Rows x [n, K] times panel p of expert e (its scales: `scale` [E, N] for int8, `sz`
   [E, N/NB, K/G, 2, NB] for int4) into out [n, NB] (row stride ldo). */
static void qmat_panel(const qmat *m, const qtile_fn *tiles, const float *x, int64_t n,
                       const int8_t *w, const float *params, int64_t e, int64_t p, float *out,
                       int64_t ldo) {
    const int64_t ep = e * m->panels + p;
    qpanel_rows(m->bits, tiles, x, n, m->K, w + ep * m->panel_bytes,
                m->bits == 8 ? params + ep * NB : 0, m->group,
                m->bits == 4 ? params + ep * m->groups * 2 * NB : 0, out, ldo, m->mr, m->kc);
}

static const qtile_fn *widening_tiles(int bits) { return bits == 8 ? Q8 : bits == 4 ? Q4 : B16; }

/* bits 8: w [E, N/NB, K, NB] int8, params the scales [E, N].
   bits 4: w [E, N/NB, K, NB/2] bytes, params the scales and zeros [E, N/NB, K/group, 2, NB].
   bits 16: w [E, N/NB, K/2, NB, 2] bf16 (K even), params and group unused. */
void moeserve_grouped_mm_quant(int bits, const float *x, int64_t K, const int64_t *row_start,
                               const int64_t *row_end, const int64_t *active, int64_t n_active,
                               const int8_t *w, const float *params, int64_t group, int64_t N,
                               float *out, int64_t mr, int64_t kc, int num_threads) {
    const qmat m = qmat_of(bits, N, K, group, mr, kc);
    const qtile_fn *tiles = widening_tiles(bits);
#ifdef DPBF16
    uint32_t *xp = 0;
    if (bits == 16) {
        int64_t rows = 0;
        for (int64_t a = 0; a < n_active; a++)
            rows = row_end[active[a]] > rows ? row_end[active[a]] : rows;
        xp = malloc((size_t)(rows > 0 ? rows : 1) * K * 4);
        if (xp) { /* else the widening tiles, on the float32 activations */
            to_bf16_pairs(x, rows, K, xp, num_threads);
            x = (const float *)xp;
            tiles = DP;
        }
    }
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t t = 0; t < n_active * m.panels; t++) {
        const int64_t e = active[t / m.panels], p = t % m.panels, r0 = row_start[e];
        qmat_panel(&m, tiles, x + r0 * K, row_end[e] - r0, w, params, e, p, out + r0 * N + p * NB,
                   N);
    }
#ifdef DPBF16
    free(xp);
#endif
}

/* grouped_mm.c's moeserve_moe_mlp over quantized experts (widening tiles only): one parallel
   region per MoE layer instead of two grouped calls, an activation and a scatter-add.
   Phase 1, per (expert, gate panel p): gate panel p and up panel p + I/NB of w13 [E, 2I, D]
   into gate_up [n, 2I], then act[:, the panel's NB columns] = silu(gate) * up; phase 2, per
   (expert, panel of w2 [E, D, I]): down = act @ w2, each row times its routing weight stored at
   row dest[r] of y (distinct (token, k) slots: no two rows collide). p13 / p2: each matrix's
   params and int4 group as in moeserve_grouped_mm_quant; I and D multiples of NB. */
void moeserve_moe_mlp_quant(int bits, const float *x, int64_t D, const int64_t *row_start,
                            const int64_t *row_end, const int64_t *active, int64_t n_active,
                            const int8_t *w13, const float *p13, const int8_t *w2,
                            const float *p2, int64_t group13, int64_t group2, int64_t I,
                            const float *row_weight,
                            const int64_t *dest, float *gate_up, float *act, float *down, float *y,
                            int64_t mr, int64_t kc, int num_threads) {
    const qmat m13 = qmat_of(bits, 2 * I, D, group13, mr, kc);
    const qmat m2 = qmat_of(bits, D, I, group2, mr, kc);
    const qtile_fn *tiles = widening_tiles(bits);
    const int64_t p1 = I / NB, N1 = 2 * I;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_active * p1; t++) {
            const int64_t e = active[t / p1], p = t % p1, r0 = row_start[e], n = row_end[e] - r0;
            float *gu = gate_up + r0 * N1;
            qmat_panel(&m13, tiles, x + r0 * D, n, w13, p13, e, p, gu + p * NB, N1);
            qmat_panel(&m13, tiles, x + r0 * D, n, w13, p13, e, p + p1, gu + I + p * NB, N1);
            for (int64_t r = 0; r < n; r++)
                silu_mul(gu + r * N1 + p * NB, gu + r * N1 + I + p * NB,
                         act + (r0 + r) * I + p * NB, NB);
        }
        /* the implicit barrier of `omp for`: every act row is complete */
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_active * m2.panels; t++) {
            const int64_t e = active[t / m2.panels], p = t % m2.panels, r0 = row_start[e];
            const int64_t n = row_end[e] - r0;
            float *dn = down + r0 * D + p * NB;
            qmat_panel(&m2, tiles, act + r0 * I, n, w2, p2, e, p, dn, D);
            for (int64_t r = 0; r < n; r++) {
                const float s = row_weight[r0 + r];
                float *yo = y + dest[r0 + r] * D + p * NB;
                for (int j = 0; j < NB; j += VL) storen(yo + j, loadn(dn + r * D + j) * s);
            }
        }
    }
}
