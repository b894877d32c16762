"""Fused linear cross-entropy for NumPy: the loss of ``hidden @ linear_weight.T
(+ linear_bias)`` and its gradients without ever holding the (N, V) logits.

Tokens are taken in chunks. Per chunk: its logits through BLAS (NumPy's matmul) into
one reused buffer, then fastce's kernel over that buffer in place (loss and d loss /
d logits in one pass), then ``grad_hidden[chunk] = g @ linear_weight`` and
``grad_weight += g.T @ hidden[chunk]`` (and the bias gradient), all in the inputs'
dtype (half precision: in float32, the gradients rounded once at the end) with no buffer
of N x V. Ignored tokens are left out of the chunks (no GEMM
work) unless their log-sum-exp is asked for. Chunks are taken in order and every sum
over them is in that order, so a result depends on the chunk size only through the
rounding of the GEMMs and of each chunk's loss sum to the dtype.
"""
import math

import numpy as np

from . import _core

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad"]

_MIB = 1 << 20
# the default memory budget for one chunk of logits: the size of hidden, at least this.
# grad_weight's GEMM has the chunk as its inner dimension and slows down on short
# chunks: Zen 4, 1 thread, N=4096 H=1024 V=32000 forward+backward (bench/linear_ce.py):
# 1.20x the three unchunked GEMMs with 64 MiB chunks (524 tokens), 1.10x with 128 MiB,
# 1.06x with 256 MiB (torch's chunked path: 1.13x); peak extra memory 213, 277 and
# 405 MB (torch's chunked path: 365). 128 MiB is faster and smaller than torch's chunked
# path; pass memory_budget for either end.
_MIN_BUDGET = 128 * _MIB
# grad_weight's later chunks are added through a buffer of this many bytes at most
_ADD_BLOCK = 8 * _MIB


class _NumpyGemm:
    """The GEMMs of the chunked pass through NumPy's matmul (its BLAS). mm: out = a @ b;
    mm_add: out += a @ b, which NumPy cannot ask of BLAS (no beta): by blocks of out's
    rows through one small buffer (an extra pass over out per chunk after the first)."""

    def __init__(self):
        self.part = None

    def mm(self, a, b, out):
        np.matmul(a, b, out=out)

    def mm_add(self, a, b, out):
        rows = max(1, min(out.shape[0], _ADD_BLOCK // (out.shape[1] * out.itemsize)))
        if self.part is None:
            self.part = np.empty((rows, out.shape[1]), out.dtype)
        for r0 in range(0, out.shape[0], rows):
            part = self.part[:min(rows, out.shape[0] - r0)]
            np.matmul(a[r0:r0 + rows], b, out=part)
            out[r0:r0 + rows] += part


def _int_option(value, name, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError("%s must be an int or None, got %r of type %s"
                        % (name, value, type(value).__name__))
    if value < low:
        raise ValueError("%s must be >= %d, got %d" % (name, low, value))
    return int(value)


def _arrays(hidden, linear_weight, target, linear_bias):
    """(h (N, H), W (V, H), t (N,) int64, b (V,) or None, the sample shape), checked."""
    _core.refuse_masked(hidden=hidden, linear_weight=linear_weight, target=target,
                        linear_bias=linear_bias)
    h = np.asarray(hidden)
    W = np.asarray(linear_weight)
    for a, name in ((h, "hidden"), (W, "linear_weight")):
        if a.dtype not in (np.float32, np.float64) and not _core.half_dtype(a.dtype):
            raise TypeError("%s must have dtype float32, float64, float16 or bfloat16 "
                            "(ml_dtypes), got %s" % (name, a.dtype))
    if h.dtype != W.dtype:
        raise TypeError("hidden and linear_weight must have the same dtype, got %s and %s"
                        % (h.dtype, W.dtype))
    if h.ndim < 1:
        raise ValueError("hidden must have shape (N, H) or (..., H), got a 0-d array")
    if W.ndim != 2:
        raise ValueError("linear_weight must have shape (V, H), got shape %s" % (W.shape,))
    if W.shape[1] != h.shape[-1]:
        raise ValueError("hidden's last axis (H = %d) must match linear_weight's second "
                         "(shape %s: (V, H))" % (h.shape[-1], W.shape))
    if W.shape[0] == 0:
        raise ValueError("linear_weight must have at least one class (row), got shape %s"
                         % (W.shape,))
    sample_shape = h.shape[:-1]
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise TypeError("target must hold class indices (an integer dtype), got dtype %s; "
                        "probability targets are not supported here" % t.dtype)
    if t.shape != sample_shape:
        raise ValueError("target must have shape %s (hidden's without its last axis), got "
                         "shape %s" % (sample_shape, t.shape))
    b = None
    if linear_bias is not None:
        b = np.asarray(linear_bias)
        if b.shape != (W.shape[0],):
            raise ValueError("linear_bias must have shape (%d,) (one per class), got shape %s"
                             % (W.shape[0], b.shape))
        b = b.astype(h.dtype, copy=False)
    h2 = h.reshape(-1, h.shape[-1])
    return h2, W, t.reshape(-1), b, sample_shape


def _chunk_rows(n, V, itemsize, chunk_size, memory_budget, hidden_bytes):
    if chunk_size is not None:
        if memory_budget is not None:
            raise ValueError("pass chunk_size or memory_budget, not both")
        return max(1, min(_int_option(chunk_size, "chunk_size", 1), n))
    row = V * itemsize
    if memory_budget is None:
        budget = max(hidden_bytes, _MIN_BUDGET)
    else:
        budget = _int_option(memory_budget, "memory_budget", 1)
        if budget < row:
            raise ValueError("memory_budget=%d bytes is too small for one token's logits "
                             "(%d classes x %d bytes = %d bytes)" % (budget, V, itemsize, row))
    return max(1, min(budget // row, n))


def _run(hidden, linear_weight, target, linear_bias, weight, ignore_index, reduction,
         label_smoothing, z_loss, return_z_loss, return_lse, logit_scale, softcap,
         chunk_size, memory_budget, n_threads, grad_output, want_grad,
         need=(True, True, True), gemm=None):
    """The chunked pass. need: (grad_hidden, grad_weight, grad_bias) wanted (with
    want_grad; a gradient not wanted comes back as None and costs no GEMM). gemm: the
    class of the GEMMs (default _NumpyGemm)."""
    h, W, t, b, sample_shape = _arrays(hidden, linear_weight, target, linear_bias)
    # half precision: staged in float32 (the GEMMs, the kernel and every sum); the
    # gradients are rounded once to the inputs' dtype at the end
    grad_dtype = h.dtype
    if _core.half_dtype(grad_dtype):
        h, W = h.astype(np.float32), W.astype(np.float32)
        b = None if b is None else b.astype(np.float32)
    dtype = h.dtype
    n, V = h.shape[0], W.shape[0]
    # the options as cross_entropy checks them (a (0, V) call: nothing computed)
    empty = np.empty((0, V), dtype)
    _core.cross_entropy(empty, np.empty(0, np.int64), weight=weight,
                        ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing, z_loss=z_loss,
                        return_z_loss=return_z_loss, return_lse=return_lse,
                        logit_scale=logit_scale, softcap=softcap, n_threads=n_threads)
    rows = _chunk_rows(n, V, dtype.itemsize, chunk_size, memory_budget, h.nbytes)
    w = None if weight is None else np.asarray(weight, dtype=dtype)
    ignored = t == ignore_index
    bad = ~ignored & ((t < 0) | (t >= V))
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise _core.bad_target_error(int(t[pos]), tuple(int(i) for i in np.unravel_index(
            pos, sample_shape)), V, ignore_index)
    none = reduction == "none"
    # the tokens whose logits are formed: the kept ones (all when their lse is asked for)
    order = np.arange(n) if return_lse else np.flatnonzero(~ignored)
    tk = np.where(ignored, 0, t)
    den = float(np.sum(w[tk[~ignored]], dtype=np.float64)) if w is not None \
        else float(np.count_nonzero(~ignored))
    if reduction == "mean" and w is not None and den != 0 and abs(den) < 2.0 ** -64:
        # the mean (and its gradient) is the same with every weight times one power of two;
        # taken so the denominator is about 1, go / den stays in the dtype's range (as the
        # kernel's own scale_weights does for one call)
        e = -math.frexp(den)[1]
        w = np.ldexp(w, e).astype(dtype)
        den = math.ldexp(den, e)
    # the upstream gradient of each chunk's "sum" (or per-token, for "none")
    go0 = None if grad_output is None else _core.real_array(grad_output, "grad_output")
    if none:
        go = np.ones(n, dtype)
        if go0 is not None:
            try:
                go = np.array(np.broadcast_to(go0, sample_shape), dtype=dtype).reshape(-1)
            except ValueError:
                raise ValueError("grad_output must broadcast to the per-token loss shape %s, "
                                 "got shape %s" % (sample_shape, go0.shape)) from None
        go_scale = 1.0
    else:
        if go0 is not None and go0.size != 1:
            raise ValueError("grad_output must be a scalar (one value) for reduction=%r, got "
                             "shape %s" % (reduction, go0.shape))
        go0 = 1.0 if go0 is None else float(go0.reshape(()))
        go_scale = go0 / den if reduction == "mean" and den != 0 else \
            (np.nan if reduction == "mean" else go0)
    opts = dict(weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing,
                z_loss=z_loss, logit_scale=logit_scale, softcap=softcap, n_threads=n_threads)
    # the z part of a "mean" is wanted when the weights sum to 0 (_mean_parts)
    want_z = return_z_loss or (reduction == "mean" and z_loss > 0)
    loss_tok = np.zeros(n, dtype) if none else None
    z_tok = np.zeros(n, dtype) if none and return_z_loss else None
    lse = np.empty(n, dtype) if return_lse else None
    loss_sum = z_sum = 0.0
    gh = gW = gb = None
    if want_grad:
        gh = np.zeros_like(h) if need[0] else None
        gW = np.empty(W.shape, dtype) if need[1] else None  # the first chunk writes it all
        gb = np.zeros(V, dtype) if b is not None and need[2] else None
    buf = np.empty((min(rows, max(len(order), 1)), V), dtype)
    gemm = gemm() if gemm is not None else _NumpyGemm()
    first = True
    for c0 in range(0, len(order), rows):
        idx = order[c0:c0 + rows]
        contiguous = idx[-1] - idx[0] + 1 == len(idx)
        sel = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
        hc = h[sel]
        logits = buf[:len(idx)]
        gemm.mm(hc, W.T, logits)
        if b is not None:
            logits += b
        tc = t[sel]
        red = "none" if none else "sum"
        kw = dict(opts, reduction=red, return_z_loss=want_z, return_lse=return_lse)
        if want_grad:
            res = _core.cross_entropy_with_grad(
                logits, tc, grad_output=go[sel] if none else go_scale, out=logits, **kw)
        else:
            res = _core.cross_entropy(logits, tc, **kw)
        res = res if isinstance(res, tuple) else (res,)
        k = 2 if want_grad else 1
        if none:
            loss_tok[sel] = res[0]
            if return_z_loss:
                z_tok[sel] = res[k]
        else:
            loss_sum += float(res[0])
            if want_z:
                z_sum += float(res[k])
        if return_lse:
            lse[sel] = res[-1]
        if want_grad:
            g = logits
            if gh is None:
                pass
            elif contiguous:
                gemm.mm(g, W, gh[sel])
            else:
                gh[sel] = g @ W
            if gW is None:
                pass
            elif first:
                gemm.mm(g.T, hc, gW)
            else:
                gemm.mm_add(g.T, hc, gW)
            if gb is not None:
                gb += g.sum(axis=0)
        first = False
    if gW is not None and first:
        gW.fill(0)  # no token was kept
    if none:
        loss = loss_tok.reshape(sample_shape)
        zpart = z_tok.reshape(sample_shape) if return_z_loss else None
    else:
        if reduction == "mean":
            loss_sum, z_sum = _mean_parts(h, W, t, b, order, rows, opts, den, loss_sum, z_sum,
                                          return_z_loss)
        loss, zpart = dtype.type(loss_sum), dtype.type(z_sum)
    extras = ([zpart] if return_z_loss else []) + \
        ([lse.reshape(sample_shape)] if return_lse else [])
    if want_grad:
        grads = [None if gh is None else gh.reshape(tuple(sample_shape) + (h.shape[-1],)),
                 gW] + ([gb] if b is not None else [])
        if grad_dtype != dtype:
            grads = [None if g is None else g.astype(grad_dtype) for g in grads]
        return (loss, *grads, *extras)
    return (loss, *extras) if extras else loss


def _mean_parts(h, W, t, b, order, rows, opts, den, loss_sum, z_sum, return_z_loss):
    """The "mean" from the chunks' sums: over den, or, when the target weights sum to 0
    (every token ignored, or weights that cancel), as torch makes that mean: the target
    part and the smoothing part each over that 0 (IEEE: inf, -inf or NaN), which needs
    the two parts apart (two more loss-only passes; rare)."""
    if den != 0:
        return loss_sum / den, z_sum / den
    eps = opts["label_smoothing"]
    parts = [0.0, 0.0]
    for c0 in range(0, len(order), rows):
        idx = order[c0:c0 + rows]
        logits = h[idx] @ W.T
        if b is not None:
            logits += b
        for i, s in enumerate((0.0, 1.0)):
            parts[i] += float(_core.cross_entropy(
                logits, t[idx], reduction="sum", **dict(opts, label_smoothing=s, z_loss=0.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.float64(0.0)
        mean = (1.0 - eps) * np.float64(parts[0]) / zero
        if eps > 0:
            mean = mean + eps * np.float64(parts[1]) / zero
        if opts["z_loss"] > 0:
            mean = mean + np.float64(z_sum) / zero
        return float(mean), float(np.float64(z_sum) / zero)


def linear_cross_entropy(hidden, linear_weight, target, *, linear_bias=None, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                         return_z_loss=False, return_lse=False, logit_scale=1.0, softcap=None,
                         chunk_size=None, memory_budget=None, n_threads=None):
    """``cross_entropy(hidden @ linear_weight.T + linear_bias, target, ...)`` without the
    logits: chunk by chunk of tokens, the logits of one chunk at a time.

    Parameters
    ----------
    hidden : array_like of float32, float64, float16 or bfloat16, shape (N, H) or (..., H)
        Half precision (float16, ``ml_dtypes.bfloat16``) is staged in float32: hidden,
        linear_weight and linear_bias are converted once (a float32 copy of each), the
        GEMMs and the kernel run in float32, the loss, z part and lse are float32 (as
        :func:`fastce.cross_entropy` returns them for half logits) and the gradients
        are rounded once to the input's dtype. (Half-precision GEMMs on CPUs without
        native support are far slower: torch's bfloat16 matmul is 35x its float32 one
        on AMD Zen 3.)
    linear_weight : array_like, shape (V, H), hidden's dtype
        The output layer (torch's ``linear_weight``: ``F.linear(hidden, linear_weight)``).
    target : array_like of integers, shape (N,) (hidden's shape without H)
        Class indices in [0, V) or ``ignore_index``.
    linear_bias : array_like, shape (V,), optional
    weight, ignore_index, reduction, label_smoothing, z_loss, return_z_loss, return_lse, logit_scale, softcap, n_threads
        As for :func:`fastce.cross_entropy` (``weight``: per-class weights).
    chunk_size : int, optional
        Tokens per chunk.
    memory_budget : int, optional
        Bytes for one chunk of logits (default: hidden's size, at least 128 MiB); the
        chunk is as many tokens as fit. Give one of chunk_size, memory_budget.

    Returns
    -------
    As :func:`fastce.cross_entropy`.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> rng = np.random.default_rng(0)
    >>> h, W = rng.standard_normal((6, 4)), rng.standard_normal((10, 4))
    >>> t = np.array([1, 2, 3, -100, 9, 0])
    >>> a = fastce.linear_cross_entropy(h, W, t, chunk_size=4)
    >>> bool(np.isclose(a, fastce.cross_entropy(h @ W.T, t)))
    True
    """
    return _run(hidden, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                label_smoothing, z_loss, return_z_loss, return_lse, logit_scale, softcap,
                chunk_size, memory_budget, n_threads, None, False)


def linear_cross_entropy_with_grad(hidden, linear_weight, target, *, linear_bias=None,
                                   weight=None, ignore_index=-100, reduction="mean",
                                   label_smoothing=0.0, z_loss=0.0, return_z_loss=False,
                                   return_lse=False, logit_scale=1.0, softcap=None,
                                   grad_output=None, chunk_size=None, memory_budget=None,
                                   n_threads=None):
    """:func:`linear_cross_entropy` and its gradients, in the same chunked pass.

    Returns ``(loss, grad_hidden, grad_weight)``, with ``grad_bias`` after them when
    ``linear_bias`` is given, then the z-loss part and the lse when asked. The
    gradients have the shapes and dtype of hidden, linear_weight and linear_bias
    (half precision: accumulated in float32, rounded once);
    ``grad_output`` is as for :func:`fastce.cross_entropy_with_grad` (per token for
    ``"none"``). Peak extra memory beyond the gradients returned: one chunk of logits
    (it holds their gradient too), a buffer of at most 8 MiB, and, when ignored tokens
    break a chunk's rows apart, that chunk's hidden rows and grad_hidden rows (chunk x H)
    gathered.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> rng = np.random.default_rng(0)
    >>> h, W = rng.standard_normal((6, 4)), rng.standard_normal((10, 4))
    >>> t = np.array([1, 2, 3, -100, 9, 0])
    >>> loss, gh, gW = fastce.linear_cross_entropy_with_grad(h, W, t, chunk_size=4)
    >>> _, g = fastce.cross_entropy_with_grad(h @ W.T, t)
    >>> bool(np.allclose(gh, g @ W) and np.allclose(gW, g.T @ h))
    True
    """
    return _run(hidden, linear_weight, target, linear_bias, weight, ignore_index, reduction,
                label_smoothing, z_loss, return_z_loss, return_lse, logit_scale, softcap,
                chunk_size, memory_budget, n_threads, grad_output, True)
