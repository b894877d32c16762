/* kernel_loops.c: where the one-thread float32 forward's time goes, on any x86-64
 * variant (built by bench/kernel_loops.sh for each ISA this CPU runs).
 *
 * The kernel (the planner and one variant's paths, linked in) against plain loops
 * doing the same per-element work with the kernel's own vector type and exp
 * (simd.h, vmath.h), all timed interleaved in one process over the same float32
 * array (1 GiB: from memory; SMALL=1: 256 KiB from L2, repeated):
 *
 *   read        max over the array, four accumulators: the memory read rate
 *   loop        max + exp(x - k) + sum per element, one fixed shift, one stream:
 *               the arithmetic with no bookkeeping (the ceiling for the kernel)
 *   loop-fused  the same in the kernel's structure: blocks of 4 KiB, the max of the
 *               next block read (from memory) while this one is summed (from L1)
 *   kernel      fastce's forward (loss, mean), rows of 32768 classes, without
 *               and with the software prefetch (tuning.prefetch 0 / 1)
 *
 * Prints the median and best GB/s of each over REPS rounds (argument, default 9).
 */
#define _DEFAULT_SOURCE /* madvise, clock_gettime under -std=c11 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "vmath.h"
#include "fce_ctx.h"

#ifndef ROW
#define ROW 32768
#endif

/* what the planner asks the dispatcher (not linked here): this variant, one thread */
extern const struct fce_paths_f32 ISA_NAME(fce_paths);
const struct fce_paths_f32 *fce_current_paths_f32(void) { return &ISA_NAME(fce_paths); }
const struct fce_paths_f64 *fce_current_paths_f64(void) { return NULL; }
static fce_tuning tune = {0};
const fce_tuning *fce_current_tuning(void) { return &tune; }
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

static double read_only(void)
{
    V a = splat(-1e30f), b = a, c = a, d = a;
    for (size_t i = 0; i < n; i += 4 * L) {
        a = vmax(a, loadu(x + i));
        b = vmax(b, loadu(x + i + L));
        c = vmax(c, loadu(x + i + 2 * L));
        d = vmax(d, loadu(x + i + 3 * L));
    }
    return hmax(vmax(vmax(a, b), vmax(c, d)));
}

static double loop(void)
{
    double sink = 0;
    const V k = splat(5.0f);
    for (size_t r0 = 0; r0 < n; r0 += ROW) {
        V s0 = splat(0), s1 = s0, m0 = splat(-1e30f), m1 = m0;
        for (size_t i = r0; i < r0 + ROW; i += 2 * L) {
            V u = loadu(x + i), v = loadu(x + i + L);
            m0 = vmax(m0, u);
            m1 = vmax(m1, v);
            s0 += vexp(u - k);
            s1 += vexp(v - k);
        }
        V s = s0 + s1;
        for (int64_t i = 0; i < L; i++) sink += s[i];
        sink += hmax(vmax(m0, m1));
    }
    return sink;
}

#ifndef EXP_BLK
#define EXP_BLK 1024
#endif
/* the kernel's structure without its bookkeeping: blocks of EXP_BLK floats, pass 1
 * (max) of the next block fused into pass 2 (exp-sum, from L1) of this one */
static double loop_fused(void)
{
    double sink = 0;
    const V k = splat(5.0f);
    V n0 = splat(-1e30f), n1 = n0;
    for (size_t b0 = 0; b0 < n; b0 += EXP_BLK) {
        const float *xb = x + b0, *xn = b0 + EXP_BLK < n ? xb + EXP_BLK : xb;
        V s0 = splat(0), s1 = s0, m0 = splat(-1e30f), m1 = m0;
        for (size_t i = 0; i < EXP_BLK; i += 2 * L) {
            m0 = vmax(m0, loadu(xn + i));
            m1 = vmax(m1, loadu(xn + i + L));
            s0 += vexp(loadu(xb + i) - k);
            s1 += vexp(loadu(xb + i + L) - k);
        }
        V s = s0 + s1;
        sink += s[0] + hmax(vmax(vmax(m0, m1), vmax(n0, n1)));
        n0 = m0;
        n1 = m1;
    }
    return sink;
}

static double kernel(int prefetch)
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
    tune.prefetch = prefetch;
    if (fce_run_f32(&j) != FCE_OK) abort();
    return j.loss_reduced;
}
static double kernel_nopf(void) { return kernel(0); }
static double kernel_pf(void) { return kernel(1); }

static int cmpd(const void *a, const void *b)
{
    double d = *(const double *)a - *(const double *)b;
    return d < 0 ? -1 : d > 0;
}

int main(int argc, char **argv)
{
    enum { NV = 5, MAXR = 101 };
    const char *names[NV] = {"read", "loop", "loop-fused", "kernel", "kernel+pf"};
    double (*fns[NV])(void) = {read_only, loop, loop_fused, kernel_nopf, kernel_pf};
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
    printf("%s: %s, float32, 1 thread, %d rounds interleaved\n", FCE_STR(FCE_ISA),
           small ? "256 KiB (L2), 2000 passes per round" : "1 GiB (memory)", reps);
    for (int v = 0; v < NV; v++) {
        qsort(t[v], (size_t)reps, sizeof(double), cmpd);
        double bytes = (double)n * sizeof(float) * inner;
        printf("  %-12s median %5.1f GB/s   best %5.1f GB/s\n", names[v],
               bytes / t[v][reps / 2] / 1e9, bytes / t[v][0] / 1e9);
    }
    return sink == 12345.0; /* keeps the loops from being optimised away */
}
