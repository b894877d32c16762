"""The vocabulary-parallel loss on 2 processes against the unsharded call, side by side.

    python bench/vocab_parallel.py [--shape 4096x32000] [--repeat 7] [--ranks 2]

Spawns --ranks processes on 127.0.0.1 (gloo, one thread each), each holding its
contiguous share of the classes of the same float32 logits. Rank 0 interleaves, rep by
rep: the vocabulary-parallel loss (every rank calls
fastce.torch.vocab_parallel_cross_entropy; forward alone under no_grad, then forward +
backward), and, while the other ranks wait at a barrier, the unsharded calls on the
full logits: fastce.torch.cross_entropy (one thread, the same autograd work) and
fastce.cross_entropy / cross_entropy_with_grad at 1 and --ranks threads. Prints the
medians and each one's ratio to the vocabulary-parallel time of its pass.
"""
import argparse
import datetime
import os
import socket
import subprocess
import sys
import time

import numpy as np


def rank_main(a):
    import torch
    import torch.distributed as dist

    import fastce
    import fastce.torch as ft

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % a.port, rank=a.rank,
                            world_size=a.ranks, timeout=datetime.timedelta(seconds=600))
    N, C = (int(v) for v in a.shape.split("x"))
    rng = np.random.default_rng(0)
    full = rng.standard_normal((N, C)).astype(np.float32)
    t = torch.from_numpy(rng.integers(0, C, N))
    bounds = np.linspace(0, C, a.ranks + 1).astype(int)
    local = torch.from_numpy(np.ascontiguousarray(full[:, bounds[a.rank]:bounds[a.rank + 1]]))
    if a.rank != 0:
        full = None  # only rank 0 runs the unsharded calls

    def vp_fwd():
        with torch.no_grad():
            ft.vocab_parallel_cross_entropy(local, t)

    def vp_fwd_bwd():
        x = local.detach().requires_grad_(True)
        ft.vocab_parallel_cross_entropy(x, t).backward()

    cases = {"vocab-parallel %d ranks x 1 thread" % a.ranks: (vp_fwd, vp_fwd_bwd)}
    if a.rank == 0:
        xt = torch.from_numpy(full)
        tn = t.numpy()

        def torch_fwd_bwd():
            x = xt.detach().requires_grad_(True)
            ft.cross_entropy(x, t).backward()

        cases["fastce.torch unsharded, 1 thread"] = (
            lambda: ft.cross_entropy(xt, t), torch_fwd_bwd)
        for nt in sorted({1, a.ranks}):
            cases["fastce unsharded, %d thread%s" % (nt, "s" if nt > 1 else "")] = (
                lambda nt=nt: fastce.cross_entropy(full, tn, n_threads=nt),
                lambda nt=nt: fastce.cross_entropy_with_grad(full, tn, n_threads=nt))
    n_cases = torch.tensor([len(cases)])
    dist.broadcast(n_cases, 0)
    times = {(name, p): [] for name in cases for p in (0, 1)}
    vp_name = next(iter(cases))
    for rep in range(a.repeat + 1):  # the first is a warm-up
        for p in (0, 1):
            for i in range(int(n_cases)):
                name = list(cases)[i] if a.rank == 0 else vp_name
                dist.barrier()
                if i == 0 or a.rank == 0:
                    t0 = time.perf_counter()
                    cases[name if a.rank == 0 else vp_name][p]()
                    if rep:
                        times[(name, p)].append(time.perf_counter() - t0)
    dist.barrier()
    if a.rank == 0:
        print("shape (%d, %d) float32, class indices, mean; medians of %d interleaved reps"
              % (N, C, a.repeat))
        for p, label in ((0, "forward"), (1, "forward+backward")):
            ref = np.median(times[(vp_name, p)])
            print("\n%s" % label)
            for name in cases:
                med = np.median(times[(name, p)])
                print("  %-38s %9.1f ms  %5.2fx" % (name, 1e3 * med, med / ref))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x32000")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank >= 0:
        return rank_main(a)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTCE_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--shape", a.shape,
                               "--repeat", str(a.repeat), "--ranks", str(a.ranks),
                               "--rank", str(r), "--port", str(port)], env=env)
             for r in range(a.ranks)]
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        sys.exit("a rank failed: exit codes %s" % codes)


if __name__ == "__main__":
    main()
