"""Helpers for bench/bench.py: timing, memory-bandwidth probe, progress bar, machine info.

Nothing in here knows about cross-entropy; bench.py holds the cases and contenders.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np

def have_cxx_compiler() -> bool:
    """True if a C++ compiler is on PATH (torch.compile's Inductor needs one on the CPU)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0]) is not None and os.path.basename(cxx) != "false"
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of ``fn``, averaged over ``number`` back-to-back calls.

    The garbage collector is paused while timing (as ``timeit`` does); results are dropped
    right away, so a function returning a fresh array pays for allocating *and* freeing it.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number
    finally:
        if gc_was_enabled:
            gc.enable()


def calibrate(fn: Callable[[], object], min_time: float) -> int:
    """How many calls make one timing sample last at least ``min_time`` seconds (>= 1).

    Also serves as warm-up: it runs ``fn`` at least once and up to about 2 * min_time.
    """
    number = 1
    while True:
        t = time_calls(fn, number)
        if t * number >= min_time:
            return number
        # aim a little above min_time; grow at most 100x per step so one slow call can't explode it
        want = int(min_time * 1.2 / max(t, 1e-9)) + 1
        number = max(number + 1, min(want, number * 100))


def interleaved_times(fns: Dict[str, Callable[[], object]], repeat: int) -> Dict[str, List[float]]:
    """Seconds of one call of each function, ``repeat`` rounds that call every function in
    turn (after one warm-up call each): noise that drifts hits them all alike."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def summarize_times(times: Iterable[float]) -> Dict[str, float]:
    t = np.asarray(list(times), dtype=np.float64)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {
        "median_s": float(med),
        "min_s": float(t.min()),
        "max_s": float(t.max()),
        "q1_s": float(q1),
        "q3_s": float(q3),
        # half the inter-quartile range, relative to the median: a "+-" for the table
        "spread_pct": float(50.0 * (q3 - q1) / med) if med > 0 else float("nan"),
    }


# --------------------------------------------------------------------------------------
# memory read bandwidth
# --------------------------------------------------------------------------------------


def _chunks(a: np.ndarray, n: int, align: int = 16) -> List[np.ndarray]:
    """Split a 1-D array into n contiguous pieces whose starts are multiples of ``align``."""
    bounds = [(len(a) * i // n) // align * align for i in range(n)] + [len(a)]
    return [a[bounds[i]:bounds[i + 1]] for i in range(n)]


# Simple full-array reads. Each is memory-bound on a modern x86 core (they land within ~15% of
# each other here); we take the best of them so that one slow kernel can't understate the limit.
_NUMPY_READERS: Dict[str, Callable[[np.ndarray], object]] = {
    "numpy.sum(float32)": lambda c: c.sum(),
    "numpy.bitwise_or.reduce(uint64 view)": lambda c: np.bitwise_or.reduce(c.view(np.uint64)),
}


def merge_bandwidth(*runs: Dict[int, Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
    """Combine several ``measure_read_bandwidth`` results: per thread count, the best one."""
    out: Dict[int, Dict[str, Any]] = {}
    for run in runs:
        for nt, r in run.items():
            if nt not in out or r["gbps"] > out[nt]["gbps"]:
                out[nt] = r
    return out


def measure_read_bandwidth(
    thread_counts: Iterable[int],
    nbytes: int,
    reps: int,
    torch_mod: Any = None,
    progress: Optional["Progress"] = None,
) -> Dict[int, Dict[str, Any]]:
    """Measure this machine's memory *read* bandwidth (GB/s, 1e9 bytes/s) per thread count.

    A float32 array of ``nbytes`` (choose it well above the last-level cache) is read by
      * the NumPy reductions in ``_NUMPY_READERS``; with T > 1 threads the array is cut into T
        contiguous chunks reduced concurrently by T Python threads (NumPy releases the GIL inside
        reductions, so they really run in parallel);
      * ``torch.sum`` with ``torch.set_num_threads(T)`` when torch is installed.
    Each method is timed ``reps`` times (interleaved). The limit for T threads is the best single
    timing of the best method: noise from other processes only ever slows a read down, and the
    array is too large to be served from cache, so the fastest pass is the best estimate.
    """
    a = np.ones(nbytes // 4, dtype=np.float32)  # np.ones touches every page
    result: Dict[int, Dict[str, Any]] = {}
    for nt in thread_counts:
        pool = ThreadPoolExecutor(max_workers=nt) if nt > 1 else None
        chunks = _chunks(a, nt)

        def make_numpy(reader: Callable[[np.ndarray], object]) -> Callable[[], object]:
            if pool is None:
                return lambda: reader(a)
            return lambda: list(pool.map(reader, chunks))

        methods: Dict[str, Callable[[], object]] = {
            (name if nt == 1 else f"{name} x {nt} Python threads"): make_numpy(f)
            for name, f in _NUMPY_READERS.items()
        }
        if torch_mod is not None:
            old = torch_mod.get_num_threads()
            torch_mod.set_num_threads(nt)
            ta = torch_mod.from_numpy(a)
            methods[f"torch.sum (set_num_threads({nt}))"] = lambda: ta.sum()
        try:
            for fn in methods.values():  # warm-up
                fn()
            times: Dict[str, List[float]] = {k: [] for k in methods}
            names = list(methods)
            for r in range(reps):
                for k in names[r % len(names):] + names[:r % len(names)]:
                    times[k].append(time_calls(methods[k], 1))
                if progress is not None:
                    progress.update(0, "read bandwidth", f"{nt} thread(s), rep {r + 1}/{reps}")
        finally:
            if torch_mod is not None:
                torch_mod.set_num_threads(old)
            if pool is not None:
                pool.shutdown()
        gbps = {k: a.nbytes / min(v) / 1e9 for k, v in times.items()}
        best = max(gbps, key=gbps.get)
        result[nt] = {"gbps": gbps[best], "best_method": best, "methods_gbps": gbps,
                      "array_bytes": int(a.nbytes), "reps": reps}
    return result


# --------------------------------------------------------------------------------------
# progress bar
# --------------------------------------------------------------------------------------


class Progress:
    """Weighted progress bar on stderr: tqdm when installed, else a plain one-line bar.

    ``update(weight, label, detail)`` adds ``weight`` units of the declared ``total``.
    Silent when disabled; when stderr is not a terminal it prints one line per new label instead.
    """

    def __init__(self, total: float, enabled: bool = True) -> None:
        self.total = max(float(total), 1e-9)
        self.done = 0.0
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_label = None
        self._tqdm = None
        if enabled and self.tty:
            try:
                from tqdm import tqdm  # type: ignore

                self._tqdm = tqdm(total=100.0, unit="%", file=sys.stderr, leave=False,
                                  bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
            except ImportError:
                pass

    def update(self, weight: float, label: str = "", detail: str = "") -> None:
        """Add ``weight`` done units; show ``label`` (the current step) and ``detail``."""
        if not self.enabled:
            return
        self.done = min(self.done + weight, self.total)
        frac = self.done / self.total
        text = f"{label} {detail}".strip()
        if self._tqdm is not None:
            self._tqdm.n = 100.0 * frac
            self._tqdm.set_postfix_str(text, refresh=False)
            self._tqdm.refresh()
            return
        elapsed = time.perf_counter() - self.t0
        if not self.tty:  # a log line per new step, not per update
            if label != self._last_label:
                print(f"[{elapsed:6.1f}s] {label}", file=sys.stderr, flush=True)
                self._last_label = label
            return
        eta = elapsed / frac - elapsed if frac > 0.02 else float("nan")
        width = 30
        filled = int(width * frac)
        bar = "#" * filled + "." * (width - filled)
        eta_s = f"eta {eta:4.0f}s" if eta == eta else "eta    ?"
        line = f"\r[{bar}] {100 * frac:5.1f}% {elapsed:5.0f}s {eta_s}  {text}"
        sys.stderr.write(line[:160].ljust(100))
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.tty:
            sys.stderr.write("\r" + " " * 160 + "\r")
            sys.stderr.flush()


# --------------------------------------------------------------------------------------
# noise from other processes
# --------------------------------------------------------------------------------------


def _busy_cpu_seconds() -> Optional[float]:
    """CPU-seconds all CPUs spent busy since boot (from /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    busy = sum(v[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How busy *other* processes kept the CPUs while we ran (a noise indicator).

    ``stop()`` returns the 1-minute load average at start and the CPU time used by other
    processes (all-CPU busy time from /proc/stat minus this process's own CPU time, including
    its children that have been waited for - compilers, benchmark worker processes) as a % of
    ``wall time x usable cores``. Anything above a few % makes multi-threaded results shaky:
    a kernel using every core waits for its slowest thread.
    """

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = _busy_cpu_seconds()
        self.own0 = self._own()
        self.load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self) -> Dict[str, Any]:
        wall = time.perf_counter() - self.t0
        own = self._own() - self.own0
        busy1 = _busy_cpu_seconds()
        out: Dict[str, Any] = {"loadavg_1min_at_start": self.load0, "wall_s": wall,
                               "own_cpu_s": own, "other_cpu_pct": None}
        if self.busy0 is not None and busy1 is not None and wall > 0:
            other = max(busy1 - self.busy0 - own, 0.0)
            out["other_cpu_pct"] = 100.0 * other / (wall * usable_cores())
        return out


# --------------------------------------------------------------------------------------
# machine / environment description
# --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def jsonable(obj: Any) -> Any:
    """Round-trip through json with str() for anything exotic (NumPy scalars, paths, ...)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def machine_info(mods: Any) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {"numpy": np.__version__},
    }
    for name in ("fastce", "torch", "scipy", "matplotlib", "threadpoolctl"):
        mod = getattr(mods, name, None)
        info["versions"][name] = getattr(mod, "__version__", None) if mod is not None else None
    if mods.fastce is not None:
        for key, getter in (("fastce_config", "get_config"), ("fastce_isa", "get_isa"),
                            ("fastce_available_isas", "available_isas")):
            try:
                info[key] = getattr(mods.fastce, getter)()
            except Exception as exc:  # keep the benchmark going; record why
                info[key] = f"unavailable: {exc!r}"
    if mods.threadpoolctl is not None:
        try:
            info["threadpoolctl"] = mods.threadpoolctl.threadpool_info()
        except Exception as exc:
            info["threadpoolctl"] = f"unavailable: {exc!r}"
    if mods.torch is not None:
        try:
            info["torch_parallel_info"] = mods.torch.__config__.parallel_info()
        except Exception:
            pass
    return jsonable(info)
