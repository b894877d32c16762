"""fastce.torch.linear_cross_entropy and LinearCrossEntropyLoss: the loss of a linear
layer's output (an LM head) without its (N, V) logits, under autograd.

The gradients are computed in the forward pass, chunk by chunk of tokens, with the loss
(fastce.linear_cross_entropy_with_grad's chunked pass, with torch's GEMMs on torch's
threads, grad_weight accumulated by addmm_; fastce's kernel in place over each chunk's
logits), as Liger-Kernel does: nothing of size N x V is saved
for backward, only the gradients (of hidden, linear_weight and linear_bias, for those
that require one) and references to the inputs. Backward scales them by the scalar
upstream gradient (none when it is 1, the usual ``loss.backward()``: the buffers are
handed over). For ``reduction="none"`` the per-token upstream gradient is not known in
the forward: the forward computes the loss alone and backward runs the chunked pass
with it (the logits' GEMM once more).
"""
import numpy as np
import torch

from . import linear as _linear
from ._torch_common import (_HALF_DTYPES, _check_cpu, _loss_to_tensor, _outputs,
                            _result_dtype, _to_numpy)

_N_INPUTS = 15  # the arguments of _LinearCrossEntropyFunction.forward after ctx


class _TorchGemm:
    """The GEMMs of the chunked pass through torch (its threads, as the caller set
    them), on the NumPy arrays' memory: mm: out = a @ b; mm_add: out += a @ b in one
    GEMM (addmm_, BLAS's beta = 1: no extra pass over grad_weight per chunk)."""

    @staticmethod
    def mm(a, b, out):
        torch.matmul(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))

    @staticmethod
    def mm_add(a, b, out):
        torch.from_numpy(out).addmm_(torch.from_numpy(a), torch.from_numpy(b))


def _validate(input, linear_weight, target, linear_bias, weight):
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target),
                    ("linear_bias", linear_bias), ("weight", weight)):
        if t is None and name in ("linear_bias", "weight"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(t).__name__))
        _check_cpu(name, t)
    for name, t in (("input", input), ("linear_weight", linear_weight),
                    ("linear_bias", linear_bias)):
        if t is not None and t.dtype not in (torch.float32, torch.float64) + _HALF_DTYPES:
            raise TypeError("fastce.torch.linear_cross_entropy expects %s of dtype "
                            "torch.float32, torch.float64, torch.float16 or torch.bfloat16, "
                            "got %s" % (name, t.dtype))
    if input.dtype != linear_weight.dtype or (linear_bias is not None and
                                              linear_bias.dtype != input.dtype):
        raise TypeError("input, linear_weight and linear_bias must have the same dtype, got "
                        "%s" % ", ".join(str(t.dtype) for t in (input, linear_weight, linear_bias)
                                         if t is not None))
    if torch.is_grad_enabled() and ((weight is not None and weight.requires_grad) or
                                    target.requires_grad):
        raise NotImplementedError(
            "fastce.torch.linear_cross_entropy is not differentiable with respect to weight "
            "or target; pass them detached")


def _staged(t):
    """A tensor as the chunked pass reads it: half precision converted to float32 by
    torch (the pass runs in float32; backward rounds its gradients to the input's dtype
    once, after any scaling by the upstream gradient)."""
    if t is None:
        return None
    return _to_numpy(t.detach().float() if t.dtype in _HALF_DTYPES else t)


def _numpy_args(input, linear_weight, target, linear_bias, weight):
    return (_staged(input), _staged(linear_weight), _to_numpy(target), _staged(linear_bias),
            None if weight is None else _to_numpy(weight))


def _tensor(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Forward: the chunked pass (with the gradients unless reduction is "none");
    backward: a scaling, or the chunked pass with the per-token upstream gradient."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, ignore_index,
                reduction, label_smoothing, z_loss, logit_scale, softcap, chunk_size,
                memory_budget, return_z_loss, return_lse):
        h, W, t, b, w = _numpy_args(input, linear_weight, target, linear_bias, weight)
        ctx.options = dict(weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing, z_loss=z_loss,
                           logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size,
                           memory_budget=memory_budget)
        need = ctx.needs_input_grad
        ctx.input_dtype = input.dtype
        ctx.need = (bool(need[0]), bool(need[1]), bool(need[2]))
        ctx.save_for_backward(input, linear_weight, linear_bias, target)
        want_grad = reduction != "none"
        res = _linear._run(h, W, t, b, w, ignore_index, reduction, label_smoothing, z_loss,
                           return_z_loss, return_lse, logit_scale, softcap, chunk_size,
                           memory_budget, None, None, want_grad, ctx.need, _TorchGemm)
        res = res if isinstance(res, tuple) else (res,)
        loss, rest = res[0], list(res[1:])
        ctx.grads = None
        if want_grad:
            k = 3 if b is not None else 2
            ctx.grads = [_tensor(g) for g in rest[:k]] + ([None] if b is None else [])
            rest = rest[k:]
        return _outputs(ctx, loss, rest, _result_dtype(input.dtype), return_z_loss, return_lse)

    @staticmethod
    def backward(ctx, grad_output, _grad_zpart=None, _grad_lse=None):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fastce.torch.linear_cross_entropy does not support double backward "
                "(create_graph=True): its gradients are computed without a graph")
        none = ctx.options["reduction"] == "none"
        input_dtype = ctx.input_dtype
        grads = ctx.grads
        ctx.grads = None  # handed over; a second backward recomputes them
        if grads is None:
            # "none", or a second backward through a retained graph: the chunked pass
            # from the inputs (with the per-token upstream gradient for "none"; else with
            # 1, scaled below as the forward's were)
            input, linear_weight, linear_bias, target = ctx.saved_tensors
            h, W, t, b, _ = _numpy_args(input, linear_weight, target, linear_bias, None)
            o = ctx.options
            go = _to_numpy(grad_output.contiguous()) if none else None
            res = _linear._run(h, W, t, b, o["weight"], o["ignore_index"], o["reduction"],
                               o["label_smoothing"], o["z_loss"], False, False,
                               o["logit_scale"], o["softcap"], o["chunk_size"],
                               o["memory_budget"], None, go, True, ctx.need, _TorchGemm)
            grads = [_tensor(g) for g in res[1:3]] + [_tensor(res[3]) if b is not None else None]
        if not none:
            s = grad_output.item()
            if s != 1.0:
                grads = [None if g is None else g * s for g in grads]
        # half precision: the float32 gradients rounded once to the inputs' dtype
        gh, gW, gb = [None if g is None else g.to(input_dtype) for g in grads]
        return (gh if ctx.need[0] else None, gW if ctx.need[1] else None,
                gb if ctx.need[2] else None) + (None,) * (_N_INPUTS - 3)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         return_z_loss=False, return_lse=False, logit_scale=1.0, softcap=None,
                         chunk_size=None, memory_budget=None):
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` of CPU
    tensors without the logits, differentiable with respect to input, linear_weight and
    linear_bias.

    The arguments of :func:`torch.nn.functional.linear_cross_entropy` where they overlap
    (``input`` ``(N, H)`` or ``(..., H)``, ``linear_weight`` ``(V, H)``, ``target``
    class indices, ``linear_bias``, ``weight`` per class, ``reduction``,
    ``ignore_index`` (None is -100), ``label_smoothing``), plus fastce's ``z_loss``,
    ``return_z_loss``, ``return_lse``, ``logit_scale``, ``softcap`` (as in
    :func:`fastce.torch.cross_entropy`) and ``chunk_size`` / ``memory_budget`` (as in
    :func:`fastce.linear_cross_entropy`). float32, float64, float16 or bfloat16; half
    precision is staged in float32 (torch converts input, linear_weight and linear_bias
    once; the GEMMs run in float32), the loss is float32 and the gradients are rounded
    once to the input's dtype. The gradients are computed in the forward pass, chunk by
    chunk; nothing of size N x V is allocated or saved.

    Example
    -------
    >>> import torch, fastce.torch
    >>> h = torch.randn(8, 4, requires_grad=True)
    >>> W = torch.randn(10, 4, requires_grad=True)
    >>> t = torch.randint(0, 10, (8,))
    >>> loss = fastce.torch.linear_cross_entropy(h, W, t, chunk_size=3)
    >>> loss.backward()
    >>> ref = torch.nn.functional.cross_entropy(h @ W.T, t)
    >>> gh, gW = torch.autograd.grad(ref, (h, W))
    >>> bool(torch.allclose(loss, ref) and torch.allclose(h.grad, gh, atol=1e-6)
    ...      and torch.allclose(W.grad, gW, atol=1e-6))
    True
    """
    if ignore_index is None:
        ignore_index = -100
    _validate(input, linear_weight, target, linear_bias, weight)
    extras = return_z_loss is not False or return_lse is not False
    needs = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, linear_weight, linear_bias))
    if needs:
        loss, zpart, lse = _LinearCrossEntropyFunction.apply(
            input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
            label_smoothing, z_loss, logit_scale, softcap, chunk_size, memory_budget,
            return_z_loss, return_lse)
        if not extras:
            return loss
        return (loss,) + tuple(e for e in (zpart, lse) if e is not None)
    h, W, t, b, w = _numpy_args(input, linear_weight, target, linear_bias, weight)
    res = _linear._run(h, W, t, b, w, ignore_index, reduction, label_smoothing, z_loss,
                       return_z_loss, return_lse, logit_scale, softcap, chunk_size,
                       memory_budget, None, None, False, gemm=_TorchGemm)
    dtype = _result_dtype(input.dtype)
    if not extras:
        return _loss_to_tensor(res, dtype)
    return tuple(_loss_to_tensor(r, dtype) for r in res)


class LinearCrossEntropyLoss(torch.nn.Module):
    """:func:`linear_cross_entropy` as a module: ``LinearCrossEntropyLoss(weight=None,
    ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
    return_z_loss=False, return_lse=False, logit_scale=1.0, softcap=None,
    chunk_size=None, memory_budget=None)``; ``forward(input, linear_weight, target,
    linear_bias=None)``. ``weight`` (per class) is a buffer.

    Example
    -------
    >>> import torch, fastce.torch
    >>> head = torch.nn.Linear(4, 10, bias=False)
    >>> criterion = fastce.torch.LinearCrossEntropyLoss(chunk_size=2)
    >>> h, t = torch.randn(5, 4), torch.tensor([1, 2, 3, 4, 5])
    >>> loss = criterion(h, head.weight, t)
    >>> bool(torch.allclose(loss, torch.nn.functional.cross_entropy(head(h), t)))
    True
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 *, z_loss=0.0, return_z_loss=False, return_lse=False, logit_scale=1.0,
                 softcap=None, chunk_size=None, memory_budget=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.return_z_loss = return_z_loss
        self.return_lse = return_lse
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            return_z_loss=self.return_z_loss, return_lse=self.return_lse,
            logit_scale=self.logit_scale, softcap=self.softcap, chunk_size=self.chunk_size,
            memory_budget=self.memory_budget)

    def extra_repr(self):
        return "reduction=%r, ignore_index=%r, label_smoothing=%r, chunk_size=%r, " \
               "memory_budget=%r" % (self.reduction, self.ignore_index, self.label_smoothing,
                                     self.chunk_size, self.memory_budget)
