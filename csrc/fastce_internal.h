/* Shared between the kernel variants and the dispatcher; not part of the API. */
#ifndef FASTCE_INTERNAL_H
#define FASTCE_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include "fastce.h"

#if defined(__GNUC__) || defined(__clang__)
#define FCE_INLINE static inline __attribute__((always_inline))
#else
#define FCE_INLINE static inline
#endif

/* The online log-sum-exp state of a run of classes of one sample.
 *   m: the largest logit seen (NaN ignored; -inf when none is finite)
 *   s: sum of exp(x - k) with k = fce_shift(m)
 *   q: sum of the class coefficients q_c (weights, smoothing, probabilities)
 *   d: sum of q_c * (k - x_c), a sum of non-negative terms (no cancellation)
 * Shifting by k = 0 instead of m = -inf keeps exp(-inf - -inf) = NaN away while
 * leaving NaN logits to poison s, as they must. */
typedef struct {
    double m, s, d, q;
} fce_state;

static inline double fce_shift(double m) { return m == -INFINITY ? 0.0 : m; }

/* a <- a merged with b (b holds classes after a's, for a fixed merge order).
 * With M = max(m_a, m_b), k = shift(M):
 *   s = s_a exp(k_a - k) + s_b exp(k_b - k)
 *   d = d_a + q_a (k - k_a) + d_b + q_b (k - k_b)      (all terms >= 0)
 * A zero s is not rescaled, so 0 * exp(+huge) never makes a NaN. */
static inline void fce_state_merge(fce_state *a, const fce_state *b)
{
    double m = b->m > a->m ? b->m : a->m;
    double k = fce_shift(m), ka = fce_shift(a->m), kb = fce_shift(b->m);
    double sa = (a->s == 0.0 || ka == k) ? a->s : a->s * exp(ka - k);
    double sb = (b->s == 0.0 || kb == k) ? b->s : b->s * exp(kb - k);
    a->d = a->d + b->d + a->q * (k - ka) + b->q * (k - kb);
    a->q += b->q;
    a->s = sa + sb;
    a->m = m;
}

/* Work partition, fixed by the shape alone (never by the thread count), so
 * that every reduction sums the same partials in the same order. */
#define FCE_ITEM_ELEMS 32768      /* logits per work item (rows path) */
#define FCE_SEG_BYTES (512 * 1024) /* longer rows are split into segments */
#define FCE_SMALL_C 32            /* C <= this: transpose tiles, vectorise across rows */
#define FCE_STREAM_BYTES (8 << 20) /* outputs this large bypass the caches */
#define FCE_COLS_MAX_C 1024       /* the columns layout keeps a C x 4-vector tile in cache */

/* One kernel variant per (dtype, instruction set). */
typedef int (*fce_run_fn)(fce_job *);
typedef void (*fce_exp_f32_fn)(const float *, float *, int64_t);
typedef void (*fce_exp_f64_fn)(const double *, double *, int64_t);

#define FCE_DECLARE_VARIANT(isa)                                   \
    int fce_run_f32_##isa(fce_job *job);                           \
    int fce_run_f64_##isa(fce_job *job);                           \
    void fce_exp_f32_##isa(const float *x, float *y, int64_t n);   \
    void fce_exp_f64_##isa(const double *x, double *y, int64_t n);

FCE_DECLARE_VARIANT(scalar)
#if defined(__x86_64__) || defined(_M_X64)
#define FCE_X86 1
FCE_DECLARE_VARIANT(sse2)
FCE_DECLARE_VARIANT(avx2)
FCE_DECLARE_VARIANT(avx512)
#elif defined(__aarch64__)
#define FCE_ARM64 1
FCE_DECLARE_VARIANT(neon)
#endif

/* Threads to use for a job touching `elems` logits (n_threads <= 0: choose). */
int fce_pick_threads(int n_threads, int64_t elems, int64_t n_items);

#endif
