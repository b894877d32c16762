/* fce_ctx.h: what the planner hands to the paths, and the one per-sample finish.
 *
 * ISA-neutral, per dtype: included by the planner (compiled once per dtype) and
 * by every kernel variant. The maths of a sample, once its state is known
 * (lse_state.h), is written here and nowhere else:
 *   lse  = k + ls,  ls = log s
 *   loss = a ((k - x_y) + ls) + b (d + q ls)   (LOSS_TARGET + LOSS_COEFS)
 *          + zw lse^2                          (LOSS_Z, the z-loss: zw = z_loss w_y)
 *   d loss / d x_c = c1 softmax_c - c2 q_c  (- a gs at c = y),
 *   c1 = gs (a + b q) + gs zc,  c2 = gs b,  zc = 2 zw lse (GRAD_CZ, with a z-loss)
 * with, for class-index targets y:  a = (1 - eps) w_y, b = eps / C, q_c = w_c (or 1)
 *      for probability targets p:   a = 0,             b = 1,       q_c = w_c ((1-eps) p_c + eps/C)
 * and gs the upstream gradient of the sample. The formulas are macros so that
 * the same text serves one sample in double and L samples in double lanes.
 * With a logit transform (logit_scale s, softcap; xfp below) every x above is the
 * transformed z and the gradient is d loss / d z times dz/dx = s sech^2(x s/cap): the
 * s is in gs (ctx.gfac), the sech^2 (1 without a cap) per element in the write pass
 * and, for the target class, in the sample (dy). */
#ifndef FCE_CTX_H
#define FCE_CTX_H

#include "fce_dtype.h"
#include "fastce_internal.h"
#include "lse_state.h"

/* the class coefficients q_c of a job: none, ones (smoothing), weights
 * (smoothing with weights), probabilities, probabilities with weights */
enum { Q_NONE = 0, Q_ONE, Q_W, Q_P, Q_PW };

/* the loss's two terms: the target's (index targets) and the coefficients' (smoothing,
 * probabilities); a term that does not apply is left out, not multiplied by 0 (ls may be
 * -inf or NaN) */
#define LOSS_TARGET(a, k, xy, ls) ((a) * (((k) - (xy)) + (ls)))
#define LOSS_COEFS(b, d, q, ls) ((b) * ((d) + (q) * (ls)))
#define GRAD_C1(gs, a, b, q) ((gs) * ((a) + (b) * (q)))
#define GRAD_C2(gs, b) ((gs) * (b))
/* the z-loss's term of the loss and of c1 (added only when z_loss > 0) */
#define LOSS_Z(zw, lse) ((zw) * ((lse) * (lse)))
#define ZLOSS_ZC(zw, lse) (2.0 * (zw) * (lse))
#define GRAD_CZ(gs, zc) ((gs) * (zc))

typedef struct NAME(fce_ctx) ctx;
typedef struct sample sample;

/* The logit transform as the paths take it: `on` is a constant where a path is
 * instantiated (0: the logits as they are, the loads of before); with on,
 * z = s x, or with cap > 0, z = cap tanh(u x), u = s / cap. */
typedef struct {
    int on;
    T s, u, cap;
} xfp;

/* One work item of a path: items are numbered by the planner, which runs
 * them on its threads (tid: the thread's number, for its scratch). */
typedef void (*item_fn)(const ctx *cx, int64_t it, int tid);

/* The paths of one kernel variant (fastce_kernel.c), as the planner calls them. */
struct NAME(fce_paths) {
    int64_t lanes;                /* L: vector lanes of T */
    int64_t group;                /* positions per column tile (small C, K-dim) */
    item_fn rows_small_c_loss;    /* C <= FCE_SMALL_C, loss only, index targets, no smoothing */
    item_fn rows_small_c_grad;    /* the same with the gradient */
    item_fn rows_small_c;         /* C <= FCE_SMALL_C, anything else */
    item_fn rows_no_output;       /* FCE_SMALL_C < C <= SEG, no output */
    item_fn rows_with_output;     /* FCE_SMALL_C < C <= SEG, gradient or log-softmax */
    item_fn segment_stats;        /* C > SEG: the state of one row segment */
    item_fn segment_write;        /* C > SEG: the output of one row segment */
    item_fn cols;                 /* K-dim: a tile of positions of one outer index */
    void (*exp)(const T *x, T *y, int64_t n);
    /* one logit transformed as the vector paths do it, *d its sech^2 (1 without a cap) */
    T (*xform1)(xfp xf, T x, double *d);
#if FCE_XHALF
    /* the stored logits' conversions as the paths make them, n values (for tests) */
    void (*widen)(const XT *h, T *x, int64_t n);
    void (*round)(const T *x, XT *h, int64_t n);
#endif
};
typedef struct NAME(fce_paths) paths;

struct NAME(fce_ctx) {
    const fce_job *job;
    int op, reduction, qmode, has_y, want_out;
    int stream;          /* write the output with non-temporal stores */
    fce_tuning tune;     /* per CPU, chosen at run time (fastce_dispatch.c) */
    int64_t C;
    int64_t off, Ct;     /* a vocabulary shard: classes [off, off + C) of Ct (0, C unsharded) */
    const XT *x;         /* the logits, as stored */
    const T *w;          /* the class weights of x's classes: w[c] for c in [0, C); for a
                            shard, w[y - off] is any target y's (the job's weight has Ct) */
    const T *p;
    XT *g;               /* the gradient or log-softmax, as the logits are stored */
    T pa, pb;            /* q from probabilities: (pa p + pb) (* w) */
    double a0, b;        /* a = a0 * w_y; b as in the header comment */
    double z;            /* z_loss: zw = z * w_y (z for probability targets) */
    double gscale;       /* upstream gradient for sum/mean, / total for mean */
    xfp xf;              /* the logit transform (on: 0 or 1, read at run time) */
    double gfac;         /* its constant factor of the gradient, s (1 without) */
    int wexp;            /* the weights are the job's times 2^wexp (scale_weights; 0) */
    /* the work plan */
    int64_t per_item, seg, nseg, tiles;
    double *partials;    /* one loss sum per work item */
    fce_state *states;   /* long rows: one state per segment */
    sample *smps;        /* long rows: one finished sample per row */
    double *mass;        /* long rows: softmax mass written per segment, target left out */
    T *scratch;          /* rows with a gradient: per thread, room for one row's exps */
    int64_t scratch_len;
};

/* Rows are processed in blocks of BLK elements (4 KiB): pass 1 brings a block
 * into L1, pass 2 reads it from there. Rows longer than SEG are split. */
#define BLK ((int64_t)(4096 / sizeof(T)))
#define SEG ((int64_t)(FCE_SEG_BYTES / sizeof(T)))

/* ------------------------------------------------- per-sample finishing */

/* Everything a sample needs after its state is known. */
struct sample {
    int ignored;
    int64_t y;                 /* the target's class in x (y - off of a shard's target:
                                  outside [0, C) where another shard holds it) */
    double xy, a, k, ls, gs;   /* gs: the upstream gradient scale of this sample */
    double zw, zc;             /* z-loss: its weight z w_y, its c1 term 2 zw lse (0 without) */
    double dy;                 /* the target's sech^2 factor (softcap; 1 without) */
};

/* 1 if any of the n logits at x[0], x[stride], ... is NaN */
static inline int any_nan(const XT *x, int64_t stride, int64_t n)
{
    for (int64_t c = 0; c < n; c++) {
        T v = xt_get(x[c * stride]);
        if (v != v) return 1;
    }
    return 0;
}

/* The upstream gradient of sample s, times the transform's constant factor. */
static inline double sample_gs(const ctx *cx, int64_t s)
{
    if (cx->reduction != FCE_REDUCE_NONE) return cx->gscale * cx->gfac;
    return (cx->job->grad_output ? (double)((const T *)cx->job->grad_output)[s] : 1.0) *
           cx->gfac;
}

/* Target and weight of sample s; returns 0 if ignored (its loss is written 0). */
static inline int sample_target(const ctx *cx, int64_t s, sample *smp)
{
    smp->ignored = 0;
    smp->y = 0;
    smp->xy = smp->k = smp->ls = 0.0;
    smp->gs = 1.0;
    smp->a = cx->a0;
    smp->zw = cx->z;
    smp->zc = 0.0;
    smp->dy = 1.0;
    if (!cx->has_y) return 1;
    int64_t y = cx->job->target[s];
    if (y == cx->job->ignore_index) {
        smp->ignored = 1;
        if (cx->job->loss_out) ((T *)cx->job->loss_out)[s] = 0;
        return 0;
    }
    y -= cx->off;
    smp->y = y;
    if (cx->w) {
        smp->a = cx->a0 * (double)cx->w[y];
        smp->zw = cx->z * (double)cx->w[y];
    }
    return 1;
}

/* 1 if x holds sample smp's target class (not so where another shard holds it) */
static inline int target_here(const ctx *cx, const sample *smp)
{
    return smp->y >= 0 && smp->y < cx->C;
}

/* The log-sum-exp k + ls of a sample with state st, as torch's logsumexp: a +inf
 * logit gives +inf (not the NaN of inf - inf), unless a NaN is there. x, stride: the
 * sample's logits (read only in the +inf case), or NULL for a state combined from
 * shards (a NaN is then in st->m, see the planner). */
static inline double state_lse(const ctx *cx, const fce_state *st, double ls, const XT *x,
                               int64_t stride)
{
    if (st->m == INFINITY) return x && any_nan(x, stride, cx->C) ? NAN : INFINITY;
    return fce_shift(st->m) + ls;
}

/* Finish sample number s with state st and ls = log(st->s): writes its
 * log-sum-exp (FCE_OP_LOGSUMEXP) or its loss (loss_out), fills in smp for the
 * write pass and returns the loss. x, stride: the sample's logits (read only in
 * the rare +inf case). */
static inline double finish_sample(const ctx *cx, int64_t s, const fce_state *st, double ls,
                                   sample *smp, const XT *x, int64_t stride)
{
    const fce_job *job = cx->job;
    smp->k = fce_shift(st->m);
    smp->ls = ls;
    if (job->lse_out) ((T *)job->lse_out)[s] = (T)state_lse(cx, st, ls, x, stride);
    if (cx->op != FCE_OP_LOSS) return 0.0;
    double loss = 0.0;
    if (cx->has_y) loss = LOSS_TARGET(smp->a, smp->k, smp->xy, smp->ls);
    if (cx->qmode != Q_NONE) loss += LOSS_COEFS(cx->b, st->d, st->q, smp->ls);
    if (cx->z != 0.0) {
        double lse = smp->k + smp->ls;
        loss += LOSS_Z(smp->zw, lse);
        smp->zc = ZLOSS_ZC(smp->zw, lse);
    }
    if (cx->want_out) smp->gs = sample_gs(cx, s);
    if (job->loss_out) ((T *)job->loss_out)[s] = (T)loss;
    return loss;
}

/* The gradient of the target class, in double:
 *   gs (a (p_y - 1) + b (q p_y - q_y)),
 * p_y = exp((x_y - k) - ls) as the caller computed it (in double, or from the
 * exps it wrote). p_y - 1 cancels when p_y ~ 1: there it is -(the softmax mass
 * of the other classes), summed while the other gradients were written; for
 * p_y <= 1/2 the subtraction is exact to p_y's rounding (|p_y - 1| >= 1/2). */
/* its two terms, as for the loss (a term that does not apply is left out) */
#define TGRAD_TARGET(a, pym1) ((a) * (pym1))
#define TGRAD_COEFS(b, q, pym1, qy) ((b) * ((q) * (pym1) + ((q) - (qy))))
static inline T target_grad(const ctx *cx, const sample *smp, double qsum, double others,
                            double py)
{
    double pym1 = py > 0.5 ? -others : py - 1.0;
    double g = TGRAD_TARGET(smp->a, pym1);
    if (cx->qmode != Q_NONE)
        g += TGRAD_COEFS(cx->b, qsum, pym1, cx->w ? (double)cx->w[smp->y] : 1.0);
    if (cx->z != 0.0) g += smp->zc * py;
    return (T)(smp->gs * g * smp->dy);
}

/* p_y of a finished sample, in double */
static inline double target_prob(const sample *smp) { return exp((smp->xy - smp->k) - smp->ls); }

#endif
