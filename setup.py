"""Build the one native module, pagewire._uffd (metadata lives in pyproject.toml).

Its C lives in service/pagewire/csrc/, one file per subsystem under one header. Warnings
are errors. PAGEWIRE_SANITIZE=1 builds it with AddressSanitizer and
UndefinedBehaviorSanitizer (scripts/sanitize.sh).
"""

import os
from glob import glob

from setuptools import Extension, setup

# The per-chunk fast digest is XXH3-128 from libxxhash-dev's header, compiled into the
# extension (XXH_INLINE_ALL): a build-time dependency only, nothing to load at run time.
XXHASH_HEADER = "/usr/include/xxhash.h"
if not os.path.exists(XXHASH_HEADER):
    raise SystemExit(f"{XXHASH_HEADER} is missing: apt-get install libxxhash-dev")
# SHA-256 (export identity, cache keys) and the native channel's TLS 1.3 come from
# OpenSSL (libcrypto, libssl), linked at build time.
if not os.path.exists("/usr/include/openssl/sha.h"):
    raise SystemExit("/usr/include/openssl/sha.h is missing: apt-get install libssl-dev")

CSRC = "service/pagewire/csrc"
FLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"]
FLAGS += ["-fvisibility=hidden"]
LINK = ["-lpthread", "-ldl"]
if os.environ.get("PAGEWIRE_SANITIZE") == "1":
    FLAGS += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    LINK += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "pagewire._uffd",
            sources=sorted(glob(f"{CSRC}/*.c")) or ["service/pagewire/_uffd.c"],
            include_dirs=[CSRC],
            depends=sorted(glob(f"{CSRC}/*.h")),
            libraries=["ssl", "crypto"],
            extra_compile_args=FLAGS,
            extra_link_args=LINK,
        )
    ]
)
