/* Paged attention for decoding sequences on the CPU (float32), reading K/V in place.

   One query token per sequence attends to its context through its block table: no gather of
   the context into a contiguous buffer and no padding to the longest sequence. Each (sequence,
   KV head) task runs an online softmax over the context one block at a time for the G query
   heads that share the KV head (GQA): every K and V row is loaded once for all G heads, and no
   buffer grows with the context.
   Layouts: q, out [n, H, D]; k_cache, v_cache [num_blocks, B, Hkv, D]; block_tables [n,
   max_blocks]; keys of sequence i are positions [start[i], ctx_lens[i]) (start > 0 for a
   sliding window, or after a prefix shared with other sequences: then init_out [n, H, D] and
   init_lse [n, H] hold the attention over keys [0, start[i]) from moeserve_shared_prefix, and
   -inf in init_lse marks rows without one). D is a multiple of 16 up to MAX_D (576: DeepSeek's
   MLA latent row, 512 + 64, which is both key and value there); the caller checks the limits.
   With one KV head (MLA's absorbed multi-query form) and few sequences, a sequence's query
   heads are split across tasks, or one thread would do a whole batch-1 step alone.
   The cache is float32 here, bfloat16 in paged_decode_bf16.c (kv_elem.h: rows widened as they
   are loaded). serve_app/kernels/cpu.py builds and loads it. */
#include <math.h>

#include "kv_elem.h"

#define MAX_H 64     /* query heads */
#define MAX_D 576    /* head dim */
#define MAX_HD 9216  /* query heads x head dim (16 x 576) */
#define MAX_B 64     /* block size */
#define VD (MAX_D / VL)

/* Sequence attention for KV heads [h0, h0 + nh): their K/V rows are adjacent in the cache, so
   a task over several heads reads each token's K and V as one contiguous stream. */
static void decode_task(const float *q, const kv_t *k_cache, const kv_t *v_cache,
                        const int64_t *table, int64_t start, int64_t len, float *out,
                        int64_t G, int64_t D, int64_t B, int64_t Hkv, int64_t h0, int64_t nh,
                        float scale, const float *init_out, const float *init_lse) {
    vn qv[MAX_HD / VL], acc[MAX_HD / VL];
    float m[MAX_H], l[MAX_H], s[MAX_H][MAX_B] __attribute__((aligned(64)));
    vn part[MAX_H][16]; /* per query head, 16 keys' partial products */
    const int64_t nq = nh * G, nv = D / VL, row = Hkv * D; /* floats between tokens */
    q += h0 * G * D;
    out += h0 * G * D;
    for (int64_t g = 0; g < nq; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
        for (int64_t i = 0; i < nv; i++) {
            qv[g * nv + i] = loadn(q + g * D + i * VL) * scale;
            acc[g * nv + i] = (vn){0};
        }
    }
    /* continuing after a shared prefix (moeserve_shared_prefix): its normalised output and
       log-sum-exp are the state (acc = out, l = 1, m = lse) the remaining keys update */
    if (init_lse != NULL) {
        init_lse += h0 * G;
        init_out += h0 * G * D;
        for (int64_t g = 0; g < nq; g++) {
            if (init_lse[g] == -INFINITY) continue;
            m[g] = init_lse[g];
            l[g] = 1.0f;
            for (int64_t i = 0; i < nv; i++) acc[g * nv + i] = loadn(init_out + g * D + i * VL);
        }
    }
    for (int64_t p0 = start - start % B; p0 < len; p0 += B) {
        const int64_t blk = table[p0 / B];
        const int64_t t0 = p0 < start ? start - p0 : 0;
        const int64_t t1 = len - p0 < B ? len - p0 : B;
        const kv_t *kb = k_cache + blk * B * row + h0 * D;
        const kv_t *vb = v_cache + blk * B * row + h0 * D;
        /* the next block sits anywhere in the cache, out of the hardware prefetcher's sight:
           fetch its K while this block's scores are computed, its V during this block's P @ V */
        const int64_t nxt = p0 + B < len ? table[p0 / B + 1] : blk;
        const char *k_next = (const char *)(k_cache + nxt * B * row + h0 * D);
        const char *v_next = (const char *)(v_cache + nxt * B * row + h0 * D);
        const int64_t esz = sizeof(kv_t), lines = (nh * D * esz + 63) / 64; /* per key */
        /* scores of 16 keys at a time: keys in memory order, one vector of partial products
           per (query head, key), then one transpose-and-add tree per head for all 16 keys (no
           serial horizontal sum per key) */
        for (int64_t c = 0; c < B; c += 16) {
            const int64_t lo = t0 > c ? t0 : c, hi = t1 < c + 16 ? t1 : c + 16;
            if (lo >= hi) continue;
            for (int64_t t = 0; t < 16; t++) {
                const kv_t *kr = kb + (c + t) * row;
                const int in = c + t >= lo && c + t < hi;
                for (int64_t ln = 0; ln < lines; ln++)
                    __builtin_prefetch(k_next + (c + t) * row * esz + ln * 64);
                for (int64_t hk = 0; hk < nh; hk++, kr += D) {
                    for (int64_t g = hk * G; g < (hk + 1) * G; g++) {
                        vn p = (vn){0};
                        if (in)
                            for (int64_t i = 0; i < nv; i++)
                                p += qv[g * nv + i] * loadkv(kr + i * VL);
                        part[g][t] = p;
                    }
                }
            }
            for (int64_t g = 0; g < nq; g++) hsum_keys16(part[g], &s[g][c]);
        }
        for (int64_t g = 0; g < nq; g++) {
            float mx = m[g];
            for (int64_t t = t0; t < t1; t++) mx = s[g][t] > mx ? s[g][t] : mx;
            const float corr = expf(m[g] - mx); /* 0 on the first block (m = -inf) */
            for (int64_t i = 0; i < nv; i++) acc[g * nv + i] *= corr;
            float sum = 0.0f;
            for (int64_t c = 0; c < B; c += VL) {
                vn e = expn_nonpos(loadn(&s[g][c]) - mx);
                for (int i = 0; i < VL; i++) {
                    const int64_t t = c + i;
                    e[i] = (t >= t0 && t < t1) ? e[i] : 0.0f;
                }
                storen(&s[g][c], e);
                sum += hsumn(e);
            }
            l[g] = l[g] * corr + sum;
            m[g] = mx;
        }
        for (int64_t t = t0; t < t1; t++) {
            for (int64_t ln = 0; ln < lines; ln++)
                __builtin_prefetch(v_next + t * row * esz + ln * 64);
            for (int64_t hk = 0; hk < nh; hk++) {
                vn vv[VD];
                for (int64_t i = 0; i < nv; i++) vv[i] = loadkv(vb + t * row + hk * D + i * VL);
                for (int64_t g = hk * G; g < (hk + 1) * G; g++) {
                    const float pr = s[g][t];
                    for (int64_t i = 0; i < nv; i++) acc[g * nv + i] += pr * vv[i];
                }
            }
        }
    }
    for (int64_t g = 0; g < nq; g++) {
        const float inv = 1.0f / l[g];
        for (int64_t i = 0; i < nv; i++) storen(out + g * D + i * VL, acc[g * nv + i] * inv);
    }
}

#ifndef MOESERVE_KV_BF16 /* one copy of the limits: both cache types share them */
/* 0: max query heads, 1: max head dim, 2: max heads x head dim, 3: max block size, 4: head
   dims must be a multiple of this */
int64_t moeserve_paged_decode_limits(int64_t which) {
    const int64_t limits[] = {MAX_H, MAX_D, MAX_HD, MAX_B, 16};
    return limits[which];
}
#endif

void KV_NAME(moeserve_paged_decode)(
    const float *q, const kv_t *k_cache, const kv_t *v_cache, const int64_t *block_tables,
    int64_t max_blocks, const int64_t *ctx_lens, const int64_t *starts, int64_t n, int64_t H,
    int64_t Hkv, int64_t D, int64_t B, float scale, float *out, const float *init_out,
    const float *init_lse, int num_threads) {
    const int64_t G = H / Hkv;
    if (Hkv == 1 && n < 4 * num_threads) {
        /* multi-query: tasks of (sequence, slice of query heads), each a G = gs group over the
           one KV head (its rows are D apart whatever the slice) */
        const int64_t slices = H < 2 * num_threads ? H : 2 * num_threads;
        const int64_t gs = (H + slices - 1) / slices, ns = (H + gs - 1) / gs;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
        for (int64_t task = 0; task < n * ns; task++) {
            const int64_t i = task / ns, g0 = (task % ns) * gs;
            const int64_t g = H - g0 < gs ? H - g0 : gs, at = i * H + g0;
            decode_task(q + at * D, k_cache, v_cache, block_tables + i * max_blocks, starts[i],
                        ctx_lens[i], out + at * D, g, D, B, 1, 0, 1, scale,
                        init_lse ? init_out + at * D : NULL, init_lse ? init_lse + at : NULL);
        }
        return;
    }
    /* one task per sequence when there are enough of them, else one per (sequence, KV head) */
    const int64_t nh = n >= 4 * num_threads ? Hkv : 1, chunks = Hkv / nh;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t task = 0; task < n * chunks; task++) {
        const int64_t i = task / chunks, h0 = (task % chunks) * nh;
        decode_task(q + i * H * D, k_cache, v_cache, block_tables + i * max_blocks, starts[i],
                    ctx_lens[i], out + i * H * D, G, D, B, Hkv, h0, nh, scale,
                    init_lse ? init_out + i * H * D : NULL, init_lse ? init_lse + i * H : NULL);
    }
}
