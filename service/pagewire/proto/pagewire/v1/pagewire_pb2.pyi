from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ("export",)
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    export: str
    def __init__(self, export: _Optional[str] = ...) -> None: ...

class ExportDescription(_message.Message):
    __slots__ = ("name", "size", "page_size", "chunk_size", "zero_map", "chunk_digests", "digest_algorithm", "generation", "working_set", "chunk_fast_digests", "fast_digest_algorithm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ZERO_MAP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKING_SET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FAST_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    FAST_DIGEST_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    page_size: int
    chunk_size: int
    zero_map: bytes
    chunk_digests: _containers.RepeatedScalarFieldContainer[bytes]
    digest_algorithm: str
    generation: str
    working_set: _containers.RepeatedScalarFieldContainer[int]
    chunk_fast_digests: _containers.RepeatedScalarFieldContainer[bytes]
    fast_digest_algorithm: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., page_size: _Optional[int] = ..., chunk_size: _Optional[int] = ..., zero_map: _Optional[bytes] = ..., chunk_digests: _Optional[_Iterable[bytes]] = ..., digest_algorithm: _Optional[str] = ..., generation: _Optional[str] = ..., working_set: _Optional[_Iterable[int]] = ..., chunk_fast_digests: _Optional[_Iterable[bytes]] = ..., fast_digest_algorithm: _Optional[str] = ...) -> None: ...

class ChunkRequest(_message.Message):
    __slots__ = ("export", "request_id", "chunks", "compression")
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    export: str
    request_id: int
    chunks: _containers.RepeatedScalarFieldContainer[int]
    compression: str
    def __init__(self, export: _Optional[str] = ..., request_id: _Optional[int] = ..., chunks: _Optional[_Iterable[int]] = ..., compression: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data", "encoding")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    encoding: str
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ..., encoding: _Optional[str] = ...) -> None: ...

class ChunkBatch(_message.Message):
    __slots__ = ("request_id", "chunks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, request_id: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class BulkRequest(_message.Message):
    __slots__ = ("export", "compression", "want", "max_batch_bytes")
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    WANT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    export: str
    compression: str
    want: bytes
    max_batch_bytes: int
    def __init__(self, export: _Optional[str] = ..., compression: _Optional[str] = ..., want: _Optional[bytes] = ..., max_batch_bytes: _Optional[int] = ...) -> None: ...

class WorkingSet(_message.Message):
    __slots__ = ("export", "chunks")
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    export: str
    chunks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, export: _Optional[str] = ..., chunks: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkingSetReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class OpenChannelRequest(_message.Message):
    __slots__ = ("export",)
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    export: str
    def __init__(self, export: _Optional[str] = ...) -> None: ...

class ChannelGrant(_message.Message):
    __slots__ = ("port", "token")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    port: int
    token: bytes
    def __init__(self, port: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...
