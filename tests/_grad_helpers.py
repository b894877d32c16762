"""Shared helpers for test_grad.py and test_torch_module.py.

Truth = PyTorch autograd in float64 on the same (exactly upcast) inputs.

Tolerances (`rtol_for`)
-----------------------
Let u be the unit roundoff of the dtype under test (2**-24 for float32,
2**-53 for float64), C the number of classes and
L = max|logit| + log(C) + 1, a bound on |logit - logsumexp| over the row
(the arguments of exp and of the loss, for finite logits).

* logsumexp: the sum of C positive terms carries a relative error of about
  sqrt(C)*u for sequential accumulation (random-walk rounding; blocked or
  SIMD partial sums do better), and the final log/max add ~u*L absolute.
* p_c = exp(x_c - lse): an absolute error d in the argument becomes a
  relative error d in p_c, so rel.err(p_c) ~ u*(L + sqrt(C) + a few ulp of exp).
* loss_i = lse - x_y (or its weighted/smoothed sums): absolute error
  ~ u*(L + sqrt(C)) * weight.

Hence rtol = 16*u*(L + sqrt(C) + 4): a 16x margin over that estimate
(two implementations, torch's float64 rounding included, and the
reduction's own summation).  For float32 and C=5, |x|<=8 this is ~1.5e-5;
for float64 ~3e-14.  Gradients are compared with
rtol and atol = rtol * `grad_scale(...)`: each entry is
s * (A p_c - B_c) with A, B <= max weight and s the reduction's factor
(1/denominator, 1, or grad_output), a difference of terms of size up to
2 * wmax * s, so entries that cancel (p_y - 1, or exactly 0 for C = 1) are
only accurate relative to that scale, not to themselves; the dedicated
p_y ~ 1 tests check the stronger property for the target class.  Losses use atol = rtol * L *
(sum of the |weights| the reduction applies), see `loss_atol`.
"""

import math
import zlib

import numpy as np
import pytest

torch = None
try:  # torch is optional for fastce; tests that need it importorskip it.
    import torch  # noqa: F811
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True, scope="module")
def torch_single_thread():
    """Run torch single-threaded in these modules (restored afterwards):
    the reference computations are tiny, and OpenMP thread wake-ups on a
    busy machine made each torch call ~1000x slower (30 ms instead of
    25 us).  Import this fixture into a test module to activate it."""
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def unit_roundoff(dtype):
    return float(np.finfo(dtype).eps) / 2


def logit_bound(logits, C):
    x = np.asarray(logits, dtype=np.float64)
    finite = x[np.isfinite(x)]
    m = float(np.abs(finite).max()) if finite.size else 0.0
    return m + math.log(max(C, 1)) + 1.0


def rtol_for(dtype, C, L):
    return 16 * unit_roundoff(dtype) * (L + math.sqrt(C) + 4)


def class_axis(logits):
    return 0 if np.ndim(logits) == 1 else 1


def num_classes(logits):
    return np.shape(logits)[class_axis(logits)]


def torch_truth(logits, target, weight=None, ignore_index=-100,
                reduction="mean", label_smoothing=0.0, grad_output=None):
    """Loss and d/d(logits) by torch autograd in float64.

    The inputs are first brought to the logits dtype exactly as fastce
    does (probability targets, weight) and then upcast exactly to float64.
    For reduction "none" the gradient is that of sum(grad_output * loss),
    grad_output defaulting to ones.  Returns (loss ndarray, grad ndarray),
    both float64.
    """
    x_np = np.asarray(logits)
    dt = x_np.dtype
    x = torch.tensor(np.array(x_np, dtype=np.float64), requires_grad=True)
    t_np = np.asarray(target)
    if t_np.shape == x_np.shape:          # probability targets
        t = torch.tensor(np.array(t_np, dtype=dt).astype(np.float64))
    else:
        t = torch.tensor(np.array(t_np, dtype=np.int64))
    w = None
    if weight is not None:
        w = torch.tensor(np.array(weight, dtype=dt).astype(np.float64))
    loss = torch.nn.functional.cross_entropy(
        x, t, weight=w, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing)
    if reduction == "none" and grad_output is not None:
        go = torch.tensor(np.array(grad_output, dtype=np.float64))
    else:
        go = torch.ones_like(loss)
    (g,) = torch.autograd.grad(loss, x, go)
    return loss.detach().numpy(), g.numpy()


def torch_lm_truth(x, t, z, weight=None, ignore_index=-100, reduction="mean",
                   label_smoothing=0.0, grad_output=None, logit_scale=1.0, softcap=None):
    """(loss, z part, lse, grad) by torch in float64, for the language-model options: the
    z-loss z * w_y * logsumexp**2 added to F.cross_entropy, of the logits transformed as
    softcap * tanh(logit_scale * x / softcap) (logit_scale * x without a softcap); the
    gradient with respect to x by autograd."""
    dt = x.dtype
    cax = 0 if x.ndim == 1 else 1
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    prob = t.shape == x.shape
    tt = torch.tensor(t.astype(dt).astype(np.float64) if prob else t.astype(np.int64))
    w = None if weight is None else torch.tensor(weight.astype(dt).astype(np.float64))
    zt = xt * logit_scale
    if softcap is not None:
        zt = softcap * torch.tanh(zt / softcap)
    ce = torch.nn.functional.cross_entropy(zt, tt, weight=w, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    lse = torch.logsumexp(zt, dim=cax)
    if prob:
        wy = torch.ones_like(lse)
    else:
        kept = tt != ignore_index
        wy = (torch.ones_like(lse) if w is None else w[torch.where(kept, tt, 0)]) * kept
    zterm = z * wy * lse ** 2
    if not prob:
        zterm = torch.where(kept, zterm, torch.zeros_like(zterm))
    per = ce + zterm
    if reduction == "none":
        loss, zpart = per, zterm
        go = torch.ones_like(per) if grad_output is None else torch.tensor(grad_output)
    else:
        den = float(lse.numel()) if prob else wy.sum()
        loss, zpart = per.sum(), zterm.sum()
        if reduction == "mean":
            loss, zpart = loss / den, zpart / den
        go = torch.tensor(1.0, dtype=torch.float64)
    (g,) = torch.autograd.grad(loss, xt, go)
    return (loss.detach().numpy(), zpart.detach().numpy(), lse.detach().numpy(), g.numpy())


def loss_atol(rtol, L, logits, target, weight, reduction, ignore_index=-100):
    """Absolute loss tolerance: rtol * L * (total weight the reduction uses)."""
    x = np.asarray(logits)
    C = num_classes(x)
    wmax = 1.0 if weight is None else max(1.0, float(np.abs(weight).max()))
    n = x.size // C if C else 0
    if reduction == "sum":
        return rtol * L * wmax * max(n, 1)
    if reduction == "mean":
        if weight is not None and np.shape(target) != x.shape:
            # mean = sum_i w_i l_i / sum_i w_i: error <= max_i err(l_i)
            # scaled by wmax/wmin.
            wmin = float(np.abs(weight).min())
            return rtol * L * wmax / max(wmin, 1e-300)
        return rtol * L * wmax
    return rtol * L * wmax


def assert_loss_close(got, truth, rtol, atol):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), truth,
                               rtol=rtol, atol=atol, equal_nan=True)


def grad_scale(logits, target, weight=None, reduction="mean",
               ignore_index=-100, grad_output=None):
    """2 * wmax * (largest reduction factor): bounds |A p_c| + |B_c| (above)."""
    x = np.asarray(logits)
    t = np.asarray(target)
    wmax = 1.0 if weight is None else float(np.abs(weight).max())
    if reduction == "none":
        s = 1.0 if grad_output is None else float(
            np.abs(grad_output).max(initial=0.0))
    elif reduction == "sum":
        s = 1.0
    elif t.shape == x.shape:                    # prob targets: / n samples
        C = x.shape[0 if x.ndim == 1 else 1]
        s = 1.0 / max(x.size // C if C else 0, 1)
    else:
        valid = t != ignore_index
        ys = t[valid].astype(np.int64)
        den = float(ys.size if weight is None
                    else np.asarray(weight, dtype=np.float64)[ys].sum())
        s = 1.0 / den if den > 0 else 0.0
    return 2.0 * wmax * s


def assert_grad_close(got, truth, rtol, scale=None):
    truth = np.asarray(truth)
    fin = np.abs(truth[np.isfinite(truth)])
    tmax = float(fin.max()) if fin.size else 0.0
    scale = tmax if scale is None else max(scale, tmax)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), truth,
                               rtol=rtol, atol=rtol * scale + 1e-300,
                               equal_nan=True)


def make_case(rng, shape, dtype, *, ignore=None, ignore_index=-100,
              prob=False, scale=3.0):
    """Random logits of `shape` (class axis 1, or 0 for 1-D) and a target.

    ignore: fraction of index targets set to ignore_index.
    """
    x = (rng.standard_normal(shape) * scale).astype(dtype)
    cax = 0 if len(shape) == 1 else 1
    C = shape[cax]
    if prob:
        t = rng.random(shape)
        t = t / t.sum(axis=cax, keepdims=True)
        return x, t.astype(dtype)
    bshape = shape[:cax] + shape[cax + 1:]
    t = rng.integers(0, max(C, 1), size=bshape).astype(np.int64)
    if ignore:
        mask = rng.random(bshape) < ignore
        t = np.where(mask, ignore_index, t)
    return x, np.asarray(t, dtype=np.int64)


def transformed(x, logit_scale=1.0, softcap=None):
    z = x.astype(np.float64) * logit_scale
    return z if softcap is None else softcap * np.tanh(z / softcap)


def check_lm(got, truth, x, t, kw, dtype):
    """got = (loss, grad[, z part], lse) against torch_lm_truth's, with the tolerances
    argued in tests/test_transform.py's docstring (kw: the call's options)."""
    loss, grad, lse = got[0], got[1], got[-1]
    tl, tz, tlse, tg = truth
    C = x.shape[0 if x.ndim == 1 else 1]
    s, cap, z = kw.get("logit_scale", 1.0), kw.get("softcap"), kw.get("z_loss", 0.0)
    L = logit_bound(transformed(x, s, cap), C) + (cap or 0.0)
    rtol = rtol_for(dtype, C, L)
    lmax = float(np.abs(tlse[np.isfinite(tlse)]).max(initial=0.0))
    w = kw.get("weight")
    wmax = 1.0 if w is None else float(np.abs(w).max())
    n = x.size // C
    atol = rtol * L * (1 + 2 * z * lmax) * wmax * (n if kw.get("reduction") == "sum" else 1)
    assert np.asarray(loss).dtype == dtype and lse.dtype == dtype
    np.testing.assert_allclose(np.float64(loss), tl, rtol=rtol, atol=atol)
    if len(got) == 4:
        np.testing.assert_allclose(np.float64(got[2]), tz, rtol=rtol, atol=atol)
    np.testing.assert_allclose(lse.astype(np.float64), tlse, rtol=rtol, atol=rtol * L)
    scale = grad_scale(x, t, w, kw.get("reduction", "mean"), kw.get("ignore_index", -100),
                       kw.get("grad_output")) * (1 + 2 * z * lmax) * s
    assert_grad_close(grad, tg, rtol, scale)


def assert_both_raise(mod, x, t, bad, exc, message):
    """mod.cross_entropy and mod.cross_entropy_with_grad(x, t, **bad) both raise exc with
    exactly message."""
    for fn in (mod.cross_entropy, mod.cross_entropy_with_grad):
        with pytest.raises(exc) as info:
            fn(x, t, **bad)
        assert str(info.value) == message


def seed_of(*key):
    """A seed from a test's parameters, the same in every run (hash() of a str, and of
    None before Python 3.12, changes from process to process)."""
    return zlib.crc32(repr(key).encode())
