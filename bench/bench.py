#!/usr/bin/env python3
"""Benchmark fastce against PyTorch, NumPy and SciPy on CPU.

What is measured
----------------
Softmax cross-entropy with class-index targets and ``reduction="mean"`` on random logits
(normal, std 2, fixed seed) of shape (N, C), float32 and float64:

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
torch             ``torch.nn.functional.cross_entropy`` on tensors sharing the NumPy memory
                  (``torch.from_numpy``, no copy) with ``torch.set_num_threads(T)``;
                  fwd+bwd = ``loss.backward()`` on a leaf requiring grad, ``.grad = None``
                  before every call (so torch, like plain fastce, allocates a fresh gradient)
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

How to read the table
---------------------
``ms``       median time per call, milliseconds (``+-%``: half the inter-quartile range of the
             repetitions, relative to the median).
``GB/s``     logits bytes / time (1 GB = 1e9 bytes): how fast the logits were consumed.
``x torch``  torch's median / this median, torch at the same pass and thread count
             (> 1: faster than torch). For numpy-ref and scipy: vs torch at 1 thread.
``%read``    GB/s as a % of the read limit at that thread count. A forward pass must read the
             logits at least once, so ~100% is the ceiling for large shapes; fwd+bwd also
             writes a gradient as large as the logits - twice the traffic, three times with
             write-allocate - so its ceiling is about 33-50%. Shapes that fit in cache (e.g.
             65536x10, 2.6 MB) can exceed 100%. The (2, 3) case measures per-call overhead; its
             GB/s and %read are meaningless and shown as "-".
``check``    "ok" when the loss (and a sample of the gradient) agrees with the first contender
             of the same pass; otherwise what differs (and the exit status is 1).

Outputs: the table on stdout, a JSON file (all timings, machine info: CPU, cores, fastce ISA/config,
library versions, threadpoolctl info, command line) and a PNG plot (GB/s per shape, one bar per
contender and thread count, fwd and fwd+bwd panels, read limits as horizontal lines).

torch, scipy and matplotlib are optional: missing ones are skipped with a note.

Examples
--------
    python bench/bench.py --quick                      # ~1 minute on a 2-core machine
    python bench/bench.py                              # full run (several minutes)
    python bench/bench.py --threads 1 --dtype float64 --shapes 4096x32000,1024x128256
    python bench/bench.py --json out.json --plot out.png --repeat 9
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
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

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes)

    @property
    def label(self) -> str:
        return f"{self.dtype.name} {shape_str(self.shape)}"


GEN_CHUNKS = 16  # logits are drawn in this many independent streams, in parallel


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
    logits = np.empty(shape, dtype=dtype)
    flat = logits.reshape(-1)
    bounds = np.linspace(0, flat.size, GEN_CHUNKS + 1).astype(np.int64)

    def fill(i: int) -> None:
        part = flat[bounds[i]:bounds[i + 1]]
        streams[i].standard_normal(out=part, dtype=dtype)
        part *= 2

    with ThreadPoolExecutor(max_workers=_util.usable_cores()) as pool:
        list(pool.map(fill, range(GEN_CHUNKS)))
    tshape = (shape[0],) + tuple(shape[2:])
    target = streams[-1].integers(0, shape[1], size=tshape, dtype=np.int64)
    return Case(tuple(shape), np.dtype(dtype), logits, target)


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


def _torch_fwd(m: Any, case: Case, nt: int) -> Fn:
    x, t, ce = m.torch.from_numpy(case.logits), m.torch.from_numpy(case.target), m.F.cross_entropy
    return lambda: ce(x, t)


def _torch_fwdbwd(m: Any, case: Case, nt: int) -> Fn:
    x = m.torch.from_numpy(case.logits).requires_grad_(True)  # leaf sharing the NumPy memory
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


@dataclass(frozen=True)
class Contender:
    name: str
    pass_: str  # FWD or FWDBWD
    module: str  # attribute of the modules namespace it needs
    make: Callable[[Any, Case, int], Fn]
    threaded: bool = True  # False: single-threaded, runs in the T=1 group only
    slow: bool = False  # skipped above --slow-max-mib (in --quick by default)


CONTENDERS: List[Contender] = [
    Contender("fastce", FWD, "fastce", _fastce_fwd),
    Contender("torch", FWD, "F", _torch_fwd),
    Contender("numpy-ref", FWD, "reference", _ref_fwd, threaded=False, slow=True),
    Contender("scipy", FWD, "scipy_special", _scipy_fwd, threaded=False, slow=True),
    Contender("fastce", FWDBWD, "fastce", _fastce_fwdbwd),
    Contender("fastce out=", FWDBWD, "fastce", _fastce_fwdbwd_out),
    Contender("fastce in-place", FWDBWD, "fastce", _fastce_fwdbwd_inplace),
    Contender("torch", FWDBWD, "F", _torch_fwdbwd),
    Contender("numpy-ref", FWDBWD, "reference", _ref_fwdbwd, threaded=False, slow=True),
]
CONTENDER_NAMES = ["fastce", "fastce out=", "fastce in-place", "torch", "numpy-ref", "scipy"]  # display order
assert set(CONTENDER_NAMES) == {c.name for c in CONTENDERS}
BASELINE = "torch"


# --------------------------------------------------------------------------------------
# agreement check (warm-up)
# --------------------------------------------------------------------------------------


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().numpy()
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


def disagreement(a: Tuple[float, Any], b: Tuple[float, Any], dtype: np.dtype) -> Optional[str]:
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    if not np.isfinite(a[0]) or not np.isclose(a[0], b[0], rtol=rtol, atol=0):
        return f"loss {a[0]!r} vs {b[0]!r}"
    if a[1] is not None and b[1] is not None:
        scale = float(np.max(np.abs(b[1]))) or 1.0
        atol = scale * (1e-5 if dtype == np.float32 else 1e-12)
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

    def members(self, case_bytes: int, nt: int) -> Tuple[List[Contender], List[str]]:
        """Contenders that run in the (case, nt) group, and the reasons for those that don't."""
        run, why = [], []
        for c in self.contenders:
            if not c.threaded and nt != 1:
                continue  # single-threaded: only in the T=1 group (noted once in main)
            if c.slow and self.slow_max_bytes is not None and case_bytes > self.slow_max_bytes:
                why.append(f"{c.name} {c.pass_}: skipped (logits > --slow-max-mib "
                           f"{self.slow_max_bytes / 2**20:g} MiB)")
                continue
            run.append(c)
        return run, why

    def group_weight(self, case_bytes: int, n_members: int) -> float:
        """Rough relative cost of one group, for the progress bar's ETA."""
        return (self.repeat + 2) * n_members * (case_bytes + 2e6)


def set_threads(m: Any, nt: int) -> None:
    if m.torch is not None:
        m.torch.set_num_threads(nt)


def run_group(m: Any, plan: Plan, case: Case, nt: int, members: List[Contender],
              progress: _util.Progress, pause: float) -> List[Dict[str, Any]]:
    """Warm up, check and time all ``members`` on ``case`` at ``nt`` threads, interleaved."""
    set_threads(m, nt)
    label = f"{case.label} T={nt}"
    checks: Dict[str, Optional[str]] = {}
    numbers: List[int] = []
    baseline: Dict[str, Tuple[float, Any]] = {}
    weight_per_step = plan.group_weight(case.nbytes, len(members)) / (plan.repeat + 2)
    weight_per_step /= len(members)
    ok: List[Contender] = []
    fns: List[Fn] = []
    for c in members:
        progress.update(0, label, f"warm-up {c.name} {c.pass_}")
        try:
            fn = c.make(m, case, nt)
            t0 = time.perf_counter()
            d = digest(fn())  # first call: warm-up and agreement check
            t_first = time.perf_counter() - t0
        except Exception as exc:  # a failing contender is reported, not fatal
            plan.notes.append(f"{case.label} T={nt}: {c.name} {c.pass_} FAILED: "
                              f"{type(exc).__name__}: {exc}")
            progress.update(2 * weight_per_step + plan.repeat * weight_per_step, label)
            continue
        ok.append(c)
        fns.append(fn)
        ref = baseline.setdefault(c.pass_, d)
        checks[f"{c.name}|{c.pass_}"] = None if ref is d else disagreement(d, ref, case.dtype)
        del d
        # a slow call is its own sample (one warm-up call is enough); fast ones loop, and the
        # calibration loop doubles as further warm-up
        numbers.append(1 if t_first >= 2 * plan.min_time else _util.calibrate(fn, plan.min_time))
        progress.update(2 * weight_per_step, label, f"warm-up {c.name} {c.pass_}")
    del baseline
    members = ok
    times: List[List[float]] = [[] for _ in members]
    k = len(members)
    # Two phases: the fast contenders interleaved, then the slow ones (numpy-ref, scipy)
    # interleaved. A slow contender allocates and frees gigabytes of temporaries per call,
    # and on this kind of VM the guest kernel then works on the freed memory for a while
    # (free page reporting), slowing whatever runs next: timed among the fast ones, it made
    # fastce's (4096, 32000) forward 40 -> 57 ms and torch's 280 -> 348 ms.
    for phase in (False, True):
        idx = [i for i in range(k) if members[i].slow == phase]
        n = len(idx)
        reps = min(plan.repeat, SLOW_REPEAT) if phase else plan.repeat
        for r in range(reps if n else 0):
            for i in idx[r % n:] + idx[:r % n]:
                times[i].append(_util.time_calls(fns[i], numbers[i]))
                if pause:
                    time.sleep(pause)  # let the previous contender's worker threads go idle
            progress.update(n * weight_per_step * plan.repeat / reps, label,
                            f"rep {r + 1}/{reps}" + (" (numpy-ref, scipy)" if phase else ""))
    rows = []
    for c, t, n in zip(members, times, numbers):
        rows.append({
            "dtype": case.dtype.name, "shape": list(case.shape), "logits_bytes": case.nbytes,
            "pass": c.pass_, "threads": 1 if not c.threaded else nt, "group_threads": nt,
            "contender": c.name, "calls_per_sample": n, "times_s": t,
            **_util.summarize_times(t), "check": checks[f"{c.name}|{c.pass_}"] or "ok",
        })
    del fns
    return rows


def add_derived(rows: List[Dict[str, Any]], bandwidth: Dict[int, Dict[str, Any]]) -> None:
    """GB/s, speed-up vs torch (same dtype/shape/pass/thread group) and % of the read limit."""
    torch_ms = {(r["dtype"], tuple(r["shape"]), r["pass"], r["group_threads"]): r["median_s"]
                for r in rows if r["contender"] == BASELINE}
    for r in rows:
        r["gbps"] = r["logits_bytes"] / r["median_s"] / 1e9
        t = torch_ms.get((r["dtype"], tuple(r["shape"]), r["pass"], r["group_threads"]))
        r["speedup_vs_torch"] = t / r["median_s"] if t else None
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
          f"{'x torch':>8} {'%read':>6}  {'check'}"
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
            pr = f"{r['pct_read_limit']:.0f}" if r["pct_read_limit"] is not None else "-"
            gb = f"{r['gbps']:.2f}"
            if nb < TINY_BYTES:
                gb = pr = "-"
            out.append(f"{r['pass']:<8} {r['threads']:>2}  {r['contender']:<15} "
                       f"{_fmt_ms(r['median_s']):>10} {r['spread_pct']:>5.1f} {gb:>8} "
                       f"{sp:>8} {pr:>6}  {r['check']}")
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
    # one hue per contender (tab20 pairs: blue, cyan, olive, orange, green, purple); light = 1 thread,
    # dark = the most threads
    cmap = plt.get_cmap("tab20")
    hue = dict(zip(CONTENDER_NAMES, (0, 9, 8, 1, 2, 4)))

    def color(name: str, nt: int) -> Any:
        dark = threads.index(nt) == len(threads) - 1 and len(threads) > 1
        return cmap(2 * hue.get(name, 7) + (0 if dark else 1))

    fig, axes = plt.subplots(len(dtypes), len(passes), squeeze=False,
                             figsize=(7.5 * len(passes), 4.2 * len(dtypes)))
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
            labels = [f"{shape_str(s)}\n{_fmt_bytes(np.prod(s) * np.dtype(dt).itemsize)}"
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
        if v not in ("float32", "float64"):
            raise argparse.ArgumentTypeError(f"dtype must be float32 or float64, got {v!r}")
        out.append(np.dtype(v))
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
        description="Benchmark fastce against torch, NumPy and SciPy on CPU: softmax "
        "cross-entropy\nloss (fwd) and loss + gradient (fwd+bwd), reduction='mean', "
        "class-index targets.\n"
        "Reports median ms, GB/s of logits read, speed-up vs torch at the same thread count\n"
        "and % of this machine's measured memory read bandwidth; prints a table and writes\n"
        "JSON and a PNG plot. The docstring of bench/bench.py explains the method in detail.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="shapes (default): " + ", ".join(shape_str(s) for s in FULL_SHAPES)
        + "\nshapes (--quick):  " + ", ".join(shape_str(s) for s in QUICK_SHAPES)
        + "\ncontenders: " + ", ".join(CONTENDER_NAMES)
        + " (torch/scipy/matplotlib optional)",
    )
    p.add_argument("--quick", action="store_true",
                   help="about a minute: quick shapes, float32 only, 5 reps, short samples, "
                        "slow contenders (numpy-ref, scipy) skipped above 100 MiB of logits")
    p.add_argument("--threads", type=_int_list, metavar="T1,T2",
                   help="thread counts to run at (default: 1 and all usable cores, here "
                        f"1,{_util.usable_cores()})")
    p.add_argument("--dtype", type=_dtype_list, metavar="float32,float64",
                   help="logits dtypes (default: float32,float64; --quick: float32)")
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
            missing = {"F": "torch", "scipy_special": "scipy", "reference": "fastce.reference"}
            notes.append(f"{c.name} {c.pass_}: skipped ({missing.get(c.module, c.module)} "
                         "not importable)")
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
    if m.matplotlib is None:
        notes.append("matplotlib missing: no plot")

    plan = Plan(contenders, args.repeat, args.min_time,
                None if args.slow_max_mib is None else int(args.slow_max_mib * 2**20))

    info = _util.machine_info(m)
    print(f"fastce {info['versions']['fastce']}  ISA {info.get('fastce_isa')}  |  "
          f"numpy {np.__version__}  torch {info['versions']['torch']}  "
          f"scipy {info['versions']['scipy']}")
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
                total += plan.group_weight(nb, len(plan.members(nb, nt)[0]))
    progress = _util.Progress(total, enabled=not args.no_progress)

    original_threads = m.torch.get_num_threads() if m.torch is not None else None
    load = _util.OtherLoad()
    if load.load0 is not None and load.load0 > 0.5:
        print(f"warning: 1-minute load average is {load.load0:.2f} before starting: other "
              "processes are busy, expect noisy (especially multi-threaded) numbers",
              file=sys.stderr)
    rows: List[Dict[str, Any]] = []
    bw_runs: List[Dict[int, Dict[str, Any]]] = []
    try:
        progress.update(0, "measuring read bandwidth")
        bw_runs.append(_util.measure_read_bandwidth(args.threads, args.bw_mib * 2**20, 5,
                                                    m.torch, progress))
        progress.update(bw_weight / 2, "read bandwidth")
        for dt in args.dtype:
            for shape in args.shapes:
                progress.update(0, f"{dt.name} {shape_str(shape)}", "generating data")
                case = make_case(shape, dt, args.seed)
                for nt in args.threads:
                    members, why = plan.members(case.nbytes, nt)
                    notes.extend(f"{case.label}: {w}" for w in why)
                    if members:
                        rows.extend(run_group(m, plan, case, nt, members, progress, args.pause))
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

    noise = load.stop()
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
        title = (f"fastce {info['versions']['fastce']} ({info.get('fastce_isa')}) vs torch "
                 f"{info['versions']['torch']}: cross-entropy, reduction=mean, median of "
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
