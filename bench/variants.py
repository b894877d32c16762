"""Dispatch by merit: every kernel variant and tuning this CPU runs, side by side.

    python bench/variants.py [--repeat 15] [--threads 1] [--shapes 65536x10,...]

For each shape (float32 and float64, class-index targets, reduction "mean"), the
forward (``cross_entropy``) and the forward+backward into a reused buffer
(``cross_entropy_with_grad(..., out=g)``) under every supported ISA variant (AVX2 and
up) and every setting of the tuning knobs (``prefetch``, ``small_c_gather``), timed
interleaved (one call of each configuration per round, ``repeat`` rounds, medians):
drift on a shared machine hits them all alike. Prints, per shape and pass, each
configuration's median relative to the one ``fastce.best_isa()`` and the automatic
tuning chose, so a row of numbers below 1.00 says the table in
csrc/fastce_dispatch.c picks the wrong one for this CPU. Results do not depend on the
variant's tuning (tested), only speed.
"""
import argparse
import itertools
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import interleaved_times  # noqa: E402

import fastce  # noqa: E402

DEFAULT_SHAPES = "65536x10,16384x1000,4096x32000,1024x128256"


def configs():
    """[(label, isa, tuning dict)] for the vector variants and both settings of each knob."""
    isas = [i for i in fastce.available_isas() if i not in ("scalar", "sse2")] or \
        fastce.available_isas()[-1:]
    knobs = list(fastce.get_tuning())
    out = []
    for isa in isas:
        for values in itertools.product((False, True), repeat=len(knobs)):
            tune = dict(zip(knobs, values))
            label = isa + " " + ",".join(f"{k}={int(v)}" for k, v in tune.items())
            out.append((label, isa, tune))
    return out


def runner(fn, isa, tune):
    def call():
        with fastce.use_isa(isa):
            fastce.set_tuning(**tune)
            try:
                fn()
            finally:
                fastce.set_tuning(**{k: "auto" for k in tune})
    return call


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    auto_tune = fastce.get_tuning()
    chosen = fastce.best_isa() + " " + ",".join(f"{k}={int(v)}" for k, v in auto_tune.items())
    print(f"# {platform.processor() or platform.machine()}; {fastce.isa_reason()}")
    print(f"# chosen: {chosen}; threads {args.threads}; medians of {args.repeat} interleaved rounds")
    rng = np.random.default_rng(0)
    for dtype in args.dtype.split(","):
        for shape in args.shapes.split(","):
            n, c = (int(v) for v in shape.split("x"))
            x = (rng.standard_normal((n, c)) * 3).astype(dtype)
            t = rng.integers(0, c, n)
            g = np.empty_like(x)
            passes = {
                "forward": lambda: fastce.cross_entropy(x, t, n_threads=args.threads),
                "fwd+bwd out=": lambda: fastce.cross_entropy_with_grad(
                    x, t, out=g, n_threads=args.threads),
            }
            for pname, fn in passes.items():
                cfgs = {label: runner(fn, isa, tune) for label, isa, tune in configs()}
                times = interleaved_times(cfgs, args.repeat)
                med = {k: float(np.median(v)) for k, v in times.items()}
                base = med.get(chosen, min(med.values()))
                best = min(med, key=med.get)
                print(f"\n{dtype} ({n}, {c}) {pname}: chosen {base * 1e3:.3f} ms; "
                      f"fastest {best} ({med[best] * 1e3:.3f} ms)")
                for k in cfgs:
                    mark = " <- chosen" if k == chosen else ""
                    print(f"  {k:40s} {med[k] * 1e3:9.3f} ms  x{base / med[k]:.2f}{mark}")


if __name__ == "__main__":
    main()
