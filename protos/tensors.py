"""Tensors on the wire: raw bytes plus dtype and shape, never pickles.

Pickles would let any peer run code on the receiver; raw bytes with an explicit dtype
and shape cost nothing extra and are checked before use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedswarm.protos import swarm_pb2

if TYPE_CHECKING:
    import torch

PROTOCOL_VERSION = 1
WIRE_DTYPES = ("float32", "bfloat16", "float16")


def to_proto(tensor: torch.Tensor) -> swarm_pb2.Tensor:
    """Serialise a CPU tensor (any layout) as contiguous raw bytes."""
    import torch

    name = str(tensor.dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise ValueError(f"tensor dtype {name} cannot travel; expected one of {', '.join(WIRE_DTYPES)}")
    raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return swarm_pb2.Tensor(data=raw, dtype=name, shape=list(tensor.shape))


def from_proto(message: swarm_pb2.Tensor) -> torch.Tensor:
    """Rebuild a tensor, refusing unknown dtypes and byte counts that do not match the shape."""
    import torch

    if message.dtype not in WIRE_DTYPES:
        raise ValueError(f"tensor dtype {message.dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    dtype = getattr(torch, message.dtype)
    shape = tuple(int(d) for d in message.shape)
    count = 1
    for dim in shape:
        if dim < 0:
            raise ValueError(f"tensor shape {shape} has a negative dimension")
        count *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(message.data) != count * itemsize:
        raise ValueError(
            f"tensor of shape {shape} and dtype {message.dtype} needs {count * itemsize} bytes, got {len(message.data)}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(message.data), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)
