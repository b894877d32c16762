/* kernel_loops.c: where the one-thread float32 forward's time goes.
 *
 * The kernel (fce_run_f32_avx512, linked in) against plain loops doing the same
 * per-element work, all timed interleaved in one process over the same float32
 * array (1 GiB: from memory; SMALL=1: 256 KiB from L2, repeated). x86-64 with
 * AVX-512 only; build and run with `bash bench/kernel_loops.sh` (see there).
 *
 *   read        AVX-512 max over the array, prefetch 1 KiB ahead: the memory
 *   loop        max + exp(x - k) + sum per element, one fixed shift k, one
 *               stream, prefetch 2 KiB ahead: the arithmetic with no bookkeeping
 *   loop-blocks the same, folded into double every 512 floats with a max and a
 *               reduction per 1024: the kernel's bookkeeping without its two passes
 *   kernel      fastce's forward (loss, mean), rows of 32768 classes
 *
 * Prints the median and best GB/s of each over REPS rounds (argument, default 9).
 * The exp here is the kernel's float32 formula written with intrinsics.
 */
#define _DEFAULT_SOURCE /* madvise, clock_gettime under -std=c11 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "fastce_internal.h"

#define ROW 32768
#define PF 2048

/* the kernel asks the dispatcher (not linked here) how many threads to use: one */
int fce_pick_threads(int n_threads, int64_t elems, int64_t n_items)
{
    (void)n_threads;
    (void)elems;
    (void)n_items;
    return 1;
}

static size_t n;
static float *x;
static int64_t *y;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define C1(v) _mm512_set1_ps(v)
static inline __m512 vexp(__m512 v)
{
    __m512 t = _mm512_fmadd_ps(v, C1(1.44269504088896341f), C1(12582912.0f + 127.0f));
    __m512 k = _mm512_sub_ps(t, C1(12582912.0f + 127.0f));
    __m512 r = _mm512_fnmadd_ps(k, C1(0.693359375f), v);
    r = _mm512_fnmadd_ps(k, C1(-2.12194440e-4f), r);
    __m512 p = C1(1.3871070696040988e-3f);
    p = _mm512_fmadd_ps(p, r, C1(8.36954079568386e-3f));
    p = _mm512_fmadd_ps(p, r, C1(4.166741669178009e-2f));
    p = _mm512_fmadd_ps(p, r, C1(1.6666512191295624e-1f));
    p = _mm512_fmadd_ps(p, r, C1(4.999999701976776e-1f));
    p = _mm512_fmadd_ps(p, r, C1(1.0f));
    p = _mm512_fmadd_ps(p, r, C1(1.0f));
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(v, C1(-87.3365447505531f), _CMP_NLT_UQ), p, k);
}

static double read_only(void)
{
    __m512 a = C1(-1e30f), b = a, c = a, d = a;
    for (size_t i = 0; i < n; i += 64) {
        _mm_prefetch((const char *)(x + i) + 1024, _MM_HINT_T0);
        a = _mm512_max_ps(a, _mm512_loadu_ps(x + i));
        b = _mm512_max_ps(b, _mm512_loadu_ps(x + i + 16));
        c = _mm512_max_ps(c, _mm512_loadu_ps(x + i + 32));
        d = _mm512_max_ps(d, _mm512_loadu_ps(x + i + 48));
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a, b), _mm512_max_ps(c, d)));
}

/* one step of the plain loops: two vectors at x + i */
#define STEP(i)                                                                       \
    do {                                                                              \
        _mm_prefetch((const char *)(x + (i)) + PF, _MM_HINT_T0);                      \
        _mm_prefetch((const char *)(x + (i)) + PF + 64, _MM_HINT_T0);                 \
        __m512 u = _mm512_loadu_ps(x + (i)), v = _mm512_loadu_ps(x + (i) + 16);       \
        m0 = _mm512_max_ps(m0, u);                                                    \
        m1 = _mm512_max_ps(m1, v);                                                    \
        s0 = _mm512_add_ps(s0, vexp(_mm512_sub_ps(u, k)));                            \
        s1 = _mm512_add_ps(s1, vexp(_mm512_sub_ps(v, k)));                            \
    } while (0)

static double loop(void)
{
    double sink = 0;
    const __m512 k = C1(5.0f);
    for (size_t r0 = 0; r0 < n; r0 += ROW) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, m0 = C1(-1e30f), m1 = m0;
        for (size_t i = r0; i < r0 + ROW; i += 32) STEP(i);
        sink += _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) +
                _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    }
    return sink;
}

static double loop_blocks(void)
{
    double sink = 0;
    const __m512 k = C1(5.0f);
    for (size_t b0 = 0; b0 < n; b0 += 1024) {
        __m512 m0 = C1(-1e30f), m1 = m0;
        __m512d sd = _mm512_setzero_pd();
        for (size_t c0 = b0; c0 < b0 + 1024; c0 += 512) {
            __m512 s0 = _mm512_setzero_ps(), s1 = s0;
            for (size_t i = c0; i < c0 + 512; i += 32) STEP(i);
            s0 = _mm512_add_ps(s0, s1);
            sd = _mm512_add_pd(sd, _mm512_cvtps_pd(_mm512_castps512_ps256(s0)));
            sd = _mm512_add_pd(sd, _mm512_cvtps_pd(_mm512_extractf32x8_ps(s0, 1)));
        }
        sink += _mm512_reduce_add_pd(sd) + _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    }
    return sink;
}

static double kernel(void)
{
    fce_job j;
    memset(&j, 0, sizeof j);
    j.op = FCE_OP_LOSS;
    j.reduction = FCE_REDUCE_MEAN;
    j.x = x;
    j.n_outer = (int64_t)(n / ROW);
    j.n_classes = ROW;
    j.n_inner = 1;
    j.outer_stride = ROW;
    j.class_stride = 1;
    j.inner_stride = 1;
    j.target = y;
    j.ignore_index = -100;
    j.n_threads = 1;
    if (fce_run_f32_avx512(&j) != FCE_OK) abort();
    return j.loss_reduced;
}

static int cmpd(const void *a, const void *b)
{
    double d = *(const double *)a - *(const double *)b;
    return d < 0 ? -1 : d > 0;
}

int main(int argc, char **argv)
{
    enum { NV = 4, MAXR = 101 };
    const char *names[NV] = {"read", "loop", "loop-blocks", "kernel"};
    double (*fns[NV])(void) = {read_only, loop, loop_blocks, kernel};
    int reps = argc > 1 ? atoi(argv[1]) : 9;
    int small = getenv("SMALL") != NULL, inner = small ? 2000 : 1;
    if (reps < 1 || reps > MAXR) reps = 9;
    n = small ? (size_t)1 << 16 : (size_t)1 << 28;
    x = aligned_alloc(1 << 21, n * sizeof(float));
    y = malloc(n / ROW * sizeof(int64_t));
    if (!x || !y) return 1;
    madvise(x, n * sizeof(float), MADV_HUGEPAGE); /* as NumPy does for large arrays */
    srand(1);
    for (size_t i = 0; i < n; i++) x[i] = 10.2f * ((float)rand() / (float)RAND_MAX - 0.5f);
    for (size_t i = 0; i < n / ROW; i++) y[i] = rand() % ROW;
    static double t[NV][MAXR];
    double sink = 0;
    for (int v = 0; v < NV; v++) sink += fns[v](); /* warm-up */
    for (int r = 0; r < reps; r++)
        for (int v0 = 0; v0 < NV; v0++) {
            int v = (v0 + r) % NV;
            double t0 = now();
            for (int it = 0; it < inner; it++) sink += fns[v]();
            t[v][r] = now() - t0;
        }
    printf("%s, float32, 1 thread, %d rounds interleaved\n",
           small ? "256 KiB (L2), 2000 passes per round" : "1 GiB (memory)", reps);
    for (int v = 0; v < NV; v++) {
        qsort(t[v], (size_t)reps, sizeof(double), cmpd);
        double bytes = (double)n * sizeof(float) * inner;
        printf("  %-12s median %5.1f GB/s   best %5.1f GB/s\n", names[v],
               bytes / t[v][reps / 2] / 1e9, bytes / t[v][0] / 1e9);
    }
    return sink == 12345.0; /* keeps the loops from being optimised away */
}
