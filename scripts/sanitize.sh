#!/usr/bin/env bash
# Build the extension with AddressSanitizer and UndefinedBehaviorSanitizer into its own
# virtualenv (.venv-sanitize) and run the engine and native-channel tests once with it.
# Leak checking is off: CPython itself does not free everything at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x .venv-sanitize/bin/python ]; then
    python3 -m venv .venv-sanitize
fi
.venv-sanitize/bin/python -m pip install -q --upgrade pip >/dev/null
.venv-sanitize/bin/python -m pip install -q '.[test]' >/dev/null
echo "sanitize: building pagewire._uffd with -fsanitize=address,undefined"
rm -rf build  # setuptools would otherwise link the plain build's up-to-date objects
PAGEWIRE_SANITIZE=1 .venv-sanitize/bin/python -m pip install -q --no-cache-dir \
    --force-reinstall --no-deps '.'
so=$(.venv-sanitize/bin/python -c \
    'import importlib.util; print(importlib.util.find_spec("pagewire._uffd").origin)')
rm -rf build  # and the next plain build must not link these
grep -q __asan_init "$so" || { echo "sanitize: $so was not built with ASan" >&2; exit 1; }
export LD_PRELOAD
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if [ "${CI:-}" = "true" ]; then
    export PAGEWIRE_STRICT_TESTS=1
fi
exec .venv-sanitize/bin/python -m pytest -q -p no:cacheprovider \
    tests/integration/test_engine_restore.py tests/integration/test_partial_install.py \
    tests/integration/test_native_channel.py tests/integration/test_firecracker_handshake.py \
    tests/integration/test_cache.py tests/integration/test_hugepages.py \
    tests/integration/test_staging.py \
    -k "not working_set and not fetches_each_chunk_once" "$@"
# Left out above: two tests that measure fault counts against a bulk transfer (working-set
# replay, over-fetch); ASan's pace changes who wins that race, not whether memory is safe.
