#!/usr/bin/env python3
"""Benchmark fastce against PyTorch (eager and torch.compile), JAX, NumPy and SciPy on CPU.

What is measured
----------------
Softmax cross-entropy with class-index targets and ``reduction="mean"`` on random logits
(normal, std 2, fixed seed) of shape (N, C), float32 and float64, and with ``--dtype``
float16 and bfloat16 (``ml_dtypes``; drawn in float32, then rounded): there every
contender takes the half logits as they are (torch and torch.compile in that dtype, jax
too; fastce returns a float32 loss, the others one in the input's dtype, so the agreement
check allows half precision's rounding; scipy has no half version and is skipped):

* **fwd**      - the loss only.
* **fwd+bwd**  - the loss and d loss / d logits.

Contenders (see ``CONTENDERS`` below):

================  ======================================================================
fastce            ``fastce.cross_entropy`` / ``fastce.cross_entropy_with_grad``
                  (fresh gradient array), with ``n_threads=T``
fastce out=       ``fastce.cross_entropy_with_grad(..., out=buf)`` into a preallocated,
                  already-touched buffer (no allocation, no page faults)
fastce in-place   ``fastce.cross_entropy_with_grad(buf, ..., out=buf)``: the gradient
                  overwrites (a private copy of) the logits, as fused GPU kernels do
fastce z-loss     fwd: ``fastce.cross_entropy(..., z_loss=1e-4, return_z_loss=True)``, the
                  cost of the z-loss (PaLM) over the plain loss; its loss minus the z part
                  is what is checked against the other contenders
fastce softcap+z  fwd: ``fastce.cross_entropy(..., softcap=1e6, z_loss=1e-4, return_z_loss=True)``,
                  the cost of a softcap (a tanh per logit, Gemma 2) with the z-loss: a cap of
                  1e6 costs what a cap does on logits within 0.56 cap (the usual case, the
                  tanh's polynomial alone) and leaves the benchmark's logits within 1e-11
                  of themselves, so its loss minus the z part is checked against the
                  others as above
torch             ``torch.nn.functional.cross_entropy`` on tensors sharing the NumPy memory
                  (``torch.from_numpy``, no copy) with ``torch.set_num_threads(T)``;
                  fwd+bwd = ``loss.backward()`` on a leaf requiring grad, ``.grad = None``
                  before every call (so torch, like plain fastce, allocates a fresh gradient)
torch.compile     compiled peer: Inductor, default mode, ``dynamic=False``, ``fullgraph=True``
                  (a graph break raises instead of silently running parts eagerly), same
                  tensors and ``torch.set_num_threads(T)``. fwd: ``torch.compile(F.cross_entropy)``.
                  fwd+bwd: the compiled function is ``torch.func.grad_and_value(F.cross_entropy)``,
                  returning (loss, fresh gradient): one graph, so Inductor emits one C++ kernel
                  for the row reductions and the gradient and nothing runs through the autograd
                  engine. (Compiling the loss and calling ``backward()`` on a leaf gives a
                  forward and a backward kernel plus the engine: the same time for large shapes
                  here, but 0.12 vs 0.03 ms per call at 2x3 and slower to compile.)
jax.jit           compiled peer (needs jax and optax: ``pip install .[bench-peers]``):
                  ``jax.jit(lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y,
                  axis=1).mean())`` and ``jax.jit(jax.value_and_grad(...))`` for fwd+bwd, float64
                  with ``jax_enable_x64``; inputs converted with ``jnp.asarray`` once, outside the
                  timed region; every timed call ends with ``.block_until_ready()``. Runs in a
                  worker process per thread count (see "JAX threads" below)
numpy-ref         ``fastce.reference`` (the pure-NumPy twin; single-threaded)
scipy             ``scipy.special.logsumexp`` over the class axis minus the gathered target
                  logit, then ``mean`` - what a SciPy user writes (fwd only; single-threaded)
================  ======================================================================

Every contender runs at each thread count T of ``--threads`` (default: 1 and all usable cores),
except the single-threaded numpy-ref and scipy, which run in the T=1 group only.

How it is timed
---------------
For each (dtype, shape, T) all contenders are warmed up (and their loss, and for fwd+bwd a
sample of the gradient, checked against the first contender's), then ``--repeat`` repetitions are
run; within each repetition every contender is timed once, in an order rotated from repetition to
repetition, so machine noise hits all of them alike. The slow numpy-ref and scipy are timed
after the others' repetitions (5 repetitions, interleaved between themselves): the gigabytes
of temporaries they allocate and free would otherwise slow down whatever runs after them on
a VM. One timing sample is enough back-to-back calls to last ``--min-time`` seconds (many
calls for tiny shapes, one for big ones); a result is the median over repetitions of the
per-call time. Fresh results are freed as they come, so
allocating the gradient (and its page faults) is part of the cost where a contender allocates.
On virtual machines that hand freed memory back to the host (e.g. virtio-balloon free page
reporting), touching a fresh large array can cost ~1 ms per MB, far more than on bare metal;
"fastce out=" shows the cost without that allocation. The run also reports how much CPU other
processes used meanwhile: multi-threaded results are only trustworthy on an idle machine.

The machine's memory read bandwidth is measured for each T: a float32 array of
``--bw-mib`` MiB (default 1 GiB, above the last-level cache) is read by ``numpy.sum`` and
``numpy.bitwise_or.reduce`` on a uint64 view (for T > 1: T Python threads each reducing one
contiguous chunk - NumPy releases the GIL in reductions) and by ``torch.sum`` with
``torch.set_num_threads(T)`` if torch is installed, 5 times each, before the cases and again
after them; the fastest pass of any method is the "read limit" (noise only slows reads down).

Compile time of the compiled peers (torch.compile, jax.jit) is kept out of the medians: the
first call of each (dtype, shape, T, pass) traces and compiles, and its wall time (compile plus
one execution) is reported as ``compile_s`` in the JSON and in the table's "compile s" column;
a second, untimed call follows, then calibration (more warm-up calls) and only then the timed
samples. Nothing can recompile while timed unnoticed: a recompile (torch: Dynamo's
``unique_graphs`` counter; jax: the jitted function's cache size) during the timed samples turns
the check into a failure. torch.compile details:

* Dynamo's caches are reset (``torch._dynamo.reset()``) at the start of every (dtype, shape, T)
  group, so each group compiles from scratch under its own ``torch.set_num_threads(T)``.
  Without it the entries of one function would pile up across shapes, dtypes and thread counts
  (7 x 2 x 2 in a full run) past Dynamo's recompile limit (8), after which Dynamo silently runs
  the function eagerly. Inductor's C++ kernels hard-code ``torch.get_num_threads()`` at compile
  time; torch 2.13's global-state guard includes the thread count (changing it recompiles), older
  versions' did not - the reset covers both.
* The recompile limits are raised anyway and ``fail_on_recompile_limit_hit`` is set: hitting
  one raises (a FAILED note) instead of falling back to eager; ``fullgraph=True`` does the
  same for graph breaks.
* Inductor's cache directory is a fresh temporary one per run (removed at the end), so compile
  times do not depend on earlier runs; within a run, a kernel whose C++ source is identical to
  one compiled before (e.g. a tiny shape at T=2, which gets no parallel loop) is loaded from it.
* ``compile_threads=1``: the C++ compiler runs in the foreground (its CPU time counts as this
  run's own), with no pool of compile workers left behind to disturb the timings.
* Inductor's one-time start-up (the first compile in a process: ~10 s) is taken before the first
  case with an unrelated tiny function and reported separately ("torch.compile start-up"), so
  the first case's compile time is comparable to the others'.

JAX's per-worker start-up (import, backend) is reported in the notes and the JSON.

JAX threads
-----------
JAX's CPU backend sizes its intra-op thread pool once, when the backend starts; it cannot be
changed afterwards, and in jax 0.10.2 the XLA_FLAGS recipe (``--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1``) does not limit it (measured CPU/wall 1.96 at "T=1" on 2 cores).
The pool is sized from the process's CPU affinity at backend start. So the jax.jit contender runs
in one worker process per T (``bench/_jax_worker.py``, started on first use, kept for every
case at that T): it sets its affinity to T of the usable cores, imports jax (XLA_FLAGS from the
environment, plus ``--xla_cpu_multi_thread_eigen=false`` for T=1), starts the backend, then,
for T > 1, gives all its threads the full affinity back (T pool threads, free to run on any
core, as the in-process contenders' threads are). At T=1 the worker stays on one core: JAX's
asynchronous dispatch runs the Python thread that enqueues the next call beside the pool
thread, which on dispatch-bound tiny shapes used 1.3-1.4 CPUs per wall second (Zen 3,
512x40) where torch and fastce use one. The worker regenerates the case from the seed (a
fingerprint is compared with bench.py's copy) and does its own timing with the same
``time_calls``/``calibrate`` helpers; bench.py asks it for one sample at a time inside the same
rotated interleaving, so noise still hits all contenders alike, and the inter-process round trip
is not timed. Verification: each sample also measures the worker's CPU time (all threads) and
wall time (``cpu_per_wall`` in the JSON, over a row's samples; the same is measured in-process
for every other contender). For the compiled peers, CPU / wall over at least 0.1 s of calls
(the timed samples where they are that long, else an extra untimed loop after them: the process
CPU clock counts a thread running on another core only up to its last scheduler tick, ~4 ms, so
a short window can read far above T) is ``thread_check`` in the JSON, its range per T is in the
notes, and the check fails if it exceeds T by more than 0.3 (a pool with more threads than asked
for). The same check covers torch.compile in-process. Values well below T at T > 1 for small
shapes just mean the work was not split. T above the usable core count gives the pool only that
many threads (noted). The worker's CPU time counts as this run's own, not as "other processes".

How to read the table
---------------------
``ms``       median time per call, milliseconds (``+-%``: half the inter-quartile range of the
             repetitions, relative to the median).
``GB/s``     logits bytes / time (1 GB = 1e9 bytes): how fast the logits were consumed.
``x torch``  torch's median / this median, torch at the same pass and thread count
             (> 1: faster than torch). For numpy-ref and scipy: vs torch at 1 thread.
``x best peer``  for fastce rows: the faster of torch.compile and jax.jit (same pass, dtype,
             shape and thread count) / this median; "-" where neither ran.
``%read``    GB/s as a % of the read limit at that thread count. A forward pass must read the
             logits at least once, so ~100% is the ceiling for large shapes; fwd+bwd also
             writes a gradient as large as the logits - twice the traffic, three times with
             write-allocate - so its ceiling is about 33-50%. Shapes that fit in cache (e.g.
             65536x10, 2.6 MB) can exceed 100%. The (2, 3) case measures per-call overhead; its
             GB/s and %read are meaningless and shown as "-".
``compile s``  compiled peers: seconds of the first call (trace + compile + one run), not part
             of ``ms``.
``check``    "ok" when the loss (and a sample of the gradient) agrees with the first contender
             of the same pass; otherwise what differs (and the exit status is 1).

Outputs: the table on stdout, a JSON file (all timings, machine info: CPU, cores, fastce ISA/config,
library versions, threadpoolctl info, torch.compile and JAX worker settings, command line) and a
PNG plot (GB/s per shape, one bar per contender and thread count, fwd and fwd+bwd panels, read
limits as horizontal lines).

torch, jax + optax, scipy and matplotlib are optional: missing ones are skipped with a note.

Examples
--------
    python bench/bench.py --quick                      # ~2 minutes on a 2-core machine
    python bench/bench.py                              # full run (several minutes)
    python bench/bench.py --threads 1 --dtype float64 --shapes 4096x32000,1024x128256
    python bench/bench.py --json out.json --plot out.png --repeat 9
    python bench/bench.py --contenders fastce,torch.compile,jax.jit --shapes 16384x1000
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402  (bench/_util.py)

FWD, FWDBWD = "fwd", "fwd+bwd"

FULL_SHAPES: List[Tuple[int, ...]] = [
    (2, 3), (65536, 10), (16384, 1000), (4096, 32000), (1024, 128256), (256, 262144), (2, 16777216),
]
QUICK_SHAPES: List[Tuple[int, ...]] = [(2, 3), (65536, 10), (16384, 1000), (4096, 32000)]
SLOW_REPEAT = 5  # repetitions of the slow contenders (numpy-ref, scipy)
TINY_BYTES = 64 * 1024  # shapes below this measure per-call overhead; left out of the plot
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
JAX_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jax_worker.py")
PEERS = ("torch.compile", "jax.jit")  # the compiled peers: "x best peer" is vs the faster one
COMPILE_WEIGHT = 2e8  # progress-bar weight of one compile (~ a couple of seconds)
CHECK_CPU_SLACK = 0.3  # a compiled peer at T threads may use at most T + this CPU/wall ...
CHECK_CPU_WINDOW_S = 0.1  # ... measured over at least this long (module docstring)


# --------------------------------------------------------------------------------------
# optional modules
# --------------------------------------------------------------------------------------


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a broken install
        return None


def load_modules() -> types.SimpleNamespace:
    m = types.SimpleNamespace()
    m.fastce = _import("fastce")
    m.reference = _import("fastce.reference") if m.fastce is not None else None
    m.torch = _import("torch")
    m.F = _import("torch.nn.functional") if m.torch is not None else None
    m.scipy = _import("scipy")
    m.scipy_special = _import("scipy.special") if m.scipy is not None else None
    m.matplotlib = _import("matplotlib")
    m.threadpoolctl = _import("threadpoolctl")
    # torch.compile: configured (and its one-time start-up taken) by setup_torch_compile()
    # Inductor's CPU backend compiles C++: without a C++ compiler torch.compile cannot run
    m.torch_compile = (m.torch if m.torch is not None and hasattr(m.torch, "compile")
                       and _util.have_cxx_compiler() else None)
    # jax + optax run in worker processes (one per thread count): not imported here, where
    # their backend would start with the wrong thread count
    have_jax = all(importlib.util.find_spec(n) is not None for n in ("jax", "optax"))
    m.jax_pool = JaxPool() if have_jax else None
    return m


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    shape: Tuple[int, ...]
    dtype: np.dtype
    logits: np.ndarray
    target: np.ndarray
    seed: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes)

    @property
    def label(self) -> str:
        return f"{self.dtype.name} {shape_str(self.shape)}"


GEN_CHUNKS = 16  # logits are drawn in this many independent streams, in parallel
DTYPES = ("float32", "float64", "float16", "bfloat16")
HALF = ("float16", "bfloat16")


def dtype_of(name: str) -> np.dtype:
    """The NumPy dtype of a --dtype name: bfloat16 is ml_dtypes' (an optional dependency)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise argparse.ArgumentTypeError(
                "--dtype bfloat16 needs ml_dtypes (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def is_half(dtype: np.dtype) -> bool:
    return np.dtype(dtype).name in HALF


def make_case(shape: Tuple[int, ...], dtype: np.dtype, seed: int) -> Case:
    """Random normal logits (std 2) and uniform class-index targets (int64).

    Reproducible per (seed, dtype, shape) whatever the core count: the flat logits array is cut
    into GEN_CHUNKS pieces, each filled from its own spawned stream; threads fill them
    concurrently (NumPy's Generator releases the GIL while filling), which halves the set-up
    time of the 0.5-1 GB cases on two cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    ss = np.random.SeedSequence([seed, np.dtype(dtype).itemsize, *shape])
    streams = [np.random.default_rng(s) for s in ss.spawn(GEN_CHUNKS + 1)]
    # half precision: drawn in float32, then rounded (NumPy draws float32/float64 only)
    gen_dtype = np.float32 if is_half(dtype) else dtype
    drawn = np.empty(shape, dtype=gen_dtype)
    flat = drawn.reshape(-1)
    bounds = np.linspace(0, flat.size, GEN_CHUNKS + 1).astype(np.int64)

    def fill(i: int) -> None:
        part = flat[bounds[i]:bounds[i + 1]]
        streams[i].standard_normal(out=part, dtype=gen_dtype)
        part *= 2

    with ThreadPoolExecutor(max_workers=_util.usable_cores()) as pool:
        list(pool.map(fill, range(GEN_CHUNKS)))
    logits = drawn.astype(dtype) if is_half(dtype) else drawn
    del drawn
    tshape = (shape[0],) + tuple(shape[2:])
    target = streams[-1].integers(0, shape[1], size=tshape, dtype=np.int64)
    return Case(tuple(shape), np.dtype(dtype), logits, target, seed)


def fingerprint(case: Case) -> Tuple[float, int]:
    """A cheap checksum of a case (a strided sample of the logits, all targets): the JAX
    worker regenerates the case and must get the same one."""
    flat = case.logits.reshape(-1)
    return float(np.sum(flat[::4099], dtype=np.float64)), int(case.target.sum())


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# --------------------------------------------------------------------------------------
# contenders: each ``make`` returns a zero-argument callable doing one call; it returns the loss,
# or (loss, grad) for fwd+bwd, so the warm-up can check the contenders agree.
# --------------------------------------------------------------------------------------

Fn = Callable[[], Any]


def _fastce_fwd(m: Any, case: Case, nt: int) -> Fn:
    x, t, ce = case.logits, case.target, m.fastce.cross_entropy
    return lambda: ce(x, t, n_threads=nt)


def _fastce_fwdbwd(m: Any, case: Case, nt: int) -> Fn:
    x, t, ceg = case.logits, case.target, m.fastce.cross_entropy_with_grad
    return lambda: ceg(x, t, n_threads=nt)


def _fastce_fwdbwd_out(m: Any, case: Case, nt: int) -> Fn:
    x, t, ceg = case.logits, case.target, m.fastce.cross_entropy_with_grad
    buf = np.zeros_like(x)  # zeros => pages already touched
    return lambda: ceg(x, t, out=buf, n_threads=nt)


def _fastce_fwdbwd_inplace(m: Any, case: Case, nt: int) -> Fn:
    # out=logits on a private copy: the first call (the checked warm-up) sees the real
    # logits; later calls see the previous gradient, which costs the kernel the same
    x, t, ceg = case.logits, case.target, m.fastce.cross_entropy_with_grad
    buf = x.copy()
    return lambda: ceg(buf, t, out=buf, n_threads=nt)


def _fastce_fwd_z_loss(m: Any, case: Case, nt: int) -> Fn:
    # the cost of the z-loss in the forward: its loss minus its z part is checked
    # against the plain loss (the z part's float64 pass over N lses is timed too)
    x, t, ce = case.logits, case.target, m.fastce.cross_entropy

    def run() -> Any:
        loss, zpart = ce(x, t, z_loss=1e-4, return_z_loss=True, n_threads=nt)
        return loss - zpart

    return run


def _fastce_fwd_softcap_z(m: Any, case: Case, nt: int) -> Fn:
    # the cost of softcap + z-loss (the target: within 15 % of the plain forward)
    x, t, ce = case.logits, case.target, m.fastce.cross_entropy

    def run() -> Any:
        loss, zpart = ce(x, t, softcap=1e6, z_loss=1e-4, return_z_loss=True, n_threads=nt)
        return loss - zpart

    return run


def _tensor(m: Any, a: np.ndarray) -> Any:
    """A NumPy array as a tensor sharing its memory (bfloat16, which torch.from_numpy does
    not know, through its int16 bits)."""
    if a.dtype.name == "bfloat16":
        return m.torch.from_numpy(a.view(np.int16)).view(m.torch.bfloat16)
    return m.torch.from_numpy(a)


def _torch_fwd(m: Any, case: Case, nt: int) -> Fn:
    x, t, ce = _tensor(m, case.logits), m.torch.from_numpy(case.target), m.F.cross_entropy
    return lambda: ce(x, t)


def _torch_fwdbwd(m: Any, case: Case, nt: int) -> Fn:
    x = _tensor(m, case.logits).requires_grad_(True)  # leaf sharing the NumPy memory
    t, ce = m.torch.from_numpy(case.target), m.F.cross_entropy

    def run() -> Any:
        x.grad = None
        loss = ce(x, t)
        loss.backward()
        return loss.detach(), x.grad

    return run


def _ref_fwd(m: Any, case: Case, nt: int) -> Fn:
    x, t, ce = case.logits, case.target, m.reference.cross_entropy
    return lambda: ce(x, t)


def _ref_fwdbwd(m: Any, case: Case, nt: int) -> Fn:
    x, t, ceg = case.logits, case.target, m.reference.cross_entropy_with_grad
    return lambda: ceg(x, t)


def _scipy_fwd(m: Any, case: Case, nt: int) -> Fn:
    x, lse = case.logits, m.scipy_special.logsumexp
    t1 = np.expand_dims(case.target, 1)  # gather target logits along the class axis
    return lambda: np.mean(lse(x, axis=1) - np.take_along_axis(x, t1, axis=1)[:, 0])


# --------------------------------------------------------------------------------------
# runners: how run_group drives one contender on one case. A plain ``make`` returns an Fn,
# wrapped in a LocalRunner; the compiled peers return their own runner (torch.compile: a
# LocalRunner that reports compile time and recompiles; jax.jit: a RemoteRunner).
# --------------------------------------------------------------------------------------

Digest = Tuple[float, Optional[np.ndarray]]


class Runner:
    compiled = False  # True: the first call compiles (reported as compile_s, never timed)

    def warm_up(self) -> Tuple[Digest, float, float]:
        """(digest of the first call, its seconds, seconds of a warm call)."""
        raise NotImplementedError

    def calibrate(self, min_time: float) -> int:
        raise NotImplementedError

    def sample(self, number: int) -> Tuple[float, Optional[float]]:
        """(seconds per call over ``number`` back-to-back calls, process CPU time / wall time)."""
        raise NotImplementedError

    def mark(self) -> None:
        """Called right before the timed samples (see ``recompiled``)."""

    def recompiled(self) -> bool:
        """True if anything was compiled since ``mark``: the samples would include a compile."""
        return False


class LocalRunner(Runner):
    def __init__(self, fn: Fn, compiled: bool = False,
                 compiles: Optional[Callable[[], int]] = None) -> None:
        self.fn, self.compiled, self._compiles, self._mark = fn, compiled, compiles, None

    def warm_up(self) -> Tuple[Digest, float, float]:
        t0 = time.perf_counter()
        d = digest(self.fn())  # first call: warm-up (compile) and agreement check
        t_first = time.perf_counter() - t0
        if not self.compiled:
            return d, t_first, t_first
        t0 = time.perf_counter()
        self.fn()
        return d, t_first, time.perf_counter() - t0

    def calibrate(self, min_time: float) -> int:
        return _util.calibrate(self.fn, min_time)

    def sample(self, number: int) -> Tuple[float, Optional[float]]:
        c0 = time.process_time()
        t = _util.time_calls(self.fn, number)
        return t, (time.process_time() - c0) / (t * number)

    def mark(self) -> None:
        self._mark = self._compiles() if self._compiles else None

    def recompiled(self) -> bool:
        return self._compiles is not None and self._compiles() != self._mark


def _dynamo_graphs(m: Any) -> Callable[[], int]:
    """Dynamo's count of graphs compiled so far (process-wide; reset() does not clear it)."""
    from torch._dynamo.utils import counters

    return lambda: int(counters["stats"]["unique_graphs"])


def _tcompile_fwd(m: Any, case: Case, nt: int) -> Runner:
    x, t = _tensor(m, case.logits), m.torch.from_numpy(case.target)
    cf = m.torch.compile(m.F.cross_entropy, dynamic=False, fullgraph=True)
    return LocalRunner(lambda: cf(x, t), compiled=True, compiles=_dynamo_graphs(m))


def _tcompile_fwdbwd(m: Any, case: Case, nt: int) -> Runner:
    x, t = _tensor(m, case.logits), m.torch.from_numpy(case.target)
    F, grad_and_value = m.F, m.torch.func.grad_and_value

    def loss_and_grad(a: Any, b: Any) -> Tuple[Any, Any]:
        # one graph (forward and backward): Inductor fuses the row reductions and the gradient
        # into one kernel, and no autograd engine runs per call
        g, loss = grad_and_value(F.cross_entropy)(a, b)
        return loss, g

    cf = m.torch.compile(loss_and_grad, dynamic=False, fullgraph=True)
    return LocalRunner(lambda: cf(x, t), compiled=True, compiles=_dynamo_graphs(m))


def setup_torch_compile(m: Any) -> Dict[str, Any]:
    """Configure torch.compile for the benchmark and take Inductor's one-time start-up.

    See the module docstring ("How it is timed"): fresh cache directory, raised recompile limits
    that fail loudly, in-process C++ compilation. Returns what was set, for the JSON.
    """
    torch = m.torch
    import torch._dynamo
    import torch._inductor.config

    info: Dict[str, Any] = {"cache_dir": tempfile.mkdtemp(prefix="fastce-bench-inductor-"),
                            "previous_cache_dir_env": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = info["cache_dir"]
    dc = torch._dynamo.config
    # one group compiles at most a few graphs per function (Dynamo is reset per group), so the
    # limits are never near; raised anyway, and hitting one raises rather than running eagerly.
    # (recompile_* are the torch >= 2.6 names; cache_size_* the older ones, now aliases.)
    for name, at_least in (("recompile_limit", 64), ("cache_size_limit", 64),
                           ("accumulated_recompile_limit", 1024),
                           ("accumulated_cache_size_limit", 1024)):
        if hasattr(dc, name):
            setattr(dc, name, max(int(getattr(dc, name)), at_least))
            info[name] = getattr(dc, name)
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(dc, name):
            setattr(dc, name, True)
            info[name] = True
    torch._inductor.config.compile_threads = 1
    info["compile_threads"] = 1
    t0 = time.perf_counter()
    warm = torch.compile(lambda a: (a * 2).sum(), dynamic=False, fullgraph=True)  # unrelated graph
    warm(torch.ones(5, 5))
    info["startup_s"] = time.perf_counter() - t0
    torch._dynamo.reset()
    return info


def cleanup_torch_compile(info: Optional[Dict[str, Any]]) -> None:
    if not info:
        return
    shutil.rmtree(info["cache_dir"], ignore_errors=True)
    if info["previous_cache_dir_env"] is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = info["previous_cache_dir_env"]


class PeerUnavailable(RuntimeError):
    """A contender that cannot run at all (e.g. its worker process does not start)."""


class JaxWorker:
    """One ``bench/_jax_worker.py`` process, whose JAX backend has ``nt`` threads."""

    def __init__(self, nt: int) -> None:
        self.nt = nt
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "")
        if nt == 1 and "xla_cpu_multi_thread_eigen" not in flags:
            flags = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
        if flags:
            env["XLA_FLAGS"] = flags
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, JAX_WORKER, str(nt)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.case_key: Optional[Tuple[Any, ...]] = None
        try:
            self.info: Dict[str, Any] = self._recv()  # after jax's import and backend start
        except Exception:
            self.proc.kill()
            self.proc.wait()
            self.stderr.close()
            raise

    def _stderr_tail(self, n: int = 3) -> str:
        try:
            self.stderr.seek(0)
            lines = self.stderr.read().decode(errors="replace").strip().splitlines()
        except Exception:
            return ""
        return " | ".join(lines[-n:])

    def _recv(self) -> Any:
        try:
            r = pickle.load(self.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            rc = self.proc.poll()
            raise RuntimeError(f"jax worker (T={self.nt}) died (exit status {rc}): "
                               f"{self._stderr_tail()}") from None
        if "error" in r:
            lines = r["error"].strip().splitlines()
            raise RuntimeError(f"jax worker (T={self.nt}): " + " | ".join(lines[-2:]))
        return r["ok"]

    def request(self, *msg: Any) -> Any:
        try:
            pickle.dump(msg, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
        except OSError:
            raise RuntimeError(f"jax worker (T={self.nt}) is gone: {self._stderr_tail()}") from None
        return self._recv()

    def load(self, case: Case) -> None:
        key = (case.shape, case.dtype.name, case.seed)
        if key == self.case_key:
            return
        self.case_key = None
        r = self.request("case", list(case.shape), case.dtype.name, case.seed)
        if tuple(r["fingerprint"]) != fingerprint(case):
            raise RuntimeError(f"jax worker generated different data ({r['fingerprint']} vs "
                               f"{fingerprint(case)})")
        self.case_key = key

    def drop(self) -> None:
        if self.case_key is not None and self.proc.poll() is None:
            self.request("drop")
        self.case_key = None

    def close(self) -> Dict[str, Any]:
        """Stop the worker and wait for it (then its CPU time counts as this process's)."""
        try:
            self.info["cpu_s"] = self.request("exit")["cpu_s"]
        except RuntimeError:
            pass
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        return self.info


class JaxPool:
    """The jax workers, one per thread count, started on first use and kept until ``close``."""

    def __init__(self) -> None:
        self.workers: Dict[int, JaxWorker] = {}
        self.failed: Dict[int, str] = {}
        self.closed: Dict[int, Dict[str, Any]] = {}

    def worker(self, nt: int) -> JaxWorker:
        if nt not in self.workers and nt not in self.failed:
            try:
                self.workers[nt] = JaxWorker(nt)
            except Exception as exc:
                self.failed[nt] = f"could not start the jax worker for T={nt}: {exc}"
        if nt in self.failed:
            raise PeerUnavailable(self.failed[nt])
        return self.workers[nt]

    def drop(self, nt: int) -> None:
        """Free the worker's copy of the current case (end of a group)."""
        if nt in self.workers:
            try:
                self.workers[nt].drop()
            except RuntimeError:
                pass

    def close(self) -> Dict[int, Dict[str, Any]]:
        for nt, w in sorted(self.workers.items()):
            self.closed[nt] = w.close()
        self.workers.clear()
        return self.closed


class RemoteRunner(Runner):
    compiled = True

    def __init__(self, worker: JaxWorker, pass_: str) -> None:
        self.w, self.pass_, self.cache_size = worker, pass_, None
        self.changed = False

    def warm_up(self) -> Tuple[Digest, float, float]:
        r = self.w.request("make", self.pass_)
        self.cache_size = r["cache_size"]
        return r["digest"], r["first_call_s"], r["warm_call_s"]

    def calibrate(self, min_time: float) -> int:
        return int(self.w.request("calibrate", self.pass_, min_time))

    def sample(self, number: int) -> Tuple[float, Optional[float]]:
        r = self.w.request("sample", self.pass_, number)
        if r["cache_size"] != self.cache_size:
            self.changed = True
        return r["s_per_call"], r["cpu_per_wall"]

    def mark(self) -> None:
        self.changed = False

    def recompiled(self) -> bool:
        return self.changed


def _jax_fwd(m: Any, case: Case, nt: int) -> Runner:
    w = m.jax_pool.worker(nt)
    w.load(case)
    return RemoteRunner(w, FWD)


def _jax_fwdbwd(m: Any, case: Case, nt: int) -> Runner:
    w = m.jax_pool.worker(nt)
    w.load(case)
    return RemoteRunner(w, FWDBWD)


@dataclass(frozen=True)
class Contender:
    name: str
    pass_: str  # FWD or FWDBWD
    module: str  # attribute of the modules namespace it needs
    make: Callable[[Any, Case, int], Any]  # an Fn, or a Runner
    threaded: bool = True  # False: single-threaded, runs in the T=1 group only
    slow: bool = False  # skipped above --slow-max-mib (in --quick by default)
    compiled: bool = False  # a compiled peer (PEERS): compile time reported, not timed
    half: bool = True  # runs on float16/bfloat16 logits too


CONTENDERS: List[Contender] = [
    Contender("fastce", FWD, "fastce", _fastce_fwd),
    Contender("fastce z-loss", FWD, "fastce", _fastce_fwd_z_loss),
    Contender("fastce softcap+z", FWD, "fastce", _fastce_fwd_softcap_z),
    Contender("torch", FWD, "F", _torch_fwd),
    Contender("torch.compile", FWD, "torch_compile", _tcompile_fwd, compiled=True),
    Contender("jax.jit", FWD, "jax_pool", _jax_fwd, compiled=True),
    Contender("numpy-ref", FWD, "reference", _ref_fwd, threaded=False, slow=True),
    Contender("scipy", FWD, "scipy_special", _scipy_fwd, threaded=False, slow=True,
              half=False),
    Contender("fastce", FWDBWD, "fastce", _fastce_fwdbwd),
    Contender("fastce out=", FWDBWD, "fastce", _fastce_fwdbwd_out),
    Contender("fastce in-place", FWDBWD, "fastce", _fastce_fwdbwd_inplace),
    Contender("torch", FWDBWD, "F", _torch_fwdbwd),
    Contender("torch.compile", FWDBWD, "torch_compile", _tcompile_fwdbwd, compiled=True),
    Contender("jax.jit", FWDBWD, "jax_pool", _jax_fwdbwd, compiled=True),
    Contender("numpy-ref", FWDBWD, "reference", _ref_fwdbwd, threaded=False, slow=True),
]
CONTENDER_NAMES = ["fastce", "fastce z-loss", "fastce softcap+z", "fastce out=", "fastce in-place", "torch",
                   "torch.compile", "jax.jit",
                   "numpy-ref", "scipy"]  # display order
assert set(CONTENDER_NAMES) == {c.name for c in CONTENDERS}
assert set(PEERS) == {c.name for c in CONTENDERS if c.compiled}
BASELINE = "torch"


# --------------------------------------------------------------------------------------
# agreement check (warm-up)
# --------------------------------------------------------------------------------------


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor (bfloat16 has no NumPy dtype: as float32, exactly)
        v = v.detach()
        v = (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
    return np.asarray(v)


def digest(result: Any, n: int = 4096) -> Tuple[float, Optional[np.ndarray]]:
    """(loss, a sample of the gradient: first and last n elements in C order) of one call."""
    loss, grad = result if isinstance(result, tuple) else (result, None)
    loss = float(_to_numpy(loss))
    if grad is None:
        return loss, None
    g = _to_numpy(grad)
    size = g.size
    idx = np.unique(np.concatenate([np.arange(min(n, size)), np.arange(max(size - n, 0), size)]))
    return loss, np.asarray(g.flat[idx], dtype=np.float64)  # .flat: no copy of the whole array


# the agreement check's (loss rtol, gradient atol / its largest value): float32 and float64
# results differ in their last digits only; half-precision peers (torch in bfloat16 or
# float16) round their loss and accumulate in the input's precision: torch's bfloat16 loss
# at (4096, 32000) is 14.9375 where the truth is 14.851 (0.6 %), about 1.5 of bfloat16's
# ulps (2**-8 relative), and its gradient elements to a few ulps of the largest; float16
# gradients of wide rows (1/32000) are subnormal, where an ulp is 2**-24 absolute
AGREE = {"float32": (1e-4, 1e-5, 0.0), "float64": (1e-10, 1e-12, 0.0),
         "float16": (4 * 2.0 ** -11, 4e-3, 2.0 ** -23), "bfloat16": (4 * 2.0 ** -8, 3e-2, 0.0)}


def disagreement(a: Tuple[float, Any], b: Tuple[float, Any], dtype: np.dtype) -> Optional[str]:
    rtol, grad_atol, grad_floor = AGREE[np.dtype(dtype).name]
    if not np.isfinite(a[0]) or not np.isclose(a[0], b[0], rtol=rtol, atol=0):
        return f"loss {a[0]!r} vs {b[0]!r}"
    if a[1] is not None and b[1] is not None:
        scale = float(np.max(np.abs(b[1]))) or 1.0
        atol = scale * grad_atol + grad_floor
        if not np.allclose(a[1], b[1], rtol=100 * rtol, atol=atol):
            return f"gradient sample differs (max abs diff {np.max(np.abs(a[1] - b[1])):.3g})"
    return None


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    contenders: List[Contender]
    repeat: int
    min_time: float
    slow_max_bytes: Optional[int]
    notes: List[str] = field(default_factory=list)  # failures met while running

    def members(self, case_bytes: int, nt: int,
                half: bool = False) -> Tuple[List[Contender], List[str]]:
        """Contenders that run in the (case, nt) group, and the reasons for those that don't."""
        run, why = [], []
        for c in self.contenders:
            if not c.threaded and nt != 1:
                continue  # single-threaded: only in the T=1 group (noted once in main)
            if half and not c.half:
                if nt == 1:
                    why.append(f"{c.name} {c.pass_}: skipped (no half-precision version)")
                continue
            if c.slow and self.slow_max_bytes is not None and case_bytes > self.slow_max_bytes:
                why.append(f"{c.name} {c.pass_}: skipped (logits > --slow-max-mib "
                           f"{self.slow_max_bytes / 2**20:g} MiB)")
                continue
            run.append(c)
        return run, why

    def group_weight(self, case_bytes: int, n_members: int, n_compiled: int = 0) -> float:
        """Rough relative cost of one group, for the progress bar's ETA."""
        return (self.repeat + 2) * n_members * (case_bytes + 2e6) + n_compiled * COMPILE_WEIGHT


def set_threads(m: Any, nt: int) -> None:
    if m.torch is not None:
        m.torch.set_num_threads(nt)


def run_group(m: Any, plan: Plan, case: Case, nt: int, members: List[Contender],
              progress: _util.Progress, pause: float) -> List[Dict[str, Any]]:
    """Warm up, check and time all ``members`` on ``case`` at ``nt`` threads, interleaved."""
    set_threads(m, nt)
    if any(c.module == "torch_compile" for c in members):
        # each group compiles afresh under its own thread count (which Inductor's C++ kernels
        # hard-code), and cache entries never pile up to the recompile limit (module docstring)
        m.torch._dynamo.reset()
    label = f"{case.label} T={nt}"
    checks: Dict[str, Optional[str]] = {}
    numbers: List[int] = []
    firsts: List[Tuple[float, float]] = []  # (first call s, warm call s)
    baseline: Dict[str, Tuple[float, Any]] = {}
    weight_per_step = plan.group_weight(case.nbytes, len(members)) / (plan.repeat + 2)
    weight_per_step /= len(members)
    ok: List[Contender] = []
    runners: List[Runner] = []
    for c in members:
        progress.update(0, label, f"warm-up {c.name} {c.pass_}"
                        + (" (compiling)" if c.compiled else ""))
        try:
            r = c.make(m, case, nt)
            if not isinstance(r, Runner):
                r = LocalRunner(r)
            d, t_first, t_warm = r.warm_up()  # first call: warm-up and agreement check
            # a slow call is its own sample (one warm-up call is enough); fast ones loop, and
            # the calibration loop doubles as further warm-up
            n = 1 if t_warm >= 2 * plan.min_time else r.calibrate(plan.min_time)
        except Exception as exc:  # a failing contender is reported, not fatal
            if isinstance(exc, PeerUnavailable):  # the same for every case: one note
                plan.notes.append(f"{c.name} {c.pass_}: skipped ({exc})")
            else:
                plan.notes.append(f"{case.label} T={nt}: {c.name} {c.pass_} FAILED: "
                                  f"{type(exc).__name__}: {exc}")
            progress.update(2 * weight_per_step + plan.repeat * weight_per_step
                            + (COMPILE_WEIGHT if c.compiled else 0), label)
            continue
        ok.append(c)
        runners.append(r)
        ref = baseline.setdefault(c.pass_, d)
        checks[f"{c.name}|{c.pass_}"] = None if ref is d else disagreement(d, ref, case.dtype)
        del d
        numbers.append(n)
        firsts.append((t_first, t_warm))
        progress.update(2 * weight_per_step + (COMPILE_WEIGHT if c.compiled else 0), label,
                        f"warm-up {c.name} {c.pass_}")
    del baseline
    members = ok
    times: List[List[float]] = [[] for _ in members]
    cpus: List[List[float]] = [[] for _ in members]
    failed: Dict[int, str] = {}
    k = len(members)
    for r in runners:
        r.mark()
    # Two phases: the fast contenders interleaved, then the slow ones (numpy-ref, scipy)
    # interleaved. A slow contender allocates and frees gigabytes of temporaries per call,
    # and on this kind of VM the guest kernel then works on the freed memory for a while
    # (free page reporting), slowing whatever runs next: timed among the fast ones, it made
    # fastce's (4096, 32000) forward 40 -> 57 ms and torch's 280 -> 348 ms.
    for phase in (False, True):
        idx = [i for i in range(k) if members[i].slow == phase]
        n = len(idx)
        reps = min(plan.repeat, SLOW_REPEAT) if phase else plan.repeat
        for rep in range(reps if n else 0):
            for i in idx[rep % n:] + idx[:rep % n]:
                if i in failed:
                    continue
                try:
                    t, cpu = runners[i].sample(numbers[i])
                except Exception as exc:  # e.g. a jax worker that died
                    failed[i] = f"{type(exc).__name__}: {exc}"
                    continue
                times[i].append(t)
                if cpu is not None:
                    cpus[i].append(cpu)
                if pause:
                    time.sleep(pause)  # let the previous contender's worker threads go idle
            progress.update(n * weight_per_step * plan.repeat / reps, label,
                            f"rep {rep + 1}/{reps}" + (" (numpy-ref, scipy)" if phase else ""))
    # The compiled peers' thread count check: process CPU time / wall time over >= 0.1 s. The
    # process CPU clock counts a thread running on another core only up to that core's last
    # scheduler tick (~4 ms), so a short window can read far above T: where the timed samples
    # were shorter, an extra untimed loop measures it.
    thread_checks: Dict[int, Dict[str, Any]] = {}
    for i, c in enumerate(members):
        if not c.compiled or i in failed or not times[i]:
            continue
        walls = [x * numbers[i] for x in times[i]]
        if len(cpus[i]) == len(walls) and float(np.median(walls)) >= CHECK_CPU_WINDOW_S:
            thread_checks[i] = {"cpu_per_wall": float(np.dot(cpus[i], walls) / np.sum(walls)),
                                "wall_s": float(np.sum(walls)), "from": "timed samples"}
            continue
        per_call = float(np.median(times[i]))
        try:
            for _ in range(5):  # one contiguous window; re-sized if calls got faster meanwhile
                number = max(1, int(np.ceil(1.2 * CHECK_CPU_WINDOW_S / per_call)))
                t, cpu = runners[i].sample(number)
                if t * number >= CHECK_CPU_WINDOW_S:
                    break
                per_call = t
        except Exception as exc:
            failed[i] = f"{type(exc).__name__}: {exc}"
            continue
        if cpu is not None:
            thread_checks[i] = {"cpu_per_wall": cpu, "wall_s": t * number,
                                "from": "extra untimed loop"}
    rows = []
    for i, (c, t, n) in enumerate(zip(members, times, numbers)):
        if i in failed:
            plan.notes.append(f"{case.label} T={nt}: {c.name} {c.pass_} FAILED while timed: "
                              f"{failed[i]}")
            continue
        check = checks[f"{c.name}|{c.pass_}"] or "ok"
        threads = 1 if not c.threaded else nt
        walls = [x * n for x in t]
        cpu = (float(np.dot(cpus[i], walls) / np.sum(walls))  # CPU / wall over all samples
               if cpus[i] and len(cpus[i]) == len(walls) else None)
        tcheck = thread_checks.get(i)
        if c.compiled and check == "ok":
            if runners[i].recompiled():
                check = "recompiled while timed"
            elif tcheck and tcheck["cpu_per_wall"] > threads + CHECK_CPU_SLACK:
                check = f"used {tcheck['cpu_per_wall']:.2f} CPUs per wall s at T={threads}"
        rows.append({
            "dtype": case.dtype.name, "shape": list(case.shape), "logits_bytes": case.nbytes,
            "pass": c.pass_, "threads": threads, "group_threads": nt,
            "contender": c.name, "calls_per_sample": n, "times_s": t,
            **_util.summarize_times(t), "check": check,
            "first_call_s": firsts[i][0], "warm_call_s": firsts[i][1],
            "compile_s": firsts[i][0] if c.compiled else None,
            "cpu_per_wall": cpu, "cpu_per_wall_samples": cpus[i], "thread_check": tcheck,
        })
    del runners
    return rows


def add_derived(rows: List[Dict[str, Any]], bandwidth: Dict[int, Dict[str, Any]]) -> None:
    """GB/s, speed-up vs torch and (fastce rows) vs the best compiled peer, both at the same
    dtype/shape/pass/thread group, and % of the read limit."""
    def key(r: Dict[str, Any]) -> Tuple[Any, ...]:
        return (r["dtype"], tuple(r["shape"]), r["pass"], r["group_threads"])

    torch_ms = {key(r): r["median_s"] for r in rows if r["contender"] == BASELINE}
    best_peer: Dict[Tuple[Any, ...], Tuple[float, str]] = {}
    for r in rows:
        if r["contender"] in PEERS and r["check"] == "ok":
            k = key(r)
            if k not in best_peer or r["median_s"] < best_peer[k][0]:
                best_peer[k] = (r["median_s"], r["contender"])
    for r in rows:
        r["gbps"] = r["logits_bytes"] / r["median_s"] / 1e9
        t = torch_ms.get(key(r))
        r["speedup_vs_torch"] = t / r["median_s"] if t else None
        bp = best_peer.get(key(r)) if r["contender"].startswith("fastce") else None
        r["best_peer"] = bp[1] if bp else None
        r["speedup_vs_best_peer"] = bp[0] / r["median_s"] if bp else None
        lim = bandwidth.get(r["threads"], {}).get("gbps")
        r["pct_read_limit"] = 100.0 * r["gbps"] / lim if lim else None


# --------------------------------------------------------------------------------------
# output: table, JSON, plot
# --------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.4f}" if ms < 1 else f"{ms:.2f}" if ms < 1000 else f"{ms:.0f}"


def format_table(rows: List[Dict[str, Any]]) -> str:
    hdr = f"{'pass':<8} {'T':>2}  {'contender':<15} {'ms':>10} {'+-%':>5} {'GB/s':>8} " \
          f"{'x torch':>8} {'x best peer':>11} {'%read':>6} {'compile s':>9}  {'check'}"
    out: List[str] = []
    order = {n: i for i, n in enumerate(CONTENDER_NAMES)}
    cases = list(dict.fromkeys((r["dtype"], tuple(r["shape"])) for r in rows))
    for dt, shape in cases:
        rs = [r for r in rows if r["dtype"] == dt and tuple(r["shape"]) == shape]
        nb = rs[0]["logits_bytes"]
        tiny = "   (per-call overhead; GB/s meaningless)" if nb < TINY_BYTES else ""
        out.append(f"\n{dt} {shape_str(shape)}  logits {_fmt_bytes(nb)}{tiny}")
        out.append(hdr)
        rs.sort(key=lambda r: (r["pass"] != FWD, r["group_threads"], order[r["contender"]]))
        for r in rs:
            sp = f"{r['speedup_vs_torch']:.2f}" if r["speedup_vs_torch"] else "-"
            bp = r.get("speedup_vs_best_peer")
            bp = f"{bp:.2f}" + ("t" if r["best_peer"] == "torch.compile" else "j") if bp else "-"
            pr = f"{r['pct_read_limit']:.0f}" if r["pct_read_limit"] is not None else "-"
            cs = f"{r['compile_s']:.2f}" if r.get("compile_s") is not None else "-"
            gb = f"{r['gbps']:.2f}"
            if nb < TINY_BYTES:
                gb = pr = "-"
            out.append(f"{r['pass']:<8} {r['threads']:>2}  {r['contender']:<15} "
                       f"{_fmt_ms(r['median_s']):>10} {r['spread_pct']:>5.1f} {gb:>8} "
                       f"{sp:>8} {bp:>11} {pr:>6} {cs:>9}  {r['check']}")
    if any(r.get("best_peer") for r in rows):
        out.append("\nx best peer: vs the faster of torch.compile (t) and jax.jit (j); "
                   "compile s: first call (trace + compile + one run), not in ms")
    return "\n".join(out)


def plot(rows: List[Dict[str, Any]], bandwidth: Dict[int, Dict[str, Any]], path: str,
         title: str) -> bool:
    """Draw GB/s by shape into ``path``; False (nothing written) if every case is tiny."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["logits_bytes"] >= TINY_BYTES]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    passes = [p for p in (FWD, FWDBWD) if any(r["pass"] == p for r in rows)]
    if not rows:
        return False
    threads = sorted({r["threads"] for r in rows})
    # one hue per contender (tab20 pairs: blue, brown, grey, cyan, olive, orange, red, pink,
    # green, purple);
    # light = 1 thread, dark = the most threads
    cmap = plt.get_cmap("tab20")
    hue = dict(zip(CONTENDER_NAMES, (0, 5, 7, 9, 8, 1, 3, 6, 2, 4)))

    def color(name: str, nt: int) -> Any:
        dark = threads.index(nt) == len(threads) - 1 and len(threads) > 1
        return cmap(2 * hue.get(name, 7) + (0 if dark else 1))

    n_series = max(len({(r["contender"], r["threads"]) for r in rows if r["pass"] == p})
                   for p in passes)
    fig, axes = plt.subplots(len(dtypes), len(passes), squeeze=False,
                             figsize=((7.5 + 0.25 * max(n_series - 8, 0)) * len(passes),
                                      4.2 * len(dtypes)))
    for i, dt in enumerate(dtypes):
        for j, p in enumerate(passes):
            ax = axes[i][j]
            rs = [r for r in rows if r["dtype"] == dt and r["pass"] == p]
            shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rs))
            series = sorted({(r["contender"], r["threads"]) for r in rs},
                            key=lambda s: (CONTENDER_NAMES.index(s[0]), s[1]))
            width = 0.85 / max(len(series), 1)
            for k, (name, nt) in enumerate(series):
                xs, ys = [], []
                for x, shp in enumerate(shapes):
                    hit = [r for r in rs if tuple(r["shape"]) == shp and r["contender"] == name
                           and r["threads"] == nt]
                    if hit:
                        xs.append(x - 0.425 + (k + 0.5) * width)
                        ys.append(hit[0]["gbps"])
                ax.bar(xs, ys, width, label=f"{name} {nt}T", color=color(name, nt),
                       edgecolor="black", linewidth=0.3)
            for nt, style in zip(threads, ("--", ":", "-.", "-")):
                if nt in bandwidth:
                    bw = bandwidth[nt]["gbps"]
                    ax.axhline(bw, color="black", linestyle=style, linewidth=1,
                               label=f"read limit {nt}T ({bw:.0f} GB/s)")
            labels = [f"{shape_str(s)}\n{_fmt_bytes(np.prod(s) * dtype_of(dt).itemsize)}"
                      for s in shapes]
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_ylabel("GB/s of logits read")
            ax.set_title(f"{p}, {dt}")
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
    legend: Dict[str, Any] = {}  # one legend for all panels (scipy is fwd-only, etc.)
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)

    def legend_key(lab: str) -> Tuple[int, str]:
        name = lab.rsplit(" ", 1)[0]
        return (CONTENDER_NAMES.index(name) + 1 if name in CONTENDER_NAMES else 0, lab)

    labs = sorted(legend, key=legend_key)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.legend([legend[k] for k in labs], labs, fontsize=8, loc="center right")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def _dist_version(name: str) -> Optional[str]:
    """An installed distribution's version, without importing it."""
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def peer_thread_notes(rows: List[Dict[str, Any]],
                      jax_info: Dict[int, Dict[str, Any]]) -> List[str]:
    """How many CPUs the compiled peers kept busy per thread count (the thread-count check)."""
    notes = []
    for name in PEERS:
        by_t: Dict[int, List[float]] = {}
        for r in rows:
            if r["contender"] == name and r.get("thread_check"):
                by_t.setdefault(r["threads"], []).append(r["thread_check"]["cpu_per_wall"])
        if not by_t:
            continue
        parts = [f"T={t}: {min(v):.2f}-{max(v):.2f}" for t, v in sorted(by_t.items())]
        how = ("torch.set_num_threads(T) before compiling; Dynamo reset per group"
               if name == "torch.compile" else
               "a worker process per T, CPU affinity T cores while its backend started")
        notes.append(f"{name} threads ({how}): process CPU time / wall time over >= "
                     f"{CHECK_CPU_WINDOW_S:g} s of calls (range over rows) " + ", ".join(parts))
    for nt, inf in sorted(jax_info.items()):
        notes.append(f"jax.jit worker T={nt}: XLA_FLAGS={inf.get('xla_flags')!r}, affinity "
                     f"{inf.get('affinity_at_backend_start')} at backend start, then "
                     f"{inf.get('affinity_after')}; start-up {inf.get('startup_s', 0):.1f} s")
    return notes


def _int_list(s: str) -> List[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return sorted(set(vals))


def _dtype_list(s: str) -> List[np.dtype]:
    out = []
    for v in s.split(","):
        v = v.strip()
        if v not in DTYPES:
            raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(DTYPES)}, "
                                             f"got {v!r}")
        out.append(dtype_of(v))
    return list(dict.fromkeys(out))


def _shape_list(s: str) -> List[Tuple[int, ...]]:
    shapes = []
    for item in s.split(","):
        try:
            shape = tuple(int(d) for d in item.strip().lower().split("x"))
        except ValueError:
            shape = ()
        if len(shape) < 2 or any(d < 1 for d in shape):
            raise argparse.ArgumentTypeError(
                f"shape must look like NxC (or NxCxd1...), all >= 1; got {item!r}")
        shapes.append(shape)
    return shapes


def _contender_list(s: str) -> List[str]:
    names = [v.strip() for v in s.split(",") if v.strip()]
    bad = [n for n in names if n not in CONTENDER_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown contender(s) {bad}; choose from {CONTENDER_NAMES}")
    return names


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark fastce against torch (eager, torch.compile), jax.jit + optax, "
        "NumPy and SciPy\non CPU: softmax cross-entropy loss (fwd) and loss + gradient (fwd+bwd), "
        "reduction='mean',\nclass-index targets.\n"
        "Reports median ms, GB/s of logits read, speed-up vs torch and vs the best compiled peer\n"
        "at the same thread count, compile times of the compiled peers (not in the medians)\n"
        "and % of this machine's measured memory read bandwidth; prints a table and writes\n"
        "JSON and a PNG plot. The docstring of bench/bench.py explains the method in detail.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="shapes (default): " + ", ".join(shape_str(s) for s in FULL_SHAPES)
        + "\nshapes (--quick):  " + ", ".join(shape_str(s) for s in QUICK_SHAPES)
        + "\ncontenders: " + ", ".join(CONTENDER_NAMES)
        + " (torch/jax+optax/scipy/matplotlib optional)",
    )
    p.add_argument("--quick", action="store_true",
                   help="about two minutes: quick shapes, float32 only, 5 reps, short samples, "
                        "slow contenders (numpy-ref, scipy) skipped above 100 MiB of logits; "
                        "every available contender, compiled peers included")
    p.add_argument("--threads", type=_int_list, metavar="T1,T2",
                   help="thread counts to run at (default: 1 and all usable cores, here "
                        f"1,{_util.usable_cores()})")
    p.add_argument("--dtype", type=_dtype_list, metavar="float32,float64",
                   help="logits dtypes: float32, float64, float16, bfloat16 (ml_dtypes) "
                        "(default: float32,float64; --quick: float32)")
    p.add_argument("--shapes", type=_shape_list, metavar="NxC,...",
                   help="logits shapes, e.g. 4096x32000,2x3 (default: see below)")
    p.add_argument("--contenders", type=_contender_list, metavar="NAME,...",
                   help="only these contenders (default: all available)")
    p.add_argument("--repeat", type=int, metavar="N",
                   help="timed repetitions per case, median reported (default 7; --quick 5; "
                        f"numpy-ref and scipy stop after {SLOW_REPEAT})")
    p.add_argument("--min-time", type=float, metavar="S",
                   help="minimum seconds per timing sample; tiny cases loop to reach it "
                        "(default 0.05; --quick 0.01)")
    p.add_argument("--slow-max-mib", type=float, metavar="MIB",
                   help="skip numpy-ref and scipy for logits larger than this "
                        "(default: no limit; --quick 100)")
    p.add_argument("--bw-mib", type=int, default=1024, metavar="MIB",
                   help="size of the array for the read-bandwidth probe (default 1024; keep it "
                        "well above the last-level cache)")
    p.add_argument("--pause", type=float, default=0.002, metavar="S",
                   help="sleep between contenders inside a repetition so spinning worker "
                        "threads of the previous one go idle (default 0.002)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", metavar="PATH",
                   help="where to write the JSON results ('none' to skip; default "
                        "bench/results/bench[-quick].json)")
    p.add_argument("--plot", metavar="PATH",
                   help="where to write the PNG plot ('none' to skip; default "
                        "bench/results/bench[-quick].png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)

    q = args.quick
    args.threads = args.threads or sorted({1, _util.usable_cores()})
    args.dtype = args.dtype or [np.dtype(np.float32)] + ([] if q else [np.dtype(np.float64)])
    args.shapes = args.shapes or (QUICK_SHAPES if q else FULL_SHAPES)
    args.repeat = args.repeat if args.repeat is not None else (5 if q else 7)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    args.min_time = args.min_time if args.min_time is not None else (0.01 if q else 0.05)
    if args.slow_max_mib is None and q:
        args.slow_max_mib = 100.0
    stem = "bench-quick" if q else "bench"
    args.json = args.json or os.path.join(RESULTS_DIR, stem + ".json")
    args.plot = args.plot or os.path.join(RESULTS_DIR, stem + ".png")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    m = load_modules()
    if m.fastce is None:
        try:
            import fastce  # noqa: F401  (re-raise for the message)
        except Exception as exc:
            print(f"error: cannot import fastce ({exc!r}); install it first "
                  "(pip install -e . in the repository root).", file=sys.stderr)
        return 2

    notes: List[str] = []
    if args.repeat < 5:
        notes.append(f"--repeat {args.repeat} < 5: medians are less robust")
    contenders = []
    for c in CONTENDERS:
        if args.contenders and c.name not in args.contenders:
            continue
        if getattr(m, c.module) is None:
            missing = {"F": "torch", "scipy_special": "scipy", "reference": "fastce.reference",
                       "torch_compile": "torch with torch.compile", "jax_pool": "jax or optax"}
            hint = "; pip install .[bench-peers]" if c.module == "jax_pool" else ""
            notes.append(f"{c.name} {c.pass_}: skipped ({missing.get(c.module, c.module)} "
                         f"not importable{hint})")
            continue
        contenders.append(c)
    if any(not c.threaded for c in contenders):
        if 1 in args.threads:
            notes.append("numpy-ref and scipy are single-threaded: they run in the T=1 group only")
        else:
            notes.append("numpy-ref and scipy are single-threaded and run in the T=1 group only, "
                         "which --threads leaves out")
    if m.torch is None:
        notes.append("torch missing: no 'x torch' column values")
    if not any(c.compiled for c in contenders):
        notes.append("no compiled peer (torch.compile, jax.jit) selected or available: no "
                     "'x best peer' column values")
    if m.jax_pool is not None and any(c.name == "jax.jit" for c in contenders):
        over = [t for t in args.threads if t > _util.usable_cores()]
        if over:
            notes.append(f"jax.jit at T={over}: more than the {_util.usable_cores()} usable cores;"
                         f" its thread pool gets {_util.usable_cores()} threads there")
    if m.matplotlib is None:
        notes.append("matplotlib missing: no plot")

    plan = Plan(contenders, args.repeat, args.min_time,
                None if args.slow_max_mib is None else int(args.slow_max_mib * 2**20))

    info = _util.machine_info(m)
    for name in ("jax", "jaxlib", "optax"):
        info["versions"][name] = _dist_version(name) if m.jax_pool is not None else None
    print(f"fastce {info['versions']['fastce']}  ISA {info.get('fastce_isa')}  |  "
          f"numpy {np.__version__}  torch {info['versions']['torch']}  "
          f"scipy {info['versions']['scipy']}  jax {info['versions']['jax']}  "
          f"optax {info['versions']['optax']}")
    print(f"CPU: {info['cpu_model']}, {info['usable_cores']} usable cores; threads {args.threads}; "
          f"dtypes {[d.name for d in args.dtype]}; {args.repeat} reps, samples >= "
          f"{args.min_time * 1e3:g} ms")

    # progress weights: bandwidth probe + every (case, thread) group
    bw_weight = 3 * len(args.threads) * args.bw_mib * 2**20
    total = bw_weight
    for dt in args.dtype:
        for shape in args.shapes:
            nb = int(np.prod(shape)) * dt.itemsize
            for nt in args.threads:
                mem = plan.members(nb, nt, is_half(dt))[0]
                total += plan.group_weight(nb, len(mem), sum(c.compiled for c in mem))
    progress = _util.Progress(total, enabled=not args.no_progress)

    original_threads = m.torch.get_num_threads() if m.torch is not None else None
    load = _util.OtherLoad()
    if load.load0 is not None and load.load0 > 0.5:
        print(f"warning: 1-minute load average is {load.load0:.2f} before starting: other "
              "processes are busy, expect noisy (especially multi-threaded) numbers",
              file=sys.stderr)
    rows: List[Dict[str, Any]] = []
    bw_runs: List[Dict[int, Dict[str, Any]]] = []
    tc_info: Optional[Dict[str, Any]] = None
    jax_info: Dict[int, Dict[str, Any]] = {}
    try:
        if any(c.module == "torch_compile" for c in plan.contenders):
            progress.update(0, "torch.compile start-up")
            try:
                tc_info = setup_torch_compile(m)
                notes.append(f"torch.compile start-up (Inductor's one-time initialisation, the "
                             f"first compile in the process; in no row): {tc_info['startup_s']:.1f}"
                             " s; fresh Inductor cache directory for this run")
            except Exception as exc:
                notes.append(f"torch.compile: skipped (set-up failed: {type(exc).__name__}: {exc})")
                plan.contenders = [c for c in plan.contenders if c.module != "torch_compile"]
        progress.update(0, "measuring read bandwidth")
        bw_runs.append(_util.measure_read_bandwidth(args.threads, args.bw_mib * 2**20, 5,
                                                    m.torch, progress))
        progress.update(bw_weight / 2, "read bandwidth")
        for dt in args.dtype:
            for shape in args.shapes:
                progress.update(0, f"{dt.name} {shape_str(shape)}", "generating data")
                case = make_case(shape, dt, args.seed)
                for nt in args.threads:
                    members, why = plan.members(case.nbytes, nt, is_half(dt))
                    notes.extend(f"{case.label}: {w}" for w in why)
                    if members:
                        rows.extend(run_group(m, plan, case, nt, members, progress, args.pause))
                    if m.jax_pool is not None:
                        m.jax_pool.drop(nt)  # the worker frees its copy of the case
                del case
        # again at the end: a burst of noise during one probe can't understate the limit
        bw_runs.append(_util.measure_read_bandwidth(args.threads, args.bw_mib * 2**20, 5,
                                                    m.torch, progress))
        progress.update(bw_weight / 2, "read bandwidth (again)")
    except KeyboardInterrupt:
        progress.close()
        print("\ninterrupted: reporting what was measured so far", file=sys.stderr)
    finally:
        progress.close()
        if original_threads is not None:
            m.torch.set_num_threads(original_threads)
        if m.jax_pool is not None:
            jax_info = m.jax_pool.close()  # waited for: their CPU time counts as ours
        cleanup_torch_compile(tc_info)

    noise = load.stop()
    notes.extend(peer_thread_notes(rows, jax_info))
    info["torch_compile"] = tc_info
    info["jax_workers"] = {str(k): v for k, v in jax_info.items()}
    bandwidth = _util.merge_bandwidth(*bw_runs)
    notes.extend(plan.notes)
    if noise["other_cpu_pct"] is not None and noise["other_cpu_pct"] > 5:
        notes.append(f"other processes used {noise['other_cpu_pct']:.0f}% of the CPU time "
                     "during the run: numbers (multi-threaded ones most) are noisy; rerun on "
                     "an idle machine")
    add_derived(rows, bandwidth)
    elapsed = time.perf_counter() - t_start

    print("\nread limit (memory read bandwidth, 1 GB = 1e9 B; best of a probe before and after):")
    for nt, b in bandwidth.items():
        print(f"  {nt} thread(s): {b['gbps']:6.1f} GB/s  (best of: "
              + ", ".join(f"{k} {v:.1f}" for k, v in b["methods_gbps"].items()) + ")")
    print(format_table(rows))
    mismatches = [r for r in rows if r["check"] != "ok"]
    for r in mismatches:
        notes.append(f"MISMATCH {r['dtype']} {shape_str(r['shape'])} {r['pass']} "
                     f"{r['contender']} T={r['threads']}: {r['check']}")
    notes = list(dict.fromkeys(notes))
    if notes:
        print("\nnotes:")
        for n in notes:
            print("  - " + n)
    other = noise["other_cpu_pct"]
    print(f"\ntotal time {elapsed:.1f} s"
          + (f"; CPU used by other processes meanwhile: {other:.1f}% of "
             f"{_util.usable_cores()} cores" if other is not None else ""))

    cmdline = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)
    if args.json.lower() != "none":
        doc = {
            "command": cmdline,
            "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - elapsed)),
            "elapsed_s": elapsed,
            "settings": {"quick": args.quick, "threads": args.threads,
                         "dtypes": [d.name for d in args.dtype],
                         "shapes": [list(s) for s in args.shapes], "repeat": args.repeat,
                         "min_time_s": args.min_time, "slow_max_mib": args.slow_max_mib,
                         "bw_mib": args.bw_mib, "pause_s": args.pause, "seed": args.seed,
                         "contenders": sorted({c.name for c in contenders})},
            "machine": info,
            "read_bandwidth": {str(k): v for k, v in bandwidth.items()},
            "read_bandwidth_probes": [{str(k): v for k, v in r.items()} for r in bw_runs],
            "noise": noise,
            "results": rows,
            "notes": notes,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            import json

            json.dump(_util.jsonable(doc), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot.lower() != "none" and m.matplotlib is not None and rows:
        peers = [p for p in PEERS if any(r["contender"] == p for r in rows)]
        title = (f"fastce {info['versions']['fastce']} ({info.get('fastce_isa')}) vs torch "
                 f"{info['versions']['torch']}"
                 + (" (eager" + ", torch.compile" * ("torch.compile" in peers) + ")"
                    if peers else "")
                 + (f", jax.jit {info['versions']['jax']}" if "jax.jit" in peers else "")
                 + ": cross-entropy, reduction=mean, median of "
                 f"{args.repeat}; {info['cpu_model']}, {info['usable_cores']} cores"
                 f"\n(higher is better; tiny shapes such as 2x3 are per-call overhead: see table)")
        if noise["other_cpu_pct"] is not None and noise["other_cpu_pct"] > 5:
            title += (f"\nNOISY: other processes used {noise['other_cpu_pct']:.0f}% of the CPU "
                      "time during the run")
        if plot(rows, bandwidth, args.plot, title):
            print(f"wrote {args.plot}")
        else:
            print(f"no plot: every case is below {TINY_BYTES // 1024} KiB (per-call overhead only)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
