#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (Python 3.11, gcc) for pagewire: system packages when
# root, then a virtualenv in .venv with pagewire and its test tools installed.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "setup: $*" >&2; }

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=()
    python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
    command -v ip >/dev/null || need+=(iproute2)
    command -v tc >/dev/null || need+=(iproute2)
    command -v openssl >/dev/null || need+=(openssl)
    command -v curl >/dev/null || need+=(curl)     # the docs' commands (tests/docs)
    command -v jq >/dev/null || need+=(jq)
    command -v gcc >/dev/null || need+=(gcc)
    [ -e /usr/include/linux/userfaultfd.h ] || need+=(linux-libc-dev)
    [ -e /usr/include/xxhash.h ] || need+=(libxxhash-dev)
    [ -e /usr/include/openssl/sha.h ] || need+=(libssl-dev)
    python3 -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || need+=(python3-dev)
    command -v prometheus >/dev/null || need+=(prometheus)
    command -v nft >/dev/null || need+=(nftables)
    command -v promtool >/dev/null || need+=(prometheus)
    if [ ${#need[@]} -gt 0 ]; then
        say "installing Debian packages: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
fi

if [ ! -x .venv/bin/python ]; then
    say "creating the virtualenv .venv"
    python3 -m venv .venv
fi
say "upgrading pip in .venv"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
say "installing pagewire (building its C extension) and the test tools into .venv (about a minute)"
.venv/bin/python -m pip install -q '.[test]' -r tests/deploy/requirements.txt
say "done: .venv/bin/pagewire ($(.venv/bin/pagewire --version))"
