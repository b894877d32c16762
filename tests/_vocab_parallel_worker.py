"""One rank of a vocabulary-parallel run, spawned by tests/test_vocab_parallel.py.

    python _vocab_parallel_worker.py RANK WORLD PORT CASES_JSON OUT_DIR TIMEOUT_S

Joins a gloo group on 127.0.0.1:PORT, then for each case of CASES_JSON builds the full
logits from the case's seed (the same on every rank), takes its own columns (the
case's widths, in rank order; "half": rounded to torch.float16 / torch.bfloat16, the
gradient saved as float32, exactly), calls fastce.torch.vocab_parallel_cross_entropy and
backpropagates; writes OUT_DIR/case<i>_rank<r>.npz (loss, grad, extras) or, for a case
that raises, OUT_DIR/case<i>_rank<r>.json (the exception's type and message).
A case with "die": [ranks] makes those ranks exit before the call, "stall": [ranks]
makes them sleep past the timeout instead (the others must then fail with an error,
not hang).
"""
import datetime
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import fastce.torch as ft


def full_inputs(case):
    rng = np.random.default_rng(case["seed"])
    n, total = case["N"], sum(case["widths"])
    dtype = np.dtype(case["dtype"])
    x = (rng.standard_normal((n, total)) * case.get("scale", 3.0)).astype(dtype)
    t = rng.integers(0, total, n)
    t[rng.random(n) < case.get("ignore", 0.0)] = -100
    w = (rng.random(total) + 0.5).astype(dtype) if case.get("weight") else None
    return x, t, w


def run_case(case, rank):
    x, t, w = full_inputs(case)
    widths = case["widths"]
    start = sum(widths[:rank])
    local = torch.tensor(x[:, start:start + widths[rank]])
    if case.get("half"):  # float16 / bfloat16 shards of the float32 values, rounded
        local = local.to(getattr(torch, case["half"]))
    if case.get("empty_shard") and rank == 1:
        local = local[:, :0]
    if case.get("rows_off_by_one") and rank == 1:
        local, t = local[1:], t[1:]
    if case.get("target_differs") and rank == 1:
        t = t.copy()
        t[0] = (t[0] + 1) % sum(widths)
    if case.get("three_d"):  # (2, N / 2, V_r) logits, non-contiguous, and (2, N / 2) targets
        n = local.shape[0]
        local = local.t().contiguous().t().reshape(2, n // 2, -1)
        t = t.reshape(2, n // 2)
    local.requires_grad_(True)
    opts = dict(case.get("options", {}))
    if w is not None:
        opts["weight"] = torch.tensor(w)
    out = ft.vocab_parallel_cross_entropy(local, torch.tensor(t), **opts)
    loss = out[0] if isinstance(out, tuple) else out
    go = None
    if opts.get("reduction") == "none":
        go = torch.tensor(np.random.default_rng(case["seed"] + 1).standard_normal(t.size),
                          dtype=loss.dtype).reshape(t.shape)
        loss.backward(go)
    else:
        loss.backward()
    res = {"loss": loss.detach().numpy().reshape(-1) if loss.dim() else loss.detach().numpy(),
           "grad": (local.grad.float() if case.get("half") else local.grad).numpy()
           .reshape(-1, local.shape[-1])}
    if isinstance(out, tuple):
        for i, e in enumerate(out[1:]):
            res["extra%d" % i] = e.numpy()
    return res


def main():
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    with open(sys.argv[4]) as f:
        cases = json.load(f)
    out_dir, timeout = sys.argv[5], float(sys.argv[6])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout))
    for i, case in enumerate(cases):
        base = os.path.join(out_dir, "case%d_rank%d" % (i, rank))
        if rank in case.get("die", []):
            os._exit(3)
        if rank in case.get("stall", []):
            time.sleep(1.5 * timeout)  # alive, but never calls: the others time out
            os._exit(4)
        try:
            res = run_case(case, rank)
        except Exception as err:  # recorded for the test to check
            with open(base + ".json", "w") as f:
                json.dump({"type": type(err).__name__, "message": str(err)}, f)
            if case.get("die") or case.get("stall"):
                # the group is broken: nothing more can run, and torch's teardown of it
                # may abort ("terminate called ..."): leave without it
                sys.stdout.flush()
                os._exit(0)
        else:
            np.savez(base + ".npz", **res)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
