/* fastce_shards.c: the states of vocabulary shards (fastce.h), merged.
 * ISA- and dtype-neutral (double), compiled once. The merge of (M, S, D, Q) is the
 * one the threaded kernel uses for the segments of a long row (lse_state.h); N is a
 * sum of exps like S and moves with it; the other fields add. */
#include "fastce.h"
#include "lse_state.h"

static fce_state state_of(const double *r)
{
    return (fce_state){r[FCE_ST_M], r[FCE_ST_S], r[FCE_ST_D], r[FCE_ST_Q]};
}

/* a <- a merged with b (the shard after a's) */
static void record_merge(double *a, const double *b)
{
    fce_state sa = state_of(a), sb = state_of(b);
    fce_state_merge(&sa, &sb);
    double k = fce_shift(sa.m);
    a[FCE_ST_N] = fce_reshift(a[FCE_ST_N], fce_shift(a[FCE_ST_M]), k) +
                  fce_reshift(b[FCE_ST_N], fce_shift(b[FCE_ST_M]), k);
    a[FCE_ST_M] = sa.m;
    a[FCE_ST_S] = sa.s;
    a[FCE_ST_D] = sa.d;
    a[FCE_ST_Q] = sa.q;
    a[FCE_ST_T] += b[FCE_ST_T];
    a[FCE_ST_H] += b[FCE_ST_H];
    a[FCE_ST_NAN] += b[FCE_ST_NAN];
}

void fce_state_combine(const double *states, int64_t n_states, int64_t n_samples, double *out)
{
    const int64_t len = FCE_STATE_LEN;
    for (int64_t s = 0; s < n_samples; s++) {
        double acc[FCE_STATE_LEN];
        for (int64_t f = 0; f < len; f++) acc[f] = states[s * len + f];
        for (int64_t i = 1; i < n_states; i++) record_merge(acc, states + (i * n_samples + s) * len);
        for (int64_t f = 0; f < len; f++) out[s * len + f] = acc[f];
    }
}

/* the merge of one state with an empty one of max m: S, N reshifted, D moved by Q (K - k),
 * as fce_state_merge does it */
void fce_state_rescale(double *states, int64_t n_samples, const double *m)
{
    for (int64_t s = 0; s < n_samples; s++) {
        double *r = states + s * FCE_STATE_LEN;
        double k0 = fce_shift(r[FCE_ST_M]), k = fce_shift(m[s]);
        r[FCE_ST_S] = fce_reshift(r[FCE_ST_S], k0, k);
        r[FCE_ST_N] = fce_reshift(r[FCE_ST_N], k0, k);
        r[FCE_ST_D] = r[FCE_ST_D] + r[FCE_ST_Q] * (k - k0);
        r[FCE_ST_M] = m[s];
    }
}
