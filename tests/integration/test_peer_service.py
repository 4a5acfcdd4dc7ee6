"""The page service over real gRPC: a grpc.aio server on loopback and a PeerClient."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from pagewire.core.layout import SYSTEM_PAGE_SIZE
from pagewire.exports.chunks import pack_bits
from pagewire.exports.export import Export
from pagewire.exports.registry import ExportRegistry
from pagewire.peer.client import TRANSPORT_CODES, PeerClient
from pagewire.peer.errors import PeerError, PeerIntegrityError
from pagewire.peer.remote_export import RemoteExport
from pagewire.peer.server import PageServicer, PeerServer, serve_peers
from pagewire.proto.pagewire.v1 import pagewire_pb2 as pb
from pagewire.proto.pagewire.v1 import pagewire_pb2_grpc as pb_grpc

from tests.conftest import need
from tests.pki import make_ca, make_cert

PS = SYSTEM_PAGE_SIZE
CHUNK = 4 * PS
PAGES = 64  # 16 chunks
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


def write_image(path: Path) -> bytes:
    """Data, zero pages inside data chunks, whole zero chunks (holes and written zeros)."""
    with open(path, "wb") as f:
        f.truncate(PAGES * PS)
        f.write(os.urandom(5 * PS))  # chunk 0 and page 4 of chunk 1
        f.seek(7 * PS)
        f.write(os.urandom(PS))  # chunk 1: data, zero, zero, data
        f.seek(12 * PS)
        f.write(bytes(4 * PS))  # chunk 3: written zeros
        f.seek(20 * PS)
        f.write(os.urandom(20 * PS))  # chunks 5..9
        f.seek(63 * PS)
        f.write(os.urandom(PS))  # last chunk: zero, zero, zero, data
    return path.read_bytes()


def chunk_of(data: bytes, index: int) -> bytes:
    return data[index * CHUNK : (index + 1) * CHUNK]


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[ExportRegistry, Export, bytes]]:
    root = tmp_path / "root"
    root.mkdir()
    data = write_image(root / "vm.mem")
    registry = ExportRegistry(tmp_path / "state", [root], chunk_size=CHUNK)
    export = registry.publish("vm", root / "vm.mem")
    yield registry, export, data
    registry.close()


async def serve(registry: ExportRegistry, servicer: PageServicer | None = None) -> PeerServer:
    return await serve_peers(registry, "127.0.0.1:0", servicer=servicer)


def with_peer(
    registry: ExportRegistry,
    body: Callable[[PeerServer, PeerClient], Awaitable[None]],
    servicer: PageServicer | None = None,
) -> None:
    async def main() -> None:
        peer = await serve(registry, servicer)
        client = PeerClient(f"127.0.0.1:{peer.port}")
        try:
            await body(peer, client)
        finally:
            await client.close()
            await peer.stop(0)

    run(main())


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, PeerError):
        return exc.code
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    return None


# --- happy paths ----------------------------------------------------------------------


def test_describe(image: tuple[ExportRegistry, Export, bytes]) -> None:
    registry, export, data = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        remote = await client.describe("vm")
        assert (remote.name, remote.size, remote.page_size, remote.chunk_size) == (
            "vm",
            len(data),
            PS,
            CHUNK,
        )
        assert remote.zero_map == export.zero_map
        assert remote.digests == export.digests
        assert remote.generation == export.generation
        assert remote.chunk_is_zero(2) and remote.chunk_is_zero(3)
        assert not remote.chunk_is_zero(1)

    with_peer(registry, body)


def test_urgent_fetch_is_byte_exact(image: tuple[ExportRegistry, Export, bytes]) -> None:
    registry, export, data = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        remote = await client.describe("vm")
        stream = client.urgent(remote)
        wanted = [c for c in range(remote.chunks) if not remote.chunk_is_zero(c)]
        # many fetches outstanding at once on one stream
        results = await asyncio.gather(*(stream.fetch([c]) for c in wanted))
        for c, got in zip(wanted, results, strict=True):
            assert got == {c: chunk_of(data, c)}
        both = await stream.fetch([15, 1, 0])
        assert both == {i: chunk_of(data, i) for i in (0, 1, 15)}
        assert await stream.fetch([2]) == {2: bytes(CHUNK)}  # zero chunk: empty on the wire
        await stream.close()
        assert client.urgent_latency.count == len(wanted) + 2
        assert client.bytes_received > 0 and client.integrity_failures == 0
        assert peer.servicer.chunks_sent == len(wanted) + 4
        assert peer.servicer.requests_by_status["OK"] >= len(wanted) + 2

    with_peer(registry, body)


def test_bulk_is_byte_exact(image: tuple[ExportRegistry, Export, bytes]) -> None:
    registry, export, data = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        remote = await client.describe("vm")
        flags = bytearray(remote.chunks)
        for c in (0, 1, 2, 3, 4, 7, 9, 15):
            flags[c] = 1
        got = [item async for item in client.bulk(remote, pack_bits(bytes(flags)), 2 * CHUNK)]
        assert [i for i, _ in got] == [0, 1, 7, 9, 15]  # zero chunks 2, 3, 4 skipped
        for i, chunk in got:
            assert chunk == chunk_of(data, i)
        everything = pack_bits(b"\x01" * remote.chunks)
        rebuilt = bytearray(len(data))
        async for i, chunk in client.bulk(remote, everything):
            rebuilt[i * CHUNK : (i + 1) * CHUNK] = chunk
        assert bytes(rebuilt) == data

    with_peer(registry, body)


def test_working_set_round_trip(image: tuple[ExportRegistry, Export, bytes]) -> None:
    registry, export, _ = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        assert await client.upload_working_set("vm", [5, 0, 5, 9]) == 3
        assert (await client.describe("vm")).working_set == [5, 0, 9]
        assert export.working_set == [5, 0, 9]

    with_peer(registry, body)


# --- errors -----------------------------------------------------------------------------


def test_unknown_export_is_not_found(image: tuple[ExportRegistry, Export, bytes]) -> None:
    registry, _, _ = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        with pytest.raises(PeerError) as info:
            await client.describe("nope")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        remote = await client.describe("vm")
        ghost = RemoteExport(**{**remote.__dict__, "name": "nope"})
        with pytest.raises(PeerError) as info:
            await client.urgent(ghost).fetch([0])
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(PeerError) as info:
            [x async for x in client.bulk(ghost, b"\xff\xff")]
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(PeerError) as info:
            await client.upload_working_set("nope", [1])
        assert info.value.code == grpc.StatusCode.NOT_FOUND

    with_peer(registry, body)


def test_out_of_range(image: tuple[ExportRegistry, Export, bytes]) -> None:
    registry, _, _ = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        remote = await client.describe("vm")
        with pytest.raises(PeerError) as info:
            await client.urgent(remote).fetch([remote.chunks])
        assert info.value.code == grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(PeerError) as info:
            await client.upload_working_set("vm", [0, 1 << 40])
        assert info.value.code == grpc.StatusCode.OUT_OF_RANGE

    with_peer(registry, body)


async def raw_urgent(stub: Any, requests: list[Any]) -> list[Any]:
    return [batch async for batch in stub.Urgent(iter(requests))]


def test_malformed_requests_are_invalid_and_server_stays_healthy(
    image: tuple[ExportRegistry, Export, bytes],
) -> None:
    registry, _, _ = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        stub = pb_grpc.PageServiceStub(client.channel)
        remote = await client.describe("vm")
        good = client.urgent(remote)
        assert 0 in await good.fetch([0])
        bad_calls = [
            stub.Describe(pb.DescribeRequest(export="")),
            stub.UploadWorkingSet(pb.WorkingSet(export="", chunks=[1])),
            raw_urgent(stub, [pb.ChunkRequest(request_id=1, chunks=[0])]),  # no export
            raw_urgent(stub, [pb.ChunkRequest(export="vm", request_id=1, chunks=[0] * 1025)]),
            raw_urgent(
                stub,
                [
                    pb.ChunkRequest(export="vm", request_id=1, chunks=[0]),
                    pb.ChunkRequest(export="other", request_id=2, chunks=[0]),
                ],
            ),
            raw_urgent(stub, [pb.ChunkRequest(export="Bad/Name", request_id=1)]),
            collect(stub.Bulk(pb.BulkRequest(export="vm", want=b"\xff"))),  # needs 2 bytes
            collect(stub.Bulk(pb.BulkRequest(export="vm", want=b"\xff" * 3))),
            collect(
                stub.Bulk(pb.BulkRequest(export="vm", want=b"\xff\xff", max_batch_bytes=9 << 20))
            ),
            collect(stub.Bulk(pb.BulkRequest(export="", want=b""))),
        ]
        codes = []
        for call in bad_calls:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            codes.append(info.value.code())
        assert codes[:5] + codes[6:] == [grpc.StatusCode.INVALID_ARGUMENT] * 9
        assert codes[5] == grpc.StatusCode.NOT_FOUND
        assert peer.servicer.requests_by_status["INVALID_ARGUMENT"] == 9
        # the other stream and the server carry on
        assert await good.fetch([1, 15]) == {
            1: registry.get("vm").read_chunk_full(1),
            15: registry.get("vm").read_chunk_full(15),
        }
        assert await client.health() == "SERVING"
        assert await client.health("") == "SERVING"

    with_peer(registry, body)


async def collect(call: Any) -> list[Any]:
    return [x async for x in call]


def test_stale_export_is_failed_precondition(image: tuple[ExportRegistry, Export, bytes]) -> None:
    registry, export, _ = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        remote = await client.describe("vm")
        with open(export.path, "r+b") as f:
            f.write(b"tampered")
        os.utime(export.path, ns=(1, 1))
        with pytest.raises(PeerError) as info:
            await client.urgent(remote).fetch([0])
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(PeerError) as info:
            await client.describe("vm")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert await client.health() == "SERVING"

    with_peer(registry, body)


def test_peer_going_away_fails_outstanding_fetches(
    image: tuple[ExportRegistry, Export, bytes],
) -> None:
    registry, _, data = image

    async def main() -> None:
        peer = await serve(registry)
        async with PeerClient(f"127.0.0.1:{peer.port}") as client:
            remote = await client.describe("vm")
            stream = client.urgent(remote)
            assert (await stream.fetch([0]))[0] == chunk_of(data, 0)
            await peer.stop(0)
            with pytest.raises(PeerError) as info:
                await stream.fetch([1])
            # UNAVAILABLE, CANCELLED or INTERNAL depending on which side sees the close first
            assert info.value.code in TRANSPORT_CODES
            assert stream.closed and client.integrity_failures == 0
            client.urgent(remote)  # a new stream after a broken one is a reconnect
            assert client.reconnects == 1

    run(main())


# --- integrity ----------------------------------------------------------------------------


class CorruptingServicer(PageServicer):
    """Flips one byte in every chunk it sends (or drops a page with truncate=True)."""

    def __init__(self, registry: ExportRegistry, truncate: bool = False) -> None:
        super().__init__(registry)
        self.truncate = truncate

    def _read(self, export: Export, indexes: list[int], read: Callable[[int], bytes]) -> list[Any]:
        chunks = super()._read(export, indexes, read)
        for chunk in chunks:
            if chunk.data:
                if self.truncate:
                    chunk.data = chunk.data[:-PS]
                else:
                    chunk.data = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]
        return chunks


@pytest.mark.parametrize("truncate", [False, True], ids=["flipped-byte", "short-chunk"])
def test_corrupt_peer_raises_integrity_error(
    image: tuple[ExportRegistry, Export, bytes], truncate: bool
) -> None:
    registry, _, _ = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        remote = await client.describe("vm")
        stream = client.urgent(remote)
        with pytest.raises(PeerIntegrityError):
            await stream.fetch([0])
        assert stream.closed and client.integrity_failures == 1
        with pytest.raises(PeerError):
            await stream.fetch([1])  # a torn-down stream refuses further fetches
        with pytest.raises(PeerIntegrityError):
            [x async for x in client.bulk(remote, pack_bits(b"\x01" * remote.chunks))]
        assert client.integrity_failures == 2
        assert client.reconnects == 1  # the bulk stream was opened after a broken one
        assert await client.health() == "SERVING"

    with_peer(registry, body, CorruptingServicer(registry, truncate))


class WrongIndexServicer(PageServicer):
    def _read(self, export: Export, indexes: list[int], read: Callable[[int], bytes]) -> list[Any]:
        chunks = super()._read(export, indexes, read)
        for chunk in chunks:
            chunk.index += 1
        return chunks


def test_wrong_index_raises_integrity_error(image: tuple[ExportRegistry, Export, bytes]) -> None:
    registry, _, _ = image

    async def body(peer: PeerServer, client: PeerClient) -> None:
        remote = await client.describe("vm")
        with pytest.raises(PeerIntegrityError):
            await client.urgent(remote).fetch([0])
        assert client.integrity_failures == 1

    with_peer(registry, body, WrongIndexServicer(registry))


# --- transport security ------------------------------------------------------------------


def test_plain_text_only_on_loopback(image: tuple[ExportRegistry, Export, bytes]) -> None:
    registry, _, _ = image

    async def main() -> None:
        for address in ("0.0.0.0:0", "[::]:0", "192.0.2.1:7071", "peer.example:7071"):
            with pytest.raises(ValueError, match="loopback"):
                await serve_peers(registry, address)
            with pytest.raises(ValueError, match="loopback"):
                PeerClient(address)
        peer = await serve_peers(registry, "0.0.0.0:0", insecure_peers=True)
        await peer.stop(0)
        await PeerClient("192.0.2.1:7071", insecure_peers=True).close()
        for address in ("localhost:0", "[::1]:0", "127.0.0.2:0"):
            PeerClient(address)  # accepted without TLS (nothing connects yet)
        with pytest.raises(ValueError, match="mTLS needs"):
            await serve_peers(registry, "127.0.0.1:0", tls_cert="x")

    run(main())


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    need(shutil.which("openssl") is not None, "the openssl command is needed for test certificates")
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(
        d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
    )
    make_cert(d, "client", "ca", "extendedKeyUsage=clientAuth")
    make_cert(d, "rogue", "other-ca", "extendedKeyUsage=clientAuth")
    return d


def test_mtls(image: tuple[ExportRegistry, Export, bytes], pki: Path) -> None:
    registry, _, data = image

    def tls(name: str) -> dict[str, Any]:
        return {
            "tls_cert": pki / f"{name}.crt",
            "tls_key": pki / f"{name}.key",
            "tls_ca": pki / "ca.crt",
        }

    async def main() -> None:
        # mTLS is allowed on any address; the server listens on loopback for the test
        peer = await serve_peers(registry, "127.0.0.1:0", **tls("server"))
        address = f"127.0.0.1:{peer.port}"
        try:
            async with PeerClient(address, **tls("client")) as good:
                remote = await good.describe("vm")
                assert (await good.urgent(remote).fetch([0]))[0] == chunk_of(data, 0)
            async with PeerClient(address, **tls("rogue")) as rogue:
                with pytest.raises(PeerError) as info:
                    await rogue.describe("vm", timeout=5)
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
            async with PeerClient(address) as plain:
                with pytest.raises(PeerError) as info:
                    await plain.describe("vm", timeout=5)
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
        finally:
            await peer.stop(0)

    run(main())
