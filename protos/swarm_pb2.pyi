from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: bytes | None = ..., dtype: str | None = ..., shape: _Iterable[int] | None = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("address", "model_id", "start", "end", "throughput", "adapter_id", "num_blocks", "expires_in_s", "version")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    address: str
    model_id: str
    start: int
    end: int
    throughput: float
    adapter_id: str
    num_blocks: int
    expires_in_s: float
    version: str
    def __init__(self, address: str | None = ..., model_id: str | None = ..., start: int | None = ..., end: int | None = ..., throughput: float | None = ..., adapter_id: str | None = ..., num_blocks: int | None = ..., expires_in_s: float | None = ..., version: str | None = ...) -> None: ...

class AnnounceRequest(_message.Message):
    __slots__ = ("protocol_version", "server", "ttl_s")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    server: ServerInfo
    ttl_s: float
    def __init__(self, protocol_version: int | None = ..., server: ServerInfo | _Mapping | None = ..., ttl_s: float | None = ...) -> None: ...

class AnnounceReply(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: int | None = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("protocol_version", "model_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model_id: str
    def __init__(self, protocol_version: int | None = ..., model_id: str | None = ...) -> None: ...

class ListReply(_message.Message):
    __slots__ = ("protocol_version", "servers")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    def __init__(self, protocol_version: int | None = ..., servers: _Iterable[ServerInfo | _Mapping] | None = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("protocol_version", "start", "end", "hidden")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    start: int
    end: int
    hidden: Tensor
    def __init__(self, protocol_version: int | None = ..., start: int | None = ..., end: int | None = ..., hidden: Tensor | _Mapping | None = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("protocol_version", "hidden", "compute_ms")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    hidden: Tensor
    compute_ms: float
    def __init__(self, protocol_version: int | None = ..., hidden: Tensor | _Mapping | None = ..., compute_ms: float | None = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("protocol_version", "start", "end", "max_length", "hidden", "session_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    start: int
    end: int
    max_length: int
    hidden: Tensor
    session_id: str
    def __init__(self, protocol_version: int | None = ..., start: int | None = ..., end: int | None = ..., max_length: int | None = ..., hidden: Tensor | _Mapping | None = ..., session_id: str | None = ...) -> None: ...

class InferenceReply(_message.Message):
    __slots__ = ("protocol_version", "hidden", "length", "compute_ms")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    hidden: Tensor
    length: int
    compute_ms: float
    def __init__(self, protocol_version: int | None = ..., hidden: Tensor | _Mapping | None = ..., length: int | None = ..., compute_ms: float | None = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: int | None = ...) -> None: ...
