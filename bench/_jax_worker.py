"""Worker process for bench/bench.py's ``jax.jit`` contender (one process per thread count T).

Run as ``python bench/_jax_worker.py T``; bench.py starts it (``JaxPool`` there) and talks to it
with pickled messages: requests on the worker's stdin, replies on the stdout it had at start
(anything JAX or this script prints goes to stderr instead).

Why a separate process: JAX's CPU backend sizes its intra-op thread pool once, when the backend
starts, and offers no call to change it afterwards. In jax 0.10.2 that pool is sized from the
process's CPU affinity at that moment (``tsl::port::MaxParallelism`` -> ``sched_getaffinity``);
the XLA_FLAGS recipe ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``
alone does *not* limit it (measured: CPU time / wall time 1.96 during a timed loop at "T=1" on
2 cores; ``intra_op_parallelism_threads=1`` is not even an XLA flag, and the Eigen flag only
concerns Eigen-backed ops such as dots). So before JAX is imported this worker

1. restricts its own affinity to T of the usable cores (``os.sched_setaffinity``),
2. imports jax (with XLA_FLAGS from the environment bench.py gave it; for T=1 it also holds
   ``--xla_cpu_multi_thread_eigen=false``) and starts the CPU backend (``jax.devices()``),
3. for T > 1, gives every thread of the process (``/proc/self/task``) the full affinity
   back: the pool keeps its T threads, but they may run on any core, like torch's and
   fastce's threads. For T = 1 the process stays on its one core: JAX dispatches
   asynchronously, so besides its one pool thread the Python thread that enqueues the next
   call runs at the same time, and on tiny shapes (dispatch-bound) that made "T=1" use
   1.3-1.4 CPUs per wall second (measured on Zen 3 at 512x40); one core is what the
   single-threaded torch and fastce rows get.

Every timing sample also measures the process's CPU time (``time.process_time``, all threads)
and reports CPU time / wall time; bench.py checks it is not above T (+ slack), which it would be
if the pool had more threads than asked for.

Timing uses the same ``_util.time_calls`` / ``_util.calibrate`` as the in-process contenders;
bench.py interleaves the samples with the other contenders' (it asks for one sample at a time).
The case (logits, targets) is regenerated here with ``bench.make_case`` from the same seed -
bit-identical to bench.py's (bench.py compares a fingerprint) - and converted with
``jnp.asarray`` once, outside any timed region. Every timed call ends with
``.block_until_ready()`` on its results.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import traceback

T_START = time.perf_counter()


def _set_affinity_then_import(nt: int):
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:min(nt, len(allowed))])
    import jax  # noqa: E402  (after the affinity: the backend sizes its pool from it)

    jax.config.update("jax_enable_x64", True)  # float64 logits stay float64
    devices = jax.devices()  # start the CPU backend (and its thread pool) now
    pinned = sorted(os.sched_getaffinity(0))
    restored, failed = 0, 0
    if nt == 1:
        allowed = pinned  # one core for the whole process (see 3. above)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), allowed)
            restored += 1
        except OSError:
            failed += 1
    return jax, {"affinity_at_backend_start": pinned, "affinity_after": allowed,
                 "threads_restored": restored, "threads_restore_failed": failed,
                 "devices": [str(d) for d in devices]}


def main() -> None:
    nt = int(sys.argv[1])
    out = os.fdopen(os.dup(1), "wb")  # the protocol channel ...
    os.dup2(2, 1)  # ... and stray prints go to stderr
    inp = sys.stdin.buffer

    def reply(obj) -> None:
        pickle.dump(obj, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    try:
        jax, info = _set_affinity_then_import(nt)
        import jax.numpy as jnp
        import numpy as np
        import optax

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _util
        import bench
    except Exception:
        reply({"error": traceback.format_exc()})
        return
    info.update({"threads": nt, "xla_flags": os.environ.get("XLA_FLAGS"),
                 "versions": {"jax": jax.__version__, "jaxlib": getattr(
                     __import__("jaxlib"), "__version__", None), "optax": optax.__version__},
                 "startup_s": time.perf_counter() - T_START, "pid": os.getpid()})
    reply({"ok": info})

    case = None  # (key, x, t, class axis)
    fns = {}

    def loss_fn(axis):
        return lambda a, b: optax.softmax_cross_entropy_with_integer_labels(a, b, axis=axis).mean()

    def call(fn, x, t):
        return jax.block_until_ready(fn(x, t))

    while True:
        try:
            msg = pickle.load(inp)
        except EOFError:
            return
        op = msg[0]
        try:
            if op == "exit":
                reply({"ok": {"cpu_s": time.process_time()}})
                return
            if op == "case":
                _, shape, dtype, seed = msg
                fns.clear()
                case = None
                jax.clear_caches()
                t0 = time.perf_counter()
                c = bench.make_case(tuple(shape), bench.dtype_of(dtype), seed)
                fp = bench.fingerprint(c)
                x, t = jnp.asarray(c.logits), jnp.asarray(c.target)  # once, outside timing
                jax.block_until_ready((x, t))
                del c
                case = (tuple(shape), dtype, seed, x, t)
                reply({"ok": {"fingerprint": fp, "setup_s": time.perf_counter() - t0}})
            elif op == "drop":
                fns.clear()
                case = None
                jax.clear_caches()
                reply({"ok": None})
            elif op == "make":  # build and warm up: first call (trace + compile + run), second
                _, pass_ = msg
                x, t = case[3], case[4]
                if pass_ == bench.FWD:
                    f = jax.jit(loss_fn(1))
                else:
                    f = jax.jit(jax.value_and_grad(loss_fn(1)))
                t0 = time.perf_counter()
                first = call(f, x, t)
                t_first = time.perf_counter() - t0
                d = bench.digest(first)
                del first
                t0 = time.perf_counter()
                call(f, x, t)
                t_warm = time.perf_counter() - t0
                fns[pass_] = f
                reply({"ok": {"digest": d, "first_call_s": t_first, "warm_call_s": t_warm,
                              "cache_size": f._cache_size()}})
            elif op == "calibrate":
                _, pass_, min_time = msg
                f, x, t = fns[pass_], case[3], case[4]
                reply({"ok": _util.calibrate(lambda: call(f, x, t), min_time)})
            elif op == "sample":
                _, pass_, number = msg
                f, x, t = fns[pass_], case[3], case[4]
                c0 = time.process_time()
                w = _util.time_calls(lambda: call(f, x, t), number)
                cpu = time.process_time() - c0
                reply({"ok": {"s_per_call": w, "cpu_per_wall": cpu / (w * number),
                              "cache_size": f._cache_size()}})
            else:
                reply({"error": f"unknown request {op!r}"})
        except Exception:
            reply({"error": traceback.format_exc()})


if __name__ == "__main__":
    main()
