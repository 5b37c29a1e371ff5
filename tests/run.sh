#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (the README's test command):
#   1. a virtualenv in .venv with pkeys installed (editable) with $extras;
#   2. the documentation site, built in strict mode (a broken link or
#      reference fails the run);
#   3. `pkeys vm setup` for Debian's 6.1 and 6.12 kernels (QEMU, kernels and
#      initramfs, cached in ~/.cache/pkeys);
#   4. the simulated-register variant, built once (tools/build-simulated.sh);
#   5. one pytest session: the native suite here (the software backend, or
#      the hardware one on PKU machines) while the pkeys pytest plugin runs
#      the `pku` tier on an emulated PKU CPU with each kernel, and the
#      `anybackend` tests again on 6.12 (pkeys_vm_also_kernels in
#      pyproject.toml), its results merged into this report (--pkeys-vm).  On
#      a PKU machine the plugin runs the `pku` tier natively instead;
#      PKEYS_BACKEND=software makes it delegate as on a machine without PKU.
# Where the VM cannot be prepared (no root to install QEMU), the native
# suite still runs and the script says how to get the rest; under CI=true
# that is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
# The one list of what the suite needs. .github/workflows/ci.yml runs this
# script rather than repeating it (tests/test_workflow.py checks that).
extras=test,bench,docs
# The kernels of the pku tier; the workflow's cache key hashes this file.
kernels=(6.1 6.12)
# What `pkeys vm setup` needs from the host (the workflow installs the same).
host_packages=(qemu-system-x86 busybox-static zstd strace debian-archive-keyring)
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
echo "== installed in ${SECONDS}s"

docs_started=$SECONDS
site=$(mktemp -d)
# Not --quiet: with it mkdocs stops counting warnings, and strict mode passes anything.
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --site-dir "$site"
rm -rf "$site"
echo "== docs built (strict) in $((SECONDS - docs_started))s"

vm_options=()
setup_started=$SECONDS
if python -m pkeys vm setup "${kernels[@]/#/--kernel=}"; then
    echo "== vm setup took $((SECONDS - setup_started))s"
    vm_options=(--pkeys-vm "${kernels[@]/#/--pkeys-vm-kernel=}")
    export PKEYS_REQUIRE_VM=1
else
    echo "The pku tier needs QEMU and a static busybox:" >&2
    echo "  sudo apt-get install ${host_packages[*]} && python -m pkeys vm setup" >&2
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
