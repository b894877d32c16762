"""fastce.cross_entropy_with_grad: gradient vs torch autograd (float64 truth),
finite differences, p_y ~ 1 accuracy, out=, errors, input immutability.

Tolerances are argued in _grad_helpers.py (rtol_for) and at each special test.
The lead's conftest runs every test once per available ISA.
"""

import math
import zlib

import numpy as np
import pytest

import fastce
from _grad_helpers import (assert_grad_close, assert_loss_close,
                           grad_scale, logit_bound, loss_atol, make_case,
                           num_classes, rtol_for, torch, torch_truth,
                           unit_roundoff)
from _grad_helpers import torch_single_thread  # noqa: F401 (autouse fixture)

# The torch comparisons need torch; the finite-difference, p_y ~ 1, out=,
# error and immutability tests below do not.
needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")

DTYPES = [np.float32, np.float64]
REDUCTIONS = ["none", "mean", "sum"]

# Option sets: (name, kwargs for make_case, kwargs for the loss).
OPTIONS = [
    ("plain", {}, {}),
    ("weight", {}, {"weight": True}),
    ("ignore", {"ignore": 0.3}, {}),
    ("ignore_custom", {"ignore": 0.3, "ignore_index": 1}, {"ignore_index": 1}),
    ("smooth", {}, {"label_smoothing": 0.2}),
    ("all", {"ignore": 0.25}, {"weight": True, "label_smoothing": 0.15}),
    ("prob", {"prob": True}, {}),
    ("prob_weight_smooth", {"prob": True},
     {"weight": True, "label_smoothing": 0.1}),
]
SHAPES = [(5,), (7, 5), (4, 5, 3), (3, 4, 2, 3), (6, 1), (6, 2)]


def _weight(rng, C, dtype):
    return rng.uniform(0.5, 2.0, size=C).astype(dtype)


def _check(x, t, *, weight=None, ignore_index=-100, reduction="mean",
           label_smoothing=0.0, grad_output=None):
    """Compare fastce's (loss, grad) with the float64 torch truth and with
    fastce.cross_entropy; returns (loss, grad)."""
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
              label_smoothing=label_smoothing)
    loss, grad = fastce.cross_entropy_with_grad(x, t, grad_output=grad_output,
                                                **kw)
    tl, tg = torch_truth(x, t, grad_output=grad_output, **kw)
    xa = np.asarray(x)
    C = num_classes(xa)
    L = logit_bound(xa, C)
    rtol = rtol_for(xa.dtype, C, L)
    # shapes/dtypes of the results
    assert grad.shape == xa.shape and grad.dtype == xa.dtype
    if reduction == "none":
        # (for 1-D logits the per-sample loss is 0-d; ndarray or NumPy
        # scalar both acceptable there)
        assert np.shape(loss) == tl.shape
        assert np.asarray(loss).dtype == xa.dtype
    else:
        assert np.ndim(loss) == 0 and np.asarray(loss).dtype == xa.dtype
    assert_loss_close(loss, tl, rtol, loss_atol(rtol, L, xa, t, weight,
                                                reduction))
    assert_grad_close(grad, tg, rtol,
                      grad_scale(x, t, weight, reduction, ignore_index,
                                 grad_output))
    # the loss returned with the gradient is the loss of cross_entropy
    plain = fastce.cross_entropy(x, t, **kw)
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(plain))
    if np.asarray(t).shape != xa.shape:   # ignored samples: exactly zero
        ign = np.asarray(t) == ignore_index
        gm = np.moveaxis(grad, 0 if xa.ndim == 1 else 1, -1)
        assert not np.any(gm[ign])
    return loss, grad


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("opt", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_grad_matches_torch(opt, shape, reduction, dtype):
    name, case_kw, loss_kw = opt
    rng = np.random.default_rng(zlib.crc32(repr((name, shape, reduction,
                                                 dtype.__name__)).encode()))
    C = shape[0 if len(shape) == 1 else 1]
    if loss_kw.get("ignore_index", -100) >= C:
        pytest.skip("custom ignore_index is not a class here")
    x, t = make_case(rng, shape, dtype, **case_kw)
    kw = dict(loss_kw)
    if kw.pop("weight", False):
        kw["weight"] = _weight(rng, C, dtype)
    _check(x, t, reduction=reduction, **kw)
    if reduction == "none":
        sample_shape = x.shape[:1] + x.shape[2:] if x.ndim > 1 else ()
        go = rng.standard_normal(sample_shape).astype(dtype)
        _check(x, t, reduction=reduction, grad_output=go, **kw)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_all_ignored_and_1d_ignored(dtype):
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], dtype=dtype)
    t = np.array([-100, -100])
    for red in REDUCTIONS:
        loss, grad = _check(x, t, reduction=red)
        assert not grad.any()
        if red == "mean":
            assert np.isnan(loss)
    loss, grad = _check(x[0], np.array(-100), reduction="mean")
    assert np.isnan(loss) and not grad.any()


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_large_num_classes(dtype, smoothing):
    # C = 131072 with 2 rows: rtol_for grows with sqrt(C) (~3.7e-4 in
    # float32, sequential-summation rounding); see _grad_helpers.
    rng = np.random.default_rng(131072)
    x, t = make_case(rng, (2, 131072), dtype, scale=2.0)
    w = _weight(rng, 131072, dtype)
    _check(x, t, reduction="mean", label_smoothing=smoothing)
    _check(x, t, weight=w, reduction="none", label_smoothing=smoothing)
    # Tighter, implementation-specific: fastce folds its per-block sums into
    # double (fastce_kernel.c header), so the sqrt(C) summation term is
    # absent and what remains is the exp argument's rounding u*|x - lse|
    # <= u*L (L ~ 22 here) plus a few ulp of exp: rtol = 16 u (L + 4),
    # ~2.5e-5 in float32 (measured ~2e-6), ~6e-14 in float64.
    loss, grad = fastce.cross_entropy_with_grad(x, t, weight=w,
                                                label_smoothing=smoothing)
    tl, tg = torch_truth(x, t, weight=w, label_smoothing=smoothing)
    L = logit_bound(x, 131072)
    rtol = 16 * unit_roundoff(dtype) * (L + 4)
    assert_loss_close(loss, tl, rtol, rtol * L)
    assert_grad_close(grad, tg, rtol, grad_scale(x, t, w, "mean"))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 3), (2, 4, 0)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(shape, reduction, dtype):
    x = np.zeros(shape, dtype=dtype)
    t = np.zeros(shape[:1] + shape[2:], dtype=np.int64)
    loss, grad = fastce.cross_entropy_with_grad(x, t, reduction=reduction)
    assert grad.shape == shape and grad.dtype == dtype
    if reduction == "mean":
        assert np.isnan(loss)
    elif reduction == "sum":
        assert loss == 0 and np.asarray(loss).dtype == dtype
    else:
        assert loss.shape == t.shape
        go = np.zeros(t.shape, dtype=dtype)
        _, g2 = fastce.cross_entropy_with_grad(x, t, reduction="none",
                                               grad_output=go)
        assert g2.shape == shape


def test_target_integer_dtypes():
    rng = np.random.default_rng(3)
    x, t = make_case(rng, (6, 5), np.float64)
    ref = fastce.cross_entropy_with_grad(x, t)
    for dt in (np.int8, np.int32, np.uint8, np.uint16, np.uint64):
        loss, grad = fastce.cross_entropy_with_grad(x, t.astype(dt))
        assert loss == ref[0]
        np.testing.assert_array_equal(grad, ref[1])


# ----------------------------------------------------------- memory layouts

def _layouts(x):
    """Yield (name, array) with x's values in various layouts."""
    big = np.zeros(tuple(2 * n for n in x.shape), dtype=x.dtype)
    sl = tuple(slice(None, None, 2) for _ in x.shape)
    big[sl] = x
    yield "strided", big[sl]
    yield "fortran", np.asfortranarray(x)
    rev = np.ascontiguousarray(x[::-1])
    yield "negative", rev[::-1]
    ro = x.copy()
    ro.setflags(write=False)
    yield "readonly", ro
    if x.ndim >= 2:
        tr = np.ascontiguousarray(np.swapaxes(x, 0, -1))
        yield "transposed", np.swapaxes(tr, 0, -1)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(7, 5), (4, 5, 3)], ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_layouts(shape, dtype, prob):
    rng = np.random.default_rng(11)
    x, t = make_case(rng, shape, dtype, prob=prob, ignore=None if prob else 0.2)
    w = _weight(rng, shape[1], dtype)
    go = rng.standard_normal(shape[:1] + shape[2:]).astype(dtype)
    ref = fastce.cross_entropy_with_grad(x, t, weight=w, reduction="none",
                                         grad_output=go, label_smoothing=0.1)
    for name, xl in _layouts(x):
        for tname, tl in [("c", t)] + list(_layouts(t)):
            for wname, wl in [("c", w), ("strided", np.repeat(w, 2)[::2])]:
                loss, grad = _check(xl, tl, weight=wl, reduction="none",
                                    grad_output=go, label_smoothing=0.1)
                # layout must not change the numbers beyond rounding order
                assert_grad_close(grad, ref[1], rtol_for(dtype, shape[1], 12))
                assert grad.shape == shape
    # also strided grad_output
    go_s = np.repeat(go, 2, axis=0)[::2]
    loss, grad = fastce.cross_entropy_with_grad(x, t, weight=w,
                                                reduction="none",
                                                grad_output=go_s,
                                                label_smoothing=0.1)
    np.testing.assert_array_equal(grad, ref[1])


# ------------------------------------------------- finite differences (NumPy)

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["index", "prob"])
def test_finite_differences(reduction, case):
    """Central differences of fastce.cross_entropy, torch-independent.

    float64, h = 1e-4.  Truncation error of the central difference is
    h**2/6 * |f'''|; every third derivative of a softmax cross-entropy term
    w.r.t. one logit is bounded by 1 times the term's weight (|p(1-p)(1-2p)|
    <= 0.1), and with weights <= 2, |grad_output| <= 3 and <= 12 samples
    that is <= 1e-8 * 0.1 * 2 * 3 * 12 / 6 ~ 1.2e-8 for "sum"/"none" (less for
    "mean").  Rounding error: the two evaluations differ only in one row,
    whose loss (<= ~20 in size) carries <= ~50 u ~ 6e-15 error, plus the
    reduction's final summation (~12 u * |f|), i.e. <= ~1e-13 / (2h) ~ 5e-10.
    (Even without that correlation, each evaluation's whole error is
    <= 6 samples * ~50 u * 20 ~ 7e-13, i.e. <= 4e-9 after dividing by 2h.)
    Total < 2e-8; we use atol = 5e-8, still ~10**5 times smaller than the
    gradient entries being checked (~1e-2..1).
    """
    rng = np.random.default_rng(7)
    shape = (3, 4, 2)
    if case == "index":
        x, t = make_case(rng, shape, np.float64, ignore=0.2, scale=2.0)
    else:
        x, t = make_case(rng, shape, np.float64, prob=True, scale=2.0)
    w = rng.uniform(0.5, 2.0, size=4)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    go = None
    if reduction == "none":
        go = rng.uniform(-3, 3, size=(3, 2))
    _, grad = fastce.cross_entropy_with_grad(x, t, grad_output=go, **kw)

    def f(z):
        loss = fastce.cross_entropy(z, t, **kw)
        return float(np.sum(loss * go)) if go is not None else float(loss)

    h = 1e-4
    fd = np.empty_like(x)
    for k in np.ndindex(x.shape):
        zp = x.copy()
        zp[k] += h
        zm = x.copy()
        zm[k] -= h
        fd[k] = (f(zp) - f(zm)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=0, atol=5e-8)
    assert np.abs(fd).max() > 1e-2


# --------------------------------------------------- p_y ~ 1 (cancellation)

def _exact_confident(x, y):
    """Float64 gradient of the "sum" loss (and the per-row losses) for rows
    whose target logit is the largest, computed without cancellation:
    with s = sum_{j!=y} exp(x_j - x_y) (all terms <= 1),
    grad_y = -(sum_{j!=y} p_j) = -s/(1+s), grad_j = exp(x_j - x_y)/(1+s),
    loss = log1p(s).  Relative error a few float64 u."""
    x = np.asarray(x, dtype=np.float64)
    g = np.empty_like(x)
    loss = np.empty(len(y))
    for i, yi in enumerate(y):
        e = np.exp(x[i] - x[i, yi])
        e[yi] = 0.0
        s = e.sum()
        g[i] = e / (1 + s)
        g[i, yi] = -s / (1 + s)
        loss[i] = np.log1p(s)
    return g, loss


def test_confident_target_term_float32():
    """Logits [30, 0, 0], target 0 in float32: grad_0 = -(p_1 + p_2)
    ~ -1.9e-13.  A naive softmax-minus-one gives 0 (p_0 rounds to 1) or an
    error of ~6e-8, 10**5 times the value.  Computed as -(sum of the other
    probabilities), float32 reaches a relative error of a few u: each
    exp(x_j - lse) is accurate to ~u*|x_j - lse| ~ 30 u relative (the
    absolute rounding of an argument of size 30), so rtol = 1e-5 (~80 u)."""
    rows = [[30, 0, 0], [20, 1, -3], [12, 0, 0.5, -2, 3], [60, 0, 0],
            [15, 15, 0], [9, -1, -1]]
    C = max(len(r) for r in rows)
    x = np.full((len(rows), C), -np.inf)
    for i, r in enumerate(rows):
        x[i, :len(r)] = r
    # pad with -inf logits (probability 0, allowed)
    x = x.astype(np.float32)
    y = np.array([0, 0, 0, 0, 1, 0])
    loss, grad = fastce.cross_entropy_with_grad(x, y, reduction="sum")
    truth, tloss = _exact_confident(x, y)
    np.testing.assert_allclose(grad, truth, rtol=1e-5, atol=0)
    # The losses log1p(s) (1.9e-13 .. 0.69) are only required to torch's
    # accuracy, ~u*|lse| absolute (lse - x_y with lse up to 60 in float32:
    # 60 * 6e-8 = 3.6e-6; torch itself returns 0 for [30, 0, 0]), so
    # atol = 1e-5.
    lnone = fastce.cross_entropy(x, y, reduction="none")
    np.testing.assert_allclose(lnone, tloss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), tloss.sum(), rtol=1e-5, atol=1e-5)


def test_confident_target_term_float64_and_scaled():
    """Same in float64 (rtol 1e-12 ~ 5000 u, arguments up to 60 in size) and
    with "mean"/weights/"none" scaling: the scale must multiply, not
    destroy, the tiny target-class term."""
    x = np.array([[30.0, 0, 0], [45.0, 2.0, -1.0], [25.0, 0.0, 1.0]])
    y = np.array([0, 0, 0])
    truth, _ = _exact_confident(x, y)
    _, g = fastce.cross_entropy_with_grad(x, y, reduction="sum")
    np.testing.assert_allclose(g, truth, rtol=1e-12, atol=0)
    w = np.array([2.0, 0.5, 1.0])
    _, g = fastce.cross_entropy_with_grad(x, y, weight=w, reduction="mean")
    np.testing.assert_allclose(g, truth * 2.0 / 6.0, rtol=1e-12, atol=0)
    go = np.array([1.5, -2.0, 0.25])
    for dt, rtol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        _, g = fastce.cross_entropy_with_grad(x.astype(dt), y,
                                              reduction="none",
                                              grad_output=go.astype(dt))
        np.testing.assert_allclose(g, truth * go[:, None], rtol=rtol, atol=0)


# ------------------------------------------------------------------ out=

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_out(dtype, reduction):
    rng = np.random.default_rng(5)
    x, t = make_case(rng, (6, 5, 2), dtype, ignore=0.2)
    w = _weight(rng, 5, dtype)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    loss, grad = fastce.cross_entropy_with_grad(x, t, **kw)

    out = np.full(x.shape, np.nan, dtype=dtype)
    l2, g2 = fastce.cross_entropy_with_grad(x, t, out=out, **kw)
    assert g2 is out
    np.testing.assert_array_equal(out, grad)
    np.testing.assert_array_equal(np.asarray(l2), np.asarray(loss))

    # non-contiguous and Fortran-ordered out
    for o in (np.full(tuple(2 * n for n in x.shape), np.nan,
                      dtype=dtype)[::2, ::2, ::2],
              np.asfortranarray(np.full(x.shape, np.nan, dtype=dtype))):
        _, g3 = fastce.cross_entropy_with_grad(x, t, out=o, **kw)
        assert g3 is o
        np.testing.assert_array_equal(o, grad)

    # in place: out=logits
    xi = x.copy()
    l4, g4 = fastce.cross_entropy_with_grad(xi, t, out=xi, **kw)
    assert g4 is xi
    np.testing.assert_array_equal(xi, grad)
    np.testing.assert_array_equal(np.asarray(l4), np.asarray(loss))


def test_out_in_place_prob_targets_and_1d():
    rng = np.random.default_rng(6)
    x, t = make_case(rng, (4, 3), np.float64, prob=True)
    loss, grad = fastce.cross_entropy_with_grad(x, t, label_smoothing=0.2)
    xi = x.copy()
    l2, g2 = fastce.cross_entropy_with_grad(xi, t, label_smoothing=0.2, out=xi)
    assert g2 is xi and l2 == loss
    np.testing.assert_array_equal(xi, grad)
    x1 = x[0].copy()
    loss, grad = fastce.cross_entropy_with_grad(x1, np.array(2))
    l2, g2 = fastce.cross_entropy_with_grad(x1, np.array(2), out=x1)
    assert l2 == loss
    np.testing.assert_array_equal(x1, grad)


def test_bad_out():
    rng = np.random.default_rng(8)
    x, t = make_case(rng, (4, 3), np.float64)
    with pytest.raises(ValueError):
        fastce.cross_entropy_with_grad(x, t, out=np.empty((3, 4)))
    with pytest.raises(ValueError):
        fastce.cross_entropy_with_grad(x, t, out=np.empty(12))
    with pytest.raises(TypeError):
        fastce.cross_entropy_with_grad(x, t, out=np.empty((4, 3), np.float32))
    ro = np.empty((4, 3))
    ro.setflags(write=False)
    with pytest.raises(ValueError):
        fastce.cross_entropy_with_grad(x, t, out=ro)
    # overlapping the logits without being them
    buf = np.zeros(15)
    xs = buf[:12].reshape(4, 3)
    xs[...] = x
    with pytest.raises(ValueError):
        fastce.cross_entropy_with_grad(xs, t, out=buf[3:].reshape(4, 3))
    # overlapping the weight
    out = np.empty((4, 3))
    with pytest.raises(ValueError):
        fastce.cross_entropy_with_grad(x, t, weight=out[1], out=out)
    # overlapping a probability target
    tp = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError):
        fastce.cross_entropy_with_grad(x, tp, out=tp)
    # out=logits needs writable, C-contiguous logits
    xr = x.copy()
    xr.setflags(write=False)
    with pytest.raises(ValueError):
        fastce.cross_entropy_with_grad(xr, t, out=xr)
    xf = np.asfortranarray(x)
    with pytest.raises(ValueError):
        fastce.cross_entropy_with_grad(xf, t, out=xf)
    xn = np.zeros((4, 6))[:, ::2]
    with pytest.raises(ValueError):
        fastce.cross_entropy_with_grad(xn, t, out=xn)


def test_bad_grad_output():
    rng = np.random.default_rng(9)
    x, t = make_case(rng, (4, 3, 2), np.float64)
    for bad in (np.ones(4), np.ones((2, 4)), np.ones((4, 2, 1)),
                np.ones((4, 3, 2))):
        with pytest.raises(ValueError):
            fastce.cross_entropy_with_grad(x, t, reduction="none",
                                           grad_output=bad)
    with pytest.raises(TypeError):
        fastce.cross_entropy_with_grad(x, t, reduction="none",
                                       grad_output=np.ones((4, 2), complex))
    with pytest.raises(TypeError):
        fastce.cross_entropy_with_grad(x, t, reduction="none",
                                       grad_output=np.full((4, 2), "a"))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_inputs_unchanged(reduction, prob):
    rng = np.random.default_rng(10)
    x, t = make_case(rng, (5, 4, 3), np.float32, prob=prob,
                     ignore=None if prob else 0.3)
    w = _weight(rng, 4, np.float64)          # converted: must not be touched
    go = rng.standard_normal((5, 3))         # float64 grad_output for f32
    copies = [a.copy() for a in (x, t, w, go)]
    fastce.cross_entropy_with_grad(
        x, t, weight=w, reduction=reduction, label_smoothing=0.3,
        grad_output=go if reduction == "none" else None)
    fastce.cross_entropy_with_grad(
        x, t, weight=w, reduction=reduction, label_smoothing=0.3,
        grad_output=go if reduction == "none" else None,
        out=np.empty_like(x))
    for a, c in zip((x, t, w, go), copies):
        np.testing.assert_array_equal(a, c)
        assert a.dtype == c.dtype


@needs_torch
def test_special_values_match_torch():
    # -inf logits (probability 0) and a NaN row, as torch.
    x = np.array([[2.0, -np.inf, 0.5], [np.nan, 0.0, 1.0], [1.0, 2.0, 3.0]])
    t = np.array([0, 1, 2])
    for red in REDUCTIONS:
        loss, grad = fastce.cross_entropy_with_grad(x, t, reduction=red)
        tl, tg = torch_truth(x, t, reduction=red)
        np.testing.assert_allclose(np.asarray(loss), tl, rtol=1e-14,
                                   equal_nan=True)
        np.testing.assert_allclose(grad, tg, rtol=1e-14, atol=1e-16,
                                   equal_nan=True)
    assert math.isfinite(grad[0, 1]) and grad[0, 1] == 0
