/* segments.h: rows longer than SEG, split into segments of SEG classes so that
 * threads share a row. Each segment's state is found on its own (the rows
 * stream's range_stats); the planner merges them in a fixed order and finishes
 * the row (fce_ctx.h); then each segment's output is written.
 * Included once per (dtype, instruction set) by fastce_kernel.c, after rows.h. */
#ifndef FCE_SEGMENTS_H
#define FCE_SEGMENTS_H

#include "rows.h"

/* rows layout, C > SEG: the state of segment it % nseg of row it / nseg */
static void item_segment_stats(const ctx *cx, int64_t it, int tid)
{
    (void)tid;
    const fce_job *job = cx->job;
    int64_t r = it / cx->nseg, c0 = (it % cx->nseg) * cx->seg;
    int64_t len = cx->C - c0 < cx->seg ? cx->C - c0 : cx->seg;
    if (cx->op == FCE_OP_LOSS && cx->has_y && job->target[r] == job->ignore_index &&
        !job->lse_out) {
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
    XT *out = cx->g + r * job->grad_outer_stride + c0;
    cx->mass[it] = 0.0;
    if (smp->ignored) {
        memset(out, 0, (size_t)len * sizeof(XT));
        return;
    }
    double q = cx->states[r * cx->nseg].q;
    double c1 = GRAD_C1(smp->gs, smp->a, cx->b, q), c2 = GRAD_C2(smp->gs, cx->b);
    if (cx->z != 0.0) c1 += GRAD_CZ(smp->gs, smp->zc);
    int64_t skip = cx->has_y && cx->op == FCE_OP_LOSS ? smp->y - c0 : -1;
    cx->mass[it] = write_range_any(cx, cx->x + r * job->outer_stride + c0, NULL, 0, out, len,
                                   skip, cx->w ? cx->w + c0 : NULL,
                                   cx->p ? cx->p + r * job->prob_outer_stride + c0 : NULL,
                                   (T)smp->k, (T)smp->ls, (T)c1, (T)c2);
    if (cx->stream) stream_fence();
}

#endif
