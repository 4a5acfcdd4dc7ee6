"""Build the one native module, pagewire._uffd (metadata lives in pyproject.toml)."""

import os

from setuptools import Extension, setup

# The per-chunk fast digest is XXH3-128 from libxxhash-dev's header, compiled into the
# extension (XXH_INLINE_ALL): a build-time dependency only, nothing to load at run time.
XXHASH_HEADER = "/usr/include/xxhash.h"
if not os.path.exists(XXHASH_HEADER):
    raise SystemExit(f"{XXHASH_HEADER} is missing: apt-get install libxxhash-dev")

setup(
    ext_modules=[
        Extension(
            "pagewire._uffd",
            sources=["service/pagewire/_uffd.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            extra_link_args=["-lpthread", "-ldl"],
        )
    ]
)
