/* fce_dtype.h: the element type of one compilation of the kernel.
 *
 * Every file below the binding is compiled once per dtype (-DFCE_DTYPE=32|64);
 * the per-instruction-set files once per (dtype, ISA) as well. T is the type
 * computed in, TI the integer of the same width; XT the type the logits and the
 * gradient are stored in: T itself, or for half-precision logits (-DFCE_DTYPE=32
 * -DFCE_HALF=1 float16 | 2 bfloat16) their 16 bits, converted to float as they
 * are loaded and rounded to nearest even as the gradient is stored (every other
 * array of a job, weights, probabilities, losses, stays T). NAME(x) gives x a
 * per-dtype name (x_f32, x_f64, x_f16, x_bf16) and ISA_NAME(x) a per-(dtype, ISA)
 * one (x_f32_avx2). */
#ifndef FCE_DTYPE_H
#define FCE_DTYPE_H

#include <stdint.h>
#include <string.h>

#ifndef FCE_DTYPE
#error "compile with -DFCE_DTYPE=32 or 64"
#endif

#define FCE_CAT2_(a, b) a##_##b
#define FCE_CAT2(a, b) FCE_CAT2_(a, b)
#define FCE_CAT3_(a, b, c) a##_##b##_##c
#define FCE_CAT3(a, b, c) FCE_CAT3_(a, b, c)

#if FCE_DTYPE == 32
typedef float T;
typedef int32_t TI;
typedef uint32_t TU;  /* for bit arithmetic that may wrap (defined for unsigned) */
#if !defined(FCE_HALF) || FCE_HALF == 0
#define FCE_SFX f32
#elif FCE_HALF == 1
#define FCE_SFX f16
#elif FCE_HALF == 2
#define FCE_SFX bf16
#else
#error "FCE_HALF is 1 (float16) or 2 (bfloat16)"
#endif
#else
typedef double T;
typedef int64_t TI;
typedef uint64_t TU;
#define FCE_SFX f64
#endif
#if defined(FCE_HALF) && FCE_HALF != 0
#if FCE_DTYPE != 32
#error "half-precision logits are computed in float32: -DFCE_DTYPE=32"
#endif
#define FCE_XHALF FCE_HALF
typedef uint16_t XT;

/* One stored logit as T, exactly (every half value is a float). */
static inline T xt_get(XT h)
{
    uint32_t u = (uint32_t)h << 16, b;
#if FCE_XHALF == 1
    uint32_t sign = u & 0x80000000u, em = h & 0x7fffu;
    if (em >= 0x7c00u) {
        b = sign | 0x7f800000u | (em & 0x3ffu) << 13; /* inf, NaN (payload kept) */
    } else if (em >= 0x400u) {
        b = sign | ((em << 13) + 0x38000000u); /* normal: the exponent rebiased */
    } else {
        float f = (float)em * 0x1p-24f; /* subnormal or 0: em 2^-24, exact */
        memcpy(&b, &f, 4);
        b |= sign;
    }
#else
    b = u; /* bfloat16: the high half of a float */
#endif
    T f;
    memcpy(&f, &b, 4);
    return f;
}

/* T rounded to the nearest stored value, ties to even (overflow to inf, NaN kept). */
static inline XT xt_put(T f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
#if FCE_XHALF == 1
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu, h;
    if (a > 0x7f800000u) {
        h = 0x7e00u | ((a >> 13) & 0x3ffu); /* NaN, quiet, the payload's top bits */
    } else if (a >= 0x38800000u) {
        /* normal in half (>= 2^-14): the exponent rebiased, 13 bits rounded off; the
         * carry runs into the exponent and past 65504 into inf (clamped there) */
        h = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
        if (h > 0x7c00u) h = 0x7c00u;
    } else {
        /* subnormal or 0: |f| 2^24 rounded to an integer (< 2^11) by adding 2^23 */
        float m, fa;
        memcpy(&fa, &a, 4);
        m = fa * 0x1p24f + 8388608.0f;
        memcpy(&h, &m, 4);
        h -= 0x4b000000u;
    }
    return (XT)(sign | h);
#else
    if ((u & 0x7fffffffu) > 0x7f800000u) return (XT)((u >> 16) | 0x40u); /* NaN, quiet */
    return (XT)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}
#else
#define FCE_XHALF 0
typedef T XT;
#define xt_get(v) (v)
#define xt_put(v) (v)
#endif

#define NAME(name) FCE_CAT2(name, FCE_SFX)
#define ISA_NAME(name) FCE_CAT3(name, FCE_SFX, FCE_ISA)

#endif
