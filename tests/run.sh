#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (the README's test command):
#   1. a virtualenv in .venv with pkeys installed (editable) and the test tools;
#   2. the native suite: the software backend here, the hardware one on PKU machines;
#   3. the `pku` tier, and the `anybackend` tests again, on an emulated PKU
#      CPU under `python -m pkeys vm`,
#      with PKEYS_REQUIRE_PKU=1 so that it fails rather than skips.
# Where the VM cannot be prepared (no root to install QEMU), step 3 says how
# to get it; under CI=true that is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'

echo "== installed in ${SECONDS}s"
echo "== native suite (backend: $(python -c 'import pkeys; print(pkeys.backend())'))"
python -m pytest
echo "== native suite done at ${SECONDS}s"

echo "== pku tier on an emulated PKU CPU (pkeys vm)"
setup_started=$SECONDS
if ! python -m pkeys vm setup; then
    echo "The pku tier needs QEMU, a static busybox and cpio:" >&2
    echo "  sudo apt-get install qemu-system-x86 busybox-static cpio && python -m pkeys vm setup" >&2
    if [ "${CI:-}" = "true" ]; then exit 1; fi
    echo "pku tier NOT RUN" >&2
    exit 0
fi
echo "== vm setup took $((SECONDS - setup_started))s"
# Plugins autoload slowly under emulation (~10 s); the tier needs none.
# pytest's summary line (with the tier's duration) stays the last line printed.
python -m pkeys vm --timeout 1200 -- \
    env PKEYS_REQUIRE_PKU=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
    python -m pytest -m "pku or anybackend" -p no:cacheprovider
