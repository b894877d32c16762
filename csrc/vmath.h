/* vmath.h: the vector maths of one kernel variant: exp, log and tanh, with their
 * coefficient tables. Included once per (dtype, instruction set), after simd.h. */
#ifndef FCE_VMATH_H
#define FCE_VMATH_H

#include "simd.h"

/* log(s) for L doubles at once (s >= 0, inf, NaN): the columns path takes one
 * per position, too many for a scalar log. s = 2^e m, m in [sqrt(1/2), sqrt(2)),
 * log m = 2 atanh(u), u = (m-1)/(m+1), |u| <= 0.1716: the odd series to u^21
 * leaves a truncation below 2e-18 relative; ln2 split in hi + lo (fdlibm). */
/* in place over L doubles (a pointer, not a VD by value: VD may be wider than
 * the ISA's registers, which would make passing it an ABI matter, -Wpsabi) */
FCE_INLINE void vlogd(double *inout)
{
    VD s;
    memcpy(&s, inout, sizeof s);
    VL bits = (VL)s;
    VL e = ((bits >> 52) & 0x7ff) - 1023;
    VD m = (VD)((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);
    VL big = m > 1.4142135623730951;
    m = (VD)(((VL)(m * 0.5) & big) | ((VL)m & ~big));
    e -= big; /* big is -1 where true */
    VD u = (m - 1.0) / (m + 1.0), u2 = u * u;
    VD p = (VD){0} + 1.0 / 21;
    p = p * u2 + 1.0 / 19;
    p = p * u2 + 1.0 / 17;
    p = p * u2 + 1.0 / 15;
    p = p * u2 + 1.0 / 13;
    p = p * u2 + 1.0 / 11;
    p = p * u2 + 1.0 / 9;
    p = p * u2 + 1.0 / 7;
    p = p * u2 + 1.0 / 5;
    p = p * u2 + 1.0 / 3;
    /* e to double without an int64 conversion instruction (AVX2 has none):
     * the bits of 1.5 * 2^52 + e are those of 1.5 * 2^52 plus e, for |e| < 2^51 */
    VD ed = (VD)(e + 0x4338000000000000LL) - 6755399441055744.0;
    VD r = ed * 6.93147180369123816490e-01 + (ed * 1.90821492927058770002e-10 + 2.0 * u + 2.0 * u * u2 * p);
    /* 0 -> -inf; inf and NaN pass through (denormal s does not occur: s >= 1 or 0) */
    VL zero = s == 0.0, special = ~(s == s) | (s == (double)INFINITY);
    r = (VD)(((VL)r & ~zero) | ((VL)((VD){0} - (double)INFINITY) & zero));
    r = (VD)(((VL)r & ~special) | ((VL)s & special));
    memcpy(inout, &r, sizeof r);
}

#if FCE_DTYPE == 32
/* log(s) in float lanes, without a division (the small-C loss path takes one per
 * row): Cephes logf, s = 2^e m with m in [sqrt(1/2), sqrt(2)), a degree-9
 * polynomial in m - 1; about 1 ulp. 0 gives -inf; inf and NaN pass through. */
FCE_INLINE V vlogf(V s)
{
    VI bits = (VI)s;
    VI e = ((bits >> 23) & 0xff) - 126;
    V m = (V)((bits & ~0x7f800000) | 0x3f000000); /* the mantissa, in [0.5, 1) */
    VI small = m < 0.707106781186547524f;
    e += small; /* small is -1 where true */
    V x = (m + (V)((VI)m & small)) - 1.0f;
    V z = x * x;
    V y = (V){0} + 7.0376836292e-2f;
    y = y * x - 1.1514610310e-1f;
    y = y * x + 1.1676998740e-1f;
    y = y * x - 1.2420140846e-1f;
    y = y * x + 1.4249322787e-1f;
    y = y * x - 1.6668057665e-1f;
    y = y * x + 2.0000714765e-1f;
    y = y * x - 2.4999993993e-1f;
    y = y * x + 3.3333331174e-1f;
    y = y * x * z;
    V ef = __builtin_convertvector(e, V);
    y += -2.12194440e-4f * ef;
    y += -0.5f * z;
    V r = (x + y) + 0.693359375f * ef;
    VI zero = s == 0.0f, special = ~(s == s) | (s == INFINITY);
    r = vselect(zero, splat(-INFINITY), r);
    return vselect(special, s, r);
}
#endif

/* log of the L double lanes of *d in place, as precise as the dtype needs: float32
 * results take the division-free float log of the sums rounded to float (they
 * are >= 1, so that rounding moves the log by < 6e-8), float64 the double one.
 * Every path that finishes small-C samples uses this one, so their losses agree
 * to the bit. */
FCE_INLINE void log_lanes(VD *d)
{
#if FCE_DTYPE == 32
    *d = widen(vlogf(__builtin_convertvector(*d, V)));
#else
    vlogd((double *)d);
#endif
}

/* exp(x) for x <= 0 (and NaN). Range reduction x = n ln2 + r, |r| <= ln2/2,
 * with n rounded by the 1.5*2^mant trick; exp(r) by a polynomial; 2^n built in
 * the exponent bits. Results below the smallest normal number are flushed to
 * exactly 0 (denormals take a microcode slow path); -inf gives 0, NaN gives NaN.
 *
 * exp(r) ~ 1 + r + r^2 (c2 + c3 r + ... + cK r^(K-2)), c2..cK fitted (mpmath,
 * iteratively reweighted least squares) for least maximal relative error on
 * |r| <= ln2/2: K = 6 for float32 (truncation 3.9e-9), K = 11 for float64
 * (3.6e-18, 0.03 ulp). With FMA, Horner over the whole polynomial; without,
 * 1 + r + r^2 q(r), whose last two roundings err less there. Max error, float32
 * on every input in [log(FLT_MIN), 0]: 0.89 ulp with FMA, 0.99 without; float64
 * (10M points, extended-precision truth): 0.89 and 1.01 (bench/exp_accuracy.py). */
#if FCE_DTYPE == 32
/* magic = 1.5 * 2^23 + 127: t's low mantissa bits hold n + 127, the biased
 * exponent of 2^n, so t's bits shifted left by 23 are those of 2^n */
#define EXP_MAGIC (12582912.0f + 127.0f)
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_X_MIN -87.3365447505531f /* log(FLT_MIN) */
#define EXP_MANT 23
static const float exp_c[] = {1.3871070696040988e-3f, 8.36954079568386e-3f,
                              4.166741669178009e-2f, 1.6666512191295624e-1f,
                              4.999999701976776e-1f}; /* c6 .. c2 */
#else
#define EXP_MAGIC (6755399441055744.0 + 1023.0) /* 1.5 * 2^52 + 1023: as above */
#define EXP_LOG2E 1.4426950408889634074
#define EXP_LN2_HI 6.93147180369123816490e-01
#define EXP_LN2_LO 1.90821492927058770002e-10
#define EXP_X_MIN -708.396418532264106 /* log(DBL_MIN) */
#define EXP_MANT 52
static const double exp_c[] = {2.5000052861056103e-08, 2.7630263397559955e-07,
                               2.755758647779769e-06,  2.4801493059959274e-05,
                               1.9841269506377352e-04, 1.3888888943664243e-03,
                               8.333333333494593e-03,  4.1666666666530044e-02,
                               1.6666666666666413e-01, 5.000000000000011e-01}; /* c11 .. c2 */
#endif


/* exp(x) for x <= 0 (and NaN), the ISAs with a register permute (TAB_N > 0):
 *   x = (n / N) ln2 + r,  |r| <= ln2 / (2N),  N = TAB_N,  n = 16 i + j (N = 16)
 *   exp(x) = 2^i * 2^(j/N) * exp(r),  exp(r) = 1 + r + r^2 (c2 + ... )
 * 2^(j/N) comes from a table in registers (one permute, indexed by the low bits
 * of t = x N/ln2 + 1.5 * 2^mant, which hold n); its rounding error is carried by
 * a second table of relative corrections d_j folded into the polynomial's last
 * FMA, and 2^i is added to the exponent bits: the table holds the bits of
 * 2^(j/N) minus j << (mant - log2 N), so adding t's bits shifted left by
 * mant - log2 N adds exactly i to the exponent. The short range needs a short
 * polynomial: degree 3 for float32 with N = 16 (Taylor; truncation 9e-9), 4 with
 * N = 8 (1.3e-9), 7 for float64 with N = 16 (1.2e-18). Per float32 this is 7
 * FMA-pipe operations where the polynomial form above takes 10 (9 FMAs and the
 * 2^n scaling): the forward's arithmetic, which is what bounds it on CPUs whose
 * FMA units are narrower than their registers (AMD Zen 4) or few (Zen 3).
 * Results below the smallest normal number are 0, -inf gives 0, NaN gives NaN.
 * Max error, measured over every float32 in [log(FLT_MIN), 0]: see
 * tests/test_isa.py (below the polynomial form's 0.89 ulp). */
#if TAB_N == 16 && FCE_DTYPE == 32
#define EXP_TAB_SHIFT 19 /* mant - log2 N */
static const union { uint32_t bits[16]; float f[16]; } exp_tab_hi = {{
    0x3f800000, 0x3f7daac3, 0x3f7b95c2, 0x3f79c3d3, 0x3f7837f0, 0x3f76f532, 0x3f75fed7, 0x3f75583f,
    0x3f7504f3, 0x3f7508a4, 0x3f75672a, 0x3f76248c, 0x3f7744fd, 0x3f78ccdf, 0x3f7ac0c7, 0x3f7d257d,
}};
static const float exp_tab_lo[16] = {
    0.0f, 4.6285471455576044e-08f, -1.199215748926008e-08f, 4.7297824323777604e-08f,
    3.1934181521364735e-08f, 3.621057231839586e-08f, -3.0990719324108795e-08f, -7.475213337215791e-09f,
    1.7114270889351246e-08f, -3.047683350132502e-08f, 5.233334210430485e-09f, 6.10759176566944e-09f,
    -1.4719605090363075e-08f, -5.258795177098818e-09f, -6.128259677495862e-09f, 5.140609271592211e-09f,
};
static const float exp_tab_c[] = {1.0f / 6, 0.5f}; /* c3, c2 */
#elif TAB_N == 8 && FCE_DTYPE == 32
#define EXP_TAB_SHIFT 20
static const union { uint32_t bits[8]; float f[8]; } exp_tab_hi = {{
    0x3f800000, 0x3f7b95c2, 0x3f7837f0, 0x3f75fed7, 0x3f7504f3, 0x3f75672a, 0x3f7744fd, 0x3f7ac0c7,
}};
static const float exp_tab_lo[8] = {
    0.0f, -1.199215748926008e-08f, 3.1934181521364735e-08f, -3.0990719324108795e-08f,
    1.7114270889351246e-08f, 5.233334210430485e-09f, -1.4719605090363075e-08f, -6.128259677495862e-09f,
};
static const float exp_tab_c[] = {1.0f / 24, 1.0f / 6, 0.5f}; /* c4 .. c2 */
#elif TAB_N == 16 && FCE_DTYPE == 64
#define EXP_TAB_SHIFT 48
static const union { uint64_t bits[16]; double f[16]; } exp_tab_hi = {{
    0x3ff0000000000000, 0x3fefb5586cf9890f, 0x3fef72b83c7d517b, 0x3fef387a6e756238,
    0x3fef06fe0a31b715, 0x3feedea64c123422, 0x3feebfdad5362a27, 0x3feeab07dd485429,
    0x3feea09e667f3bcd, 0x3feea11473eb0187, 0x3feeace5422aa0db, 0x3feec49182a3f090,
    0x3feee89f995ad3ad, 0x3fef199bdd85529c, 0x3fef5818dcfba487, 0x3fefa4afa2a490da,
}};
static const double exp_tab_lo[16] = {
    0.0, 8.189317638195515e-17, -2.7939114859515733e-17, 7.826573258636076e-17,
    3.3484623336251524e-17, 3.750854201303127e-17, 1.9572585293112036e-17, 5.68648095791174e-17,
    -6.835808657661922e-17, -2.3591094770850053e-17, 5.1548301170786783e-17, 1.5341410053603723e-17,
    4.875160526227062e-17, 1.685487290628973e-17, 1.790126907604513e-17, -5.545065618639427e-17,
};
static const double exp_tab_c[] = {1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24,
                                   1.0 / 6, 0.5}; /* c7 .. c2 */
#endif

#if TAB_N > 0
#define EXP_MAGIC_TAB (FCE_DTYPE == 32 ? 12582912.0f : 6755399441055744.0) /* 1.5 * 2^mant */
FCE_INLINE V vexp(V x)
{
    V t = x * (T)(TAB_N * EXP_LOG2E) + (T)EXP_MAGIC_TAB;
    V n = t - (T)EXP_MAGIC_TAB;
    V r = x - n * (T)(EXP_LN2_HI / TAB_N);
    r = r - n * (T)(EXP_LN2_LO / TAB_N);
    VI ti = (VI)t;
    /* 2^i 2^(j/N); unsigned: for x below EXP_X_MIN (masked to 0 below) the exponent
     * arithmetic wraps, which signed integers may not do */
    V s = (V)((VU)tab_lookup(exp_tab_hi.f, ti) + ((VU)ti << EXP_TAB_SHIFT));
    V p = splat(exp_tab_c[0]);
    for (size_t i = 1; i < sizeof exp_tab_c / sizeof exp_tab_c[0]; i++) p = p * r + exp_tab_c[i];
    p = p * r + (T)1;
    V q = p * r + tab_lookup(exp_tab_lo, ti);
    V y = s * q + s;
    return (V)((VI)y & ~(VI)(x < EXP_X_MIN));
}
#else
FCE_INLINE V vexp(V x)

{
    V t = x * EXP_LOG2E + EXP_MAGIC;
    V n = t - EXP_MAGIC;
    V r = x - n * EXP_LN2_HI;
    r = r - n * EXP_LN2_LO;
    V p = splat(exp_c[0]);
    for (size_t i = 1; i < sizeof exp_c / sizeof exp_c[0]; i++) p = p * r + exp_c[i];
#if defined(__FMA__) || defined(__aarch64__) && !defined(FCE_ISA_IS_SCALAR)
    /* (the variants built with -ffp-contract=fast: avx2, avx512, neon) */
    p = p * r + (T)1;
    p = p * r + (T)1;
#else
    p = p * (r * r) + r + (T)1;
#endif
#if defined(__AVX512F__) && VB == 64 && FCE_DTYPE == 32
    /* p * 2^n in one instruction, zero below x_min (and for -inf), NaN kept */
    return (V)_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(EXP_X_MIN), _CMP_NLT_UQ),
                                     (__m512)p, (__m512)n);
#elif defined(__AVX512F__) && VB == 64
    return (V)_mm512_maskz_scalef_pd(_mm512_cmp_pd_mask((__m512d)x, _mm512_set1_pd(EXP_X_MIN), _CMP_NLT_UQ),
                                     (__m512d)p, (__m512d)n);
#else
    V y = p * (V)((VU)t << EXP_MANT);  /* unsigned: a negative shifted left is undefined */
    return (V)((VI)y & ~(VI)(x < EXP_X_MIN));
#endif
}
#endif


/* tanh(u) lane by lane, and *sech2 = 1 - tanh(u)^2 (the softcap and its gradient).
 * float32: for |u| <= 0.5625, tanh = u + u^3 P(u^2), P of degree 4 fitted to the
 * relative error (0.8 ulp over the interval, numpy's float64 tanh as the truth), and
 * sech^2 = 1 - tanh^2 (>= 0.74: no cancellation); a vector with every lane there
 * (the usual logits under a softcap) stops at that. Above, with e = exp(-2|u|)
 * (vexp: 0 for |u| past 43.7, and for inf), tanh = sign(u) (1 - e) / (1 + e), which
 * is >= 0.51 there, so its error is about e's, and sech^2 = 4 e / (1 + e)^2: where
 * tanh ~ 1, 1 - tanh^2 would cancel to nothing, this keeps its relative accuracy.
 * NaN gives NaN (on the exp's side), +-inf +-1.
 * float64: libm's tanh and exp per lane (no target asks for double-precision speed
 * with a softcap, and libm's are correctly rounded or nearly). */
#if FCE_DTYPE == 32
static const float tanh_c[] = {-0.3333331346511841f, 0.133324533700943f,
                               -0.05383753031492233f, 0.02100774459540844f,
                               -0.0061800722032785416f}; /* P's, constant term first */
#endif
FCE_INLINE V vtanh(V u, V *sech2)
{
#if FCE_DTYPE == 32
    const VU sign = (VU){0} + (TU)0x80000000u; /* (not splat(-0.0f): 0 + -0 is +0) */
    V a = (V)((VU)u & ~sign);
    V v = u * u;
    V p = splat(tanh_c[4]);
    for (int i = 3; i >= 0; i--) p = p * v + tanh_c[i];
    V small = (u * v) * p + u;
    VI is_small = a <= 0.5625f;
    if (vall(is_small)) {
        /* every lane on the polynomial (logits within 0.56 softcap, the usual case):
         * no exp, no division; 1 - t^2 >= 0.74 does not cancel there */
        *sech2 = 1.0f - small * small;
        return small;
    }
    V e = vexp(a * -2.0f);
    V r = 1.0f / (e + 1.0f);
    *sech2 = vselect(is_small, 1.0f - small * small, (e * 4.0f) * (r * r));
    V big = (V)((VU)((1.0f - e) * r) | ((VU)u & sign));
    return vselect(is_small, small, big);
#else
    T ul[L], tl[L], dl[L];
    memcpy(ul, &u, sizeof ul);
    for (int64_t i = 0; i < L; i++) {
        double e = exp(-2.0 * fabs(ul[i]));
        tl[i] = tanh(ul[i]);
        dl[i] = 4.0 * e / ((1.0 + e) * (1.0 + e));
    }
    V t;
    memcpy(&t, tl, sizeof t);
    memcpy(sech2, dl, sizeof t);
    return t;
#endif
}

#endif
