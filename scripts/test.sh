#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite. Under CI=true a test that would skip
# for lack of userfaultfd or root fails instead (PAGEWIRE_STRICT_TESTS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${CI:-}" = "true" ]; then
    export PAGEWIRE_STRICT_TESTS=1
fi
.venv/bin/python -m ruff check service tests bench scripts
.venv/bin/python -m mypy
# Without arguments: every test but the slow image check (.ci/run runs that on its own).
if [ $# -eq 0 ]; then
    set -- -m "not slow"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
