/* Paged attention for prefill chunks on the CPU (float32), reading K/V in place.

   Every sequence computing q_len > 1 tokens (a prompt chunk after a cached prefix, or a whole
   prompt) attends causally to its context through its block table, all sequences in one
   parallel call: no gather of the cached context, no mask tensors, no padding. A task is one
   (sequence, tile of `qt` query tokens, KV head): its qt x G query rows (G query heads share
   the KV head) stay in L1/L2 while the context streams past in steps of 64 keys (whole
   blocks). Per step, K is transposed into [D, 64] so the scores of 4 query rows x 64 keys are
   16 vector accumulators fed by one broadcast each, then an online softmax per row (vector
   max, masks from the row's visible range, vector exp), then P @ V with each row's
   accumulators in registers. Steps of 64 keys rather than one 16-key block: the per-row
   softmax work is paid once per 64 keys (measured ~1.6x faster than per block).
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
#define MAX_D 256 /* head dim */
#define MAX_B 64  /* block size */
#define KC 64     /* keys per softmax step: whole blocks, at least one */
#define MAX_KC (KC > MAX_B ? KC : MAX_B)
#define RB 4      /* query rows whose scores are computed together */

typedef struct {
    float q[MAX_R + RB][MAX_D];     /* scaled queries, padded to a multiple of RB rows */
    float acc[MAX_R][MAX_D];        /* unnormalised outputs */
    float kt[MAX_D][MAX_KC];        /* this step's keys, transposed */
    float vb[MAX_KC][MAX_D];        /* this step's values */
    float s[MAX_R + RB][MAX_KC];    /* scores, then probabilities */
    float m[MAX_R], l[MAX_R];       /* running max and sum per row */
    int64_t pos[MAX_R];             /* position of each row's query token */
} Scratch;

/* scores s[r0..r0+RB)[0..nk) = q rows . kt columns, 16 keys per vector, all chunks of the
   step at once (RB x NC accumulators, the K^T loads shared by the RB rows) */
#define SCORES(NC)                                                                          \
    static void scores_##NC(Scratch *w, int64_t r0, int64_t D) {                            \
        v16 a[RB][NC];                                                                      \
        for (int i = 0; i < RB; i++)                                                        \
            for (int c = 0; c < NC; c++) a[i][c] = (v16){0};                                \
        for (int64_t d = 0; d < D; d++) {                                                   \
            v16 kv[NC];                                                                     \
            for (int c = 0; c < NC; c++) kv[c] = load16(&w->kt[d][16 * c]);                 \
            for (int i = 0; i < RB; i++) {                                                  \
                const float qv = w->q[r0 + i][d];                                           \
                for (int c = 0; c < NC; c++) a[i][c] += qv * kv[c];                         \
            }                                                                               \
        }                                                                                   \
        for (int i = 0; i < RB; i++)                                                        \
            for (int c = 0; c < NC; c++) store16(&w->s[r0 + i][16 * c], a[i][c]);           \
    }
SCORES(1) SCORES(2) SCORES(3) SCORES(4)

static void prefill_task(const float *q, const float *k_cache, const float *v_cache,
                         const int64_t *table, int64_t q_len, int64_t ctx_len, int64_t tok0,
                         int64_t ntok, int64_t hk, int64_t H, int64_t Hkv, int64_t D,
                         int64_t B, int64_t window, float scale, float *out, Scratch *w) {
    const int64_t G = H / Hkv, R = ntok * G, nv = D / 16, row = Hkv * D;
    const int64_t first = ctx_len - q_len + tok0, last = first + ntok - 1; /* positions */
    const int64_t step = KC >= B ? KC / B * B : B; /* keys per softmax step: whole blocks */
    memset(w->q, 0, sizeof(float) * (size_t)((R + RB - 1) / RB * RB) * MAX_D);
    for (int64_t t = 0; t < ntok; t++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t r = t * G + g;
            const float *src = q + ((tok0 + t) * H + hk * G + g) * D;
            for (int64_t i = 0; i < D; i++) w->q[r][i] = src[i] * scale;
            memset(w->acc[r], 0, sizeof(float) * D);
            w->m[r] = -INFINITY;
            w->l[r] = 0.0f;
            w->pos[r] = first + t;
        }
    v16 iota;
    for (int i = 0; i < 16; i++) iota[i] = (float)i;
    const int64_t lo = window > 0 && first - window + 1 > 0 ? first - window + 1 : 0;
    for (int64_t p0 = lo - lo % B; p0 <= last; p0 += step) {
        /* keys [p0, p0 + nk): whole blocks up to the tile's last position */
        const int64_t end = last + 1 < p0 + step ? last + 1 : p0 + step;
        const int64_t nk = end - p0, nc = (nk + 15) / 16;
        for (int64_t t = 0; t < nk; t++) {
            const int64_t p = p0 + t, slot = table[p / B] * B + p % B;
            const float *kr = k_cache + slot * row + hk * D;
            for (int64_t d = 0; d < D; d++) w->kt[d][t] = kr[d];
            memcpy(w->vb[t], v_cache + slot * row + hk * D, sizeof(float) * D);
        }
        for (int64_t t = nk; t < nc * 16; t++)
            for (int64_t d = 0; d < D; d++) w->kt[d][t] = 0.0f; /* padding: masked below */
        for (int64_t r0 = 0; r0 < R; r0 += RB) {
            switch (nc) {
            case 1: scores_1(w, r0, D); break;
            case 2: scores_2(w, r0, D); break;
            case 3: scores_3(w, r0, D); break;
            default: scores_4(w, r0, D); break;
            }
        }
        for (int64_t r = 0; r < R; r++) {
            /* visible keys of this row in this step: [t0, t1) */
            const int64_t s_pos = w->pos[r];
            int64_t t1 = s_pos + 1 - p0;
            t1 = t1 < nk ? t1 : nk;
            int64_t t0 = window > 0 ? s_pos - window + 1 - p0 : 0;
            t0 = t0 > 0 ? t0 : 0;
            if (t1 <= t0) continue;
            float *sr = w->s[r];
            const v16 vt0 = (v16){0} + (float)t0, vt1 = (v16){0} + (float)t1;
            v16 mxv = (v16){0} - INFINITY;
            for (int64_t c = 0; c < nc; c++) {
                const v16 idx = iota + (float)(16 * c);
                const v16 sv = select16((idx >= vt0) & (idx < vt1), load16(sr + 16 * c),
                                        (v16){0} - INFINITY);
                mxv = select16(sv > mxv, sv, mxv);
                store16(sr + 16 * c, sv);
            }
            float mx = hmax(mxv);
            mx = w->m[r] > mx ? w->m[r] : mx;
            const float corr = expf(w->m[r] - mx); /* 0 on the first visible step */
            v16 sumv = (v16){0};
            for (int64_t c = 0; c < nc; c++) {
                const v16 e = exp16_nonpos(load16(sr + 16 * c) - mx); /* -inf -> 0 */
                store16(sr + 16 * c, e);
                sumv += e;
            }
            w->l[r] = w->l[r] * corr + hsum(sumv);
            w->m[r] = mx;
            /* acc[r] = acc[r] * corr + P[r] @ V, the row's accumulators in registers */
            v16 a[MAX_D / 16];
            for (int64_t i = 0; i < nv; i++) a[i] = load16(w->acc[r] + i * 16) * corr;
            for (int64_t t = t0; t < t1; t++) {
                const float p = sr[t];
                for (int64_t i = 0; i < nv; i++) a[i] += p * load16(w->vb[t] + i * 16);
            }
            for (int64_t i = 0; i < nv; i++) store16(w->acc[r] + i * 16, a[i]);
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
