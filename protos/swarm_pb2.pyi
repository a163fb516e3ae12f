from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("address", "model_id", "start", "end", "throughput", "adapter_id", "num_blocks", "expires_in_s", "version", "adapters", "identity", "identity_name")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_NAME_FIELD_NUMBER: _ClassVar[int]
    address: str
    model_id: str
    start: int
    end: int
    throughput: float
    adapter_id: str
    num_blocks: int
    expires_in_s: float
    version: str
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    identity: str
    identity_name: str
    def __init__(self, address: _Optional[str] = ..., model_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., throughput: _Optional[float] = ..., adapter_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., expires_in_s: _Optional[float] = ..., version: _Optional[str] = ..., adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., identity: _Optional[str] = ..., identity_name: _Optional[str] = ...) -> None: ...

class AnnounceRequest(_message.Message):
    __slots__ = ("protocol_version", "server", "ttl_s")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    server: ServerInfo
    ttl_s: float
    def __init__(self, protocol_version: _Optional[int] = ..., server: _Optional[_Union[ServerInfo, _Mapping]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class AnnounceReply(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("protocol_version", "model_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., model_id: _Optional[str] = ...) -> None: ...

class ListReply(_message.Message):
    __slots__ = ("protocol_version", "servers")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    def __init__(self, protocol_version: _Optional[int] = ..., servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("protocol_version", "start", "end", "hidden", "adapter", "adapter_digest")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    start: int
    end: int
    hidden: Tensor
    adapter: str
    adapter_digest: str
    def __init__(self, protocol_version: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ..., adapter_digest: _Optional[str] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("protocol_version", "hidden", "compute_ms")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    hidden: Tensor
    compute_ms: float
    def __init__(self, protocol_version: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("protocol_version", "start", "end", "max_length", "hidden", "session_id", "adapter", "adapter_digest")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    start: int
    end: int
    max_length: int
    hidden: Tensor
    session_id: str
    adapter: str
    adapter_digest: str
    def __init__(self, protocol_version: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., max_length: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., session_id: _Optional[str] = ..., adapter: _Optional[str] = ..., adapter_digest: _Optional[str] = ...) -> None: ...

class InferenceReply(_message.Message):
    __slots__ = ("protocol_version", "hidden", "length", "compute_ms", "batch_size")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    hidden: Tensor
    length: int
    compute_ms: float
    batch_size: int
    def __init__(self, protocol_version: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., length: _Optional[int] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("protocol_version",)
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    def __init__(self, protocol_version: _Optional[int] = ...) -> None: ...
