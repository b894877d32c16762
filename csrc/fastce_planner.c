/* fastce_planner.c: the ISA-neutral half of a job, compiled once per dtype.
 *
 * Checks the job, pre-scans the targets (the mean's denominator must be known
 * before any gradient is written), cuts the work into items by the shape alone,
 * allocates scratch, runs the items on OpenMP threads through the paths of the
 * variant in use (fastce_dispatch.c), merges long rows' segment states in a
 * fixed order and adds the per-item partial losses in item order, so results
 * are bit-identical for any thread count. No vector code here. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "fce_ctx.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if FCE_DTYPE == 32
#define MAX_EXP_T FLT_MAX_EXP
#else
#define MAX_EXP_T DBL_MAX_EXP
#endif

/* Check the targets of samples [s0, s1): the first bad one is reported
 * (position, value) and 0 returned; *wsum gets the weight of the kept ones. */
static int check_targets(const ctx *cx, int64_t s0, int64_t s1, double *wsum,
                         int64_t *bad_pos, int64_t *bad_val)
{
    const fce_job *job = cx->job;
    double acc = 0.0;
    if (!cx->has_y) {
        *wsum = (double)(s1 - s0);
        return 1;
    }
    if (!cx->w) {
        /* no weights: a count (exact), in a loop without branches or a chain of
         * float adds; the loop below finds the first bad target if there is one */
        const int64_t ii = job->ignore_index;
        const uint64_t Ct = (uint64_t)cx->Ct;
        int64_t kept = 0;
        int bad = 0;
        for (int64_t s = s0; s < s1; s++) {
            const int64_t y = job->target[s];
            const int keep = y != ii;
            kept += keep;
            bad |= keep & ((uint64_t)y >= Ct);
        }
        if (!bad) {
            *wsum = (double)kept;
            return 1;
        }
    }
    for (int64_t s = s0; s < s1; s++) {
        int64_t y = job->target[s];
        if (y == job->ignore_index) continue;
        if (y < 0 || y >= cx->Ct) {
            *bad_pos = s;
            *bad_val = y;
            return 0;
        }
        acc += cx->w ? (double)cx->w[y - cx->off] : 1.0;
    }
    *wsum = acc;
    return 1;
}


/* Run fn on items first..last-1 (tid: the thread's number, for its scratch);
 * results go to per-item slots, so the order of completion (and the thread
 * count) never changes a result. `fixed`: a static schedule, so two calls over
 * the same items give each thread the same items (its L2 still holds them). */
static void for_items(int nt, int64_t first, int64_t last, int fixed, item_fn fn,
                      const ctx *cx)
{
#ifdef _OPENMP
    if (nt > 1 && fixed) {
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t it = first; it < last; it++) fn(cx, it, omp_get_thread_num());
        return;
    }
    if (nt > 1) {
        /* dynamic, for balance, but in runs of consecutive items (about 8 per
         * thread): each thread streams through contiguous memory, where its
         * prefetches (of the bytes after each block) are its own next input */
        int64_t run = (last - first) / (8 * (int64_t)nt);
        if (run < 1) run = 1;
#pragma omp parallel num_threads(nt)
        {
            int tid = omp_get_thread_num();
#pragma omp for schedule(dynamic, run)
            for (int64_t it = first; it < last; it++) fn(cx, it, tid);
        }
        return;
    }
#else
    (void)nt;
    (void)fixed;
#endif
    for (int64_t it = first; it < last; it++) fn(cx, it, 0);
}

/* rows layout, C > SEG: merge row r's segment states in order, finish the row
 * (its loss goes to the partial of its first segment) */
static void finish_long_row(ctx *cx, const paths *pt, int64_t r)
{
    const fce_job *job = cx->job;
    sample *smp = &cx->smps[r];
    fce_state *st = &cx->states[r * cx->nseg];
    for (int64_t i = 1; i < cx->nseg; i++) fce_state_merge(st, &st[i]);
    cx->partials[r * cx->nseg] = 0.0;
    if (!sample_target(cx, r, smp)) {
        if (job->lse_out)  /* an ignored sample's log-sum-exp is still asked for */
            ((T *)job->lse_out)[r] =
                (T)state_lse(cx, st, log(st->s), cx->x + r * job->outer_stride, 1);
        return;
    }
    if (cx->has_y) {
        T xy = xt_get(cx->x[r * job->outer_stride + smp->y]);
        smp->xy = cx->xf.on ? (double)pt->xform1(cx->xf, xy, &smp->dy) : (double)xy;
    }
    cx->partials[r * cx->nseg] =
        finish_sample(cx, r, st, log(st->s), smp, cx->x + r * job->outer_stride, 1);
}

/* A shard's job, FCE_OP_STATE: merge row r's segment states and write the row's
 * state over the shard (fastce.h) */
static void write_shard_state(ctx *cx, const paths *pt, int64_t r)
{
    const fce_job *job = cx->job;
    fce_state *st = &cx->states[r * cx->nseg];
    for (int64_t i = 1; i < cx->nseg; i++) fce_state_merge(st, &st[i]);
    const XT *x = cx->x + r * job->outer_stride;
    double *out = job->state_out + r * FCE_STATE_LEN;
    const int64_t y = job->target[r];
    const int here = y != job->ignore_index && y - cx->off >= 0 && y - cx->off < cx->C;
    double dy;
    out[FCE_ST_M] = st->m;
    out[FCE_ST_S] = st->s;
    out[FCE_ST_D] = st->d;
    out[FCE_ST_Q] = st->q;
    out[FCE_ST_N] = here ? 0.0 : st->s;
    out[FCE_ST_T] = !here ? 0.0
                    : cx->xf.on ? (double)pt->xform1(cx->xf, xt_get(x[y - cx->off]), &dy)
                                : (double)xt_get(x[y - cx->off]);
    out[FCE_ST_H] = here;
    /* s is NaN with a NaN logit, or with a +inf one (inf - inf): which, only the
     * logits tell */
    out[FCE_ST_NAN] = st->s != st->s && any_nan(x, 1, cx->C);
}

/* A shard's job, FCE_OP_LOSS with state_in: row r's combined state into the
 * context (a NaN logit in any shard made the max NaN: every output is then NaN, as
 * the unsharded job's) and the row finished from it, the target's sech^2 taken here
 * when this shard holds the target and a gradient is written */
static void finish_row_from_state(ctx *cx, const paths *pt, int64_t r)
{
    const fce_job *job = cx->job;
    const double *in = job->state_in + r * FCE_STATE_LEN;
    sample *smp = &cx->smps[r];
    fce_state *st = &cx->states[r * cx->nseg];
    /* D and Q of the weights as the states were made with them; this job's weights may
     * be scale_weights's, times 2^wexp */
    *st = (fce_state){in[FCE_ST_NAN] > 0 ? NAN : in[FCE_ST_M], in[FCE_ST_S],
                      ldexp(in[FCE_ST_D], cx->wexp), ldexp(in[FCE_ST_Q], cx->wexp)};
    cx->partials[r * cx->nseg] = 0.0;
    if (!sample_target(cx, r, smp)) {
        if (job->lse_out) ((T *)job->lse_out)[r] = (T)state_lse(cx, st, log(st->s), NULL, 0);
        return;
    }
    smp->xy = in[FCE_ST_T];
    if (cx->want_out && cx->xf.on && target_here(cx, smp))
        (void)pt->xform1(cx->xf, xt_get(cx->x[r * job->outer_stride + smp->y]), &smp->dy);
    cx->partials[r * cx->nseg] = finish_sample(cx, r, st, log(st->s), smp, NULL, 0);
}

/* 0 unless every kept sample's combined state has its target from exactly one shard */
static int states_complete(const fce_job *job, int64_t n)
{
    for (int64_t s = 0; s < n; s++)
        if (job->target[s] != job->ignore_index && job->state_in[s * FCE_STATE_LEN + FCE_ST_H] != 1.0)
            return 0;
    return 1;
}

/* A weighted "mean" over target weights summing to a tiny W (below ~1e-38 in
 * float32, ~1e-300 in float64) has factors past the range: gs = grad_output / W (a
 * double) and, with smoothing, c2 = gs eps / C (the dtype's); gradient entries would
 * be inf where every true entry, such a factor times a weight or a softmax, is in
 * range. The mean, its gradient and the loss are invariant when every class weight is
 * multiplied by one power of two 2^e (a, q and W scale by 2^e, gs by 2^-e), so the
 * kernel then reads the weights times 2^e (a copy of C weights, exact unless a weight
 * overflows, which only one whose true gradient entry overflows does), e just large
 * enough for the factors to fit. *wden gets W 2^e, the denominator of the scaled loss
 * sum. Returns 0 if the copy cannot be allocated. */
static int scale_weights(ctx *cx, double *wden, T **copy)
{
    const fce_job *job = cx->job;
    const double go = job->grad_output_scalar, W = job->weight_total;
    if (job->reduction != FCE_REDUCE_MEAN || !cx->has_y || !cx->w || W == 0.0 ||
        !isfinite(W) || go == 0.0 || !isfinite(go))
        return 1;
    /* log2 of each |factor| within 2, without forming it (it may overflow) */
    int e = ilogb(go) - ilogb(W) + 1 - (DBL_MAX_EXP - 8);
    if (cx->qmode == Q_W) {
        int e2 = ilogb(go) + ilogb(cx->b) - ilogb(W) + 2 - (MAX_EXP_T - 8);
        if (e2 > e) e = e2;
    }
    if (e <= 0) return 1;
    T *w = malloc((size_t)cx->Ct * sizeof(T));
    if (!w) return 0;
    const T *w0 = cx->w - cx->off; /* every class's (a shard's job has them all) */
    for (int64_t c = 0; c < cx->Ct; c++) w[c] = (T)ldexp((double)w0[c], e);
    *copy = w;
    cx->w = w + cx->off;
    *wden = ldexp(W, e);
    cx->wexp = e;
    cx->gscale = go / *wden;
    return 1;
}

/* The z-loss's part of a job's loss from the lses it wrote (lse_out): z w_y lse^2 per
 * sample (w_y the class weight as given, 1 without weights or for probability
 * targets; 0 where ignored), into z_out if not NULL; returns their sum in order. */
static double z_part_sum(const fce_job *job, int has_y, double z, T *z_out)
{
    const T *lse = (const T *)job->lse_out, *w = (const T *)job->weight;
    const int64_t n = job->n_outer * job->n_inner;
    double sum = 0.0;
    for (int64_t s = 0; s < n; s++) {
        double term = 0.0;
        if (!has_y)
            term = LOSS_Z(z, (double)lse[s]);
        else if (job->target[s] != job->ignore_index)
            term = LOSS_Z(z * (w ? (double)w[job->target[s]] : 1.0), (double)lse[s]);
        if (z_out) z_out[s] = (T)term;
        sum += term;
    }
    return sum;
}

/* The "mean" of class-index targets whose weights sum to 0 (all ignored, or weights
 * that cancel), as torch makes it: the target part and the smoothing part are each
 * divided by that 0, (1 - eps) N / 0 + eps S / 0 in IEEE arithmetic (inf, -inf or
 * NaN), N and S the two parts' sums, and the z-loss's part Z / 0 likewise (Z from the
 * first job's lses); one sum of all over 0 could differ. Rare: two loss-only "sum"
 * jobs over the inputs, before any gradient is written (the gradient may overwrite
 * the logits). */
static int mean_over_no_weight(const fce_job *job, double *mean)
{
    fce_job sub = *job;
    sub.reduction = FCE_REDUCE_SUM;
    sub.grad = NULL;
    sub.loss_out = NULL;
    sub.lse_out = NULL;
    sub.z_loss = 0.0;
    const double eps = job->label_smoothing, zero = job->weight_total, z = job->z_loss;
    const int64_t n = job->n_outer * job->n_inner;
    T *lse = NULL;
    if (z > 0) {
        /* the z-loss part z sum(w_y lse^2) over 0 too: the lses of the first job */
        lse = malloc((size_t)n * sizeof(T));
        if (!lse) return FCE_ERR_NOMEM;
        sub.lse_out = lse;
    }
    sub.label_smoothing = 0.0;
    int st = NAME(fce_run)(&sub);
    if (st == FCE_OK) {
        *mean = (1.0 - eps) * sub.loss_reduced / zero;
        if (lse) *mean += z_part_sum(&sub, 1, z, NULL) / zero;
        sub.lse_out = NULL;
    }
    if (st == FCE_OK && eps > 0) {
        sub.label_smoothing = 1.0;
        st = NAME(fce_run)(&sub);
        if (st == FCE_OK) *mean += eps * sub.loss_reduced / zero;
    }
    free(lse);
    return st;
}

/* The job's logit transform into the context (ctx.xf, ctx.gfac; fce_ctx.h): on
 * unless logit_scale is 1 (or 0, unset) and there is no softcap. Returns 0 if a
 * parameter is out of range (not finite and > 0, or not representable in T). */
static int set_transform(ctx *cx, const fce_job *job)
{
    const double s = job->logit_scale == 0.0 ? 1.0 : job->logit_scale, cap = job->softcap;
    cx->xf = (xfp){0, 1, 1, 0};
    cx->gfac = 1.0;
    if (!(s > 0.0 && s <= DBL_MAX) || !(cap >= 0.0 && cap <= DBL_MAX)) return 0;
    if (s == 1.0 && cap == 0.0) return 1;
    const double u = cap > 0.0 ? s / cap : 1.0;
    /* each factor a normal T, checked before the conversion (a double past T's range
     * does not convert; a subnormal factor would lose its digits) */
    const double tmin = FCE_DTYPE == 32 ? FLT_MIN : DBL_MIN, tmax = FCE_DTYPE == 32 ? FLT_MAX : DBL_MAX;
    if (!(s >= tmin && s <= tmax && u >= tmin && u <= tmax)) return 0;
    if (cap > 0.0 && !(cap >= tmin && cap <= tmax)) return 0;
    cx->xf = (xfp){1, (T)s, (T)u, (T)cap};
    cx->gfac = s;
    return 1;
}

int NAME(fce_run)(fce_job *job)
{
    const paths *pt = NAME(fce_current_paths)();
    ctx cx;
    memset(&cx, 0, sizeof cx);
    cx.tune = *fce_current_tuning();
    cx.job = job;
    cx.op = job->op;
    cx.reduction = job->reduction;
    cx.C = job->n_classes;
    /* a vocabulary shard: every op but STATE, and every layout but rows, is refused */
    const int sharded = job->n_classes_total != 0 || job->op == FCE_OP_STATE || job->state_in;
    cx.off = sharded ? job->class_offset : 0;
    cx.Ct = sharded && job->n_classes_total ? job->n_classes_total : cx.C;
    cx.x = (const XT *)job->x;
    cx.w = job->weight ? (const T *)job->weight + cx.off : NULL;
    cx.p = (const T *)job->prob;
    cx.g = (XT *)job->grad;
    cx.want_out = job->grad != NULL;
    /* a large output not aliasing the input, in long rows: stream it past the
     * caches. Short rows are not streamed: their first and last cache lines are
     * shared with the rows around them (and the target's element is written
     * apart), and partly streamed lines cost more than the caches save (Zen 4,
     * (16384, 1000): 10.6 ms streamed, 8.1 ms not; (4096, 32000): 74 vs 79). */
    cx.stream = cx.want_out && job->grad != job->x &&
                job->n_classes * (int64_t)sizeof(XT) >= FCE_STREAM_ROW_BYTES &&
                job->n_outer * job->n_classes * job->n_inner * (int64_t)sizeof(XT) >= FCE_STREAM_BYTES;
    cx.has_y = (job->op == FCE_OP_LOSS || job->op == FCE_OP_STATE) && job->target != NULL;
    const int64_t C = cx.C, N = job->n_outer, D = job->n_inner;
    const int64_t n_samples = N * D;
    job->loss_reduced = 0.0;
    job->weight_total = 0.0;
    job->z_reduced = 0.0;
    if (C <= 0) return FCE_ERR_ARG;
    if (!set_transform(&cx, job)) return FCE_ERR_ARG;
    if (sharded &&
        (cx.off < 0 || cx.Ct < C || cx.off > cx.Ct - C || !job->target || job->prob ||
         (job->op == FCE_OP_STATE ? !job->state_out || job->state_in
                                  : job->op != FCE_OP_LOSS || !job->state_in) ||
         (!job->x && (job->op == FCE_OP_STATE || job->grad))))
        return FCE_ERR_ARG;
    if (!sharded && job->state_out) return FCE_ERR_ARG;

    if (job->op == FCE_OP_LOSS || job->op == FCE_OP_STATE) {
        if (!(job->z_loss >= 0.0 && job->z_loss <= DBL_MAX)) return FCE_ERR_ARG;
        cx.z = job->z_loss;
        double eps = job->label_smoothing;
        if (cx.has_y) {
            cx.a0 = 1.0 - eps;
            cx.b = eps / (double)cx.Ct;
            cx.qmode = eps > 0 ? (cx.w ? Q_W : Q_ONE) : Q_NONE;
        } else if (cx.p) {
            cx.a0 = 0.0;
            cx.b = 1.0;
            cx.pa = (T)(1.0 - eps);
            cx.pb = (T)(eps / (double)C);
            cx.qmode = cx.w ? Q_PW : Q_P;
        } else {
            return FCE_ERR_ARG;
        }
    }
    if (n_samples == 0) {
        job->loss_reduced = job->z_reduced = job->reduction == FCE_REDUCE_MEAN ? NAN : 0.0;
        return FCE_OK;
    }
    const int rows = D == 1 && job->class_stride == 1;
    const int cols = !rows && job->inner_stride == 1;
    if (!rows && !cols) return FCE_ERR_ARG;
    if (cols && C > FCE_COLS_MAX_C) return FCE_ERR_ARG;
    if (cx.p && rows && job->prob_class_stride != 1) return FCE_ERR_ARG;
    if (cx.p && cols && job->prob_inner_stride != 1) return FCE_ERR_ARG;
    if (cx.g && rows && job->grad_class_stride != 1) return FCE_ERR_ARG;
    if (cx.g && cols && job->grad_inner_stride != 1) return FCE_ERR_ARG;
    if (sharded && !rows) return FCE_ERR_ARG;
#if FCE_XHALF
    /* half-precision logits: the rows stream only (the binding computes other layouts,
     * small C and shards from a float32 copy) */
    if (!rows || C <= FCE_SMALL_C || sharded || job->op == FCE_OP_STATE) return FCE_ERR_ARG;
#endif
    if (job->state_in && !states_complete(job, n_samples)) return FCE_ERR_ARG;

    /* The mean's denominator must be known before gradients are written. */
    if (cx.has_y || cx.p) {
        int64_t bad_pos = 0, bad_val = 0;
        if (!check_targets(&cx, 0, n_samples, &job->weight_total, &bad_pos, &bad_val)) {
            job->bad_position = bad_pos;
            job->bad_value = bad_val;
            return FCE_ERR_TARGET;
        }
        cx.gscale = job->grad_output_scalar;
        /* a mean over no weight (every target ignored, or weights summing to 0):
         * its gradient is NaN, as torch's division by that 0 makes it; its loss is
         * mean_over_no_weight's */
        if (job->reduction == FCE_REDUCE_MEAN)
            cx.gscale = job->weight_total == 0.0 ? NAN : cx.gscale / job->weight_total;
    }
    /* the mean's denominator as the kernel's weights make it (see scale_weights) */
    double wden = job->weight_total;
    T *wscaled = NULL;
    if (!scale_weights(&cx, &wden, &wscaled)) return FCE_ERR_NOMEM;
    double no_weight_mean = 0.0;
    if (cx.has_y && job->op == FCE_OP_LOSS && job->reduction == FCE_REDUCE_MEAN &&
        job->weight_total == 0.0 &&
        n_samples > 0) {
        int st = mean_over_no_weight(job, &no_weight_mean);
        if (st != FCE_OK || (!cx.want_out && !job->lse_out)) {
            job->loss_reduced = no_weight_mean;
            return st;
        }
    }

    /* Work items: runs of whole rows, row segments, or (outer, position tile). */
    cx.seg = rows && C > SEG ? SEG : C;
    cx.nseg = (C + cx.seg - 1) / cx.seg;
    int64_t n_items;
    item_fn fn;
    const int64_t G = pt->group, rs = job->outer_stride;
    if (sharded) {
        /* as long rows: the state of each segment, then the output from the row's */
        n_items = N * cx.nseg;
        fn = pt->segment_stats;
    } else if (rows && cx.nseg == 1) {
        cx.per_item = FCE_ITEM_ELEMS / C;
        if (C <= FCE_SMALL_C) cx.per_item = (cx.per_item + G - 1) / G * G;
        if (cx.per_item < 1) cx.per_item = 1;
        n_items = (N + cx.per_item - 1) / cx.per_item;
        if (C > FCE_SMALL_C)
            fn = cx.g ? pt->rows_with_output : pt->rows_no_output;
        else if (cx.op == FCE_OP_LOSS && cx.has_y && cx.qmode == Q_NONE && cx.z == 0.0 &&
                 !job->lse_out && !cx.xf.on &&
                 (rs < 0 ? -rs : rs) <= INT32_MAX / pt->lanes) /* gather offsets fit int32 */
            fn = cx.want_out ? pt->rows_small_c_grad : pt->rows_small_c_loss;
        else
            fn = pt->rows_small_c;
    } else if (rows) {
        n_items = N * cx.nseg;
        fn = pt->segment_stats;
    } else {
        cx.per_item = FCE_ITEM_ELEMS / C;
        cx.per_item = cx.per_item < G ? G : cx.per_item / G * G;
        cx.tiles = (D + cx.per_item - 1) / cx.per_item;
        n_items = N * cx.tiles;
        fn = pt->cols;
    }
    int nt = fce_pick_threads(job->n_threads, N * C * D, n_items);
    int status = FCE_OK;

    double stack_partials[64];
    cx.partials = n_items <= 64 ? stack_partials : malloc((size_t)n_items * sizeof(double));
    /* gradient of whole rows: keep pass 2's exps so the write pass needs none */
    if (fn == pt->rows_with_output && cx.op == FCE_OP_LOSS) {
        cx.scratch_len = (C + 15) / 16 * 16; /* 64-byte multiples */
        cx.scratch = malloc((size_t)(nt * cx.scratch_len) * sizeof(T));
        if (!cx.scratch) {
            status = FCE_ERR_NOMEM;
            goto done;
        }
    }
    if (fn == pt->segment_stats) {
        cx.states = malloc((size_t)n_items * sizeof(fce_state));
        cx.smps = malloc((size_t)N * sizeof(sample));
        cx.mass = malloc((size_t)n_items * sizeof(double));
    }
    if (!cx.partials || (fn == pt->segment_stats && (!cx.states || !cx.smps || !cx.mass))) {
        status = FCE_ERR_NOMEM;
        goto done;
    }

    if (job->op == FCE_OP_STATE) {
        for_items(nt, 0, n_items, 0, fn, &cx);
        for (int64_t r = 0; r < N; r++) write_shard_state(&cx, pt, r);
    } else if (job->state_in && !cx.want_out) {
        for (int64_t r = 0; r < N; r++) finish_row_from_state(&cx, pt, r);
    } else if (fn != pt->segment_stats) {
        for_items(nt, 0, n_items, 0, fn, &cx);
    } else if (!cx.want_out) {
        for_items(nt, 0, n_items, 0, fn, &cx);
        for (int64_t r = 0; r < N; r++) finish_long_row(&cx, pt, r);
    } else {
        /* With an output, a few rows at a time (about one segment per thread):
         * the write pass finds its segment still in the L2 of the thread that
         * read it (same static schedule), instead of reading it from memory again. */
        int64_t group = nt > cx.nseg ? nt / cx.nseg : 1;
        for (int64_t r0 = 0; r0 < N; r0 += group) {
            int64_t r1 = r0 + group < N ? r0 + group : N;
            if (job->state_in) {
                for (int64_t r = r0; r < r1; r++) finish_row_from_state(&cx, pt, r);
            } else {
                for_items(nt, r0 * cx.nseg, r1 * cx.nseg, 1, pt->segment_stats, &cx);
                for (int64_t r = r0; r < r1; r++) finish_long_row(&cx, pt, r);
            }
            for_items(nt, r0 * cx.nseg, r1 * cx.nseg, 1, pt->segment_write, &cx);
            /* after every segment is written (out may alias x) */
            for (int64_t r = r0; r < r1 && cx.has_y && cx.op == FCE_OP_LOSS; r++) {
                if (cx.smps[r].ignored || !target_here(&cx, &cx.smps[r])) continue;
                /* the other classes' softmax mass: this shard's written, the shards'
                 * without the target from their sum of exps N (with the row's S) */
                double others = 0.0;
                for (int64_t i = 0; i < cx.nseg; i++) others += cx.mass[r * cx.nseg + i];
                if (job->state_in)
                    others += job->state_in[r * FCE_STATE_LEN + FCE_ST_N] /
                              job->state_in[r * FCE_STATE_LEN + FCE_ST_S];
                cx.g[r * job->grad_outer_stride + cx.smps[r].y] =
                    xt_put(target_grad(&cx, &cx.smps[r], cx.states[r * cx.nseg].q, others,
                                       target_prob(&cx.smps[r])));
            }
        }
    }

    double total = 0.0;
    for (int64_t it = 0; it < n_items && job->op != FCE_OP_STATE;
         it += fn == pt->segment_stats ? cx.nseg : 1)
        total += cx.partials[it];
    job->loss_reduced = job->reduction != FCE_REDUCE_MEAN ? total
                        : job->weight_total == 0.0 ? (cx.has_y ? no_weight_mean : NAN)
                                                   : total / wden;
    if (job->lse_out && cx.op == FCE_OP_LOSS) {
        /* the true weights and denominator (not scale_weights's) */
        double z = z_part_sum(job, cx.has_y, cx.z, (T *)job->z_out);
        job->z_reduced = job->reduction != FCE_REDUCE_MEAN ? z
                         : z / (cx.has_y ? job->weight_total : (double)n_samples);
    }

done:
    if (cx.partials != stack_partials) free(cx.partials);
    free(cx.states);
    free(cx.smps);
    free(cx.mass);
    free(cx.scratch);
    free(wscaled);
    return status;
}

#if !FCE_XHALF
void NAME(fce_exp)(const T *x, T *y, int64_t n) { NAME(fce_current_paths)()->exp(x, y, n); }
#else
void NAME(fce_widen)(const uint16_t *h, float *x, int64_t n) { NAME(fce_current_paths)()->widen(h, x, n); }
void NAME(fce_round)(const float *x, uint16_t *h, int64_t n) { NAME(fce_current_paths)()->round(x, h, n); }
#endif
