"""The C kernel is C11 and -Wall -Wextra clean for every variant, on its own
(no Python headers): compile each (dtype, ISA) object with -Werror."""
import os
import platform
import shutil
import subprocess

import pytest

import fastce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
AVX2 = ["-mavx2", "-mfma", "-ffp-contract=fast"]
VARIANTS = {"scalar": ["-DFCE_ISA_IS_SCALAR=1"]}
if platform.machine().lower() in ("x86_64", "amd64"):
    VARIANTS.update(sse2=[], avx2=AVX2,
                    avx512=["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"] + AVX2)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.skipif(not os.path.isdir(CSRC), reason="source tree not available")
@pytest.mark.parametrize("openmp", [[], ["-fopenmp"]], ids=["serial", "openmp"])
def test_kernel_compiles_without_warnings(isa, tmp_path, openmp):
    if isa != fastce.available_isas()[0]:
        pytest.skip("ISA-independent; compiled once")
    flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fno-math-errno"] + openmp
    for name, extra in VARIANTS.items():
        for dtype in ("32", "64"):
            subprocess.run(["cc", *flags, *extra, f"-DFCE_DTYPE={dtype}", f"-DFCE_ISA={name}",
                            "-c", os.path.join(CSRC, "fastce_kernel.c"),
                            "-o", str(tmp_path / f"k_{name}_{dtype}.o")],
                           check=True, capture_output=True)
    subprocess.run(["cc", *flags, "-c", os.path.join(CSRC, "fastce_dispatch.c"),
                    "-o", str(tmp_path / "dispatch.o")], check=True, capture_output=True)
