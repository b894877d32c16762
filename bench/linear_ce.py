"""Fused linear cross-entropy: fastce against torch, and against the GEMMs alone.

    python bench/linear_ce.py [--shapes 4096x1024x32000] [--threads 1] [--repeat 3]
                              [--memory]

Forward + backward of the loss of ``hidden @ W.T`` (float32, class-index targets,
"mean"), through autograd, interleaved rep by rep:
  fastce.torch.linear_cross_entropy (default memory budget);
  naive torch: F.linear + F.cross_entropy + backward (the (N, V) logits and gradient);
  torch.nn.functional.linear_cross_entropy, its reference path and its chunked path
  (LinearCrossEntropyOptions());
  the three GEMMs alone (logits = h W^T, g W, g^T h, torch.matmul): the floor.
Medians, and each one's ratio to fastce. --threads sets torch's threads and NumPy's
BLAS threads (threadpoolctl) alike. --memory runs each contender once in a fresh
process and prints its peak RSS above the inputs (and the returned gradients).
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from _util import interleaved_times


def contenders(N, H, V, dtype, budgets=()):
    import torch
    import torch.nn.functional as F

    import fastce.torch as ft
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(N, H, generator=g, dtype=dtype)
    W0 = torch.randn(V, H, generator=g, dtype=dtype) / H ** 0.5
    t = torch.randint(0, V, (N,), generator=g)

    def leaves():
        return h0.detach().requires_grad_(True), W0.detach().requires_grad_(True)

    def run_fastce():
        h, W = leaves()
        ft.linear_cross_entropy(h, W, t).backward()
        return h.grad, W.grad

    def run_naive():
        h, W = leaves()
        F.cross_entropy(F.linear(h, W), t).backward()
        return h.grad, W.grad

    def run_torch_ref():
        h, W = leaves()
        F.linear_cross_entropy(h, W, t).backward()
        return h.grad, W.grad

    def run_torch_chunked():
        h, W = leaves()
        F.linear_cross_entropy(h, W, t, options=torch.nn.LinearCrossEntropyOptions()).backward()
        return h.grad, W.grad

    def run_gemms():
        logits = h0 @ W0.T
        gh = logits @ W0  # the logits stand in for their gradient (same shape)
        gW = logits.T @ h0
        return gh, gW

    def run_budget(mib):
        h, W = leaves()
        ft.linear_cross_entropy(h, W, t, memory_budget=mib << 20).backward()
        return h.grad, W.grad

    extra = {"fastce, memory_budget=%d MiB" % mib: (lambda mib=mib: run_budget(mib))
             for mib in budgets}
    return {"fastce.torch.linear_cross_entropy": run_fastce, **extra,
            "naive torch (linear + cross_entropy)": run_naive,
            "torch linear_cross_entropy (reference)": run_torch_ref,
            "torch linear_cross_entropy (chunked)": run_torch_chunked,
            "three GEMMs alone (floor)": run_gemms}


def limit_threads(n):
    import torch
    torch.set_num_threads(n)
    try:
        import threadpoolctl
        threadpoolctl.threadpool_limits(n)
    except ImportError:  # NumPy's BLAS then keeps its own default
        print("(threadpoolctl not installed: NumPy's BLAS threads not set)")


def timing(a):
    import torch
    limit_threads(a.threads)
    for shape in a.shapes.split(","):
        N, H, V = (int(v) for v in shape.split("x"))
        fns = contenders(N, H, V, torch.float32, a.budgets)
        times = interleaved_times(fns, a.repeat)
        ref = np.median(times["fastce.torch.linear_cross_entropy"])
        floor = np.median(times["three GEMMs alone (floor)"])
        print("N=%d H=%d V=%d float32, %d thread(s), forward+backward, medians of %d "
              "interleaved reps" % (N, H, V, a.threads, a.repeat))
        for k, v in times.items():
            m = np.median(v)
            print("  %-42s %8.3f s  %5.2fx fastce  %5.2fx GEMMs" % (k, m, m / ref, m / floor))


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("no %s in /proc/self/status" % field)


def reset_peak_rss():
    """Reset the peak RSS (Linux: clear_refs 5) and return the current RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def peak_rss():
    return _status_kb("VmHWM")


def memory_one(a):
    """(in a fresh process) peak RSS above the inputs of one contender's call"""
    import torch
    limit_threads(a.threads)
    N, H, V = (int(v) for v in a.shapes.split(",")[0].split("x"))
    fns = contenders(N, H, V, torch.float32, a.budgets)
    import gc
    gc.collect()
    base = reset_peak_rss()
    out = fns[a.one]()
    peak = peak_rss()
    returned = sum(x.numel() * x.element_size() for x in out)
    print(json.dumps({"peak_above_inputs_mb": (peak - base) / 1024,
                      "returned_mb": returned / 2 ** 20}))


def memory(a):
    N, H, V = (int(v) for v in a.shapes.split(",")[0].split("x"))
    labels = ["fastce.torch.linear_cross_entropy", "naive torch (linear + cross_entropy)",
              "torch linear_cross_entropy (reference)", "torch linear_cross_entropy (chunked)"]
    print("peak RSS above the inputs, N=%d H=%d V=%d float32 (naive logits: %.0f MB)"
          % (N, H, V, N * V * 4 / 2 ** 20))
    for k in labels + ["fastce, memory_budget=%d MiB" % mib for mib in a.budgets]:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--shapes", a.shapes,
                            "--threads", str(a.threads), "--one", k] +
                           (["--budgets", ",".join(map(str, a.budgets))] if a.budgets else []),
                           capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print("  %-42s %8.0f MB (of which returned gradients %.0f MB)"
              % (k, m["peak_above_inputs_mb"], m["returned_mb"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x1024x32000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--budgets", type=lambda v: [int(b) for b in v.split(",")], default=[],
                    help="also fastce with these memory budgets (MiB), e.g. 64,256")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return memory_one(a)
    return memory(a) if a.memory else timing(a)


if __name__ == "__main__":
    main()
