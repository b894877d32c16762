"""The cost of the language-model options over the plain call, side by side.

    python bench/options_cost.py [--threads 1] [--repeat 7]

For each shape (float32, class-index targets, "mean"), interleaved repetitions of
fastce.cross_entropy plain, with z_loss (+ return_z_loss), logit_scale, softcap (30,
Gemma 2's value) and softcap + z-loss, and cross_entropy_with_grad(out=buf) plain and
with softcap + z-loss; prints each median and its ratio to the plain call of its pass.
(bench/bench.py times 'fastce z-loss' and 'fastce softcap+z' among the contenders; this
is the quick side-by-side of every option.)
"""
import argparse

import numpy as np

from _util import interleaved_times

import fastce


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--shapes", default="4096x32000,16384x1000")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    nt = a.threads
    for shape in a.shapes.split(","):
        N, C = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((N, C)).astype(np.float32)
        t = rng.integers(0, C, N)
        buf = np.empty_like(x)
        ce, ceg = fastce.cross_entropy, fastce.cross_entropy_with_grad
        fns = {
            "fwd plain": lambda: ce(x, t, n_threads=nt),
            "fwd z-loss": lambda: ce(x, t, z_loss=1e-4, return_z_loss=True, n_threads=nt),
            "fwd logit_scale": lambda: ce(x, t, logit_scale=0.8, n_threads=nt),
            "fwd softcap": lambda: ce(x, t, softcap=30.0, n_threads=nt),
            "fwd softcap+z": lambda: ce(x, t, softcap=30.0, z_loss=1e-4, return_z_loss=True,
                                        n_threads=nt),
            "fwd+bwd plain": lambda: ceg(x, t, out=buf, n_threads=nt),
            "fwd+bwd softcap+z": lambda: ceg(x, t, softcap=30.0, z_loss=1e-4, out=buf,
                                             n_threads=nt),
        }
        times = interleaved_times(fns, a.repeat)
        med = {k: float(np.median(v)) for k, v in times.items()}
        print(f"float32 {shape}, {nt} thread(s), ISA {fastce.get_isa()}, medians of {a.repeat}:")
        for k, v in med.items():
            base = med["fwd plain" if k.startswith("fwd ") else "fwd+bwd plain"]
            print(f"  {k:20s} {v * 1e3:9.2f} ms  {v / base:5.2f}x")


if __name__ == "__main__":
    main()
