"""bench/bench.py, the project's main job, runs end to end on tiny cases: every
contender agrees with the first one ("ok"), and the table, JSON and plot are written.

The compiled peers (torch.compile, jax.jit) compile once per (dtype, shape, T, pass), a second
or two each, so the first test leaves them out and the second runs them on two small shapes."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import fastce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench.py")
EAGER = ["fastce", "fastce z-loss", "fastce softcap+z", "fastce out=", "fastce in-place", "torch", "numpy-ref", "scipy"]


def bench_have_cxx():
    """bench/_util.py's own test for a C++ compiler (which torch.compile needs)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import _util
    finally:
        sys.path.pop(0)
    return _util.have_cxx_compiler()


@pytest.mark.skipif(not os.path.isfile(BENCH), reason="source tree not available")
def test_bench_runs_and_every_contender_agrees(isa, tmp_path):
    if isa != fastce.available_isas()[-1]:
        pytest.skip("runs the default (best) variant in a subprocess; once is enough")
    pytest.importorskip("torch")
    pytest.importorskip("scipy")
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    r = subprocess.run(
        [sys.executable, BENCH, "--shapes", "2x3,512x40,3x5x4", "--threads", "1,2", "--repeat", "2",
         "--min-time", "0.001", "--bw-mib", "8", "--dtype", "float32,float64",
         "--contenders", ",".join(EAGER),
         "--json", str(out_json), "--plot", str(out_png), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "x torch" in r.stdout and "read limit" in r.stdout
    results = json.loads(out_json.read_text())["results"]
    names = {row["contender"] for row in results}
    assert set(EAGER) <= names
    assert {row["check"] for row in results} == {"ok"}
    assert all(row["median_s"] > 0 for row in results)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert out_png.stat().st_size > 0


@pytest.mark.skipif(not os.path.isfile(BENCH), reason="source tree not available")
def test_bench_half_precision_rows(isa, tmp_path):
    """--dtype float16,bfloat16: every eager contender with a half-precision version runs
    on half logits (torch in the same dtype) and agrees within the half tolerances; scipy,
    which has none, is skipped with a note."""
    if isa != fastce.available_isas()[-1]:
        pytest.skip("runs the default (best) variant in a subprocess; once is enough")
    pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    out_json = tmp_path / "h.json"
    r = subprocess.run(
        [sys.executable, BENCH, "--shapes", "4x3,64x300", "--threads", "1", "--repeat", "2",
         "--min-time", "0.001", "--bw-mib", "8", "--dtype", "float16,bfloat16",
         "--contenders", ",".join(EAGER), "--json", str(out_json), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(out_json.read_text())
    results = out["results"]
    assert {row["dtype"] for row in results} == {"float16", "bfloat16"}
    assert {row["contender"] for row in results} == set(EAGER) - {"scipy"}
    assert {row["check"] for row in results} == {"ok"}
    assert any("scipy fwd: skipped (no half-precision version)" in n for n in out["notes"])


@pytest.mark.skipif(not os.path.isfile(BENCH), reason="source tree not available")
def test_bench_compiled_peers(isa, tmp_path):
    """torch.compile and jax.jit (each when installed) at T=1 and T=2, both dtypes, a 2-D and a
    3-D shape: they agree with fastce, their compile time is reported apart from the medians,
    they keep to the thread count, and fastce rows get an "x best peer" figure."""
    if isa != fastce.available_isas()[-1]:
        pytest.skip("runs the default (best) variant in a subprocess; once is enough")
    torch = pytest.importorskip("torch")
    # torch.compile needs a C++ compiler on the CPU (Inductor); the wheel's test run has none
    peers = ["torch.compile"] if hasattr(torch, "compile") and bench_have_cxx() else []
    if all(importlib.util.find_spec(n) is not None for n in ("jax", "optax")):
        peers.append("jax.jit")  # not imported here: the bench runs it in worker processes
    if not peers:
        pytest.skip("neither torch.compile nor jax + optax available")
    out_json = tmp_path / "p.json"
    r = subprocess.run(
        [sys.executable, BENCH, "--shapes", "3x5x4,512x40", "--threads", "1,2", "--repeat", "2",
         "--min-time", "0.001", "--bw-mib", "8", "--dtype", "float32,float64",
         "--contenders", ",".join(["fastce", "torch"] + peers),
         "--json", str(out_json), "--plot", str(tmp_path / "p.png"), "--no-progress"],
        capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "x best peer" in r.stdout and "compile s" in r.stdout
    doc = json.loads(out_json.read_text())
    results = doc["results"]
    assert {row["check"] for row in results} == {"ok"}, [
        (row["contender"], row["check"]) for row in results if row["check"] != "ok"]
    for name in peers:
        rows = [row for row in results if row["contender"] == name]
        # every (dtype, shape, T, pass) ran: no later shape or thread count dropped out
        assert len(rows) == 2 * 2 * 2 * 2, (name, len(rows))
        for row in rows:
            assert row["compile_s"] > 0 and row["compile_s"] == row["first_call_s"]
            assert row["median_s"] > 0
            # CPU time / wall time over >= 0.1 s of calls: at most T busy threads
            check = row["thread_check"]
            assert check["wall_s"] >= 0.1 and check["cpu_per_wall"] <= row["threads"] + 0.3, row
    fastce_rows = [row for row in results if row["contender"] == "fastce"]
    assert all(row["speedup_vs_best_peer"] > 0 and row["best_peer"] in peers
               for row in fastce_rows)
    if "jax.jit" in peers:
        # the T=1 worker started its backend (and sized XLA's thread pool) on one core
        assert len(doc["machine"]["jax_workers"]["1"]["affinity_at_backend_start"]) == 1
    if "torch.compile" in peers:
        assert doc["machine"]["torch_compile"]["startup_s"] > 0
