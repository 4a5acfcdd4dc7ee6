"""Build the one native module, pagewire._uffd (metadata lives in pyproject.toml)."""

from setuptools import Extension, setup

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
