/* The CPU's native float vector and the helpers the kernels share.

   `vn` holds VL floats: 16 where the ISA has 64-byte registers (AVX-512), 8 elsewhere (AVX2).
   The kernels are written in VL, never in a fixed 16: GCC keeps a vector wider than the
   registers only in memory, lowering every operation through the stack (measured on an
   AVX2-only Zen 3: the 64-byte-vector matmul tile ran 10-25x slower than torch, the same tile
   in 32-byte vectors beat it). -march=native picks the width at build time, and build.py keys
   the library by this CPU, so each machine gets its own. */
#ifndef MOESERVE_SIMD_H
#define MOESERVE_SIMD_H
#include <stdint.h>
#include <string.h>

#if defined(MOESERVE_VL) /* forced (MOESERVE_KERNEL_VL): tests build the other width too */
#define VL MOESERVE_VL
#elif defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
typedef float vn __attribute__((vector_size(VL * 4)));
typedef int32_t vni __attribute__((vector_size(VL * 4)));

static inline vn loadn(const float *p) { vn v; memcpy(&v, p, sizeof v); return v; }
static inline void storen(float *p, vn v) { memcpy(p, &v, sizeof v); }
static inline vn splat(float x) { return (vn){0} + x; }

/* mask ? a : b, lane by lane (mask lanes all ones or zero, as comparisons give) */
static inline vn selectn(vni mask, vn a, vn b) {
    vni ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const vni r = (mask & ai) | (~mask & bi);
    vn out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline float hsumn(vn a) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += a[i];
    return s;
}

/* out[t] = the sum of the lanes of a[t], t = 0..15: pairs of vectors are folded half onto
   half, two inputs per output vector at each stage, so 16 horizontal sums cost a few dozen
   shuffles and adds instead of 16 serial chains. */
#if VL == 16
static inline void hsum_keys16(const vn a[16], float out[16]) {
    const vni h0 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vni h1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vni q0 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const vni q1 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const vni e0 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const vni e1 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const vni o0 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const vni o1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    vn b[8], c[4], d[2];
    for (int j = 0; j < 8; j++)
        b[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], h0) +
               __builtin_shuffle(a[2 * j], a[2 * j + 1], h1);
    for (int j = 0; j < 4; j++)
        c[j] = __builtin_shuffle(b[2 * j], b[2 * j + 1], q0) +
               __builtin_shuffle(b[2 * j], b[2 * j + 1], q1);
    for (int j = 0; j < 2; j++)
        d[j] = __builtin_shuffle(c[2 * j], c[2 * j + 1], e0) +
               __builtin_shuffle(c[2 * j], c[2 * j + 1], e1);
    storen(out, __builtin_shuffle(d[0], d[1], o0) + __builtin_shuffle(d[0], d[1], o1));
}
#else
static inline vn hsum8x8(const vn a[8]) {
    const vni h0 = {0, 1, 2, 3, 8, 9, 10, 11}, h1 = {4, 5, 6, 7, 12, 13, 14, 15};
    const vni q0 = {0, 1, 4, 5, 8, 9, 12, 13}, q1 = {2, 3, 6, 7, 10, 11, 14, 15};
    const vni o0 = {0, 2, 4, 6, 8, 10, 12, 14}, o1 = {1, 3, 5, 7, 9, 11, 13, 15};
    vn b[4], c[2];
    for (int j = 0; j < 4; j++)
        b[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], h0) +
               __builtin_shuffle(a[2 * j], a[2 * j + 1], h1);
    for (int j = 0; j < 2; j++)
        c[j] = __builtin_shuffle(b[2 * j], b[2 * j + 1], q0) +
               __builtin_shuffle(b[2 * j], b[2 * j + 1], q1);
    return __builtin_shuffle(c[0], c[1], o0) + __builtin_shuffle(c[0], c[1], o1);
}
static inline void hsum_keys16(const vn a[16], float out[16]) {
    storen(out, hsum8x8(a));
    storen(out + 8, hsum8x8(a + 8));
}
#endif

/* exp(x) for x <= 0 (scores minus their running max): 2^n * 2^f, f in (-1, 0], polynomial
   for 2^f; relative error below 2e-7 on [-87, 0], 0 below (and for -inf). */
static inline vn expn_nonpos(vn x) {
    const vn lo = splat(-87.0f);
    x = selectn(x < lo, lo, x);
    const vn t = x * 1.4426950408889634f;
    const vni n = __builtin_convertvector(t, vni); /* truncates toward 0: n >= t */
    vn f = t - __builtin_convertvector(n, vn);     /* in (-1, 0] */
    f = f * 0.6931471805599453f;                   /* exp(f) for f in (-0.7, 0] */
    vn p = splat(1.0f / 5040.0f);
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const vni bits = (n + 127) << 23;
    vn scale;
    memcpy(&scale, &bits, sizeof scale);
    return selectn(x < splat(-86.9f), (vn){0}, p * scale);
}
/* silu(g) * u over n floats, with expn_nonpos (silu(g) = g * sigmoid(g), and
   sigmoid from exp(-|g|) <= 1 so it never overflows). */
static inline void silu_mul(const float *g, const float *u, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += VL) {
        const vn gv = loadn(g + i), uv = loadn(u + i);
        const vni neg = gv < (vn){0};
        const vn e = expn_nonpos(selectn(neg, gv, -gv)); /* exp(-|g|) */
        const vn sig = selectn(neg, e, splat(1.0f)) / (1.0f + e);
        storen(out + i, gv * sig * uv);
    }
}

#endif
