/* Shared between the kernel variants and the dispatcher; not part of the API. */
#ifndef FASTCE_INTERNAL_H
#define FASTCE_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include "fastce.h"

#if defined(__GNUC__) || defined(__clang__)
#define FCE_INLINE static inline __attribute__((always_inline))
#else
#define FCE_INLINE static inline
#endif

/* Work partition, fixed by the shape alone (never by the thread count), so
 * that every reduction sums the same partials in the same order. */
#define FCE_ITEM_ELEMS 32768      /* logits per work item (rows path) */
#define FCE_SEG_BYTES (512 * 1024) /* longer rows are split into segments */
#define FCE_STREAM_BYTES (8 << 20) /* outputs this large bypass the caches, */
#define FCE_STREAM_ROW_BYTES (16 << 10) /* when their rows are at least this long */

/* One kernel variant per (dtype, instruction set): its paths (fce_ctx.h), as a
 * table the planner calls through. */
struct fce_paths_f32;
struct fce_paths_f64;
struct fce_paths_f16;
struct fce_paths_bf16;
#define FCE_DECLARE_VARIANT(isa)                              \
    extern const struct fce_paths_f32 fce_paths_f32_##isa;    \
    extern const struct fce_paths_f64 fce_paths_f64_##isa;    \
    extern const struct fce_paths_f16 fce_paths_f16_##isa;    \
    extern const struct fce_paths_bf16 fce_paths_bf16_##isa;

FCE_DECLARE_VARIANT(scalar)
#if defined(__x86_64__) || defined(_M_X64)
#define FCE_X86 1
FCE_DECLARE_VARIANT(sse2)
FCE_DECLARE_VARIANT(avx2)
FCE_DECLARE_VARIANT(avx512)
#elif defined(__aarch64__)
#define FCE_ARM64 1
FCE_DECLARE_VARIANT(neon)
#endif

/* Tuning of the paths that is chosen per CPU at run time, not per ISA. */
typedef struct {
    int prefetch;       /* software prefetch in the rows stream: 0 none, 1 PF_BYTES ahead */
    int small_c_gather; /* small C: rows into class vectors by gathers (1) or transposes (0) */
} fce_tuning;

/* The variant and tuning in use (fastce_dispatch.c). */
const struct fce_paths_f32 *fce_current_paths_f32(void);
const struct fce_paths_f64 *fce_current_paths_f64(void);
const struct fce_paths_f16 *fce_current_paths_f16(void);
const struct fce_paths_bf16 *fce_current_paths_bf16(void);
const fce_tuning *fce_current_tuning(void);

/* Threads to use for a job touching `elems` logits (n_threads <= 0: choose). */
int fce_pick_threads(int n_threads, int64_t elems, int64_t n_items);

#endif
