/* fastce_kernel.c: one kernel variant, the paths of one (dtype, instruction set).
 *
 * Compiled once per (dtype, ISA) by setup.py, with -DFCE_DTYPE=32|64 (and for
 * half-precision logits -DFCE_HALF=1|2, fce_dtype.h: the rows paths only)
 * -DFCE_ISA=<name> and that ISA's flags (csrc/variants.txt). It holds no logic of
 * its own: the paths are in rows.h (rows stream), segments.h (long rows) and
 * cols.h (K-dim and small C), built on simd.h (the vector type and the only
 * intrinsics) and vmath.h (exp, log); the per-sample maths is in fce_ctx.h.
 * The ISA-neutral planner (fastce_planner.c, compiled once per dtype) checks the
 * job, partitions it and calls these paths through the table exported here. */
#include "fce_dtype.h"
#if !FCE_XHALF
#include "cols.h"
#else
/* half-precision logits: the rows stream only (the planner refuses other layouts) */
#define G 1
#endif
#include "segments.h"

static void exp_n(const T *x, T *y, int64_t n)
{
    for (int64_t i = 0; i < n; i += L) storen(y + i, vexp(loadn(x + i, n - i, 0)), n - i);
}

#if FCE_XHALF
static void widen_n(const XT *h, T *x, int64_t n)
{
    for (int64_t i = 0; i < n; i += L) storen(x + i, loadnx(h + i, n - i, 0), n - i);
}

static void round_n(const T *x, XT *h, int64_t n)
{
    for (int64_t i = 0; i < n; i += L) storenx(h + i, loadn(x + i, n - i, 0), n - i);
}
#endif

const paths ISA_NAME(fce_paths) = {
    .lanes = L,
    .group = G,
#if !FCE_XHALF
    .rows_small_c_loss = item_rows_small_c_loss,
    .rows_small_c_grad = item_rows_small_c_grad,
    .rows_small_c = item_rows_small_c,
#endif
    .rows_no_output = item_rows_no_output,
    .rows_with_output = item_rows_with_output,
    .segment_stats = item_segment_stats,
    .segment_write = item_segment_write,
#if !FCE_XHALF
    .cols = item_cols,
#endif
    .exp = exp_n,
    .xform1 = xform1,
#if FCE_XHALF
    .widen = widen_n,
    .round = round_n,
#endif
};
