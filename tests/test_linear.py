"""Fused linear cross-entropy (issue 13): fastce.linear_cross_entropy[_with_grad] and
fastce.torch.linear_cross_entropy / LinearCrossEntropyLoss.

Truth: torch in float64 on the exactly upcast inputs, F.linear + the loss
(torch_lm_truth) + autograd. Tolerances: the logits come from a GEMM in the dtype, each
with an absolute error below 2 H u sum_k |h_k W_k| (u the unit roundoff), which moves
the loss and the softmax by at most twice that; on top, the kernel's own tolerance
(rtol_for of tests/_grad_helpers.py, with L the logits' bound). The gradients are
GEMMs of the logits' gradient G: an error of G of rtol * scale per entry (grad_scale)
becomes rtol * scale * sum |W| in grad_hidden (and sum |h| in grad_weight), and their
own rounding adds 2 K u (|G| @ |W|) (K the inner dimension).
"""
import gc
import os
import tracemalloc

import numpy as np
import pytest

import fastce
from _grad_helpers import (seed_of, grad_scale, logit_bound, rtol_for, torch_lm_truth,
                           torch_single_thread)  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")
F = torch.nn.functional

OPTIONS = [dict(), dict(reduction="sum", label_smoothing=0.1), dict(reduction="none"),
           dict(weight=True, ignore=True), dict(z_loss=1e-3, softcap=8.0, logit_scale=1.3),
           dict(ignore=True, reduction="none", grad_output=True, label_smoothing=0.2)]


def make(dtype, N, H, V, opt, bias, seed):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, H)).astype(dtype)
    W = (rng.standard_normal((V, H)) / np.sqrt(H) * 3).astype(dtype)
    b = rng.standard_normal(V).astype(dtype) if bias else None
    t = rng.integers(0, V, N)
    o = dict(OPTIONS[opt])
    if o.pop("ignore", False):
        t[rng.random(N) < 0.4] = -100
    if o.pop("weight", False):
        o["weight"] = (rng.random(V) + 0.5).astype(dtype)
    if o.pop("grad_output", False):
        o["grad_output"] = rng.standard_normal(N)
    return h, W, b, t, o


def truth(h, W, b, t, o):
    """(loss, z part, lse, grad_hidden, grad_weight, grad_bias, G, logits) in float64"""
    logits = h.astype(np.float64) @ W.astype(np.float64).T
    if b is not None:
        logits += b
    kw = {k: v for k, v in o.items() if k != "z_loss"}
    loss, z, lse, G = torch_lm_truth(logits, t, o.get("z_loss", 0.0), **kw)
    return loss, z, lse, G @ W.astype(np.float64), G.T @ h.astype(np.float64), G.sum(0), G, logits


def assert_linear_close(got, tr, h, W, t, o, dtype):
    loss, gh, gW = got[0], got[1], got[2]
    tl, tz, tlse, th, tw, tb, G, logits = tr
    u = np.finfo(dtype).eps / 2
    N, H = h.shape
    V = W.shape[0]
    gemm = 2 * H * u * float((np.abs(h.astype(np.float64)) @ np.abs(W.astype(np.float64)).T)
                             .max(initial=0.0))
    s, cap = o.get("logit_scale", 1.0), o.get("softcap")
    L = logit_bound(logits * s if cap is None else cap * np.tanh(logits * s / cap), V) + \
        (cap or 0.0)
    rtol = rtol_for(dtype, V, L) + 4 * gemm * s
    w = o.get("weight")
    wmax = 1.0 if w is None else float(np.abs(w).max())
    lmax = float(np.abs(tlse[np.isfinite(tlse)]).max(initial=0.0))
    zf = 1 + 2 * o.get("z_loss", 0.0) * lmax
    n_terms = N if o.get("reduction") == "sum" else 1
    np.testing.assert_allclose(np.float64(loss), tl, rtol=rtol,
                               atol=rtol * L * wmax * zf * n_terms + 1e-300)
    scale = grad_scale(logits, t, w, o.get("reduction", "mean"), -100,
                       o.get("grad_output")) * zf * s
    aG = np.abs(G)
    tol_h = rtol * scale * np.abs(W.astype(np.float64)).sum(0) + \
        4 * V * u * (aG @ np.abs(W.astype(np.float64)))
    tol_w = rtol * scale * np.abs(h.astype(np.float64)).sum(0) + \
        4 * N * u * (aG.T @ np.abs(h.astype(np.float64)))
    assert gh.dtype == dtype and gW.dtype == dtype
    assert np.all(np.abs(gh - th) <= tol_h + 1e-300), np.max(np.abs(gh - th) - tol_h)
    assert np.all(np.abs(gW - tw) <= tol_w + 1e-300), np.max(np.abs(gW - tw) - tol_w)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
@pytest.mark.parametrize("chunk", [1, 7, 40, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_matches_torch(isa, dtype, chunk, opt, bias):
    N, H, V = 40, 24, 300
    h, W, b, t, o = make(dtype, N, H, V, opt, bias, seed_of(chunk, opt, bias))
    tr = truth(h, W, b, t, o)
    got = fastce.linear_cross_entropy_with_grad(h, W, t, linear_bias=b, chunk_size=chunk,
                                                return_z_loss=True, return_lse=True, **o)
    assert_linear_close(got, tr, h, W, t, o, dtype)
    k = 4 if b is not None else 3
    if b is not None:
        assert got[3].dtype == dtype and got[3].shape == (V,)
        np.testing.assert_allclose(got[3], tr[5], rtol=0, atol=1e-5 if dtype == np.float32
                                   else 1e-13)
    # the loss-only call: the same loss and extras; every chunk size agrees to rounding
    fo = {k2: v for k2, v in o.items() if k2 != "grad_output"}
    only = fastce.linear_cross_entropy(h, W, t, linear_bias=b, chunk_size=chunk,
                                       return_z_loss=True, return_lse=True, **fo)
    for a, c in zip(only, (got[0],) + got[k:]):
        assert np.array_equal(a, c, equal_nan=True)
    # the kernel on the materialized logits (the same dtype): the same to GEMM rounding
    logits = h @ W.T + (b if b is not None else 0)
    ref = fastce.cross_entropy_with_grad(logits, t, return_lse=True, **o)
    np.testing.assert_allclose(got[-1], ref[-1], rtol=1e-4 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_edge_cases(isa, dtype):
    rng = np.random.default_rng(2)
    h, W = rng.standard_normal((0, 8)).astype(dtype), rng.standard_normal((5, 8)).astype(dtype)
    t = np.zeros(0, np.int64)
    loss, gh, gW = fastce.linear_cross_entropy_with_grad(h, W, t)
    assert np.isnan(loss) and gh.shape == (0, 8) and np.array_equal(gW, np.zeros_like(W))
    assert fastce.linear_cross_entropy(h, W, t, reduction="sum") == 0
    # every token ignored: NaN mean (as torch), zero gradients; their lse still given
    h = rng.standard_normal((6, 8)).astype(dtype)
    t = np.full(6, -100)
    loss, gh, gW, lse = fastce.linear_cross_entropy_with_grad(h, W, t, chunk_size=4,
                                                              return_lse=True)
    tl = F.cross_entropy(torch.tensor(h @ W.T), torch.tensor(t))
    assert np.isnan(loss) and np.isnan(tl.item())
    assert not gh.any() and not gW.any()
    np.testing.assert_allclose(lse, fastce.logsumexp(h @ W.T), rtol=1e-5)
    # weights that cancel: the mean over a 0 weight, parts apart, as the kernel's
    w = np.array([1.0, -1.0, 2.0, 3.0, 4.0], dtype)
    t = np.array([0, 1, 0, 1, -100, 0])
    t[5] = -100
    for eps in (0.0, 0.3):
        got = fastce.linear_cross_entropy(h, W, t, weight=w, label_smoothing=eps, chunk_size=2)
        ref = fastce.cross_entropy(h @ W.T, t, weight=w, label_smoothing=eps)
        assert np.array_equal(np.isnan(got), np.isnan(ref)) and (
            np.isnan(ref) or np.isinf(ref) and got == ref or np.isclose(got, ref))
    # with a z-loss too (its part over the 0 as well), and whatever return_z_loss
    for ret in (False, True):
        got = fastce.linear_cross_entropy(h, W, t, weight=w, z_loss=1e-2, chunk_size=2,
                                          return_z_loss=ret)
        ref = fastce.cross_entropy(h @ W.T, t, weight=w, z_loss=1e-2, return_z_loss=ret)
        for g_, r_ in zip(np.atleast_1d(got), np.atleast_1d(ref)):
            assert np.array_equal(g_, r_, equal_nan=True) or np.isclose(g_, r_)
    # weights so small that go / (their sum) overflows the dtype: rescaled as the
    # kernel rescales them, the gradients stay finite and right
    tiny = np.full(5, 1e-44 if dtype == np.float32 else 1e-320, dtype)
    t2 = np.array([0, 1, 2, 3, 4, 0])
    got = fastce.linear_cross_entropy_with_grad(h, W, t2, weight=tiny, chunk_size=4)
    ref = fastce.cross_entropy_with_grad(h @ W.T, t2, weight=tiny)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], ref[1] @ W, rtol=1e-4, atol=1e-6)
    # (..., H) hidden: the loss per token keeps the shape
    h3 = rng.standard_normal((2, 3, 8)).astype(dtype)
    t3 = rng.integers(0, 5, (2, 3))
    loss, gh, gW = fastce.linear_cross_entropy_with_grad(h3, W, t3, reduction="none")
    assert loss.shape == (2, 3) and gh.shape == (2, 3, 8)
    ref = fastce.cross_entropy_with_grad(h3.reshape(6, 8) @ W.T, t3.reshape(6),
                                         reduction="none")
    np.testing.assert_allclose(loss.reshape(6), ref[0], rtol=1e-5)


def test_linear_chunks_by_budget_and_ignored_rows_skipped(isa, monkeypatch):
    rng = np.random.default_rng(4)
    N, H, V = 50, 16, 1000
    h = rng.standard_normal((N, H)).astype(np.float32)
    W = rng.standard_normal((V, H)).astype(np.float32)
    t = rng.integers(0, V, N)
    t[::3] = -100
    rows = []
    real = np.matmul

    def counting(a, b, *args, **kw):
        if b.shape == (H, V):  # the logits' GEMM
            rows.append(a.shape[0])
        return real(a, b, *args, **kw)
    import fastce.linear as lin
    monkeypatch.setattr(lin.np, "matmul", counting)
    budget = 7 * V * 4 + 100  # 7 tokens' logits
    got = fastce.linear_cross_entropy_with_grad(h, W, t, memory_budget=budget)
    kept = int((t != -100).sum())
    assert sum(rows) == kept and max(rows) == 7  # ignored tokens cost no GEMM
    monkeypatch.setattr(lin.np, "matmul", real)
    ref = fastce.linear_cross_entropy_with_grad(h, W, t, chunk_size=N)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_linear_peak_memory(isa):
    # the extra memory beyond the returned gradients: one chunk of logits and the 8 MiB
    # add buffer, far below the naive logits (N x V)
    rng = np.random.default_rng(5)
    N, H, V = 512, 64, 32000
    h = rng.standard_normal((N, H)).astype(np.float32)
    W = (rng.standard_normal((V, H)) * 0.1).astype(np.float32)
    t = rng.integers(0, V, N)
    naive = N * V * 4
    budget = naive // 16
    gc.collect()
    tracemalloc.start()
    try:
        res = fastce.linear_cross_entropy_with_grad(h, W, t, memory_budget=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    returned = sum(a.nbytes for a in res[1:])
    extra = peak - returned
    assert extra <= budget + 8 * 2**20 + 2**20, (extra, budget)
    assert extra < naive / 4


PEAK_SCRIPT = r"""
import gc, json, sys
import torch
import fastce.torch as ft
N, H, V, budget = (int(v) for v in sys.argv[1:5])
budget = budget or None
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
h = torch.randn(N, H, generator=g, requires_grad=True)
W = (torch.randn(V, H, generator=g) * 0.05).requires_grad_(True)
t = torch.randint(0, V, (N,), generator=g)
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS
base = kb("VmRSS")
ft.linear_cross_entropy(h, W, t, memory_budget=budget).backward()
peak = kb("VmHWM")
returned = (h.grad.numel() + W.grad.numel()) * 4
print(json.dumps({"extra": (peak - base) * 1024 - returned}))
"""


def torch_peak_extra(N, H, V, budget):
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(N), str(H), str(V),
                        str(budget)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])["extra"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux peak RSS")
def test_torch_linear_peak_rss(isa):
    # fastce.torch in a fresh process: peak RSS beyond the returned gradients, one
    # chunk of logits (8 MiB here) and small change, against the naive logits (131 MB)
    if isa != fastce.available_isas()[0]:
        pytest.skip("ISA-independent; once")
    N, H, V = 1024, 256, 32000
    extra = torch_peak_extra(N, H, V, 8 << 20)
    naive = N * V * 4
    assert extra < naive / 4, (extra, naive)


@pytest.mark.skipif(os.environ.get("FASTCE_BIG") != "1", reason="opt-in: FASTCE_BIG=1")
def test_torch_linear_peak_rss_llm_head(isa):
    # the case: (4096, 1024) hidden, V = 128256, float32, the default budget:
    # below a quarter of the naive logits (2.1 GB) beyond the gradients returned
    if isa != fastce.available_isas()[0]:
        pytest.skip("ISA-independent; once")
    N, H, V = 4096, 1024, 128256
    extra = torch_peak_extra(N, H, V, 0)
    assert extra < N * V * 4 / 4, extra


def test_linear_errors(isa):
    h, W, t = np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32), np.arange(4)
    cases = [
        (lambda: fastce.linear_cross_entropy(h, np.zeros((5, 2), np.float32), t), ValueError,
         "hidden's last axis (H = 3) must match linear_weight's second (shape (5, 2): (V, H))"),
        (lambda: fastce.linear_cross_entropy(h, W.astype(np.float64), t), TypeError,
         "hidden and linear_weight must have the same dtype, got float32 and float64"),
        (lambda: fastce.linear_cross_entropy(h.astype(np.int32), W, t), TypeError,
         "hidden must have dtype float32, float64, float16 or bfloat16 (ml_dtypes), got "
         "int32"),
        (lambda: fastce.linear_cross_entropy(h, W, t, memory_budget=19), ValueError,
         "memory_budget=19 bytes is too small for one token's logits (5 classes x 4 bytes "
         "= 20 bytes)"),
        (lambda: fastce.linear_cross_entropy(h, W, t, chunk_size=0), ValueError,
         "chunk_size must be >= 1, got 0"),
        (lambda: fastce.linear_cross_entropy(h, W, t, chunk_size=2, memory_budget=100),
         ValueError, "pass chunk_size or memory_budget, not both"),
        (lambda: fastce.linear_cross_entropy(h, W, np.zeros(4)), TypeError,
         "target must hold class indices (an integer dtype), got dtype float64; probability "
         "targets are not supported here"),
        (lambda: fastce.linear_cross_entropy(h, W, np.arange(3)), ValueError,
         "target must have shape (4,) (hidden's without its last axis), got shape (3,)"),
        (lambda: fastce.linear_cross_entropy(h, W, np.array([0, 1, 5, 2])), IndexError,
         "target 5 is out of bounds for 5 classes (at position (2,)); expected a class index "
         "in [0, 5) or ignore_index=-100"),
        (lambda: fastce.linear_cross_entropy(h, W, t, linear_bias=np.zeros(4)), ValueError,
         "linear_bias must have shape (5,) (one per class), got shape (4,)"),
        (lambda: fastce.linear_cross_entropy(h, W, t, reduction="avg"), ValueError,
         "reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
        (lambda: fastce.linear_cross_entropy_with_grad(h, W, t, grad_output=np.ones(2)),
         ValueError, "grad_output must be a scalar (one value) for reduction='mean', got "
         "shape (2,)"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc) as info:
            call()
        assert str(info.value) == message


# ---------------------------------------------------------------- fastce.torch

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_linear_matches_torch(dtype, reduction):
    import fastce.torch as ft
    g = torch.Generator().manual_seed(7)
    h0 = torch.randn(30, 16, generator=g, dtype=dtype)
    W0 = torch.randn(200, 16, generator=g, dtype=dtype) * 0.5
    b0 = torch.randn(200, generator=g, dtype=dtype)
    t = torch.randint(0, 200, (30,), generator=g)
    t[::4] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1)
    h, W, b = (x.clone().requires_grad_(True) for x in (h0, W0, b0))
    loss = ft.linear_cross_entropy(h, W, t, linear_bias=b, chunk_size=7, **kw)
    hr, Wr, br = (x.double().requires_grad_(True) for x in (h0, W0, b0))
    ref = F.cross_entropy(F.linear(hr, Wr, br), t, **kw)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    loss.backward(go.to(dtype), retain_graph=True)
    ref.backward(go)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    for a, r in ((h, hr), (W, Wr), (b, br)):
        torch.testing.assert_close(a.grad.double(), r.grad, **tol)
    # a second backward through the retained graph gives the same gradients again
    first = [x.grad.clone() for x in (h, W, b)]
    for x in (h, W, b):
        x.grad = None
    loss.backward(go.to(dtype))
    for x, f in zip((h, W, b), first):
        torch.testing.assert_close(x.grad, f, rtol=0, atol=0)


def test_torch_linear_frozen_weight_and_module(monkeypatch):
    import fastce._torch_linear as tl
    import fastce.torch as ft
    outs = []
    mm, mm_add = tl._TorchGemm.mm, tl._TorchGemm.mm_add
    monkeypatch.setattr(tl._TorchGemm, "mm", staticmethod(
        lambda a, b, out: (outs.append(out.shape), mm(a, b, out))))
    monkeypatch.setattr(tl._TorchGemm, "mm_add", staticmethod(
        lambda a, b, out: (outs.append(out.shape), mm_add(a, b, out))))
    g = torch.Generator().manual_seed(8)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    W = torch.randn(50, 8, generator=g)  # frozen: no grad_weight GEMM
    t = torch.randint(0, 50, (10,), generator=g)
    crit = ft.LinearCrossEntropyLoss(chunk_size=3, z_loss=1e-3)
    loss = crit(h, W, t)
    loss.backward()
    assert W.grad is None
    assert (50, 8) not in outs and (3, 8) in outs  # grad_hidden's GEMM ran, not grad_weight's
    # frozen hidden, only the bias learns: neither grad_hidden's nor grad_weight's GEMM
    outs.clear()
    b = torch.zeros(50, requires_grad=True)
    ft.linear_cross_entropy(h.detach(), W, t, linear_bias=b, chunk_size=3).backward()
    assert outs == [(3, 50), (3, 50), (3, 50), (1, 50)]  # the logits' GEMMs only
    ref_b = torch.zeros(50, requires_grad=True)
    F.cross_entropy(h.detach() @ W.T + ref_b, t).backward()
    torch.testing.assert_close(b.grad, ref_b.grad, rtol=1e-5, atol=1e-7)
    hr = h.detach().clone().requires_grad_(True)
    logits = hr @ W.T
    ref = F.cross_entropy(logits, t) + 1e-3 * (torch.logsumexp(logits, 1) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-4, atol=1e-6)
    assert "chunk_size=3" in repr(crit)
    with torch.no_grad():
        assert torch.equal(crit(h, W, t), loss.detach())


def test_torch_linear_training_loop_matches():
    # a small language model (embedding -> linear head): the same loss curve with
    # fastce.torch.LinearCrossEntropyLoss as with F.linear + F.cross_entropy
    import fastce.torch as ft
    V, D, N, steps = 64, 16, 48, 200
    data = torch.randint(0, V, (N + 1,), generator=torch.Generator().manual_seed(9))
    curves = []
    for use_fastce in (True, False):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(V, D).double()
        head = torch.nn.Linear(D, V).double()
        opt = torch.optim.SGD(list(emb.parameters()) + list(head.parameters()), lr=0.5)
        crit = ft.LinearCrossEntropyLoss(chunk_size=20)
        curve = []
        for _ in range(steps):
            x = emb(data[:-1])
            if use_fastce:
                loss = crit(x, head.weight, data[1:], head.bias)
            else:
                loss = F.cross_entropy(head(x), data[1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(np.array(curve))
    assert curves[0][-1] < 0.5 * curves[0][0]  # it learns
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-9)


def test_torch_linear_errors():
    import fastce.torch as ft
    h, W, t = torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="same dtype"):
        ft.linear_cross_entropy(h, W.double(), t)
    with pytest.raises(TypeError, match="linear_weight must be a torch.Tensor"):
        ft.linear_cross_entropy(h, W.numpy(), t)
    with pytest.raises(TypeError, match="torch.float16 or torch.bfloat16, got torch.int32"):
        ft.linear_cross_entropy(h.int(), W.int(), t)
    with pytest.raises(TypeError, match="same dtype"):
        ft.linear_cross_entropy(h.half(), W.bfloat16(), t)
    with pytest.raises(ValueError, match="must match linear_weight's second"):
        ft.linear_cross_entropy(torch.zeros(2, 5), W, t)
