/* paged_decode.c over a bfloat16 KV cache: the same kernels, rows widened to float32 as they are
   loaded (kv_elem.h), exported with a "_bf16" suffix. */
#define MOESERVE_KV_BF16
#include "paged_decode.c"
