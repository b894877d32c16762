#!/usr/bin/env python3
"""Regenerate fuzz/corpus/: a few dozen small seed inputs for fuzz_cross_entropy.py.

    python fuzz/make_corpus.py [--out fuzz/corpus] [--count 48] [--clean]

The files it writes are named by their SHA-1 and added to --out; the others there are
kept (the inputs of past findings, added by hand as regression seeds) unless --clean.
After a change to the harness's decoder, run it with --clean and add the regression
inputs back (their bytes would decode to other cases anyway).

Random byte strings (fixed seed, 40..900 bytes) are decoded by the harness's own
decoder; the inputs kept are those whose cases together show everything any showed
(the function, dtype, rank, size class, target kind and dtype, each layout, weight
kind, reduction, smoothing, ignore_index, grad_output kind, out= kind, and the
outcome: a result or which exception), at most --count of them. So the seeds
start the fuzzer from every branch of the decoder rather than from the all-zero
input (greedy set cover over --tries candidates). Every candidate is also run
through the oracle here; those that fail it are reported on stderr and not kept (the
seeds must pass with the fastce they were made with: a finding is fixed, then its
input may join the corpus).
Needs atheris and fastce, like the harness. Deterministic for a given fastce.
"""
import argparse
import hashlib
import os
import random
import sys

sys.argv, _argv = sys.argv[:1], sys.argv
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fuzz_cross_entropy as h  # noqa: E402

sys.argv = _argv


def features(case, outcome):
    t = case.get("target")
    keys = ["fn", "dtype", "size_class", "target_kind", "logits_layout", "target_layout",
            "weight_kind", "reduction", "grad_output_kind", "out", "out_layout", "isa"]
    f = {(k, repr(case.get(k))) for k in keys if k in case}
    f.add(("ndim", len(case["shape"])))
    f.add(("zero_size", 0 in case["shape"]))
    f.add(("smoothing", case.get("label_smoothing", 0.0) not in (0, 0.0)))
    f.add(("ignore_index", repr(case.get("ignore_index", -100))))
    if t is not None:
        f.add(("target_dtype", str(getattr(t, "dtype", type(t).__name__))))
    f.add(("outcome", outcome))
    f.add(("fn_outcome", case["fn"], outcome))
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "corpus"))
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--tries", type=int, default=4000)
    ap.add_argument("--clean", action="store_true",
                    help="remove every file in --out first (also the regression inputs)")
    args = ap.parse_args()
    rnd = random.Random(20251201)
    candidates, failing = [], 0
    for _ in range(args.tries):
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(40, 900)))
        case = h.decode_case(data)
        try:
            outcome = h.run_case(case)
        except h.Finding as exc:
            outcome = "FINDING"
            print(f"a candidate fails the oracle: {str(exc).splitlines()[0]}", file=sys.stderr)
            failing += 1
        except Exception as exc:  # a harness error: the corpus would be useless
            raise SystemExit(f"the harness failed on a candidate seed: {exc!r}")
        if outcome != "FINDING":   # the seeds must pass: a failing one is reported, not kept
            candidates.append((data, features(case, outcome)))
    # greedy set cover: each next seed is the one showing the most features not yet shown
    seen, kept = set(), []
    while len(kept) < args.count:
        data, f = max(candidates, key=lambda c: (len(c[1] - seen), -len(c[0])))
        if not f - seen:
            break
        seen |= f
        kept.append(data)
    os.makedirs(args.out, exist_ok=True)
    if args.clean:
        for name in os.listdir(args.out):
            os.remove(os.path.join(args.out, name))
    for data in kept:
        with open(os.path.join(args.out, hashlib.sha1(data).hexdigest()), "wb") as f:
            f.write(data)
    print(f"{len(kept)} seeds ({sum(map(len, kept))} bytes, {len(seen)} features) in {args.out}"
          + (f"; {failing} of {args.tries} candidates failed the oracle" if failing else ""))


if __name__ == "__main__":
    main()
