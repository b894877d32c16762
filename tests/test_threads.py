"""Threads: results bit-identical for any thread count, calls from many Python
threads at once, and fastce's OpenMP beside torch's in one process."""
import concurrent.futures
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastce

# (shape, what it exercises)
SHAPES = [
    ((4096, 10), "small C: transposed tiles, vectorised across rows"),
    ((300, 3000), "rows, one block"),
    ((16, 40000), "rows, several 8 KiB blocks merged"),
    ((3, 300000), "long rows split into segments"),
    ((8, 7, 33, 9), "K-dim columns layout"),
]


@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[w for _, w in SHAPES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bit_identical_for_any_thread_count(isa, shape, dtype):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    C = shape[1]
    t = rng.integers(0, C, (shape[0],) + shape[2:])
    t.flat[::7] = -100
    w = rng.random(C) + 0.5
    results = []
    for n in (1, 2, 3, 8):
        kw = dict(weight=w, label_smoothing=0.1, n_threads=n)
        mean = fastce.cross_entropy(x, t, **kw)
        loss, grad = fastce.cross_entropy_with_grad(x, t, reduction="none", **kw)
        lsm = fastce.log_softmax(x, axis=1, n_threads=n)
        results.append((mean, loss, grad, lsm))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b), "result depends on the thread count"


def test_bad_n_threads():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError):
        fastce.cross_entropy(x, np.array([0, 1]), n_threads=0)
    with pytest.raises(TypeError):
        fastce.cross_entropy(x, np.array([0, 1]), n_threads=1.5)


def test_many_python_threads_at_once(isa):
    # the GIL is released around the kernel: concurrent calls must not interfere
    rng = np.random.default_rng(3)
    inputs = [(rng.standard_normal((257, 129)), rng.integers(0, 129, 257)) for _ in range(16)]
    expected = [fastce.cross_entropy_with_grad(x, t, n_threads=1) for x, t in inputs]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda xt: fastce.cross_entropy_with_grad(*xt, n_threads=2),
                            inputs * 4))
    for i, (loss, grad) in enumerate(got):
        e_loss, e_grad = expected[i % len(inputs)]
        assert loss == e_loss and np.array_equal(grad, e_grad)


def test_beside_torch_in_one_process():
    # torch ships its own OpenMP runtime; both must run interleaved, with threads,
    # and agree. Run in a fresh interpreter so torch's runtime loads first.
    pytest.importorskip("torch")
    code = r"""
import numpy as np, torch, fastce
import torch.nn.functional as F
torch.set_num_threads(2)
rng = np.random.default_rng(0)
x = rng.standard_normal((2048, 1000)).astype(np.float32)
t = rng.integers(0, 1000, 2048)
for _ in range(5):
    a = F.cross_entropy(torch.from_numpy(x).double(), torch.from_numpy(t)).item()
    b = float(fastce.cross_entropy(x.astype(np.float64), t, n_threads=2))
    assert abs(a - b) <= 1e-12 * abs(a), (a, b)
print("ok", fastce.get_config()["openmp"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_fastce_num_threads_environment_variable():
    code = "import fastce; print(fastce.get_config()['default_threads'])"
    n = min(2, len(os.sched_getaffinity(0)))  # at most the usable cores (see below)
    env = dict(os.environ, FASTCE_NUM_THREADS=str(n))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == str(n)
    env = dict(os.environ, FASTCE_NUM_THREADS="lots")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "0" and "FASTCE_NUM_THREADS" in out.stderr


# Issue 11c: FASTCE_NUM_THREADS=99999999999 made `import fastce` fail (OverflowError),
# and 2000 started 2000 threads. More than the usable cores are never started: such
# values import, warn and use the usable cores, as n_threads= does.
@pytest.mark.parametrize("value", ["99999999999", "2000", " 1 "])
def test_fastce_num_threads_is_capped_at_the_cores(value):
    code = ("import os, fastce; print(fastce.get_config()['default_threads'], "
            "len(os.sched_getaffinity(0)))")
    env = dict(os.environ, FASTCE_NUM_THREADS=value)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    got, cores = map(int, out.stdout.split())
    if value.strip() == "1":
        assert got == 1 and not out.stderr
    else:
        assert got == cores and "usable cores" in out.stderr


def test_n_threads_beyond_the_cores_is_capped():
    # results are bit-identical for any thread count, so a capped call is too
    x = np.random.default_rng(0).standard_normal((300, 4000)).astype(np.float32)
    t = np.arange(300) % 4000
    ref = fastce.cross_entropy(x, t, n_threads=1)
    assert fastce.cross_entropy(x, t, n_threads=10**9) == ref
    assert fastce.cross_entropy_with_grad(x, t, n_threads=10**6)[0] == ref


def test_show_config(capsys):
    fastce.show_config()
    text = capsys.readouterr().out
    assert "isa" in text and fastce.get_isa() in text and "openmp" in text
    info = fastce.get_config()
    assert info["version"] == fastce.__version__
    assert set(info["isas_available"]) <= set(info["isas_compiled"])


# Issue 11b: after a call that used two or more OpenMP threads, a child made by
# fork (multiprocessing's default on Linux before Python 3.14) hung on its first
# call. The child now runs single-threaded and completes; the parent keeps its
# threads. The child's results equal the parent's (any thread count, same bits).
def test_fork_after_a_threaded_call_does_not_hang():
    code = r"""
import os, sys, numpy as np, fastce
x = np.random.default_rng(0).standard_normal((512, 4096)).astype(np.float32)
t = np.arange(512) % 4096
ref = fastce.cross_entropy(x, t, n_threads=2)
pid = os.fork()
if pid == 0:
    ok = fastce.cross_entropy(x, t, n_threads=2) == ref
    g = fastce.cross_entropy_with_grad(x, t)[1]
    os._exit(0 if ok and fastce.get_config()["forked_single_thread"] and g.shape == x.shape else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), fastce.get_config()["forked_single_thread"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False"]


# ------------------------------------------------------------------ 16 threads at once

def _thread_cases(rng):
    """(logits, target, options) covering the kernel's paths: small C, rows, rows of
    several blocks, rows split into segments, K-dim columns, probability targets;
    with weights, ignored samples, smoothing, each reduction and a grad_output."""
    cases = []
    for shape, dtype, kw in [
        ((2048, 10), np.float32, dict(reduction="mean", label_smoothing=0.1)),
        ((257, 129), np.float64, dict(reduction="sum")),
        ((33, 3000), np.float32, dict(reduction="none")),
        ((4, 9000), np.float64, dict(reduction="mean")),
        ((2, 140000), np.float32, dict(reduction="mean", label_smoothing=0.1)),  # segments
        ((6, 17, 5, 3), np.float32, dict(reduction="none", label_smoothing=0.2)),
    ]:
        x = (rng.standard_normal(shape) * 3).astype(dtype)
        C = shape[1]
        t = rng.integers(0, C, shape[:1] + shape[2:])
        t.flat[::5] = -100
        kw = dict(kw, weight=(rng.random(C) + 0.5).astype(dtype))
        if kw["reduction"] == "none":
            kw["grad_output"] = rng.standard_normal(t.shape).astype(dtype)
        cases.append((x, t, kw))
    p = rng.random((300, 50)) ** 3
    cases.append(((rng.standard_normal((300, 50)) * 3).astype(np.float32),
                  (p / p.sum(1, keepdims=True)).astype(np.float32), dict(label_smoothing=0.05)))
    return cases


def _all_results(x, t, kw, n_threads, out=None):
    """Loss, gradient (also into out=), plain loss and log_softmax of one case."""
    go = kw.get("grad_output")
    opts = {k: v for k, v in kw.items() if k != "grad_output"}
    loss, grad = fastce.cross_entropy_with_grad(x, t, grad_output=go, out=out,
                                                n_threads=n_threads, **opts)
    plain = fastce.cross_entropy(x, t, n_threads=n_threads, **opts)
    lsm = fastce.log_softmax(x, axis=1, n_threads=n_threads)
    return [np.asarray(loss).tobytes(), np.asarray(grad).tobytes(),
            np.asarray(plain).tobytes(), lsm.tobytes()]


def _run_in_threads(n, target):
    """Run target(i) in n threads started together; return their results, re-raising
    the first exception of any thread."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def body(i):
        try:
            barrier.wait(timeout=60)
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
        assert not th.is_alive(), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("sharing", ["shared", "distinct"])
def test_sixteen_threads_give_the_sequential_bits(isa, sharing):
    # 16 Python threads call fastce at the same time (the GIL is released around the
    # kernel, so the calls do overlap), each on every case, with 1 or 2 OpenMP
    # threads and a gradient buffer of its own through out=: "shared" passes the very
    # same array objects to every thread, "distinct" gives each thread its own
    # inputs. Every loss and gradient must have the bits of the sequential call.
    n = 16
    rng = np.random.default_rng(16)
    if sharing == "shared":
        per_thread = [_thread_cases(rng)] * n
    else:
        per_thread = [_thread_cases(rng) for _ in range(n)]
    expected = [[_all_results(x, t, kw, 1) for x, t, kw in cases] for cases in per_thread]
    outs = [[np.full(x.shape, np.nan, x.dtype) for x, _, _ in cases] for cases in per_thread]

    def work(i):
        got = []
        for rep in range(2):
            got.append([_all_results(x, t, kw, 1 + (i + rep) % 2,
                                     out=outs[i][k] if rep else None)
                        for k, (x, t, kw) in enumerate(per_thread[i])])
        return got

    for i, got in enumerate(_run_in_threads(n, work)):
        for rep in got:
            for k, (g, e) in enumerate(zip(rep, expected[i])):
                assert g == e, f"thread {i}, case {k}: not the sequential bits"


# ------------------------------------------------------------------ the GIL

def _counter_advances_during(call, tries=10):
    """Whether a Python thread makes progress while `call()` runs in this thread.

    A flag set around the call is not enough: with the default 5 ms switch interval
    the interpreter hands the GIL to a waiting thread every 5 ms of Python code, so a
    counter thread also advances between setting the flag and entering C. Here the
    switch interval is made 30 s, so the GIL changes hands only when its holder
    releases it. The counter thread releases it in every iteration (time.sleep); this
    thread holds it from reading the counter before the call to reading it after,
    except where the call itself releases it. So the counter advances during the call
    if and only if the call releases the GIL: deterministic, no timing involved (the
    call only has to outlast one 0.1 ms sleep; it is retried a few times in case the
    machine is too busy to schedule the counter thread at all)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        for _ in range(tries):
            count = [0]
            stop, running = threading.Event(), threading.Event()

            def counter():
                while not stop.is_set():
                    count[0] += 1
                    running.set()
                    time.sleep(1e-4)   # releases the GIL

            th = threading.Thread(target=counter, daemon=True)
            th.start()
            try:
                assert running.wait(timeout=60)
                before = count[0]
                call()
                after = count[0]
            finally:
                stop.set()
                th.join(timeout=60)
            if after > before:
                return True
        return False
    finally:
        sys.setswitchinterval(old)


def test_the_check_for_a_released_gil_can_fail():
    # a pure-Python loop holds the GIL throughout: no progress; a sleep releases it
    def python_loop():
        s = 0
        for i in range(2_000_000):
            s += i
    assert not _counter_advances_during(python_loop, tries=1)
    assert _counter_advances_during(lambda: time.sleep(0.05))


@pytest.mark.parametrize("fn", ["cross_entropy", "cross_entropy_with_grad", "log_softmax",
                                "logsumexp"])
def test_gil_is_released_during_the_kernel(isa, fn):
    # C-contiguous native float32 logits and int64 targets: the binding copies
    # nothing, so no NumPy operation that releases the GIL runs before the kernel;
    # ~30 M logits keep the kernel busy for several ms even at one thread.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 10000), dtype=np.float32)
    t = rng.integers(0, 10000, 3000)
    calls = {
        "cross_entropy": lambda: fastce.cross_entropy(x, t, n_threads=1),
        "cross_entropy_with_grad": lambda: fastce.cross_entropy_with_grad(x, t, n_threads=1),
        "log_softmax": lambda: fastce.log_softmax(x, n_threads=1),
        "logsumexp": lambda: fastce.logsumexp(x, n_threads=1),
    }
    calls[fn]()   # warm-up (first-touch of the allocator's pages)
    assert _counter_advances_during(calls[fn]), f"fastce.{fn} holds the GIL"


# ------------------------------------------------------------------ fork (multiprocessing)

# The same guarantee as test_fork_after_a_threaded_call_does_not_hang, the way users
# meet it: a multiprocessing Pool with the 'fork' start method after the parent ran
# threaded calls. Each worker's loss and gradient have the parent's bits, workers run
# single-threaded, and the parent keeps its threads. A hang fails by the timeouts.
def test_fork_pool_after_threaded_calls(isa):
    code = r"""
import multiprocessing as mp, numpy as np, fastce

def case(i):
    rng = np.random.default_rng(i)
    x = rng.standard_normal((256 + i, 3000)).astype(np.float32 if i % 2 else np.float64)
    return x, rng.integers(0, 3000, len(x))

def work(i):
    x, t = case(i)
    loss, grad = fastce.cross_entropy_with_grad(x, t, label_smoothing=0.1, n_threads=2)
    return (np.asarray(loss).tobytes(), grad.tobytes(),
            fastce.get_config()["forked_single_thread"])

if __name__ == "__main__":
    expected = [work(i) for i in range(6)]          # threaded calls in the parent
    assert not expected[0][2]
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map_async(work, range(6)).get(timeout=120)
    for (l, g, single), (el, eg, _) in zip(got, expected):
        assert single, "a forked worker did not run single-threaded"
        assert l == el and g == eg, "a forked worker's result differs"
    assert work(0)[:2] == expected[0][:2] and not fastce.get_config()["forked_single_thread"]
    print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240, env=dict(os.environ, FASTCE_ISA=isa))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
