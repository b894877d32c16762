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


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.skipif(not os.path.isdir(CSRC), reason="source tree not available")
@pytest.mark.parametrize("openmp", [[], ["-fopenmp"]], ids=["serial", "openmp"])
def test_kernel_compiles_without_warnings(isa, tmp_path, openmp):
    if isa != fastce.available_isas()[0]:
        pytest.skip("ISA-independent; compiled once")
    flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fno-math-errno"] + openmp
    table = variants()
    assert "scalar" in table
    for name, extra in table.items():
        for dtype in ("32", "64"):
            subprocess.run(["cc", *flags, *extra, f"-DFCE_DTYPE={dtype}", f"-DFCE_ISA={name}",
                            "-c", os.path.join(CSRC, "fastce_kernel.c"),
                            "-o", str(tmp_path / f"k_{name}_{dtype}.o")],
                           check=True, capture_output=True)
    for dtype in ("32", "64"):
        subprocess.run(["cc", *flags, f"-DFCE_DTYPE={dtype}", "-c",
                        os.path.join(CSRC, "fastce_planner.c"),
                        "-o", str(tmp_path / f"planner_{dtype}.o")], check=True, capture_output=True)
    subprocess.run(["cc", *flags, "-c", os.path.join(CSRC, "fastce_dispatch.c"),
                    "-o", str(tmp_path / "dispatch.o")], check=True, capture_output=True)
