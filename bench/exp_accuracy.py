"""Error of fastce's exp: float32 on every float32 in [log(FLT_MIN), 0], float64 on 10M points.

    python bench/exp_accuracy.py            # every ISA variant this CPU runs (~40 s each)

Prints, per variant, the max error in ulp of the rounded truth and the max relative error.
The float32 truth is float64 exp (its own error is far below float32's ulp); the float64
truth is np.exp in long double, where that is x87 extended precision (64-bit mantissa).
tests/test_isa.py checks 2M-point samples against the bounds this measures.
"""
import sys

import numpy as np

import fastce
from fastce._core import _exp


def exhaustive(chunk: int = 1 << 24) -> tuple:
    lo = np.float32(np.log(np.finfo(np.float32).tiny))
    # the bit patterns of -0.0 .. lo are consecutive uint32 (negative floats grow with the bits)
    first = int(np.array(-0.0, np.float32).view(np.uint32))
    last = int(np.array(lo, np.float32).view(np.uint32))
    worst_ulp = worst_rel = 0.0
    at = 0.0
    for start in range(first, last + 1, chunk):
        bits = np.arange(start, min(start + chunk, last + 1), dtype=np.uint32)
        x = bits.view(np.float32)
        y = _exp(x).astype(np.float64)
        truth = np.exp(x.astype(np.float64))
        err = np.abs(y - truth)
        ulp = err / np.spacing(truth.astype(np.float32)).astype(np.float64)
        i = int(np.argmax(ulp))
        if ulp[i] > worst_ulp:
            worst_ulp, at = float(ulp[i]), float(x[i])
        worst_rel = max(worst_rel, float(np.max(err / truth)))
    return worst_ulp, at, worst_rel, last - first + 1


def sampled64() -> tuple:
    """float64: 4M evenly spaced points over [log(DBL_MIN), 0], 4M uniform in [-0.7, 0]
    (one reduction interval around 0), 2M uniform over the whole range."""
    rng = np.random.default_rng(0)
    lo = np.log(np.finfo(np.float64).tiny)
    x = np.concatenate([np.linspace(lo, 0, 4_000_001), -0.7 * rng.random(4_000_000),
                        lo * rng.random(2_000_000)])
    y = _exp(x).astype(np.longdouble)
    truth = np.exp(x.astype(np.longdouble))
    err = np.abs(y - truth)
    ulp = err / np.spacing(truth.astype(np.float64)).astype(np.longdouble)
    return float(ulp.max()), float(x[int(np.argmax(ulp))]), float(np.max(err / truth)), x.size


def main() -> int:
    wide = np.finfo(np.longdouble).nmant >= 60
    for isa in fastce.available_isas():
        with fastce.use_isa(isa):
            u, at, rel, n = exhaustive()
            print(f"{isa:7s} float32: max {u:.4f} ulp (at x = {at:.9g}), max relative "
                  f"{rel:.3g}, {n:,} inputs (all)", flush=True)
            if wide:
                u, at, rel, n = sampled64()
                print(f"{isa:7s} float64: max {u:.4f} ulp (at x = {at:.17g}), max relative "
                      f"{rel:.3g}, {n:,} inputs", flush=True)
    if not wide:
        print("float64 skipped: long double is no wider than double here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
