/* fastce: fused softmax cross-entropy kernels (plain C11, no Python headers).
 *
 * One job description (fce_job) tells a kernel where the logits are, what the
 * targets are and what to produce; one entry point per dtype runs it on the
 * instruction set chosen at run time (see fastce_dispatch.c).
 *
 * Geometry. Logits are viewed as (n_outer, n_classes, n_inner):
 *   element (n, c, j) lives at x + n*outer_stride + c*class_stride + j*inner_stride
 * (strides in elements, signed, 64-bit). A "sample" is a pair (n, j); samples
 * are numbered n*n_inner + j, and every per-sample array (index targets, the
 * per-sample loss, grad_output, log-sum-exp output) is contiguous in that order.
 * Two layouts are supported by the kernels:
 *   rows:    n_inner == 1 and class_stride == 1     ((N, C) with any row stride)
 *   columns: inner_stride == 1, n_classes <= 1024  ((N, C, D) K-dim input)
 * The binding brings any other layout to one of these with at most one copy.
 */
#ifndef FASTCE_H
#define FASTCE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FCE_OK = 0,
    FCE_ERR_TARGET = 1,   /* a class index outside [0, C) that is not ignore_index */
    FCE_ERR_NOMEM = 2,    /* scratch allocation failed */
    FCE_ERR_ARG = 3,      /* inconsistent job (a bug in the caller) */
    FCE_ERR_ISA = 4       /* requested instruction set not available */
} fce_status;

typedef enum {
    FCE_REDUCE_NONE = 0,
    FCE_REDUCE_SUM = 1,
    FCE_REDUCE_MEAN = 2
} fce_reduction;

typedef enum {
    FCE_OP_LOSS = 0,        /* cross-entropy loss (and optionally its gradient) */
    FCE_OP_LOGSUMEXP = 1,   /* per-sample log-sum-exp over the classes -> lse_out */
    FCE_OP_LOG_SOFTMAX = 2, /* x - logsumexp(x) -> out (same geometry as grad) */
    FCE_OP_STATE = 3        /* the log-sum-exp state of a class shard -> state_out */
} fce_op;

/* Layout limits the caller plans with (the binding: _core.pyx reads them from here).
 * Rows of at most FCE_SMALL_C classes take the small-C paths (vectorised across rows);
 * the half-precision kernels (FCE_HALF) take only rows of more classes, in the rows
 * layout, unsharded. K-dim inputs of more than FCE_COLS_MAX_C classes are not read in
 * place (the columns layout keeps a C x 4-vector tile in cache): the caller transposes. */
enum {
    FCE_SMALL_C = 32,
    FCE_COLS_MAX_C = 1024
};

/* Vocabulary shards. A job may cover classes [class_offset, class_offset + n_classes)
 * of rows of n_classes_total classes (rows layout, class-index targets): FCE_OP_STATE
 * writes each sample's state over its shard; fce_state_combine merges the shards'
 * states; FCE_OP_LOSS with state_in then gives the loss of the whole rows and this
 * shard's gradient. A state is FCE_STATE_LEN doubles per sample: */
enum {
    FCE_ST_M = 0,   /* the largest logit (NaN ignored; -inf if none finite) */
    FCE_ST_S,       /* sum of exp(z - k), k = M, or 0 if M is -inf */
    FCE_ST_D,       /* sum of q_c (k - z_c) (smoothing; q_c the class weight or 1) */
    FCE_ST_Q,       /* sum of q_c */
    FCE_ST_N,       /* the part of S from shards that do not hold the target */
    FCE_ST_T,       /* the target's logit z_y in the shard that holds it, else 0 */
    FCE_ST_H,       /* 1 in the shard that holds the target, else 0 */
    FCE_ST_NAN,     /* 1 if a logit is NaN, else 0 */
    FCE_STATE_LEN
};
/* z as the job's logit transform makes it (below); every field but M, S, D, Q, N adds
 * over shards; with all states taken to one M (fce_state_rescale), all but M do. */

typedef struct {
    /* what to compute */
    int op;                    /* fce_op */
    int reduction;             /* fce_reduction (FCE_OP_LOSS only) */

    /* logits */
    const void *x;
    int64_t n_outer, n_classes, n_inner;
    int64_t outer_stride, class_stride, inner_stride;

    /* targets: exactly one of target / prob is set for FCE_OP_LOSS */
    const int64_t *target;     /* n_outer*n_inner class indices, contiguous */
    int64_t ignore_index;
    const void *prob;          /* probabilities: same dtype and geometry as x */
    int64_t prob_outer_stride, prob_class_stride, prob_inner_stride;

    const void *weight;        /* (n_classes,) per-class weights of x's dtype, or NULL */
    double label_smoothing;    /* in [0, 1] */
    double z_loss;             /* >= 0: adds z_loss * w * lse^2 per sample (w: the target's
                                  class weight, 1 without weights or for probabilities) */
    /* the logit transform, applied as logits are read (no transformed copy is made):
     *   z = logit_scale * x, then with softcap > 0: z = softcap * tanh(z / softcap);
     * every output (loss, lse, log-softmax) is of z, the gradient is d/dx. */
    double logit_scale;        /* finite > 0; 0 is taken as 1 (a zeroed job has none) */
    double softcap;            /* finite > 0, or 0 for none */

    /* outputs */
    void *loss_out;            /* per-sample loss (x's dtype), or NULL */
    double loss_reduced;       /* out: the "sum"/"mean" result in double */
    double weight_total;       /* out: the mean's denominator */

    void *grad;                /* gradient / log-softmax output, or NULL; may equal x */
    int64_t grad_outer_stride, grad_class_stride, grad_inner_stride;
    const void *grad_output;   /* per-sample upstream gradient (x's dtype) for
                                  reduction "none", or NULL for ones */
    double grad_output_scalar; /* upstream gradient for "sum"/"mean" */

    void *lse_out;             /* per-sample log-sum-exp (x's dtype), contiguous, or NULL:
                                  the output of FCE_OP_LOGSUMEXP; with FCE_OP_LOSS, every
                                  sample's (ignored ones included) when not NULL, and then
                                  the z-loss part too: */
    void *z_out;               /* FCE_OP_LOSS with lse_out: the per-sample z-loss term
                                  z_loss w lse^2 (x's dtype; 0 where ignored), or NULL */
    double z_reduced;          /* out, FCE_OP_LOSS with lse_out: the z-loss part reduced
                                  as the loss ("sum": its sum; "mean": over the loss's
                                  denominator), from the lses written */

    /* vocabulary shards (see above): n_classes_total 0 for an unsharded job; targets
     * index the whole range, weight has n_classes_total entries, smoothing spreads over
     * them all */
    int64_t class_offset, n_classes_total;
    double *state_out;         /* FCE_OP_STATE: FCE_STATE_LEN doubles per sample */
    const double *state_in;    /* FCE_OP_LOSS of a shard: the combined states; x is read
                                  only for the gradient (may be NULL without one) */

    int n_threads;             /* <= 0: let the kernel choose */

    /* error report */
    int64_t bad_position;      /* sample number of the first bad target */
    int64_t bad_value;         /* its value */
} fce_job;

/* Run a job on the instruction set currently selected. */
int fce_run_f32(fce_job *job);
int fce_run_f64(fce_job *job);
/* Half-precision logits (IEEE float16, bfloat16), computed in float32: x and grad
 * hold 16-bit values (the gradient and log-softmax rounded to nearest even), every
 * other array (prob, weight, loss_out, grad_output, lse_out, z_out) is float32.
 * The rows layout with n_classes > 32 only, unsharded (FCE_ERR_ARG otherwise: the
 * caller computes those from a float32 copy). */
int fce_run_f16(fce_job *job);
int fce_run_bf16(fce_job *job);

/* Shard states (FCE_STATE_LEN doubles per sample). combine: out[s] = the merge of
 * states[0][s], ..., states[n_states - 1][s] in that order (states: n_states runs of
 * n_samples states; out may be states[0]). rescale: each state taken to the max m[s]
 * (m[s] >= its own M), so that summing the rescaled states of every shard field by
 * field (M excepted: it is m) is their merge, as an all-reduce does it. */
void fce_state_combine(const double *states, int64_t n_states, int64_t n_samples, double *out);
void fce_state_rescale(double *states, int64_t n_samples, const double *m);

/* Instruction sets: names "scalar", "sse2", "avx2", "avx512", "neon".
 * fce_isa_best() is the fastest variant for this CPU (not always the widest). */
int fce_isa_count(void);
const char *fce_isa_name(int index);        /* compiled-in ISA number index */
int fce_isa_supported(int index);           /* 1 if this CPU/OS can run it */
int fce_isa_best(void);
int fce_isa_current(void);
int fce_isa_select(int index);              /* FCE_OK or FCE_ERR_ISA */
const char *fce_isa_reason(void);           /* why fce_isa_best() was chosen, in words */
/* Per-CPU tuning knobs ("prefetch": the rows stream's software prefetch;
 * "small_c_gather": small C by gathers rather than transposes), chosen with the
 * variant; a knob can be forced to 0 or 1, or back to the choice with -1. */
int fce_tuning_count(void);
const char *fce_tuning_name(int index);
int fce_tuning_select(int index, int value); /* FCE_OK or FCE_ERR_ARG */
int fce_tuning_current(int index);

/* Threads: the OpenMP runtime and the default thread count. */
int fce_openmp_enabled(void);
int fce_max_threads(void);
/* 1 in a process forked after a threaded call: every call then runs on one thread
 * (libgomp's pool does not survive fork; entering it would hang). */
int fce_forked_single(void);

/* The vectorised exp, exposed for accuracy tests: y[i] = exp(x[i]) for x <= 0
 * (results below the smallest normal number are flushed to 0). */
void fce_exp_f32(const float *x, float *y, int64_t n);
void fce_exp_f64(const double *x, double *y, int64_t n);
/* The half-precision kernels' conversions, exposed for tests: widen, n stored values
 * to float (exact); round, n floats to the nearest stored value, ties to even. */
void fce_widen_f16(const uint16_t *h, float *x, int64_t n);
void fce_round_f16(const float *x, uint16_t *h, int64_t n);
void fce_widen_bf16(const uint16_t *h, float *x, int64_t n);
void fce_round_bf16(const float *x, uint16_t *h, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
