"""Build fastce: the C kernel's paths once per (dtype, instruction set), its planner
once per dtype, plus the Cython binding.

csrc/fastce_kernel.c (the paths: rows.h, cols.h, segments.h on simd.h and vmath.h)
is compiled once per (dtype, ISA) listed for this machine in csrc/variants.txt, the
one table of per-ISA flags (float32/float64 x scalar/sse2/avx2/avx512 on x86-64,
scalar/neon on arm64); csrc/fastce_planner.c (checks, partitioning, threads) once
per dtype; csrc/fastce_dispatch.c picks a variant at run time from CPUID/XGETBV
and the CPU's vendor and family. No -march=native, no -ffast-math.
OpenMP is used when the compiler supports it (FASTCE_DISABLE_OPENMP=1 turns it off).
"""
import os
import platform
import shlex
import subprocess
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
HEADERS = [os.path.join(CSRC, h) for h in sorted(os.listdir(os.path.join(HERE, CSRC)))
           if h.endswith(".h")]
# -fwrapv as CPython's own build has it (a wheel build's CFLAGS replace Python's OPT,
# which carries it). The kernel has no signed overflow; GCC 12 did miscompile the
# scalar variant's 1-lane bit select without it (now avoided in csrc/simd.h, vselect;
# tests/test_build.py checks vtanh built without -fwrapv), and the flag keeps that
# class of compiler trouble away.
# The optimisation level is -O3 unless the environment's CFLAGS name one (setuptools
# puts CFLAGS before these flags, where ours would override it): CFLAGS="-O2" builds at
# that level (tools/sanitize.sh and tools/test_floor.sh use -O2, for build time). Below
# -O2 GCC fuses no multiply-adds into FMAs (-ffp-contract=fast acts in a pass of -O2),
# so the AVX2/AVX-512 exp loses the accuracy tests/test_isa.py holds it to (0.88 ulp
# instead of <= 0.75 for float32, measured at -O1): a debugging build only.
OPT_LEVEL = ([f for f in shlex.split(os.environ.get("CFLAGS", "")) if f.startswith("-O")] or ["-O3"])[-1]
C_FLAGS = ["-std=c11", OPT_LEVEL, "-Wall", "-Wextra", "-fno-math-errno", "-fwrapv"]


def read_variants(machine):
    """{isa: flags} for this machine, from csrc/variants.txt (the one table of flags)."""
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    variants = {}
    with open(os.path.join(HERE, CSRC, "variants.txt")) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if fields and fields[1] in ("any", arch):
                variants[fields[0]] = fields[2:]
    return variants


def read_dtypes():
    """{name: [(macro, value)]}: the dtypes the kernel is compiled for (csrc/variants.txt)."""
    dtypes = {}
    with open(os.path.join(HERE, CSRC, "variants.txt")) as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if fields and fields[0] == "dtype":
                dtypes[fields[1]] = [tuple(m[2:].split("=", 1)) for m in fields[2:]]
    return dtypes


VARIANTS = read_variants(platform.machine().lower())
DTYPES = read_dtypes()


# the /proc/cpuinfo flags each variant needs (FASTCE_ISAS=native)
_CPU_FLAGS = {"avx512": {"avx512f", "avx512dq", "avx512bw", "avx512vl"},
              "avx2": {"avx2", "fma", "f16c"}, "sse2": {"sse2"}, "neon": {"asimd"}}


def _widest_native():
    """The widest variant this machine's CPU runs (from /proc/cpuinfo), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return None
    return next((isa for isa in ("avx512", "avx2", "sse2", "neon")
                 if isa in VARIANTS and _CPU_FLAGS[isa] <= flags), None)


def chosen_variants():
    """The variants to build: all of VARIANTS, or those FASTCE_ISAS names (comma-separated;
    scalar always: it is the fallback; "native": scalar and the widest this CPU runs). A
    knob for debugging, sanitizer and floor builds, which then take a fraction of the
    time (16 objects -> 8); a wheel is built with every variant."""
    want = [n.strip() for n in os.environ.get("FASTCE_ISAS", "").split(",") if n.strip()]
    if want == ["native"]:
        widest = _widest_native()
        want = ["scalar"] + ([widest] if widest else [])
        if widest is None:
            return dict(VARIANTS)
    if not want:
        return dict(VARIANTS)
    unknown = sorted(set(want) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"FASTCE_ISAS names {unknown}: not variants of this machine "
                         f"(csrc/variants.txt: {sorted(VARIANTS)})")
    return {isa: flags for isa, flags in VARIANTS.items() if isa in want or isa == "scalar"}


def _compiler_accepts(compiler_cmd, compile_flags, link_flags):
    """True if the C compiler builds and links a small OpenMP program with these flags
    (and the CFLAGS/LDFLAGS of the environment, which may say where libomp lies)."""
    code = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    env_flags = shlex.split(os.environ.get("CFLAGS", "")) + shlex.split(os.environ.get("LDFLAGS", ""))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write(code)
        try:
            r = subprocess.run(compiler_cmd + env_flags + compile_flags + [src, "-o",
                               os.path.join(tmp, "t")] + link_flags, capture_output=True)
        except OSError:
            return False
        return r.returncode == 0


# (compile flags, link flags) to try, in order: GCC and LLVM clang take -fopenmp; Apple's
# clang needs -Xpreprocessor -fopenmp and libomp (Homebrew's: CFLAGS=-I.../include,
# LDFLAGS=-L.../lib)
OPENMP_CANDIDATES = [(["-fopenmp"], ["-fopenmp"])] + (
    [(["-Xpreprocessor", "-fopenmp"], ["-lomp"])] if sys.platform == "darwin" else [])


class BuildExt(build_ext):
    def build_extension(self, ext):
        cc = self.compiler
        openmp, openmp_link = [], []
        if os.environ.get("FASTCE_DISABLE_OPENMP") != "1" and sys.platform != "win32":
            cmd = list(getattr(cc, "compiler_so", ["cc"])[:1])
            for compile_flags, link_flags in OPENMP_CANDIDATES:
                if _compiler_accepts(cmd, compile_flags, link_flags):
                    openmp, openmp_link = compile_flags, link_flags
                    break
        if not openmp:
            why = ("FASTCE_DISABLE_OPENMP=1" if os.environ.get("FASTCE_DISABLE_OPENMP") == "1"
                   else "the C compiler cannot build and link an OpenMP program with "
                   + " or ".join(" ".join(c) for c, _ in OPENMP_CANDIDATES))
            bar = "!" * 78
            print(f"\n{bar}\nfastce: building WITHOUT OpenMP ({why}):\n"
                  "every call will run on one thread. Install an OpenMP-capable compiler\n"
                  f"(GCC, or clang with libomp) and rebuild for multi-threaded kernels.\n{bar}\n",
                  file=sys.stderr)
            import warnings
            warnings.warn(f"fastce built without OpenMP: {why}")
        # the compilations, each (source, output dir, macros, flags): the paths once per
        # (ISA, dtype) with that ISA's flags, the planner once per dtype, the dispatcher and
        # the shard states once
        chosen = chosen_variants()
        jobs = [("fastce_kernel.c", f"kernel_{isa}_{dtype}", macros + [("FCE_ISA", isa)], flags)
                for isa, flags in chosen.items() for dtype, macros in DTYPES.items()]
        jobs += [("fastce_planner.c", f"planner_{dtype}", macros, [])
                 for dtype, macros in DTYPES.items()]
        without = [("FCE_WITHOUT_" + isa.upper(), "1") for isa in VARIANTS if isa not in chosen]
        jobs += [("fastce_dispatch.c", "", without, []), ("fastce_shards.c", "", [], [])]

        def compile_one(job):
            src, out, macros, flags = job
            return cc.compile([os.path.join(CSRC, src)],
                              output_dir=os.path.join(self.build_temp, out), macros=macros,
                              include_dirs=[CSRC], extra_postargs=C_FLAGS + flags + openmp,
                              depends=HEADERS)

        # in parallel, one compiler process per core (each job has its own output dir);
        # the objects in the order above
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            objects = [o for objs in pool.map(compile_one, jobs) for o in objs]
        ext.extra_objects = objects
        ext.extra_link_args = list(ext.extra_link_args or []) + openmp_link
        ext.define_macros = list(ext.define_macros or []) + [
            ("FASTCE_OPENMP_FLAGS", '"%s"' % " ".join(openmp)),
            ("FASTCE_BUILD_FLAGS", '"%s"' % " ".join(C_FLAGS)),
        ]
        super().build_extension(ext)


extensions = [
    Extension(
        "fastce._core",
        sources=["src/fastce/_core.pyx"],  # which includes src/fastce/_args.pxi, _shards.pxi
        include_dirs=[CSRC, numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=HEADERS + ["src/fastce/_args.pxi", "src/fastce/_shards.pxi"] + [os.path.join(CSRC, f) for f in
                           ("fastce_kernel.c", "fastce_planner.c", "fastce_dispatch.c", "fastce_shards.c",
                            "variants.txt")],
    )
]

setup(
    ext_modules=cythonize(extensions, language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False}),
    cmdclass={"build_ext": BuildExt},
)
