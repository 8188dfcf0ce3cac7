/* LoRA deltas of a mixed batch, gathered by adapter (BGMV), on the CPU (float32).

   Row r runs adapter slot s = slot[r] (s < 0: the base model, its row is never touched) and,
   for routed experts, expert e = expert[r] (expert NULL: a linear, e = 0). With that slot's
   factors A [E, rank, K] and Bt [E, rank, N] (B transposed once when the adapter is first
   used; its scaling is already folded in by serve_app/lora/peft_format.py):
       shrink  y = x[r] @ A[e].T                 (rank floats)
       expand  out[r] += y @ Bt[e]               (N floats; out may be a column slice)
   A slot whose a_ptr is 0 does not adapt this module: its rows are skipped too.

   Why a kernel: the torch path ran two tiny matmuls per (module, adapter) group, and each
   one opened MKL's OpenMP region; with 8 adapters on a 2-core box the barrier waits were most
   of the LoRA time (py-spy: libgomp spinning under add_linear_). Here a module is one call
   and one parallel region at most, none when the work is small (decode).

   Rows are sorted by (slot, expert) first (a mixed decode batch interleaves adapters), and
   each run of up to RB rows with one (slot, expert) is a block that reads every A and Bt row
   once for all its rows; blocks write distinct rows, so they run in parallel. Ranks
   may differ per slot. The vector width is simd.h's VL (8 on AVX2, 16 on AVX-512). */
#include <stdlib.h>

#include "simd.h"

#define MAX_RANK 256 /* the caller sends larger ranks to torch */

#define RB 4 /* rows per block: RB accumulators per factor row */
#define JB 2 /* A rows per shrink step: RB * JB independent FMA chains */
#define PAR_MIN_FMAS (1 << 22) /* below (~0.3 ms serial) a parallel region costs more than it saves */

int64_t moeserve_lora_vector_lanes(void) { return VL; }
int64_t moeserve_lora_max_rank(void) { return MAX_RANK; }

/* y[i][j] = x[row[i]] . a[j] for i < RB (rows past nr repeat the last one), j < rank */
static void shrink(const float *x, int64_t ldx, const int64_t *row, int nr, const float *a,
                   int64_t k, int64_t rank, float *y) {
    const float *xr[RB];
    for (int i = 0; i < RB; i++) xr[i] = x + row[i < nr ? i : nr - 1] * ldx;
    for (int64_t j0 = 0; j0 < rank; j0 += JB) {
        const float *aj[JB];
        for (int jj = 0; jj < JB; jj++) aj[jj] = a + (j0 + jj < rank ? j0 + jj : rank - 1) * k;
        vn acc[RB][JB];
        for (int i = 0; i < RB; i++)
            for (int jj = 0; jj < JB; jj++) acc[i][jj] = (vn){0};
        int64_t c = 0;
        for (; c + VL <= k; c += VL) {
            vn av[JB];
            for (int jj = 0; jj < JB; jj++) av[jj] = loadn(aj[jj] + c);
            for (int i = 0; i < RB; i++) {
                const vn xv = loadn(xr[i] + c);
                for (int jj = 0; jj < JB; jj++) acc[i][jj] += xv * av[jj];
            }
        }
        for (int i = 0; i < nr; i++)
            for (int jj = 0; jj < JB && j0 + jj < rank; jj++) {
                float s = hsumn(acc[i][jj]);
                for (int64_t t = c; t < k; t++) s += xr[i][t] * aj[jj][t];
                y[i * rank + j0 + jj] = s;
            }
    }
}

/* out[row[i]][0:n] += y[i] @ bt for i < nr; bt [rank, n] */
static void expand(const float *y, const int64_t *row, int nr, const float *bt, int64_t rank,
                   int64_t n, float *out, int64_t ldo) {
    float *o[RB];
    const float *yr[RB];
    for (int i = 0; i < RB; i++) {
        o[i] = out + row[i < nr ? i : nr - 1] * ldo;
        yr[i] = y + (i < nr ? i : nr - 1) * rank;
    }
    int64_t c = 0;
    for (; c + VL <= n; c += VL) {
        vn acc[RB];
        for (int i = 0; i < RB; i++) acc[i] = (vn){0};
        for (int64_t j = 0; j < rank; j++) {
            const vn b = loadn(bt + j * n + c);
            for (int i = 0; i < RB; i++) acc[i] += splat(yr[i][j]) * b;
        }
        /* NOTE: only the nr real rows are written (the padded ones alias the last row) */
        for (int i = 0; i < nr; i++) storen(o[i] + c, loadn(o[i] + c) + acc[i]);
    }
    for (; c < n; c++)
        for (int i = 0; i < nr; i++) {
            float s = 0.0f;
            for (int64_t j = 0; j < rank; j++) s += yr[i][j] * bt[j * n + c];
            o[i][c] += s;
        }
}

typedef struct {
    int64_t key, row; /* key: slot * n_experts + expert */
} item;

static int by_key(const void *p, const void *q) {
    const item *a = p, *b = q;
    if (a->key != b->key) return a->key < b->key ? -1 : 1;
    return (a->row > b->row) - (a->row < b->row);
}

void moeserve_lora_bgmv(const float *x, int64_t ldx, int64_t rows, int64_t k,
                        const int64_t *slot, const int64_t *expert, const int64_t *a_ptr,
                        const int64_t *bt_ptr, const int64_t *rank, int64_t n_slots,
                        float *out, int64_t ldo, int64_t n, int num_threads) {
    int64_t n_experts = 1;
    if (expert)
        for (int64_t r = 0; r < rows; r++)
            if (expert[r] >= n_experts) n_experts = expert[r] + 1;
    /* the adapted rows by (slot, expert), then their blocks (starts into `sorted`) */
    item *items = malloc(sizeof(item) * (rows > 0 ? rows : 1));
    int64_t *sorted = malloc(sizeof(int64_t) * (rows > 0 ? rows : 1));
    int64_t *block = malloc(sizeof(int64_t) * (rows > 0 ? rows : 1));
    int64_t *block_rows = malloc(sizeof(int64_t) * (rows > 0 ? rows : 1));
    if (!items || !sorted || !block || !block_rows) goto done;
    int64_t m = 0;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t s = slot[r];
        if (s < 0 || s >= n_slots || a_ptr[s] == 0) continue; /* base row: untouched */
        items[m].key = s * n_experts + (expert ? expert[r] : 0);
        items[m++].row = r;
    }
    qsort(items, m, sizeof(item), by_key);
    int64_t n_blocks = 0, fmas = 0;
    for (int64_t i = 0; i < m;) {
        int64_t end = i + 1;
        while (end < m && end - i < RB && items[end].key == items[i].key) end++;
        block[n_blocks] = i;
        block_rows[n_blocks++] = end - i;
        fmas += (end - i) * rank[items[i].key / n_experts] * (k + n);
        i = end;
    }
    for (int64_t i = 0; i < m; i++) sorted[i] = items[i].row;
    const int par = num_threads > 1 && fmas >= PAR_MIN_FMAS && n_blocks > 1;
    /* dynamic: on shared cores a descheduled thread must not hold half the blocks */
#pragma omp parallel for schedule(dynamic, 8) num_threads(num_threads) if (par)
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t i = block[b], s = items[i].key / n_experts, e = items[i].key % n_experts;
        const int64_t rk = rank[s];
        const int nr = (int)block_rows[b];
        const float *a = (const float *)(intptr_t)a_ptr[s] + e * rk * k;
        const float *bt = (const float *)(intptr_t)bt_ptr[s] + e * rk * n;
        float y[RB * MAX_RANK];
        shrink(x, ldx, sorted + i, nr, a, k, rk, y);
        expand(y, sorted + i, nr, bt, rk, n, out, ldo);
    }
done:
    free(items);
    free(sorted);
    free(block);
    free(block_rows);
}
