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

FCE_INLINE double cols_group(const ctx *cx, const T *x, int64_t cs, const T *p, int64_t pcs,
                             T *out, int64_t ocs, int64_t J, int64_t s0, xfp xf)
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
    if (xf.on)
        for (int v = 0; v < 4; v++) m[v] = xf_vec(xf, m[v], NULL); /* the max of the logits */
    V k[4];
    for (int v = 0; v < 4; v++) k[v] = vselect(m[v] == -INFINITY, splat(0), m[v]);

    /* sums over classes in T, folded into double every CH classes (d in double) */
    enum { CH = 16 };
    double S[G], D[G], Q[G];
    /* small C with a gradient: the exps of this pass are kept for the write pass
     * (softmax = exp(x - k) exp(-ls)), so each element costs one exp */
    const int keep_e = C <= FCE_SMALL_C && cx->want_out && cx->op == FCE_OP_LOSS;
    T E[FCE_SMALL_C * G];
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
                V xv = xf_loadn(xf, x + c * cs + v * L, J - v * L, -INFINITY, NULL);
                V e = vexp(xv - k[v]);
                s[v] += e;
                if (keep_e) storeu(E + c * G + v * L, e);
                if (qmode != Q_NONE) {
                    V qv = qc;
                    VD qd;
                    if (qmode == Q_P || qmode == Q_PW) {
                        qv = loadn(p + c * pcs + v * L, J - v * L, 0) * cx->pa + cx->pb;
                        qd = widen(qv);
                        if (qmode == Q_PW) {
                            qd *= (double)cx->w[c];  /* in double: q w may underflow in T */
                            qv *= cx->w[c];
                        }
                    } else {
                        qd = widen(qv);
                    }
                    /* in double: k - x may overflow T (see dterm in rows.h) */
                    d[v] += qd * (widen(k[v]) - widen(xv));
                    q[v] += qv;
                }
            }
        }
        for (int v = 0; v < nv; v++) {
            VD t;
            memcpy(&t, S + v * L, sizeof t);
            t += widen(s[v]);
            memcpy(S + v * L, &t, sizeof t);
            if (qmode != Q_NONE) {
                memcpy(&t, D + v * L, sizeof t);
                t += d[v];
                memcpy(D + v * L, &t, sizeof t);
                memcpy(&t, Q + v * L, sizeof t);
                t += widen(q[v]);
                memcpy(Q + v * L, &t, sizeof t);
            }
        }
    }

    /* finish each position (the logs four vectors at a time) */
    double total = 0.0, LS[G];
    memcpy(LS, S, sizeof LS);
    for (int v = 0; v < nv; v++) {
        VD lv;
        memcpy(&lv, LS + v * L, sizeof lv);
        log_lanes(&lv);
        memcpy(LS + v * L, &lv, sizeof lv);
    }
    sample smp[G];
    T Kt[G], LSt[G], C1[G], C2[G];
    TI keep[G];
    TI ys[G];        /* each position's target class (-1: none), to leave out of its mass */
    VD A[4], GS[4];  /* the loss: a and the upstream gradient of each position */
    VD ZC[4];        /* the z-loss's c1 term 2 zw lse of each position (z_loss > 0) */
    VD DY[4];        /* the target's sech^2 factor of each position (softcap; else 1) */
    /* loaded once: the stores below could alias cx's fields for the compiler */
    const double zl = cx->z;
    if (cx->op == FCE_OP_LOSS) {
        /* L positions at a time in double lanes (fce_ctx.h's formulas), no per-sample state */
        const fce_job *job = cx->job;
        T *const lse_out = (T *)job->lse_out;
        for (int v = 0; v < 4; v++) {
            const int64_t Jv = J - v * L;
            int64_t yl[L], okl[L];
            for (int64_t i = 0; i < L; i++) {
                int64_t y = -1;
                int valid = i < Jv;
                if (valid && cx->has_y) {
                    y = job->target[s0 + v * L + i];
                    if (y == job->ignore_index) valid = 0, y = -1;
                }
                yl[i] = y;
                okl[i] = valid ? -1 : 0;
            }
            VL ok, yv;
            memcpy(&ok, okl, sizeof ok);
            memcpy(&yv, yl, sizeof yv);
            VI y32 = __builtin_convertvector(yv, VI);
            memcpy(ys + v * L, &y32, sizeof y32);
            SPLATD(A[v], cx->a0);
            SPLATD(DY[v], 1.0);
            if (cx->w && cx->has_y)
                for (int64_t i = 0; i < L; i++) A[v][i] = okl[i] ? cx->a0 * (double)cx->w[yl[i]] : 0.0;
            VD vls, vd, vq, vk = widen(k[v]), loss = widen(splat(0));
            memcpy(&vls, LS + v * L, sizeof vls);
            memcpy(&vq, Q + v * L, sizeof vq);
            if (cx->has_y && Jv > 0) {
                /* the target logits, picked from the tile (two chains of selects) */
                V xe = splat(0), xo = xe;
                int64_t c = 0;
                for (; c + 1 < C; c += 2) {
                    xe = vselect_eq(y32, (TI)c, loadn(x + c * cs + v * L, Jv, 0), xe);
                    xo = vselect_eq(y32, (TI)(c + 1), loadn(x + (c + 1) * cs + v * L, Jv, 0), xo);
                }
                if (c < C) xe = vselect_eq(y32, (TI)c, loadn(x + c * cs + v * L, Jv, 0), xe);
                V dy = splat(1), xy = xf_vec(xf, (V)((VI)xe | (VI)xo), &dy);
                DY[v] = widen(dy);
                loss = LOSS_TARGET(A[v], vk, widen(xy), vls);
            }
            if (qmode != Q_NONE) {
                memcpy(&vd, D + v * L, sizeof vd);
                loss += LOSS_COEFS(cx->b, vd, vq, vls);
            }
            if (lse_out && Jv > 0) {
                /* every position's, ignored ones included; state_lse where a logit is +inf */
                VD lse = vk + vls;
                for (int64_t i = 0; i < L && i < Jv; i++)
                    if (m[v][i] == INFINITY) {
                        fce_state st = {INFINITY, 0.0, 0.0, 0.0};
                        lse[i] = state_lse(cx, &st, 0.0, x + v * L + i, cs);
                    }
                storen(lse_out + s0 + v * L, __builtin_convertvector(lse, V), Jv);
            }
            if (zl != 0.0) {
                VD zw, lse = vk + vls;
                for (int64_t i = 0; i < L; i++)
                    zw[i] = !okl[i] ? 0.0 : cx->w && cx->has_y ? zl * (double)cx->w[yl[i]] : zl;
                loss += LOSS_Z(zw, lse);
                ZC[v] = ZLOSS_ZC(zw, lse);
            }
            loss = (VD)((VL)loss & ok);
            double sum;
            HSUMD(loss, sum); /* a tree per vector, the vectors in order (rows_small_c_loss too) */
            total += sum;
            if (job->loss_out && Jv > 0)
                storen((T *)job->loss_out + s0 + v * L, __builtin_convertvector(loss, V), Jv);
            if (!cx->want_out) continue;
            if (cx->reduction != FCE_REDUCE_NONE)
                SPLATD(GS[v], cx->gscale);
            else if (job->grad_output && Jv > 0)
                GS[v] = widen(loadn((const T *)job->grad_output + s0 + v * L, Jv, 0));
            else
                SPLATD(GS[v], 1.0);
            GS[v] *= cx->gfac; /* the transform's constant factor (1 without) */
            VI keepv = __builtin_convertvector(ok, VI);
            VD c1d = GRAD_C1(GS[v], A[v], cx->b, vq);
            if (zl != 0.0) c1d += GRAD_CZ(GS[v], ZC[v]);
            V c1 = __builtin_convertvector(c1d, V);
            V c2 = __builtin_convertvector(GRAD_C2(GS[v], cx->b), V);
            V ktv = k[v], lst = __builtin_convertvector(vls, V);
            storeu(Kt + v * L, ktv);
            storeu(LSt + v * L, lst);
            storeu(C1 + v * L, (V)((VI)c1 & keepv));
            storeu(C2 + v * L, (V)((VI)c2 & keepv));
            memcpy(keep + v * L, &keepv, sizeof keepv);
        }
    }
    /* log-softmax and logsumexp: sample by sample (finish_sample writes the lse) */
    for (int64_t j = 0; j < J && cx->op != FCE_OP_LOSS; j++) {
        fce_state st = {(double)m[j / L][j % L], S[j], D[j], Q[j]};
        keep[j] = 0;
        Kt[j] = LSt[j] = C1[j] = C2[j] = 0;
        if (!sample_target(cx, s0 + j, &smp[j])) continue;
        if (cx->has_y) smp[j].xy = xf_logit(cx, x[smp[j].y * cs + j], &smp[j].dy);
        total += finish_sample(cx, s0 + j, &st, LS[j], &smp[j], x + j, cs);
        keep[j] = -1;
        Kt[j] = (T)smp[j].k;
        LSt[j] = (T)smp[j].ls;
    }
    if (!cx->want_out) return total;

    /* write pass: gradient or log-softmax, zero for ignored positions */
    const int log_softmax = cx->op == FCE_OP_LOG_SOFTMAX;
    if (cx->op != FCE_OP_LOSS)
        for (int64_t j = 0; j < G; j++) ys[j] = -1;
    for (int64_t j = J; j < G; j++) keep[j] = 0, Kt[j] = LSt[j] = C1[j] = C2[j] = 0;
    V mass[4], py[4]; /* softmax mass written but the target's; the target's p_y */
    V f[4];           /* with kept exps: exp(-ls) */
    for (int v = 0; v < 4; v++) {
        mass[v] = py[v] = splat(0);
        f[v] = keep_e ? vexp(splat(0) - loadu(LSt + v * L)) : splat(0);
    }
    for (int64_t c = 0; c < C; c++) {
        V qc = splat(0);
        if (qmode == Q_ONE) qc = splat(1);
        else if (qmode == Q_W) qc = splat(cx->w[c]);
        for (int v = 0; v < 4; v++) {
            int64_t n = J - v * L;
            if (n <= 0) break;
            V dz = splat(1);
            V z = (xf_loadn(xf, x + c * cs + v * L, n, 0, &dz) - loadu(Kt + v * L)) -
                  loadu(LSt + v * L);
            V o;
            if (log_softmax) {
                o = z;
            } else {
                V e = keep_e ? loadu(E + c * G + v * L) * f[v] : vexp(z);
                VI yv;
                memcpy(&yv, ys + v * L, sizeof yv);
                mass[v] += (V)((VI)e & ~(yv == (TI)c));
                py[v] = vselect_eq(yv, (TI)c, e, py[v]);
                o = loadu(C1 + v * L) * e;
                if (qmode != Q_NONE) {
                    V qv = qc;
                    if (qmode == Q_P || qmode == Q_PW) {
                        qv = loadn(p + c * pcs + v * L, n, 0) * cx->pa + cx->pb;
                        if (qmode == Q_PW) qv *= cx->w[c];
                    }
                    o -= loadu(C2 + v * L) * qv;
                }
                if (xf.on && xf.cap != 0) o *= dz;
            }
            VI kv;
            memcpy(&kv, keep + v * L, sizeof kv);
            storen(out + c * ocs + v * L, (V)((VI)o & kv), n);
        }
    }
    if (cx->has_y && !log_softmax)
        for (int v = 0; v < 4 && v * L < J; v++) {
            /* target_grad (fce_ctx.h) for L positions at a time */
            VD pyd = widen(py[v]), others = widen(mass[v]), q, qy;
            VL big = pyd > 0.5;
            VD pym1 = (VD)(((VL)(widen(splat(0)) - others) & big) | ((VL)(pyd - 1.0) & ~big));
            VD g = TGRAD_TARGET(A[v], pym1);
            if (qmode != Q_NONE) {
                memcpy(&q, Q + v * L, sizeof q);
                SPLATD(qy, 1.0);
                if (cx->w)
                    for (int64_t i = 0; i < L; i++) qy[i] = ys[v * L + i] >= 0 ? (double)cx->w[ys[v * L + i]] : 0.0;
                g += TGRAD_COEFS(cx->b, q, pym1, qy);
            }
            if (zl != 0.0) g += ZC[v] * pyd;
            V gt = __builtin_convertvector(GS[v] * g * DY[v], V);
            for (int64_t i = 0; i < L && v * L + i < J; i++)
                if (keep[v * L + i]) out[ys[v * L + i] * ocs + v * L + i] = gt[i];
        }
    return total;
}

/* cols_group for the job's logit transform (an instantiation each) */
static double cols_group_any(const ctx *cx, const T *x, int64_t cs, const T *p, int64_t pcs,
                             T *out, int64_t ocs, int64_t J, int64_t s0)
{
    return cx->xf.on ? cols_group(cx, x, cs, p, pcs, out, ocs, J, s0, XF_ON(cx))
                     : cols_group(cx, x, cs, p, pcs, out, ocs, J, s0, XF_OFF);
}

/* The C <= FCE_SMALL_C classes of J <= L rows at x, x + rs, ... (rows past J repeat
 * the last) as C class vectors, lane j = row j: by whole-row loads and a transpose
 * per L classes (contiguous reads), or by gathers where the tuning says they are
 * faster (tune.small_c_gather). */
FCE_INLINE void rows_to_classes(const T *x, int64_t rs, int64_t J, int64_t C, int gathers,
                                V *cls)
{
#ifdef NO_FAST_TRANSPOSE
    /* no register transpose here: lane-by-lane loads (gather()) are faster, where the
     * row offsets fit their int32 indices */
    if ((rs < 0 ? -rs : rs) <= INT32_MAX / L) gathers = 1;
#endif
    if (gathers) {
        int32_t idx[L];
        for (int64_t i = 0; i < L; i++) idx[i] = (int32_t)((i < J ? i : J - 1) * rs);
        for (int64_t c = 0; c < C; c++) cls[c] = gather(x + c, idx);
        return;
    }
    for (int64_t c0 = 0; c0 < C; c0 += L) {
        V r[L];
        for (int64_t j = 0; j < L; j++) r[j] = loadn(x + (j < J ? j : J - 1) * rs + c0, C - c0, 0);
        transpose_square(r);
        for (int64_t k = 0; k < L && c0 + k < C; k++) cls[c0 + k] = r[k];
    }
}

/* The inverse: C class vectors (lane j = row j) stored as J rows at out, out + os, ... */
FCE_INLINE void classes_to_rows(const V *cls, int64_t C, T *out, int64_t os, int64_t J)
{
    for (int64_t c0 = 0; c0 < C; c0 += L) {
        V r[L];
        for (int64_t k = 0; k < L; k++) r[k] = c0 + k < C ? cls[c0 + k] : splat(0);
        transpose_square(r);
        for (int64_t j = 0; j < J; j++) storen(out + j * os + c0, r[j], C - c0);
    }
}

/* The commonest small-C calls: class-index targets, no smoothing, z-loss, lse
 * output or logit transform; the loss alone (grad 0) or with its gradient
 * (grad 1, written through the same class vectors, transposed back): one vector
 * lane per row, L rows at a time, no per-row state and no tile in memory. The
 * gradient's formulas are cols_group's (fce_ctx.h) with b = 0 and no q, in the
 * same order, so the results are those of rows_small_c bit for bit.
 * Needs |outer_stride| * L to fit in int32 (the gather offsets, where used). */
FCE_INLINE double rows_small_c_index(const ctx *cx, int64_t r0, int64_t r1, const int grad)
{
    const fce_job *job = cx->job;
    const int64_t C = cx->C, rs = job->outer_stride;
    const int64_t gos = grad ? job->grad_outer_stride : 0;
    /* G rows at a time, as four vectors of L rows: four independent chains per
     * class (the sums of one vector alone would be one long dependency chain) */
    V xc[4][FCE_SMALL_C];
    double total = 0.0;
    for (int64_t r = r0; r < r1; r += G) {
        int64_t J = r1 - r < G ? r1 - r : G;
        const int nv = (int)((J + L - 1) / L);
        V k[4], xy[4];
        VL ok[4];
        VI yc[4];
        VD sd[4], va[4];
        for (int v = 0; v < nv; v++) {
            int64_t Jv = J - v * L < L ? J - v * L : L;
            /* lanes past the last row repeat it; they are masked out below */
            const T *xr = cx->x + (r + v * L) * rs;
            rows_to_classes(xr, rs, Jv, C, cx->tune.small_c_gather, xc[v]);
            V m0 = splat(-INFINITY), m1 = m0;
            int64_t c = 0;
            for (; c + 1 < C; c += 2) m0 = vmax(xc[v][c], m0), m1 = vmax(xc[v][c + 1], m1);
            if (c < C) m0 = vmax(xc[v][c], m0);
            V m = vmax(m0, m1);
            k[v] = vselect(m == -INFINITY, splat(0), m);
            /* the targets as lanes; each lane's target logit picked from the class vectors */
            int64_t ys[L];
            for (int64_t i = 0; i < L; i++)
                ys[i] = i < Jv ? job->target[r + v * L + i] : job->ignore_index;
            VL yl;
            memcpy(&yl, ys, sizeof yl);
            ok[v] = yl != job->ignore_index;
            /* -1 where ignored: no class is selected for the target's gradient */
            VI y = __builtin_convertvector((VL)(yl & ok[v]) | ~ok[v], VI);
            yc[v] = y;
            /* two chains of selects, even and odd classes: one of them is 0 in each lane */
            V xe = splat(0), xo = xe;
            for (c = 0; c + 1 < C; c += 2) {
                xe = vselect_eq(y, (TI)c, xc[v][c], xe);
                xo = vselect_eq(y, (TI)(c + 1), xc[v][c + 1], xo);
            }
            if (c < C) xe = vselect_eq(y, (TI)c, xc[v][c], xe);
            xy[v] = (V)((VI)xe | (VI)xo);
            SPLATD(va[v], cx->a0);
            if (cx->w)
                for (int64_t i = 0; i < L; i++)
                    va[v][i] = ok[v][i] ? cx->a0 * (double)cx->w[ys[i]] : 0.0;
        }
        /* a short last group: the vectors past it repeat its last one, masked out
         * (the loops below then run over four vectors, unrolled) */
        for (int v = nv; v < 4; v++) {
            memcpy(xc[v], xc[nv - 1], (size_t)C * sizeof(V));
            k[v] = k[nv - 1];
            xy[v] = xy[nv - 1];
            va[v] = va[nv - 1];
            yc[v] = yc[nv - 1];
            ok[v] = ok[nv - 1] & 0;
        }
        for (int v = 0; v < 4; v++) sd[v] = widen(splat(0));
        /* the sums folded into double every 16 classes, as cols_group does; with a
         * gradient the exps are kept in place of the logits for the write below */
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            V s[4] = {splat(0), splat(0), splat(0), splat(0)};
            for (int64_t c = c0; c < C && c < c0 + 16; c++)
                for (int v = 0; v < 4; v++) {
                    V e = vexp(xc[v][c] - k[v]);
                    s[v] += e;
                    if (grad) xc[v][c] = e;
                }
            for (int v = 0; v < 4; v++) sd[v] += widen(s[v]);
        }
        double group = 0.0;
        VD vlsd[4], gsd[4];
        for (int v = 0; v < nv; v++) {
            int64_t Jv = J - v * L < L ? J - v * L : L;
            VD vls = sd[v];
            log_lanes(&vls);
            vlsd[v] = vls;
            VD loss = (VD)((VL)LOSS_TARGET(va[v], widen(k[v]), widen(xy[v]), vls) & ok[v]);
            double sum;
            HSUMD(loss, sum); /* a tree per vector, the vectors in order, as cols_group */
            group += sum;
            if (job->loss_out)
                storen((T *)job->loss_out + r + v * L, __builtin_convertvector(loss, V), Jv);
            if (!grad) continue;
            if (cx->reduction != FCE_REDUCE_NONE)
                SPLATD(gsd[v], cx->gscale);
            else if (job->grad_output)
                gsd[v] = widen(loadn((const T *)job->grad_output + r + v * L, Jv, 0));
            else
                SPLATD(gsd[v], 1.0);
            gsd[v] *= cx->gfac;
        }
        total += group;
        if (!grad) continue;
        /* the gradient: c1 softmax_c, then the target's term (target_grad's cancellation
         * rule), selected into its class; zero for ignored rows */
        for (int v = 0; v < nv; v++) {
            int64_t Jv = J - v * L < L ? J - v * L : L;
            VI keepv = __builtin_convertvector(ok[v], VI);
            V c1 = (V)((VI)__builtin_convertvector(GRAD_C1(gsd[v], va[v], 0.0, 0.0), V) & keepv);
            V f = vexp(splat(0) - __builtin_convertvector(vlsd[v], V));
            V mass = splat(0), py = splat(0);
            for (int64_t c = 0; c < C; c++) {
                V e = xc[v][c] * f;
                mass += (V)((VI)e & ~(yc[v] == (TI)c));
                py = vselect_eq(yc[v], (TI)c, e, py);
                xc[v][c] = (V)((VI)(c1 * e) & keepv);
            }
            VD pyd = widen(py), others = widen(mass);
            VL big = pyd > 0.5;
            VD pym1 = (VD)(((VL)(widen(splat(0)) - others) & big) | ((VL)(pyd - 1.0) & ~big));
            V gt = (V)((VI)__builtin_convertvector(gsd[v] * TGRAD_TARGET(va[v], pym1), V) & keepv);
            for (int64_t c = 0; c < C; c++) xc[v][c] = vselect_eq(yc[v], (TI)c, gt, xc[v][c]);
            classes_to_rows(xc[v], C, cx->g + (r + v * L) * gos, gos, Jv);
        }
    }
    return total;
}

static double rows_small_c_loss(const ctx *cx, int64_t r0, int64_t r1)
{
    return rows_small_c_index(cx, r0, r1, 0);
}

static double rows_small_c_grad(const ctx *cx, int64_t r0, int64_t r1)
{
    return rows_small_c_index(cx, r0, r1, 1);
}

/* Rows r0..r1-1 of a rows-layout job with small C: transpose G rows at a time
 * into a column tile and run the columns kernel on it. */
static double rows_small_c(const ctx *cx, int64_t r0, int64_t r1)
{
    const fce_job *job = cx->job;
    const int64_t C = cx->C;
    T xt[FCE_SMALL_C * G], pt[FCE_SMALL_C * G], gt[FCE_SMALL_C * G];
    V cls[FCE_SMALL_C];
    double total = 0.0;
    const int64_t xs = job->outer_stride, ps = job->prob_outer_stride;
    /* whole-vector stores into the tile, which cols_group's vector loads can
     * forward; gathers only where the tuning prefers them and the row offsets
     * fit in int32 */
    const int gathers = cx->tune.small_c_gather && (xs < 0 ? -xs : xs) <= INT32_MAX / G &&
                        (!cx->p || (ps < 0 ? -ps : ps) <= INT32_MAX / G);
    for (int64_t r = r0; r < r1; r += G) {
        int64_t J = r1 - r < G ? r1 - r : G;
        /* lanes past the last row repeat it; cols_group ignores them */
        for (int64_t v = 0; v < G && v < J; v += L) {
            int64_t Jv = J - v < L ? J - v : L;
            rows_to_classes(cx->x + (r + v) * xs, xs, Jv, C, gathers, cls);
            for (int64_t c = 0; c < C; c++) storeu(xt + c * G + v, cls[c]);
            if (cx->p) {
                rows_to_classes(cx->p + (r + v) * ps, ps, Jv, C, gathers, cls);
                for (int64_t c = 0; c < C; c++) storeu(pt + c * G + v, cls[c]);
            }
        }
        total += cols_group_any(cx, xt, G, pt, G, gt, G, J, r);
        if (cx->want_out)
            for (int64_t v = 0; v < J; v += L) {
                for (int64_t c = 0; c < C; c++) cls[c] = loadu(gt + c * G + v);
                classes_to_rows(cls, C, cx->g + (r + v) * job->grad_outer_stride,
                                job->grad_outer_stride, J - v < L ? J - v : L);
            }
    }
    return total;
}



/* rows [it*per_item, ...) with small C */
ITEM_OF_ROWS(item_rows_small_c_loss, rows_small_c_loss)
ITEM_OF_ROWS(item_rows_small_c_grad, rows_small_c_grad)
ITEM_OF_ROWS(item_rows_small_c, rows_small_c)

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
        acc += cols_group_any(cx, xg, job->class_stride, pg, job->prob_class_stride, og,
                              job->grad_class_stride, J, n * D + j);
    }
    cx->partials[it] = acc;
}

#endif
