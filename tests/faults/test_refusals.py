"""Every handoff refusal after a uffd arrived, for the fault record: the workload (its uffd
set up as Firecracker's, or with pagewire.client's features) gets SIGBUS, never zeros and
never a hang. The full assertions live in tests/integration/test_fail_closed.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from pagewire.tools.localagents import LocalAgent

from tests.fc_workload import DEFECTS
from tests.workloads import FC_WORKLOAD, SIGBUS_EXIT

pytestmark = pytest.mark.usefixtures("require_uffd")
MiB = 1 << 20


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAgent]:
    from pagewire.tools.images import make_image

    tmp = tmp_path_factory.mktemp("refusals")
    (tmp / "roots").mkdir()
    make_image(tmp / "roots" / "image.bin", 4 * MiB, 5)
    a = LocalAgent(tmp, "agent", [tmp / "roots"]).start()
    yield a
    a.stop()


@pytest.mark.parametrize("features", ["firecracker", "client"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_refusal(
    agent: LocalAgent, record: Callable[..., None], defect: str, features: str
) -> None:
    img = agent.export_roots[0] / "image.bin"
    r = agent.request("POST", "/v1/sessions", json={"source": {"path": str(img)}})
    assert r.status_code == 201, r.text
    s = r.json()
    cmd = [sys.executable, str(FC_WORKLOAD), "--socket", s["socket"], "--size"]
    cmd += [str(img.stat().st_size), "--defect", defect, "--features", features]
    started = time.monotonic()
    hung = False
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
        code: int | None = proc.returncode
        out = proc.stdout.decode()
    except subprocess.TimeoutExpired:
        hung, code, out = True, None, ""
    reads = [json.loads(line) for line in out.splitlines() if '"read"' in line]
    image = img.read_bytes()
    # a read that returned at all must be the image's own bytes: not_registered is found
    # once the engine serves, so its first page may be served; anything else is wrong
    wrong = sum(
        defect != "not_registered"
        or bytes.fromhex(r["read"]) != image[r["offset"] : r["offset"] + len(r["read"]) // 2]
        for r in reads
    )
    kind = "client" if features == "client" else "firecracker"
    record(
        f"refused handoff: {defect} [{kind}]",
        wrong,
        hung,
        None,
        time.monotonic() - started,
        "SIGBUS" if code == SIGBUS_EXIT else f"exit {code}",
    )
    agent.request("DELETE", f"/v1/sessions/{s['id']}")
    assert not hung and wrong == 0, out
    assert code == SIGBUS_EXIT or (defect == "not_registered" and code == 2), out
