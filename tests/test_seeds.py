"""Every number the seed notebooks (shared/seeds/) print, reproduced with fastce.

A number printed in full (``loss.item()``, a NumPy float64 repr) is checked as a
value; a number printed rounded (torch's 4 decimals, NumPy's 8) is checked by
formatting fastce's result the same way and comparing the text.  The notebooks'
tensors are float32 (``torch.tensor`` of Python floats) unless they came from
NumPy float64 arrays; fastce is run on the same dtype.
"""

import numpy as np
import pytest

import fastce

F32, F64 = np.float32, np.float64

# 000, 003: two samples, three classes, targets [0, 1]
SEED_000 = [[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]]
# 002: three samples, targets [0, 1, 1]
SEED_002 = [[2.0, 0.5, 1.0], [0.2, 1.5, 0.3], [1.0, 2.0, 0.1]]


def shows(values, text):
    """Format ``values`` like the notebook did (as many decimals as ``text`` has) and compare."""
    expected = text.split()
    decimals = len(expected[0].split(".")[1])
    got = [f"{float(v):.{decimals}f}" for v in np.ravel(values)]
    assert got == expected, f"{got} printed, notebook shows {expected}"


def softmax(x, axis=-1):
    """The probabilities, from fastce's log-softmax."""
    return np.exp(fastce.log_softmax(np.asarray(x), axis=axis))


# ---- 000: softmax -> log -> gather -> mean, float32 -----------------------

def test_000_probabilities_log_probabilities_nll():
    x = np.array(SEED_000, F32)
    shows(softmax(x, axis=1), "0.6590 0.2424 0.0986 0.1086 0.8025 0.0889")
    shows(fastce.log_softmax(x, axis=1), "-0.4170 -1.4170 -2.3170 -2.2200 -0.2200 -2.4200")
    shows(fastce.cross_entropy(x, np.array([0, 1]), reduction="none"), "0.4170 0.2200")


def test_000_003_loss_float32():
    """0.3185397684574127 (000, float32 by hand) and 0.31853973865509033 (003, torch's
    F.cross_entropy in float32) are both printed for the same float32 input; they are one
    float32 ulp apart, the first being the float64 value rounded to float32.  fastce must
    give one of the two."""
    loss = fastce.cross_entropy(np.array(SEED_000, F32), np.array([0, 1]))
    assert isinstance(loss, np.float32)
    assert float(loss) in (0.3185397684574127, 0.31853973865509033)


def test_003_loss_float64():
    """003 prints 0.3185397696491857 (NumPy float64: softmax, then log).  torch's float64
    cross_entropy gives 0.31853976964918573, one ulp above: the two formulas round
    differently.  Any summation order may add one more ulp, so allow 2."""
    loss = fastce.cross_entropy(np.array(SEED_000), np.array([0, 1]))
    assert isinstance(loss, np.float64)
    np.testing.assert_array_max_ulp(loss, np.float64(0.3185397696491857), maxulp=2)


def test_003_probabilities_and_nll_float64():
    x = np.array(SEED_000)
    t = np.array([0, 1])
    p = softmax(x, axis=1)
    shows(p, "0.65900114 0.24243297 0.09856589 0.10860373 0.80247906 0.08891721")
    shows(p[np.arange(2), t], "0.65900114 0.80247906")
    shows(fastce.cross_entropy(x, t, reduction="none"), "0.41703002 0.22004952")


# ---- 001: softmax of [3, 1, 0.1]; CrossEntropyLoss; CE of probabilities -----

def test_001_softmax():
    x = np.array([3.0, 1.0, 0.1])
    shows(softmax(x), "0.84008305 0.11369288 0.04622407")  # NumPy float64
    shows(softmax(x), "0.8401 0.1137 0.0462")  # torch float64, 4 decimals


def test_001_cross_entropy_loss():
    shows(fastce.cross_entropy(np.array([[2.0, 1.0, 0.1]], F32), np.array([0])), "0.4170")
    shows(fastce.cross_entropy(np.array([[0.5, 2.0, 0.3]], F32), np.array([0])), "1.8406")


def test_001_manual_cross_entropy_of_probabilities():
    """-sum(Y * log(p)) for one-hot Y and *probabilities* p.  With logits log(p),
    cross_entropy = logsumexp(log p) - sum(Y * log p), so the notebook's number is
    cross_entropy - logsumexp.  (The 'good' p = [0.7, 0.2, 0.2] sums to 1.1, so the
    logsumexp term does not vanish.)"""
    y = np.array([1.0, 0.0, 0.0])
    for p, text in [([0.7, 0.2, 0.2], "0.3567"), ([0.1, 0.3, 0.6], "2.3026")]:
        logits = np.log(np.array(p))
        shows(fastce.cross_entropy(logits, y) - fastce.logsumexp(logits), text)
        shows(fastce.cross_entropy(logits, np.int64(0)) - fastce.logsumexp(logits), text)


# ---- 002: loss 0.4449, step by step, int64 and int32 targets ----------------

@pytest.mark.parametrize("target_dtype", [np.int64, np.int32])
def test_002_loss(target_dtype):
    x = np.array(SEED_002, F32)
    t = np.array([0, 1, 1], target_dtype)
    shows(fastce.cross_entropy(x, t), "0.4449")
    shows(-fastce.cross_entropy(x, t, reduction="none"), "-0.4644 -0.4534 -0.4170")


def test_002_log_sum_exp_and_log_probs():
    x = np.array(SEED_002, F32)
    shifted = x - x.max(axis=1, keepdims=True)
    shows(shifted, "0.0000 -1.5000 -1.0000 -1.3000 0.0000 -1.2000 -1.0000 0.0000 -1.9000")
    shows(fastce.logsumexp(shifted, axis=1), "0.4644 0.4534 0.4170")
    shows(fastce.logsumexp(x, axis=1) - x.max(axis=1), "0.4644 0.4534 0.4170")
    log_probs = "-0.4644 -1.9644 -1.4644 -1.7534 -0.4534 -1.6534 -1.4170 -0.4170 -2.3170"
    shows(fastce.log_softmax(x, axis=1), log_probs)
    shows(fastce.log_softmax(shifted, axis=1), log_probs)


# ---- 004: 0.3774033188819885 and 1.8615424633026123 (float32, exact) --------

def test_004_loss_float32():
    """torch's float32 result, which is also the float64 value rounded to float32."""
    loss = fastce.cross_entropy(np.array([[1.2, 0.5, -1.0], [0.3, 1.8, -0.5]], F32), np.array([0, 1]))
    assert isinstance(loss, np.float32)
    assert float(loss) == 0.3774033188819885


def test_004_single_sample():
    x = np.array([[1.2, -0.5, 0.8, 2.1]], F32)
    t = np.array([2])
    shows(softmax(x, axis=1), "0.2319 0.0424 0.1554 0.5703")
    log_probs = fastce.log_softmax(x, axis=1)
    shows(log_probs, "-1.4615 -3.1615 -1.8615 -0.5615")
    shows(log_probs[0, t], "-1.8615")
    # both the CrossEntropyLoss and the NLLLoss-of-log_softmax cells print this
    loss = fastce.cross_entropy(x, t)
    assert isinstance(loss, np.float32)
    assert float(loss) == 1.8615424633026123
    assert float(-log_probs[0, t].mean()) == 1.8615424633026123


def test_004_network_logits_probabilities():
    """The random network's logits are known only as printed (4 decimals); their
    softmax still prints as the notebook's."""
    x = np.array([[-0.4022, -0.3693, 0.2588], [-0.5446, -0.5214, 0.1516]], F32)
    shows(softmax(x, axis=1), "0.2519 0.2603 0.4878 0.2482 0.2540 0.4978")
