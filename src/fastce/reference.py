"""Pure-NumPy reference implementation of fastce: the slow twin.

This module is the *definition* of what fastce computes.  Every function here
has the signature, the semantics and the exceptions of its fast counterpart in
:mod:`fastce`; the tests check that the two agree.  It is written to be read,
not to be fast: vectorised NumPy, everything computed in float64, results cast
back to the logits' dtype at the very end (so a float32 result is the float64
value rounded once).

The computation is the textbook one (the one the seed notebooks do by hand)::

    m        = max_c x[c]                        # shift for stability
    log_p[c] = (x[c] - m) - log(sum_c exp(x[c] - m))
    loss     = -log_p[target]                    # "gather"

with PyTorch's options layered on top (``weight``, ``ignore_index``,
``reduction``, ``label_smoothing``, probability targets), exactly as
:func:`torch.nn.functional.cross_entropy` defines them:

* class-index targets, per sample ``i`` with ``t = target[i]``::

      nll[i]    = -weight[t] * log_p[i, t]
      smooth[i] = -sum_c weight[c] * log_p[i, c]      (weight = 1 if None)
      loss[i]   = (1 - eps) * nll[i] + eps / C * smooth[i]

  samples whose target equals ``ignore_index`` contribute 0 (even if their
  logits are NaN); ``"mean"`` divides the sum by ``sum_i weight[target[i]]``
  over the non-ignored samples (nan when that set is empty).
* probability targets (``target`` has the logits' shape, float dtype)::

      q[i, c]   = (1 - eps) * target[i, c] + eps / C
      loss[i]   = -sum_c log_p[i, c] * q[i, c] * weight[c]

  and ``"mean"`` divides by the number of samples (nan when there are none).
  As in PyTorch, a ``-inf`` logit times a zero target is ``nan``.

The class axis is 1, or 0 for 1-D logits.  ``n_threads`` is accepted and
ignored everywhere.
"""

import numpy as np

# The argument checks and conversions are the binding's own (one normaliser, so the
# two modules cannot disagree on what is accepted or what an error says); everything
# below them, the maths, is this module's, from the definition.
from ._core import bad_target_error, cross_entropy_args, lm_options, lse_args

__all__ = ["cross_entropy", "cross_entropy_with_grad", "log_softmax", "logsumexp"]


def _prepare(logits, target, weight, ignore_index, reduction, label_smoothing,
             grad_output=None, out=None, want_grad=False, lm=(0.0, False, False, 1.0, None)):
    """The checked arguments (fastce's normaliser), in float64 with the class axis last.

    Returns a dict: the canonical arrays (``x``, ``t``, ``w``), ``dtype``,
    ``class_axis``, ``C``, ``sample_shape``, the logits as float64 of shape
    ``(*S, C)`` (``xs``), ``weight`` (float64 or None), ``eps``, ``reduction``,
    ``go`` (float64 grad_output broadcast to the loss's shape), ``out``, ``z_loss`` (checked),
    ``dzdx`` (the logit transform's derivative, None without one: ``xs`` holds the
    transformed logits); and either class indices (``index``, ``ignored``) or
    probabilities (``prob``).
    """
    a = cross_entropy_args(logits, target, weight, ignore_index, reduction, label_smoothing,
                           grad_output, out, want_grad)
    # checked where the binding checks it: before any target value
    z, scale, cap = lm_options(*lm, dtype=a.dtype)
    x, t, axis = a.x, a.t, a.axis
    loss_shape = a.sample_shape if reduction == "none" else ()
    go = np.ones(loss_shape) if a.go is None else a.go.astype(np.float64)
    if a.go is None and a.has_go:
        go = np.full(loss_shape, a.go_scalar)
    p = dict(x=x, t=t, dtype=a.dtype, grad_dtype=a.grad_dtype, class_axis=axis, C=a.C, sample_shape=a.sample_shape,
             xs=np.moveaxis(x, axis, -1).astype(np.float64),
             weight=None if a.w is None else a.w.astype(np.float64), eps=a.eps,
             reduction=reduction, go=go, out=a.out, z_loss=z, dzdx=None)
    if scale != 1.0 or cap:
        # the logit transform, by its definition: z = s x, then cap tanh(z / cap)
        xs = p["xs"] * scale
        # in the logits' dtype, as the kernel computes it: past its range is +-inf
        big = np.abs(xs) > float(np.finfo(a.dtype).max)
        xs = np.where(big, np.copysign(np.inf, xs), xs)
        p["dzdx"] = np.full(xs.shape, scale)
        if cap:
            with np.errstate(all="ignore"):
                # d/dz cap tanh(z / cap) = sech^2(z / cap) = 1 / cosh^2 (1 - tanh^2 would
                # round to 0 where tanh rounds to 1)
                p["dzdx"] = scale / np.cosh(xs / cap) ** 2
                xs = cap * np.tanh(xs / cap)
        p["xs"] = xs
    if a.prob:
        p["prob"] = np.moveaxis(t.astype(a.dtype), axis, -1).astype(np.float64)
        return p
    # Class indices: compare values, never wrapped ones (2**32 + 1 is not 1, a
    # uint64 >= 2**63 is not negative); NumPy compares Python ints exactly.
    ignored = t == a.ignore_index
    bad = ~ignored & ((t < 0) | (t >= a.C))
    if bad.any():
        pos = tuple(int(i) for i in np.unravel_index(np.flatnonzero(bad)[0], t.shape))
        raise bad_target_error(int(t[pos]), pos, a.C, a.ignore_index)
    p["ignored"] = ignored
    p["index"] = np.where(ignored, 0, t).astype(np.intp)
    return p


# --------------------------------------------------------------------------
# The maths, in float64, class axis last
# --------------------------------------------------------------------------

def _log_softmax_last(xs):
    """log_softmax over the last axis: (x - m) - log(sum(exp(x - m))).

    A row with NaN or +inf, or with only -inf, gives NaN everywhere (as torch).
    """
    shifted = xs - np.max(xs, axis=-1, keepdims=True, initial=-np.inf)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _per_sample(p, logp):
    """The loss as torch defines it: a list of (coefficient, per-sample term) whose sum is
    the per-sample loss (float64, sample shape), and the "mean" denominator. Each term is
    reduced on its own, as torch does: with label smoothing the mean is
    (1 - eps) sum(w_y nll) / W + eps/C sum(smooth) / W, so W = 0 gives NaN (0/0) and not
    inf."""
    eps, C, w = p["eps"], p["C"], p["weight"]
    if "prob" in p:
        q = p["prob"]
        if eps > 0:
            q = q * (1.0 - eps) + eps / C
        contrib = logp * q if w is None else logp * q * w
        return [(1.0, -np.sum(contrib, axis=-1))], float(np.prod(p["sample_shape"]))

    idx, ignored = p["index"], p["ignored"]
    w_t = np.ones(idx.shape) if w is None else w[idx]
    w_t = np.where(ignored, 0.0, w_t)
    nll = -np.take_along_axis(logp, idx[..., None], axis=-1)[..., 0]
    # where, not multiply: an ignored sample is 0 even when its logits are NaN
    nll = np.where(ignored, 0.0, nll if w is None else w_t * nll)
    if eps == 0:
        return [(1.0, nll)], np.sum(w_t)
    smooth = -np.sum(logp if w is None else logp * w, axis=-1)
    smooth = np.where(ignored, 0.0, smooth)
    return [(1.0 - eps, nll), (eps / C, smooth)], np.sum(w_t)


def _lse_last(xs):
    """log(sum(exp(x))) over the last axis, as torch.logsumexp: m + log(sum(exp(x - m)))
    with m the max (0 where it is infinite: all -inf gives -inf, a +inf gives +inf)."""
    m = np.max(xs, axis=-1, initial=-np.inf)
    m = np.where(np.isinf(m), 0.0, m)
    return m + np.log(np.sum(np.exp(xs - m[..., None]), axis=-1))


def _z_weight(p, z):
    """The z-loss's per-sample factor z * weight[target] (z for probability targets, 0
    for ignored samples)."""
    if "prob" in p:
        return np.full(p["sample_shape"], z)
    w = p["weight"]
    zw = z * (np.ones(p["index"].shape) if w is None else w[p["index"]])
    return np.where(p["ignored"], 0.0, zw)


def _z_term(p, z, lse):
    """The z-loss z * weight[target] * lse**2 per sample (0 where ignored, even for a NaN lse)."""
    term = _z_weight(p, z) * lse ** 2
    return term if "prob" in p else np.where(p["ignored"], 0.0, term)


def _combine(terms):
    """The per-sample loss: the sum of the terms."""
    (c0, t0), *rest = terms
    loss = c0 * t0 if c0 != 1.0 else t0
    for c, t in rest:
        loss = loss + c * t
    return loss


def _reduce(terms, denominator, reduction):
    if reduction == "none":
        return _combine(terms)
    if reduction == "sum":
        return np.sum(_combine(terms))
    with np.errstate(invalid="ignore", divide="ignore"):
        value = 0.0
        for c, t in terms:
            value = value + c * (np.sum(t) / np.float64(denominator))
    return value


def _finish(value, dtype, reduction):
    """Cast to the logits' dtype: a NumPy scalar for mean/sum, an ndarray for none."""
    if reduction == "none":
        return np.asarray(value).astype(dtype)
    return dtype.type(value)


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------

def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, return_z_loss=False, return_lse=False,
                  logit_scale=1.0, softcap=None, n_threads=None):
    """Softmax cross-entropy, exactly as :func:`torch.nn.functional.cross_entropy`.

    Parameters
    ----------
    logits : array_like, float32, float64, float16 or bfloat16 (half precision:
        computed from the float32 values, results as fastce's: float32 statistics,
        the gradient rounded to the logits' dtype)
        Shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; the class axis
        is 1 (0 for 1-D logits).  Any memory layout.
    target : array_like
        Either class indices, any integer dtype, of shape ``()`` for ``(C,)``
        logits and ``(N, d1, ..., dk)`` otherwise; or class probabilities, a
        float dtype, of exactly the logits' shape (converted to their dtype).
    weight : array_like of shape (C,), optional
        Per-class rescaling weights (integers or floats), converted to the
        logits' dtype.
    ignore_index : int, default -100
        Class-index targets equal to this contribute nothing (loss 0, not
        counted by ``"mean"``).  Must stay -100 with probability targets.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` divides by ``sum(weight[target])`` over non-ignored samples
        (their count without weights), or by the number of samples for
        probability targets.
    label_smoothing : float in [0, 1]
        Mixes the target with the uniform distribution over the C classes.
    z_loss : float >= 0
        Adds ``z_loss * weight[target] * lse**2`` per sample (``lse`` the
        log-sum-exp of its logits; weight 1 without weights or for probability
        targets; 0 for ignored samples), reduced with the loss.
    return_z_loss, return_lse : bool
        Also return the z-loss part (reduced as the loss) and / or the
        per-sample log-sum-exp, appended in that order.
    logit_scale : float > 0
        The logits are taken as ``logit_scale * logits`` (+-inf past the
        dtype's range).
    softcap : float > 0 or None
        Then as ``softcap * tanh(z / softcap)``.  Every output is of these
        transformed logits; gradients are with respect to the logits given.
    n_threads : ignored

    Returns
    -------
    numpy scalar (``"mean"``, ``"sum"``) or ndarray (``"none"``, of the sample
    shape) of the logits' dtype.  No samples: ``"mean"`` -> nan, ``"sum"`` -> 0.

    Raises
    ------
    TypeError
        Logits not float32/float64; target dtype neither integer nor float;
        float target whose shape is not the logits' shape, or integer target
        that has it; weight of a non-real dtype; ignore_index not an int.
    ValueError
        0-d logits; target shape not matching the logits; weight not of shape
        ``(C,)``; unknown reduction; label_smoothing outside [0, 1] or nan;
        ignore_index outside int64 (torch's type for it), or other than -100
        with probability targets.
    IndexError
        A class index outside ``[0, C)`` that is not ``ignore_index``.

    Examples
    --------
    >>> logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
    >>> float(cross_entropy(logits, np.array([0, 1])))
    0.31853976964918573
    >>> cross_entropy(logits, np.array([0, 1]), reduction="none").round(4)
    array([0.417, 0.22 ])
    >>> float(cross_entropy(logits.astype(np.float32), np.array([0, 1])))
    0.3185397684574127
    """
    p = _prepare(logits, target, weight, ignore_index, reduction, label_smoothing,
                 lm=(z_loss, return_z_loss, return_lse, logit_scale, softcap))
    z = p["z_loss"]
    with np.errstate(all="ignore"):
        terms, denominator = _per_sample(p, _log_softmax_last(p["xs"]))
        lse = _lse_last(p["xs"])
        if z > 0:
            terms.append((1.0, _z_term(p, z, lse)))
        value = _reduce(terms, denominator, reduction)
    return _with_extras(_finish(value, p["dtype"], reduction), p, z, lse, denominator,
                        return_z_loss, return_lse)


def _with_extras(result, p, z, lse, denominator, return_z_loss, return_lse):
    """result, or a tuple with the z-loss part and / or the lse appended."""
    if not (return_z_loss or return_lse):
        return result
    extras = []
    if return_z_loss:
        with np.errstate(all="ignore"):
            zpart = _reduce([(1.0, _z_term(p, z, lse))], denominator, p["reduction"])
        extras.append(_finish(zpart, p["dtype"], p["reduction"]))
    if return_lse:
        extras.append(np.asarray(lse).astype(p["dtype"]))
    return (*(result if isinstance(result, tuple) else (result,)), *extras)


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0, return_z_loss=False,
                            return_lse=False, logit_scale=1.0, softcap=None, grad_output=None,
                            out=None, n_threads=None):
    """Cross-entropy and its gradient with respect to the logits.

    Takes the arguments of :func:`cross_entropy`, plus:

    grad_output : array_like, optional
        Real numbers multiplying the loss before differentiation: one value
        (size 1) for ``"mean"``/``"sum"``; for ``"none"`` an array that
        broadcasts to the per-sample loss shape.  Defaults to ones.  The
        gradient is that of ``sum(grad_output * loss)``.
    out : ndarray, optional
        Writable array of the logits' shape and dtype that receives the
        gradient.  It must not overlap logits, target, weight or grad_output,
        unless it *is* ``logits`` (the same object, or a view of the very same
        elements), which computes in place; the logits must then be writable
        and C-contiguous.

    Returns
    -------
    (loss, grad)
        ``loss`` as :func:`cross_entropy` returns it; ``grad`` has the logits'
        shape and dtype (and is ``out`` when given).  Ignored samples get a
        zero gradient.

    Raises
    ------
    As :func:`cross_entropy`, and also TypeError for a grad_output of a
    non-real dtype or an ``out`` of the wrong dtype (or not an ndarray);
    ValueError for a grad_output of the wrong shape, or an ``out`` of the
    wrong shape, read-only, overlapping an input, or ``out=logits`` when the
    logits are not writable and C-contiguous.

    Examples
    --------
    >>> loss, grad = cross_entropy_with_grad(np.array([[0.0, 0.0]]), np.array([1]))
    >>> float(loss), grad
    (0.6931471805599453, array([[ 0.5, -0.5]]))
    """
    p = _prepare(logits, target, weight, ignore_index, reduction, label_smoothing,
                 grad_output, out, want_grad=True,
                 lm=(z_loss, return_z_loss, return_lse, logit_scale, softcap))
    z = p["z_loss"]
    dtype, go, out = p["dtype"], p["go"], p["out"]
    with np.errstate(all="ignore"):
        logp = _log_softmax_last(p["xs"])
        terms, denominator = _per_sample(p, logp)
        lse = _lse_last(p["xs"])
        if z > 0:
            terms.append((1.0, _z_term(p, z, lse)))
        value = _reduce(terms, denominator, reduction)
        grad = _grad_per_sample(p, np.exp(logp))  # d loss[i] / d x[i, :]
        if z > 0:  # d (z w lse**2) / dx = 2 z w lse softmax(x)
            grad = grad + (2.0 * _z_weight(p, z) * lse)[..., None] * np.exp(logp)
        # a mean over no weight is NaN (torch's 0/0), and so is its gradient
        scale = (go / denominator if denominator != 0 else go * np.nan) if reduction == "mean" else go
        grad = grad * (scale[..., None] if reduction == "none" else scale)
        if p["dzdx"] is not None:  # the chain rule through the logit transform
            grad = grad * p["dzdx"]
        if "ignored" in p:  # after scaling: 0 * (1/0) would be nan
            grad = np.where(p["ignored"][..., None], 0.0, grad)

    grad = np.moveaxis(grad, -1, p["class_axis"])
    if out is None:
        out = np.ascontiguousarray(grad.astype(p["grad_dtype"]))
    else:
        out[...] = grad
    return _with_extras((_finish(value, dtype, reduction), out), p, z, lse, denominator,
                        return_z_loss, return_lse)


def _grad_per_sample(p, prob):
    """Gradient of each per-sample loss w.r.t. its own row of logits (class axis last).

    With ``prob = softmax(x)``, ``d(-log_p[c]) / dx = prob - onehot(c)``, so

    * indices:       (1 - eps) * w[t] * (prob - onehot(t)) + eps/C * (sum(w) * prob - w)
    * probabilities: sum_c(w * q) * prob - w * q
    """
    eps, C, w = p["eps"], p["C"], p["weight"]
    if "prob" in p:
        q = p["prob"]
        if eps > 0:
            q = q * (1.0 - eps) + eps / C
        wq = q if w is None else q * w
        return np.sum(wq, axis=-1, keepdims=True) * prob - wq

    idx = p["index"]
    onehot = np.zeros_like(prob)
    np.put_along_axis(onehot, idx[..., None], 1.0, axis=-1)
    w_t = 1.0 if w is None else w[idx][..., None]
    grad = w_t * (prob - onehot)
    if eps > 0:
        smooth = C * prob - 1.0 if w is None else np.sum(w) * prob - w
        grad = (1.0 - eps) * grad + (eps / C) * smooth
    return grad


def log_softmax(logits, axis=-1, *, n_threads=None):
    """Logarithm of the softmax along ``axis``: ``x - max - log(sum(exp(x - max)))``.

    Returns an ndarray of the logits' shape and dtype (float32, float64, or a half
    dtype, rounded once).
    As :func:`torch.log_softmax`, a slice containing NaN or +inf, or only
    -inf, is NaN throughout.  Raises TypeError for other dtypes, ValueError
    for 0-d input, :class:`numpy.exceptions.AxisError` (a ValueError and an
    IndexError) for an axis out of range.

    >>> log_softmax(np.array([0.0, 0.0, np.log(2.0)]))
    array([-1.38629436, -1.38629436, -0.69314718])
    """
    x, axis, in_dtype = lse_args(logits, axis)
    with np.errstate(all="ignore"):
        logp = _log_softmax_last(np.moveaxis(x, axis, -1).astype(np.float64))
    return np.ascontiguousarray(np.moveaxis(logp, -1, axis).astype(in_dtype))


def logsumexp(logits, axis=-1, *, n_threads=None):
    """``log(sum(exp(x)))`` along ``axis``, computed as ``m + log(sum(exp(x - m)))``.

    Returns an array of the logits' shape without ``axis`` (a NumPy scalar
    for 1-D input), of the logits' dtype.  As :func:`torch.logsumexp`: an
    all ``-inf`` slice gives -inf, a slice with +inf (and no NaN) gives +inf,
    a slice with NaN gives NaN.  Errors as :func:`log_softmax`.

    >>> float(logsumexp(np.array([1.0, 1.0])))
    1.6931471805599454
    """
    x, axis, _ = lse_args(logits, axis)
    with np.errstate(all="ignore"):
        xs = np.moveaxis(x, axis, -1).astype(np.float64)
        m = np.max(xs, axis=-1, initial=-np.inf)
        m = np.where(np.isinf(m), 0.0, m)  # keep +-inf from becoming inf - inf = nan
        lse = m + np.log(np.sum(np.exp(xs - m[..., None]), axis=-1))
    return x.dtype.type(lse) if x.ndim == 1 else lse.astype(x.dtype)
