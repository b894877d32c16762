"""logit_scale and softcap (issue 12, part 2) against torch in float64.

Truth: the torch composition in float64 on the exactly upcast inputs (torch_lm_truth):
    z = logit_scale * x,  then with a softcap  z = softcap * tanh(z / softcap),
    loss = F.cross_entropy(z, ...) (+ the z-loss of z), gradient d loss / d x by autograd.

Tolerances are tests/_grad_helpers.py's (rtol_for: 16 u (L + sqrt(C) + 4)) with L the
bound of the *transformed* logits (what the exps and the loss see), and the transform's
own error folded in: the kernel forms z in the dtype, s x to one rounding (and s itself
rounded: 2 u |z|), softcap's tanh to about 2 ulp and u = s / cap rounded (together under
4 u cap absolute), so L grows by cap. The gradient is dz/dx = s sech^2 times the
gradient in z: its scale (grad_scale's 2 wmax s_reduction) is times logit_scale.
"""
import numpy as np
import pytest

import fastce
import fastce.reference
from _grad_helpers import (seed_of, assert_grad_close, assert_both_raise, make_case, rtol_for,
                           torch_lm_truth, torch_single_thread)  # noqa: F401  (fixture)
from _grad_helpers import check_lm as check

torch = pytest.importorskip("torch")

SHAPES = [(7,), (64, 10), (5, 300), (2, 70000), (3, 6, 4), (2, 3, 40)]
TRANSFORMS = [dict(logit_scale=0.7), dict(logit_scale=2.5), dict(softcap=5.0),
              dict(logit_scale=3.0, softcap=8.0), dict(logit_scale=0.25, softcap=30.0)]
OPTIONS = [dict(), dict(weight=True, label_smoothing=0.1), dict(reduction="none"),
           dict(ignore=True, reduction="sum"), dict(z_loss=1e-3, weight=True)]


def case(shape, dtype, opt, seed):
    rng = np.random.default_rng(seed)
    o = dict(OPTIONS[opt])
    x, t = make_case(rng, shape, dtype, ignore=0.3 if o.pop("ignore", False) else None,
                     scale=4.0)
    C = shape[0 if len(shape) == 1 else 1]
    if o.pop("weight", False):
        o["weight"] = (rng.random(C) + 0.5).astype(dtype)
    return x, t, o


@pytest.mark.parametrize("opt", range(len(OPTIONS)))
@pytest.mark.parametrize("tf", range(len(TRANSFORMS)))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transform_matches_torch(isa, dtype, shape, tf, opt):
    x, t, o = case(shape, dtype, opt, seed_of(shape, tf, opt))
    kw = dict(o, **TRANSFORMS[tf])
    truth = torch_lm_truth(x, t, kw.get("z_loss", 0.0), **{k: v for k, v in kw.items()
                                                           if k != "z_loss"})
    for mod in (fastce.reference, fastce):  # fastce's results kept for below
        got = mod.cross_entropy_with_grad(x, t, return_z_loss=True, return_lse=True, **kw)
        check(got, truth, x, t, kw, dtype)
    # the loss-only call gives the same bits as the call with a gradient
    assert np.array_equal(fastce.cross_entropy(x, t, **kw), got[0], equal_nan=True)
    l2, lse2 = fastce.cross_entropy(x, t, return_lse=True, **kw)
    assert np.array_equal(l2, got[0], equal_nan=True) and np.array_equal(lse2, got[3])


@pytest.mark.parametrize("shape", [(64, 10), (5, 300), (3, 6, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transform_probability_targets(isa, dtype, shape):
    rng = np.random.default_rng(11)
    x, t = make_case(rng, shape, dtype, prob=True, scale=4.0)
    C = shape[1]
    for o in (dict(softcap=4.0), dict(logit_scale=1.5, softcap=6.0, label_smoothing=0.1,
                                      weight=(rng.random(C) + 0.5).astype(dtype)),
              dict(logit_scale=0.5, reduction="none")):
        truth = torch_lm_truth(x, t, 0.0, **o)
        for mod in (fastce, fastce.reference):
            got = mod.cross_entropy_with_grad(x, t, return_lse=True, **o)
            check(got, truth, x, t, o, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transform_grad_output_in_place_and_threads(isa, dtype):
    rng = np.random.default_rng(12)
    x, t = make_case(rng, (300, 500), dtype, ignore=0.2, scale=5.0)
    go = rng.standard_normal(300)
    kw = dict(logit_scale=1.3, softcap=7.0, z_loss=0.01, reduction="none")
    truth = torch_lm_truth(x, t, 0.01, reduction="none", grad_output=go, logit_scale=1.3,
                           softcap=7.0)
    ref = fastce.cross_entropy_with_grad(x, t, grad_output=go, return_z_loss=True,
                                         return_lse=True, n_threads=1, **kw)
    check(ref, truth, x, t, dict(kw, grad_output=go), dtype)
    got = fastce.cross_entropy_with_grad(x, t, grad_output=go, return_z_loss=True,
                                         return_lse=True, n_threads=2, **kw)
    for a, b in zip(got, ref):
        assert np.array_equal(a, b)
    xc = x.copy()
    loss, g, lse = fastce.cross_entropy_with_grad(xc, t, grad_output=go, out=xc,
                                                  return_lse=True, **kw)
    assert g is xc
    assert np.array_equal(loss, ref[0]) and np.array_equal(g, ref[1]) and np.array_equal(lse, ref[3])


@pytest.mark.parametrize("shape", [(6, 5), (6, 300), (6, 140000), (6, 5, 3)])
def test_softcap_of_special_logits(isa, shape):
    """A softcap takes +-inf to +-cap (finite: torch's tanh gives the same), NaN stays
    NaN; huge magnitudes are capped, their gradient sech^2 is 0, not NaN."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    x[1] = -np.inf
    x[2, 3] = np.inf
    x[3, 2] = 1e38
    x[4, 1] = -3e38
    t = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    t[0] = 3
    x_nan = x.copy()
    x_nan[5, 0] = np.nan
    kw = dict(softcap=10.0, reduction="none")
    truth = torch_lm_truth(x, t, 0.0, **kw)
    got = fastce.cross_entropy_with_grad(x, t, return_lse=True, **kw)
    check(got, truth, x, t, kw, np.float32)
    assert np.isfinite(got[0]).all() and np.isfinite(got[1]).all()
    loss, grad, lse = fastce.cross_entropy_with_grad(x_nan, t, return_lse=True, **kw)
    assert np.isnan(loss[5]).all() and np.isnan(lse[5]).all() and np.isnan(grad[5]).all()
    keep = np.arange(shape[0]) != 5
    assert np.array_equal(loss[keep], got[0][keep]) and np.array_equal(grad[keep], got[1][keep])


def test_softcap_gradient_keeps_its_relative_accuracy(isa):
    """Far out on the tanh, sech^2 is tiny (4 e^{-2|u|}): the gradient of such a logit is
    accurate relative to itself (formed as 4 e / (1 + e)^2, not 1 - tanh^2, which would
    round to 0 or to a multiple of 2^-24)."""
    u = np.array([0.1, 1.0, 3.0, 6.0, 9.0, 12.0, 20.0, 30.0, 40.0])
    cap = 2.0
    x = np.zeros((u.size, 3), np.float32)
    x[:, 0] = (u * cap).astype(np.float32)
    t = np.full(u.size, 1)
    # the truth by hand: torch's float64 autograd takes 1 - tanh^2 and rounds it to 0
    # from u = 19 on; d loss / d x_0 = p_0 sech^2(u), p_0 = e^{z_0} / (e^{z_0} + 2)
    uf = x[:, 0].astype(np.float64) / cap
    z0 = cap * np.tanh(uf)
    want = np.exp(z0) / (np.exp(z0) + 2.0) / np.cosh(uf) ** 2
    for mod in (fastce, fastce.reference):
        _, grad = mod.cross_entropy_with_grad(x, t, softcap=cap, reduction="sum")
        np.testing.assert_allclose(grad[:, 0], want, rtol=2e-6, atol=0)
        assert (grad[:, 0] > 0).all()


def test_tanh_accuracy():
    """The float32 vector tanh (one class: the lse is the capped logit itself, exactly:
    log(exp(z - z)) = 0), over a dense sweep of [-12, 12] and special values, within
    2 ulp of the correctly rounded tanh (float64's rounded)."""
    rng = np.random.default_rng(14)
    v = np.concatenate([np.linspace(-12, 12, 400001), rng.standard_normal(100000) * 0.3,
                        np.geomspace(1e-30, 0.6, 20000), -np.geomspace(1e-30, 0.6, 20000),
                        [0.0, -0.0, 0.5625, -0.5625, np.inf, -np.inf, 88.0, -88.0]])
    v = v.astype(np.float32)
    want = np.tanh(v.astype(np.float64)).astype(np.float32)
    for name in fastce.available_isas():
        with fastce.use_isa(name):
            _, lse = fastce.cross_entropy(v[:, None], np.zeros(v.size, np.int64),
                                          softcap=1.0, return_lse=True, reduction="none")
        ulp = np.spacing(np.abs(want)).astype(np.float64)
        err = np.abs(lse.astype(np.float64) - want) / ulp
        assert err.max() <= 2, (name, float(err.max()), float(v[np.argmax(err)]))
        assert np.array_equal(np.signbit(lse[v != 0]), np.signbit(v[v != 0]))


def test_scale_overflow_follows_the_dtype():
    """logit_scale * x past float32's range is +-inf (the documented behaviour, as
    torch's float32 logits * s): a +inf logit makes the loss NaN and the lse +inf, as
    in torch; fastce, the twin and torch's float32 composition agree on it."""
    x = np.array([[3e38, 1.0, -1.0], [1.0, 2.0, 3.0], [-3e38, 0.0, 1.0]], np.float32)
    t = np.array([1, 2, 0])
    tt = torch.nn.functional.cross_entropy(torch.tensor(x) * 10.0, torch.tensor(t),
                                           reduction="none").numpy()
    for mod in (fastce, fastce.reference):
        loss, lse = mod.cross_entropy(x, t, logit_scale=10.0, reduction="none",
                                      return_lse=True)
        assert np.isnan(loss[0]) and np.isposinf(lse[0]) and np.isposinf(loss[2])
        np.testing.assert_allclose(loss, tt, rtol=1e-6, atol=4e-6)  # u L, L ~ 32: float32 torch


@pytest.mark.parametrize("module", ["fastce", "reference"])
@pytest.mark.parametrize("bad, exc, message", [
    (dict(logit_scale=0.0), ValueError, "logit_scale must be finite and > 0, got 0.0"),
    (dict(logit_scale=-1), ValueError, "logit_scale must be finite and > 0, got -1"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale must be finite and > 0, got inf"),
    (dict(logit_scale="2"), TypeError,
     "logit_scale must be a real number > 0, got '2' of type str"),
    (dict(logit_scale=None), TypeError,
     "logit_scale must be a real number > 0, got None of type NoneType"),
    (dict(softcap=0.0), ValueError, "softcap must be finite and > 0, got 0.0"),
    (dict(softcap=float("nan")), ValueError, "softcap must be finite and > 0, got nan"),
    (dict(softcap=True), TypeError,
     "softcap must be a real number > 0 or None, got True of type bool"),
    (dict(logit_scale=1e39), ValueError,
     "logit_scale = 1e+39 is outside the normal range of the logits' dtype float32 "
     "[1.1754943508222875e-38, 3.4028234663852886e+38]"),
    (dict(logit_scale=1e-20, softcap=1e20), ValueError,
     "logit_scale / softcap = 1e-40 is outside the normal range of the logits' dtype "
     "float32 [1.1754943508222875e-38, 3.4028234663852886e+38]"),
])
def test_bad_transform_options(module, bad, exc, message):
    mod = fastce if module == "fastce" else fastce.reference
    assert_both_raise(mod, np.zeros((2, 3), np.float32), np.array([0, 1]), bad, exc, message)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_transform(dtype, reduction):
    import fastce.torch as ft
    g = torch.Generator().manual_seed(15)
    x0 = torch.randn(40, 300, generator=g, dtype=dtype) * 5
    t = torch.randint(0, 300, (40,), generator=g)
    t[::7] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1, logit_scale=1.5, softcap=6.0)
    npdt = np.float32 if dtype == torch.float32 else np.float64
    truth = torch_lm_truth(x0.numpy(), t.numpy(), 0.01, **kw)
    x = x0.clone().requires_grad_(True)
    loss, lse = ft.cross_entropy(x, t, z_loss=0.01, return_lse=True, **kw)
    assert loss.dtype == lse.dtype == dtype and not lse.requires_grad
    loss.sum().backward(retain_graph=True)
    check((loss.detach().numpy(), x.grad.numpy(), lse.numpy()), truth, x0.numpy(),
          t.numpy(), dict(kw, z_loss=0.01), npdt)
    first = x.grad.clone()
    x.grad = None
    loss.sum().backward()  # the retained graph recomputes with the same options
    assert torch.equal(x.grad, first)
    crit = ft.CrossEntropyLoss(z_loss=0.01, inplace_backward=True, **kw)
    assert "logit_scale=1.5" in repr(crit) and "softcap=6.0" in repr(crit)
    leaf = x0.clone().requires_grad_(True)
    crit(leaf * 1.0, t).sum().backward()
    assert torch.equal(leaf.grad, first)
    with torch.no_grad():
        l2, lse2 = ft.cross_entropy(x0, t, z_loss=0.01, return_lse=True, **kw)
    assert torch.equal(l2, loss.detach()) and torch.equal(lse2, lse)
