"""Build fastce: the C kernel once per (dtype, instruction set), plus the Cython binding.

csrc/fastce_kernel.c is the single kernel body. It is compiled eight times on
x86-64 (float32/float64 x scalar/sse2/avx2/avx512; scalar/neon on arm64), each
object with its own -D macros and its own target flags; csrc/fastce_dispatch.c
picks one at run time from CPUID/XGETBV. No -march=native, no -ffast-math.
OpenMP is used when the compiler supports it (FASTCE_DISABLE_OPENMP=1 turns it off).
"""
import os
import platform
import subprocess
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
HEADERS = [os.path.join(CSRC, h) for h in ("fastce.h", "fastce_internal.h")]
C_FLAGS = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fno-math-errno"]
# FMA contraction only where the instruction set has FMA.
_AVX2 = ["-mavx2", "-mfma", "-ffp-contract=fast"]
_AVX512 = ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"] + _AVX2

_machine = platform.machine().lower()
if _machine in ("x86_64", "amd64"):
    VARIANTS = {"scalar": [], "sse2": [], "avx2": _AVX2, "avx512": _AVX512}
elif _machine in ("aarch64", "arm64"):
    VARIANTS = {"scalar": [], "neon": ["-ffp-contract=fast"]}
else:
    VARIANTS = {"scalar": []}


def _compiler_accepts(compiler_cmd, flag):
    """True if the C compiler builds and links a small OpenMP program with `flag`."""
    code = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write(code)
        try:
            r = subprocess.run(compiler_cmd + [flag, src, "-o", os.path.join(tmp, "t")],
                               capture_output=True)
        except OSError:
            return False
        return r.returncode == 0


class BuildExt(build_ext):
    def build_extension(self, ext):
        cc = self.compiler
        openmp = []
        if os.environ.get("FASTCE_DISABLE_OPENMP") != "1" and sys.platform != "win32":
            cmd = list(getattr(cc, "compiler_so", ["cc"])[:1])
            if _compiler_accepts(cmd, "-fopenmp"):
                openmp = ["-fopenmp"]
        objects = []
        for isa, flags in VARIANTS.items():
            for dtype in (32, 64):
                macros = [("FCE_DTYPE", str(dtype)), ("FCE_ISA", isa)]
                if isa == "scalar":
                    macros.append(("FCE_ISA_IS_SCALAR", "1"))
                objects += cc.compile(
                    [os.path.join(CSRC, "fastce_kernel.c")],
                    output_dir=os.path.join(self.build_temp, f"kernel_{isa}_f{dtype}"),
                    macros=macros, include_dirs=[CSRC],
                    extra_postargs=C_FLAGS + flags + openmp, depends=HEADERS)
        objects += cc.compile(
            [os.path.join(CSRC, "fastce_dispatch.c")], output_dir=self.build_temp,
            include_dirs=[CSRC], extra_postargs=C_FLAGS + openmp, depends=HEADERS)
        ext.extra_objects = objects
        ext.extra_link_args = list(ext.extra_link_args or []) + openmp
        ext.define_macros = list(ext.define_macros or []) + [
            ("FASTCE_OPENMP_FLAGS", '"%s"' % " ".join(openmp)),
            ("FASTCE_BUILD_FLAGS", '"%s"' % " ".join(C_FLAGS)),
        ]
        super().build_extension(ext)


extensions = [
    Extension(
        "fastce._core",
        sources=["src/fastce/_core.pyx"],
        include_dirs=[CSRC, numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=HEADERS + [os.path.join(CSRC, "fastce_kernel.c")],
    )
]

setup(
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False}),
    cmdclass={"build_ext": BuildExt},
)
