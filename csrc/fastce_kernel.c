/* fastce_kernel.c: the one body of every cross-entropy kernel.
 *
 * This file is compiled once per (dtype, instruction set) by setup.py, with
 *   -DFCE_DTYPE=32|64  -DFCE_ISA=scalar|sse2|avx2|avx512|neon
 * and that instruction set's compiler flags. The code is written with GCC/Clang
 * vector extensions over V, a vector of L lanes of T; the same source becomes
 * 1-lane scalar code, SSE2/NEON (16 bytes), AVX2 (32) or AVX-512 (64).
 *
 * The maths. For one sample with logits x_c, c = 0..C-1:
 *   lse = log sum_c exp(x_c) = k + log s,   s = sum_c exp(x_c - k),  k = max_c x_c
 * Online (one read of the row): split the row into blocks that fit in L1.
 * For each block b: its max m_b (pass 1, from memory), then with the running
 * max M = max(m_0..m_b)
 *   s += sum exp(x - M), d += sum q (M - x), q += sum q  (pass 2, from L1),
 * so each element costs one exp. Pass 1 of the next block (or of the next row's
 * first block) runs inside pass 2's loop, so its memory reads overlap the exps.
 * The sums stay in double vector lanes while M stays; when M grows they are
 * reduced and merged into the state with
 *   s = s_a exp(m_a - m) + s_b exp(m_b - m),  m = max(m_a, m_b)
 * (fce_state_merge), as are the states of row segments. The loss of a sample is then
 *   loss = a (lse - x_y) + b sum_c q_c (lse - x_c) = a ((k - x_y) + log s) + b (d + q log s)
 * with, for class-index targets y:  a = (1 - eps) w_y, b = eps / C, q_c = w_c (or 1)
 *      for probability targets p:   a = 0,             b = 1,       q_c = w_c ((1-eps) p_c + eps/C)
 * and its gradient d loss / d x_c = (a + b q) softmax_c - a [c == y] - b q_c,
 * where the target class takes softmax_y - 1 as minus the other classes' softmax
 * mass when p_y > 1/2 (expm1 in double otherwise): the difference cancels there.
 *
 * The paths: rows of C > 32 (rows_no_output: blocks of 4 KiB, each row's first
 * block scanned while the row before is summed; row_one with an output: pass 2's
 * exps kept for the gradient), rows longer than 512 KiB (segments, states merged in a fixed order),
 * C <= 32 (one vector lane per row: rows_small_c_loss, or gathered tiles through
 * cols_group), and K-dim (N, C, D) inputs (cols_group, lanes across positions).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fastce_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && !defined(FCE_ISA_IS_SCALAR)
#include <immintrin.h>
#endif

#ifndef FCE_DTYPE
#error "compile with -DFCE_DTYPE=32 or 64"
#endif
#ifndef FCE_ISA
#error "compile with -DFCE_ISA=<name>"
#endif

#define FCE_CAT3_(a, b, c) a##_##b##_##c
#define FCE_CAT3(a, b, c) FCE_CAT3_(a, b, c)

#if FCE_DTYPE == 32
typedef float T;
typedef int32_t TI;
#define FCE_SFX f32
#else
typedef double T;
typedef int64_t TI;
#define FCE_SFX f64
#endif
#define EXPORT(name) FCE_CAT3(name, FCE_SFX, FCE_ISA)

/* vector width in bytes */
#if defined(FCE_ISA_IS_SCALAR)
#define VB (FCE_DTYPE / 8)
#elif defined(__AVX512F__)
#define VB 64
#elif defined(__AVX2__)
#define VB 32
#else
#define VB 16
#endif

typedef T V __attribute__((vector_size(VB)));
typedef TI VI __attribute__((vector_size(VB)));
#define L ((int64_t)(VB / sizeof(T)))
/* L lanes of double: the dot products sum(q (k - x)) are accumulated in double
 * (their terms reach |k - x| ~ 100 for confident rows) */
typedef double VD __attribute__((vector_size(VB / sizeof(T) * sizeof(double))));
typedef int64_t VL __attribute__((vector_size(VB / sizeof(T) * sizeof(double))));
/* Rows are processed in blocks of BLK elements (4 KiB): pass 1 brings a block
 * into L1, pass 2 reads it from there. */
#define BLK ((int64_t)(4096 / sizeof(T)))
#define SEG ((int64_t)(FCE_SEG_BYTES / sizeof(T)))
/* software prefetch distance, bytes ahead of pass 1 */
#define PF_BYTES 2048

/* ---------------------------------------------------------------- vectors */

static inline V splat(T a) { return (V){0} + a; }
static inline V loadu(const T *p) { V v; memcpy(&v, p, sizeof v); return v; }
static inline void storeu(T *p, V v) { memcpy(p, &v, sizeof v); }
/* the first n (possibly <= 0) lanes from p, the rest `fill` */
static inline V loadn(const T *p, int64_t n, T fill)
{
    if (n >= L) return loadu(p);
    if (n <= 0) return splat(fill);
#if defined(__AVX512F__) && VB == 64 && FCE_DTYPE == 32
    return (V)_mm512_mask_loadu_ps((__m512)splat(fill), (__mmask16)((1u << n) - 1), p);
#elif defined(__AVX512F__) && VB == 64
    return (V)_mm512_mask_loadu_pd((__m512d)splat(fill), (__mmask8)((1u << n) - 1), p);
#elif defined(__AVX2__) && VB == 32 && FCE_DTYPE == 32
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return (V)_mm256_blendv_ps((__m256)splat(fill), _mm256_maskload_ps(p, m), (__m256)m);
#elif defined(__AVX2__) && VB == 32
    __m256i m = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
    return (V)_mm256_blendv_pd((__m256d)splat(fill), _mm256_maskload_pd(p, m), (__m256d)m);
#else
    V v = splat(fill);
    for (int64_t i = 0; i < n; i++) v[i] = p[i];
    return v;
#endif
}
static inline void storen(T *p, V v, int64_t n)
{
    if (n >= L) { storeu(p, v); return; }
    if (n <= 0) return;
#if defined(__AVX512F__) && VB == 64 && FCE_DTYPE == 32
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
#elif defined(__AVX512F__) && VB == 64
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1), (__m512d)v);
#elif defined(__AVX2__) && VB == 32 && FCE_DTYPE == 32
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), (__m256)v);
#elif defined(__AVX2__) && VB == 32
    _mm256_maskstore_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)),
                        (__m256d)v);
#else
    for (int64_t i = 0; i < n; i++) p[i] = v[i];
#endif
}
static inline V select(VI mask, V a, V b) { return (V)(((VI)a & mask) | ((VI)b & ~mask)); }

/* max(a, b) lane-wise; b when a is NaN (so NaN never becomes the max) */
static inline V vmax(V a, V b)
{
#if defined(__AVX512F__) && VB == 64 && FCE_DTYPE == 32
    return (V)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX512F__) && VB == 64
    return (V)_mm512_max_pd((__m512d)a, (__m512d)b);
#elif defined(__AVX__) && VB == 32 && FCE_DTYPE == 32
    return (V)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__AVX__) && VB == 32
    return (V)_mm256_max_pd((__m256d)a, (__m256d)b);
#elif defined(__SSE2__) && VB == 16 && FCE_DTYPE == 32
    return (V)_mm_max_ps((__m128)a, (__m128)b);
#elif defined(__SSE2__) && VB == 16
    return (V)_mm_max_pd((__m128d)a, (__m128d)b);
#else
    return select(a > b, a, b);
#endif
}

/* horizontal max and sum as trees over halves (short dependency chains; the
 * order is fixed, so results do not depend on anything but the data) */
static inline T hmax(V v)
{
    T a[L];
    memcpy(a, &v, sizeof a);
    for (int64_t w = L / 2; w > 0; w /= 2)
        for (int64_t i = 0; i < w; i++) a[i] = a[i + w] > a[i] ? a[i + w] : a[i];
    return a[0];
}
/* macros, not functions: VD may be wider than the ISA's registers, and passing
 * it by value would be an ABI matter (-Wpsabi) */
#define widen(v) __builtin_convertvector((v), VD)
#define HSUMD(v, out)                                                  \
    do {                                                               \
        double hsum_a_[L];                                             \
        memcpy(hsum_a_, &(v), sizeof hsum_a_);                         \
        for (int64_t hsum_w_ = L / 2; hsum_w_ > 0; hsum_w_ /= 2)       \
            for (int64_t hsum_i_ = 0; hsum_i_ < hsum_w_; hsum_i_++)    \
                hsum_a_[hsum_i_] += hsum_a_[hsum_i_ + hsum_w_];        \
        (out) = hsum_a_[0];                                            \
    } while (0)

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
static inline V vlogf(V s)
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
    r = select(zero, splat(-INFINITY), r);
    return select(special, s, r);
}
#endif

/* log of L doubles in place, as precise as the dtype needs: float32 results take
 * the division-free float log of the sums rounded to float (they are >= 1, so
 * that rounding moves the log by < 6e-8), float64 the double one. Every path that
 * finishes small-C samples uses this one, so their losses agree to the bit. */
FCE_INLINE void log_lanes(double *inout)
{
#if FCE_DTYPE == 32
    VD d;
    memcpy(&d, inout, sizeof d);
    d = widen(vlogf(__builtin_convertvector(d, V)));
    memcpy(inout, &d, sizeof d);
#else
    vlogd(inout);
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

static inline V vexp(V x)
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
    V y = p * (V)((VI)t << EXP_MANT);
    return (V)((VI)y & ~(VI)(x < EXP_X_MIN));
#endif
}

/* ------------------------------------------------------------ the job */

enum { Q_NONE = 0, Q_ONE, Q_W, Q_P, Q_PW };

typedef struct {
    const fce_job *job;
    int op, reduction, qmode, has_y, want_out;
    int stream;          /* write the output with non-temporal stores */
    int64_t C;
    const T *x;
    const T *w;
    const T *p;
    T *g;
    T pa, pb;            /* q from probabilities: (pa p + pb) (* w) */
    double a0, b;        /* a = a0 * w_y; b as in the header comment */
    double gscale;       /* upstream gradient for sum/mean, / total for mean */
    /* the work plan */
    int64_t per_item, seg, nseg, tiles;
    double *partials;    /* one loss sum per work item */
    fce_state *states;   /* long rows: one state per segment */
    struct sample *smps; /* long rows: one finished sample per row */
    double *mass;        /* long rows: softmax mass written per segment, target left out */
    T *scratch;          /* rows with a gradient: per thread, room for one row's exps */
    int64_t scratch_len;
} ctx;

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

/* Pass 1 of a block: the max of n contiguous classes (NaN never wins), read
 * from memory with a software prefetch ahead. */
FCE_INLINE T block_max(const T *x, int64_t n)
{
    V m0 = splat(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t i = 0;
    for (; i + 4 * L <= n; i += 4 * L) {
        for (int64_t b = 0; b < 4 * VB; b += 64)
            __builtin_prefetch((const char *)(x + i) + PF_BYTES + b);
        m0 = vmax(loadu(x + i), m0);
        m1 = vmax(loadu(x + i + L), m1);
        m2 = vmax(loadu(x + i + 2 * L), m2);
        m3 = vmax(loadu(x + i + 3 * L), m3);
    }
    for (; i < n; i += L) m0 = vmax(loadn(x + i, n - i, -INFINITY), m0);
    return hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
}

/* prefetch the lines of two vectors PF_BYTES after a */
FCE_INLINE void prefetch_pair(const T *a)
{
    for (int64_t b = 0; b < 2 * VB; b += 64) __builtin_prefetch((const char *)a + PF_BYTES + b);
}

/* Pass 2's work on the two vectors at x + i: exps (kept in e_out), their sums
 * into s0, s1 and the class-coefficient terms into dd, q0. */
FCE_INLINE void sum_pair(const T *x, int64_t i, V vk, int qmode, const T *w, const T *p, T pa,
                         T pb, T *e_out, V *s0, V *s1, VD *dd, V *q0)
{
    V xa = loadu(x + i), xb = loadu(x + i + L);
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
        *dd += widen(qa * (vk - xa)) + widen(qb * (vk - xb));
        *q0 += qa + qb;
    }
}

/* Pass 2 of a block of n <= BLK classes shifted by mb (>= their max): its sums
 * s, d, q added to the lanes of sums[0..2] (and its exps in e_out). The block
 * is in L1 after pass 1, so this is arithmetic; memory is kept busy meanwhile:
 * with xn, pass 1 of the next block (nn classes at xn) runs in the same loop
 * and its max goes to *mn; its loads, and a prefetch PF_BYTES ahead of them
 * (of the memory after this block without xn), overlap this block's exps. */
FCE_INLINE void block_rest(const T *x, int64_t n, T mb, int qmode, const T *w, const T *p,
                           T pa, T pb, VD *sums, T *e_out, const T *xn, int64_t nn, T *mn)
{
    T k = mb == -INFINITY ? 0 : mb;
    V vk = splat(k);
    V n0 = splat(-INFINITY), n1 = n0;

    /* float partial sums over at most CHUNK vectors per lane (two sums, s0 and
     * s1, per run of CHUNK pairs), each folded into double on its own: the float
     * error stays that of a 32-term sum for any L. (For AVX-512 a run is a
     * whole block: runs of 16 pairs, two per block, measured 1-2 % slower.) */
    enum { CHUNK = 32 };
    VD sd = sums[0], dd = sums[1], qd = sums[2];
    /* the prefetch runs PF_BYTES ahead of pass 1's reads, and past them into the
     * memory after: the next block, or the next row (harmless past the end) */
    const T *ahead = xn ? xn : x + n;
    int64_t i = 0, covered = 0;
    while (i + 2 * L <= n) {
        int64_t end = i + CHUNK * 2 * L < n ? i + CHUNK * 2 * L : n;
        V s0 = splat(0), s1 = s0, q0 = s0;
        /* with pass 1 of the next block while it lasts, then without */
        int64_t with1 = !xn ? i : end < nn ? end : nn;
        for (; i + 2 * L <= with1; i += 2 * L) {
            prefetch_pair(ahead + i);
            n0 = vmax(loadu(xn + i), n0);
            n1 = vmax(loadu(xn + i + L), n1);
            covered = i + 2 * L;
            sum_pair(x, i, vk, qmode, w, p, pa, pb, e_out, &s0, &s1, &dd, &q0);
        }
        for (; i + 2 * L <= end; i += 2 * L) {
            prefetch_pair(ahead + i);
            sum_pair(x, i, vk, qmode, w, p, pa, pb, e_out, &s0, &s1, &dd, &q0);
        }
        sd += widen(s0) + widen(s1);
        if (qmode != Q_NONE) qd += widen(q0);
    }
    for (; i < n; i += L) {
        V xa = loadn(x + i, n - i, -INFINITY);
        V ea = vexp(xa - vk);
        sd += widen(ea);
        if (e_out) storen(e_out + i, ea, n - i);
        if (qmode != Q_NONE) {
            V qa = qload(qmode, w + i, p + i, n - i, pa, pb);
            dd += widen(qa * (vk - loadn(x + i, n - i, k)));
            qd += widen(qa);
        }
    }
    if (xn) {
        T a = block_max(xn + covered, nn - covered), b = hmax(vmax(n0, n1));
        *mn = a > b ? a : b;
    }
    sums[0] = sd;
    if (qmode != Q_NONE) {
        sums[1] = dd;
        sums[2] = qd;
    }
}

/* The state of n contiguous classes, block by block, the max of the first
 * block given as mb. Every block is shifted by the running max, so the sums
 * stay in double lanes from block to block; they are reduced into the state
 * only when the max grows (and at the end). With e_out, each block's
 * exp(x - shift) is kept there and its shift in bm[block]. With xn, the max of
 * the nn <= BLK classes at xn (the caller's next range) is found on the way,
 * into *mn. */
FCE_INLINE void range_stats(const T *x, int64_t n, T mb, int qmode, const T *w, const T *p,
                            T pa, T pb, fce_state *st, T *e_out, double *bm, const T *xn,
                            int64_t nn, T *mn)
{
    VD sums[3];
    T shift = mb;
    int have = 0;
    sums[0] = sums[1] = sums[2] = widen(splat(0));
    for (int64_t b0 = 0;; b0 += BLK) {
        if (b0 >= n || mb > shift) {
            /* the sums so far (shifted by `shift`) into the state */
            fce_state bs = {(double)shift, 0.0, 0.0, 0.0};
            HSUMD(sums[0], bs.s);
            HSUMD(sums[1], bs.d);
            HSUMD(sums[2], bs.q);
            if (have)
                fce_state_merge(st, &bs);
            else
                *st = bs;
            have = 1;
            if (b0 >= n) break;
            sums[0] = sums[1] = sums[2] = widen(splat(0));
            shift = mb;
        }
        int64_t len = n - b0 < BLK ? n - b0 : BLK;
        int64_t next = n - b0 - len < BLK ? n - b0 - len : BLK;
        const T *nx = next > 0 ? x + b0 + len : xn;
        T nm = NAN;
        block_rest(x + b0, len, shift, qmode, w ? w + b0 : w, p ? p + b0 : p, pa, pb, sums,
                   e_out ? e_out + b0 : e_out, nx, next > 0 ? next : nn, &nm);
        if (e_out) bm[b0 / BLK] = shift;
        mb = nm;
    }
    if (xn) *mn = mb;
}

/* range_stats for the job's qmode. mb: the max of the first block of x, or
 * NAN to have it found here. */
static void range_stats_any(const ctx *cx, const T *x, int64_t n, T mb, const T *w,
                            const T *p, fce_state *st, T *e_out, double *bm, const T *xn,
                            int64_t nn, T *mn)
{
    if (mb != mb) mb = block_max(x, n < BLK ? n : BLK);
    switch (cx->qmode) {
    case Q_ONE: range_stats(x, n, mb, Q_ONE, w, p, cx->pa, cx->pb, st, e_out, bm, xn, nn, mn); break;
    case Q_W: range_stats(x, n, mb, Q_W, w, p, cx->pa, cx->pb, st, e_out, bm, xn, nn, mn); break;
    case Q_P: range_stats(x, n, mb, Q_P, w, p, cx->pa, cx->pb, st, e_out, bm, xn, nn, mn); break;
    case Q_PW: range_stats(x, n, mb, Q_PW, w, p, cx->pa, cx->pb, st, e_out, bm, xn, nn, mn); break;
    default: range_stats(x, n, mb, Q_NONE, w, p, cx->pa, cx->pb, st, e_out, bm, xn, nn, mn); break;
    }
}

/* Non-temporal store of a full vector to VB-aligned p, where the ISA has one:
 * a large gradient goes to memory without first being read for ownership. */
#if !defined(FCE_ISA_IS_SCALAR) && \
    (defined(__AVX512F__) && VB == 64 || defined(__AVX__) && VB == 32 || defined(__SSE2__) && VB == 16)
#define HAVE_STREAM 1
static inline void store_stream(T *p, V v)
{
#if VB == 64 && FCE_DTYPE == 32
    _mm512_stream_ps(p, (__m512)v);
#elif VB == 64
    _mm512_stream_pd(p, (__m512d)v);
#elif VB == 32 && FCE_DTYPE == 32
    _mm256_stream_ps(p, (__m256)v);
#elif VB == 32
    _mm256_stream_pd(p, (__m256d)v);
#elif FCE_DTYPE == 32
    _mm_stream_ps(p, (__m128)v);
#else
    _mm_stream_pd(p, (__m128d)v);
#endif
}
static inline void stream_fence(void) { _mm_sfence(); }
#else
#define HAVE_STREAM 0
static inline void store_stream(T *p, V v) { storeu(p, v); }
static inline void stream_fence(void) {}
#endif

/* One vector of output at offset i (r valid lanes); adds its softmax values to
 * *mass. The softmax is exp((x - k) - ls), or e * f from exps kept by pass 2. */
FCE_INLINE V write_vec(const T *x, const T *ek, int64_t i, int64_t r, int qmode,
                       int log_softmax, const T *w, const T *p, T pa, T pb, V vk, V vls,
                       V vf, V vc1, V vc2, V *mass)
{
    if (log_softmax) return (loadn(x + i, r, -INFINITY) - vk) - vls;
    V e = ek ? loadn(ek + i, r, 0) * vf : vexp((loadn(x + i, r, -INFINITY) - vk) - vls);
    *mass += e;
    V o = vc1 * e;
    if (qmode != Q_NONE) o -= vc2 * qload(qmode, w + i, p + i, r, pa, pb);
    return o;
}

/* out[c] = c1 exp((x_c - k) - ls) - c2 q_c  (gradient), or (x_c - k) - ls (log-softmax).
 * Returns sum_c exp((x_c - k) - ls): the softmax mass written (folded into double
 * every 16 vectors). With `stream`, full aligned vectors use non-temporal stores. */
FCE_INLINE double write_run(const T *x, const T *ek, T f, T *out, int64_t n, int qmode,
                            int log_softmax, int stream, const T *w, const T *p, T pa, T pb,
                            T k, T ls, T c1, T c2)
{
    V vk = splat(k), vls = splat(ls), vf = splat(f), vc1 = splat(c1), vc2 = splat(c2);
    V mass = splat(0);
    VD total = widen(mass);
    int64_t i = 0;
#define WRITE_VEC(i, r) \
    write_vec(x, ek, i, r, qmode, log_softmax, w, p, pa, pb, vk, vls, vf, vc1, vc2, &mass)
    if (HAVE_STREAM && stream && (uintptr_t)out % sizeof(T) == 0) {
        int64_t head = (int64_t)(((uintptr_t)out / sizeof(T)) % L);
        head = head ? L - head : 0;
        if (head > n) head = n;
        if (head) storen(out, WRITE_VEC(0, head), head);
        total += widen(mass); /* the head's mass, even if no loop below runs */
        mass = splat(0);
        i = head;
        while (i + L <= n) {
            int64_t end = i + 16 * L < n ? i + 16 * L : n;
            for (; i + L <= end; i += L) store_stream(out + i, WRITE_VEC(i, L));
            total += widen(mass);
            mass = splat(0);
        }
    }
    while (i < n) {
        int64_t end = i + 16 * L < n ? i + 16 * L : n;
        for (; i < end; i += L) storen(out + i, WRITE_VEC(i, n - i), n - i);
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
FCE_INLINE double write_range(const T *x, const T *ek, T f, T *out, int64_t n, int64_t skip,
                              int qmode, int log_softmax, int stream, const T *w, const T *p,
                              T pa, T pb, T k, T ls, T c1, T c2)
{
    if (skip < 0 || skip >= n)
        return write_run(x, ek, f, out, n, qmode, log_softmax, stream, w, p, pa, pb, k, ls,
                         c1, c2);
    double m = write_run(x, ek, f, out, skip, qmode, log_softmax, stream, w, p, pa, pb, k, ls,
                         c1, c2);
    int64_t o = skip + 1;
    return m + write_run(x + o, ek ? ek + o : ek, f, out + o, n - o, qmode, log_softmax, stream,
                         w ? w + o : w, p ? p + o : p, pa, pb, k, ls, c1, c2);
}

static double write_range_any(const ctx *cx, const T *x, const T *ek, T f, T *out, int64_t n,
                              int64_t skip, const T *w, const T *p, T k, T ls, T c1, T c2)
{
    const int st = cx->stream;
    const T pa = cx->pa, pb = cx->pb;
    if (cx->op == FCE_OP_LOG_SOFTMAX)
        return write_range(x, NULL, 0, out, n, -1, Q_NONE, 1, st, w, p, pa, pb, k, ls, c1, c2);
    switch (cx->qmode) {
    case Q_ONE:
        return write_range(x, ek, f, out, n, skip, Q_ONE, 0, st, w, p, pa, pb, k, ls, c1, c2);
    case Q_W:
        return write_range(x, ek, f, out, n, skip, Q_W, 0, st, w, p, pa, pb, k, ls, c1, c2);
    case Q_P:
        return write_range(x, ek, f, out, n, skip, Q_P, 0, st, w, p, pa, pb, k, ls, c1, c2);
    case Q_PW:
        return write_range(x, ek, f, out, n, skip, Q_PW, 0, st, w, p, pa, pb, k, ls, c1, c2);
    default:
        return write_range(x, ek, f, out, n, skip, Q_NONE, 0, st, w, p, pa, pb, k, ls, c1, c2);
    }
}

/* ------------------------------------------------- per-sample finishing */

/* Everything a sample needs after its state is known. */
typedef struct sample {
    int ignored;
    int64_t y;
    double xy, a, k, ls, gs;   /* gs: the upstream gradient scale of this sample */
} sample;

/* 1 if any of the n logits at x[0], x[stride], ... is NaN */
static int any_nan(const T *x, int64_t stride, int64_t n)
{
    for (int64_t c = 0; c < n; c++)
        if (x[c * stride] != x[c * stride]) return 1;
    return 0;
}

/* Loss of sample number s with state st (and fills in smp for the write pass).
 * ls = log(st->s); x, stride: the sample's logits (read only in the rare +inf case). */
static double finish_sample(const ctx *cx, int64_t s, const fce_state *st, double ls,
                            sample *smp, const T *x, int64_t stride)
{
    const fce_job *job = cx->job;
    smp->k = fce_shift(st->m);
    smp->ls = ls;
    if (cx->op == FCE_OP_LOGSUMEXP) {
        /* a +inf logit: the sum is inf (not the NaN of inf - inf), unless a NaN is there */
        double lse = smp->k + smp->ls;
        if (st->m == INFINITY) lse = any_nan(x, stride, cx->C) ? NAN : INFINITY;
        ((T *)job->lse_out)[s] = (T)lse;
        return 0.0;
    }
    if (cx->op == FCE_OP_LOG_SOFTMAX) return 0.0;
    double loss = 0.0;
    if (cx->has_y)
        loss = smp->a * ((smp->k - smp->xy) + smp->ls);
    if (cx->qmode != Q_NONE)
        loss += cx->b * (st->d + st->q * smp->ls);
    if (cx->want_out) {
        if (cx->reduction == FCE_REDUCE_NONE)
            smp->gs = job->grad_output ? (double)((const T *)job->grad_output)[s] : 1.0;
        else
            smp->gs = cx->gscale;
    }
    if (job->loss_out) ((T *)job->loss_out)[s] = (T)loss;
    return loss;
}

/* Target and weight of sample s; returns 0 if ignored. */
static int sample_target(const ctx *cx, int64_t s, sample *smp)
{
    smp->ignored = 0;
    smp->y = 0;
    smp->xy = smp->k = smp->ls = 0.0;
    smp->gs = 1.0;
    smp->a = cx->a0;
    if (!cx->has_y) return 1;
    int64_t y = cx->job->target[s];
    smp->y = y;
    if (y == cx->job->ignore_index) {
        smp->ignored = 1;
        if (cx->job->loss_out) ((T *)cx->job->loss_out)[s] = 0;
        return 0;
    }
    if (cx->w) smp->a = cx->a0 * (double)cx->w[y];
    return 1;
}

/* The gradient of the target class, in double:
 *   gs (a (p_y - 1) + b (q p_y - q_y)).
 * p_y - 1 cancels when p_y ~ 1: there it is -(the softmax mass of the other
 * classes), summed while the other gradients were written; else expm1(z). */
static T target_grad(const ctx *cx, const sample *smp, double qsum, double others)
{
    double z = (smp->xy - smp->k) - smp->ls;
    double py = exp(z);
    double pym1 = py > 0.5 ? -others : expm1(z);
    double g = smp->a * pym1;
    if (cx->qmode != Q_NONE) {
        double qy = cx->w ? (double)cx->w[smp->y] : 1.0;
        g += cx->b * (qsum * pym1 + (qsum - qy));
    }
    return (T)(smp->gs * g);
}

/* ------------------------------------------------------- rows layout */

/* The output of a row whose pass-2 exps are kept in ek (block shifts in bm):
 * block b's softmax is ek * exp(shift(bm[b]) - lse), no exp recomputed. */
static double write_row_kept(const ctx *cx, const T *x, const T *ek, const double *bm,
                             T *out, int64_t n, int64_t skip, const T *w, const T *p,
                             const sample *smp, T c1, T c2)
{
    double mass = 0.0, lse = smp->k + smp->ls, m = NAN;
    T f = 0;
    for (int64_t b0 = 0; b0 < n; b0 += BLK) {
        int64_t len = n - b0 < BLK ? n - b0 : BLK;
        /* <= 1; a block of -inf next to finite logits contributes exactly 0 (not
         * 0 * exp(huge)), while a row of -inf or NaN gives NaN as torch does.
         * Blocks with the same shift (the running max) share one exp. */
        if (!(bm[b0 / BLK] == m)) {
            m = bm[b0 / BLK];
            f = m == -INFINITY && isfinite(lse) ? 0 : (T)exp(fce_shift(m) - lse);
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
                     T mb, const T *xn, int64_t nn, T *mn)
{
    const T *x = cx->x + r * cx->job->outer_stride;
    if (!sample_target(cx, r, smp)) {
        if (mn) *mn = NAN;
        return 0;
    }
    range_stats_any(cx, x, cx->C, mb, cx->w,
                    cx->p ? cx->p + r * cx->job->prob_outer_stride : NULL, st, ek, bm, xn, nn,
                    mn);
    /* read after the row, from cache: read before, it is a cache miss that holds
     * up the stream (about 3 % for rows of 128 KiB) */
    if (cx->has_y) smp->xy = (double)x[smp->y];
    return 1;
}

/* One whole row r (C <= SEG) with its output. Returns its loss. ek: scratch for
 * C exps, or NULL. */
static double row_one(const ctx *cx, int64_t r, T *ek)
{
    const fce_job *job = cx->job;
    const T *x = cx->x + r * job->outer_stride;
    const T *p = cx->p ? cx->p + r * job->prob_outer_stride : NULL;
    T *g = cx->g + r * job->grad_outer_stride;
    sample smp;
    fce_state st;
    double bm[SEG / BLK + 1];
    if (!row_state(cx, r, &smp, &st, ek, bm, NAN, NULL, 0, NULL)) {
        memset(g, 0, (size_t)cx->C * sizeof(T));
        return 0.0;
    }
    double loss = finish_sample(cx, r, &st, log(st.s), &smp, x, 1);
    double c1 = smp.gs * (smp.a + cx->b * st.q), c2 = smp.gs * cx->b;
    int target = cx->has_y && cx->op == FCE_OP_LOSS;
    int64_t skip = target ? smp.y : -1;
    double others =
        ek ? write_row_kept(cx, x, ek, bm, g, cx->C, skip, cx->w, p, &smp, (T)c1, (T)c2)
           : write_range_any(cx, x, NULL, 0, g, cx->C, skip, cx->w, p, (T)smp.k, (T)smp.ls,
                             (T)c1, (T)c2);
    if (target) g[smp.y] = target_grad(cx, &smp, st.q, others);
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
        const T *xn = r + 1 < N ? cx->x + (r + 1) * rs : NULL;
        sample smp;
        fce_state st;
        if (row_state(cx, r, &smp, &st, NULL, NULL, mb, xn, nn, &mb))
            acc += finish_sample(cx, r, &st, log(st.s), &smp, cx->x + r * rs, 1);
    }
    return acc;
}

/* ------------------------------------- columns layout (K-dim, small C) */

#define G (4 * L) /* positions per group: four vectors */

/* Up to G positions j = 0..J-1 of one outer index: element (c, j) at x[c*cs + j],
 * samples s0..s0+J-1. Probabilities at p[c*pcs + j], output at out[c*ocs + j].
 * Two passes over the C x G tile (max, then exp-sum), then the write pass. */
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
    for (int v = 0; v < 4; v++) k[v] = select(m[v] == -INFINITY, splat(0), m[v]);

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
                if (cx->want_out)
                    gs[i] = cx->reduction != FCE_REDUCE_NONE ? cx->gscale
                            : job->grad_output ? (double)((const T *)job->grad_output)[s0 + j]
                                               : 1.0;
            }
            if (v >= nv) continue;
            VD va, vxy, vls, vd, vq, vgs;
            VL ok;
            memcpy(&va, a, sizeof va);
            memcpy(&vxy, xy, sizeof vxy);
            memcpy(&vls, LS + v * L, sizeof vls);
            memcpy(&ok, valid, sizeof ok);
            VD vk = widen(k[v]);
            VD loss = va * ((vk - vxy) + vls);
            if (qmode != Q_NONE) {
                memcpy(&vd, D + v * L, sizeof vd);
                memcpy(&vq, Q + v * L, sizeof vq);
                loss += cx->b * (vd + vq * vls);
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
                VD c1 = vgs * (va + cx->b * vq), c2 = vgs * cx->b;
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
            C1[j] = (T)(smp[j].gs * (smp[j].a + cx->b * Q[j]));
            C2[j] = (T)(smp[j].gs * cx->b);
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

/* V of p[idx[i]], i < L: a gather where the ISA has one (a transposition
 * through memory would stall on store forwarding), else lane by lane. */
static inline V gather(const T *p, const int32_t *idx)
{
#if defined(__AVX512F__) && VB == 64 && FCE_DTYPE == 32
    return (V)_mm512_i32gather_ps(_mm512_loadu_si512(idx), p, 4);
#elif defined(__AVX512F__) && VB == 64
    return (V)_mm512_i32gather_pd(_mm256_loadu_si256((const __m256i *)idx), p, 8);
#elif defined(__AVX2__) && VB == 32 && FCE_DTYPE == 32
    return (V)_mm256_i32gather_ps(p, _mm256_loadu_si256((const __m256i *)idx), 4);
#elif defined(__AVX2__) && VB == 32
    return (V)_mm256_i32gather_pd(p, _mm_loadu_si128((const __m128i *)idx), 8);
#else
    V v;
    for (int64_t i = 0; i < L; i++) v[i] = p[idx[i]];
    return v;
#endif
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
        V k = select(m == -INFINITY, splat(0), m);
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
        VD loss = (VD)((VL)(va * ((widen(k) - vxy) + vls)) & ok);
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


/* ------------------------------------------------------------ drivers */

typedef void (*item_fn)(const ctx *cx, int64_t it, int tid);

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

/* rows layout, C <= SEG: rows [it*per_item, ...) */
static void item_rows(const ctx *cx, int64_t it, int tid)
{
    T *ek = cx->scratch ? cx->scratch + (int64_t)tid * cx->scratch_len : NULL;
    int64_t N = cx->job->n_outer;
    int64_t r0 = it * cx->per_item, r1 = r0 + cx->per_item < N ? r0 + cx->per_item : N;
    double acc = 0.0;
    const int64_t rs = cx->job->outer_stride;
    if (cx->C <= FCE_SMALL_C && !cx->want_out && cx->has_y && cx->qmode == Q_NONE &&
        (rs < 0 ? -rs : rs) <= INT32_MAX / L) {
        acc = rows_small_c_loss(cx, r0, r1);
    } else if (cx->C <= FCE_SMALL_C) {
        acc = rows_small_c(cx, r0, r1);
    } else if (!cx->g) {
        acc = rows_no_output(cx, r0, r1);
    } else {
        for (int64_t r = r0; r < r1; r++) acc += row_one(cx, r, ek);
    }
    if (cx->stream) stream_fence();
    cx->partials[it] = acc;
}

/* rows layout, C > SEG: the state of segment it % nseg of row it / nseg */
static void item_segment_stats(const ctx *cx, int64_t it, int tid)
{
    (void)tid;
    const fce_job *job = cx->job;
    int64_t r = it / cx->nseg, c0 = (it % cx->nseg) * cx->seg;
    int64_t len = cx->C - c0 < cx->seg ? cx->C - c0 : cx->seg;
    if (cx->has_y && job->target[r] == job->ignore_index) {
        cx->states[it] = (fce_state){-INFINITY, 0.0, 0.0, 0.0};
        return;
    }
    range_stats_any(cx, cx->x + r * job->outer_stride + c0, len, NAN, cx->w ? cx->w + c0 : NULL,
                    cx->p ? cx->p + r * job->prob_outer_stride + c0 : NULL, &cx->states[it],
                    NULL, NULL, NULL, 0, NULL);
}

/* rows layout, C > SEG: write the output of one segment */
static void item_segment_write(const ctx *cx, int64_t it, int tid)
{
    (void)tid;
    const fce_job *job = cx->job;
    int64_t r = it / cx->nseg, c0 = (it % cx->nseg) * cx->seg;
    int64_t len = cx->C - c0 < cx->seg ? cx->C - c0 : cx->seg;
    const sample *smp = &cx->smps[r];
    T *out = cx->g + r * job->grad_outer_stride + c0;
    cx->mass[it] = 0.0;
    if (smp->ignored) {
        memset(out, 0, (size_t)len * sizeof(T));
        return;
    }
    double q = cx->states[r * cx->nseg].q;
    double c1 = smp->gs * (smp->a + cx->b * q), c2 = smp->gs * cx->b;
    int64_t skip = cx->has_y && cx->op == FCE_OP_LOSS ? smp->y - c0 : -1;
    cx->mass[it] = write_range_any(cx, cx->x + r * job->outer_stride + c0, NULL, 0, out, len,
                                   skip,
                    cx->w ? cx->w + c0 : NULL,
                    cx->p ? cx->p + r * job->prob_outer_stride + c0 : NULL, (T)smp->k,
                    (T)smp->ls, (T)c1, (T)c2);
    if (cx->stream) stream_fence();
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

/* rows layout, C > SEG: merge row r's segment states in order, finish the row
 * (its loss goes to the partial of its first segment) */
static void finish_long_row(ctx *cx, int64_t r)
{
    const fce_job *job = cx->job;
    sample *smp = &cx->smps[r];
    fce_state *st = &cx->states[r * cx->nseg];
    for (int64_t i = 1; i < cx->nseg; i++) fce_state_merge(st, &st[i]);
    cx->partials[r * cx->nseg] = 0.0;
    if (!sample_target(cx, r, smp)) return;
    if (cx->has_y) smp->xy = (double)cx->x[r * job->outer_stride + smp->y];
    cx->partials[r * cx->nseg] =
        finish_sample(cx, r, st, log(st->s), smp, cx->x + r * job->outer_stride, 1);
}

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
    for (int64_t s = s0; s < s1; s++) {
        int64_t y = job->target[s];
        if (y == job->ignore_index) continue;
        if (y < 0 || y >= cx->C) {
            *bad_pos = s;
            *bad_val = y;
            return 0;
        }
        acc += cx->w ? (double)cx->w[y] : 1.0;
    }
    *wsum = acc;
    return 1;
}

int EXPORT(fce_run)(fce_job *job)
{
    ctx cx;
    memset(&cx, 0, sizeof cx);
    cx.job = job;
    cx.op = job->op;
    cx.reduction = job->reduction;
    cx.C = job->n_classes;
    cx.x = (const T *)job->x;
    cx.w = (const T *)job->weight;
    cx.p = (const T *)job->prob;
    cx.g = (T *)job->grad;
    cx.want_out = job->grad != NULL;
    /* a large output not aliasing the input: stream it past the caches */
    cx.stream = cx.want_out && job->grad != job->x &&
                job->n_outer * job->n_classes * job->n_inner * (int64_t)sizeof(T) >= FCE_STREAM_BYTES;
    cx.has_y = job->op == FCE_OP_LOSS && job->target != NULL;
    const int64_t C = cx.C, N = job->n_outer, D = job->n_inner;
    const int64_t n_samples = N * D;
    job->loss_reduced = 0.0;
    job->weight_total = 0.0;
    if (C <= 0) return FCE_ERR_ARG;

    if (job->op == FCE_OP_LOSS) {
        double eps = job->label_smoothing;
        if (cx.has_y) {
            cx.a0 = 1.0 - eps;
            cx.b = eps / (double)C;
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
        job->loss_reduced = job->reduction == FCE_REDUCE_MEAN ? NAN : 0.0;
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

    /* The mean's denominator must be known before gradients are written. */
    if (cx.has_y || cx.p) {
        int64_t bad_pos = 0, bad_val = 0;
        if (!check_targets(&cx, 0, n_samples, &job->weight_total, &bad_pos, &bad_val)) {
            job->bad_position = bad_pos;
            job->bad_value = bad_val;
            return FCE_ERR_TARGET;
        }
        cx.gscale = job->grad_output_scalar;
        if (job->reduction == FCE_REDUCE_MEAN) cx.gscale /= job->weight_total;
    }
    if (n_samples == 0) {
        job->loss_reduced = job->reduction == FCE_REDUCE_MEAN ? NAN : 0.0;
        return FCE_OK;
    }

    /* Work items: runs of whole rows, row segments, or (outer, position tile). */
    cx.seg = rows && C > SEG ? SEG : C;
    cx.nseg = (C + cx.seg - 1) / cx.seg;
    int64_t n_items;
    item_fn fn;
    if (rows && cx.nseg == 1) {
        cx.per_item = FCE_ITEM_ELEMS / C;
        if (C <= FCE_SMALL_C) cx.per_item = (cx.per_item + G - 1) / G * G;
        if (cx.per_item < 1) cx.per_item = 1;
        n_items = (N + cx.per_item - 1) / cx.per_item;
        fn = item_rows;
    } else if (rows) {
        n_items = N * cx.nseg;
        fn = item_segment_stats;
    } else {
        cx.per_item = FCE_ITEM_ELEMS / C;
        cx.per_item = cx.per_item < G ? G : cx.per_item / G * G;
        cx.tiles = (D + cx.per_item - 1) / cx.per_item;
        n_items = N * cx.tiles;
        fn = item_cols;
    }
    int nt = fce_pick_threads(job->n_threads, N * C * D, n_items);
    int status = FCE_OK;

    double stack_partials[64];
    cx.partials = n_items <= 64 ? stack_partials : malloc((size_t)n_items * sizeof(double));
    /* gradient of whole rows: keep pass 2's exps so the write pass needs none */
    if (fn == item_rows && C > FCE_SMALL_C && cx.want_out && cx.op == FCE_OP_LOSS) {
        cx.scratch_len = (C + 15) / 16 * 16; /* 64-byte multiples */
        cx.scratch = malloc((size_t)(nt * cx.scratch_len) * sizeof(T));
        if (!cx.scratch) {
            status = FCE_ERR_NOMEM;
            goto done;
        }
    }
    if (fn == item_segment_stats) {
        cx.states = malloc((size_t)n_items * sizeof(fce_state));
        cx.smps = malloc((size_t)N * sizeof(sample));
        cx.mass = malloc((size_t)n_items * sizeof(double));
    }
    if (!cx.partials || (fn == item_segment_stats && (!cx.states || !cx.smps || !cx.mass))) {
        status = FCE_ERR_NOMEM;
        goto done;
    }

    if (fn != item_segment_stats) {
        for_items(nt, 0, n_items, 0, fn, &cx);
    } else if (!cx.want_out) {
        for_items(nt, 0, n_items, 0, fn, &cx);
        for (int64_t r = 0; r < N; r++) finish_long_row(&cx, r);
    } else {
        /* With an output, a few rows at a time (about one segment per thread):
         * the write pass finds its segment still in the L2 of the thread that
         * read it (same static schedule), instead of reading it from memory again. */
        int64_t group = nt > cx.nseg ? nt / cx.nseg : 1;
        for (int64_t r0 = 0; r0 < N; r0 += group) {
            int64_t r1 = r0 + group < N ? r0 + group : N;
            for_items(nt, r0 * cx.nseg, r1 * cx.nseg, 1, item_segment_stats, &cx);
            for (int64_t r = r0; r < r1; r++) finish_long_row(&cx, r);
            for_items(nt, r0 * cx.nseg, r1 * cx.nseg, 1, item_segment_write, &cx);
            /* after every segment is written (out may alias x) */
            for (int64_t r = r0; r < r1 && cx.has_y && cx.op == FCE_OP_LOSS; r++) {
                if (cx.smps[r].ignored) continue;
                double others = 0.0;
                for (int64_t i = 0; i < cx.nseg; i++) others += cx.mass[r * cx.nseg + i];
                cx.g[r * job->grad_outer_stride + cx.smps[r].y] =
                    target_grad(&cx, &cx.smps[r], cx.states[r * cx.nseg].q, others);
            }
        }
    }

    double total = 0.0;
    for (int64_t it = 0; it < n_items; it += fn == item_segment_stats ? cx.nseg : 1)
        total += cx.partials[it];
    job->loss_reduced = job->reduction == FCE_REDUCE_MEAN ? total / job->weight_total : total;

done:
    if (cx.partials != stack_partials) free(cx.partials);
    free(cx.states);
    free(cx.smps);
    free(cx.mass);
    free(cx.scratch);
    return status;
}

void EXPORT(fce_exp)(const T *x, T *y, int64_t n)
{
    for (int64_t i = 0; i < n; i += L) storen(y + i, vexp(loadn(x + i, n - i, 0)), n - i);
}
