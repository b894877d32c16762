"""float32 accuracy: fastce against the float64 truth, and against torch's own float32.

Inputs are float32; the truth is torch in float64 on exactly those float32
values, so the only error measured is that of fastce's float32 arithmetic.

Error measure, per output element: |result - truth| / max(1, |truth|).  Every
output here is (a sum of) log(S) plus or minus logit differences, where
S = sum_c exp(x_c - max) >= 1; log(S) carries the *absolute* error that S
carries relatively, so below 1 an output is judged absolutely and above 1
relatively (a loss near 0, target = arg-max, cannot be computed to a small
relative error in float32 by torch either).

Two requirements:

1. error <= RTOL = 1e-5, the accuracy fastce promises.  With float32
   eps = 1.19e-7 that is 84 eps.  A float32 kernel spends: eps * |x_t - max|
   (<= eps * loss) rounding the shift, ~2 eps per exp, eps for the log, and
   the summation of C terms: ~log2(C) eps for pairwise or lane-blocked sums
   (17 eps for C = 131072) but up to C eps for a naive running sum
   (131072 * 1.19e-7 = 1.6e-2), so the large-C cases require a careful sum
   (or float64 accumulation).  The "offset" case (logits 1e4 + N(0,1)) needs
   the shift done before anything else: ulp(1e4) = 9.8e-4, so computing
   lse = max + log(S) in float32 and then lse - x_t loses ~5e-4 absolute,
   7e-5 relative to a loss of ~7.
2. error <= 2 * torch_error + 2 * eps: no worse than torch's float32 result on
   the same input.  Both errors are maxima over many elements of a few-eps
   quantity; the factor 2 and the 2 eps (four half-ulp roundings) absorb
   rounding luck, not a systematically less accurate method.
"""

import zlib

import numpy as np
import pytest

import fastce
import fastce.reference
from _helpers import (
    REDUCTIONS,
    random_index_target,
    random_prob_target,
    torch_ce,
    torch_log_softmax,
    torch_logsumexp,
)

torch = pytest.importorskip("torch")

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
RTOL = 1e-5

# (name, shape, logit scale, logit offset)
CASES = [
    ("small", (256, 10), 3.0, 0.0),
    ("vocab", (16, 32000), 3.0, 0.0),
    ("large_C", (3, 131072), 2.0, 0.0),
    ("peaked", (64, 1000), 30.0, 0.0),        # confident rows: losses ~0 and ~100
    ("offset", (64, 1000), 1.0, 1e4),         # only differences matter
    ("flat", (64, 1000), 1e-3, 0.0),          # near-uniform: every term counts
    ("spatial", (4, 200, 8, 8), 3.0, 0.0),    # class axis strided (stride 64)
]
TARGETS = ["index", "index_weight_smoothing", "prob", "prob_weight_smoothing"]


def _case(case, target):
    name, shape, scale, offset = case
    rng = np.random.default_rng(zlib.crc32(f"{name}/{target}".encode()))
    x = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
    if target.startswith("index"):
        t = random_index_target(rng, shape, n_ignored=2)
    else:
        t = random_prob_target(rng, shape)
    kw = {}
    if target.endswith("weight_smoothing"):
        kw = dict(weight=(rng.random(shape[1]) + 0.5).astype(np.float32), label_smoothing=0.1)
    return x, t, kw


def _error(result, truth):
    result = np.asarray(result, np.float64)
    assert np.isfinite(truth).all() and np.isfinite(result).all()
    return float(np.max(np.abs(result - truth) / np.maximum(1.0, np.abs(truth)), initial=0.0))


def _check(what, result, truth, torch32):
    err, err_torch = _error(result, truth), _error(torch32, truth)
    report = (f"{what}: error {err:.3g} ({err / EPS32:.1f} eps), "
              f"torch float32 {err_torch:.3g} ({err_torch / EPS32:.1f} eps)")
    assert err <= RTOL, report
    assert err <= 2 * err_torch + 2 * EPS32, "less accurate than torch: " + report


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("target", TARGETS)
def test_cross_entropy_float32(case, target):
    x, t, kw = _case(case, target)
    for reduction in REDUCTIONS:
        result = fastce.cross_entropy(x, t, reduction=reduction, **kw)
        assert np.asarray(result).dtype == np.float32
        _check(reduction, result, torch_ce(x, t, reduction=reduction, **kw),
               torch_ce(x, t, reduction=reduction, compute_dtype=np.float32, **kw))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_log_softmax_logsumexp_float32(case):
    x, _, _ = _case(case, "index")
    _check("log_softmax", fastce.log_softmax(x, axis=1), torch_log_softmax(x, 1),
           torch_log_softmax(x, 1, compute_dtype=np.float32))
    _check("logsumexp", fastce.logsumexp(x, axis=1), torch_logsumexp(x, 1),
           torch_logsumexp(x, 1, compute_dtype=np.float32))


@pytest.mark.parametrize("C", [3, 1000, 131072])
def test_float64_truth_is_reproduced_by_reference_within_half_ulp(C):
    """The reference rounds the float64 value once: within 0.5 float32 ulp (plus the
    float64 computation's own ~1e-13), the best a float32 result can be."""
    x, t, _ = _case(("ref", (3, C), 3.0, 0.0), "index")
    ref = fastce.reference.cross_entropy(x, t, reduction="none")
    truth = torch_ce(x, t, reduction="none")
    ulp = np.spacing(np.abs(truth).astype(np.float32)).astype(np.float64)
    assert (np.abs(ref.astype(np.float64) - truth) <= 0.5 * ulp + 1e-12).all()
