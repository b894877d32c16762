"""Half-precision logits (issue 12, part 1): float16 and ml_dtypes' bfloat16.

The contract: half logits are computed in float32 (every half value is exactly a
float32), the loss, z part and lse come back in float32 (not rounded to the input's
precision), and the arrays of the logits' shape (gradient, log-softmax) are rounded once
from float32 to the logits' dtype, to nearest even.

Checked three ways:
* against torch in float64 on the exactly upcast values (tests/_grad_helpers.py's
  tolerances for float32 results; for the half gradient the same plus the one rounding,
  at most half an ulp of the half format: u_h |g| with u_h = 2**-11 (float16) or 2**-8
  (bfloat16), plus half the smallest subnormal for float16's gradual underflow);
* against fastce's own float32 call on the upcast logits, bit for bit (the contract
  above: the float32 results equal, the gradient equal to that gradient rounded once);
  this alone would not catch a bug shared with the float32 path, the first check does;
* against torch's own half-precision CPU result: fastce is at least as accurate.
"""
import tracemalloc
import warnings

import numpy as np
import pytest

import fastce
import fastce.reference
from _grad_helpers import (check_lm, make_case, seed_of, torch_lm_truth,
                           torch_single_thread)  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

HALF = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
IDS = ["float16", "bfloat16"]
U_HALF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
TINY_HALF = {"float16": 2.0 ** -25, "bfloat16": 2.0 ** -134}
# (7,), (64, 10) and the K-dim shapes go through a float32 copy; rows of > 32 classes are
# read as stored by the half kernels, (2, 140000) in segments (rows past 131072 floats)
SHAPES = [(7,), (64, 10), (5, 300), (2, 40000), (2, 140000), (3, 6, 4), (4, 1500, 3)]
OPTIONS = [dict(), dict(weight=True, label_smoothing=0.1), dict(reduction="sum", ignore=True),
           dict(reduction="none", weight=True), dict(z_loss=1e-3, softcap=15.0),
           dict(logit_scale=0.7, z_loss=1e-4, label_smoothing=0.05, ignore=True),
           dict(prob=True), dict(prob=True, weight=True, reduction="none", softcap=20.0)]


def _case(dtype, shape, opt):
    rng = np.random.default_rng(seed_of(dtype.name, shape, opt))
    o = dict(OPTIONS[opt])
    prob = o.pop("prob", False)
    x32, t = make_case(rng, shape, np.float32, ignore=0.3 if o.pop("ignore", False) else None,
                       prob=prob)
    x = x32.astype(dtype)
    if prob:
        t = t.astype(dtype)  # half probabilities are read exactly, as float32
    if o.pop("weight", False):
        o["weight"] = (rng.random(shape[0 if len(shape) == 1 else 1]) + 0.5).astype(dtype)
    return x, t, o


def _f32(a):
    return a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype in HALF else a


def _assert_half_grad_close(g, tg, dtype, f32_result, f32_grad):
    """g (half) within one rounding of the float64 truth tg: |g - tg| <= u_h |tg| + the
    float32 result's own distance from the truth + half float16's smallest subnormal."""
    assert g.dtype == dtype and g.shape == tg.shape
    err32 = np.abs(f32_grad.astype(np.float64) - tg)
    bound = U_HALF[dtype.name] * np.abs(tg) * (1 + 1e-6) + err32 + TINY_HALF[dtype.name]
    err = np.abs(g.astype(np.float64) - tg)
    assert np.all(err <= bound), float(np.max(err - bound))


@pytest.mark.parametrize("opt", range(len(OPTIONS)))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_half_matches_torch_and_float32(isa, dtype, shape, opt):
    x, t, o = _case(dtype, shape, opt)
    x32, t32, o32 = x.astype(np.float32), _f32(t), {k: _f32(v) for k, v in o.items()}
    before = x.copy()
    truth = torch_lm_truth(x32, t32, o.get("z_loss", 0.0), **{k: v for k, v in o32.items()
                                                               if k != "z_loss"})
    ref32 = fastce.cross_entropy_with_grad(x32, t32, return_z_loss=True, return_lse=True, **o32)
    check_lm(ref32, truth, x32, t32, o32, np.float32)
    for mod in (fastce, fastce.reference):
        got = mod.cross_entropy_with_grad(x, t, return_z_loss=True, return_lse=True, **o)
        loss, g, zpart, lse = got
        # float32 statistics, checked against torch; the gradient after one rounding
        check_lm((loss, ref32[1], zpart, lse), truth, x32, t32, o32, np.float32)
        _assert_half_grad_close(g, truth[3], dtype, ref32, ref32[1])
        if mod is fastce:
            # the contract, bit for bit: float32 results, the gradient rounded once
            for a, b in zip((loss, zpart, lse), (ref32[0], ref32[2], ref32[3])):
                assert np.asarray(a).dtype == np.float32 and np.array_equal(a, b, equal_nan=True)
            assert np.array_equal(g, ref32[1].astype(dtype), equal_nan=True)
            # the loss-only call gives the same loss
            only = fastce.cross_entropy(x, t, return_z_loss=True, return_lse=True, **o)
            for a, b in zip(only, (loss, zpart, lse)):
                assert np.array_equal(a, b, equal_nan=True)
    assert np.array_equal(x, before, equal_nan=True)  # the input is not modified


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_half_out_in_place_grad_output_and_threads(isa, dtype):
    rng = np.random.default_rng(7)
    x32, t = make_case(rng, (300, 700), np.float32, ignore=0.2)
    x = x32.astype(dtype)
    go = rng.standard_normal(300).astype(dtype)  # a half grad_output too
    kw = dict(reduction="none", grad_output=go, z_loss=1e-3)
    l1, g1 = fastce.cross_entropy_with_grad(x, t, n_threads=1, **kw)
    l2, g2 = fastce.cross_entropy_with_grad(x, t, n_threads=2, **kw)
    assert np.array_equal(l1, l2) and np.array_equal(g1, g2)
    out = np.empty_like(x)
    l3, g3 = fastce.cross_entropy_with_grad(x, t, out=out, **kw)
    assert g3 is out and np.array_equal(g3, g1) and np.array_equal(l3, l1)
    # a strided out= of the logits' dtype
    big = np.zeros((300, 1400), dtype)
    g4 = fastce.cross_entropy_with_grad(x, t, out=big[:, ::2], **kw)[1]
    assert np.array_equal(g4, g1) and not big[:, 1::2].astype(np.float32).any()
    # in place over the logits
    xc = x.copy()
    l5, g5 = fastce.cross_entropy_with_grad(xc, t, out=xc, **kw)
    assert g5 is xc and np.array_equal(g5, g1) and np.array_equal(l5, l1)
    # out= of another dtype is refused, naming the one expected
    with pytest.raises(TypeError, match=f"out must have the logits' dtype {dtype}"):
        fastce.cross_entropy_with_grad(x, t, out=np.empty(x.shape, np.float32))


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_half_layouts(isa, dtype):
    """Fortran, strided and K-dim half logits give the results of their C-contiguous copy."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((40, 33)) * 3).astype(np.float32).astype(dtype)
    t = rng.integers(0, 33, 40)
    ref = fastce.cross_entropy_with_grad(np.ascontiguousarray(x), t, reduction="none")
    for view in (np.asfortranarray(x), np.repeat(x, 2, axis=1)[:, ::2]):
        got = fastce.cross_entropy_with_grad(view, t, reduction="none")
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    xk = (rng.standard_normal((4, 20, 6)) * 3).astype(dtype)
    tk = rng.integers(0, 20, (4, 6))
    moved = np.ascontiguousarray(np.moveaxis(xk, 1, -1)).reshape(-1, 20)
    lk, gk = fastce.cross_entropy_with_grad(xk, tk, reduction="none")
    lr, gr = fastce.cross_entropy_with_grad(moved, tk.reshape(-1), reduction="none")
    assert np.array_equal(lk.reshape(-1), lr)
    assert np.array_equal(np.moveaxis(gk, 1, -1).reshape(-1, 20), gr)


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_half_log_softmax_and_logsumexp(isa, dtype):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((6, 500)) * 4).astype(dtype)
    x[1, 3] = np.inf
    x[2, 4] = np.nan
    x[3] = -np.inf
    x32 = x.astype(np.float32)
    for mod in (fastce, fastce.reference):
        lse = mod.logsumexp(x)
        assert lse.dtype == np.float32
        np.testing.assert_array_equal(lse, mod.logsumexp(x32))
        lp = mod.log_softmax(x, axis=1)
        assert lp.dtype == dtype
        np.testing.assert_array_equal(lp, mod.log_softmax(x32, axis=1).astype(dtype))
    assert fastce.log_softmax(np.zeros((3, 0), dtype)).dtype == dtype


@pytest.mark.parametrize("shape", [(8, 5), (64, 1000)])
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_half_at_least_as_accurate_as_torch(dtype, shape):
    """Against torch's own half-precision CPU cross_entropy (it rounds the loss to the
    input's precision): fastce's loss and gradient are closer to the float64 truth."""
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype.name]
    g = torch.Generator().manual_seed(seed_of(dtype.name, shape))
    x = (torch.randn(shape, generator=g) * 3).to(tdt)
    t = torch.randint(0, shape[1], (shape[0],), generator=g)
    xd = x.double().requires_grad_()
    truth = torch.nn.functional.cross_entropy(xd, t)
    (gtrue,) = torch.autograd.grad(truth, xd)
    xh = x.clone().requires_grad_()
    th = torch.nn.functional.cross_entropy(xh, t)
    (gh,) = torch.autograd.grad(th, xh)
    xn = x.float().numpy().astype(dtype)
    loss, grad = fastce.cross_entropy_with_grad(xn, t.numpy())
    err = lambda a: float(abs(float(a) - truth.item()))  # noqa: E731
    assert err(loss) <= err(th.item())
    gerr = lambda a: float(np.abs(a - gtrue.numpy()).sum())  # noqa: E731
    assert gerr(grad.astype(np.float64)) <= gerr(gh.double().numpy())


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_half_vocabulary_shards(isa, dtype):
    """lse_partial / lse_combine / shard_cross_entropy_with_grad on half shards: the
    float32 call's results on the upcast shards, the gradient rounded once."""
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((20, 90)) * 3).astype(np.float32).astype(dtype)
    t = rng.integers(0, 90, 20)
    t[2] = -100
    kw = dict(label_smoothing=0.1)
    for xs in (x, x.astype(np.float32)):
        parts = [(0, xs[:, :40]), (40, xs[:, 40:])]
        state = fastce.lse_combine([fastce.lse_partial(p, t, class_start=c, num_classes=90, **kw)
                                    for c, p in parts])
        res = [fastce.shard_cross_entropy_with_grad(p, t, state, class_start=c, num_classes=90,
                                                    z_loss=1e-3, **kw) for c, p in parts]
        if xs is x:
            half = res
    for (lh, gh), (l32, g32) in zip(half, res):
        assert lh.dtype == np.float32 and lh == l32
        assert gh.dtype == dtype and np.array_equal(gh, g32.astype(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_half_kernel_conversions(isa, dtype):
    """The half kernels' conversions in registers (per variant: F16C or AVX-512 for
    float16, a shift for bfloat16, integer arithmetic elsewhere): each of the 65536
    stored values widens to the float32 NumPy (ml_dtypes) gives it, and float32 values
    round to the stored value of NumPy's cast, to nearest even: every stored value, the
    midpoints between neighbours (ties) and the floats either side of them, the
    overflow threshold, float32's extremes and a million random float32 bit patterns
    (NaN stays NaN)."""
    from fastce._core import _half_convert
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = _half_convert(bits, dtype.name)
    want = bits.view(dtype).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0 too
    vals = np.unique(want[~nan & np.isfinite(want)].astype(np.float64))
    mids = ((vals[:-1] + vals[1:]) / 2).astype(np.float32)  # exact: one more bit
    f32 = np.finfo(np.float32)
    rng = np.random.default_rng(12)
    f = np.concatenate([want, mids, np.nextafter(mids, np.float32(np.inf)),
                        np.nextafter(mids, np.float32(-np.inf)),
                        np.array([65520, 65519.996, -65520, f32.max, -f32.max, f32.tiny,
                                  f32.smallest_subnormal, 2.0 ** -25, 2.0 ** -24 * 1.5],
                                 np.float32),
                        rng.integers(0, 2 ** 32, 10 ** 6, dtype=np.uint64)
                        .astype(np.uint32).view(np.float32)])
    with np.errstate(over="ignore", invalid="ignore"):
        want_bits = f.astype(dtype).view(np.uint16)
    got_bits = _half_convert(f, dtype.name)
    nan = np.isnan(f)
    assert np.array_equal(got_bits[~nan], want_bits[~nan])
    assert np.isnan(got_bits[nan].view(dtype).astype(np.float32)).all()


@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_half_rows_read_as_stored(dtype):
    """Rows of more than 32 classes are read and written as stored: no float32 copy
    of the logits is made (NumPy's allocations, traced), the gradient and log-softmax
    are the only arrays of the logits' size, in their dtype."""
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((512, 2000)) * 3).astype(dtype)
    t = rng.integers(0, 2000, 512)
    calls = [(lambda: fastce.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-4), 0.1),
             (lambda: fastce.cross_entropy_with_grad(x, t, softcap=30.0), 1.1),
             (lambda: fastce.log_softmax(x), 1.1), (lambda: fastce.logsumexp(x), 0.1)]
    for call, most in calls:
        call()  # warm (first-call allocations)
        tracemalloc.start()
        try:
            call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= most * x.nbytes, (peak, x.nbytes)


def test_half_refused_where_not_supported():
    t = np.zeros(4, np.int64)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        fastce.cross_entropy(np.zeros((4, 8), np.int16), t)
    with pytest.raises(TypeError, match="same dtype, got float16 and bfloat16"):
        fastce.linear_cross_entropy(np.zeros((4, 8), np.float16),
                                    np.zeros((5, 8), ml_dtypes.bfloat16), t)


LINEAR_OPTIONS = [dict(), dict(weight=True, label_smoothing=0.1, ignore=True),
                  dict(reduction="none", z_loss=1e-3, softcap=8.0)]


@pytest.mark.parametrize("opt", range(len(LINEAR_OPTIONS)))
@pytest.mark.parametrize("dtype", HALF, ids=IDS)
def test_half_linear_cross_entropy(isa, dtype, opt):
    """The fused linear loss on half hidden / linear_weight / linear_bias: staged in
    float32, so the float32 call's results on the upcast inputs, bit for bit: the loss,
    z part and lse in float32, each gradient that float32 gradient rounded once; and
    that gradient within one rounding of the float64 truth."""
    from test_linear import truth as linear_truth
    rng = np.random.default_rng(seed_of(dtype.name, opt))
    N, H, V = 30, 16, 200
    h = rng.standard_normal((N, H)).astype(dtype)
    W = (rng.standard_normal((V, H)) / 2).astype(dtype)
    b = rng.standard_normal(V).astype(dtype)
    t = rng.integers(0, V, N)
    o = dict(LINEAR_OPTIONS[opt])
    if o.pop("ignore", False):
        t[rng.random(N) < 0.3] = -100
    if o.pop("weight", False):
        o["weight"] = (rng.random(V) + 0.5).astype(np.float32)
    if o.get("reduction") == "none":
        o["grad_output"] = rng.standard_normal(N).astype(np.float32)
    before = [a.copy() for a in (h, W, b)]
    got = fastce.linear_cross_entropy_with_grad(h, W, t, linear_bias=b, chunk_size=7,
                                                return_z_loss=True, return_lse=True, **o)
    h32, W32, b32 = (a.astype(np.float32) for a in (h, W, b))
    ref = fastce.linear_cross_entropy_with_grad(h32, W32, t, linear_bias=b32, chunk_size=7,
                                                return_z_loss=True, return_lse=True, **o)
    loss, gh, gW, gb, zpart, lse = got
    for a, r in ((loss, ref[0]), (zpart, ref[4]), (lse, ref[5])):
        assert np.asarray(a).dtype == np.float32 and np.array_equal(a, r, equal_nan=True)
    for g, r in ((gh, ref[1]), (gW, ref[2]), (gb, ref[3])):
        assert g.dtype == dtype and np.array_equal(g, r.astype(dtype), equal_nan=True)
    # the float32 gradients are checked against float64 torch in tests/test_linear.py;
    # here the half ones: within one rounding of the truth beyond the float32 error
    tr = linear_truth(h32, W32, b32, t, {k: v for k, v in o.items()})
    for g, r, true in ((gh, ref[1], tr[3]), (gW, ref[2], tr[4]), (gb, ref[3], tr[5])):
        _assert_half_grad_close(g, true, dtype, None, r)
    only = fastce.linear_cross_entropy(h, W, t, linear_bias=b, chunk_size=7,
                                       **{k: v for k, v in o.items() if k != "grad_output"})
    assert np.asarray(only).dtype == np.float32 and np.array_equal(only, loss)
    for a, c in zip((h, W, b), before):
        assert np.array_equal(a, c)  # the inputs are not modified


# ------------------------------------------------------------------ fastce.torch

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("tdt", [torch.float16, torch.bfloat16], ids=IDS)
def test_torch_half(tdt, reduction):
    g = torch.Generator().manual_seed(11)
    x0 = (torch.randn(50, 300, generator=g) * 3).to(tdt)
    t = torch.randint(0, 300, (50,), generator=g)
    t[3] = -100
    w = (torch.rand(300, generator=g) + 0.5).to(tdt)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    import fastce.torch as ft
    x = x0.clone().requires_grad_()
    loss = ft.cross_entropy(x, t, **kw)
    assert loss.dtype == torch.float32  # not rounded to the input's precision
    go = torch.randn(loss.shape, generator=g) if reduction == "none" else torch.tensor(1.0)
    loss.backward(go)
    assert x.grad.dtype == tdt
    # the same as the NumPy API on the same values (through float32, exactly)
    xn = x0.float().numpy().astype(HALF[IDS.index(str(tdt).split(".")[1])])
    ln, gn = fastce.cross_entropy_with_grad(
        xn, t.numpy(), weight=w.float().numpy(), grad_output=go.numpy() if reduction == "none"
        else None, **{k: v for k, v in kw.items() if k != "weight"})
    np.testing.assert_array_equal(loss.detach().numpy(), ln)
    if reduction == "mean":
        np.testing.assert_array_equal(x.grad.float().numpy(), gn.astype(np.float32))
    else:
        # the saved per-sample gradient (rounded once) times grad_output, rounded again
        ref = torch.from_numpy(fastce.cross_entropy_with_grad(
            xn, t.numpy(), weight=w.float().numpy(),
            **{k: v for k, v in kw.items() if k != "weight"})[1].astype(np.float32)).to(tdt)
        expect = (ref * go.masked_fill(t == -100, 0).unsqueeze(1)).to(tdt)
        torch.testing.assert_close(x.grad, expect, rtol=0, atol=0)
    # no gradient wanted: the loss alone, float32
    with torch.no_grad():
        assert torch.equal(ft.cross_entropy(x0, t, **kw), loss.detach())
    # in place over a non-leaf's storage
    y = x0.clone().requires_grad_()
    z = y * 1.0
    ft.cross_entropy(z, t, inplace_backward=True, **kw).backward(go)
    assert torch.equal(y.grad, x.grad)
    # a second backward through a retained graph recomputes the same gradient
    x2 = x0.clone().requires_grad_()
    l2 = ft.cross_entropy(x2, t, **kw)
    l2.backward(go, retain_graph=True)
    first = x2.grad.clone()
    x2.grad = None
    l2.backward(go)
    assert torch.equal(x2.grad, first)


def test_torch_half_module_and_refusals():
    import fastce.torch as ft
    x = torch.randn(6, 9, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    crit = ft.CrossEntropyLoss(label_smoothing=0.05)
    loss = crit(x, t)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    truth = torch.nn.functional.cross_entropy(x.detach().double(), t, label_smoothing=0.05)
    assert abs(loss.item() - truth.item()) <= 1e-5 * abs(truth.item())
    # the fused linear loss takes half tensors too: staged in float32 by torch, the
    # float32 call's loss and its gradients rounded once
    for tdt in (torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(12)
        h0 = torch.randn(10, 8, generator=g).to(tdt)
        W0 = torch.randn(40, 8, generator=g).to(tdt)
        tt = torch.randint(0, 40, (10,), generator=g)
        h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
        loss = ft.linear_cross_entropy(h, W, tt, chunk_size=3, label_smoothing=0.1)
        loss.backward(torch.tensor(0.75))
        h32, W32 = h0.float().requires_grad_(), W0.float().requires_grad_()
        ref = ft.linear_cross_entropy(h32, W32, tt, chunk_size=3, label_smoothing=0.1)
        ref.backward(torch.tensor(0.75))
        assert loss.dtype == torch.float32 and torch.equal(loss, ref)
        assert h.grad.dtype == tdt and W.grad.dtype == tdt
        assert torch.equal(h.grad, h32.grad.to(tdt)) and torch.equal(W.grad, W32.grad.to(tdt))


def test_float16_rounding_of_small_values_is_numpys():
    """The binding forms float16 subnormals from their bits (NumPy's cast is 30x slower
    there): the same bits as NumPy's cast, round to nearest even, over every float32
    from 0 to past the smallest normal float16 (2**-14) in steps of 2**-34, with ties,
    signs, zeros, NaN and inf."""
    from fastce._core import _round_half
    mags = np.arange(0, 2 ** 20 + 4096, dtype=np.float64) * 2.0 ** -34
    ties = (np.arange(0, 1025) + 0.5) * 2.0 ** -24
    g = np.concatenate([mags, -mags, ties, -ties, [np.nan, np.inf, -np.inf, -0.0, 1.0, 65504.0,
                                                    70000.0, 2.0 ** -14, 2.0 ** -25]])
    g = g.astype(np.float32)
    with np.errstate(over="ignore"):
        want = g.astype(np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 70000 -> inf without a warning to the user
        got = _round_half(g.copy(), np.dtype(np.float16), None)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    out = np.zeros(2 * g.size, np.float16)[::2]
    assert _round_half(g.copy(), np.dtype(np.float16), out) is out
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))
