"""bench/bench.py, the project's main job, runs end to end on tiny cases: every
contender agrees with the first one ("ok"), and the table, JSON and plot are written."""
import json
import os
import subprocess
import sys

import pytest

import fastce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench.py")


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
         "--json", str(out_json), "--plot", str(out_png), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "x torch" in r.stdout and "read limit" in r.stdout
    results = json.loads(out_json.read_text())["results"]
    names = {row["contender"] for row in results}
    assert {"fastce", "fastce out=", "fastce in-place", "torch", "numpy-ref", "scipy"} <= names
    assert {row["check"] for row in results} == {"ok"}
    assert all(row["median_s"] > 0 for row in results)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert out_png.stat().st_size > 0
