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
#define L ((int64_t)(VB / sizeof(T)))
/* L lanes of double: the dot products sum(q (k - x)) are accumulated in double
 * (their terms reach |k - x| ~ 100 for confident rows) */
typedef double VD __attribute__((vector_size(VB / sizeof(T) * sizeof(double))));
typedef int64_t VL __attribute__((vector_size(VB / sizeof(T) * sizeof(double))));

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
static inline V vselect(VI mask, V a, V b) { return (V)(((VI)a & mask) | ((VI)b & ~mask)); }

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
    return vselect(a > b, a, b);
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


/* A table lookup per lane: tab[idx & (TAB_N - 1)], TAB_N entries held in
 * registers (vpermps/vpermpd), for the table-driven exp. TAB_N is 0 where the
 * ISA has no such permute (the exp then uses a longer polynomial instead). */
#if defined(__AVX512F__) && VB == 64 && FCE_DTYPE == 32
#define TAB_N 16
static inline V tab_lookup(const T *tab, VI idx)
{
    return (V)_mm512_permutexvar_ps((__m512i)idx, _mm512_loadu_ps(tab));
}
#elif defined(__AVX512F__) && VB == 64
#define TAB_N 16
static inline V tab_lookup(const T *tab, VI idx)
{
    return (V)_mm512_permutex2var_pd(_mm512_loadu_pd(tab), (__m512i)idx, _mm512_loadu_pd(tab + 8));
}
#elif defined(__AVX2__) && VB == 32 && FCE_DTYPE == 32
#define TAB_N 8
static inline V tab_lookup(const T *tab, VI idx)
{
    return (V)_mm256_permutevar8x32_ps(_mm256_loadu_ps(tab), (__m256i)idx);
}
#else
#define TAB_N 0
#endif

#endif
