"""A test-only build of the native module with its test hooks (PAGEWIRE_TEST_HOOKS), e.g.
ChunkCache.corrupt. The shipped pagewire._uffd has none; this copy is compiled from the
same csrc/ files into tests/.build/ and imported as a separate module, `_uffd_hooks`."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "service" / "pagewire" / "csrc"
BUILD = ROOT / "tests" / ".build"
LIBS = ["-lssl", "-lcrypto", "-lpthread", "-ldl"]


def build_hooks_module() -> ModuleType:
    """Compile (once per source state) and import the hooks build."""
    sources = sorted(CSRC.glob("*.c"))
    # the libraries are part of the stamp: a build linked without one must not be reused
    stamp = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(CSRC.iterdir())) + " ".join(LIBS).encode()
    ).hexdigest()
    target = BUILD / f"_uffd_hooks-{stamp[:16]}.so"
    if not target.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        include = sysconfig.get_paths()["include"]
        cmd = ["gcc", "-shared", "-fPIC", "-O1", "-std=gnu11", "-DPAGEWIRE_TEST_HOOKS"]
        cmd += ["-fvisibility=hidden", f"-I{include}", f"-I{CSRC}", "-o", str(target)]
        cmd += [str(s) for s in sources] + LIBS
        subprocess.run(cmd, check=True, capture_output=True)
    loader = importlib.machinery.ExtensionFileLoader("_uffd_hooks", str(target))
    spec = importlib.util.spec_from_file_location("_uffd_hooks", str(target), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
