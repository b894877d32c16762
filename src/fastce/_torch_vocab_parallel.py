"""fastce.torch.vocab_parallel_cross_entropy: the loss of logits whose classes are
split over the processes of a torch.distributed group (tensor-parallel training).

Each rank holds ``(N, V_r)`` logits, the classes ``[start_r, start_r + V_r)`` of rows
of ``V = sum(V_r)`` classes, ranks in order. Forward: one pass of fastce's kernel over
the local shard gives each sample's state (:func:`fastce.lse_partial`); an all-reduce
MAX of the row maxima, then (states rescaled to that max) one all-reduce SUM of the
sums of exps, the target logit and the smoothing terms, makes the state of the whole
rows on every rank; the loss follows from it (:func:`fastce.shard_cross_entropy`),
the same on every rank. Backward: one pass over the local shard writes its gradient
(:func:`fastce.shard_cross_entropy_with_grad`), with no communication. Before the
reductions, one small all-gather checks that the ranks agree (rows, targets) and
gives each rank its class range.
"""

import numpy as np
import torch
import torch.distributed as dist

import fastce as _fastce
from fastce._core import _rescale_states

from ._torch_common import (_HALF_DTYPES, _empty_grad, _loss_to_tensor, _np, _result_dtype,
                            _to_numpy, _validate)

_N_INPUTS = 13  # the arguments of _VocabParallelFunction.forward after ctx


def _collective(fn, what, *args, **kwargs):
    """Run a torch.distributed collective; a failure (a rank that died, or did not
    call, past the group's timeout) as a RuntimeError saying so."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError, OSError) as err:
        raise RuntimeError(
            "fastce.torch.vocab_parallel_cross_entropy: the %s over the process group "
            "failed (%s: %s); every rank of the group must call it with its shard of the "
            "same rows; a rank may have died or not called it before the group's timeout "
            "(or the group's backend cannot take CPU tensors: gloo can)"
            % (what, type(err).__name__, err)) from err


def _local_check(x, t, options):
    """This rank's arguments checked as the kernel's calls will check them, on no rows
    (the weight's shape excepted: it needs every rank's width). Returns the exception,
    or None."""
    try:
        o = options
        _fastce.lse_partial(x[:0], t[:0], num_classes=x.shape[1], ignore_index=o["ignore_index"],
                            label_smoothing=o["label_smoothing"], logit_scale=o["logit_scale"],
                            softcap=o["softcap"])
        _fastce.cross_entropy(x[:0], t[:0], reduction=o["reduction"], z_loss=o["z_loss"],
                              ignore_index=o["ignore_index"])
    except (TypeError, ValueError) as err:
        return err
    return None


def _shard_layout(x, t, group, num_classes, options):
    """(class_start, num_classes) of this rank's shard, after checking with every rank
    that the arguments are good and the rows and targets agree (an all-gather of
    (N, V_r, a checksum of the targets, an error flag)); an error on every rank if not
    (this rank's own, or a ValueError naming the ranks whose checks failed)."""
    n, width = x.shape
    err = _local_check(x, t, options)
    mix = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    check = int((t.astype(np.uint64) * mix).sum(dtype=np.uint64) & np.uint64(2 ** 62 - 1))
    mine = torch.tensor([n, width, check, err is not None], dtype=torch.int64)
    world = dist.get_world_size(group)
    every = [torch.empty(4, dtype=torch.int64) for _ in range(world)]
    _collective(dist.all_gather, "all-gather of the shards' shapes", every, mine, group=group)
    if err is not None:
        raise err
    failed = [r for r, e in enumerate(every) if int(e[3])]
    if failed:
        raise ValueError(
            "fastce.torch.vocab_parallel_cross_entropy: the arguments of rank(s) %s failed "
            "their checks (their error says why); this rank's were good" % failed)
    rows = [int(e[0]) for e in every]
    widths = [int(e[1]) for e in every]
    if len(set(rows)) != 1:
        raise ValueError(
            "fastce.torch.vocab_parallel_cross_entropy: the ranks hold different numbers of "
            "rows: %s (rank: rows); every rank must hold the same rows, its own classes"
            % dict(enumerate(rows)))
    if len({int(e[2]) for e in every}) != 1:
        raise ValueError(
            "fastce.torch.vocab_parallel_cross_entropy: the ranks were given different "
            "targets; every rank must pass the same target (class indices into all %d "
            "classes)" % sum(widths))
    total = sum(widths)
    if num_classes is not None and num_classes != total:
        raise ValueError(
            "fastce.torch.vocab_parallel_cross_entropy: the shards' widths %s (rank: "
            "classes) add up to %d classes, but num_classes=%d"
            % (dict(enumerate(widths)), total, num_classes))
    rank = dist.get_rank(group)
    return sum(widths[:rank]), total


def _combined_state(x, t, w, group, start, total, options):
    """The state of the whole rows, on every rank: this shard's, then all-reduce MAX
    of the maxima and SUM of the rescaled states."""
    st = _fastce.lse_partial(
        x, t, class_start=start, num_classes=total, weight=w,
        ignore_index=options["ignore_index"], label_smoothing=options["label_smoothing"],
        logit_scale=options["logit_scale"], softcap=options["softcap"])
    m = torch.from_numpy(np.ascontiguousarray(st[:, 0]))
    _collective(dist.all_reduce, "all-reduce (max) of the row maxima", m,
                op=dist.ReduceOp.MAX, group=group)
    _rescale_states(st, m.numpy())
    _collective(dist.all_reduce, "all-reduce (sum) of the row states", torch.from_numpy(st),
                op=dist.ReduceOp.SUM, group=group)
    st[:, 0] = m.numpy()
    return st


def _forward(input, target, weight, group, num_classes, options, return_z_loss, return_lse):
    """(loss, extras, state, class_start, num_classes, 2-D logits, flat targets, weight)"""
    x = _np(input)
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
    t = _to_numpy(target).reshape(-1)
    w = None if weight is None else _to_numpy(weight)
    start, total = _shard_layout(x2, t, group, num_classes, options)
    st = _combined_state(x2, t, w, group, start, total, options)
    result = _fastce.shard_cross_entropy(
        x2, t, st, class_start=start, num_classes=total, weight=w,
        return_z_loss=return_z_loss, return_lse=return_lse, **_loss_options(options))
    loss, *extras = result if return_z_loss or return_lse else (result,)
    return loss, extras, st, start, total, x2, t, w


def _loss_options(options):
    return {k: options[k] for k in ("ignore_index", "reduction", "label_smoothing", "z_loss",
                                     "logit_scale", "softcap")}


def _sample_shape(input):
    return tuple(input.shape[:-1])


def _as_output(value, input, per_sample):
    out = _loss_to_tensor(value, _result_dtype(input.dtype))
    return out.reshape(_sample_shape(input)) if per_sample else out


def _as_outputs(loss, extras, input, reduction, return_z_loss):
    """The loss, the z-loss part and the lse (None where not asked) as tensors shaped as
    the call's: per sample for reduction "none", and the lse always."""
    none = reduction == "none"
    loss = _as_output(loss, input, none)
    zpart = _as_output(extras.pop(0), input, none) if return_z_loss else None
    lse = _as_output(extras.pop(0), input, True) if extras else None
    return loss, zpart, lse


class _VocabParallelFunction(torch.autograd.Function):
    """Forward: state, all-reduce, loss. Backward: the local shard's gradient."""

    @staticmethod
    def forward(ctx, input, target, weight, group, num_classes, ignore_index, reduction,
                label_smoothing, z_loss, logit_scale, softcap, return_z_loss, return_lse):
        options = dict(ignore_index=ignore_index, reduction=reduction,
                       label_smoothing=label_smoothing, z_loss=z_loss,
                       logit_scale=logit_scale, softcap=softcap)
        loss, extras, st, start, total, _, _, _ = _forward(
            input, target, weight, group, num_classes, options, return_z_loss, return_lse)
        ctx.state, ctx.start, ctx.total, ctx.options = st, start, total, options
        ctx.save_for_backward(input, target, weight)
        loss, zpart, lse = _as_outputs(loss, extras, input, reduction, return_z_loss)
        ctx.mark_non_differentiable(*(e for e in (zpart, lse) if e is not None))
        return loss, zpart, lse

    @staticmethod
    def backward(ctx, grad_output, _grad_zpart=None, _grad_lse=None):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fastce.torch.vocab_parallel_cross_entropy does not support double backward "
                "(create_graph=True): its gradient has no graph")
        if not ctx.needs_input_grad[0]:
            return (None,) * _N_INPUTS
        input, target, weight = ctx.saved_tensors
        x = _np(input)
        x2 = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
        # the gradient in input's dtype; a float32 one, rounded after, where bfloat16 is
        # read through a float32 copy (no ml_dtypes)
        copied = input.dtype in _HALF_DTYPES and x2.dtype == np.float32
        grad = _empty_grad(x2.shape, torch.float32 if copied else input.dtype)
        go = _to_numpy(grad_output.contiguous()).reshape(-1) \
            if ctx.options["reduction"] == "none" else float(grad_output.item())
        _fastce.shard_cross_entropy_with_grad(
            x2, _to_numpy(target).reshape(-1), ctx.state, class_start=ctx.start,
            num_classes=ctx.total, weight=None if weight is None else _to_numpy(weight),
            grad_output=go, out=_np(grad), **_loss_options(ctx.options))
        if copied:
            grad = grad.to(input.dtype)
        return (grad.reshape(input.shape),) + (None,) * (_N_INPUTS - 1)


def vocab_parallel_cross_entropy(local_logits, target, group=None, *, weight=None,
                                 ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                 z_loss=0.0, return_z_loss=False, return_lse=False,
                                 logit_scale=1.0, softcap=None, num_classes=None):
    """Cross-entropy of logits whose classes are split over a torch.distributed group.

    Every rank of ``group`` (default: the world) calls it with its shard of the same
    rows: ``local_logits`` of shape ``(..., V_r)``, the classes
    ``[V_0 + ... + V_{r-1}, ... + V_r)`` of rows of ``V = sum(V_r)`` classes (ranks in
    order, widths may differ), and the same ``target`` ``(...)`` of class indices in
    ``[0, V)`` (or ``ignore_index``). Returns the loss of the whole rows, the same on
    every rank and equal to ``fastce.torch.cross_entropy`` of the gathered logits to
    rounding; its backward gives each rank the gradient of its own shard (no
    communication). CPU tensors, float32/float64/float16/bfloat16 (half precision computed
    in float32: a float32 loss, the gradient rounded once to the shard's dtype),
    class-index targets; any backend
    with all_reduce and all_gather (gloo on CPUs). Forward costs one all-gather of 3
    integers per rank, an all-reduce MAX of N doubles and an all-reduce SUM of 8 N.

    ``weight`` (``(V,)``, every class's, the same on every rank), ``ignore_index``,
    ``reduction``, ``label_smoothing``, ``z_loss``, ``return_z_loss``, ``return_lse``,
    ``logit_scale``, ``softcap``: as in :func:`fastce.torch.cross_entropy`.
    ``num_classes``: if given, the shards' widths must add up to it.

    Errors: a rank whose arguments fail their checks (a shard of no classes, a bad
    option) raises its own error and every other rank a ``ValueError`` naming it; ranks
    whose rows or targets differ, or whose widths do not add up to ``num_classes``,
    raise ``ValueError`` on every rank; a collective that fails (a rank that died, or
    did not call in time: the group's ``timeout``) raises ``RuntimeError`` naming it,
    not a hang beyond that timeout.

    Example (each of 2 processes, after ``torch.distributed.init_process_group("gloo")``)::

        local = full_logits[:, rank * V // 2:(rank + 1) * V // 2].requires_grad_()
        loss = fastce.torch.vocab_parallel_cross_entropy(local, target)
        loss.backward()   # local.grad: this rank's columns of the full gradient
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fastce.torch.vocab_parallel_cross_entropy needs torch.distributed initialized: "
            "call torch.distributed.init_process_group (e.g. backend='gloo') first")
    _validate(local_logits, target, weight, "fastce.torch.vocab_parallel_cross_entropy",
              half=True)
    if target.is_floating_point():
        raise TypeError("vocab_parallel_cross_entropy takes class-index targets; probability "
                        "targets are not supported")
    if local_logits.dim() < 1:
        raise ValueError("local_logits must have a class axis (its last), got a 0-d tensor")
    if tuple(target.shape) != _sample_shape(local_logits):
        raise ValueError(
            "target must have shape %s (local_logits' shape without its class axis, the "
            "last), got %s" % (_sample_shape(local_logits), tuple(target.shape)))
    if num_classes is not None:
        if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes,
                                                                     (int, np.integer)):
            raise TypeError("num_classes must be an int or None, got %r" % (num_classes,))
        num_classes = int(num_classes)
    extras = return_z_loss is not False or return_lse is not False
    if torch.is_grad_enabled() and local_logits.requires_grad:
        loss, zpart, lse = _VocabParallelFunction.apply(
            local_logits, target, weight, group, num_classes, ignore_index, reduction,
            label_smoothing, z_loss, logit_scale, softcap, return_z_loss, return_lse)
        if not extras:
            return loss
        return (loss,) + tuple(e for e in (zpart, lse) if e is not None)
    options = dict(ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=label_smoothing, z_loss=z_loss, logit_scale=logit_scale,
                   softcap=softcap)
    loss, rest, *_ = _forward(local_logits, target, weight, group, num_classes, options,
                              return_z_loss, return_lse)
    loss, zpart, lse = _as_outputs(loss, rest, local_logits, reduction, return_z_loss)
    if not extras:
        return loss
    return (loss,) + tuple(e for e in (zpart, lse) if e is not None)
