/* 16-float vectors (GCC vector extensions: AVX-512 or 2 x AVX2 registers from -march=native)
   and the helpers the kernels share. */
#ifndef MOESERVE_SIMD_H
#define MOESERVE_SIMD_H
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* mask ? a : b, lane by lane (mask lanes all ones or zero, as comparisons give) */
static inline v16 select16(v16i mask, v16 a, v16 b) {
    v16i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const v16i r = (mask & ai) | (~mask & bi);
    v16 out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline float hsum(v16 a) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += a[i];
    return s;
}

/* r[t] = the sum of the lanes of a[t], t = 0..15: pairs of vectors are folded half onto
   half (8, 4, 2, 1 partial sums per input), two inputs per output vector at each stage, so 16
   horizontal sums cost 45 shuffles and adds instead of 16 serial chains of 15 adds. */
static inline v16 hsum16x16(const v16 a[16]) {
    const v16i h0 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const v16i h1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const v16i q0 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const v16i q1 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const v16i e0 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const v16i e1 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const v16i o0 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const v16i o1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    v16 b[8], c[4], d[2];
    for (int j = 0; j < 8; j++)
        b[j] = __builtin_shuffle(a[2 * j], a[2 * j + 1], h0) +
               __builtin_shuffle(a[2 * j], a[2 * j + 1], h1);
    for (int j = 0; j < 4; j++)
        c[j] = __builtin_shuffle(b[2 * j], b[2 * j + 1], q0) +
               __builtin_shuffle(b[2 * j], b[2 * j + 1], q1);
    for (int j = 0; j < 2; j++)
        d[j] = __builtin_shuffle(c[2 * j], c[2 * j + 1], e0) +
               __builtin_shuffle(c[2 * j], c[2 * j + 1], e1);
    return __builtin_shuffle(d[0], d[1], o0) + __builtin_shuffle(d[0], d[1], o1);
}

static inline float hmax(v16 a) {
    float m = a[0];
    for (int i = 1; i < 16; i++) m = a[i] > m ? a[i] : m;
    return m;
}

/* exp(x) for x <= 0 (scores minus their running max): 2^n * 2^f, f in (-1, 0], polynomial
   for 2^f; relative error below 2e-7 on [-87, 0], 0 below (and for -inf). */
static inline v16 exp16_nonpos(v16 x) {
    const v16 lo = (v16){0} - 87.0f;
    x = select16(x < lo, lo, x);
    const v16 t = x * 1.4426950408889634f;
    const v16i n = __builtin_convertvector(t, v16i); /* truncates toward 0: n >= t */
    v16 f = t - __builtin_convertvector(n, v16);     /* in (-1, 0] */
    f = f * 0.6931471805599453f;                     /* exp(f) for f in (-0.7, 0] */
    v16 p = (v16){0} + 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const v16i bits = (n + 127) << 23;
    v16 scale;
    memcpy(&scale, &bits, sizeof scale);
    const v16 tiny = (v16){0} - 86.9f;
    return select16(x < tiny, (v16){0}, p * scale);
}
#endif
