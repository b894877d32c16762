"""Instruction-set variants: selection, forcing, and the vectorised exp's accuracy.

conftest.py already runs the whole suite once per variant; these tests check
the machinery itself and the exp every variant is built on.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastce
from fastce._core import _exp


def test_available_isas_and_selection(isa):
    isas = fastce.available_isas()
    assert isas[0] == "scalar"
    assert fastce.get_isa() == isa
    with fastce.use_isa("scalar"):
        assert fastce.get_isa() == "scalar"
    assert fastce.get_isa() == isa
    with pytest.raises(ValueError, match="unknown instruction set"):
        fastce.set_isa("avx9000")
    assert fastce.get_isa() == isa


def test_variants_agree(isa):
    # Every variant computes the same loss to within float64 rounding noise: they
    # differ only in lane count, FMA contraction and summation order (~1e-15).
    rng = np.random.default_rng(5)
    x = rng.standard_normal((37, 301)) * 4
    t = rng.integers(0, 301, 37)
    mine = fastce.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    with fastce.use_isa("scalar"):
        scalar = fastce.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    np.testing.assert_allclose(mine, scalar, rtol=1e-13)


def _run_python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, check=True)


def test_fastce_isa_environment_variable(isa):
    out = _run_python("import fastce; print(fastce.get_isa())", FASTCE_ISA=isa)
    assert out.stdout.strip() == isa
    out = _run_python("import fastce; print(fastce.get_isa())", FASTCE_ISA="nonsense")
    assert out.stdout.strip() == fastce.best_isa()
    assert "FASTCE_ISA ignored" in out.stderr


def test_best_isa_is_supported_and_explained(isa):
    # chosen by merit (vendor/family table), so not necessarily the widest; always supported
    assert fastce.best_isa() in fastce.available_isas()
    reason = fastce.isa_reason()
    assert "family" in reason and len(reason) > 20
    cfg = fastce.get_config()
    assert cfg["isa_best"] == fastce.best_isa() and cfg["isa_reason"] == reason
    assert set(cfg["tuning"]) == {"prefetch", "small_c_gather"}


# The tuning knobs are per CPU (fastce_dispatch.c): they may change speed only,
# never a bit of any result. prefetch: every path that streams rows (forward,
# gradient, long-row segments, log-softmax, logsumexp, smoothing, probabilities);
# small_c_gather: C <= 32 rows through gathers or through transposes, for every C
# (one and two transposes per row group), row counts that leave a partial group,
# padded and negative row strides, and the loss-only and tile paths.
def _results(x, t, p):
    return [
        fastce.cross_entropy(x, t, reduction="none"),
        fastce.cross_entropy_with_grad(x, t, label_smoothing=0.1)[1],
        fastce.cross_entropy_with_grad(x, t, reduction="none", grad_output=np.arange(len(t), dtype=x.dtype))[1],
        fastce.cross_entropy_with_grad(x, p)[1],
        fastce.log_softmax(x), fastce.logsumexp(x),
    ]


def _same_under(knob, cases):
    try:
        for x, t, p in cases:
            runs = []
            for mode in (False, True):
                fastce.set_tuning(**{knob: mode})
                assert fastce.get_tuning()[knob] is mode
                runs.append(_results(x, t, p))
            for a, b in zip(*runs):
                np.testing.assert_array_equal(a, b)
    finally:
        fastce.set_tuning(**{knob: "auto"})


def _case(rng, N, C, dtype, stride=None, flip=False):
    x = (rng.standard_normal((N, stride or C)) * 3).astype(dtype)[:, :C]
    if flip:
        x = x[::-1]
    p = rng.random((N, C)).astype(dtype)
    return x, rng.integers(0, C, N), p / p.sum(1, keepdims=True)


def test_prefetch_tuning_changes_no_result(isa):
    rng = np.random.default_rng(11)
    before = fastce.get_tuning()
    _same_under("prefetch", [_case(rng, N, C, np.float32) for N, C in [(3, 5000), (2, 140000), (70, 300)]])
    assert fastce.get_tuning() == before


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_c_gather_tuning_changes_no_result(isa, dtype):
    rng = np.random.default_rng(12)
    cases = [_case(rng, N, C, dtype) for C in range(1, 33) for N in (1, 7, 70)]
    cases += [_case(rng, 37, 10, dtype, stride=13), _case(rng, 37, 20, dtype, flip=True)]
    before = fastce.get_tuning()
    _same_under("small_c_gather", cases)
    assert fastce.get_tuning() == before


def test_tuning_errors():
    with pytest.raises(ValueError, match="tuning prefetch must be"):
        fastce.set_tuning(prefetch=2)
    with pytest.raises(ValueError, match="unknown tuning knob 'fast'"):
        fastce.set_tuning(fast=True)


def test_fastce_tuning_environment_variable(isa):
    code = "import fastce; t = fastce.get_tuning(); print(t['prefetch'], t['small_c_gather'])"
    out = _run_python(code, FASTCE_TUNING="prefetch=1,small_c_gather=0")
    assert out.stdout.split() == ["True", "False"]
    out = _run_python(code, FASTCE_TUNING="prefetch=0, small_c_gather=1")
    assert out.stdout.split() == ["False", "True"]
    out = _run_python(code, FASTCE_TUNING="prefetch=sometimes")
    assert "FASTCE_TUNING ignored" in out.stderr


# The exp's error bound. Measured by bench/exp_accuracy.py (every float32 in
# [log(FLT_MIN), 0]; 10M float64 points against an x87 extended-precision truth):
#   polynomial form (scalar, sse2; float64 on avx2): float32 0.989 ulp (relative
#     8.1e-8), float64 1.012 ulp without FMA, 0.894 with FMA (avx2)
#   register-table form (vmath.h; avx2 float32, avx512): float32 0.605 ulp (avx2,
#     8 entries), 0.687 (avx512, 16 entries), relative <= 7.0e-8; float64 0.550 ulp
# The bounds below sit just above those maxima: a polynomial one degree short
# (1.1e-7 relative from truncation alone in float32, 2e-16 in float64), a table
# entry or correction off by one ulp, or a wrong reduction constant breaks them.
TABLE_EXP = {"avx2": ("float32",), "avx512": ("float32", "float64")}


def _exp_bound(isa, dtype):
    table = dtype in TABLE_EXP.get(isa, ())
    if dtype == "float32":
        return (0.75, 7.5e-8) if table else (1.0, 8.5e-8)
    return 0.6 if table else 1.05


def test_exp_float32_error_bound(isa):
    x = np.linspace(np.log(np.finfo(np.float32).tiny), 0, 2_000_001).astype(np.float32)
    y = _exp(x).astype(np.float64)
    truth = np.exp(x.astype(np.float64))
    ulp = np.spacing(truth.astype(np.float32)).astype(np.float64)
    max_ulp, max_rel = _exp_bound(isa, "float32")
    assert np.max(np.abs(y - truth) / ulp) <= max_ulp
    assert np.max(np.abs(y - truth) / truth) < max_rel


def test_exp_float64_error_bound(isa):
    x = np.linspace(np.log(np.finfo(np.float64).tiny), 0, 2_000_001)
    y = _exp(x)
    # within 1 ulp of np.exp (itself within 1 ulp of the truth)
    assert np.max(np.abs(y - np.exp(x)) / np.spacing(np.exp(x))) <= 1.0
    if np.finfo(np.longdouble).nmant < 60:
        return  # no wider type here for a better truth
    truth = np.exp(x.astype(np.longdouble))
    ulp = np.spacing(truth.astype(np.float64)).astype(np.longdouble)
    assert float(np.max(np.abs(y.astype(np.longdouble) - truth) / ulp)) <= _exp_bound(isa, "float64")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_special_values(isa, dtype):
    tiny = np.finfo(dtype).tiny
    x = np.array([0.0, -0.0, -np.inf, np.nan, -1e30, np.log(tiny) * 1.01, np.log(tiny) * 0.99],
                 dtype=dtype)
    y = _exp(x)
    assert y[0] == 1.0 and y[1] == 1.0
    assert y[2] == 0.0 and np.isnan(y[3]) and y[4] == 0.0
    # below the normal range: flushed to exactly 0, never a denormal
    assert y[5] == 0.0
    assert y[6] >= tiny
    # every length hits the lane tails of every variant
    for n in range(1, 40):
        z = -np.arange(n, dtype=dtype) / 3
        np.testing.assert_allclose(_exp(z), np.exp(z), rtol=2 * np.finfo(dtype).eps)
