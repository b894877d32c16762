"""z_loss, return_z_loss and return_lse (issue 12, part 2) against torch in float64.

Truth: the torch composition in float64 on the exactly upcast inputs,
    loss_i = F.cross_entropy(x, t, reduction="none", ...)_i + z * w_i * logsumexp(x_i)**2
(w_i = weight[t_i], 1 without weights or for probability targets, 0 where ignored),
reduced with torch's denominator (sum of w_i over the kept samples for "mean", the
number of samples for probability targets), and its autograd gradient.

Tolerances are those of tests/_grad_helpers.py (rtol_for: 16 u (L + sqrt(C) + 4)),
with the z-loss's own sizes folded in: its loss term z w lse**2 has an absolute error
of about 2 z w |lse| times lse's (u L), so L grows to L (1 + 2 z max|lse|); its
gradient term 2 z w lse p_c is of size up to 2 z wmax max|lse| times the reduction's
factor, so the gradient scale grows by that factor over grad_scale's 2 wmax s.
"""
import numpy as np
import pytest

import fastce
import fastce.reference
from _grad_helpers import (seed_of, assert_both_raise, assert_grad_close, grad_scale, logit_bound,
                           make_case, rtol_for, torch_lm_truth as torch_z_truth,
                           torch_single_thread)  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")

SHAPES = [(7,), (64, 10), (5, 300), (2, 70000), (3, 6, 4)]


def _check(got, truth, x, t, z, kw, dtype):
    loss, grad, zpart, lse = got
    tl, tz, tlse, tg = truth
    C = x.shape[0 if x.ndim == 1 else 1]
    lmax = float(np.abs(tlse).max()) if tlse.size else 0.0
    L = logit_bound(x, C)
    rtol = rtol_for(dtype, C, L)
    w = kw.get("weight")
    wmax = 1.0 if w is None else float(np.abs(w).max())
    atol_loss = rtol * L * (1 + 2 * z * lmax) * wmax * (x.size // C if kw.get("reduction") == "sum" else 1)
    # the z part has the loss's type: a NumPy scalar, or an ndarray for "none" (0-d
    # for 1-D logits)
    assert type(zpart) is type(loss) and np.shape(zpart) == np.shape(loss)
    for a, b in ((loss, tl), (zpart, tz)):
        assert np.asarray(a).dtype == dtype
        np.testing.assert_allclose(np.float64(a), b, rtol=rtol, atol=atol_loss)
    assert lse.dtype == dtype and lse.shape == tlse.shape
    np.testing.assert_allclose(lse.astype(np.float64), tlse, rtol=rtol, atol=rtol * L)
    scale = grad_scale(x, t, w, kw.get("reduction", "mean"), kw.get("ignore_index", -100)) * (
        1 + 2 * z * lmax)
    assert_grad_close(grad, tg, rtol, scale)


OPTIONS = [dict(), dict(weight=True), dict(weight=True, label_smoothing=0.1),
           dict(label_smoothing=0.2, reduction="sum"), dict(weight=True, reduction="none"),
           dict(ignore=True), dict(ignore=True, weight=True, label_smoothing=0.05)]


@pytest.mark.parametrize("opt", range(len(OPTIONS)))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_z_loss_matches_torch(isa, dtype, shape, opt):
    rng = np.random.default_rng(seed_of(shape, opt))
    o = dict(OPTIONS[opt])
    x, t = make_case(rng, shape, dtype, ignore=0.3 if o.pop("ignore", False) else None)
    C = shape[0 if len(shape) == 1 else 1]
    if o.pop("weight", False):
        o["weight"] = (rng.random(C) + 0.5).astype(dtype)
    z = 1e-3
    truth = torch_z_truth(x, t, z, **o)
    for mod in (fastce.reference, fastce):   # fastce's results kept for below
        loss, grad, zpart, lse = mod.cross_entropy_with_grad(
            x, t, z_loss=z, return_z_loss=True, return_lse=True, **o)
        _check((loss, grad, zpart, lse), truth, x, t, z, o, dtype)
    # the loss-only call gives the same bits (and no tuple without the flags)
    assert np.array_equal(fastce.cross_entropy(x, t, z_loss=z, **o), loss, equal_nan=True)
    l2, lse2 = fastce.cross_entropy(x, t, z_loss=z, return_lse=True, **o)
    assert np.array_equal(l2, loss, equal_nan=True) and np.array_equal(lse2, lse)
    # lse alone leaves the loss as it is without the option
    l3, lse3 = fastce.cross_entropy_with_grad(x, t, return_lse=True, **o)[::2]
    assert np.array_equal(l3, fastce.cross_entropy(x, t, **o), equal_nan=True)
    assert np.array_equal(lse3, lse)


@pytest.mark.parametrize("shape", [(64, 10), (5, 300), (3, 6, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_z_loss_probability_targets(isa, dtype, shape):
    rng = np.random.default_rng(3)
    x, t = make_case(rng, shape, dtype, prob=True)
    C = shape[1]
    for o in (dict(), dict(weight=(rng.random(C) + 0.5).astype(dtype), label_smoothing=0.1),
              dict(reduction="none")):
        truth = torch_z_truth(x, t, 0.01, **o)
        for mod in (fastce, fastce.reference):
            got = mod.cross_entropy_with_grad(x, t, z_loss=0.01, return_z_loss=True,
                                              return_lse=True, **o)
            _check(got, truth, x, t, 0.01, o, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_z_loss_grad_output_in_place_and_threads(isa, dtype):
    rng = np.random.default_rng(4)
    x, t = make_case(rng, (300, 500), dtype, ignore=0.2)
    go = rng.standard_normal(300)
    truth = torch_z_truth(x, t, 0.05, reduction="none", grad_output=go)
    ref = fastce.cross_entropy_with_grad(x, t, z_loss=0.05, reduction="none", grad_output=go,
                                         return_z_loss=True, return_lse=True, n_threads=1)
    _check(ref, truth, x, t, 0.05, dict(reduction="none"), dtype)
    got = fastce.cross_entropy_with_grad(x, t, z_loss=0.05, reduction="none", grad_output=go,
                                         return_z_loss=True, return_lse=True, n_threads=2)
    for a, b in zip(got, ref):
        assert np.array_equal(a, b)
    xc = x.copy()
    loss, g, lse = fastce.cross_entropy_with_grad(xc, t, z_loss=0.05, reduction="none",
                                                  grad_output=go, out=xc, return_lse=True)
    assert g is xc
    assert np.array_equal(loss, ref[0]) and np.array_equal(g, ref[1]) and np.array_equal(lse, ref[3])


def test_lse_of_ignored_and_special_rows(isa):
    """Every sample's lse is returned (ignored ones too), as fastce.logsumexp gives it:
    -inf for a row of -inf, +inf for a row with +inf, NaN for a row with NaN."""
    for shape in [(6, 5), (6, 300), (6, 70000)]:
        x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
        x[1] = -np.inf
        x[2, 3] = np.inf
        x[3, 2] = np.nan
        t = np.array([0, -100, -100, -100, -100, 1])
        for mod in (fastce, fastce.reference):
            loss, lse = mod.cross_entropy(x, t, return_lse=True, reduction="none")
            np.testing.assert_array_equal(lse, mod.logsumexp(x))
            np.testing.assert_array_equal(loss[1:5], 0)
        xk = np.moveaxis(np.stack([x[:, :5]] * 3, -1), 0, 0)  # (6, 5, 3): K-dim
        tk = np.stack([t] * 3, -1)
        _, lse = fastce.cross_entropy(xk, tk, return_lse=True, reduction="none")
        np.testing.assert_array_equal(lse, fastce.logsumexp(xk, axis=1))


def test_z_loss_mean_over_no_weight():
    """All samples ignored: the mean is NaN (0/0) with the z-loss too; its z part NaN."""
    x = np.zeros((3, 4))
    t = np.full(3, -100)
    for mod in (fastce, fastce.reference):
        loss, zpart, lse = mod.cross_entropy(x, t, z_loss=0.1, return_z_loss=True,
                                             return_lse=True)
        assert np.isnan(loss) and np.isnan(zpart)
        np.testing.assert_allclose(lse, np.log(4.0))


@pytest.mark.parametrize("module", ["fastce", "reference"])
@pytest.mark.parametrize("bad, exc, message", [
    (dict(z_loss=-0.1), ValueError, "z_loss must be finite and >= 0, got -0.1"),
    (dict(z_loss=float("nan")), ValueError, "z_loss must be finite and >= 0, got nan"),
    (dict(z_loss=float("inf")), ValueError, "z_loss must be finite and >= 0, got inf"),
    (dict(z_loss="0.1"), TypeError, "z_loss must be a real number >= 0, got '0.1' of type str"),
    (dict(z_loss=True), TypeError, "z_loss must be a real number >= 0, got True of type bool"),
    (dict(return_lse=1), TypeError, "return_lse must be True or False, got 1 of type int"),
    (dict(return_z_loss=None), TypeError,
     "return_z_loss must be True or False, got None of type NoneType"),
])
def test_bad_lm_options(module, bad, exc, message):
    mod = fastce if module == "fastce" else fastce.reference
    assert_both_raise(mod, np.zeros((2, 3)), np.array([0, 1]), bad, exc, message)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_z_loss_and_lse(dtype, reduction):
    import fastce.torch as ft
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(40, 300, generator=g, dtype=dtype) * 3
    t = torch.randint(0, 300, (40,), generator=g)
    t[::7] = -100
    w = torch.rand(300, generator=g, dtype=dtype) + 0.5
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    npdt = np.float32 if dtype == torch.float32 else np.float64
    tl, tz, tlse, tg = torch_z_truth(x0.numpy(), t.numpy(), 0.02,
                                     **dict(kw, weight=w.numpy()))
    x = x0.clone().requires_grad_(True)
    loss, zpart, lse = ft.cross_entropy(x, t, z_loss=0.02, return_z_loss=True,
                                        return_lse=True, **kw)
    assert loss.dtype == zpart.dtype == lse.dtype == dtype
    assert loss.requires_grad and not zpart.requires_grad and not lse.requires_grad
    loss.sum().backward(retain_graph=True)
    o = dict(kw, weight=w.numpy())
    _check((loss.detach().numpy(), x.grad.numpy(), zpart.numpy(), lse.numpy()),
           (tl, tz, tlse, tg), x0.numpy(), t.numpy(), 0.02, o, npdt)
    # a second backward through the retained graph recomputes the same gradient
    first = x.grad.clone()
    x.grad = None
    loss.sum().backward()
    assert torch.equal(x.grad, first)
    # the module, and inplace_backward over a non-leaf
    crit = ft.CrossEntropyLoss(z_loss=0.02, inplace_backward=True, **kw)
    assert "z_loss=0.02" in repr(crit)
    leaf = x0.clone().requires_grad_(True)
    y = leaf * 1.0
    crit(y, t).sum().backward()
    assert torch.equal(leaf.grad, first)
    # without a gradient: the same values
    with torch.no_grad():
        l2, z2, lse2 = ft.cross_entropy(x0, t, z_loss=0.02, return_z_loss=True,
                                        return_lse=True, **kw)
    assert torch.equal(l2, loss.detach()) and torch.equal(z2, zpart) and torch.equal(lse2, lse)
