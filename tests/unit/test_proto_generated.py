"""The checked-in generated gRPC code matches the proto and imports as a package."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date() -> None:
    need(
        importlib.util.find_spec("grpc_tools") is not None,
        "grpcio-tools is needed to regenerate (pip install grpcio-tools)",
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_generated_modules_import_and_match_the_contract() -> None:
    from pagewire.proto.pagewire.v1 import pagewire_pb2, pagewire_pb2_grpc

    service = pagewire_pb2.DESCRIPTOR.services_by_name["PageService"]
    assert service.full_name == "pagewire.v1.PageService"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Describe", "Urgent", "Bulk", "UploadWorkingSet", "OpenChannel"}
    assert methods["Urgent"].client_streaming and methods["Urgent"].server_streaming
    assert not methods["Bulk"].client_streaming and methods["Bulk"].server_streaming
    assert hasattr(pagewire_pb2_grpc, "PageServiceStub")

    fields = {f.name for f in pagewire_pb2.ExportDescription.DESCRIPTOR.fields}
    assert fields == {
        "name",
        "size",
        "page_size",
        "chunk_size",
        "zero_map",
        "chunk_digests",
        "digest_algorithm",
        "generation",
        "working_set",
        "chunk_fast_digests",
        "fast_digest_algorithm",
    }
    request = pagewire_pb2.ChunkRequest(export="e", request_id=7, chunks=[1, 2])
    assert pagewire_pb2.ChunkRequest.FromString(request.SerializeToString()) == request
