/* simd.h: the vector type of one kernel variant and the only intrinsics.
 *
 * Included once per (dtype, instruction set). The kernel is written with
 * GCC/Clang vector extensions over V, a vector of L lanes of T; the same source
 * becomes 1-lane scalar code, SSE2/NEON (16 bytes), AVX2 (32) or AVX-512 (64).
 * Everything an ISA does better than the generic code (masked loads and stores,
 * max, gathers, permutes, non-temporal stores) is a leaf function here, so the
 * paths above never name an intrinsic. */
#ifndef FCE_SIMD_H
#define FCE_SIMD_H

#define FCE_STR_(a) #a
#define FCE_STR(a) FCE_STR_(a)

#include <string.h>
#include "fce_dtype.h"
#include "fastce_internal.h"

#ifndef FCE_ISA
#error "compile with -DFCE_ISA=<name>"
#endif
#if defined(__x86_64__) && !defined(FCE_ISA_IS_SCALAR)
#include <immintrin.h>
#endif

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
typedef TU VU __attribute__((vector_size(VB)));
#define L ((int64_t)(VB / sizeof(T)))
/* L lanes of double: the dot products sum(q (k - x)) are accumulated in double
 * (their terms reach |k - x| ~ 100 for confident rows) */
typedef double VD __attribute__((vector_size(VB / sizeof(T) * sizeof(double))));
typedef int64_t VL __attribute__((vector_size(VB / sizeof(T) * sizeof(double))));

/* ---------------------------------------------------------------- vectors */

FCE_INLINE V splat(T a) { return (V){0} + a; }
FCE_INLINE V loadu(const T *p) { V v; memcpy(&v, p, sizeof v); return v; }
FCE_INLINE void storeu(T *p, V v) { memcpy(p, &v, sizeof v); }
/* the first n (possibly <= 0) lanes from p, the rest `fill` */
FCE_INLINE V loadn(const T *p, int64_t n, T fill)
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
FCE_INLINE void storen(T *p, V v, int64_t n)
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
/* a where the comparison mask is set, else b (lane-wise). The scalar variant picks
 * each lane with ?: instead of the bit select: GCC 12 (at least 12.2) miscompiles
 * the bit select of 1-lane vectors without -fwrapv. It folds (a & m) | (b & ~m) into
 * a VEC_COND_EXPR, lowers that (no 1-lane vector mode) into scalar code on
 * -(signed-boolean:32)cmp, a negation that overflows its 1-bit type, and value range
 * propagation then solves a branch on the same mask (vall in vtanh) under
 * overflow-is-undefined rules: vtanh's sech^2 took 1 - tanh^2 of the polynomial for
 * every lane past 0.5625 (softcap gradients off by several %). The ?: form is
 * folded to the comparison itself, before that lowering. */
FCE_INLINE V vselect(VI mask, V a, V b)
{
#if defined(FCE_ISA_IS_SCALAR)
    V r = b;
    for (int64_t i = 0; i < L; i++) r[i] = mask[i] ? a[i] : b[i];
    return r;
#else
    return (V)(((VI)a & mask) | ((VI)b & ~mask));
#endif
}

/* a where y == c, else b (lane-wise): a compare into a mask and a masked move */
FCE_INLINE V vselect_eq(VI y, TI c, V a, V b)
{
#if defined(__AVX512F__) && VB == 64 && FCE_DTYPE == 32
    return (V)_mm512_mask_mov_ps((__m512)b, _mm512_cmpeq_epi32_mask((__m512i)y, _mm512_set1_epi32(c)),
                                 (__m512)a);
#elif defined(__AVX512F__) && VB == 64
    return (V)_mm512_mask_mov_pd((__m512d)b, _mm512_cmpeq_epi64_mask((__m512i)y, _mm512_set1_epi64(c)),
                                 (__m512d)a);
#elif defined(__AVX2__) && VB == 32 && FCE_DTYPE == 32
    return (V)_mm256_blendv_ps((__m256)b, (__m256)a,
                               _mm256_castsi256_ps(_mm256_cmpeq_epi32((__m256i)y, _mm256_set1_epi32(c))));
#elif defined(__AVX2__) && VB == 32
    return (V)_mm256_blendv_pd((__m256d)b, (__m256d)a,
                               _mm256_castsi256_pd(_mm256_cmpeq_epi64((__m256i)y, _mm256_set1_epi64x(c))));
#else
    return vselect(y == c, a, b);
#endif
}

/* max(a, b) lane-wise; b when a is NaN (so NaN never becomes the max) */
/* 1 if every lane of the comparison mask m is set */
FCE_INLINE int vall(VI m)
{
#if defined(__AVX512F__) && VB == 64 && FCE_DTYPE == 32
    return _mm512_cmpeq_epi32_mask((__m512i)m, _mm512_set1_epi32(-1)) == 0xffff;
#elif defined(__AVX512F__) && VB == 64
    return _mm512_cmpeq_epi64_mask((__m512i)m, _mm512_set1_epi64(-1)) == 0xff;
#elif defined(__AVX2__) && VB == 32 && FCE_DTYPE == 32
    return _mm256_movemask_ps((__m256)m) == 0xff;
#elif defined(__AVX2__) && VB == 32
    return _mm256_movemask_pd((__m256d)m) == 0xf;
#elif defined(__SSE2__) && VB == 16 && FCE_DTYPE == 32
    return _mm_movemask_ps((__m128)m) == 0xf;
#elif defined(__SSE2__) && VB == 16
    return _mm_movemask_pd((__m128d)m) == 0x3;
#else
    TI all = -1;
    for (int64_t i = 0; i < L; i++) all &= m[i];
    return all == -1;
#endif
}

FCE_INLINE V vmax(V a, V b)
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
    return vselect(a > b, a, b);
#endif
}

/* horizontal max and sum as trees over halves (short dependency chains; the
 * order is fixed, so results do not depend on anything but the data) */
FCE_INLINE T hmax(V v)
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
/* vd = a in every lane (a loop GCC turns into one broadcast; (VD){0} + a goes
 * lane by lane through memory when VD is wider than a register) */
#define SPLATD(vd, a)                                              \
    do {                                                           \
        for (int64_t splatd_i_ = 0; splatd_i_ < L; splatd_i_++)    \
            (vd)[splatd_i_] = (a);                                 \
    } while (0)
/* the sum of the L double lanes of v as a tree over halves (lane i + lane i + L/2,
 * and so on), in registers: __builtin_shufflevector takes the halves */
#define FCE_LANES (VB / (FCE_DTYPE / 8))
typedef double VD8_ __attribute__((vector_size(64)));
typedef double VD4_ __attribute__((vector_size(32)));
typedef double VD2_ __attribute__((vector_size(16)));
#define HSUMD2_(v) ((v)[0] + (v)[1])
#define HSUMD4_(v) HSUMD2_(__builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3))
#define HSUMD8_(v)                                                                  \
    HSUMD4_(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7))
#if FCE_LANES == 16
#define HSUMD(v, out)                                                                      \
    do {                                                                                   \
        VD8_ hsum_h_ = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +              \
                       __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);          \
        (out) = HSUMD8_(hsum_h_);                                                          \
    } while (0)
#elif FCE_LANES == 8
#define HSUMD(v, out) ((out) = HSUMD8_(v))
#elif FCE_LANES == 4
#define HSUMD(v, out) ((out) = HSUMD4_(v))
#elif FCE_LANES == 2
#define HSUMD(v, out) ((out) = HSUMD2_(v))
#else
#define HSUMD(v, out) ((out) = (v)[0])
#endif

/* V of p[idx[i]], i < L: a gather where the ISA has one (a transposition
 * through memory would stall on store forwarding), else lane by lane. */
FCE_INLINE V gather(const T *p, const int32_t *idx)
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

/* Non-temporal store of a full vector to VB-aligned p, where the ISA has one:
 * a large gradient goes to memory without first being read for ownership. */
#if !defined(FCE_ISA_IS_SCALAR) && \
    (defined(__AVX512F__) && VB == 64 || defined(__AVX__) && VB == 32 || defined(__SSE2__) && VB == 16)
#define HAVE_STREAM 1
FCE_INLINE void store_stream(T *p, V v)
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
FCE_INLINE void store_stream(T *p, V v) { storeu(p, v); }
static inline void stream_fence(void) {}
#endif


/* ------------------------------------------- the logits as stored (XT, fce_dtype.h)
 * loadx, loadnx, storex, storenx, streamx: loadu, loadn, storeu, storen, store_stream
 * of the logits' storage type. For half-precision logits, L values of 16 bits are
 * widened to float in registers (F16C or AVX-512 conversions for float16, a shift
 * for bfloat16; elsewhere integer arithmetic on the bits, exact) and rounded back to
 * nearest even (overflow to inf, NaN quiet) as the gradient is stored. */
#if FCE_XHALF
typedef uint16_t VH __attribute__((vector_size(VB / 2))); /* L stored values */

/* a where the comparison mask m is set, else b, for unsigned lanes (through vselect:
 * the 1-lane form must avoid the bit select, see vselect) */
FCE_INLINE VU uselect(VI m, VU a, VU b) { return (VU)vselect(m, (V)a, (V)b); }

FCE_INLINE V half_widen(VH h)
{
    /* (the intrinsics where GCC 12 makes two half-width conversions of the generic form) */
#if FCE_XHALF == 2 && defined(__AVX512F__) && VB == 64
    return (V)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16);
#elif FCE_XHALF == 2 && defined(__AVX2__) && VB == 32
    return (V)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)h), 16);
#elif FCE_XHALF == 2
    return (V)(__builtin_convertvector(h, VU) << 16);
#elif defined(__AVX512F__) && VB == 64
    return (V)_mm512_cvtph_ps((__m256i)h);
#elif defined(__F16C__) && VB == 32
    return (V)_mm256_cvtph_ps((__m128i)h);
#else
    VU u = __builtin_convertvector(h, VU), em = u & 0x7fffu, sign = (u & 0x8000u) << 16;
    VU normal = (em << 13) + 0x38000000u, special = (em << 13) | 0x7f800000u;
    VU sub = (VU)(__builtin_convertvector((VI)em, V) * 0x1p-24f); /* em 2^-24, exact */
    VU r = uselect((VI)(em < 0x400u), sub, uselect((VI)(em >= 0x7c00u), special, normal));
    return (V)(r | sign);
#endif
}

FCE_INLINE VH half_round(V v)
{
#if FCE_XHALF == 2
    VU u = (VU)v;
    VU r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = uselect((VI)(v != v), (u >> 16) | 0x40u, r); /* NaN: quiet */
#if defined(__AVX512F__) && VB == 64
    return (VH)_mm512_cvtepi32_epi16((__m512i)r);
#elif defined(__AVX2__) && VB == 32
    return (VH)_mm_packus_epi32(_mm256_castsi256_si128((__m256i)r), _mm256_extracti128_si256((__m256i)r, 1));
#else
    return __builtin_convertvector(r, VH);
#endif
#elif defined(__AVX512F__) && VB == 64
    return (VH)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__F16C__) && VB == 32
    return (VH)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    /* as xt_put (fce_dtype.h), lane by lane */
    VU u = (VU)v, sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    VU norm = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
    norm = uselect((VI)(norm > 0x7c00u), norm * 0 + 0x7c00u, norm);
    VU sub = (VU)((V)a * 0x1p24f + 8388608.0f) - 0x4b000000u;
    VU h = uselect((VI)(a < 0x38800000u), sub, norm);
    h = uselect((VI)(a > 0x7f800000u), 0x7e00u | ((a >> 13) & 0x3ffu), h);
    return __builtin_convertvector(h | sign, VH);
#endif
}

FCE_INLINE V loadx(const XT *p)
{
    VH h;
    memcpy(&h, p, sizeof h);
    return half_widen(h);
}
FCE_INLINE void storex(XT *p, V v)
{
    VH h = half_round(v);
    memcpy(p, &h, sizeof h);
}
FCE_INLINE V loadnx(const XT *p, int64_t n, T fill)
{
    if (n >= L) return loadx(p);
    V v = splat(fill);
    for (int64_t i = 0; i < n; i++) v[i] = xt_get(p[i]);
    return v;
}
FCE_INLINE void storenx(XT *p, V v, int64_t n)
{
    if (n >= L) {
        storex(p, v);
        return;
    }
    VH h = half_round(v);
    for (int64_t i = 0; i < n; i++) p[i] = h[i];
}
/* non-temporal, to (L * 2)-byte aligned p */
FCE_INLINE void streamx(XT *p, V v)
{
#if HAVE_STREAM && VB == 64
    _mm256_stream_si256((__m256i *)p, (__m256i)half_round(v));
#elif HAVE_STREAM && VB == 32
    _mm_stream_si128((__m128i *)p, (__m128i)half_round(v));
#else
    storex(p, v);
#endif
}
#else
FCE_INLINE V loadx(const XT *p) { return loadu(p); }
FCE_INLINE void storex(XT *p, V v) { storeu(p, v); }
FCE_INLINE V loadnx(const XT *p, int64_t n, T fill) { return loadn(p, n, fill); }
FCE_INLINE void storenx(XT *p, V v, int64_t n) { storen(p, v, n); }
FCE_INLINE void streamx(XT *p, V v) { store_stream(p, v); }
#endif

/* Transpose of an L x L tile held in L vectors, in place: r[i][k] <-> r[k][i].
 * The small-C paths use it to bring L rows of up to 32 classes into class
 * vectors (lanes across rows) and back, with contiguous loads and stores where
 * gathers are slow (AMD Zen: microcoded). AVX-512: log2(L) stages, each swapping
 * the off-diagonal h x h blocks of the row pairs (i, i + h) with two-source
 * permutes (tables below); AVX2: the unpack/shuffle/permute2f128 network. */
#if defined(__AVX512F__) && VB == 64
/* stage s (h = L/2, ..., 1): row i takes tr_mask[2s], row i + h tr_mask[2s + 1],
 * indices 0..L-1 from row i and L..2L-1 from row i + h */
#if FCE_DTYPE == 32
static const int32_t tr_mask[8][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
    {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
    {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
    {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
    {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
    {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
    {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
    {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
};
#define TR_PERMX2(a, m, b) (V)_mm512_permutex2var_ps((__m512)(a), (m), (__m512)(b))
#else
static const int64_t tr_mask[6][8] = {
    {0, 1, 2, 3, 8, 9, 10, 11},
    {4, 5, 6, 7, 12, 13, 14, 15},
    {0, 1, 8, 9, 4, 5, 12, 13},
    {2, 3, 10, 11, 6, 7, 14, 15},
    {0, 8, 2, 10, 4, 12, 6, 14},
    {1, 9, 3, 11, 5, 13, 7, 15},
};
#define TR_PERMX2(a, m, b) (V)_mm512_permutex2var_pd((__m512d)(a), (m), (__m512d)(b))
#endif
FCE_INLINE void transpose_square(V *r)
{
#pragma GCC unroll 4
    for (int s = 0, h = (int)L / 2; h >= 1; s++, h /= 2) {
        __m512i mi = _mm512_loadu_si512(tr_mask[2 * s]), mj = _mm512_loadu_si512(tr_mask[2 * s + 1]);
#pragma GCC unroll 16
        for (int i = 0; i < (int)L; i++)
            if (!(i & h)) {
                V a = r[i], b = r[i + h];
                r[i] = TR_PERMX2(a, mi, b);
                r[i + h] = TR_PERMX2(a, mj, b);
            }
    }
}
#elif defined(__AVX2__) && VB == 32 && FCE_DTYPE == 32
FCE_INLINE void transpose_square(V *r)
{
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps((__m256)r[i], (__m256)r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps((__m256)r[i], (__m256)r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = (V)_mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = (V)_mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
#elif defined(__AVX2__) && VB == 32
FCE_INLINE void transpose_square(V *r)
{
    __m256d t0 = _mm256_unpacklo_pd((__m256d)r[0], (__m256d)r[1]);
    __m256d t1 = _mm256_unpackhi_pd((__m256d)r[0], (__m256d)r[1]);
    __m256d t2 = _mm256_unpacklo_pd((__m256d)r[2], (__m256d)r[3]);
    __m256d t3 = _mm256_unpackhi_pd((__m256d)r[2], (__m256d)r[3]);
    r[0] = (V)_mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = (V)_mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = (V)_mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = (V)_mm256_permute2f128_pd(t1, t3, 0x31);
}
#else
#define NO_FAST_TRANSPOSE 1 /* the lane loop below: slower than lane-by-lane loads */
FCE_INLINE void transpose_square(V *r)
{
    T a[L][L];
    memcpy(a, r, sizeof a);
    for (int64_t i = 0; i < L; i++)
        for (int64_t k = 0; k < L; k++) r[i][k] = a[k][i];
}
#endif

/* A table lookup per lane: tab[idx & (TAB_N - 1)], TAB_N entries held in
 * registers (vpermps/vpermpd), for the table-driven exp. TAB_N is 0 where the
 * ISA has no such permute (the exp then uses a longer polynomial instead). */
#if defined(__AVX512F__) && VB == 64 && FCE_DTYPE == 32
#define TAB_N 16
FCE_INLINE V tab_lookup(const T *tab, VI idx)
{
    return (V)_mm512_permutexvar_ps((__m512i)idx, _mm512_loadu_ps(tab));
}
#elif defined(__AVX512F__) && VB == 64
#define TAB_N 16
FCE_INLINE V tab_lookup(const T *tab, VI idx)
{
    return (V)_mm512_permutex2var_pd(_mm512_loadu_pd(tab), (__m512i)idx, _mm512_loadu_pd(tab + 8));
}
#elif defined(__AVX2__) && VB == 32 && FCE_DTYPE == 32
#define TAB_N 8
FCE_INLINE V tab_lookup(const T *tab, VI idx)
{
    return (V)_mm256_permutevar8x32_ps(_mm256_loadu_ps(tab), (__m256i)idx);
}
#else
#define TAB_N 0
#endif

#endif
