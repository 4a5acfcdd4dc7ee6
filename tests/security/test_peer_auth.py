"""Who may read an export over gRPC (issue 14, items 16 and 17): with a token, loopback
peers must send it too (an unprivileged local user cannot read a root-only export); under
mTLS only certificates whose SAN is allowed may read or upload; working-set uploads are
bounded; one audit line per peer call says who read what."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc
from pagewire.tools.localagents import LocalAgent

from tests.conftest import need
from tests.pki import agent_pki, make_cert
from tests.security.peer_attacks import MiB, Watch, restore

pytestmark = pytest.mark.usefixtures("require_uffd")
TOKEN = "peer-token-0123456789"

# run as uid 65534: Describe, one urgent chunk, OpenChannel; prints each call's status
NOBODY_CLIENT = """
import json, sys, grpc
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb, pagewire_pb2_grpc as pb_grpc
stub = pb_grpc.PageServiceStub(grpc.insecure_channel(sys.argv[1]))
def status(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name
def urgent():
    it = stub.Urgent(iter([pb.ChunkRequest(export="img", request_id=1, chunks=[0])]))
    assert len(next(it).chunks[0].data) > 0
print(json.dumps({
    "uid": __import__("os").getuid(),
    "describe": status(lambda: stub.Describe(pb.DescribeRequest(export="img"), timeout=10)),
    "urgent": status(urgent),
    "channel": status(lambda: stub.OpenChannel(pb.OpenChannelRequest(export="img"))),
}))
"""


def as_nobody(address: str) -> dict[str, object]:
    cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    out = subprocess.run(
        [*cmd, sys.executable, "-c", NOBODY_CLIENT, address],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _agent(tmp: Path, name: str, roots: list[Path], extra: list[str]) -> LocalAgent:
    return LocalAgent(tmp, name, roots, extra=extra).start()


def _publish(agent: LocalAgent, image: Path, headers: dict[str, str] | None = None) -> None:
    r = agent.request(
        "POST", "/v1/exports", json={"name": "img", "path": str(image)}, headers=headers
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("anonymous_loopback", [False, True], ids=["token", "anonymous-allowed"])
def test_loopback_peers_need_the_token(tmp_path: Path, image, anonymous_loopback: bool) -> None:
    """Item 16: uid 65534 on the same host reads a 0600 root export over plain loopback
    gRPC only when the operator allows anonymous loopback reads."""
    need(os.geteuid() == 0, "needs root to run a client as another user")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    img = image(8 * MiB)
    img.chmod(0o600)
    extra = ["--token-file", str(token_file)]
    if anonymous_loopback:
        extra.append("--peer-anonymous-loopback")
    source = _agent(tmp_path, "source", [img.parent], extra)
    dest = _agent(tmp_path, "destination", [], ["--token-file", str(token_file)])
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        _publish(source, img, headers)
        with Watch(source) as watch:
            seen = as_nobody(source.grpc)
            assert seen["uid"] == 65534
            expected = "OK" if anonymous_loopback else "UNAUTHENTICATED"
            assert seen["describe"] == seen["urgent"] == seen["channel"] == expected, seen
            # an agent that has the token reads as before
            got, status = restore(source, dest, img, headers=headers)
            assert got["verified"] and status["state"] == "completed", status
        watch.assert_healthy()
        log = source.log_path.read_text()
        assert "rpc=Describe" in log and "peer=ip:127.0.0.1" in log
        if not anonymous_loopback:
            assert "status=UNAUTHENTICATED" in log
    finally:
        dest.stop()
        source.stop()


# --- mTLS: authorization --------------------------------------------------------------


def _pki(d: Path) -> Path:
    pki = agent_pki(d, {"source": ["127.0.0.1"]})
    ext = "extendedKeyUsage=serverAuth,clientAuth"
    make_cert(pki, "dest", "ca", f"subjectAltName=DNS:dest.pagewire.test,IP:127.0.0.1\n{ext}")
    make_cert(pki, "intruder", "ca", "subjectAltName=DNS:intruder.example\n" + ext)
    return pki


def _tls_flags(pki: Path, name: str) -> list[str]:
    return [
        "--tls-cert",
        str(pki / f"{name}.crt"),
        "--tls-key",
        str(pki / f"{name}.key"),
        "--tls-ca",
        str(pki / "ca.crt"),
    ]


def _tls_stub(pki: Path, name: str, address: str) -> tuple[grpc.Channel, pb_grpc.PageServiceStub]:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / f"{name}.key").read_bytes(),
        certificate_chain=(pki / f"{name}.crt").read_bytes(),
    )
    channel = grpc.secure_channel(address, creds)
    return channel, pb_grpc.PageServiceStub(channel)


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_mtls_peers_outside_the_allowlist_are_refused(tmp_path: Path, image) -> None:
    """Item 17: a certificate of the same CA with an unrelated SAN can neither read nor
    rewrite a working set; the allowed peer restores byte-exact; working-set uploads are
    bounded by the export's size and by --working-set-interval-s, and an unchanged upload
    does not rewrite the record; the log names who read what."""
    pki = _pki(tmp_path / "pki")
    img = image(8 * MiB)
    source = _agent(
        tmp_path,
        "source",
        [img.parent],
        [*_tls_flags(pki, "source"), "--peer-allow", "dest.pagewire.test"],
    )
    dest = _agent(tmp_path, "destination", [], _tls_flags(pki, "dest"))
    try:
        _publish(source, img)
        record = source.workdir / "state" / "exports" / "img.json"
        with Watch(source) as watch:
            channel, intruder = _tls_stub(pki, "intruder", source.grpc)
            with channel:
                calls = {
                    "describe": lambda: intruder.Describe(pb.DescribeRequest(export="img")),
                    "upload": lambda: intruder.UploadWorkingSet(
                        pb.WorkingSet(export="img", chunks=[5, 6])
                    ),
                    "bulk": lambda: list(
                        intruder.Bulk(pb.BulkRequest(export="img", want=b"\xff" * 16))
                    ),
                }
                for name, call in calls.items():
                    assert _code(call) == grpc.StatusCode.PERMISSION_DENIED, name
            channel, allowed = _tls_stub(pki, "dest", source.grpc)
            with channel:
                chunks = allowed.Describe(pb.DescribeRequest(export="img")).chunk_digests
                too_many = pb.WorkingSet(export="img", chunks=list(range(len(chunks) + 1)))
                assert _code(lambda: allowed.UploadWorkingSet(too_many)) == (
                    grpc.StatusCode.INVALID_ARGUMENT
                )
                first = pb.WorkingSet(export="img", chunks=[0, 1, 2])
                assert allowed.UploadWorkingSet(first).accepted == 3
                # a rewrite is a new file (tmp, rename): the inode says so, whatever the clock
                written = (record.stat().st_ino, record.stat().st_mtime_ns)
                other = pb.WorkingSet(export="img", chunks=[3, 4])
                try:
                    allowed.UploadWorkingSet(other)
                    raise AssertionError("a second change within the interval was accepted")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "--working-set-interval-s" in (exc.details() or "")
                assert allowed.UploadWorkingSet(first).accepted == 3  # unchanged: no rewrite
                assert (record.stat().st_ino, record.stat().st_mtime_ns) == written
                ws = allowed.Describe(pb.DescribeRequest(export="img")).working_set
                assert list(ws) == [0, 1, 2]
            got, status = restore(source, dest, img)
            assert got["verified"] and status["state"] == "completed", status
        watch.assert_healthy()
        log = source.log_path.read_text().splitlines()
        audit = [line for line in log if "peer access" in line]
        assert any(
            "peer=san:intruder.example" in line and "status=PERMISSION_DENIED" in line
            for line in audit
        )
        # the allowed peer's reads: its native channel grant (or gRPC Urgent, without one)
        assert any(
            "peer=san:dest.pagewire.test" in line
            and "export=img" in line
            and ("rpc=OpenChannel" in line or "rpc=Urgent" in line)
            for line in audit
        ), audit
    finally:
        dest.stop()
        source.stop()
