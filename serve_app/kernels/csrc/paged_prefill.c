/* Paged attention for prefill chunks on the CPU (float32), reading K/V in place.

   Every sequence computing q_len > 1 tokens (a prompt chunk after a cached prefix, or a whole
   prompt) attends causally to its context through its block table, all sequences in one
   parallel call: no gather of the cached context, no mask tensors, no padding. A task is one
   (sequence, tile of `qt` query tokens, KV head): its R = qt x G query rows (G query heads
   share the KV head) stay in L1/L2 while the context streams past in steps of 64 keys (whole
   blocks), read in place in the cache's own [key, D] layout.
   The query rows live in the lanes of the vectors (Q is transposed once per task into
   [D, R]): the scores of a few keys x up to 64 rows are vector accumulators fed by one
   broadcast of a K element each, so K is never transposed; the online softmax is then plain
   vector work across rows (running max, masks from each row's visible range, exp, sums: no
   horizontal max or sum), and P @ V takes 4 rows x PV_W values per key with each V row loaded
   once for the 4 rows. Vectors are the CPU's native width (simd.h). (The previous kernel transposed every 64-key step of K for every query
   tile and kept rows in scalars: ~2x slower on an AMD EPYC.)
   Layouts: q, out [T, H, D] (the flattened batch; sequence i's tokens start at q_start[i]);
   k_cache, v_cache [num_blocks, B, Hkv, D]; block_tables [n, max_blocks]. The query tokens of
   sequence i are its positions [ctx_len - q_len, ctx_len); a key at position p is visible to
   the query at position s when p <= s and, with a window W > 0, p > s - W.
   D is a multiple of 16 up to 576 (DeepSeek's MLA latent row: keys and values are the same
   rows there); B up to 64; qt x G up to 64 (checked by the caller).
   The cache is float32 here, bfloat16 in paged_prefill_bf16.c (kv_elem.h): there a step's K
   rows are widened into the scratch once, and V rows as they are loaded. serve_app/kernels/cpu.py builds and loads it. */
#include <math.h>
#include <stdlib.h>

#include "kv_elem.h"

#define MAX_R 64  /* query rows of a task: qt x G */
#define MAX_RV (MAX_R / VL)
#define MAX_D 576 /* head dim */
#define MAX_B 64  /* block size */
#define KC 64     /* keys per softmax step: whole blocks, at least one */
#define MAX_KC (KC > MAX_B ? KC : MAX_B)
#define KB 16     /* most keys whose scores are computed together */
#define RB 4      /* rows whose P @ V is computed together */
#define PV_NV (VL == 16 ? 4 : 2) /* vectors per row of a P @ V tile: RB x PV_NV accumulators */
#define PV_W (PV_NV * VL)        /* values per row of a P @ V tile */

typedef struct {
    float qt[MAX_D][MAX_R];        /* scaled queries, transposed: rows in lanes */
    float st[MAX_KC + KB][MAX_R];  /* this step's scores, then probabilities, [key][row] */
    float acc[MAX_R + RB][MAX_D];  /* unnormalised outputs */
    float m[MAX_R], l[MAX_R];      /* running max and sum per row */
    float pos[MAX_R];              /* position of each row's query token (-1: padding) */
    float kpos[MAX_KC + KB];       /* position of each key of the step (+inf: padding) */
    const float *kr[MAX_KC + KB];  /* this step's K rows (float32: in place in the cache) */
    const kv_t *vr[MAX_KC + KB];   /* and V rows, in place */
    float zero[MAX_D];             /* K of padding keys */
#ifdef MOESERVE_KV_BF16
    /* this step's K rows widened once: the scores broadcast every K element to all rows, and
       a scalar widen per broadcast made the bf16 MQA decode ~1.4x slower than float32 */
    float kf[MAX_KC][MAX_D];
#endif
} Scratch;

/* st[t0..t0+NK)[0..VL RV) = the NK keys' rows of K . the transposed query rows: NK x RV
   vector accumulators, one broadcast of a K element per key and d (few rows: more keys; NK x
   RV + RV vectors fit the ISA's registers) */
#define SCORES(RV, NK)                                                                      \
    static void scores_##RV(Scratch *w, int64_t t0, int64_t D) {                            \
        vn a[NK][RV];                                                                       \
        const float *k[NK];                                                                 \
        for (int j = 0; j < NK; j++) {                                                      \
            k[j] = w->kr[t0 + j];                                                           \
            for (int c = 0; c < RV; c++) a[j][c] = (vn){0};                                 \
        }                                                                                   \
        for (int64_t d = 0; d < D; d++) {                                                   \
            vn qv[RV];                                                                      \
            for (int c = 0; c < RV; c++) qv[c] = loadn(&w->qt[d][VL * c]);                  \
            for (int j = 0; j < NK; j++) {                                                  \
                const float kv = k[j][d];                                                   \
                for (int c = 0; c < RV; c++) a[j][c] += kv * qv[c];                         \
            }                                                                               \
        }                                                                                   \
        for (int j = 0; j < NK; j++)                                                        \
            for (int c = 0; c < RV; c++) storen(&w->st[t0 + j][VL * c], a[j][c]);           \
    }
typedef void (*scores_fn)(Scratch *, int64_t, int64_t);
#if VL == 16 /* 32 registers */
SCORES(1, 16) SCORES(2, 8) SCORES(3, 4) SCORES(4, 4)
static const int KEYS_PER_CALL[MAX_RV + 1] = {0, 16, 8, 4, 4}; /* NK of scores_RV */
static const scores_fn SCORES_RV[MAX_RV + 1] = {0, scores_1, scores_2, scores_3, scores_4};
#else /* 16 registers */
SCORES(1, 12) SCORES(2, 6) SCORES(3, 4) SCORES(4, 2)
SCORES(5, 2) SCORES(6, 1) SCORES(7, 1) SCORES(8, 1)
static const int KEYS_PER_CALL[MAX_RV + 1] = {0, 12, 6, 4, 2, 2, 1, 1, 1};
static const scores_fn SCORES_RV[MAX_RV + 1] = {0,        scores_1, scores_2, scores_3, scores_4,
                                                scores_5, scores_6, scores_7, scores_8};
#endif

/* acc[r0..r0+RB)[d0..d0+PV_W) += P[r][t] V[t][d0..d0+PV_W) over the step's nk keys */
static void pv_rows(Scratch *w, int64_t r0, int64_t d0, int64_t nk) {
    vn a[RB][PV_NV];
    for (int i = 0; i < RB; i++)
        for (int c = 0; c < PV_NV; c++) a[i][c] = loadn(&w->acc[r0 + i][d0 + VL * c]);
    for (int64_t t = 0; t < nk; t++) {
        const kv_t *vt = w->vr[t] + d0;
        vn v[PV_NV];
        for (int c = 0; c < PV_NV; c++) v[c] = loadkv(vt + VL * c);
        for (int i = 0; i < RB; i++) {
            const vn p = splat(w->st[t][r0 + i]);
            for (int c = 0; c < PV_NV; c++) a[i][c] += p * v[c];
        }
    }
    for (int i = 0; i < RB; i++)
        for (int c = 0; c < PV_NV; c++) storen(&w->acc[r0 + i][d0 + VL * c], a[i][c]);
}

/* the same for D - d0 < PV_W values (a head dim that is no multiple of PV_W) */
static void pv_rows_tail(Scratch *w, int64_t r0, int64_t d0, int64_t D, int64_t nk) {
    for (int64_t t = 0; t < nk; t++)
        for (int i = 0; i < RB; i++) {
            const float p = w->st[t][r0 + i];
            for (int64_t d = d0; d < D; d += VL)
                storen(&w->acc[r0 + i][d], loadn(&w->acc[r0 + i][d]) + p * loadkv(w->vr[t] + d));
        }
}

/* Rows [0, R) of the scratch (queries in w->qt, positions in w->pos, state in m, l, acc)
   attend to the keys at positions [p_begin, p_end) of one KV head through `table`, in steps of
   whole blocks. */
static void attend_rows(Scratch *w, int64_t R, const kv_t *k_cache, const kv_t *v_cache,
                        const int64_t *table, int64_t p_begin, int64_t p_end, int64_t hk,
                        int64_t Hkv, int64_t D, int64_t B, int64_t window) {
    const int64_t RV = (R + VL - 1) / VL, row = Hkv * D;
    const int64_t step = KC >= B ? KC / B * B : B; /* keys per softmax step: whole blocks */
    const vn ninf = splat(-INFINITY);
    for (int64_t p0 = p_begin; p0 < p_end; p0 += step) {
        const int64_t end = p_end < p0 + step ? p_end : p0 + step;
        const int64_t nkc = KEYS_PER_CALL[RV], nk = end - p0, nkb = (nk + nkc - 1) / nkc * nkc;
        for (int64_t t = 0; t < nk; t++) {
            const int64_t p = p0 + t, slot = table[p / B] * B + p % B;
#ifdef MOESERVE_KV_BF16
            for (int64_t d = 0; d < D; d += VL)
                storen(&w->kf[t][d], loadkv(k_cache + slot * row + hk * D + d));
            w->kr[t] = w->kf[t];
#else
            w->kr[t] = k_cache + slot * row + hk * D;
#endif
            w->vr[t] = v_cache + slot * row + hk * D;
            w->kpos[t] = (float)p;
        }
        for (int64_t t = nk; t < nkb; t++) {
            w->kr[t] = w->zero;
            w->kpos[t] = INFINITY;
        }
        for (int64_t t = 0; t < nkb; t += nkc) {
            SCORES_RV[RV](w, t, D);
        }
        /* online softmax, VL rows per vector: mask, running max, exp, sums */
        for (int64_t c = 0; c < RV; c++) {
            const vn pos = loadn(&w->pos[VL * c]);
            const vn wlo = window > 0 ? pos - (float)window : ninf;
            const vn m_old = loadn(&w->m[VL * c]);
            vn mx = m_old;
            for (int64_t t = 0; t < nk; t++) {
                const vn kp = splat(w->kpos[t]);
                const vn sv = selectn((kp <= pos) & (kp > wlo), loadn(&w->st[t][VL * c]), ninf);
                storen(&w->st[t][VL * c], sv);
                mx = selectn(sv > mx, sv, mx);
            }
            /* rows with nothing visible yet keep max -inf: exponents against 0 give 0 */
            const vn base = selectn(mx == ninf, (vn){0}, mx);
            const vn corr = expn_nonpos(m_old - base);
            vn sum = (vn){0};
            for (int64_t t = 0; t < nk; t++) {
                const vn e = expn_nonpos(loadn(&w->st[t][VL * c]) - base);
                storen(&w->st[t][VL * c], e);
                sum += e;
            }
            storen(&w->l[VL * c], loadn(&w->l[VL * c]) * corr + sum);
            storen(&w->m[VL * c], mx);
            for (int i = 0; i < VL; i++) {
                const float f = corr[i];
                float *ar = w->acc[VL * c + i];
                if (f != 1.0f)
                    for (int64_t d = 0; d < D; d += VL) storen(ar + d, loadn(ar + d) * f);
            }
        }
        for (int64_t r0 = 0; r0 < R; r0 += RB) {
            int64_t d0 = 0;
            for (; d0 + PV_W <= D; d0 += PV_W) pv_rows(w, r0, d0, nk);
            if (d0 < D) pv_rows_tail(w, r0, d0, D, nk);
        }
    }
}

/* empty state for R rows (padded to whole vectors: position -1, so nothing is visible) */
static void reset_rows(Scratch *w, int64_t R, int64_t D) {
    const int64_t RV = (R + VL - 1) / VL;
    for (int64_t r = 0; r < RV * VL; r++) {
        w->m[r] = -INFINITY;
        w->l[r] = 0.0f;
        w->pos[r] = -1.0f;
        for (int64_t d = 0; d < D; d++) w->acc[r][d] = 0.0f;
    }
    for (int64_t d = 0; d < D; d++) {
        w->zero[d] = 0.0f;
        for (int64_t r = R; r < RV * VL; r++) w->qt[d][r] = 0.0f;
    }
}

static void load_row(Scratch *w, int64_t r, const float *src, int64_t D, float scale, float pos) {
    for (int64_t d = 0; d < D; d++) w->qt[d][r] = src[d] * scale;
    w->pos[r] = pos;
}

static void prefill_task(const float *q, const kv_t *k_cache, const kv_t *v_cache,
                         const int64_t *table, int64_t q_len, int64_t ctx_len, int64_t tok0,
                         int64_t ntok, int64_t hk, int64_t H, int64_t Hkv, int64_t D,
                         int64_t B, int64_t window, float scale, float *out, Scratch *w) {
    const int64_t G = H / Hkv, R = ntok * G;
    const int64_t first = ctx_len - q_len + tok0, last = first + ntok - 1; /* positions */
    reset_rows(w, R, D);
    for (int64_t t = 0; t < ntok; t++)
        for (int64_t g = 0; g < G; g++)
            load_row(w, t * G + g, q + ((tok0 + t) * H + hk * G + g) * D, D, scale,
                     (float)(first + t));
    const int64_t lo = window > 0 && first - window + 1 > 0 ? first - window + 1 : 0;
    attend_rows(w, R, k_cache, v_cache, table, lo - lo % B, last + 1, hk, Hkv, D, B, window);
    for (int64_t t = 0; t < ntok; t++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t r = t * G + g;
            const float inv = 1.0f / w->l[r];
            float *dst = out + ((tok0 + t) * H + hk * G + g) * D;
            for (int64_t i = 0; i < D; i++) dst[i] = w->acc[r][i] * inv;
        }
}

/* cs[i] = the chunks before item i, when item i's sizes[i] units are cut in chunks of `per`
   (cs has n + 1 entries; the caller frees it) */
static int64_t *chunk_starts(const int64_t *sizes, int64_t n, int64_t per) {
    int64_t *cs = malloc(sizeof(int64_t) * (size_t)(n + 1));
    cs[0] = 0;
    for (int64_t i = 0; i < n; i++) cs[i + 1] = cs[i] + (sizes[i] + per - 1) / per;
    return cs;
}

/* the item that chunk `c` belongs to, searched from the previous answer *i (tasks of one
   thread move forward) */
static int64_t item_of(const int64_t *cs, int64_t *i, int64_t c) {
    while (cs[*i + 1] <= c) (*i)++;
    while (cs[*i] > c) (*i)--;
    return *i;
}

#ifndef MOESERVE_KV_BF16 /* one copy of the limits: both cache types share them */
/* 0: max query rows per task (qt x G), 1: max head dim, 2: max block size */
int64_t moeserve_paged_prefill_limits(int64_t which) {
    const int64_t limits[] = {MAX_R, MAX_D, MAX_B};
    return limits[which];
}
#endif

typedef void (*task_fn)(const void *args, int64_t task, int64_t *item, Scratch *w);

/* every task in one parallel region, handed out one at a time, each thread with its own
   scratch; *item is the thread's last item, for item_of */
static void run_tasks(int64_t tasks, task_fn fn, const void *args, int num_threads) {
#pragma omp parallel num_threads(num_threads)
    {
        Scratch *w = aligned_alloc(64, (sizeof(Scratch) + 63) / 64 * 64);
        int64_t item = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) fn(args, task, &item, w);
        free(w);
    }
}

typedef struct {
    const float *q;
    const kv_t *k_cache, *v_cache;
    const int64_t *block_tables, *q_start, *q_lens, *ctx_lens, *tile_start;
    int64_t max_blocks, H, Hkv, D, B, window, qt;
    float scale;
    float *out;
} PrefillArgs;

static void prefill_tile(const void *args, int64_t task, int64_t *item, Scratch *w) {
    const PrefillArgs *a = args;
    const int64_t tile = task / a->Hkv, hk = task % a->Hkv;
    const int64_t i = item_of(a->tile_start, item, tile);
    const int64_t j = a->tile_start[i + 1] - 1 - tile; /* last tile first */
    const int64_t tok0 = j * a->qt;
    const int64_t ntok = a->q_lens[i] - tok0 < a->qt ? a->q_lens[i] - tok0 : a->qt;
    const int64_t at = a->q_start[i] * a->H * a->D;
    prefill_task(a->q + at, a->k_cache, a->v_cache, a->block_tables + i * a->max_blocks,
                 a->q_lens[i], a->ctx_lens[i], tok0, ntok, hk, a->H, a->Hkv, a->D, a->B,
                 a->window, a->scale, a->out + at, w);
}

void KV_NAME(moeserve_paged_prefill)(
    const float *q, const kv_t *k_cache, const kv_t *v_cache, const int64_t *block_tables,
    int64_t max_blocks, const int64_t *q_start, const int64_t *q_lens, const int64_t *ctx_lens,
    int64_t n, int64_t H, int64_t Hkv, int64_t D, int64_t B, int64_t window, float scale,
    int64_t qt, float *out, int num_threads) {
    /* tasks: (sequence, query tile, KV head); tiles of one sequence are listed last-first so
       the long (late) tiles start early under dynamic scheduling */
    int64_t *tile_start = chunk_starts(q_lens, n, qt);
    const PrefillArgs args = {q,     k_cache, v_cache, block_tables, q_start, q_lens, ctx_lens,
                              tile_start, max_blocks, H, Hkv, D, B, window, qt, scale, out};
    run_tasks(tile_start[n] * Hkv, prefill_tile, &args, num_threads);
    free(tile_start);
}

typedef struct {
    const float *q;
    const kv_t *k_cache, *v_cache;
    const int64_t *rows, *starts, *tables, *prefix_lens, *chunk_start;
    int64_t max_blocks, H, Hkv, D, B;
    float scale;
    float *out, *lse;
} SharedArgs;

static void shared_chunk(const void *args, int64_t task, int64_t *item, Scratch *w) {
    const SharedArgs *a = args;
    const int64_t G = a->H / a->Hkv, per = MAX_R / G, D = a->D;
    const int64_t chunk = task / a->Hkv, hk = task % a->Hkv;
    const int64_t i = item_of(a->chunk_start, item, chunk);
    const int64_t s0 = a->starts[i] + (chunk - a->chunk_start[i]) * per;
    const int64_t ns = a->starts[i + 1] - s0 < per ? a->starts[i + 1] - s0 : per;
    const int64_t R = ns * G, P = a->prefix_lens[i];
    reset_rows(w, R, D);
    for (int64_t j = 0; j < ns; j++)
        for (int64_t g = 0; g < G; g++)
            load_row(w, j * G + g, a->q + (a->rows[s0 + j] * a->H + hk * G + g) * D, D, a->scale,
                     (float)(P - 1));
    attend_rows(w, R, a->k_cache, a->v_cache, a->tables + i * a->max_blocks, 0, P, hk, a->Hkv, D,
                a->B, 0);
    for (int64_t j = 0; j < ns; j++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t r = j * G + g, h = hk * G + g, n = a->rows[s0 + j];
            const float inv = 1.0f / w->l[r];
            float *dst = a->out + (n * a->H + h) * D;
            for (int64_t d = 0; d < D; d++) dst[d] = w->acc[r][d] * inv;
            a->lse[n * a->H + h] = w->m[r] + logf(w->l[r]);
        }
}

/* Cascade decode, its shared part: decoding sequences whose block tables begin with the same
   blocks (a common system prompt or few-shot prefix) attend to those keys together. A task is
   (group, up to MAX_R / G of its sequences, KV head): their query rows sit in the vectors'
   lanes like a prefill tile's, so the shared keys are read once per task and the scores are
   vector FMAs, where per-sequence decode reads them once per sequence with a horizontal
   reduction per key. Output per row: the attention over the shared keys, normalised, and its
   log-sum-exp, from which moeserve_paged_decode continues over each sequence's own keys.
   q, out [n, H, D] (the decode rows); lse [n, H]; group g covers rows[starts[g]..starts[g+1])
   and keys [0, prefix_lens[g]) through tables[g]. */
void KV_NAME(moeserve_shared_prefix)(
    const float *q, const kv_t *k_cache, const kv_t *v_cache, const int64_t *rows,
    const int64_t *starts, const int64_t *tables, int64_t max_blocks, const int64_t *prefix_lens,
    int64_t groups, int64_t H, int64_t Hkv, int64_t D, int64_t B, float scale, float *out,
    float *lse, int num_threads) {
    int64_t *sizes = malloc(sizeof(int64_t) * (size_t)(groups + 1));
    for (int64_t i = 0; i < groups; i++) sizes[i] = starts[i + 1] - starts[i];
    int64_t *chunk_start = chunk_starts(sizes, groups, MAX_R / (H / Hkv));
    free(sizes);
    const SharedArgs args = {q,   k_cache, v_cache, rows, starts, tables, prefix_lens, chunk_start,
                             max_blocks, H, Hkv, D, B, scale, out, lse};
    run_tasks(chunk_start[groups] * Hkv, shared_chunk, &args, num_threads);
    free(chunk_start);
}

typedef struct {
    const float *q;
    const kv_t *k_cache, *v_cache;
    const float *init_out, *init_lse;
    const int64_t *tables, *starts, *ctx_lens;
    int64_t max_blocks, H, D, B, per, chunks;
    float scale;
    float *out;
} MqaArgs;

static void mqa_rows(const void *args, int64_t task, int64_t *item, Scratch *w) {
    const MqaArgs *a = args;
    (void)item;
    const int64_t i = task / a->chunks, g0 = (task % a->chunks) * a->per, D = a->D;
    const int64_t R = a->H - g0 < a->per ? a->H - g0 : a->per, len = a->ctx_lens[i];
    reset_rows(w, R, D);
    for (int64_t r = 0; r < R; r++) {
        const int64_t at = i * a->H + g0 + r;
        load_row(w, r, a->q + at * D, D, a->scale, (float)(len - 1));
        if (a->init_lse != NULL && a->init_lse[at] != -INFINITY) {
            w->m[r] = a->init_lse[at]; /* the shared prefix's normalised output and lse */
            w->l[r] = 1.0f;
            for (int64_t d = 0; d < D; d++) w->acc[r][d] = a->init_out[at * D + d];
        }
    }
    attend_rows(w, R, a->k_cache, a->v_cache, a->tables + i * a->max_blocks, a->starts[i], len,
                0, 1, D, a->B, 0);
    for (int64_t r = 0; r < R; r++) {
        const float inv = 1.0f / w->l[r];
        float *dst = a->out + (i * a->H + g0 + r) * D;
        for (int64_t d = 0; d < D; d++) dst[d] = w->acc[r][d] * inv;
    }
}

/* Multi-query decode (one KV head: MLA's absorbed form): a sequence's query heads are the
   rows of a prefill-style task, in the vectors' lanes, so its keys (positions [starts[i],
   ctx_lens[i])) are read once for all heads and the scores and P @ V are register-tiled FMAs;
   paged_decode's per-key dot products across D load both operands for every FMA (measured
   1.5-2x slower on an AVX2 Zen 3 for 16 heads of 576). Tasks are (sequence, `per` heads);
   init_out / init_lse continue after a shared prefix as in moeserve_paged_decode.
   q, out [n, H, D]; cache [num_blocks, B, 1, D]. */
void KV_NAME(moeserve_mqa_decode)(
    const float *q, const kv_t *k_cache, const kv_t *v_cache, const int64_t *block_tables,
    int64_t max_blocks, const int64_t *ctx_lens, const int64_t *starts, int64_t n, int64_t H,
    int64_t D, int64_t B, float scale, float *out, const float *init_out, const float *init_lse,
    int num_threads) {
    /* few sequences: split their heads, a vector of rows at least, so every thread works */
    int64_t per = H < MAX_R ? H : MAX_R;
    if (n < 2 * num_threads && per > VL) {
        const int64_t want = (2 * num_threads + n - 1) / n; /* tasks per sequence */
        per = (H + want - 1) / want;
        per = (per + VL - 1) / VL * VL;
    }
    const MqaArgs args = {q,      k_cache, v_cache, init_out, init_lse,   block_tables,
                          starts, ctx_lens, max_blocks, H,   D,   B, per, (H + per - 1) / per,
                          scale,  out};
    run_tasks(n * args.chunks, mqa_rows, &args, num_threads);
}
