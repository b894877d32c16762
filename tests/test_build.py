"""The C kernel is C11 and -Wall -Wextra clean for every variant, on its own
(no Python headers): compile each (dtype, ISA) object with -Werror."""
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

import fastce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def variants():
    """{isa: flags} for this machine from csrc/variants.txt, the one table of flags."""
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                       platform.machine().lower())
    out = {}
    with open(os.path.join(CSRC, "variants.txt")) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if fields and fields[1] in ("any", arch):
                out[fields[0]] = fields[2:]
    return out


def dtypes():
    """{name: macros} of the dtypes the kernel is compiled for (csrc/variants.txt)."""
    out = {}
    with open(os.path.join(CSRC, "variants.txt")) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if fields and fields[0] == "dtype":
                out[fields[1]] = fields[2:]
    return out


# setup.py's flags (C_FLAGS) plus -Werror; the kernel objects are compiled once, with
# OpenMP, and serve both the warnings check and the baseline-instruction check below
# (fastce_kernel.c has no OpenMP pragma; the files that do are compiled both ways).
WERROR_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Werror", "-fno-math-errno", "-fwrapv"]
HAVE_CC = shutil.which("cc") is not None and os.path.isdir(CSRC)


@pytest.fixture(scope="module")
def kernel_objects(tmp_path_factory):
    """{(isa, dtype): object path}: fastce_kernel.c for every variant and dtype, -Werror."""
    out = tmp_path_factory.mktemp("kernels")
    objs = {(name, dtype): out / f"k_{name}_{dtype}.o" for name in variants() for dtype in dtypes()}
    compile_all([["cc", *WERROR_FLAGS, "-fopenmp", *variants()[name], *dtypes()[dtype],
                  f"-DFCE_ISA={name}", "-c", os.path.join(CSRC, "fastce_kernel.c"), "-o", str(obj)]
                 for (name, dtype), obj in objs.items()])
    return objs


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler or no source tree")
def test_kernel_compiles_without_warnings(isa, tmp_path, kernel_objects):
    if isa != fastce.available_isas()[0]:
        pytest.skip("ISA-independent; compiled once")
    assert "scalar" in variants() and all(o.stat().st_size > 0 for o in kernel_objects.values())
    # the kernel objects were compiled with -fopenmp only: that covers the serial build
    # as long as no file but the planner holds an OpenMP pragma
    with_omp = sorted(f for f in os.listdir(CSRC) if f.endswith((".c", ".h"))
                      and "#pragma omp" in open(os.path.join(CSRC, f)).read())
    assert with_omp == ["fastce_planner.c"], with_omp
    cmds = []
    for tag, openmp in (("serial", []), ("openmp", ["-fopenmp"])):
        for dtype, macros in dtypes().items():
            cmds.append(["cc", *WERROR_FLAGS, *openmp, *macros, "-c",
                         os.path.join(CSRC, "fastce_planner.c"),
                         "-o", str(tmp_path / f"planner_{dtype}_{tag}.o")])
        for once in ("fastce_dispatch.c", "fastce_shards.c"):
            cmds.append(["cc", *WERROR_FLAGS, *openmp, "-c", os.path.join(CSRC, once),
                         "-o", str(tmp_path / once.replace(".c", f"_{tag}.o"))])
    compile_all(cmds)


# The vector tanh's sech^2 (softcap gradients) on every variant this CPU runs, compiled
# WITHOUT -fwrapv (a wheel built with CFLAGS=-g0 loses Python's -fwrapv): GCC 12 once
# miscompiled the scalar variant's 1-lane bit select there (csrc/simd.h, vselect), and
# sech^2 came out 1e53 times wrong past |u| = 0.5625. The sweep's truth is libm's.
TANH_SWEEP = r"""
#include <math.h>
#include <stdio.h>
#include "vmath.h"
__attribute__((noinline)) T tanh_of(T x, double *sech2)
{
    V d = splat(1);
    V t = vtanh(splat(x), &d);
    *sech2 = (double)d[0];
    return t[0];
}
int main(void)
{
    double worst = 0, got;
    for (T x = -30; x < 30; x += (T)0.01) {
        (void)tanh_of(x, &got);
        double e = exp(-2.0 * fabs((double)x)), truth = 4 * e / ((1 + e) * (1 + e));
        double err = truth > 1e-30 ? fabs(got - truth) / truth : fabs(got);
        if (err > worst) worst = err;
    }
    printf("%g\n", worst);
    return worst > 1e-5;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.skipif(not os.path.isdir(CSRC), reason="source tree not available")
def test_vtanh_sech2_without_fwrapv(isa, tmp_path):
    if isa != fastce.available_isas()[0]:
        pytest.skip("ISA-independent; compiled once per variant below")
    src = tmp_path / "sweep.c"
    src.write_text(TANH_SWEEP)
    table = variants()
    runs = [(name, opt) for name in fastce.available_isas() if name in table
            for opt in ("-O2", "-O3")]
    exes = [tmp_path / f"sweep_{name}{opt}" for name, opt in runs]
    compile_all([["cc", "-std=c11", opt, "-fno-math-errno", *table[name], "-DFCE_DTYPE=32",
                  f"-DFCE_ISA={name}", "-I", CSRC, str(src), "-o", str(exe), "-lm"]
                 for (name, opt), exe in zip(runs, exes)])
    for (name, opt), exe in zip(runs, exes):
        r = subprocess.run([str(exe)], capture_output=True, text=True)
        assert r.returncode == 0, f"{name} {opt}: sech^2 relative error {r.stdout.strip()}"


def compile_all(cmds):
    """Run the compiler commands on every core; each must succeed (its stderr shown if not)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), cmds))
    failed = [(" ".join(c), r.stderr) for c, r in zip(cmds, results) if r.returncode != 0]
    assert not failed, "\n".join(f"{c}\n{err}" for c, err in failed)


# The baseline variants must run on any x86-64: no AVX instruction may be in the
# scalar and SSE2 objects (a stray -mavx, or an intrinsic outside its #if, would put
# ymm/zmm registers there). Compiled as setup.py compiles them, then disassembled.
@pytest.mark.skipif(not HAVE_CC or shutil.which("objdump") is None,
                    reason="no C compiler, objdump or source tree")
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only")
def test_baseline_variants_have_no_avx(isa, kernel_objects):
    if isa != fastce.available_isas()[0]:
        pytest.skip("ISA-independent; compiled once")
    objs = kernel_objects
    for name in ("scalar", "sse2"):
        for dtype in dtypes():
            asm = subprocess.run(["objdump", "-d", str(objs[name, dtype])], check=True,
                                 capture_output=True, text=True).stdout
            assert "ret" in asm  # it disassembled
            bad = [line for line in asm.splitlines() if "%ymm" in line or "%zmm" in line
                   or "%k1" in line]
            assert not bad, f"{name} {dtype} uses AVX registers: {bad[:3]}"
    # and the check can fail: the avx2 object does use ymm registers
    assert "%ymm" in subprocess.run(["objdump", "-d", str(objs["avx2", "f32"])], check=True,
                                    capture_output=True, text=True).stdout
