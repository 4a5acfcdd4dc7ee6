"""The native data channel under mTLS (issue 15): page data flows over the engine's own
TLS 1.3 connections, authenticated with the agents' certificates, and nobody without an
allowed certificate of the CA gets a byte, even holding a valid token. Real agents, real
TCP, real TLS, a real workload."""

from __future__ import annotations

import functools
import json
import os
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from pagewire import _uffd
from pagewire.core.layout import SYSTEM_PAGE_SIZE as PAGE
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc
from pagewire.tools.localagents import LocalAgent

from tests.peers import publish, start_pair, stop_pair
from tests.pki import agent_pki, make_cert
from tests.security.peer_attacks import CHAN_OK, MiB, Watch, restore, wait_for
from tests.workloads import KINDS, workload_command

pytestmark = pytest.mark.usefixtures("require_uffd")
CHUNK = 64 << 10


def _grant(pki: Path, address: str) -> tuple[int, bytes]:
    """OpenChannel over mTLS, as the destination agent would ask."""
    creds = grpc.ssl_channel_credentials(
        (pki / "ca.crt").read_bytes(),
        (pki / "destination.key").read_bytes(),
        (pki / "destination.crt").read_bytes(),
    )
    with grpc.secure_channel(address, creds) as channel:
        reply = pb_grpc.PageServiceStub(channel).OpenChannel(
            pb.OpenChannelRequest(export="img"), timeout=10
        )
    return int(reply.port), bytes(reply.token)


def _hello_bytes(token: bytes, kind: int = 1) -> bytes:
    return b"PWDATA01" + token + struct.pack("<II", kind, 0)


def _tls_hello(pki: Path, cert: str, port: int, token: bytes) -> bytes:
    """Say hello over TLS with cert; returns the reply (empty if the source hung up)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.load_cert_chain(pki / f"{cert}.crt", pki / f"{cert}.key")
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(_hello_bytes(token))
            reply = b""
            while len(reply) < 8:
                got = tls.recv(8 - len(reply))
                if not got:
                    break
                reply += got
            if reply[:4] == b"PWOK" and struct.unpack("<I", reply[4:])[0] == CHAN_OK:
                tls.sendall(struct.pack("<IIQ", 1, 0, 0))  # chunk 0: the data comes back
                head = tls.recv(16)
                assert struct.unpack("<QII", head)[2] == CHAN_OK
            return reply
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        raw.close()


def _plain_hello(port: int, token: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_hello_bytes(token))
        try:
            return sock.recv(64)
        except ConnectionResetError:
            return b""


def _channel_log(agent: LocalAgent) -> list[str]:
    return [line for line in agent.log_path.read_text().splitlines() if "native" in line]


def test_mtls_restores_over_the_native_channel_and_refuses_everyone_else(
    tmp_path: Path, image
) -> None:
    """Under mTLS the session's transport is the native channel (TLS 1.3), byte-exact; a
    valid token is useless in plain text, with a certificate of another CA, or with a
    certificate of the CA whose SAN --peer-allow does not list; the allowed certificate
    then uses that same token."""
    p = start_pair(
        tmp_path,
        tls=True,
        isolated=False,
        extra_src=["--peer-allow", "127.0.0.1"],
    )
    pki = tmp_path / "pki"
    ext = "extendedKeyUsage=serverAuth,clientAuth"
    make_cert(pki, "intruder", "ca", f"subjectAltName=DNS:intruder.example\n{ext}")
    try:
        img = image(32 * MiB)
        publish(p, img)
        with Watch(p.source, p.dest) as watch:
            port, token = _grant(pki, p.source.grpc)
            assert _plain_hello(port, token)[:4] != b"PWOK"
            assert _tls_hello(pki, "rogue", port, token) == b""
            assert _tls_hello(pki, "intruder", port, token) == b""
            reply = _tls_hello(pki, "destination", port, token)
            assert reply[:4] == b"PWOK" and struct.unpack("<I", reply[4:])[0] == CHAN_OK
            seen, status = restore(p.source, p.dest, img)
            assert seen["verified"] and status["state"] == "completed", status
            assert status["transport"] == "native", status
        watch.assert_healthy()
        opened = [line for line in _channel_log(p.dest) if "channel open" in line]
        assert opened and "tls=True" in opened[-1], _channel_log(p.dest)
    finally:
        stop_pair(p)


def _engine_for(size: int) -> tuple[_uffd.Engine, int]:
    base = _uffd.mmap_anon(size)
    uffd = _uffd.uffd_create(_uffd.FEATURE_EVENT_REMOVE)
    _uffd.uffd_register(uffd, base, size)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    eng = _uffd.Engine(uffd, [(base, size, 0, PAGE)], efd, background=False)
    eng.start()
    return eng, base


def _completed(eng: _uffd.Engine) -> bool:
    return eng.state == "completed"


def test_the_engine_checks_the_source_certificate_names_the_host(tmp_path: Path, image) -> None:
    """The destination's engine refuses a channel whose certificate does not name the host
    it dialled, or that another CA signed; and a plain-text engine cannot talk to a TLS
    source. Each refusal names its cause (the agent logs it and stays on gRPC)."""
    pki = agent_pki(tmp_path / "pki", {"destination": ["127.0.0.1"]})
    make_cert(pki, "source", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    img = image(1 * MiB)
    data = img.read_bytes()
    fd = os.open(img, os.O_RDONLY)
    zero = _uffd.zero_map(fd, len(data), PAGE)
    tls = [str(pki / n) for n in ("source.crt", "source.key", "ca.crt")]
    server = _uffd.DataServer("127.0.0.1", 0, *tls)
    server.add_export(0, fd, len(data), PAGE, CHUNK, zero)
    os.close(fd)
    digests = b"".join(_uffd.sha256(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK))
    dest = [str(pki / n) for n in ("destination.crt", "destination.key", "ca.crt")]
    rogue = [str(pki / n) for n in ("rogue.crt", "rogue.key", "ca.crt")]
    cases = [
        ("localhost", dest, "certificate refused"),  # the cert names 127.0.0.1 only
        ("127.0.0.1", rogue, "before answering"),  # a client of another CA: hung up on
        ("127.0.0.1", [None, None, None], "closed the connection"),  # plain text
        ("127.0.0.1", dest, None),  # the real thing
    ]
    try:
        for host, (cert, key, ca), refusal in cases:
            token = os.urandom(16)
            server.grant(token, 0)
            eng, base = _engine_for(len(data))
            attach = functools.partial(
                eng.attach_channel, host, server.port, token, CHUNK, len(data), PAGE, zero,
                digests, background=True, tls_cert=cert, tls_key=key, tls_ca=ca,
            )  # fmt: skip
            try:
                if refusal is None:
                    attach()
                    wait_for(functools.partial(_completed, eng), 10, "the restore over TLS")
                    assert _uffd.read_memory(base, len(data)) == data
                else:
                    with pytest.raises(ConnectionError, match=refusal):
                        attach()
            finally:
                eng.close()
        assert server.limit_stats()["refused_tls"] >= 3
    finally:
        server.close()


@pytest.mark.parametrize("kind", KINDS)
def test_both_workload_kinds_restore_byte_exact_over_the_tls_channel(
    tmp_path: Path, image, kind: str
) -> None:
    """Issue 15's restore, under mTLS, with pagewire.client and with a Firecracker-shaped
    workload (EVENT_REMOVE only, its own uffd copy held open, a balloon madvise mid-run):
    the native TLS channel carries the pages, every byte is the image's (removed pages
    read zero), and nothing crosses twice."""
    p = start_pair(tmp_path, tls=True, isolated=False)
    try:
        img = image(32 * MiB, seed=11)
        exported = publish(p, img)
        body = {"source": {"peer": p.source.grpc, "export": "img"}}
        session = p.dest.request("POST", "/v1/sessions", json=body).json()
        args = ["--verify", str(img), "--threads", "2", "--order", "random"]
        if kind == "firecracker":
            args += ["--remove", f"{4 * MiB}:{1 * MiB}"]
        cmd = workload_command(kind, session["socket"], img.stat().st_size, *args)
        done = subprocess.run(cmd, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert json.loads(done.stdout.decode().splitlines()[-1])["verified"]
        status = _ended(p.dest, session["id"])
        assert status["state"] == "completed" and status["transport"] == "native", status
        data_bytes = (exported["pages"] - exported["zero_pages"]) * exported["page_size"]
        assert status["bytes_received"] <= 1.05 * data_bytes
    finally:
        stop_pair(p)


def _ended(agent: LocalAgent, session_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status: dict = agent.request("GET", f"/v1/sessions/{session_id}").json()
        if status["state"] not in ("awaiting_attach", "running", "paused"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
