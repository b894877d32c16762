"""Helpers shared by fastce.torch and its modules (linear and vocabulary-parallel
losses): tensor checks, the NumPy view of a tensor, fresh gradient buffers, results as
tensors. Importing it imports torch, not fastce.torch, so any of those modules can be
imported first."""
import numpy as np
import torch

_FLOAT_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _check_cpu(name, t):
    if t.device.type != "cpu":
        raise RuntimeError(
            "fastce.torch supports CPU tensors only, but %s is on device %r; "
            "move it to the CPU (tensor.cpu()) or use "
            "torch.nn.functional.cross_entropy for %s tensors"
            % (name, str(t.device), t.device.type)
        )


def _to_numpy(t):
    """Share the tensor's memory with NumPy (no copy, any strides)."""
    # resolve_neg/resolve_conj are no-ops (return self) unless a lazy
    # negation/conjugation bit is set, which .numpy() refuses.
    return t.detach().resolve_neg().resolve_conj().numpy()


def _is_functorch_wrapped(t):
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return check is not None and check(t)


def _validate(input, target, weight, who="fastce.torch.cross_entropy", half=False):
    """The checks of a call's tensors; messages name the function `who`; half: whether
    float16/bfloat16 input is accepted."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(
            "input must be a torch.Tensor, got %s" % type(input).__name__)
    for name, t in (("input", input), ("target", target), ("weight", weight)):
        if isinstance(t, torch.Tensor) and _is_functorch_wrapped(t):
            raise RuntimeError(
                "%s does not support torch.func transforms "
                "(vmap, grad, jacrev, ...): %s is a functorch-wrapped tensor, and the "
                "kernel reads tensor memory directly; use "
                "torch.nn.functional.cross_entropy inside the transform" % (who, name))
    if not isinstance(target, torch.Tensor):
        raise TypeError(
            "target must be a torch.Tensor, got %s" % type(target).__name__)
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(
            "weight must be a torch.Tensor or None, got %s"
            % type(weight).__name__)
    _check_cpu("input", input)
    _check_cpu("target", target)
    if weight is not None:
        _check_cpu("weight", weight)
    if input.dtype not in _FLOAT_DTYPES and not (half and input.dtype in _HALF_DTYPES):
        raise TypeError(
            "%s expects input of dtype torch.float32%s "
            "or torch.float64, got %s%s"
            % (who, ", torch.float16, torch.bfloat16" if half else "", input.dtype,
               "; convert explicitly with input.float()"
               if input.dtype in _HALF_DTYPES else ""))
    if torch.is_grad_enabled():
        if weight is not None and weight.requires_grad:
            raise NotImplementedError(
                "%s is not differentiable with respect "
                "to weight (neither is PyTorch's); pass weight.detach()" % who)
        if target.requires_grad:
            raise NotImplementedError(
                "%s does not compute gradients with "
                "respect to probability targets; pass target.detach(), or use "
                "torch.nn.functional.cross_entropy if you need that gradient" % who)


_NUMPY_STORAGE = {torch.float32: np.float32, torch.float64: np.float64,
                  torch.float16: np.float16, torch.bfloat16: np.int16}


def _empty_grad(shape, dtype):
    """A fresh C-contiguous tensor for a gradient (float32, float64, float16, bfloat16),
    allocated by NumPy and shared: NumPy asks the kernel for transparent huge pages on
    large arrays (madvise), torch.empty does not, and first-touch page faults then
    dominate. Zen 4, (4096, 32000) float32, allocate + write: 57 ms through NumPy, 230 ms
    through torch.empty. bfloat16 (NumPy has none) as int16 storage viewed by torch."""
    t = torch.from_numpy(np.empty(shape, dtype=_NUMPY_STORAGE[dtype]))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


_BF16 = []


def _numpy_bfloat16():
    """ml_dtypes.bfloat16, or None where ml_dtypes is not installed."""
    if not _BF16:
        try:
            import ml_dtypes
            _BF16.append(np.dtype(ml_dtypes.bfloat16))
        except ImportError:
            _BF16.append(None)
    return _BF16[0]


def _half_view(t):
    """A float16 or bfloat16 tensor's memory as a NumPy array of that dtype (no copy,
    any strides; bfloat16 as ml_dtypes.bfloat16), which fastce's half kernels read as
    it is stored; None for bfloat16 without ml_dtypes."""
    if t.dtype == torch.float16:
        return _to_numpy(t)
    bf16 = _numpy_bfloat16()
    return None if bf16 is None else _to_numpy(t.view(torch.int16)).view(bf16)


def _loss_to_tensor(loss, dtype):
    # "mean"/"sum": NumPy scalar -> 0-d tensor; "none": ndarray -> tensor
    # sharing its memory (fastce returns a fresh array).
    a = np.asarray(loss, dtype=np.float32 if dtype == torch.float32
                   else np.float64)
    if not (a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a, order="C")   # keeps ndim (0-d stays 0-d)
    return torch.from_numpy(a)


def _outputs(ctx, loss, extras, dtype, return_z_loss, return_lse):
    """An autograd Function's (loss, z part, lse) as tensors of dtype: the z part and
    the lse (None where not asked) marked as outputs without a gradient."""
    extras = [_loss_to_tensor(e, dtype) for e in extras]
    ctx.mark_non_differentiable(*extras)
    zpart = extras.pop(0) if return_z_loss else None
    lse = extras.pop(0) if return_lse else None
    return _loss_to_tensor(loss, dtype), zpart, lse


def _float32_copy(t):
    """A C-contiguous float32 copy of t, in a NumPy-allocated buffer (huge pages:
    torch.empty's first-touch page faults cost more than the conversion, _empty_grad)."""
    return _empty_grad(t.shape, torch.float32).copy_(t.detach())


def _np(t):
    """A tensor as NumPy reads it, shared, no copy: half precision as NumPy's float16 or
    ml_dtypes' bfloat16 (the half kernels read it as stored), or as a float32 copy for
    bfloat16 without ml_dtypes (exact; torch's conversion)."""
    if t is None:
        return None
    if t.dtype in _HALF_DTYPES:
        x = _half_view(t)
        return x if x is not None else _to_numpy(_float32_copy(t))
    return _to_numpy(t)


def _result_dtype(dtype):
    """The dtype of the loss, z part and lse: float32 for half-precision input."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype
