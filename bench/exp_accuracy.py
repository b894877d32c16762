"""Exhaustive error of fastce's float32 exp on every float32 in [log(FLT_MIN), 0].

    python bench/exp_accuracy.py            # every ISA variant this CPU runs (~1 min each)

Prints, per variant, the max error in ulp of the float32-rounded truth and the max
relative error (the truth: float64 exp, whose own error is far below float32's ulp).
tests/test_isa.py checks a 2M-point sample against the bound this measures.
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


def main() -> int:
    for isa in fastce.available_isas():
        with fastce.use_isa(isa):
            u, at, rel, n = exhaustive()
        print(f"{isa:7s} max {u:.4f} ulp (at x = {at:.9g}), max relative {rel:.3g}, "
              f"{n:,} inputs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
