"""Every bad input named in the spec raises the named exception, in fastce and in its slow twin.

Each case also checks that no input was modified by the failing call, and the
last tests check the same for successful calls.
"""

import copy
import re

import numpy as np
import pytest

import fastce
import fastce.reference

MODULES = [pytest.param(fastce, id="fastce"), pytest.param(fastce.reference, id="reference")]
CE_FUNCTIONS = ["cross_entropy", "cross_entropy_with_grad"]
N, C = 6, 5


def _logits(shape=(N, C), dtype=np.float64):
    return (np.arange(np.prod(shape), dtype=np.float64).reshape(shape) % 7 / 3).astype(dtype)


def _target(values=(0, 1, 2, 3, 4, 0), dtype=np.int64):
    return np.array(values, dtype)


def _snapshot(args, kwargs):
    """Deep copies of every ndarray argument, to check nothing was written."""
    arrays = [a for a in list(args) + list(kwargs.values()) if isinstance(a, np.ndarray)]
    return [(a, copy.deepcopy(a)) for a in arrays]


def _assert_unchanged(snapshot):
    for arr, saved in snapshot:
        assert arr.dtype == saved.dtype and arr.shape == saved.shape
        np.testing.assert_array_equal(arr, saved)


def _raises(fn, args, kwargs, exc, match=None):
    snapshot = _snapshot(args, kwargs)
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert str(info.value), "the message must say what was wrong and what was expected"
    _assert_unchanged(snapshot)


# --------------------------------------------------------------------------
# Cases for cross_entropy and cross_entropy_with_grad: (id, args, kwargs)
# --------------------------------------------------------------------------

BAD_LOGITS_DTYPES = [
    ("int64", lambda: _logits().astype(np.int64)),
    ("int32", lambda: _logits().astype(np.int32)),
    ("bool", lambda: _logits() > 1),
    ("complex", lambda: _logits().astype(np.complex128)),
    ("object", lambda: _logits().astype(object)),
    ("longdouble", lambda: _logits().astype(np.longdouble)),
    ("str", lambda: _logits().astype(str)),
    ("int_list", lambda: [[1, 2, 3, 4, 5]] * N),
]

CE_TYPE_ERRORS = [
    *[(f"logits_{name}", lambda make=make: ((make(), _target()), {})) for name, make in BAD_LOGITS_DTYPES],
    ("target_bool", lambda: ((_logits(), _target() > 1), {})),
    ("target_str", lambda: ((_logits(), _target().astype(str)), {})),
    ("target_complex", lambda: ((_logits(), _target().astype(np.complex128)), {})),
    ("target_object", lambda: ((_logits(), _target().astype(object)), {})),
    ("float_target_of_sample_shape", lambda: ((_logits(), _target().astype(np.float64)), {})),
    ("float_target_wider", lambda: ((_logits(), np.full((N, C + 1), 0.2)), {})),
    ("float_target_0d_for_1d_logits", lambda: ((_logits((C,)), np.float64(1.0)), {})),
    ("int_target_of_logits_shape", lambda: ((_logits(), np.zeros((N, C), np.int64)), {})),
    ("int_target_of_logits_shape_1d", lambda: ((_logits((C,)), np.zeros(C, np.int64)), {})),
    ("uint8_target_of_logits_shape_3d", lambda: ((_logits((2, C, 3)), np.zeros((2, C, 3), np.uint8)), {})),
    ("weight_complex", lambda: ((_logits(), _target()), dict(weight=np.ones(C, np.complex128)))),
    ("weight_str", lambda: ((_logits(), _target()), dict(weight=np.array(["1"] * C)))),
    ("weight_object", lambda: ((_logits(), _target()), dict(weight=np.ones(C).astype(object)))),
    # the two modules once disagreed here (the twin took True as 1.0)
    ("label_smoothing_bool", lambda: ((_logits(), _target()), dict(label_smoothing=True))),
    ("label_smoothing_str", lambda: ((_logits(), _target()), dict(label_smoothing="0.1"))),
    ("ignore_index_bool", lambda: ((_logits(), _target()), dict(ignore_index=False))),
    ("ignore_index_float", lambda: ((_logits(), _target()), dict(ignore_index=-100.0))),
]

CE_VALUE_ERRORS = [
    ("logits_0d_scalar", lambda: ((np.float64(1.0), np.int64(0)), {})),
    ("logits_0d_array", lambda: ((np.array(1.0, np.float32), np.array(0)), {})),
    ("target_longer", lambda: ((_logits(), np.zeros(N + 1, np.int64)), {})),
    ("target_shorter", lambda: ((_logits(), np.zeros(N - 1, np.int64)), {})),
    ("target_extra_axis", lambda: ((_logits(), np.zeros((N, 1), np.int64)), {})),
    ("target_transposed_3d", lambda: ((_logits((2, C, 3)), np.zeros((3, 2), np.int64)), {})),
    ("target_missing_axis_3d", lambda: ((_logits((2, C, 3)), np.zeros(2, np.int64)), {})),
    ("target_wrong_d1", lambda: ((_logits((2, C, 3)), np.zeros((2, 4), np.int64)), {})),
    ("target_1d_for_1d_logits", lambda: ((_logits((C,)), np.zeros(2, np.int64)), {})),
    ("weight_too_long", lambda: ((_logits(), _target()), dict(weight=np.ones(C + 1)))),
    ("weight_too_short", lambda: ((_logits(), _target()), dict(weight=np.ones(C - 1)))),
    ("weight_2d", lambda: ((_logits(), _target()), dict(weight=np.ones((1, C))))),
    ("weight_column", lambda: ((_logits(), _target()), dict(weight=np.ones((C, 1))))),
    ("weight_scalar", lambda: ((_logits(), _target()), dict(weight=1.0))),
    *[(f"reduction_{r!r}", lambda r=r: ((_logits(), _target()), dict(reduction=r)))
      for r in ["avg", "Mean", "", "none "]],
    *[(f"label_smoothing_{s}", lambda s=s: ((_logits(), _target()), dict(label_smoothing=s)))
      for s in [-0.1, -1e-12, 1.0 + 1e-9, 2.0, np.nan, np.inf, -np.inf]],
    *[(f"prob_target_ignore_index_{i}", lambda i=i: ((_logits(), np.full((N, C), 0.2)), dict(ignore_index=i)))
      for i in [0, -1, 3, 1000]],
]

# (id, args, kwargs, regex the message must match: the value and its position)
CE_INDEX_ERRORS = [
    ("above", lambda: ((_logits(), _target((0, 1, 2, 7, 4, 0))), {}),
     r"target 7 is out of bounds for 5 classes.*\(3,\)"),
    ("equal_to_C", lambda: ((_logits(), _target((0, 1, 2, 3, 4, 5))), {}), r"target 5 .*5 classes.*\(5,\)"),
    ("negative", lambda: ((_logits(), _target((0, 1, -1, 3, 4, 0))), {}), r"target -1 .*\(2,\)"),
    ("negative_not_ignored", lambda: ((_logits(), _target((0, 1, 2, 3, 4, -99))), {}),
     r"target -99 .*\(5,\)"),
    ("not_the_ignore_index", lambda: ((_logits(), _target((0, -100, 2, 3, 4, 0))), dict(ignore_index=3)),
     r"target -100 .*\(1,\)"),
    ("position_2d", lambda: ((_logits((2, C, 3)), np.array([[0, 1, 2], [3, 4, 6]])), {}), r"target 6 .*\(1, 2\)"),
    ("0d_target", lambda: ((_logits((C,)), np.int64(9)), {}), r"target 9 .*5 classes"),
    ("int64_2pow32_plus_1", lambda: ((_logits(), _target((0, 1, 2, 3, 2**32 + 1, 0))), {}),
     r"target 4294967297 .*\(4,\)"),
    ("int64_max", lambda: ((_logits(), _target((0, 1, 2, 3, 4, 2**63 - 1))), {}), r"target 9223372036854775807 "),
    ("int64_min", lambda: ((_logits(), _target((-2**63, 1, 2, 3, 4, 0))), {}), r"target -9223372036854775808 "),
    ("int32_max", lambda: ((_logits(), _target((0, 1, 2**31 - 1, 3, 4, 0), np.int32)), {}), r"target 2147483647 "),
    ("uint8", lambda: ((_logits(), _target((0, 1, 2, 200, 4, 0), np.uint8)), {}), r"target 200 .*\(3,\)"),
    ("uint64_2pow63", lambda: ((_logits(), _target((0, 2**63, 2, 3, 4, 0), np.uint64)), {}),
     r"target 9223372036854775808 .*\(1,\)"),
    ("uint64_wraps_to_minus_100", lambda: ((_logits(), _target((0, 1, 2, 3, 4, 2**64 - 100), np.uint64)), {}),
     r"target 18446744073709551516 .*\(5,\)"),
    ("uint64_wraps_to_ignore_index", lambda: ((_logits(), _target((0, 1, 2**64 - 1, 3, 4, 0), np.uint64)),
                                              dict(ignore_index=-1)), r"target 18446744073709551615 "),
    ("uint32_wraps_to_1", lambda: ((_logits(), _target((0, 1, 2, 3, 4, 2**32 - 1), np.uint32)), {}),
     r"target 4294967295 "),
]


# What each message must name: the offending value or shape (and where), and what was
# expected. Both modules share one normaliser, so one table serves both; every case
# above must have an entry (a new case without one fails at collection).
_DT = {"int64": "int64", "int32": "int32", "bool": "bool", "complex": "complex128",
       "object": "object", "longdouble": "float128", "str": "<U", "int_list": "int64"}
MESSAGES = {
    **{f"logits_{k}": rf"^logits must have dtype float32, float64, float16 or bfloat16 \(ml_dtypes\), got {v}" for k, v in _DT.items()},
    "target_bool": r"^target must hold class indices \(an integer dtype\) or class probabilities "
                   r"\(a float dtype\), got dtype bool",
    "target_str": r"^target must hold class indices .*, got dtype <U",
    "target_complex": r"^target must hold class indices .*, got dtype complex128",
    "target_object": r"^target must hold class indices .*, got dtype object",
    "float_target_of_sample_shape": r"^a float target holds class probabilities and must have the "
                                    r"logits' shape \(6, 5\), got shape \(6,\)",
    "float_target_wider": r"logits' shape \(6, 5\), got shape \(6, 6\)",
    "float_target_0d_for_1d_logits": r"logits' shape \(5,\), got shape \(\)",
    "int_target_of_logits_shape": r"^a target of the logits' shape \(6, 5\) holds class probabilities "
                                  r"and must have a float dtype, got int64; class indices have shape \(6,\)",
    "int_target_of_logits_shape_1d": r"shape \(5,\) holds .* got int64; class indices have shape \(\)",
    "uint8_target_of_logits_shape_3d": r"shape \(2, 5, 3\) holds .* got uint8; class indices have "
                                       r"shape \(2, 3\)",
    "weight_complex": r"^weight must hold real numbers \(an integer or float dtype\), got dtype complex128",
    "weight_str": r"^weight must hold real numbers .*, got dtype <U1",
    "weight_object": r"^weight must hold real numbers .*, got dtype object",
    "label_smoothing_bool": r"^label_smoothing must be a real number in \[0, 1\], got True of type bool",
    "label_smoothing_str": r"^label_smoothing must be a real number in \[0, 1\], got '0.1' of type str",
    "ignore_index_bool": r"^ignore_index must be an int, got False of type bool",
    "ignore_index_float": r"^ignore_index must be an int, got -100.0 of type float",
    "logits_0d_scalar": r"^logits must have at least one dimension: .*, got a 0-d array",
    "logits_0d_array": r"^logits must have at least one dimension: .*, got a 0-d array",
    "target_longer": r"^target of class indices must have shape \(6,\) for logits of shape \(6, 5\), "
                     r"got shape \(7,\)",
    "target_shorter": r"shape \(6,\) for logits of shape \(6, 5\), got shape \(5,\)",
    "target_extra_axis": r"shape \(6,\) for logits of shape \(6, 5\), got shape \(6, 1\)",
    "target_transposed_3d": r"shape \(2, 3\) for logits of shape \(2, 5, 3\), got shape \(3, 2\)",
    "target_missing_axis_3d": r"shape \(2, 3\) for logits of shape \(2, 5, 3\), got shape \(2,\)",
    "target_wrong_d1": r"shape \(2, 3\) for logits of shape \(2, 5, 3\), got shape \(2, 4\)",
    "target_1d_for_1d_logits": r"shape \(\) for logits of shape \(5,\), got shape \(2,\)",
    "weight_too_long": r"^weight must have shape \(5,\) \(one per class\), got shape \(6,\)",
    "weight_too_short": r"^weight must have shape \(5,\) .*, got shape \(4,\)",
    "weight_2d": r"^weight must have shape \(5,\) .*, got shape \(1, 5\)",
    "weight_column": r"^weight must have shape \(5,\) .*, got shape \(5, 1\)",
    "weight_scalar": r"^weight must have shape \(5,\) .*, got shape \(\)",
    **{f"reduction_{r!r}": rf"^reduction must be one of 'none', 'mean', 'sum', got {re.escape(repr(r))}$"
       for r in ["avg", "Mean", "", "none "]},
    **{f"label_smoothing_{v}": rf"^label_smoothing must be in \[0, 1\], got {re.escape(repr(v))}$"
       for v in [-0.1, -1e-12, 1.0 + 1e-9, 2.0, np.nan, np.inf, -np.inf]},
    **{f"prob_target_ignore_index_{i}": rf"^ignore_index is not supported with probability targets, "
                                        rf"got ignore_index={i}$" for i in [0, -1, 3, 1000]},
    "grad_output_complex": r"^grad_output must hold real numbers .*, got dtype complex128",
    "grad_output_str": r"^grad_output must hold real numbers .*, got dtype <U1",
    "grad_output_object": r"^grad_output must hold real numbers .*, got dtype object",
    "grad_output_complex_scalar": r"^grad_output must hold real numbers .*, got dtype complex128",
    "out_float32_for_float64": r"^out must have the logits' dtype float64, got float32",
    "out_float64_for_float32": r"^out must have the logits' dtype float32, got float64",
    "out_int": r"^out must have the logits' dtype float64, got int64",
    "grad_output_none_longer": r"^grad_output must broadcast to the per-sample loss shape \(6,\), "
                               r"got shape \(7,\)",
    "grad_output_none_column": r"loss shape \(6,\), got shape \(6, 1\)",
    "grad_output_none_3d": r"loss shape \(2, 3\), got shape \(3, 2\)",
    "grad_output_mean_per_sample": r"^grad_output must be a scalar \(one value\) for "
                                   r"reduction='mean', got shape \(6,\)",
    "grad_output_sum_pair": r"scalar \(one value\) for reduction='sum', got shape \(2,\)",
    "grad_output_prob_none": r"loss shape \(6,\), got shape \(6, 5\)",
    "out_wider": r"^out must have the logits' shape \(6, 5\), got \(6, 6\)",
    "out_transposed": r"^out must have the logits' shape \(6, 5\), got \(5, 6\)",
    "out_flat": r"^out must have the logits' shape \(6, 5\), got \(30,\)",
    "out_readonly": r"^out is read-only; it must be a writable array",
    "out_overlaps_logits": r"^out overlaps logits; pass a separate array",
    "out_is_prob_target": r"^out overlaps target; pass a separate array",
    "out_contains_weight": r"^out overlaps weight; pass a separate array",
    "out_contains_index_target": r"^out overlaps target; pass a separate array",
    "readonly": r"^out is read-only",
    **{k: r"^out=logits computes in place and needs writable, C-contiguous"
       for k in ("fortran", "strided", "negative_stride")},
}


def _params(cases, exc):
    return [pytest.param(make, exc, MESSAGES[name], id=f"{exc.__name__}-{name}") for name, make in cases]


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("fn", CE_FUNCTIONS)
@pytest.mark.parametrize("make,exc,match", _params(CE_TYPE_ERRORS, TypeError) +
                         _params(CE_VALUE_ERRORS, ValueError))
def test_cross_entropy_type_and_value_errors(mod, fn, make, exc, match):
    args, kwargs = make()
    _raises(getattr(mod, fn), args, kwargs, exc, match)


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("fn", CE_FUNCTIONS)
@pytest.mark.parametrize("make,match", [pytest.param(make, match, id=name) for name, make, match in CE_INDEX_ERRORS])
def test_cross_entropy_index_errors(mod, fn, make, match):
    args, kwargs = make()
    _raises(getattr(mod, fn), args, kwargs, IndexError, match)


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("fn", CE_FUNCTIONS)
def test_index_error_message_names_value_classes_and_position(mod, fn):
    """The spec's example, word for word."""
    x, t = _logits(), _target((0, 1, 2, 7, 4, 0))
    with pytest.raises(IndexError, match=r"^target 7 is out of bounds for 5 classes \(at position \(3,\)\)"):
        getattr(mod, fn)(x, t)


# --------------------------------------------------------------------------
# cross_entropy_with_grad: grad_output and out
# --------------------------------------------------------------------------

def _overlapping_logits_out():
    buf = np.zeros((N + 1, C))
    x = buf[:N]
    x[...] = _logits()
    return (x, _target()), dict(out=buf[1:])


def _out_is_prob_target():
    t = np.full((N, C), 0.2)
    return (_logits(), t), dict(out=t)


def _out_contains_weight():
    out = np.zeros((N, C))
    w = out[2]
    w[...] = 1.0
    return (_logits(), _target()), dict(weight=w, out=out)


def _out_contains_index_target():
    out = np.zeros((N, C))
    t = out.reshape(-1)[:N].view(np.int64)
    t[...] = _target()
    return (_logits(), t), dict(out=out)


def _readonly(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


GRAD_TYPE_ERRORS = [
    ("grad_output_complex", lambda: ((_logits(), _target()), dict(reduction="none", grad_output=np.ones(N, complex)))),
    ("grad_output_str", lambda: ((_logits(), _target()), dict(reduction="none", grad_output=np.array(["1"] * N)))),
    ("grad_output_object", lambda: ((_logits(), _target()),
                                    dict(reduction="none", grad_output=np.ones(N).astype(object)))),
    ("grad_output_complex_scalar", lambda: ((_logits(), _target()), dict(grad_output=1j))),
    ("out_float32_for_float64", lambda: ((_logits(), _target()), dict(out=np.zeros((N, C), np.float32)))),
    ("out_float64_for_float32", lambda: ((_logits(dtype=np.float32), _target()), dict(out=np.zeros((N, C))))),
    ("out_int", lambda: ((_logits(), _target()), dict(out=np.zeros((N, C), np.int64)))),
]

GRAD_VALUE_ERRORS = [
    ("grad_output_none_longer", lambda: ((_logits(), _target()), dict(reduction="none", grad_output=np.ones(N + 1)))),
    ("grad_output_none_column", lambda: ((_logits(), _target()), dict(reduction="none", grad_output=np.ones((N, 1))))),
    ("grad_output_none_3d", lambda: ((_logits((2, C, 3)), np.zeros((2, 3), np.int64)),
                                     dict(reduction="none", grad_output=np.ones((3, 2))))),
    ("grad_output_mean_per_sample", lambda: ((_logits(), _target()), dict(reduction="mean", grad_output=np.ones(N)))),
    ("grad_output_sum_pair", lambda: ((_logits(), _target()), dict(reduction="sum", grad_output=np.ones(2)))),
    ("grad_output_prob_none", lambda: ((_logits(), np.full((N, C), 0.2)),
                                       dict(reduction="none", grad_output=np.ones((N, C))))),
    ("out_wider", lambda: ((_logits(), _target()), dict(out=np.zeros((N, C + 1))))),
    ("out_transposed", lambda: ((_logits(), _target()), dict(out=np.zeros((C, N))))),
    ("out_flat", lambda: ((_logits(), _target()), dict(out=np.zeros(N * C)))),
    ("out_readonly", lambda: ((_logits(), _target()), dict(out=_readonly(np.zeros((N, C)))))),
    ("out_overlaps_logits", _overlapping_logits_out),
    ("out_is_prob_target", _out_is_prob_target),
    ("out_contains_weight", _out_contains_weight),
    ("out_contains_index_target", _out_contains_index_target),
]


def _out_is_logits(x):
    return (x, _target()), dict(out=x)


OUT_IS_LOGITS_ERRORS = [
    ("readonly", lambda: _out_is_logits(_readonly(_logits()))),
    ("fortran", lambda: _out_is_logits(np.asfortranarray(_logits()))),
    ("strided", lambda: _out_is_logits(np.repeat(_logits(), 2, axis=1)[:, ::2])),
    ("negative_stride", lambda: _out_is_logits(_logits()[::-1])),
]


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("make,exc,match", _params(GRAD_TYPE_ERRORS, TypeError) +
                         _params(GRAD_VALUE_ERRORS, ValueError) +
                         # out=logits needs writable C-contiguous logits
                         _params(OUT_IS_LOGITS_ERRORS, ValueError))
def test_with_grad_errors(mod, make, exc, match):
    args, kwargs = make()
    _raises(mod.cross_entropy_with_grad, args, kwargs, exc, match)


@pytest.mark.parametrize("mod", MODULES)
def test_out_is_logits_is_allowed(mod):
    """The in-place form is valid: the gradient replaces the logits."""
    x = _logits()
    expected_loss, expected_grad = mod.cross_entropy_with_grad(x.copy(), _target())
    loss, grad = mod.cross_entropy_with_grad(x, _target(), out=x)
    assert grad is x
    assert loss == expected_loss
    # in place may order the per-element work differently: a few ulp at most
    np.testing.assert_allclose(x, expected_grad, rtol=4 * np.finfo(np.float64).eps, atol=1e-17)


# --------------------------------------------------------------------------
# log_softmax and logsumexp
# --------------------------------------------------------------------------

LSE_FUNCTIONS = ["log_softmax", "logsumexp"]


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("fn", LSE_FUNCTIONS)
@pytest.mark.parametrize("make", [pytest.param(make, id=name) for name, make in BAD_LOGITS_DTYPES])
def test_log_softmax_logsumexp_type_errors(mod, fn, make):
    name = next(n for n, m in BAD_LOGITS_DTYPES if m is make)
    _raises(getattr(mod, fn), (make(),), {}, TypeError, MESSAGES[f"logits_{name}"])


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("fn", LSE_FUNCTIONS)
@pytest.mark.parametrize("x", [np.float64(1.0), np.array(1.0, np.float32)], ids=["scalar", "0d_array"])
def test_log_softmax_logsumexp_0d(mod, fn, x):
    _raises(getattr(mod, fn), (x,), {}, ValueError, MESSAGES["logits_0d_array"])


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("fn", LSE_FUNCTIONS)
@pytest.mark.parametrize("axis", [2, -3, 100])
def test_log_softmax_logsumexp_axis_out_of_range(mod, fn, axis):
    # numpy.exceptions.AxisError, both a ValueError and an IndexError, as NumPy raises
    _raises(getattr(mod, fn), (_logits(),), dict(axis=axis), np.exceptions.AxisError,
            rf"^axis {axis} is out of bounds for array of dimension 2")


# --------------------------------------------------------------------------
# Successful calls leave their inputs alone too
# --------------------------------------------------------------------------

def _success_calls():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, 3))
    t = rng.integers(0, C, (N, 3))
    t[0, 0] = -100
    p = rng.random((N, C, 3))
    w = rng.random(C) + 0.5
    ro = _readonly(x)
    xf = np.asfortranarray(x.astype(np.float32))
    yield "ce", (x, t), dict(weight=w, label_smoothing=0.1)
    yield "ce", (ro, t[::-1]), dict(weight=w[::-1], reduction="none")
    yield "ce", (xf, p), dict(weight=w, reduction="sum", label_smoothing=0.2)
    yield "grad", (x, t), dict(weight=w, label_smoothing=0.1, reduction="none", grad_output=rng.random((N, 3)))
    yield "grad", (xf, p), dict(weight=w, reduction="mean", grad_output=np.float64(2.0))
    yield "grad", (ro, t), dict(out=np.empty_like(x))
    yield "log_softmax", (x,), dict(axis=1)
    yield "log_softmax", (xf,), {}
    yield "logsumexp", (ro,), dict(axis=0)
    yield "logsumexp", (xf,), dict(axis=1)


_NAMES = {"ce": "cross_entropy", "grad": "cross_entropy_with_grad"}


@pytest.mark.parametrize("mod", MODULES)
def test_inputs_unchanged_on_success(mod):
    for name, args, kwargs in _success_calls():
        out = kwargs.get("out")
        snapshot = [(a, s) for a, s in _snapshot(args, kwargs) if a is not out]
        getattr(mod, _NAMES.get(name, name))(*args, **kwargs)
        _assert_unchanged(snapshot)


# n_threads is checked by every function before anything else can return early (the
# fuzzer found log_softmax of an empty class axis accepting n_threads=1.5)
@pytest.mark.parametrize("fn", CE_FUNCTIONS + LSE_FUNCTIONS)
@pytest.mark.parametrize("shape", [(N, C), (N, 0), (0,)], ids=["full", "no_classes", "empty"])
@pytest.mark.parametrize("n_threads,exc,match", [
    (1.5, TypeError, r"^n_threads must be a positive int or None, got 1\.5"),
    (True, TypeError, r"^n_threads must be a positive int or None, got True"),
    ("2", TypeError, r"^n_threads must be a positive int or None, got '2'"),
    (0, ValueError, r"^n_threads must be >= 1, got 0"),
    (-3, ValueError, r"^n_threads must be >= 1, got -3"),
])
def test_bad_n_threads(fn, shape, n_threads, exc, match):
    x = _logits(shape) if shape != (0,) else np.zeros(0)
    if fn in CE_FUNCTIONS:
        if shape != (N, C):
            pytest.skip("cross_entropy refuses these shapes for their own reason")
        args = (x, _target())
    else:
        args = (x,)
    _raises(getattr(fastce, fn), args, dict(n_threads=n_threads), exc, match)
