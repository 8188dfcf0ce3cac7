/* Paged attention for prefill chunks on the CPU (float32), reading K/V in place.

   Every sequence computing q_len > 1 tokens (a prompt chunk after a cached prefix, or a whole
   prompt) attends causally to its context through its block table, all sequences in one
   parallel call: no gather of the cached context, no mask tensors, no padding. A task is one
   (sequence, tile of `qt` query tokens, KV head): its R = qt x G query rows (G query heads
   share the KV head) stay in L1/L2 while the context streams past in steps of 64 keys (whole
   blocks), read in place in the cache's own [key, D] layout.
   The query rows live in the lanes of the vectors (Q is transposed once per task into
   [D, R]): the scores of 4 keys x up to 64 rows are 16 vector accumulators fed by one
   broadcast of a K element each, so K is never transposed; the online softmax is then plain
   vector work across rows (running max, masks from each row's visible range, exp, sums: no
   horizontal max or sum), and P @ V takes 4 rows x 64 values per key with each V row loaded
   once for the 4 rows. (The previous kernel transposed every 64-key step of K for every query
   tile and kept rows in scalars: ~2x slower on an AMD EPYC.)
   Layouts: q, out [T, H, D] (the flattened batch; sequence i's tokens start at q_start[i]);
   k_cache, v_cache [num_blocks, B, Hkv, D]; block_tables [n, max_blocks]. The query tokens of
   sequence i are its positions [ctx_len - q_len, ctx_len); a key at position p is visible to
   the query at position s when p <= s and, with a window W > 0, p > s - W.
   D is a multiple of 16 up to 256; B up to 64; qt x G up to 64 (checked by the caller).
   serve_app/kernels/cpu.py builds and loads it. */
#include <math.h>
#include <stdlib.h>

#include "simd.h"

#define MAX_R 64  /* query rows of a task: qt x G */
#define MAX_RV (MAX_R / 16)
#define MAX_D 256 /* head dim */
#define MAX_B 64  /* block size */
#define KC 64     /* keys per softmax step: whole blocks, at least one */
#define MAX_KC (KC > MAX_B ? KC : MAX_B)
#define KB 4      /* keys whose scores are computed together */
#define RB 4      /* rows whose P @ V is computed together */

typedef struct {
    float qt[MAX_D][MAX_R];        /* scaled queries, transposed: rows in lanes */
    float st[MAX_KC + KB][MAX_R];  /* this step's scores, then probabilities, [key][row] */
    float acc[MAX_R + RB][MAX_D];  /* unnormalised outputs */
    float m[MAX_R], l[MAX_R];      /* running max and sum per row */
    float pos[MAX_R];              /* position of each row's query token (-1: padding) */
    float kpos[MAX_KC + KB];       /* position of each key of the step (+inf: padding) */
    const float *kr[MAX_KC + KB];  /* this step's K and V rows, in place in the cache */
    const float *vr[MAX_KC + KB];
    float zero[MAX_D];             /* K of padding keys */
} Scratch;

/* st[t0..t0+KB)[0..16 RV) = the KB keys' rows of K . the transposed query rows */
#define SCORES(RV)                                                                          \
    static void scores_##RV(Scratch *w, int64_t t0, int64_t D) {                            \
        v16 a[KB][RV];                                                                      \
        for (int j = 0; j < KB; j++)                                                        \
            for (int c = 0; c < RV; c++) a[j][c] = (v16){0};                                \
        const float *k0 = w->kr[t0], *k1 = w->kr[t0 + 1], *k2 = w->kr[t0 + 2],              \
                    *k3 = w->kr[t0 + 3];                                                    \
        for (int64_t d = 0; d < D; d++) {                                                   \
            v16 qv[RV];                                                                     \
            for (int c = 0; c < RV; c++) qv[c] = load16(&w->qt[d][16 * c]);                 \
            const float kv[KB] = {k0[d], k1[d], k2[d], k3[d]};                              \
            for (int j = 0; j < KB; j++)                                                    \
                for (int c = 0; c < RV; c++) a[j][c] += kv[j] * qv[c];                      \
        }                                                                                   \
        for (int j = 0; j < KB; j++)                                                        \
            for (int c = 0; c < RV; c++) store16(&w->st[t0 + j][16 * c], a[j][c]);          \
    }
SCORES(1) SCORES(2) SCORES(3) SCORES(4)

/* acc[r0..r0+RB)[d0..d0+64) += P[r][t] V[t][d0..d0+64) over the step's nk keys */
static void pv_rows(Scratch *w, int64_t r0, int64_t d0, int64_t nk) {
    v16 a[RB][4];
    for (int i = 0; i < RB; i++)
        for (int c = 0; c < 4; c++) a[i][c] = load16(&w->acc[r0 + i][d0 + 16 * c]);
    for (int64_t t = 0; t < nk; t++) {
        const float *vt = w->vr[t] + d0;
        const v16 v0 = load16(vt), v1 = load16(vt + 16), v2 = load16(vt + 32), v3 = load16(vt + 48);
        for (int i = 0; i < RB; i++) {
            const float p = w->st[t][r0 + i];
            a[i][0] += p * v0;
            a[i][1] += p * v1;
            a[i][2] += p * v2;
            a[i][3] += p * v3;
        }
    }
    for (int i = 0; i < RB; i++)
        for (int c = 0; c < 4; c++) store16(&w->acc[r0 + i][d0 + 16 * c], a[i][c]);
}

/* the same for D - d0 < 64 values (a head dim that is no multiple of 64) */
static void pv_rows_tail(Scratch *w, int64_t r0, int64_t d0, int64_t D, int64_t nk) {
    for (int64_t t = 0; t < nk; t++)
        for (int i = 0; i < RB; i++) {
            const float p = w->st[t][r0 + i];
            for (int64_t d = d0; d < D; d += 16)
                store16(&w->acc[r0 + i][d], load16(&w->acc[r0 + i][d]) + p * load16(w->vr[t] + d));
        }
}

static void prefill_task(const float *q, const float *k_cache, const float *v_cache,
                         const int64_t *table, int64_t q_len, int64_t ctx_len, int64_t tok0,
                         int64_t ntok, int64_t hk, int64_t H, int64_t Hkv, int64_t D,
                         int64_t B, int64_t window, float scale, float *out, Scratch *w) {
    const int64_t G = H / Hkv, R = ntok * G, RV = (R + 15) / 16, row = Hkv * D;
    const int64_t first = ctx_len - q_len + tok0, last = first + ntok - 1; /* positions */
    const int64_t step = KC >= B ? KC / B * B : B; /* keys per softmax step: whole blocks */
    for (int64_t r = 0; r < RV * 16; r++) {
        w->m[r] = -INFINITY;
        w->l[r] = 0.0f;
        w->pos[r] = -1.0f;
    }
    for (int64_t r = 0; r < RV * 16; r++)
        for (int64_t d = 0; d < D; d++) w->acc[r][d] = 0.0f;
    for (int64_t d = 0; d < D; d++)
        for (int64_t r = R; r < RV * 16; r++) w->qt[d][r] = 0.0f;
    for (int64_t t = 0; t < ntok; t++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t r = t * G + g;
            const float *src = q + ((tok0 + t) * H + hk * G + g) * D;
            for (int64_t d = 0; d < D; d++) w->qt[d][r] = src[d] * scale;
            w->pos[r] = (float)(first + t);
        }
    for (int64_t d = 0; d < D; d++) w->zero[d] = 0.0f;
    const v16 ninf = (v16){0} - INFINITY;
    const int64_t lo = window > 0 && first - window + 1 > 0 ? first - window + 1 : 0;
    for (int64_t p0 = lo - lo % B; p0 <= last; p0 += step) {
        /* keys [p0, p0 + nk): whole blocks up to the tile's last position */
        const int64_t end = last + 1 < p0 + step ? last + 1 : p0 + step;
        const int64_t nk = end - p0, nkb = (nk + KB - 1) / KB * KB;
        for (int64_t t = 0; t < nk; t++) {
            const int64_t p = p0 + t, slot = table[p / B] * B + p % B;
            w->kr[t] = k_cache + slot * row + hk * D;
            w->vr[t] = v_cache + slot * row + hk * D;
            w->kpos[t] = (float)p;
        }
        for (int64_t t = nk; t < nkb; t++) {
            w->kr[t] = w->zero;
            w->kpos[t] = INFINITY;
        }
        for (int64_t t = 0; t < nkb; t += KB) {
            switch (RV) {
            case 1: scores_1(w, t, D); break;
            case 2: scores_2(w, t, D); break;
            case 3: scores_3(w, t, D); break;
            default: scores_4(w, t, D); break;
            }
        }
        /* online softmax, 16 rows per vector: mask, running max, exp, sums */
        for (int64_t c = 0; c < RV; c++) {
            const v16 pos = load16(&w->pos[16 * c]);
            const v16 wlo = window > 0 ? pos - (float)window : (v16){0} - INFINITY;
            const v16 m_old = load16(&w->m[16 * c]);
            v16 mx = m_old;
            for (int64_t t = 0; t < nk; t++) {
                const v16 kp = (v16){0} + w->kpos[t];
                const v16 sv = select16((kp <= pos) & (kp > wlo), load16(&w->st[t][16 * c]), ninf);
                store16(&w->st[t][16 * c], sv);
                mx = select16(sv > mx, sv, mx);
            }
            /* rows with nothing visible yet keep max -inf: exponents against 0 give 0 */
            const v16 base = select16(mx == ninf, (v16){0}, mx);
            const v16 corr = exp16_nonpos(m_old - base);
            v16 sum = (v16){0};
            for (int64_t t = 0; t < nk; t++) {
                const v16 e = exp16_nonpos(load16(&w->st[t][16 * c]) - base);
                store16(&w->st[t][16 * c], e);
                sum += e;
            }
            store16(&w->l[16 * c], load16(&w->l[16 * c]) * corr + sum);
            store16(&w->m[16 * c], mx);
            for (int i = 0; i < 16; i++) {
                const float f = corr[i];
                float *ar = w->acc[16 * c + i];
                if (f != 1.0f)
                    for (int64_t d = 0; d < D; d += 16) store16(ar + d, load16(ar + d) * f);
            }
        }
        for (int64_t r0 = 0; r0 < R; r0 += RB) {
            int64_t d0 = 0;
            for (; d0 + 64 <= D; d0 += 64) pv_rows(w, r0, d0, nk);
            if (d0 < D) pv_rows_tail(w, r0, d0, D, nk);
        }
    }
    for (int64_t t = 0; t < ntok; t++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t r = t * G + g;
            const float inv = 1.0f / w->l[r];
            float *dst = out + ((tok0 + t) * H + hk * G + g) * D;
            for (int64_t i = 0; i < D; i++) dst[i] = w->acc[r][i] * inv;
        }
}

/* 0: max query rows per task (qt x G), 1: max head dim, 2: max block size */
int64_t moeserve_paged_prefill_limits(int64_t which) {
    const int64_t limits[] = {MAX_R, MAX_D, MAX_B};
    return limits[which];
}

void moeserve_paged_prefill(const float *q, const float *k_cache, const float *v_cache,
                            const int64_t *block_tables, int64_t max_blocks,
                            const int64_t *q_start, const int64_t *q_lens,
                            const int64_t *ctx_lens, int64_t n, int64_t H, int64_t Hkv,
                            int64_t D, int64_t B, int64_t window, float scale, int64_t qt,
                            float *out, int num_threads) {
    /* tasks: (sequence, query tile, KV head); tiles of one sequence are listed last-first so
       the long (late) tiles start early under dynamic scheduling */
    int64_t *tile_start = malloc(sizeof(int64_t) * (size_t)(n + 1));
    tile_start[0] = 0;
    for (int64_t i = 0; i < n; i++) tile_start[i + 1] = tile_start[i] + (q_lens[i] + qt - 1) / qt;
    const int64_t tasks = tile_start[n] * Hkv;
#pragma omp parallel num_threads(num_threads)
    {
        Scratch *w = aligned_alloc(64, (sizeof(Scratch) + 63) / 64 * 64);
        int64_t i = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t tile = task / Hkv, hk = task % Hkv;
            while (tile_start[i + 1] <= tile) i++;
            while (tile_start[i] > tile) i--;
            const int64_t j = tile_start[i + 1] - 1 - tile; /* last tile first */
            const int64_t tok0 = j * qt, ntok = q_lens[i] - tok0 < qt ? q_lens[i] - tok0 : qt;
            prefill_task(q + q_start[i] * H * D, k_cache, v_cache, block_tables + i * max_blocks,
                         q_lens[i], ctx_lens[i], tok0, ntok, hk, H, Hkv, D, B, window, scale,
                         out + q_start[i] * H * D, w);
        }
        free(w);
    }
    free(tile_start);
}
