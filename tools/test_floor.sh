#!/usr/bin/env bash
# The declared floors are true: fastce builds and passes its torch-free tests on the
# oldest Python it declares (requires-python >=3.10) with the oldest NumPy it declares
# (numpy>=2.0: 2.0.0), built against that same NumPy (the oldest it can be built with).
#
#   bash tools/test_floor.sh [path/to/fastce-X.tar.gz]     (default: builds the sdist)
#
# torch 2.13.0 exists here for Python 3.11 only, so the suite's torch comparisons cannot
# run on 3.10: this step runs the tests that compare with the NumPy twin and the
# float64 definition (FLOOR_TESTS below); the full suite runs on 3.11 in tools/test.sh.
# Python 3.10 comes from $FLOOR_PYTHON, python3.10 on PATH or pyenv.
set -euo pipefail
cd "$(dirname "$0")/.."
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
start=$SECONDS
FLOOR_NUMPY="2.0.0"
FLOOR_TESTS=(tests/test_errors.py tests/test_isa.py)

PY310="${FLOOR_PYTHON:-}"
for cand in python3.10 $(command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.10*/bin/python3.10 2>/dev/null); do
    [ -n "$PY310" ] && break
    if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
        PY310="$cand"   # (a pyenv shim answers to python3.10 without being one)
    fi
done
if [ -z "$PY310" ]; then
    echo "test_floor.sh: no Python 3.10 found (set FLOOR_PYTHON)" >&2
    exit 1
fi
SDIST="${1:-}"
if [ -z "$SDIST" ]; then
    python -m pip wheel -q --no-deps -w "$TMP" build >/dev/null
    python -m build --sdist --outdir "$TMP/sdist" . >/dev/null
    SDIST="$(ls "$TMP"/sdist/fastce-*.tar.gz)"
fi
"$PY310" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check --only-binary numpy \
    "numpy==$FLOOR_NUMPY" "setuptools>=77" wheel "Cython>=3.0" pytest hypothesis
# -O2 (setup.py takes CFLAGS' -O level): this step checks Python and NumPy, not the
# optimiser (tools/test.sh tests the -O3 build in full); -O2 builds ~15 % quicker and is
# the lowest level at which the exp keeps the accuracy test_isa.py checks (setup.py).
export CFLAGS="${CFLAGS:-} -O2 -g0"
# scalar and the widest variant this CPU runs (setup.py's FASTCE_ISAS): the floors are
# Python's and NumPy's, which the kernel objects do not touch (half the build)
export FASTCE_ISAS="${FASTCE_ISAS:-native}"
"$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps "$SDIST"
"$VPY" -c "import sys, numpy, fastce
assert sys.version_info[:2] == (3, 10) and numpy.__version__ == '$FLOOR_NUMPY', (sys.version, numpy.__version__)
print('floor: Python', sys.version.split()[0], 'NumPy', numpy.__version__, 'fastce', fastce.__version__, fastce.get_config()['isa'])"
FASTCE_TEST_INSTALLED=1 "$VPY" -m pytest -q -p no:cacheprovider "${FLOOR_TESTS[@]}"
echo "test_floor.sh: done in $((SECONDS - start)) s"
