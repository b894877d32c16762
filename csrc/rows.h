/* rows.h: the rows stream, C > FCE_SMALL_C classes contiguous per sample.
 *
 * Online (one read of the row): split the row into blocks that fit in L1.
 * For each block b: its max m_b (pass 1, from memory), then with the running
 * max M = max(m_0..m_b)
 *   s += sum exp(x - M), d += sum q (M - x), q += sum q  (pass 2, from L1),
 * so each element costs one exp. Pass 1 of the next block (or of the next row's
 * first block) runs inside pass 2's loop, so its memory reads overlap the exps.
 * The sums stay in double vector lanes while M stays; when M grows they are
 * reduced and merged into the state (fce_state_merge), as are the states of row
 * segments (segments.h). rows_no_output: the forward, each row's first block
 * scanned while the row before is summed; row_one with an output: pass 2's exps
 * kept for the gradient, written by write_row_kept.
 * Included once per (dtype, instruction set) by fastce_kernel.c. */
#ifndef FCE_ROWS_H
#define FCE_ROWS_H

#include "vmath.h"
#include "fce_ctx.h"

/* software prefetch distance, bytes ahead of pass 1 (where the tuning asks for it) */
#ifndef PF_BYTES
#define PF_BYTES 2048
#endif

/* ------------------------------------------------------ the logit transform */

/* The logits of vector x transformed (xfp, fce_ctx.h), and with d, their sech^2
 * factor of the gradient (left as it is without a cap). Maxima are taken of the
 * logits as read and transformed once (the transform never decreases: s > 0). */
FCE_INLINE V xf_vec(xfp xf, V x, V *d)
{
    if (!xf.on) return x;
    if (xf.cap == 0) return x * xf.s;
    V sech2;
    V t = vtanh(x * xf.u, &sech2);
    if (d) *d = sech2;
    return t * xf.cap;
}

/* loadn (the first n lanes at p, the rest `fill`) of transformed logits */
FCE_INLINE V xf_loadn(xfp xf, const XT *p, int64_t n, T fill, V *d)
{
    V x = xf_vec(xf, loadnx(p, n, fill), d);
    if (!xf.on || n >= L) return x;
    TI lane[L];
    for (int64_t i = 0; i < L; i++) lane[i] = (TI)i;
    VI li;
    memcpy(&li, lane, sizeof li);
    return vselect(li < (TI)(n < 0 ? 0 : n), x, splat(fill));
}

/* one logit transformed as the vectors are (the planner's through the paths table) */
static T xform1(xfp xf, T x, double *d)
{
    V dv = splat(1), z = xf_vec(xf, splat(x), &dv);
    *d = (double)dv[0];
    return z[0];
}

/* the target logit of a sample as the paths see it, *d its sech^2 factor */
static inline double xf_logit(const ctx *cx, T x, double *d)
{
    return cx->xf.on ? (double)xform1(cx->xf, x, d) : (double)x;
}

/* the transform as a compile-time constant of a path's instantiation */
#define XF_OFF ((xfp){0, 1, 1, 0})
#define XF_ON(cx) ((xfp){1, (cx)->xf.s, (cx)->xf.u, (cx)->xf.cap})

/* the coefficients q for classes [c, c+n) of a row, as a vector from lane 0 */
FCE_INLINE V qload(int qmode, const T *w, const T *p, int64_t n, T pa, T pb)
{
    V q;
    switch (qmode) {
    case Q_ONE: q = splat(1); break;
    case Q_W: q = loadn(w, n, 0); break;
    case Q_P: q = loadn(p, n, 0) * pa + pb; break;
    case Q_PW: q = (loadn(p, n, 0) * pa + pb) * loadn(w, n, 0); break;
    default: q = splat(0); break;
    }
    if (n < L)
        for (int64_t i = n < 0 ? 0 : n; i < L; i++) q[i] = 0;
    return q;
}

/* The term q (k - x) of d for one vector, in double lanes: formed in T it overflows
 * (1e38 - -1e38 > FLT_MAX) or, with probabilities times weights, q underflows to 0 and
 * 0 * inf gives NaN where the true term is inf. q is widened before the product (for
 * probabilities with weights, each factor is); the lanes past n are 0. */
/* (added to *acc: VD may be wider than a register of this ISA, so not returned) */
FCE_INLINE void dterm_add(VD *acc, int qmode, V q, const T *w, const T *p, int64_t n, T pa,
                          T pb, V vk, V x)
{
    VD qd = widen(q);
    if (qmode == Q_PW) {
        V pq = loadn(p, n, 0) * pa + pb;
        if (n < L)
            for (int64_t i = n < 0 ? 0 : n; i < L; i++) pq[i] = 0;
        qd = widen(pq) * widen(loadn(w, n, 0));
    }
    *acc += qd * (widen(vk) - widen(x));
}

/* Pass 1 of a block: the max of n contiguous classes (NaN never wins), read
 * from memory (with pf, a software prefetch PF_BYTES ahead). */
FCE_INLINE T block_max(const XT *x, int64_t n, int pf)
{
    V m0 = splat(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t i = 0;
    for (; i + 4 * L <= n; i += 4 * L) {
        if (pf)
            for (int64_t b = 0; b < 4 * VB; b += 64)
                __builtin_prefetch((const char *)(x + i) + PF_BYTES + b);
        m0 = vmax(loadx(x + i), m0);
        m1 = vmax(loadx(x + i + L), m1);
        m2 = vmax(loadx(x + i + 2 * L), m2);
        m3 = vmax(loadx(x + i + 3 * L), m3);
    }
    for (; i < n; i += L) m0 = vmax(loadnx(x + i, n - i, -INFINITY), m0);
    return hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
}

/* prefetch the lines of two vectors at a */
FCE_INLINE void prefetch_pair(const XT *a, int pf)
{
    if (pf)
        for (int64_t b = 0; b < 2 * L * (int64_t)sizeof(XT); b += 64) __builtin_prefetch((const char *)a + b);
}

/* The work on the two vectors at x + i: exps of x - k (kept in e_out), their
 * sums into s0, s1, the class-coefficient terms into dd, q0, and with find_max
 * the vectors' max into m0, m1 (NaN never wins). */
FCE_INLINE void sum_pair(const XT *x, int64_t i, V vk, int qmode, int find_max, const T *w,
                         const T *p, T pa, T pb, xfp xf, T *e_out, V *s0, V *s1, VD *dd,
                         V *q0, V *m0, V *m1)
{
    V xa = xf_vec(xf, loadx(x + i), NULL), xb = xf_vec(xf, loadx(x + i + L), NULL);
    if (find_max) {
        *m0 = vmax(xa, *m0);
        *m1 = vmax(xb, *m1);
    }
    V ea = vexp(xa - vk), eb = vexp(xb - vk);
    *s0 += ea;
    *s1 += eb;
    if (e_out) {
        storeu(e_out + i, ea);
        storeu(e_out + i + L, eb);
    }
    if (qmode != Q_NONE) {
        V qa = qload(qmode, w + i, p + i, L, pa, pb);
        V qb = qload(qmode, w + i + L, p + i + L, L, pa, pb);
        dterm_add(dd, qmode, qa, w + i, p + i, L, pa, pb, vk, xa);
        dterm_add(dd, qmode, qb, w + i + L, p + i + L, L, pa, pb, vk, xb);
        *q0 += qa + qb;
    }
}

/* The sums of n classes shifted by mb: s, d, q added to the lanes of sums[0..2]
 * (and the exps kept in e_out). Two uses:
 *  - pass 2 of a block whose max is known (find_max 0, mb >= that max): the
 *    block is in L1 after pass 1, so this is arithmetic;
 *  - one pass over a span straight from memory with mb the shift so far
 *    (find_max 1): the span's own max goes to *own for the caller's check.
 * Memory is kept busy meanwhile: with xn, pass 1 of the next range (nn classes
 * at xn) runs over the last nn classes of this loop (so the reads from memory
 * stay in address order) and its max goes to *mn; with pf, pf_at[i] is
 * prefetched as x[i] is summed. */
FCE_INLINE void block_rest(const XT *x, int64_t n, T mb, int qmode, int pf, int find_max,
                           const T *w, const T *p, T pa, T pb, xfp xf, VD *sums, T *e_out,
                           const XT *xn, int64_t nn, T *mn, T *own, const XT *pf_at)
{
    T k = mb == -INFINITY ? 0 : mb;
    V vk = splat(k);
    V n0 = splat(-INFINITY), n1 = n0, m0 = n0, m1 = n0;

    /* float partial sums over at most CHUNK vectors per lane (two sums, s0 and
     * s1, per run of CHUNK pairs), each folded into double on its own: the float
     * error stays that of a 32-term sum for any L. */
    enum { CHUNK = 32 };
    VD sd = sums[0], dd = sums[1], qd = sums[2];
    /* pass 1 of xn from class `from` on (a multiple of 2 L) */
    int64_t from = !xn ? n : n - nn < 0 ? 0 : (n - nn) / (2 * L) * (2 * L);
    const XT *x1 = xn ? xn - from : x; /* x1 + i: class i - from of xn */
    int64_t i = 0, covered = 0;
    while (i + 2 * L <= n) {
        int64_t end = i + CHUNK * 2 * L < n ? i + CHUNK * 2 * L : n;
        V s0 = splat(0), s1 = s0, q0 = s0;
        int64_t without = end < from ? end : from;
        for (; i + 2 * L <= without; i += 2 * L) {
            prefetch_pair(pf_at + i, pf);
            sum_pair(x, i, vk, qmode, find_max, w, p, pa, pb, xf, e_out, &s0, &s1, &dd, &q0,
                     &m0, &m1);
        }
        /* with pass 1 of xn while it lasts */
        int64_t with1 = end < from + nn ? end : from + nn;
        for (; i + 2 * L <= with1; i += 2 * L) {
            prefetch_pair(pf_at + i, pf);
            n0 = vmax(loadx(x1 + i), n0);
            n1 = vmax(loadx(x1 + i + L), n1);
            covered = i + 2 * L - from;
            sum_pair(x, i, vk, qmode, find_max, w, p, pa, pb, xf, e_out, &s0, &s1, &dd, &q0,
                     &m0, &m1);
        }
        for (; i + 2 * L <= end; i += 2 * L) {
            prefetch_pair(pf_at + i, pf);
            sum_pair(x, i, vk, qmode, find_max, w, p, pa, pb, xf, e_out, &s0, &s1, &dd, &q0,
                     &m0, &m1);
        }
        sd += widen(s0) + widen(s1);
        if (qmode != Q_NONE) qd += widen(q0);
    }
    for (; i < n; i += L) {
        V xa = xf_loadn(xf, x + i, n - i, -INFINITY, NULL);
        if (find_max) m0 = vmax(xa, m0);
        V ea = vexp(xa - vk);
        sd += widen(ea);
        if (e_out) storen(e_out + i, ea, n - i);
        if (qmode != Q_NONE) {
            V qa = qload(qmode, w + i, p + i, n - i, pa, pb);
            dterm_add(&dd, qmode, qa, w + i, p + i, n - i, pa, pb, vk,
                      xf_loadn(xf, x + i, n - i, k, NULL));
            qd += widen(qa);
        }
    }
    if (xn) {
        T a = block_max(xn + covered, nn - covered, pf), b = hmax(vmax(n0, n1));
        *mn = a > b ? a : b;
    }
    if (find_max) *own = hmax(vmax(m0, m1));
    sums[0] = sd;
    if (qmode != Q_NONE) {
        sums[1] = dd;
        sums[2] = qd;
    }
}

/* The state of n contiguous classes, the max of the first block given as mb.
 * The first block (in cache: its max was just found) is summed shifted by mb;
 * the rest in spans of SPAN classes, one pass each from memory, shifted by the
 * shift so far: a span whose own max exceeds it by more than SHIFT_SLACK (never
 * for ordinary logits, once per span for rows sorted ascending) is summed again,
 * from cache, with its max as the shift. So every shift is within SHIFT_SLACK
 * of the max of the classes before it: exp(x - shift) <= e^8 cannot overflow,
 * x - shift rounds no worse than x - max (Sterbenz: the two are within a factor
 * of 2 wherever x - shift is not small), and lse = shift + log(sum) is exact
 * for any shift. The state's m is that shift (fce_state_merge and the finish
 * need no more); a +inf logit always becomes the shift. The sums stay in
 * double lanes while the shift stays; they are reduced into the state when it
 * grows (and at the end). With e_out, each block's exp(x - shift) is kept there and its
 * shift in bm[block]. With xn, the max of the nn <= BLK classes at xn (the
 * caller's next range) is found on the way, into *mn. */
#ifndef SPAN
#define SPAN (4 * BLK)
#endif
#define SHIFT_SLACK 8
FCE_INLINE void range_stats(const XT *x, int64_t n, T mb, int qmode, int pf, const T *w,
                            const T *p, T pa, T pb, xfp xf, fce_state *st, T *e_out,
                            double *bm, const XT *xn, int64_t nn, T *mn)
{
    VD sums[3];
    T shift = mb, unused = 0;
    int have = 0;
    sums[0] = sums[1] = sums[2] = widen(splat(0));
    /* the sums so far (shifted by `shift`) into the state */
#define FLUSH()                                        \
    do {                                               \
        fce_state bs = {(double)shift, 0.0, 0.0, 0.0}; \
        HSUMD(sums[0], bs.s);                          \
        HSUMD(sums[1], bs.d);                          \
        HSUMD(sums[2], bs.q);                          \
        if (have)                                      \
            fce_state_merge(st, &bs);                  \
        else                                           \
            *st = bs;                                  \
        have = 1;                                      \
        sums[0] = sums[1] = sums[2] = widen(splat(0)); \
    } while (0)
    T nm = NAN;
    const int64_t ahead = PF_BYTES / (int64_t)sizeof(XT);
    int64_t len = n < BLK ? n : BLK;
    /* the first block, from cache: its time would leave the memory idle, so it
     * prefetches the start of the next (or, for a one-block row, pass 1 reads
     * the caller's next range) */
    if (len == n)
        block_rest(x, len, shift, qmode, xn ? pf : 0, 0, w, p, pa, pb, xf, sums, e_out, xn, nn,
                   &nm, &unused, xn ? xn + ahead : x);
    else
        block_rest(x, len, shift, qmode, 1, 0, w, p, pa, pb, xf, sums, e_out, NULL, 0, &nm,
                   &unused, x + len);
    if (e_out) bm[0] = shift;
    for (int64_t b0 = len; b0 < n; b0 += SPAN) {
        int64_t sl = n - b0 < SPAN ? n - b0 : SPAN;
        const XT *nx = b0 + sl == n ? xn : NULL;
        VD saved[3] = {sums[0], sums[1], sums[2]};
        T own = -INFINITY;
        block_rest(x + b0, sl, shift, qmode, pf, 1, w ? w + b0 : w, p ? p + b0 : p, pa, pb, xf,
                   sums, e_out ? e_out + b0 : e_out, nx, nn, &nm, &own, x + b0 + ahead);
        if (own > shift + SHIFT_SLACK) {
            /* the max grew too much in this span: its sums are dropped and taken again */
            sums[0] = saved[0], sums[1] = saved[1], sums[2] = saved[2];
            FLUSH();
            shift = own;
            block_rest(x + b0, sl, shift, qmode, 0, 0, w ? w + b0 : w, p ? p + b0 : p, pa, pb,
                       xf, sums, e_out ? e_out + b0 : e_out, NULL, 0, &unused, &unused, NULL);
        }
        if (e_out)
            for (int64_t b = b0; b < b0 + sl; b += BLK) bm[b / BLK] = shift;
    }
    FLUSH();
#undef FLUSH
    if (xn) *mn = nm;
}

/* range_stats for the job's qmode and logit transform (each an instantiation of its
 * own; the prefetch tuning is a run-time flag: a predicted branch per pair of vectors,
 * measured free on Zen 3 (bench/kernel_loops), where an instantiation per setting cost
 * a third of the kernel's compile time). mb: the max of the first block of x as read (not
 * transformed), or NAN to have it found here; *mn likewise. */
static void range_stats_any(const ctx *cx, const XT *x, int64_t n, T mb, const T *w,
                            const T *p, fce_state *st, T *e_out, double *bm, const XT *xn,
                            int64_t nn, T *mn)
{
    const int pf = cx->tune.prefetch;
    if (mb != mb) mb = pf ? block_max(x, n < BLK ? n : BLK, 1) : block_max(x, n < BLK ? n : BLK, 0);
    if (cx->xf.on) {
        double unused;
        mb = xform1(cx->xf, mb, &unused);
    }
#define RANGE_STATS_XF(q, pf, xfc) \
    range_stats(x, n, mb, q, pf, w, p, cx->pa, cx->pb, xfc, st, e_out, bm, xn, nn, mn)
#define RANGE_STATS(q)                                                     \
    do {                                                                   \
        if (cx->xf.on)                                                     \
            RANGE_STATS_XF(q, pf, XF_ON(cx));                              \
        else                                                               \
            RANGE_STATS_XF(q, pf, XF_OFF);                                 \
    } while (0)
    switch (cx->qmode) {
    case Q_ONE: RANGE_STATS(Q_ONE); break;
    case Q_W: RANGE_STATS(Q_W); break;
    case Q_P: RANGE_STATS(Q_P); break;
    case Q_PW: RANGE_STATS(Q_PW); break;
    default: RANGE_STATS(Q_NONE); break;
    }
#undef RANGE_STATS
#undef RANGE_STATS_XF
}

/* One vector of output at offset i (r valid lanes); adds its softmax values to
 * *mass. The softmax is exp((x - k) - ls), or e * f from exps kept by pass 2;
 * with a softcap the gradient is times sech^2 of the logits (read again for it). */
FCE_INLINE V write_vec(const XT *x, const T *ek, int64_t i, int64_t r, int qmode,
                       int log_softmax, const T *w, const T *p, T pa, T pb, xfp xf, V vk,
                       V vls, V vf, V vc1, V vc2, V *mass)
{
    if (log_softmax) return (xf_loadn(xf, x + i, r, -INFINITY, NULL) - vk) - vls;
    const int capped = xf.on && xf.cap != 0;
    V d = splat(1), e;
    if (ek) {
        if (capped) (void)xf_loadn(xf, x + i, r, -INFINITY, &d);
        e = loadn(ek + i, r, 0) * vf;
    } else {
        e = vexp((xf_loadn(xf, x + i, r, -INFINITY, &d) - vk) - vls);
    }
    *mass += e;
    V o = vc1 * e;
    if (qmode != Q_NONE) o -= vc2 * qload(qmode, w + i, p + i, r, pa, pb);
    return capped ? o * d : o;
}

/* out[c] = c1 exp((x_c - k) - ls) - c2 q_c  (gradient), or (x_c - k) - ls (log-softmax).
 * Returns sum_c exp((x_c - k) - ls): the softmax mass written (folded into double
 * every 16 vectors). With `stream`, full aligned vectors use non-temporal stores. */
FCE_INLINE double write_run(const XT *x, const T *ek, T f, XT *out, int64_t n, int qmode,
                            int log_softmax, int stream, const T *w, const T *p, T pa, T pb,
                            xfp xf, T k, T ls, T c1, T c2)
{
    V vk = splat(k), vls = splat(ls), vf = splat(f), vc1 = splat(c1), vc2 = splat(c2);
    V mass = splat(0);
    VD total = widen(mass);
    int64_t i = 0;
#define WRITE_VEC(i, r) \
    write_vec(x, ek, i, r, qmode, log_softmax, w, p, pa, pb, xf, vk, vls, vf, vc1, vc2, &mass)
    if (HAVE_STREAM && stream && (uintptr_t)out % sizeof(XT) == 0) {
        int64_t head = (int64_t)(((uintptr_t)out / sizeof(XT)) % L);
        head = head ? L - head : 0;
        if (head > n) head = n;
        if (head) storenx(out, WRITE_VEC(0, head), head);
        total += widen(mass); /* the head's mass, even if no loop below runs */
        mass = splat(0);
        i = head;
        while (i + L <= n) {
            int64_t end = i + 16 * L < n ? i + 16 * L : n;
            for (; i + L <= end; i += L) streamx(out + i, WRITE_VEC(i, L));
            total += widen(mass);
            mass = splat(0);
        }
    }
    while (i < n) {
        int64_t end = i + 16 * L < n ? i + 16 * L : n;
        for (; i < end; i += L) storenx(out + i, WRITE_VEC(i, n - i), n - i);
        total += widen(mass);
        mass = splat(0);
    }
#undef WRITE_VEC
    double sum = 0.0;
    HSUMD(total, sum);
    return sum;
}

/* The same over [0, n) without element `skip` (when 0 <= skip < n): the target's
 * output is written apart, and the mass of the others gives 1 - p_y exactly. */
FCE_INLINE double write_range(const XT *x, const T *ek, T f, XT *out, int64_t n, int64_t skip,
                              int qmode, int log_softmax, int stream, const T *w, const T *p,
                              T pa, T pb, xfp xf, T k, T ls, T c1, T c2)
{
    if (skip < 0 || skip >= n)
        return write_run(x, ek, f, out, n, qmode, log_softmax, stream, w, p, pa, pb, xf, k, ls,
                         c1, c2);
    double m = write_run(x, ek, f, out, skip, qmode, log_softmax, stream, w, p, pa, pb, xf, k,
                         ls, c1, c2);
    int64_t o = skip + 1;
    return m + write_run(x + o, ek ? ek + o : ek, f, out + o, n - o, qmode, log_softmax, stream,
                         w ? w + o : w, p ? p + o : p, pa, pb, xf, k, ls, c1, c2);
}

/* write_range for the job's op, qmode and logit transform (each an instantiation) */
static double write_range_any(const ctx *cx, const XT *x, const T *ek, T f, XT *out, int64_t n,
                              int64_t skip, const T *w, const T *p, T k, T ls, T c1, T c2)
{
    const int st = cx->stream;
    const T pa = cx->pa, pb = cx->pb;
#define WRITE_RANGE_XF(q, lsm, xfc) \
    write_range(x, lsm ? NULL : ek, f, out, n, lsm ? -1 : skip, q, lsm, st, w, p, pa, pb, xfc, \
                k, ls, c1, c2)
#define WRITE_RANGE(q, lsm) \
    (cx->xf.on ? WRITE_RANGE_XF(q, lsm, XF_ON(cx)) : WRITE_RANGE_XF(q, lsm, XF_OFF))
    if (cx->op == FCE_OP_LOG_SOFTMAX) return WRITE_RANGE(Q_NONE, 1);
    switch (cx->qmode) {
    case Q_ONE: return WRITE_RANGE(Q_ONE, 0);
    case Q_W: return WRITE_RANGE(Q_W, 0);
    case Q_P: return WRITE_RANGE(Q_P, 0);
    case Q_PW: return WRITE_RANGE(Q_PW, 0);
    default: return WRITE_RANGE(Q_NONE, 0);
    }
#undef WRITE_RANGE
#undef WRITE_RANGE_XF
}

/* The output of a row whose pass-2 exps are kept in ek (block shifts in bm):
 * block b's softmax is ek * exp(shift(bm[b]) - lse), no exp recomputed. */
static double write_row_kept(const ctx *cx, const XT *x, const T *ek, const double *bm,
                             XT *out, int64_t n, int64_t skip, const T *w, const T *p,
                             const sample *smp, T c1, T c2)
{
    double mass = 0.0, lse = smp->k + smp->ls, m = NAN;
    T f = 0;
    for (int64_t b0 = 0; b0 < n; b0 += BLK) {
        int64_t len = n - b0 < BLK ? n - b0 : BLK;
        /* <= 1; a block of -inf next to finite logits contributes exactly 0 (not
         * 0 * exp(huge)), while a row of -inf or NaN gives NaN as torch does.
         * Blocks with the same shift share one exp. (shift - k) - ls, not
         * shift - (k + ls): k + ls would round ls away when |k| >> ls. */
        if (!(bm[b0 / BLK] == m)) {
            m = bm[b0 / BLK];
            f = m == -INFINITY && isfinite(lse) ? 0 : (T)exp((fce_shift(m) - smp->k) - smp->ls);
        }
        mass += write_range_any(cx, x + b0, ek + b0, f, out + b0, len, skip - b0,
                                w ? w + b0 : w, p ? p + b0 : p, (T)smp->k, (T)smp->ls, c1, c2);
    }
    return mass;
}

/* The state of row r (C <= SEG), or 0 if its target is ignored. ek: scratch for
 * the row's exps (block shifts in bm), or NULL. mb, xn, nn, mn: as for
 * range_stats_any (the max of the row's first block if known, else NAN; the
 * first block of the row read next, whose max goes to *mn; *mn is NAN if this
 * row was skipped). */
static int row_state(const ctx *cx, int64_t r, sample *smp, fce_state *st, T *ek, double *bm,
                     T mb, const XT *xn, int64_t nn, T *mn)
{
    const XT *x = cx->x + r * cx->job->outer_stride;
    const int kept = sample_target(cx, r, smp);
    if (!kept && !cx->job->lse_out) {
        if (mn) *mn = NAN;
        return 0;
    }
    range_stats_any(cx, x, cx->C, mb, cx->w,
                    cx->p ? cx->p + r * cx->job->prob_outer_stride : NULL, st, ek, bm, xn, nn,
                    mn);
    if (!kept) {
        /* an ignored sample's log-sum-exp is still asked for */
        ((T *)cx->job->lse_out)[r] = (T)state_lse(cx, st, log(st->s), x, 1);
        return 0;
    }
    /* read after the row, from cache: read before, it is a cache miss that holds
     * up the stream (about 3 % for rows of 128 KiB) */
    if (cx->has_y) smp->xy = xf_logit(cx, xt_get(x[smp->y]), &smp->dy);
    return 1;
}

/* One whole row r (C <= SEG) with its output. Returns its loss. ek: scratch for
 * C exps, or NULL. */
static double row_one(const ctx *cx, int64_t r, T *ek)
{
    const fce_job *job = cx->job;
    const XT *x = cx->x + r * job->outer_stride;
    const T *p = cx->p ? cx->p + r * job->prob_outer_stride : NULL;
    XT *g = cx->g + r * job->grad_outer_stride;
    sample smp;
    fce_state st;
    double bm[SEG / BLK + 1];
    if (!row_state(cx, r, &smp, &st, ek, bm, NAN, NULL, 0, NULL)) {
        memset(g, 0, (size_t)cx->C * sizeof(XT));
        return 0.0;
    }
    double loss = finish_sample(cx, r, &st, log(st.s), &smp, x, 1);
    double c1 = GRAD_C1(smp.gs, smp.a, cx->b, st.q), c2 = GRAD_C2(smp.gs, cx->b);
    if (cx->z != 0.0) c1 += GRAD_CZ(smp.gs, smp.zc);
    int target = cx->has_y && cx->op == FCE_OP_LOSS;
    int64_t skip = target ? smp.y : -1;
    double others =
        ek ? write_row_kept(cx, x, ek, bm, g, cx->C, skip, cx->w, p, &smp, (T)c1, (T)c2)
           : write_range_any(cx, x, NULL, 0, g, cx->C, skip, cx->w, p, (T)smp.k, (T)smp.ls,
                             (T)c1, (T)c2);
    if (target) g[smp.y] = xt_put(target_grad(cx, &smp, st.q, others, target_prob(&smp)));
    return loss;
}

/* Rows [r0, r1) (C <= SEG) without an output; each row's first block is
 * scanned for its max while the row before is summed. Returns the sum of the
 * losses, in row order. (A vectorised log over 16 rows was tried: its latency,
 * paid once per row on the gradient path that must give the same bits, cost
 * more than libm's log.) */
static double rows_no_output(const ctx *cx, int64_t r0, int64_t r1)
{
    const int64_t rs = cx->job->outer_stride, nn = cx->C < BLK ? cx->C : BLK;
    double acc = 0.0;
    T mb = NAN;
    const int64_t N = cx->job->n_outer;
    for (int64_t r = r0; r < r1; r++) {
        /* the last row's pass 1 goes on into the next item's first row: its max
         * is not passed on (that item may be another thread's), but the reads
         * overlap this row's exps and leave the block in cache */
        const XT *xn = r + 1 < N ? cx->x + (r + 1) * rs : NULL;
        sample smp;
        fce_state st;
        if (row_state(cx, r, &smp, &st, NULL, NULL, mb, xn, nn, &mb))
            acc += finish_sample(cx, r, &st, log(st.s), &smp, cx->x + r * rs, 1);
    }
    return acc;
}

/* rows [it*per_item, ...) of item it */
FCE_INLINE void item_range(const ctx *cx, int64_t it, int64_t *r0, int64_t *r1)
{
    const int64_t N = cx->job->n_outer;
    *r0 = it * cx->per_item;
    *r1 = *r0 + cx->per_item < N ? *r0 + cx->per_item : N;
}

/* the work item of a path over rows [r0, r1): its loss sum into the item's partial */
#define ITEM_OF_ROWS(item, rows_fn)                              \
    static void item(const ctx *cx, int64_t it, int tid)         \
    {                                                            \
        (void)tid;                                               \
        int64_t r0, r1;                                          \
        item_range(cx, it, &r0, &r1);                            \
        cx->partials[it] = rows_fn(cx, r0, r1);                  \
    }

ITEM_OF_ROWS(item_rows_no_output, rows_no_output)

static void item_rows_with_output(const ctx *cx, int64_t it, int tid)
{
    T *ek = cx->scratch ? cx->scratch + (int64_t)tid * cx->scratch_len : NULL;
    int64_t r0, r1;
    item_range(cx, it, &r0, &r1);
    double acc = 0.0;
    for (int64_t r = r0; r < r1; r++) acc += row_one(cx, r, ek);
    if (cx->stream) stream_fence();
    cx->partials[it] = acc;
}

#endif
