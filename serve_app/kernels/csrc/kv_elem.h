/* The paged KV cache's element type, as the attention kernels read it.

   float32 by default. With MOESERVE_KV_BF16 defined (paged_*_bf16.c define it and include
   their float32 source, so each kernel is compiled once per cache type into one library),
   bfloat16: the top 16 bits of a float32, rounded to nearest even when the cache is written
   (torch's float -> bfloat16 conversion, serve_app/model/layers/attention.py). A row is
   widened to float32 in registers as it is loaded (zero-extend to 32 bits, shift left 16: one
   vpmovzxwd + vpslld per vector at either width); scores, softmax and P @ V stay float32.
   KV_NAME gives the exported functions of the bf16 build their "_bf16" suffix. */
#ifndef MOESERVE_KV_ELEM_H
#define MOESERVE_KV_ELEM_H
#include "simd.h"

#ifdef MOESERVE_KV_BF16
typedef uint16_t kv_t;
typedef uint16_t vkv16 __attribute__((vector_size(VL * 2)));
typedef uint32_t vnu __attribute__((vector_size(VL * 4)));
#define KV_NAME(name) name##_bf16

/* VL cache elements at p, widened to float32 */
static inline vn loadkv(const kv_t *p) {
    vkv16 h;
    memcpy(&h, p, sizeof h);
    const vnu w = __builtin_convertvector(h, vnu) << 16;
    vn out;
    memcpy(&out, &w, sizeof out);
    return out;
}
#else
typedef float kv_t;
#define KV_NAME(name) name
static inline vn loadkv(const kv_t *p) { return loadn(p); }
#endif
#endif
