"""Shared helpers for the fastce tests: the float64 PyTorch truth, tolerances, layouts.

The truth for an input is always PyTorch's float64 result on *the values fastce
sees*: logits, weight and probability targets are first converted to the
logits' dtype (as the spec says fastce does) and only then upcast to float64.
So a float32 test measures fastce's float32 arithmetic, not the rounding of the
inputs.
"""

import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)
REDUCTIONS = ("none", "mean", "sum")

# Tolerances |result - truth| <= RTOL * |truth| + ATOL.
#
# float64 (eps = 2.2e-16): a per-sample loss is log(S) - (x_t - max) with S a sum
# of C terms in (0, 1] and S >= 1.  exp/log cost a few ulp; summing C terms costs
# at most ~C * eps relative in S (naive order; pairwise/SIMD orders much less),
# i.e. <= 1000 * 2.2e-16 = 2.2e-13 absolute on log(S) for the C <= 1000 used by
# these tests, and |x| <= ~20 adds ~20 * eps = 4.4e-15.  1e-12 leaves 5x over
# that worst case while still catching any float32 step (errors ~1e-7).
# Tests with C = 131072 use LARGE_C_RTOL64 instead (argued there).
#
# float32 (eps = 1.19e-7), compared with the float64 truth of the same float32
# inputs: rounding x - max costs eps * |x_t - max| <= eps * loss, exp/log a few
# eps, and summing C terms up to ~sqrt(C)..log2(C) eps typically, so a good
# float32 kernel is within a few 1e-7 relative; 1e-5 is the accuracy fastce
# promises.  The error of log(S) is absolute (S >= 1), not relative to a loss
# that can be ~0 when the target is the arg-max, hence ATOL = RTOL: losses
# below 1 are judged on an absolute 1e-5.
TOL = {
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12),
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-5),
}


def class_axis(shape):
    return 0 if len(shape) == 1 else 1


def sample_shape(shape):
    a = class_axis(shape)
    return tuple(shape[:a]) + tuple(shape[a + 1:])


def assert_close(actual, truth, dtype, **override):
    """Compare a fastce result with the float64 truth at the dtype's tolerance.

    Also checks that the result has the logits' dtype and the truth's shape;
    NaNs must be in the same places, infinities equal.
    """
    dtype = np.dtype(dtype)
    assert np.asarray(actual).dtype == dtype, f"dtype {np.asarray(actual).dtype}, expected {dtype}"
    assert np.shape(actual) == np.shape(truth), f"shape {np.shape(actual)}, expected {np.shape(truth)}"
    tol = dict(TOL[dtype], **override)
    np.testing.assert_allclose(np.asarray(actual, np.float64), truth, equal_nan=True, **tol)


def assert_reduced_type(value, dtype):
    """mean/sum results are NumPy scalars of the logits' dtype."""
    assert isinstance(value, np.generic) and not isinstance(value, np.ndarray), type(value)
    assert value.dtype == np.dtype(dtype), value.dtype


def torch_ce(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
             compute_dtype=np.float64):
    """torch.nn.functional.cross_entropy on fastce's view of the inputs, as NumPy float64.

    compute_dtype=np.float64 gives the truth; compute_dtype=logits' dtype gives
    torch's own result at that precision (for "no worse than torch" tests).
    """
    import torch

    logits = np.asarray(logits)
    dtype = logits.dtype
    target = np.asarray(target)
    x = torch.from_numpy(np.array(logits, dtype=compute_dtype))
    if target.dtype.kind == "f":
        t = torch.from_numpy(np.array(target.astype(dtype), dtype=compute_dtype))
    else:
        t = torch.from_numpy(np.array(target, dtype=np.int64))
    w = None
    if weight is not None:
        w = torch.from_numpy(np.array(np.asarray(weight).astype(dtype), dtype=compute_dtype))
    out = torch.nn.functional.cross_entropy(
        x, t, weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    return out.numpy().astype(np.float64)


def torch_log_softmax(logits, axis=-1, compute_dtype=np.float64):
    import torch

    x = torch.from_numpy(np.array(logits, dtype=compute_dtype))
    return torch.log_softmax(x, dim=axis).numpy().astype(np.float64)


def torch_logsumexp(logits, axis=-1, compute_dtype=np.float64):
    import torch

    x = torch.from_numpy(np.array(logits, dtype=compute_dtype))
    return torch.logsumexp(x, dim=axis).numpy().astype(np.float64)


def random_logits(rng, shape, dtype, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def random_index_target(rng, shape, n_ignored=0, ignore_index=-100, dtype=np.int64):
    """Class indices for logits of ``shape``; the first ``n_ignored`` (flat) samples get ignore_index."""
    C = shape[class_axis(shape)]
    t = rng.integers(0, C, size=sample_shape(shape))
    if n_ignored:
        t.reshape(-1)[:n_ignored] = ignore_index
    return t.astype(dtype)


def random_prob_target(rng, shape, dtype=np.float64):
    """Class probabilities of ``shape`` (non-negative, summing to 1 along the class axis)."""
    p = rng.random(shape) ** 3  # uneven, some near 0
    return (p / p.sum(axis=class_axis(shape), keepdims=True)).astype(dtype)


def layouts(a):
    """The same values as ``a`` in other memory layouts: (name, array) pairs.

    Fortran order, a strided view (every other element of a bigger buffer),
    negative strides on every axis, and a read-only copy.  A 0-d array only gets
    the read-only copy.
    """
    a = np.asarray(a)
    readonly = a.copy()
    readonly.flags.writeable = False
    if a.ndim == 0:
        return [("readonly", readonly)]
    full = (slice(None),) * a.ndim
    every_other = (slice(None, None, 2),) * a.ndim
    backwards = (slice(None, None, -1),) * a.ndim
    big = np.full(tuple(2 * n for n in a.shape), np.nan if a.dtype.kind == "f" else 0, a.dtype)
    big[every_other] = a
    strided = big[every_other]
    negative = np.ascontiguousarray(a[backwards])[backwards]
    out = [("fortran", np.asfortranarray(a)), ("strided", strided), ("negative", negative),
           ("readonly", readonly)]
    for name, v in out:
        np.testing.assert_array_equal(v[full], a)
    return out
