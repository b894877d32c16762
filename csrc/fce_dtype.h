/* fce_dtype.h: the element type of one compilation of the kernel.
 *
 * Every file below the binding is compiled once per dtype (-DFCE_DTYPE=32|64);
 * the per-instruction-set files once per (dtype, ISA) as well. T is the logits'
 * type, TI the integer of the same width; NAME(x) gives x a per-dtype name
 * (x_f32, x_f64) and ISA_NAME(x) a per-(dtype, ISA) one (x_f32_avx2). */
#ifndef FCE_DTYPE_H
#define FCE_DTYPE_H

#include <stdint.h>

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
#define FCE_SFX f32
#else
typedef double T;
typedef int64_t TI;
typedef uint64_t TU;
#define FCE_SFX f64
#endif
#define NAME(name) FCE_CAT2(name, FCE_SFX)
#define ISA_NAME(name) FCE_CAT3(name, FCE_SFX, FCE_ISA)

#endif
