"""PyTorch front end for fastce (CPU tensors only).

This module is imported only when it is used (``import fastce.torch``), so
PyTorch stays an optional dependency of :mod:`fastce`.  Inside it,
``import torch`` is an absolute import and therefore loads the real PyTorch,
not this module.

It provides drop-in replacements for :func:`torch.nn.functional.cross_entropy`
and :class:`torch.nn.CrossEntropyLoss` that compute the loss (and, when
needed, the gradient) with fastce's kernels.  Tensors are shared with NumPy
through ``tensor.detach().numpy()``: contiguous tensors are never copied, and
non-contiguous ones are handed over as strided views, which fastce reads in
place.

Design (what happens under autograd)
------------------------------------
* If no gradient is needed (grad mode off, or ``input.requires_grad`` false)
  only :func:`fastce.cross_entropy` runs: no autograd node, no gradient work.
* Otherwise the gradient is computed *in the forward pass*, fused with the
  loss in one sweep over the logits (:func:`fastce.cross_entropy_with_grad`,
  written straight into a fresh buffer (NumPy-allocated, for huge pages) through ``out=``), the way
  GPU cross-entropy kernels do it.  What is kept for backward is that
  gradient (plus, for ``reduction="none"`` with class-index targets, a
  boolean mask of the ignored samples: N bytes) and references to the inputs
  (no copies), so that a second backward through a retained graph can
  recompute the gradient (see below).
* ``reduction="mean"``/``"sum"``: the saved gradient is already
  d(loss)/d(input) (scaled by 1/denominator for ``"mean"``).  Backward
  multiplies it by the scalar ``grad_output``; when ``grad_output`` is exactly
  1 (the usual ``loss.backward()``) the saved buffer itself is handed to the
  caller, with no extra pass over memory: the node drops its reference, so the
  caller owns what it receives (scaling it in place harms nothing), and a
  second backward (``retain_graph=True``) recomputes the gradient from the
  inputs, bit for bit the same.
* ``reduction="none"``: ``grad_output`` (one value per sample) is unknown in
  the forward pass.  Each per-sample loss depends only on its own row of
  logits, so the gradient of ``sum(grad_output * loss)`` is row ``i`` of the
  gradient computed with ``grad_output = ones`` times ``grad_output[i]``.
  The forward pass therefore computes that per-sample gradient (the fused
  kernel with its default ones), and backward multiplies it by
  ``grad_output`` broadcast along the class axis: an elementwise product
  instead of recomputing the softmax.  Ignored samples have an all-zero
  gradient row; their ``grad_output`` is zeroed first so that a non-finite
  ``grad_output`` there still gives 0, as in PyTorch.  (The alternative,
  keeping the logits and calling ``cross_entropy_with_grad(grad_output=...)``
  in backward, would hold just as much memory and run the exp/log pass
  twice.)
* The backward is once-differentiable: double backward (``create_graph=True``,
  e.g. a gradient penalty) raises :class:`RuntimeError` rather than returning a
  gradient without a graph, and so do ``torch.func`` transforms (``vmap``,
  ``grad``), whose wrapped tensors have no memory to read. The gradient is
  that of the inputs as they were at forward time.

Policies
--------
* Devices: only CPU tensors are accepted; any other device (``cuda``,
  ``meta``, ...) raises :class:`RuntimeError` naming the device.  There is no
  silent fallback to :func:`torch.nn.functional.cross_entropy`.
* Dtypes: ``input`` is ``torch.float32``, ``torch.float64``, ``torch.float16``
  or ``torch.bfloat16``.  Half precision is computed in float32 (the tensor's
  memory read as stored, widened in registers, for rows of more than 32 classes;
  bfloat16 needs ``ml_dtypes`` for that, else torch makes a float32 copy first):
  the loss, z part and lse are **float32 tensors**,
  deliberately not rounded to the input's precision as PyTorch rounds them
  (its bfloat16 loss moves in steps of 0.25 near 36; ``loss.to(input.dtype)``
  gives that rounding, with its gradient, if wanted); the gradient has
  ``input``'s dtype, rounded once from float32.  Compared with torch's own
  half-precision CPU cross_entropy the loss and the gradient are more exact
  (tests/test_half.py).  The vocabulary-parallel loss takes half shards the same
  way; the fused linear loss stages half input / weight / bias in float32 (torch
  converts them; float32 GEMMs), returns a float32 loss and rounds each gradient once
  to the input's dtype.  Class-index targets
  may have any integer dtype (PyTorch itself wants ``int64`` or ``uint8``).
* Gradients: only with respect to ``input``.  A ``weight`` that requires grad
  raises (as PyTorch does) and so does a probability ``target`` that requires
  grad (PyTorch would differentiate it; fastce does not) -- both as
  :class:`NotImplementedError`, a subclass of :class:`RuntimeError`, the
  type PyTorch raises.  Detach them to proceed.
* Validation of shapes, dtypes and option values is fastce's own; the
  exception types are those of :func:`fastce.cross_entropy` (see its
  docstring), which for class indices out of range is :class:`IndexError`
  like PyTorch's.
"""

import numpy as np
import torch

import fastce as _fastce

__all__ = ["cross_entropy", "CrossEntropyLoss", "vocab_parallel_cross_entropy",
           "linear_cross_entropy", "LinearCrossEntropyLoss"]

from ._torch_common import (_FLOAT_DTYPES, _HALF_DTYPES, _check_cpu,  # noqa: F401
                            _empty_grad, _float32_copy, _half_view, _is_functorch_wrapped,
                            _loss_to_tensor, _np, _outputs, _result_dtype, _to_numpy,
                            _validate)


def _loss_and_grad(input, target, weight, inplace, **options):
    """The fused forward+backward: (loss, gradient tensor of input's dtype, extras).
    Half-precision input is computed in float32 and its gradient rounded once to input's
    dtype: read and written as stored by the half kernels (fastce.cross_entropy_with_grad
    on its NumPy view), or without ml_dtypes for bfloat16 through a float32 copy (torch's
    own conversion); inplace writes the gradient over input's storage."""
    t, w = _np(target), _np(weight)
    if input.dtype in _HALF_DTYPES and _half_view(input) is None:
        # one float32 buffer: the logits converted into it, the gradient written over them
        g32 = _float32_copy(input)
        x32 = g32.numpy()
        loss, _, *extras = _fastce.cross_entropy_with_grad(x32, t, weight=w, out=x32, **options)
        grad = input.detach().copy_(g32) if inplace else g32.to(input.dtype)
        return loss, grad, extras
    x = _np(input)
    if inplace:
        # the gradient over the logits' own storage (checked by the caller: a
        # C-contiguous non-leaf)
        grad, out = input.detach(), x
    else:
        # a fresh C-contiguous buffer that receives the gradient
        grad = _empty_grad(input.shape, input.dtype)
        out = _np(grad)
    loss, _, *extras = _fastce.cross_entropy_with_grad(x, t, weight=w, out=out, **options)
    return loss, grad, extras


def _check_inplace(input):
    if input.is_leaf:
        raise RuntimeError(
            "inplace_backward=True would overwrite input with its gradient, but input "
            "is a leaf tensor (e.g. a parameter or a tensor created with "
            "requires_grad=True); use inplace_backward=False")
    if not input.is_contiguous():
        raise RuntimeError(
            "inplace_backward=True writes the gradient over input, which must be "
            "C-contiguous; got strides %s for shape %s (use inplace_backward=False, "
            "or input.contiguous())" % (tuple(input.stride()), tuple(input.shape)))


_N_INPUTS = 12  # the arguments of _CrossEntropyFunction.forward after ctx


class _CrossEntropyFunction(torch.autograd.Function):
    """Autograd node: fused loss+gradient forward, cheap scaling backward."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction,
                label_smoothing, inplace_backward, z_loss, return_z_loss, return_lse,
                logit_scale, softcap):
        loss, grad, extras = _loss_and_grad(
            input, target, weight, inplace_backward, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            return_z_loss=return_z_loss, return_lse=return_lse, logit_scale=logit_scale,
            softcap=softcap)
        if inplace_backward:
            # the logits' version is bumped, so any other node that saved them for its
            # backward refuses to run (torch's in-place check)
            torch.autograd.graph.increment_version(input)
        ctx.inplace = inplace_backward
        ctx.reduction = reduction
        ctx.class_dim = 0 if input.dim() == 1 else 1
        ctx.options = dict(ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing, z_loss=z_loss,
                           logit_scale=logit_scale, softcap=softcap)
        # The gradient is kept as an attribute, not a saved tensor, so that a backward
        # may hand it to the caller (see backward); the inputs are saved (no copy) so
        # that a later backward through a retained graph can recompute it.
        ctx.grad = grad
        if not inplace_backward:
            ctx.save_for_backward(input, target, weight)
        ctx.ignored = None
        if reduction == "none" and not target.is_floating_point():
            # Mask of ignored samples, shaped like the per-sample loss
            # (compared in NumPy: no overflow for unsigned targets).
            ctx.ignored = torch.from_numpy(np.asarray(_to_numpy(target) == ignore_index))
        # the z-loss part and the lse are outputs without a gradient (None if not asked)
        return _outputs(ctx, loss, extras, _result_dtype(input.dtype), return_z_loss,
                        return_lse)

    @staticmethod
    def backward(ctx, grad_output, _grad_zpart=None, _grad_lse=None):
        if torch.is_grad_enabled():
            # create_graph=True: the gradient would come back without a graph, and a
            # gradient penalty built on it would be silently dropped
            raise RuntimeError(
                "fastce.torch.cross_entropy does not support double backward "
                "(create_graph=True, e.g. for a gradient penalty): its gradient is "
                "computed in the forward pass and has no graph; use "
                "torch.nn.functional.cross_entropy for that loss")
        if not ctx.needs_input_grad[0]:
            return (None,) * _N_INPUTS
        grad = ctx.grad
        if grad is None and ctx.inplace:
            raise RuntimeError(
                "fastce.torch.cross_entropy(inplace_backward=True) was backpropagated "
                "twice: its gradient overwrote the logits and was handed to the first "
                "backward, so there is nothing to recompute it from; use "
                "inplace_backward=False with retain_graph=True")
        if grad is None:
            # A second backward through a retained graph, after the first one handed the
            # gradient over: recompute it from the inputs as they were at forward time
            # (saved_tensors raises if they were modified in place since).
            input, target, weight = ctx.saved_tensors
            grad = _loss_and_grad(input, target, weight, False, **ctx.options)[1]
            ctx.grad = grad
        if ctx.inplace:
            # the buffer is the (former) logits: scaled in place and handed over, so the
            # step allocates nothing of the logits' size
            ctx.grad = None
            if ctx.reduction != "none":
                if grad_output.item() != 1.0:
                    grad.mul_(grad_output)
            else:
                go = grad_output
                if ctx.ignored is not None:
                    go = go.masked_fill(ctx.ignored, 0)
                grad.mul_(go.unsqueeze(1) if ctx.class_dim == 1 else go)
            return (grad,) + (None,) * (_N_INPUTS - 1)
        if ctx.reduction != "none":
            if grad_output.item() == 1.0:
                # The usual loss.backward(): hand the buffer itself to the caller, who
                # owns it from now on (it may scale it in place); this node keeps no
                # reference and recomputes if it is run again (retain_graph=True).
                ctx.grad = None
                g = grad
            else:
                g = grad * grad_output
        else:
            go = grad_output
            if ctx.ignored is not None:
                go = go.masked_fill(ctx.ignored, 0)
            if ctx.class_dim == 1:
                go = go.unsqueeze(1)
            g = grad * go
        return (g,) + (None,) * (_N_INPUTS - 1)


def cross_entropy(input, target, weight=None, ignore_index=-100,
                  reduction="mean", label_smoothing=0.0, *, inplace_backward=False,
                  z_loss=0.0, return_z_loss=False, return_lse=False, logit_scale=1.0,
                  softcap=None):
    """Softmax cross-entropy of CPU tensors, like ``torch.nn.functional.cross_entropy``.

    Same arguments and result as :func:`torch.nn.functional.cross_entropy`
    (without the deprecated ``size_average``/``reduce``), computed by fastce.
    ``input`` is ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``, float32,
    float64, float16 or bfloat16; ``target`` holds class indices (shape ``()``,
    ``(N,)`` or ``(N, d1, ..., dk)``) or class probabilities (``input``'s shape).
    Returns a tensor of ``input``'s dtype (float32 for float16/bfloat16 input,
    see the module docstring): 0-d for ``"mean"``/``"sum"``, one
    value per sample for ``"none"``.  Differentiable with respect to
    ``input`` only; the gradient is computed in the forward pass, fused with
    the loss (see the module docstring).  CPU tensors only (others raise
    ``RuntimeError``).

    ``inplace_backward=True`` (the name flash-attention and quack use) writes
    the gradient over ``input``'s own storage during the forward pass, saving
    an ``input``-sized allocation per step, for training loops that do not
    need the logits after the loss. ``input`` must then be a C-contiguous
    non-leaf tensor (a leaf, e.g. a parameter, raises ``RuntimeError``); after
    the call it holds the gradient, not the logits. Its version counter is
    bumped, so a node that saved the logits for its own backward raises
    torch's "modified by an inplace operation" error rather than computing a
    wrong gradient; and the graph can be backpropagated once only. Without a
    gradient to compute (grad mode off, ``input.requires_grad`` false) the
    option does nothing.

    ``z_loss``, ``return_z_loss``, ``return_lse``: as in
    :func:`fastce.cross_entropy` (the z-loss ``z_loss * weight[target] *
    lse**2`` is added per sample and differentiated with the loss). With
    either flag the result is a tuple ``(loss, z_part)``, ``(loss, lse)`` or
    ``(loss, z_part, lse)``; ``z_part`` (for logging: the loss already
    includes it) and ``lse`` (one per sample, ignored ones too) carry no
    gradient.

    ``logit_scale``, ``softcap``: as in :func:`fastce.cross_entropy`, the
    logits taken as ``softcap * tanh(logit_scale * input / softcap)`` (or
    ``logit_scale * input`` without a softcap) inside the kernel, no
    transformed copy made; the gradient is with respect to ``input``.

    Example
    -------
    >>> import torch, fastce.torch
    >>> logits = torch.tensor([[1.2, 0.5, -1.0], [0.3, 1.8, -0.5]],
    ...                       requires_grad=True)
    >>> labels = torch.tensor([0, 1])
    >>> loss = fastce.torch.cross_entropy(logits, labels)
    >>> round(loss.item(), 4)
    0.3774
    >>> loss.backward()
    >>> torch.allclose(logits.grad, torch.autograd.grad(
    ...     torch.nn.functional.cross_entropy(logits, labels), logits)[0])
    True
    """
    _validate(input, target, weight, half=True)
    if not isinstance(inplace_backward, bool):
        raise TypeError("inplace_backward must be True or False, got %r" % (inplace_backward,))
    extras = return_z_loss is not False or return_lse is not False
    if torch.is_grad_enabled() and input.requires_grad:
        if inplace_backward:
            _check_inplace(input)
        loss, zpart, lse = _CrossEntropyFunction.apply(
            input, target, weight, ignore_index, reduction, label_smoothing,
            inplace_backward, z_loss, return_z_loss, return_lse, logit_scale, softcap)
        if not extras:
            return loss
        return (loss,) + tuple(e for e in (zpart, lse) if e is not None)
    result = _fastce.cross_entropy(
        _np(input), _np(target), weight=_np(weight),
        ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, return_z_loss=return_z_loss,
        return_lse=return_lse, logit_scale=logit_scale, softcap=softcap)
    dtype = _result_dtype(input.dtype)
    if not extras:
        return _loss_to_tensor(result, dtype)
    return tuple(_loss_to_tensor(r, dtype) for r in result)


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in replacement for :class:`torch.nn.CrossEntropyLoss` (CPU).

    Same constructor as :class:`torch.nn.CrossEntropyLoss`:
    ``CrossEntropyLoss(weight=None, size_average=None, ignore_index=-100,
    reduce=None, reduction="mean", label_smoothing=0.0)``, plus fastce's
    keywords ``inplace_backward``, ``z_loss``, ``return_z_loss``,
    ``return_lse``, ``logit_scale`` and ``softcap`` (see :func:`cross_entropy`).  The deprecated
    ``size_average``/``reduce`` are turned into ``reduction`` exactly as
    PyTorch does (``torch.nn._reduction.legacy_get_string``, with its
    warning).  ``weight`` is registered as a buffer (so it follows
    ``state_dict()`` and ``.to()``).  ``forward(input, target)`` calls
    :func:`fastce.torch.cross_entropy`.

    Example
    -------
    >>> import torch, fastce.torch
    >>> criterion = fastce.torch.CrossEntropyLoss()
    >>> logits = torch.tensor([[1.2, 0.5, -1.0], [0.3, 1.8, -0.5]])
    >>> round(criterion(logits, torch.tensor([0, 1])).item(), 4)
    0.3774
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "inplace_backward",
                     "z_loss", "return_z_loss", "return_lse", "logit_scale", "softcap"]

    def __init__(self, weight=None, size_average=None, ignore_index=-100,
                 reduce=None, reduction="mean", label_smoothing=0.0, *,
                 inplace_backward=False, z_loss=0.0, return_z_loss=False, return_lse=False,
                 logit_scale=1.0, softcap=None):
        super().__init__()
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.z_loss = z_loss
        self.return_z_loss = return_z_loss
        self.return_lse = return_lse
        if size_average is not None or reduce is not None:
            from torch.nn import _reduction
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, input, target):
        return cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            inplace_backward=self.inplace_backward, z_loss=self.z_loss,
            return_z_loss=self.return_z_loss, return_lse=self.return_lse,
            logit_scale=self.logit_scale, softcap=self.softcap)

    def extra_repr(self):
        extra = "".join(", %s=%r" % (k, getattr(self, k)) for k, default in (
            ("inplace_backward", False), ("z_loss", 0.0), ("return_z_loss", False),
            ("return_lse", False), ("logit_scale", 1.0), ("softcap", None))
            if getattr(self, k) != default)
        return "reduction=%r, ignore_index=%r, label_smoothing=%r%s" % (
            self.reduction, self.ignore_index, self.label_smoothing, extra)


# the vocabulary-parallel loss over torch.distributed (its own module; it uses the
# helpers above)
from ._torch_vocab_parallel import vocab_parallel_cross_entropy  # noqa: E402
# the fused linear cross-entropy (its own module; it uses the helpers above)
from ._torch_linear import LinearCrossEntropyLoss, linear_cross_entropy  # noqa: E402
