#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (the README's test command):
#   1. a virtualenv in .venv with pkeys installed (editable) and the test tools;
#   2. `pkeys vm setup` for Debian's 6.1 and 6.12 kernels (QEMU, kernels and
#      initramfs, cached in ~/.cache/pkeys);
#   3. the simulated-register variant, built once (tools/build-simulated.sh);
#   4. one pytest session: the native suite here (the software backend, or
#      the hardware one on PKU machines) while the pkeys pytest plugin runs
#      the `pku` tier, and the `anybackend` tests again, on an emulated PKU
#      CPU with each kernel (--pkeys-vm), its results merged into this report.
# Where the VM cannot be prepared (no root to install QEMU), the native
# suite still runs and the script says how to get the rest; under CI=true
# that is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
kernels=(6.1 6.12)
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
echo "== installed in ${SECONDS}s"

vm_options=()
setup_started=$SECONDS
if python -m pkeys vm setup "${kernels[@]/#/--kernel=}"; then
    echo "== vm setup took $((SECONDS - setup_started))s"
    vm_options=(--pkeys-vm "${kernels[@]/#/--pkeys-vm-kernel=}")
    export PKEYS_REQUIRE_VM=1
else
    echo "The pku tier needs QEMU and a static busybox:" >&2
    echo "  sudo apt-get install qemu-system-x86 busybox-static && python -m pkeys vm setup" >&2
    if [ "${CI:-}" = "true" ]; then exit 1; fi
    echo "pku tier NOT RUN" >&2
fi

# The simulated-register variant (RDPKRU/WRPKRU on a thread-local variable),
# built once into build/simulated-pku: tests/test_simulated.py runs its API
# and a quick `pkeys bench` against it (a smoke run, no timing asserted).
built_at=$SECONDS
echo "== simulated-register build: $(bash tools/build-simulated.sh) ($((SECONDS - built_at))s)"

echo "== tests (backend here: $(python -c 'import pkeys; print(pkeys.backend())'))"
# pytest's summary line (with the duration) stays the last line printed.
python -m pytest "${vm_options[@]}"
