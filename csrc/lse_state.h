/* lse_state.h: the online log-sum-exp state of a run of classes, and its merge.
 * ISA-neutral plain C (double), used by every path and by the planner. */
#ifndef FCE_LSE_STATE_H
#define FCE_LSE_STATE_H

#include <math.h>

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

/* A sum of exps s shifted by k0 taken to shift k (k >= k0). A zero s is not rescaled,
 * so 0 * exp(+huge) never makes a NaN. */
static inline double fce_reshift(double s, double k0, double k)
{
    return (s == 0.0 || k0 == k) ? s : s * exp(k0 - k);
}

/* a <- a merged with b (b holds classes after a's, for a fixed merge order).
 * With M = max(m_a, m_b), k = shift(M):
 *   s = s_a exp(k_a - k) + s_b exp(k_b - k)
 *   d = d_a + q_a (k - k_a) + d_b + q_b (k - k_b)      (all terms >= 0) */

static inline void fce_state_merge(fce_state *a, const fce_state *b)
{
    double m = b->m > a->m ? b->m : a->m;
    double k = fce_shift(m), ka = fce_shift(a->m), kb = fce_shift(b->m);
    double sa = fce_reshift(a->s, ka, k), sb = fce_reshift(b->s, kb, k);
    a->d = a->d + b->d + a->q * (k - ka) + b->q * (k - kb);
    a->q += b->q;
    a->s = sa + sb;
    a->m = m;
}

#endif
