/* cols.h: samples across vector lanes: K-dim (N, C, D) inputs read in place
 * (cols_group: lanes across positions j, classes down the tile), and rows of
 * C <= FCE_SMALL_C classes, brought into that layout G rows at a time
 * (rows_small_c) or, for the commonest call (loss, index targets, no
 * smoothing), one lane per row with no tile (rows_small_c_loss).
 * Included once per (dtype, instruction set) by fastce_kernel.c, after rows.h. */
#ifndef FCE_COLS_H
#define FCE_COLS_H

#include "rows.h"

/* Up to G positions j = 0..J-1 of one outer index: element (c, j) at x[c*cs + j],
 * samples s0..s0+J-1. Probabilities at p[c*pcs + j], output at out[c*ocs + j].
 * Two passes over the C x G tile (max, then exp-sum), then the write pass. */
#define G (4 * L) /* positions per group: four vectors */

static double cols_group(const ctx *cx, const T *x, int64_t cs, const T *p, int64_t pcs,
                         T *out, int64_t ocs, int64_t J, int64_t s0)
{
    const int64_t C = cx->C;
    const int qmode = cx->qmode;
    /* vectors in use: 4 but for a short last group (tiny inputs) */
    const int nv = J >= G ? 4 : (int)((J + L - 1) / L);
    V m[4];
    for (int v = 0; v < 4; v++) m[v] = splat(-INFINITY);
    for (int64_t c = 0; c < C; c++)
        for (int v = 0; v < nv; v++)
            m[v] = vmax(loadn(x + c * cs + v * L, J - v * L, -INFINITY), m[v]);
    V k[4];
    for (int v = 0; v < 4; v++) k[v] = vselect(m[v] == -INFINITY, splat(0), m[v]);

    /* sums over classes in T, folded into double every CH classes (d in double) */
    enum { CH = 16 };
    double S[G], D[G], Q[G];
    for (int64_t j = 0; j < G; j++) S[j] = D[j] = Q[j] = 0.0;
    for (int64_t c0 = 0; c0 < C; c0 += CH) {
        int64_t c1 = c0 + CH < C ? c0 + CH : C;
        V s[4], q[4];
        VD d[4];
        for (int v = 0; v < 4; v++) s[v] = q[v] = splat(0), d[v] = widen(s[v]);
        for (int64_t c = c0; c < c1; c++) {
            V qc = splat(0);
            if (qmode == Q_ONE) qc = splat(1);
            else if (qmode == Q_W) qc = splat(cx->w[c]);
            for (int v = 0; v < nv; v++) {
                V xv = loadn(x + c * cs + v * L, J - v * L, -INFINITY);
                s[v] += vexp(xv - k[v]);
                if (qmode != Q_NONE) {
                    V qv = qc;
                    if (qmode == Q_P || qmode == Q_PW) {
                        qv = loadn(p + c * pcs + v * L, J - v * L, 0) * cx->pa + cx->pb;
                        if (qmode == Q_PW) qv *= cx->w[c];
                    }
                    d[v] += widen(qv * (k[v] - xv));
                    q[v] += qv;
                }
            }
        }
        for (int v = 0; v < nv; v++)
            for (int64_t i = 0; i < L; i++) {
                S[v * L + i] += (double)s[v][i];
                D[v * L + i] += d[v][i];
                Q[v * L + i] += (double)q[v][i];
            }
    }

    /* finish each position (the logs four vectors at a time) */
    double total = 0.0, LS[G];
    memcpy(LS, S, sizeof LS);
    for (int v = 0; v < nv; v++) log_lanes(LS + v * L);
    sample smp[G];
    T Kt[G], LSt[G], C1[G], C2[G];
    TI keep[G];
    if (cx->op == FCE_OP_LOSS) {
        /* the loss of L positions at a time, in double lanes; targets gathered per lane */
        const fce_job *job = cx->job;
        for (int v = 0; v < 4; v++) {
            double a[L], xy[L], gs[L];
            int64_t valid[L];
            for (int64_t i = 0; i < L; i++) {
                int64_t j = v * L + i;
                a[i] = xy[i] = gs[i] = 0.0;
                valid[i] = 0;
                if (j < G) keep[j] = 0, Kt[j] = LSt[j] = C1[j] = C2[j] = 0;
                if (j >= J || !sample_target(cx, s0 + j, &smp[j])) continue;
                valid[i] = -1;
                a[i] = smp[j].a;
                if (cx->has_y) xy[i] = smp[j].xy = (double)x[smp[j].y * cs + j];
                if (cx->want_out) gs[i] = sample_gs(cx, s0 + j);
            }
            if (v >= nv) continue;
            VD va, vxy, vls, vd, vq, vgs;
            VL ok;
            memcpy(&va, a, sizeof va);
            memcpy(&vxy, xy, sizeof vxy);
            memcpy(&vls, LS + v * L, sizeof vls);
            memcpy(&ok, valid, sizeof ok);
            VD vk = widen(k[v]);
            VD loss = (VD){0};
            if (cx->has_y) loss = LOSS_TARGET(va, vk, vxy, vls);
            if (qmode != Q_NONE) {
                memcpy(&vd, D + v * L, sizeof vd);
                memcpy(&vq, Q + v * L, sizeof vq);
                loss += LOSS_COEFS(cx->b, vd, vq, vls);
            }
            loss = (VD)((VL)loss & ok);
            for (int64_t i = 0; i < L && v * L + i < J; i++) {
                int64_t j = v * L + i;
                total += loss[i];
                if (!valid[i]) continue;
                if (job->loss_out) ((T *)job->loss_out)[s0 + j] = (T)loss[i];
                if (!cx->want_out) continue;
                keep[j] = -1;
                smp[j].k = vk[i];
                smp[j].ls = LS[j];
                smp[j].gs = gs[i];
                Kt[j] = (T)vk[i];
                LSt[j] = (T)LS[j];
            }
            if (cx->want_out) {
                memcpy(&vgs, gs, sizeof vgs);
                if (qmode == Q_NONE) memcpy(&vq, Q + v * L, sizeof vq);
                VD c1 = GRAD_C1(vgs, va, cx->b, vq), c2 = GRAD_C2(vgs, cx->b);
                for (int64_t i = 0; i < L && v * L + i < J; i++)
                    if (valid[i]) C1[v * L + i] = (T)c1[i], C2[v * L + i] = (T)c2[i];
            }
        }
    }
    for (int64_t j = 0; j < J && cx->op != FCE_OP_LOSS; j++) {
        fce_state st = {(double)m[j / L][j % L], S[j], D[j], Q[j]};
        keep[j] = 0;
        Kt[j] = LSt[j] = C1[j] = C2[j] = 0;
        if (!sample_target(cx, s0 + j, &smp[j])) continue;
        if (cx->has_y) smp[j].xy = (double)x[smp[j].y * cs + j];
        total += finish_sample(cx, s0 + j, &st, LS[j], &smp[j], x + j, cs);
        keep[j] = -1;
        Kt[j] = (T)smp[j].k;
        LSt[j] = (T)smp[j].ls;
        if (cx->want_out && cx->op == FCE_OP_LOSS) {
            C1[j] = (T)GRAD_C1(smp[j].gs, smp[j].a, cx->b, Q[j]);
            C2[j] = (T)GRAD_C2(smp[j].gs, cx->b);
        }
    }
    if (!cx->want_out) return total;

    /* write pass: gradient or log-softmax, zero for ignored positions */
    const int log_softmax = cx->op == FCE_OP_LOG_SOFTMAX;
    TI ys[G]; /* each position's target class (-1: none), to leave out of its mass */
    for (int64_t j = J; j < G; j++) keep[j] = 0, Kt[j] = LSt[j] = C1[j] = C2[j] = 0;
    for (int64_t j = 0; j < G; j++) ys[j] = (j < J && keep[j] && cx->has_y) ? (TI)smp[j].y : -1;
    V mass[4];
    for (int v = 0; v < 4; v++) mass[v] = splat(0);
    for (int64_t c = 0; c < C; c++) {
        V qc = splat(0);
        if (qmode == Q_ONE) qc = splat(1);
        else if (qmode == Q_W) qc = splat(cx->w[c]);
        for (int v = 0; v < 4; v++) {
            int64_t n = J - v * L;
            if (n <= 0) break;
            V z = (loadn(x + c * cs + v * L, n, 0) - loadu(Kt + v * L)) - loadu(LSt + v * L);
            V o;
            if (log_softmax) {
                o = z;
            } else {
                V e = vexp(z);
                VI yv;
                memcpy(&yv, ys + v * L, sizeof yv);
                mass[v] += (V)((VI)e & ~(yv == (TI)c));
                o = loadu(C1 + v * L) * e;
                if (qmode != Q_NONE) {
                    V qv = qc;
                    if (qmode == Q_P || qmode == Q_PW) {
                        qv = loadn(p + c * pcs + v * L, n, 0) * cx->pa + cx->pb;
                        if (qmode == Q_PW) qv *= cx->w[c];
                    }
                    o -= loadu(C2 + v * L) * qv;
                }
            }
            VI kv;
            memcpy(&kv, keep + v * L, sizeof kv);
            storen(out + c * ocs + v * L, (V)((VI)o & kv), n);
        }
    }
    if (cx->has_y && !log_softmax)
        for (int64_t j = 0; j < J; j++)
            if (keep[j])
                out[smp[j].y * ocs + j] = target_grad(cx, &smp[j], Q[j], (double)mass[j / L][j % L]);
    return total;
}

/* The commonest small-C call, loss only with class-index targets and no
 * smoothing: one vector lane per row, L rows at a time, no per-row state.
 * Needs |outer_stride| * L to fit in int32 (the gather offsets). */
static double rows_small_c_loss(const ctx *cx, int64_t r0, int64_t r1)
{
    const fce_job *job = cx->job;
    const int64_t C = cx->C, rs = job->outer_stride;
    V xc[FCE_SMALL_C];
    int32_t idx[L];
    double total = 0.0, group = 0.0;
    for (int64_t r = r0; r < r1; r += L) {
        int64_t J = r1 - r < L ? r1 - r : L;
        /* lanes past the last row repeat it; they are masked out below */
        for (int64_t i = 0; i < L; i++) idx[i] = (int32_t)((i < J ? i : J - 1) * rs);
        const T *xr = cx->x + r * rs;
        V m = splat(-INFINITY);
        for (int64_t c = 0; c < C; c++) {
            xc[c] = gather(xr + c, idx);
            m = vmax(xc[c], m);
        }
        V k = vselect(m == -INFINITY, splat(0), m);
        /* the sums folded into double every 16 classes, as cols_group does */
        VD sd = widen(splat(0));
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            V s = splat(0);
            for (int64_t c = c0; c < C && c < c0 + 16; c++) s += vexp(xc[c] - k);
            sd += widen(s);
        }
        double a[L], xy[L], ls[L];
        int64_t valid[L];
        for (int64_t i = 0; i < L; i++) {
            int64_t y = i < J ? job->target[r + i] : job->ignore_index;
            valid[i] = y != job->ignore_index ? -1 : 0;
            a[i] = valid[i] ? cx->a0 * (cx->w ? (double)cx->w[y] : 1.0) : 0.0;
            xy[i] = valid[i] ? (double)xr[i * rs + y] : 0.0;
        }
        VD va, vxy, vls;
        VL ok;
        memcpy(ls, &sd, sizeof ls);
        log_lanes(ls);
        memcpy(&vls, ls, sizeof vls);
        memcpy(&va, a, sizeof va);
        memcpy(&vxy, xy, sizeof vxy);
        memcpy(&ok, valid, sizeof ok);
        VD loss = (VD)((VL)LOSS_TARGET(va, widen(k), vxy, vls) & ok);
        for (int64_t i = 0; i < J; i++) {
            group += loss[i];
            if (job->loss_out) ((T *)job->loss_out)[r + i] = (T)loss[i];
        }
        /* summed by groups of G rows, exactly as rows_small_c does */
        if ((r - r0 + L) % G == 0 || r + L >= r1) total += group, group = 0.0;
    }
    return total;
}

/* Rows r0..r1-1 of a rows-layout job with small C: transpose G rows at a time
 * into a column tile and run the columns kernel on it. */
static double rows_small_c(const ctx *cx, int64_t r0, int64_t r1)
{
    const fce_job *job = cx->job;
    const int64_t C = cx->C;
    T xt[FCE_SMALL_C * G], pt[FCE_SMALL_C * G], gt[FCE_SMALL_C * G];
    int32_t xi[G], pi[G];
    double total = 0.0;
    const int64_t xs = job->outer_stride, ps = job->prob_outer_stride;
    /* gathers (whole-vector stores into the tile, which cols_group's vector loads
     * can forward) when the row offsets fit in int32; else element by element */
    const int by_gather = (xs < 0 ? -xs : xs) <= INT32_MAX / G &&
                          (!cx->p || (ps < 0 ? -ps : ps) <= INT32_MAX / G);
    for (int64_t r = r0; r < r1; r += G) {
        int64_t J = r1 - r < G ? r1 - r : G;
        if (by_gather) {
            /* lanes past the last row repeat it; cols_group ignores them */
            for (int64_t j = 0; j < G; j++) {
                xi[j] = (int32_t)((j < J ? j : J - 1) * xs);
                pi[j] = (int32_t)((j < J ? j : J - 1) * ps);
            }
            for (int64_t c = 0; c < C; c++)
                for (int64_t v = 0; v < G; v += L) {
                    storeu(xt + c * G + v, gather(cx->x + r * xs + c, xi + v));
                    if (cx->p) storeu(pt + c * G + v, gather(cx->p + r * ps + c, pi + v));
                }
        } else {
            for (int64_t j = 0; j < J; j++) {
                const T *xr = cx->x + (r + j) * xs;
                for (int64_t c = 0; c < C; c++) xt[c * G + j] = xr[c];
                if (cx->p) {
                    const T *pr = cx->p + (r + j) * ps;
                    for (int64_t c = 0; c < C; c++) pt[c * G + j] = pr[c];
                }
            }
        }
        total += cols_group(cx, xt, G, pt, G, gt, G, J, r);
        if (cx->want_out)
            for (int64_t j = 0; j < J; j++) {
                T *gr = cx->g + (r + j) * job->grad_outer_stride;
                for (int64_t c = 0; c < C; c++) gr[c] = gt[c * G + j];
            }
    }
    return total;
}



/* rows [it*per_item, ...) with small C */
static void item_rows_small_c_loss(const ctx *cx, int64_t it, int tid)
{
    (void)tid;
    int64_t r0, r1;
    item_range(cx, it, &r0, &r1);
    cx->partials[it] = rows_small_c_loss(cx, r0, r1);
}

static void item_rows_small_c(const ctx *cx, int64_t it, int tid)
{
    (void)tid;
    int64_t r0, r1;
    item_range(cx, it, &r0, &r1);
    cx->partials[it] = rows_small_c(cx, r0, r1);
}

/* columns layout: positions [j0, j1) of outer index n */
static void item_cols(const ctx *cx, int64_t it, int tid)
{
    (void)tid;
    const fce_job *job = cx->job;
    int64_t D = job->n_inner;
    int64_t n = it / cx->tiles, j0 = (it % cx->tiles) * cx->per_item;
    int64_t j1 = j0 + cx->per_item < D ? j0 + cx->per_item : D;
    double acc = 0.0;
    for (int64_t j = j0; j < j1; j += G) {
        int64_t J = j1 - j < G ? j1 - j : G;
        const T *xg = cx->x + n * job->outer_stride + j;
        const T *pg = cx->p ? cx->p + n * job->prob_outer_stride + j : NULL;
        T *og = cx->g ? cx->g + n * job->grad_outer_stride + j : NULL;
        acc += cols_group(cx, xg, job->class_stride, pg, job->prob_class_stride, og,
                          job->grad_class_stride, J, n * D + j);
    }
    cx->partials[it] = acc;
}

#endif
