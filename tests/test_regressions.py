"""Bugs found in review, each pinned by the smallest input that showed it."""
import numpy as np
import pytest

import fastce


def test_streamed_gradient_keeps_the_head_mass(isa):
    # >= 8 MiB of gradient in rows >= 16 KiB takes the non-temporal store path; the
    # unaligned head of the run after the target column once lost its softmax mass,
    # so the target gradient (computed from the others' mass when p_y > 1/2) was
    # wrong for rows at some alignments. Rows of 4100 float32 start at every
    # 16-byte offset of a cache line; every row is identical: every row's gradient
    # must be.
    N, C = 520, 4100
    x = np.zeros((N, C), np.float32)
    x[:, 31], x[:, 32] = 10, 5
    t = np.full(N, 31)
    _, g = fastce.cross_entropy_with_grad(x, t, reduction="sum")
    z = np.exp(np.array([0.0] * 31 + [10.0, 5.0] + [0.0] * (C - 33)))
    expected = z / z.sum()
    expected[31] -= 1
    # float32 softmax of O(1) values: a few eps relative (eps 1.2e-7)
    np.testing.assert_allclose(g, np.broadcast_to(expected, g.shape).astype(np.float32),
                               rtol=1e-6, atol=1e-9)


def test_in_place_when_the_kernel_reads_a_copy(isa):
    # K-dim with C > 1024 is transposed into a copy: out=logits must still get
    # the gradient (it once came back unchanged)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1025, 3))
    t = rng.integers(0, 1025, (2, 3))
    loss_ref, g_ref = fastce.cross_entropy_with_grad(x.copy(), t)
    loss, g = fastce.cross_entropy_with_grad(x, t, out=x)
    assert g is x
    assert loss == loss_ref
    np.testing.assert_array_equal(x, g_ref)


def test_in_place_still_checks_overlap_with_other_inputs(isa):
    x = np.random.default_rng(1).standard_normal((4, 4))
    with pytest.raises(ValueError, match="overlaps weight"):
        fastce.cross_entropy_with_grad(x, np.arange(4), weight=x[0], out=x)
    with pytest.raises(ValueError, match="overlaps target"):
        fastce.cross_entropy_with_grad(x, x[::-1], out=x)


@pytest.mark.parametrize("shape", [(3, 1030, 0), (0, 1030, 4), (0, 5), (0, 3, 2)])
def test_empty_batches_with_any_class_count(isa, shape):
    x = np.zeros(shape)
    t = np.zeros((shape[0],) + shape[2:], np.int64)
    assert np.isnan(fastce.cross_entropy(x, t))
    assert fastce.cross_entropy(x, t, reduction="sum") == 0.0
    assert fastce.cross_entropy_with_grad(x, t)[1].shape == shape
    assert fastce.log_softmax(x, axis=1).shape == shape
    assert fastce.logsumexp(x, axis=1).shape == shape[:1] + shape[2:]


@pytest.mark.parametrize("C", [3, 33, 2000])
def test_all_minus_inf_row_gives_nan_gradient_like_torch(isa, C):
    x = np.full((1, C), -np.inf)
    loss, g = fastce.cross_entropy_with_grad(x, np.array([1]))
    assert np.isnan(loss) and np.isnan(g).all()


# Issue 11a: the rows path took a block's softmax factor as exp(shift - (k + ls)),
# rounding lse = k + ls first, so ls was lost when |k| >> ls: a row of -1e30 in
# float32 got the gradient 1 per class instead of 1/64, and float64 rows offset by
# 1e9 erred 4.5e-9 relative. Every path (rows with kept exps, long-row segments,
# K-dim columns, small C) must give torch's float64 gradient of the offset input
# to float64 rounding: x - max is exact there (Sterbenz), so the truth is good to
# ~1e-15; 1e-12 of the largest gradient catches the old 1e9 * eps = 2e-7 error.
@pytest.mark.parametrize("shape", [(2, 64), (2, 5000), (1, 140000), (2, 40, 3), (5, 7)],
                         ids=["rows", "rows-blocks", "long-row", "k-dim", "small-c"])
@pytest.mark.parametrize("offset", [1e9, -1e9])
def test_gradient_exact_for_any_common_offset(isa, shape, offset):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape) + offset
    t = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    _, g = fastce.cross_entropy_with_grad(x, t)
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.cross_entropy(xt, torch.tensor(t)).backward()
    truth = xt.grad.numpy()
    np.testing.assert_allclose(g, truth, rtol=0, atol=1e-12 * np.abs(truth).max())


def test_float32_gradient_of_huge_negative_logits(isa):
    # the example of issue 11a, at sizes taking the small-C, rows and blocks paths
    for C in (3, 64, 2000):
        x = np.full((1, C), -1e30, np.float32)
        _, g = fastce.cross_entropy_with_grad(x, np.array([0]))
        np.testing.assert_allclose(g[0, 1:], 1.0 / C, rtol=1e-6)
        np.testing.assert_allclose(g[0, 0], 1.0 / C - 1.0, rtol=1e-6)


# Issue 11h: numpy.ma.MaskedArray inputs had their mask silently dropped; both the
# kernel's binding and the NumPy twin refuse them, naming the argument.
@pytest.mark.parametrize("module", ["fastce", "reference"])
def test_masked_arrays_are_refused(isa, module):
    import fastce.reference
    mod = fastce if module == "fastce" else fastce.reference
    x = np.ma.masked_array(np.zeros((2, 3)), mask=[[0, 1, 0], [0, 0, 0]])
    t = np.array([0, 1])
    for call, name in [
        (lambda: mod.cross_entropy(x, t), "logits"),
        (lambda: mod.cross_entropy(x.data, np.ma.masked_array(t, [0, 1])), "target"),
        (lambda: mod.cross_entropy(x.data, t, weight=np.ma.masked_array(np.ones(3))), "weight"),
        (lambda: mod.cross_entropy_with_grad(x, t), "logits"),
        (lambda: mod.cross_entropy_with_grad(x.data, t, reduction="none",
                                             grad_output=np.ma.masked_array(np.ones(2))), "grad_output"),
        (lambda: mod.log_softmax(x), "logits"),
        (lambda: mod.logsumexp(x), "logits"),
    ]:
        with pytest.raises(TypeError, match=f"{name} is a numpy.ma.MaskedArray"):
            call()


# Issue 11d: with create_graph=True the gradient came back without a graph, so a
# gradient penalty was silently dropped; now a clear error. Issue 11i: torch.func.vmap
# failed with "Cannot access data pointer of Tensor that doesn't have storage".
def test_double_backward_and_vmap_are_refused_clearly(isa):
    torch = pytest.importorskip("torch")
    import fastce.torch as ft
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    loss = ft.cross_entropy(x, t)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    (g,) = torch.autograd.grad(ft.cross_entropy(x, t), x)  # plain backward still works
    assert g.shape == x.shape
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.func.vmap(lambda xi: ft.cross_entropy(xi, t[0]))(x.detach())


# Issue 11f: a mean with label smoothing where every target's class weight is 0 gave
# inf (fastce and the twin, which shared the kernel's formula), torch NaN: torch
# reduces the target term (0/0 = NaN) and the smoothing term apart. The twin now
# follows torch's definition; the kernel returns NaN for a mean over no weight, and
# a NaN gradient, as torch does.
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mean_over_zero_weight_is_nan_like_torch(isa, eps):
    torch = pytest.importorskip("torch")
    import fastce.reference
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 40))
    w = np.ones(40)
    w[7] = 0.0
    t = np.full(3, 7)
    xt = torch.tensor(x, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(xt, torch.tensor(t), weight=torch.tensor(w),
                                           label_smoothing=eps)
    lt.backward()
    assert torch.isnan(lt) and torch.isnan(xt.grad).all()
    for mod in (fastce, fastce.reference):
        assert np.isnan(mod.cross_entropy(x, t, weight=w, label_smoothing=eps))
        loss, g = mod.cross_entropy_with_grad(x, t, weight=w, label_smoothing=eps)
        assert np.isnan(loss) and np.isnan(g).all()
        # sum and none are finite: only the mean divides by the weight
        assert np.isfinite(mod.cross_entropy(x, t, weight=w, label_smoothing=eps, reduction="sum"))


# Found by tools/fuzz.sh: target weights that cancel (w_y summing to exactly 0 over a
# batch with negative weights) gave NaN; torch divides the target part and the
# smoothing part by that 0 apart, so the mean is -inf/+inf (or NaN where the two
# infinities meet). Class weights are dyadic so that the sum is exactly 0.
@pytest.mark.parametrize("eps", [0.0, 1e-300, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_over_weights_that_cancel_like_torch(isa, eps, dtype):
    torch = pytest.importorskip("torch")
    import fastce.reference
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 300)).astype(dtype)
    w = rng.choice([0.5, 1.0, 2.0, 4.0], 300).astype(dtype)
    t = np.array([3, 9, 40, 77])
    w[3], w[9], w[40], w[77] = 1.0, -0.5, 2.0, -2.5
    truth = torch.nn.functional.cross_entropy(
        torch.tensor(x, dtype=torch.float64), torch.tensor(t),
        weight=torch.tensor(w, dtype=torch.float64), label_smoothing=eps).item()
    assert not np.isfinite(truth)
    for mod in (fastce, fastce.reference):
        got = mod.cross_entropy(x, t, weight=w, label_smoothing=eps)
        assert got.dtype == dtype
        np.testing.assert_equal(np.float64(got), truth)
        np.testing.assert_equal(np.float64(mod.cross_entropy_with_grad(x, t, weight=w,
                                                                       label_smoothing=eps)[0]),
                                truth)


# Found by tools/sanitize.sh's fuzz run: the same mean over cancelling weights with the
# gradient written over the logits (out=logits) read the gradient back as logits (the
# binding recomputed the two parts after the kernel had run): NaN where torch gives
# -inf. The planner now forms the two parts before anything is written, for every
# layout: rows, long rows (C past one segment), K-dim columns.
@pytest.mark.parametrize("shape", [(4, 300), (4, 70000), (4, 5, 3)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_over_weights_that_cancel_in_place(isa, shape, eps, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    C = shape[1]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    w = rng.choice([0.5, 1.0, 2.0, 4.0], C).astype(dtype)
    w[0], w[1], w[2] = 1.0, -0.5, -0.5
    t = np.zeros((shape[0],) + shape[2:], np.int64)
    t.flat[:3] = [0, 1, 2]
    t.flat[3:] = -100
    truth = torch.nn.functional.cross_entropy(
        torch.tensor(x, dtype=torch.float64), torch.tensor(t),
        weight=torch.tensor(w, dtype=torch.float64), label_smoothing=eps).item()
    assert not np.isfinite(truth)
    x0 = x.copy()
    fresh = fastce.cross_entropy_with_grad(x0, t, weight=w, label_smoothing=eps)
    loss, g = fastce.cross_entropy_with_grad(x, t, weight=w, label_smoothing=eps, out=x)
    assert g is x
    np.testing.assert_equal(np.float64(loss), truth)
    np.testing.assert_equal(np.float64(fresh[0]), truth)
    np.testing.assert_array_equal(g, fresh[1])


# Issue 11g: big-endian uint64 targets skipped the >= 2^63 check (2**64 - 100 became
# -100 and was silently ignored), and big-endian float logits were refused with a
# message that did not mention byte order while big-endian weights and targets were
# converted. Now every argument in non-native byte order is converted once and gives
# the native result; an out= buffer must be native and is refused naming byte order.
@pytest.mark.parametrize("module", ["fastce", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_native_byte_order_everywhere(isa, module, dtype):
    import fastce.reference
    mod = fastce if module == "fastce" else fastce.reference
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 7)).astype(dtype)
    t = rng.integers(0, 7, 5)
    w = rng.random(7).astype(dtype) + 0.5
    swapped = lambda a: a.astype(a.dtype.newbyteorder(">" if a.dtype.byteorder in "=<" else "<"))
    kw = dict(weight=w, label_smoothing=0.1, reduction="none")
    ref_loss, ref_grad = mod.cross_entropy_with_grad(x, t, grad_output=np.arange(5.0), **kw)
    loss, grad = mod.cross_entropy_with_grad(swapped(x), swapped(t.astype(np.uint64)),
                                             grad_output=swapped(np.arange(5.0)),
                                             **dict(kw, weight=swapped(w)))
    np.testing.assert_array_equal(loss, ref_loss)
    np.testing.assert_array_equal(grad, ref_grad)
    np.testing.assert_array_equal(mod.log_softmax(swapped(x)), mod.log_softmax(x))
    p = rng.random((5, 7)).astype(dtype)
    np.testing.assert_array_equal(mod.cross_entropy(x, swapped(p)), mod.cross_entropy(x, p))
    big = swapped(np.array([2**64 - 100, 1, 2, 3, 4], dtype=np.uint64))
    with pytest.raises(IndexError, match="18446744073709551516 is out of bounds"):
        mod.cross_entropy(x, big)
    with pytest.raises(TypeError, match="native byte order"):
        mod.cross_entropy_with_grad(x, t, out=swapped(np.empty_like(x)))
