"""Forward values of fastce.cross_entropy / log_softmax / logsumexp against PyTorch.

The truth is torch.nn.functional.cross_entropy (CPU) in float64 on the values
fastce sees (see _helpers.torch_ce); tolerances are argued in _helpers.TOL.
Every test calls the fast path (``fastce.<fn>``); tests/conftest.py repeats
each one for every instruction set the CPU has.
"""

import itertools

import numpy as np
import pytest

import fastce
import fastce.reference
from _helpers import (
    FLOAT_DTYPES,
    REDUCTIONS,
    TOL,
    assert_close,
    assert_reduced_type,
    class_axis,
    layouts,
    random_index_target,
    random_logits,
    random_prob_target,
    sample_shape,
    torch_ce,
    torch_log_softmax,
    torch_logsumexp,
)

torch = pytest.importorskip("torch")

SHAPES = [(5,), (7, 5), (4, 5, 3), (3, 5, 2, 3)]
SMOOTHING = [0.0, 0.1, 1.0]

# float64 with C = 131072: summing C terms costs at most C * eps = 131072 *
# 2.2e-16 = 2.9e-11 absolute on log(S) (naive order), on a loss of ~log(C) =
# 11.8, i.e. 2.5e-12 relative; 1e-11 is 4x above that worst case.
LARGE_C_RTOL64 = 1e-11


def _weight(rng, C, dtype):
    return (rng.random(C) * 2 + 0.25).astype(dtype)


def _check(result, truth, dtype, reduction, **tol):
    if reduction == "none":
        assert isinstance(result, np.ndarray), type(result)
    else:
        assert_reduced_type(result, dtype)
    assert_close(result, truth, dtype, **tol)


# --------------------------------------------------------------------------
# The option matrix
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_index_targets(dtype, shape, reduction, weighted, label_smoothing, ignore_index):
    rng = np.random.default_rng(sum(shape) + 7 * weighted)
    C = shape[class_axis(shape)]
    x = random_logits(rng, shape, dtype)
    # ignore_index=-100: two samples ignored; ignore_index=2: a real class is ignored
    # wherever it is the target (the random targets hit it).
    n_ignored = 2 if ignore_index == -100 and len(shape) > 1 else 0
    t = random_index_target(rng, shape, n_ignored=n_ignored, ignore_index=ignore_index)
    w = _weight(rng, C, dtype) if weighted else None
    kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)

    result = fastce.cross_entropy(x, t, **kw)
    _check(result, torch_ce(x, t, **kw), dtype, reduction)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
def test_probability_targets(dtype, shape, reduction, weighted, label_smoothing):
    rng = np.random.default_rng(sum(shape) + 11 * weighted)
    C = shape[class_axis(shape)]
    x = random_logits(rng, shape, dtype)
    t = random_prob_target(rng, shape)
    w = _weight(rng, C, dtype) if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)

    result = fastce.cross_entropy(x, t, **kw)
    _check(result, torch_ce(x, t, **kw), dtype, reduction)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("target_dtype", [np.float16, np.float32, np.float64])
def test_probability_target_dtype_is_converted(dtype, target_dtype):
    """Float targets of any float dtype are converted to the logits' dtype."""
    rng = np.random.default_rng(3)
    x = random_logits(rng, (6, 4), dtype)
    t = random_prob_target(rng, (6, 4), target_dtype)
    result = fastce.cross_entropy(x, t, reduction="none")
    assert_close(result, torch_ce(x, t, reduction="none"), dtype)


def test_probability_targets_need_not_be_normalised():
    """Like torch, probability targets are used as given (no check that rows sum to 1)."""
    rng = np.random.default_rng(4)
    x = random_logits(rng, (5, 3), np.float64)
    t = rng.random((5, 3)) * 3 - 1  # negative entries, rows not summing to 1
    for reduction in REDUCTIONS:
        assert_close(fastce.cross_entropy(x, t, reduction=reduction),
                     torch_ce(x, t, reduction=reduction), np.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_one_dimensional_logits(dtype, kind):
    """(C,) logits: the target is a 0-d index (or a (C,) distribution); 'none' gives shape ()."""
    rng = np.random.default_rng(5)
    x = random_logits(rng, (6,), dtype)
    t = np.int64(4) if kind == "index" else random_prob_target(rng, (6,))
    for reduction in REDUCTIONS:
        result = fastce.cross_entropy(x, t, reduction=reduction)
        assert np.shape(result) == ()
        assert_close(result, torch_ce(x, t, reduction=reduction), dtype)


# --------------------------------------------------------------------------
# Class counts and empty batches
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("C,N", [(1, 6), (2, 9), (131072, 3)], ids=["C=1", "C=2", "C=131072"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_counts(dtype, C, N, kind, reduction):
    rng = np.random.default_rng(C)
    x = random_logits(rng, (N, C), dtype)
    t = random_index_target(rng, (N, C)) if kind == "index" else random_prob_target(rng, (N, C))
    tol = dict(rtol=LARGE_C_RTOL64) if C > 1000 and dtype == np.float64 else {}
    for kw in [{}, dict(weight=_weight(rng, C, dtype), label_smoothing=0.1)]:
        result = fastce.cross_entropy(x, t, reduction=reduction, **kw)
        _check(result, torch_ce(x, t, reduction=reduction, **kw), dtype, reduction, **tol)


# The rows kernel works in 4 KiB blocks (1024 float32 / 512 float64 classes) and
# reads the first block of the next row while it sums the current one; class
# counts on both sides of one and two blocks, with rows the chain must skip
# (ignored), rows whose max is not in the first block, and -inf/+inf/NaN rows.
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("C", [31, 33, 511, 512, 513, 1023, 1024, 1025, 2047, 2049, 5000])
def test_block_and_row_boundaries(dtype, C):
    rng = np.random.default_rng(C)
    N = 23
    x = random_logits(rng, (N, C), dtype)
    # the row max in the last block, so large that exp(max - shift) overflows if a
    # wrong (smaller) shift is used
    x[3, -1] = 100.0 if dtype == np.float32 else 800.0
    x[5, :] = -np.inf
    x[6, : C // 2] = -np.inf
    x[7, C // 3] = np.inf
    x[8, C - 2] = np.nan
    t = random_index_target(rng, (N, C))
    t[[0, 1, 9, 10, 11, N - 1]] = -100  # the first, consecutive and last rows skipped
    for kw in [{}, dict(label_smoothing=0.2)]:
        loss = fastce.cross_entropy(x, t, reduction="none", **kw)
        assert_close(loss, torch_ce(x, t, reduction="none", **kw), dtype)
        # the gradient path sums every row in the same order: the same losses, to the bit
        np.testing.assert_array_equal(
            fastce.cross_entropy_with_grad(x, t, reduction="none", **kw)[0], loss)
    keep = np.ones(N, bool)
    keep[[5, 7, 8]] = False
    assert_close(fastce.cross_entropy(x[keep], t[keep]), torch_ce(x[keep], t[keep]), dtype)


# After its first block the rows kernel reads a row in spans of 4 blocks in one
# pass, shifted by the shift so far, and takes a span again when its own max is
# more than 8 above that shift. Rows that trigger that (ascending ramps: every
# span; a spike in a late span; a first block of -inf), rows that end just past
# a span, and +inf/NaN in a late span, checked against torch in float64 for the
# loss, the gradient, log_softmax and logsumexp; exp(x - shift) would overflow
# (inf/NaN) if a span were kept with a shift far below its max.
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("C", [5 * 1024 + 1, 9 * 1024 - 3, 20000])
def test_spans_whose_max_grows(dtype, C):
    from _grad_helpers import torch_truth

    rng = np.random.default_rng(C)
    N = 9
    x = random_logits(rng, (N, C), dtype)
    big = 80.0 if dtype == np.float32 else 700.0
    x[0] = np.linspace(-big, big, C)               # every span's max is far above the last
    x[1, C - 7] = big                              # a spike in the last span
    x[2, : 1024] = -np.inf                         # a first block of -inf, then finite
    x[3, 2 * 1024 + 5] = big / 2                   # a spike in the first span
    x[4] = np.linspace(big, -big, C)               # descending: never taken again
    x[5, C - 1] = np.inf
    x[6, C - 3] = np.nan
    x[7, :] = x[7, :] + (3000.0 if dtype == np.float32 else 3e6)  # a large common offset
    t = random_index_target(rng, (N, C))
    t[1] = C - 7
    finite = [0, 1, 2, 3, 4, 7, 8]
    for kw in [{}, dict(label_smoothing=0.2)]:
        loss = fastce.cross_entropy(x, t, reduction="none", **kw)
        assert_close(loss, torch_ce(x, t, reduction="none", **kw), dtype)
        got_loss, grad = fastce.cross_entropy_with_grad(x, t, reduction="none", **kw)
        np.testing.assert_array_equal(got_loss, loss)
        _, truth = torch_truth(x[finite], t[finite], reduction="none", **kw)
        tol = 1e-12 if dtype == np.float64 else 1e-6
        np.testing.assert_allclose(grad[finite], truth, rtol=tol, atol=tol)
        assert np.all(np.isnan(grad[[5, 6]]))
    assert_close(fastce.log_softmax(x), torch_log_softmax(x), dtype)
    assert_close(fastce.logsumexp(x), torch_logsumexp(x), dtype)


def test_single_class_loss_is_zero():
    """With C = 1 the only class has probability 1: every loss is exactly 0."""
    x = np.array([[3.0], [-1e30], [0.0]])
    np.testing.assert_array_equal(fastce.cross_entropy(x, np.zeros(3, np.int64), reduction="none"), 0.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (2, 5, 0)], ids=str)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_empty_batch(dtype, shape, kind):
    """No samples: mean -> nan, sum -> 0, none -> an empty array of the sample shape."""
    x = np.zeros(shape, dtype)
    t = np.zeros(sample_shape(shape), np.int64) if kind == "index" else np.zeros(shape, dtype)
    mean = fastce.cross_entropy(x, t, reduction="mean")
    total = fastce.cross_entropy(x, t, reduction="sum")
    none = fastce.cross_entropy(x, t, reduction="none")
    assert_reduced_type(mean, dtype)
    assert_reduced_type(total, dtype)
    assert np.isnan(mean)
    assert total == 0
    assert isinstance(none, np.ndarray) and none.dtype == dtype
    assert none.shape == sample_shape(shape)
    for reduction in REDUCTIONS:
        assert_close(fastce.cross_entropy(x, t, reduction=reduction), torch_ce(x, t, reduction=reduction), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_all_ignored(dtype, weighted, label_smoothing):
    """Every target ignored: mean -> nan (0/0), sum -> 0, none -> zeros (even for NaN logits)."""
    rng = np.random.default_rng(6)
    x = random_logits(rng, (4, 3, 2), dtype)
    x[0, 0, 0] = np.nan
    t = np.full((4, 2), -100)
    kw = dict(weight=_weight(rng, 3, dtype) if weighted else None, label_smoothing=label_smoothing)
    assert np.isnan(fastce.cross_entropy(x, t, reduction="mean", **kw))
    assert fastce.cross_entropy(x, t, reduction="sum", **kw) == 0
    np.testing.assert_array_equal(fastce.cross_entropy(x, t, reduction="none", **kw), np.zeros((4, 2), dtype))
    for reduction in REDUCTIONS:
        assert_close(fastce.cross_entropy(x, t, reduction=reduction, **kw),
                     torch_ce(x, t, reduction=reduction, **kw), dtype)


# --------------------------------------------------------------------------
# Target dtypes and ignore_index
# --------------------------------------------------------------------------

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("target_dtype", INT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_integer_target_dtypes(dtype, target_dtype):
    """Any integer dtype holds class indices; the result does not depend on it at all."""
    rng = np.random.default_rng(8)
    x = random_logits(rng, (9, 5, 2), dtype)
    t64 = random_index_target(rng, (9, 5, 2))
    t = t64.astype(target_dtype)
    for reduction in REDUCTIONS:
        result = fastce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.2)
        expected = fastce.cross_entropy(x, t64, reduction=reduction, label_smoothing=0.2)
        np.testing.assert_array_equal(result, expected)
        assert_close(result, torch_ce(x, t64, reduction=reduction, label_smoothing=0.2), dtype)


@pytest.mark.parametrize("target_dtype,ignore_index", [
    (np.uint8, 255), (np.uint16, 65535), (np.int8, -1), (np.int64, 2**40),
    (np.uint64, 3), (np.uint64, 100), (np.uint64, 2**63 - 1),
])
def test_ignore_index_in_any_integer_dtype(target_dtype, ignore_index):
    """ignore_index is compared by value, also at the top of unsigned and 64-bit ranges."""
    rng = np.random.default_rng(9)
    x = random_logits(rng, (8, 4), np.float64)
    t = random_index_target(rng, (8, 4)).astype(target_dtype)
    t[[1, 5]] = ignore_index
    ignored = t == ignore_index
    for reduction in REDUCTIONS:
        result = fastce.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
        if reduction == "none":
            assert (result[ignored] == 0).all()
        expected = torch_ce(x, t.astype(np.int64), ignore_index=ignore_index, reduction=reduction)
        assert_close(result, expected, np.float64)


def test_default_ignore_index_does_not_match_unsigned_wraparound():
    """uint8 200 / uint64 2**64-100 are not -100 (they would be, wrapped); valid indices are kept."""
    x = random_logits(np.random.default_rng(10), (3, 4), np.float64)
    for t_dtype in [np.uint8, np.uint64]:
        t = np.array([0, 3, 1], t_dtype)
        assert_close(fastce.cross_entropy(x, t), torch_ce(x, t.astype(np.int64)), np.float64)


def test_weight_as_list_of_ints():
    """weight may be any real array_like: a list of ints is converted to the logits' dtype."""
    rng = np.random.default_rng(12)
    x = random_logits(rng, (6, 3), np.float32)
    t = random_index_target(rng, (6, 3))
    result = fastce.cross_entropy(x, t, weight=[1, 2, 3])
    expected = fastce.cross_entropy(x, t, weight=np.array([1.0, 2.0, 3.0], np.float32))
    assert result == expected
    assert_close(result, torch_ce(x, t, weight=np.array([1.0, 2.0, 3.0])), np.float32)


def test_array_like_inputs():
    """Nested lists work as logits and targets (float64 logits, int64 targets)."""
    result = fastce.cross_entropy([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]], [0, 1])
    assert_reduced_type(result, np.float64)
    assert_close(result, torch_ce(np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]]), np.array([0, 1])), np.float64)
    assert_close(fastce.log_softmax([1.0, 2.0]), torch_log_softmax(np.array([1.0, 2.0])), np.float64)
    assert_close(fastce.logsumexp([1.0, 2.0]), torch_logsumexp(np.array([1.0, 2.0])), np.float64)


# --------------------------------------------------------------------------
# Memory layouts
# --------------------------------------------------------------------------

# Another layout may make the kernel sum the C terms in another order: up to
# C * eps relative in S, i.e. 37 * 2.2e-16 = 8e-15 (float64) and
# 37 * 1.2e-7 = 4.4e-6 (float32) absolute on the loss for C = 37.  Anything
# else (a wrong stride, a wrong element) is off by far more.
LAYOUT_TOL = {np.dtype(np.float64): dict(rtol=1e-14, atol=1e-14),
              np.dtype(np.float32): dict(rtol=5e-6, atol=5e-6)}


def _same(result, expected, dtype):
    assert np.asarray(result).dtype == np.dtype(dtype)
    np.testing.assert_allclose(result, expected, equal_nan=True, **LAYOUT_TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(37,), (6, 37), (4, 37, 3)], ids=str)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_layouts_give_the_contiguous_result(dtype, shape, kind):
    """Strided, negative-stride, Fortran-order and read-only inputs: same result as a C copy."""
    rng = np.random.default_rng(13)
    C = shape[class_axis(shape)]
    x = random_logits(rng, shape, dtype)
    t = random_index_target(rng, shape, n_ignored=1) if kind == "index" else random_prob_target(rng, shape, dtype)
    w = _weight(rng, C, dtype)
    kw = dict(label_smoothing=0.1, reduction="none")
    expected = fastce.cross_entropy(x, t, weight=w, **kw)
    assert_close(expected, torch_ce(x, t, weight=w, **kw), dtype)
    for name, xv in layouts(x):
        _same(fastce.cross_entropy(xv, t, weight=w, **kw), expected, dtype)
    for name, tv in layouts(t):
        _same(fastce.cross_entropy(x, tv, weight=w, **kw), expected, dtype)
    for name, wv in layouts(w):
        _same(fastce.cross_entropy(x, t, weight=wv, **kw), expected, dtype)
    # everything non-contiguous at once
    for (_, xv), (_, tv), (_, wv) in zip(layouts(x), layouts(t), layouts(w)):
        _same(fastce.cross_entropy(xv, tv, weight=wv, **kw), expected, dtype)
        for reduction in ("mean", "sum"):
            _same(fastce.cross_entropy(xv, tv, weight=wv, label_smoothing=0.1, reduction=reduction),
                  fastce.cross_entropy(x, t, weight=w, label_smoothing=0.1, reduction=reduction), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_stride_logits(dtype):
    """A broadcast (zero-stride, read-only) view is read in place like any other layout."""
    row = random_logits(np.random.default_rng(14), (37,), dtype)
    x = np.broadcast_to(row, (5, 37))
    t = np.arange(5)
    _same(fastce.cross_entropy(x, t, reduction="none"),
          fastce.cross_entropy(np.ascontiguousarray(x), t, reduction="none"), dtype)
    _same(fastce.log_softmax(x), fastce.log_softmax(np.ascontiguousarray(x)), dtype)
    _same(fastce.log_softmax(x, axis=0), np.zeros((5, 37), dtype) - np.log(dtype(5)), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,axis", [((37,), 0), ((6, 37), -1), ((6, 37), 0), ((4, 37, 3), 1), ((4, 3, 37), 2)],
                         ids=str)
def test_log_softmax_logsumexp_layouts(dtype, shape, axis):
    x = random_logits(np.random.default_rng(15), shape, dtype)
    ls, lse = fastce.log_softmax(x, axis=axis), fastce.logsumexp(x, axis=axis)
    for name, xv in layouts(x):
        _same(fastce.log_softmax(xv, axis=axis), ls, dtype)
        _same(fastce.logsumexp(xv, axis=axis), lse, dtype)


# --------------------------------------------------------------------------
# NaN, infinities and huge logits
# --------------------------------------------------------------------------

INF = np.inf
SPECIAL_ROWS = np.array([
    [0.0, -INF, 1.0, 2.0],       # -inf: probability 0, fine
    [0.0, -INF, 1.0, 2.0],       # ... unless it is the target: loss +inf
    [np.nan, 0.0, 1.0, 2.0],     # NaN -> NaN
    [INF, 0.0, 1.0, 2.0],        # +inf -> NaN (as torch)
    [-INF, -INF, -INF, -INF],    # no finite logit -> NaN
    [1e30, 0.0, -1e30, 1.0],     # huge: target is the max -> exactly 0
    [1e30, 0.0, -1e30, 1.0],     # ... target 1e30 below the max -> 1e30
    [1e30, 0.0, -1e30, 1.0],     # ... 2e30 below
    [-1e30, -1e30, -1e30, -1e30],  # all equal (huge) -> log(4)
    [1e30, 1e30, 1e30, 1e30],    # all equal (huge) -> log(4)
])
SPECIAL_TARGETS = np.array([0, 1, 0, 1, 2, 0, 1, 2, 3, 0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_special_values_per_sample(dtype):
    x = SPECIAL_ROWS.astype(dtype)
    loss = fastce.cross_entropy(x, SPECIAL_TARGETS, reduction="none").astype(np.float64)
    assert np.isfinite(loss[0]) and loss[1] == INF
    assert np.isnan(loss[2:5]).all()
    assert loss[5] == 0.0
    rtol = TOL[np.dtype(dtype)]["rtol"]
    big = float(dtype(1e30))
    np.testing.assert_allclose(loss[6:8], [big, 2 * big], rtol=rtol)
    np.testing.assert_allclose(loss[8:], np.log(4.0), rtol=rtol)
    assert_close(loss.astype(dtype), torch_ce(x, SPECIAL_TARGETS, reduction="none"), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("rows", [slice(0, 10), slice(0, 1), slice(5, 10), slice(1, 2)], ids=str)
def test_special_values_match_torch(dtype, reduction, weighted, label_smoothing, rows):
    """All options on rows with -inf / NaN / +inf / +-1e30: exactly torch's inf/nan pattern."""
    x = SPECIAL_ROWS[rows].astype(dtype)
    t = SPECIAL_TARGETS[rows]
    w = np.array([0.5, 2.0, 1.0, 3.0], dtype) if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    _check(fastce.cross_entropy(x, t, **kw), torch_ce(x, t, **kw), dtype, reduction)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ignored_nan_row_does_not_poison_the_batch(dtype):
    x = SPECIAL_ROWS[[0, 2, 3, 4, 5]].astype(dtype)  # rows 1..3 are NaN rows
    t = np.array([0, -100, -100, -100, 0])
    for label_smoothing in (0.0, 0.25):
        for reduction in REDUCTIONS:
            result = fastce.cross_entropy(x, t, reduction=reduction, label_smoothing=label_smoothing)
            assert not np.isnan(result).any()
            assert_close(result, torch_ce(x, t, reduction=reduction, label_smoothing=label_smoothing), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_special_values_probability_targets(dtype):
    """Probability targets follow torch: -inf logit with target 0 is -inf * 0 = nan."""
    x = np.array([[1e30, 0.0, -1e30], [0.5, 1.0, 2.0], [np.nan, 0.0, 1.0], [0.0, -INF, 1.0]], dtype)
    t = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.5, 0.0, 0.5]], dtype)
    for reduction in REDUCTIONS:
        for label_smoothing in (0.0, 0.1):
            kw = dict(reduction=reduction, label_smoothing=label_smoothing)
            _check(fastce.cross_entropy(x, t, **kw), torch_ce(x, t, **kw), dtype, reduction)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_log_softmax_logsumexp_special_values(dtype, axis):
    """As torch: log_softmax of a slice with NaN/+inf/only -inf is NaN; logsumexp is nan/+inf/-inf."""
    x = SPECIAL_ROWS.astype(dtype)
    assert_close(fastce.log_softmax(x, axis=axis), torch_log_softmax(x, axis), dtype)
    assert_close(fastce.logsumexp(x, axis=axis), torch_logsumexp(x, axis), dtype)


# --------------------------------------------------------------------------
# log_softmax and logsumexp
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (5,), (7, 5), (4, 5, 3), (3, 5, 2, 3), (3, 131072)], ids=str)
def test_log_softmax_and_logsumexp(dtype, shape):
    rng = np.random.default_rng(16)
    x = random_logits(rng, shape, dtype)
    tol = dict(rtol=LARGE_C_RTOL64) if x.size > 100000 and dtype == np.float64 else {}
    for axis in [None, *range(-len(shape), len(shape))]:
        kw = {} if axis is None else dict(axis=axis)
        a = -1 if axis is None else axis
        if shape[a] > 1000 and a % len(shape) != len(shape) - 1:
            continue  # keep the suite fast: large C only along the last axis
        ls = fastce.log_softmax(x, **kw)
        assert isinstance(ls, np.ndarray) and ls.shape == x.shape
        assert_close(ls, torch_log_softmax(x, a), dtype, **tol)
        lse = fastce.logsumexp(x, **kw)
        if len(shape) == 1:
            assert_reduced_type(lse, dtype)
        else:
            assert isinstance(lse, np.ndarray)
        assert_close(lse, torch_logsumexp(x, a), dtype, **tol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_log_softmax_logsumexp(dtype):
    x = np.zeros((0, 4), dtype)
    assert fastce.log_softmax(x).shape == (0, 4)
    assert fastce.logsumexp(x).shape == (0,)
    assert fastce.logsumexp(x, axis=1).dtype == dtype


# --------------------------------------------------------------------------
# fastce against its slow twin, and threads
# --------------------------------------------------------------------------

def _random_case(rng):
    dtype = FLOAT_DTYPES[rng.integers(2)]
    ndim = int(rng.integers(1, 5))
    shape = tuple(int(n) for n in rng.integers(1, 7, size=ndim))
    if ndim > 1:
        shape = (shape[0], int(rng.integers(1, 300))) + shape[2:]
    C = shape[class_axis(shape)]
    x = random_logits(rng, shape, dtype, scale=float(rng.choice([0.1, 3.0, 30.0])))
    prob = bool(rng.integers(2))
    if prob:
        t, ignore_index = random_prob_target(rng, shape), -100
    else:
        ignore_index = int(rng.choice([-100, 0]))
        n = int(np.prod(sample_shape(shape)))
        t = random_index_target(rng, shape, n_ignored=int(rng.integers(0, n + 1)), ignore_index=ignore_index)
        if ignore_index == 0:  # small non-negative values: any integer dtype can hold them
            t = t.astype([np.int32, np.int64, np.uint8][rng.integers(3)])
    kw = dict(
        weight=_weight(rng, C, dtype) if rng.integers(2) else None,
        ignore_index=ignore_index,
        reduction=str(rng.choice(REDUCTIONS)),
        label_smoothing=float(rng.choice([0.0, 0.05, 0.5])),
    )
    return x, t, kw


@pytest.mark.parametrize("seed", range(40))
def test_agrees_with_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    x, t, kw = _random_case(rng)
    dtype = x.dtype
    fast = fastce.cross_entropy(x, t, **kw)
    ref = fastce.reference.cross_entropy(x, t, **kw)
    assert type(fast) is type(ref)
    # the reference computes in float64 and rounds once: it sits within the
    # dtype's tolerance of the truth, and so must fastce
    assert_close(fast, np.asarray(ref, np.float64), dtype)
    assert_close(ref, torch_ce(x, t, **kw), dtype)
    axis = int(rng.integers(x.ndim)) - x.ndim
    for fn in ("log_softmax", "logsumexp"):
        ref = getattr(fastce.reference, fn)(x, axis=axis)
        assert_close(getattr(fastce, fn)(x, axis=axis), np.asarray(ref, np.float64), dtype)


@pytest.mark.parametrize("n_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_n_threads(n_threads, dtype):
    """Any thread count gives the truth (reductions may be summed in another order: tolerance, not bits)."""
    rng = np.random.default_rng(17)
    x = random_logits(rng, (257, 300), dtype)
    t = random_index_target(rng, (257, 300), n_ignored=3)
    for reduction, label_smoothing in itertools.product(REDUCTIONS, [0.0, 0.1]):
        kw = dict(reduction=reduction, label_smoothing=label_smoothing)
        assert_close(fastce.cross_entropy(x, t, n_threads=n_threads, **kw), torch_ce(x, t, **kw), dtype)
    assert_close(fastce.log_softmax(x, n_threads=n_threads), torch_log_softmax(x), dtype)
    assert_close(fastce.logsumexp(x, n_threads=n_threads), torch_logsumexp(x), dtype)
