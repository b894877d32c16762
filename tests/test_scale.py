"""Scale: inputs of more than 2**31 elements (opt-in), and no memory leak per call.

test_more_than_2_31_elements runs only with FASTCE_BIG=1: one float32 buffer of
(2**31 // 1000 + 1000, 1000) logits (8.6 GB; 2**31 + 10**6 elements, 8.6e9 bytes:
beyond both a signed 32-bit element index and an unsigned 32-bit byte offset), used
in turn as (N, C) rows and as a (N', 10, 100) K-dim view, and as the out= buffer
of a zero-stride (broadcast) input. Peak RSS 11.0 GiB; on a 2-core Zen 4 VM 69 s
(avx512), 83 s (avx2), 102 s (sse2), 260 s (scalar): 8.6 minutes for the four. The
gradient is computed in place (out=logits), so no second 8.6 GB buffer is needed.

The leak tests always run (once, on the fastest ISA: the binding, the planner and its
scratch are ISA-independent, only the arithmetic differs per ISA): about 12 s.
"""

import ctypes
import gc
import os

import numpy as np
import pytest

import fastce
from _grad_helpers import logit_bound, rtol_for, torch_truth
from _helpers import assert_close, torch_ce

BIG = os.environ.get("FASTCE_BIG") == "1"


# --------------------------------------------------------------------------
# More than 2**31 elements
# --------------------------------------------------------------------------

C = 1000
R = 4096                           # the pattern: R distinct rows, repeated
N = 2**31 // C + 1000              # N * C = 2**31 + 10**6 - 648 > 2**31


def _fill(x, block):
    for s in range(0, len(x), len(block)):
        x[s:s + len(block)] = block[:len(x) - s]


@pytest.mark.skipif(not BIG, reason="set FASTCE_BIG=1 (needs ~10 GB of memory, minutes)")
def test_more_than_2_31_elements(isa):
    pytest.importorskip("torch")
    assert N * C > 2**31 and N * C * 4 > 2**32
    rng = np.random.default_rng(31)
    block = (rng.standard_normal((R, C)) * 3).astype(np.float32)
    t_block = rng.integers(0, C, R)
    t_block[::7] = -100
    w = (rng.random(C) + 0.5).astype(np.float32)
    kw = dict(weight=w, label_smoothing=0.1)
    x = np.empty((N, C), np.float32)
    t = t_block[np.arange(N) % R]

    # rows with content of their own (a wrong row or a wrapped index reads the
    # pattern instead): the first, those around element 2**31, the last, and 300
    # random ones past 2**31
    straddle = 2**31 // C
    special = np.unique(np.concatenate([
        [0, 1, straddle - 1, straddle, straddle + 1, N - 2, N - 1],
        rng.integers(straddle, N, 300)]))
    x_special = (rng.standard_normal((len(special), C)) * 3).astype(np.float32)
    t_special = rng.integers(0, C, len(special))
    pattern_rows = np.ones(N, bool)
    pattern_rows[special] = False

    def refill():
        _fill(x, block)
        x[special] = x_special
        t[special] = t_special

    refill()

    # ---- forward, rows: every per-sample loss against the float64 truth
    truth_block = torch_ce(block, t_block, reduction="none", **kw)
    truth_special = torch_ce(x_special, t_special, reduction="none", **kw)
    loss = fastce.cross_entropy(x, t, reduction="none", **kw)
    assert loss.shape == (N,) and loss.dtype == np.float32
    assert_close(loss[special], truth_special, np.float32)
    idx = np.flatnonzero(pattern_rows)
    assert_close(loss[idx], truth_block[idx % R], np.float32)
    truth_all = truth_block[np.arange(N) % R]
    truth_all[special] = truth_special
    assert_close(fastce.cross_entropy(x, t, reduction="sum", **kw), truth_all.sum(), np.float32)
    wt = np.where(t >= 0, w.astype(np.float64)[np.maximum(t, 0)], 0.0)
    den = wt.sum()
    mean = fastce.cross_entropy(x, t, **kw)
    assert_close(mean, truth_all.sum() / den, np.float32)
    del truth_all

    # ---- forward and gradient, K-dim view of the same memory: (N * C / 1000, 10, 100)
    xk = x.reshape(-1, 10, 100)
    tk = rng.integers(0, 10, (len(xk), 100)).astype(np.uint8)
    picks_n = np.concatenate([[0, len(xk) - 1], rng.integers(0, len(xk), 300),
                              rng.integers(straddle, len(xk), 300)])
    picks_j = rng.integers(0, 100, len(picks_n))
    samples = xk[picks_n, :, picks_j].copy()            # (picks, 10)
    ts = tk[picks_n, picks_j].astype(np.int64)
    lk = fastce.cross_entropy(xk, tk, reduction="none", label_smoothing=0.2)
    assert lk.shape == tk.shape
    assert_close(lk[picks_n, picks_j], torch_ce(samples, ts, reduction="none",
                                                label_smoothing=0.2), np.float32)
    total = fastce.cross_entropy(xk, tk, reduction="sum", label_smoothing=0.2)
    assert_close(total, float(lk.sum(dtype=np.float64)), np.float32)
    del lk
    loss_k, gk = fastce.cross_entropy_with_grad(xk, tk, reduction="sum", label_smoothing=0.2,
                                                out=xk)
    assert gk is xk
    assert loss_k == total                           # cross_entropy's loss, to the bit
    _, g_truth = torch_truth(samples, ts, reduction="none", label_smoothing=0.2)
    # "none" with ones = "sum" row by row; tolerance as tests/_grad_helpers.py:
    # rtol_for(C=10, L), atol = rtol * (2 wmax * 1)
    rtol = rtol_for(np.float32, 10, logit_bound(samples, 10))
    np.testing.assert_allclose(xk[picks_n, :, picks_j], g_truth, rtol=rtol, atol=rtol * 2)
    # every sample's gradient sums to 0 over its classes (softmax minus a distribution):
    # each entry is within rtol * (its truth) + atol of the truth, the truths' sizes add
    # up to <= 2 (sum p = sum q = 1), so |sum| <= 2 rtol + 10 atol, plus the float32
    # rounding of the 10 entries (10 u), summed in float64. The N(0, 3) logits left in
    # a sample that was not written sum to ~10 instead.
    bound = 2 * rtol + 10 * rtol * 2 + 10 * np.finfo(np.float32).eps / 2
    for s in range(0, len(xk), 65536):
        sums = xk[s:s + 65536].sum(axis=1, dtype=np.float64)
        assert np.abs(sums).max() <= bound, f"samples from {s}: gradient does not sum to 0"
    del xk, gk

    # ---- gradient, rows, in place: every row against the float64 truth
    refill()
    l_mean, g = fastce.cross_entropy_with_grad(x, t, out=x, **kw)
    assert g is x
    assert l_mean == mean                          # cross_entropy's loss, to the bit
    # truth: torch autograd of each row's own loss ("none" with ones) divided by the
    # batch's weight sum den, the mean's denominator
    _, gt_block = torch_truth(block, t_block, reduction="none", **kw)
    _, gt_special = torch_truth(x_special, t_special, reduction="none", **kw)
    gt_block /= den
    gt_special /= den
    # tolerance of tests/_grad_helpers.py: rtol_for(C, L) and atol = rtol * grad_scale,
    # grad_scale = 2 wmax / den for a weighted mean
    rtol = rtol_for(np.float32, C, max(logit_bound(block, C), logit_bound(x_special, C)))
    atol = rtol * 2 * float(w.max()) / den
    np.testing.assert_allclose(g[special], gt_special, rtol=rtol, atol=atol)
    for s in range(0, N, R):
        rows = slice(s, min(N, s + R))
        keep = pattern_rows[rows]
        got = g[rows][keep]
        want = gt_block[:len(keep)][keep]
        bad = np.abs(got - want) > atol + rtol * np.abs(want)
        assert not bad.any(), f"rows from {s}: gradient differs from the truth"
    del g

    # ---- gradient into a separate out= from a zero-stride input (read in place):
    # every row is the gradient of the same row
    row = block[3]
    xb = np.broadcast_to(row, (N, C))
    tb = np.full(N, int(t_block[3] if t_block[3] >= 0 else 0))
    _, gb = fastce.cross_entropy_with_grad(xb, tb, reduction="sum", out=x)
    assert gb is x
    _, g_row = torch_truth(row[None], tb[:1], reduction="sum")
    rtol = rtol_for(np.float32, C, logit_bound(row, C))
    for s in range(0, N, R):
        bad = np.abs(x[s:s + R] - g_row) > rtol * 2 + rtol * np.abs(g_row)
        assert not bad.any(), f"rows from {s}: not the row's gradient"
    del x, gb


# --------------------------------------------------------------------------
# Leaks
# --------------------------------------------------------------------------

# Each loop makes n iterations after a warm-up (allocator pools, NumPy's and torch's
# caches, first-touch pages) and may grow
# * RSS by at most SLACK = 1 MiB. The noise is the allocators' granularity: a 16 KiB
#   pymalloc pool, the pages of a 1 MiB arena touched one by one, glibc's 128 KiB
#   trim threshold (measured: 0.0 MiB for every loop here, a 16 KiB pool once). A
#   leak of 64 bytes per call grows RSS by 6.4 MB (6.1 MiB, 6 x SLACK) over ITER =
#   10**5 iterations, 3.2 MB (3 x) over ITER / 2 (fewer where a call is slow: said there);
# * malloc's heap in use by at most HEAP_SLACK = 16 KiB (measured: exactly 0 for every
#   loop here). malloc's smallest chunk is 32 bytes, so a leak of any malloc'ed block
#   per call grows it by 32 * n: 16 KiB is 512 calls' worth, and the loops make
#   thousands to 10**5.
ITER, WARM, SLACK, HEAP_SLACK = 100_000, 5_000, 2**20, 16 * 2**10
ONCE = "ISA-independent (binding, planner, scratch): run once, on the fastest ISA"
def in_fresh_process(request):
    """Run this test again in a fresh interpreter (pytest on its node id) and return True
    there; False when already in it. RSS growth depends on what ran before in the
    process: allocator pools that other tests left with free room absorb a small leak
    (test_the_leak_check_can_fail saw 1028096 of 1048576 bytes after test_linear.py)."""
    if os.environ.get("FASTCE_FRESH_PROCESS") == "1":
        return False
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        request.node.nodeid], cwd=str(request.config.rootpath),
                       env=dict(os.environ, FASTCE_FRESH_PROCESS="1"),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return True


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="RSS is read from /proc/self/statm (Linux)")


def _rss():
    """Resident set size of this process in bytes (/proc/self/statm, field 2)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _heap_in_use():
    """Bytes malloc has handed out and not had back (glibc mallinfo2: uordblks + hblkhd),
    or None without glibc >= 2.33. Exact to the byte, where RSS moves by pages: the
    kernel's scratch and NumPy's array buffers come from malloc, Python's small objects
    from pymalloc's arenas (seen by RSS only)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    fn.restype = _Mallinfo2
    info = fn()
    return info.uordblks + info.hblkhd


def _growth(step, n, warm=WARM):
    """(RSS growth, malloc heap growth or None) over n calls of step, after warm calls."""
    for _ in range(warm):
        step()
    gc.collect()
    rss, heap = _rss(), _heap_in_use()
    for _ in range(n):
        step()
    gc.collect()
    heap_after = _heap_in_use()
    return _rss() - rss, None if heap is None else heap_after - heap


def _assert_flat(step, n, what, warm=WARM):
    rss, heap = _growth(step, n, warm)
    assert rss <= SLACK, f"RSS grew {rss / 2**20:.2f} MiB over {n} iterations of {what}"
    assert heap is None or heap <= HEAP_SLACK, \
        f"malloc heap grew {heap} bytes over {n} iterations of {what}"


def _numpy_steps():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 10)).astype(np.float32)
    x64 = rng.standard_normal((3, 5, 2))
    t = rng.integers(0, 10, 8)
    t[0] = -100
    t64 = rng.integers(0, 5, (3, 2))
    p = rng.random((8, 10)).astype(np.float32)
    w = (rng.random(10) + 0.5).astype(np.float32)
    go = rng.standard_normal(8).astype(np.float32)
    out = np.empty_like(x)
    xf = np.asfortranarray(x)      # a layout that is copied
    bad_t = t.copy()
    bad_t[3] = 10

    def main_calls():              # the two entry points, as a training loop calls them
        fastce.cross_entropy(x, t)
        fastce.cross_entropy(xf, t, weight=w, label_smoothing=0.1, reduction="none")
        fastce.cross_entropy_with_grad(x, t, weight=w, label_smoothing=0.2)
        fastce.cross_entropy_with_grad(x, t, reduction="none", grad_output=go, out=out)

    def other_calls():             # probability targets, K-dim float64, the lse pair
        fastce.cross_entropy(x, p, weight=w, reduction="sum")
        fastce.cross_entropy_with_grad(x64, t64, reduction="sum", grad_output=2.0)
        fastce.log_softmax(x)
        fastce.logsumexp(x64, axis=1)

    def errors():                  # the error paths build messages and raise
        try:
            fastce.cross_entropy(x, bad_t)
        except IndexError:
            pass
        try:
            fastce.cross_entropy_with_grad(x, t, out=np.empty((8, 9), np.float32))
        except ValueError:
            pass

    return main_calls, other_calls, errors


@needs_proc
def test_the_leak_check_can_fail(isa, request):
    # 64 bytes kept per iteration in pymalloc (a 31-byte bytes object: 33 bytes of
    # header, the 64-byte size class): RSS sees it; 600 bytes in malloc (a bytearray's
    # buffer, above pymalloc's 512) for 100 iterations: the heap check sees it
    if isa != fastce.available_isas()[-1]:
        pytest.skip(ONCE)
    if in_fresh_process(request):
        return
    keep = []
    rss, _ = _growth(lambda: keep.append(bytes(31)), ITER)
    assert rss > SLACK
    keep = [None] * ITER   # the list itself does not grow while the heap is measured
    slots = iter(range(ITER))

    def leak():
        keep[next(slots)] = bytearray(600)

    _, heap = _growth(leak, 100, warm=10)
    assert heap is None or heap > HEAP_SLACK


@needs_proc
def test_no_leak_per_call(isa, request):
    if isa != fastce.available_isas()[-1]:
        pytest.skip(ONCE)
    if in_fresh_process(request):
        return
    main_calls, other_calls, errors = _numpy_steps()
    _assert_flat(main_calls, ITER, "4 calls of the main kinds")
    _assert_flat(other_calls, ITER // 2, "4 calls of other kinds")
    _assert_flat(errors, ITER // 2, "2 failing calls")


@needs_proc
def test_no_leak_large_calls(isa, request):
    # Inputs that take every heap allocation of csrc/fastce_planner.c, all made and
    # freed once per call on the calling thread (sizes scale with the thread count):
    # more than 64 work items (partial sums on the heap), a gradient of whole rows (the
    # kept exps, per thread), long rows split into segments (states, samples, masses),
    # with 1 and 2 threads. 50 iterations of 8 calls: the exact heap check sees any
    # block leaked per call (50 * 8 * 32 bytes > HEAP_SLACK), RSS a leak of ~3 KiB.
    if isa != fastce.available_isas()[-1]:
        pytest.skip(ONCE)
    if in_fresh_process(request):
        return
    rng = np.random.default_rng(1)
    cases = [(rng.standard_normal((2080, 1024)).astype(np.float32), rng.integers(0, 1024, 2080)),
             (rng.standard_normal((64, 2048)).astype(np.float32), rng.integers(0, 2048, 64)),
             (rng.standard_normal((2, 140000)).astype(np.float32), rng.integers(0, 140000, 2))]
    outs = [np.empty_like(x) for x, _ in cases]
    n_threads = iter(range(10**6))

    def step():
        nt = 1 + next(n_threads) % 2
        for (x, t), out in zip(cases, outs):
            fastce.cross_entropy(x, t, n_threads=nt)
            fastce.cross_entropy_with_grad(x, t, label_smoothing=0.1, out=out, n_threads=nt)
        fastce.cross_entropy_with_grad(*cases[1], reduction="none", n_threads=nt)
        fastce.log_softmax(cases[2][0], n_threads=nt)

    _assert_flat(step, 50, "8 large calls", warm=6)


@needs_proc
def test_no_leak_torch_module(isa, request):
    if isa != fastce.available_isas()[-1]:
        pytest.skip(ONCE)
    if in_fresh_process(request):
        return
    torch = pytest.importorskip("torch")
    import fastce.torch as ft

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(8, 10, requires_grad=True)
        t = torch.randint(0, 10, (8,))
        crit = ft.CrossEntropyLoss(label_smoothing=0.1)

        def step():
            crit(x, t).backward()
            x.grad = None

        # 3 * 10**4 iterations (each ~0.1 ms): 64 bytes each would be 1.9 MB, 1.8 x SLACK
        _assert_flat(step, 30_000, "forward+backward of fastce.torch.CrossEntropyLoss")
    finally:
        torch.set_num_threads(n)
