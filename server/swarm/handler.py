"""The block server's RPC handlers: thin checks around :class:`SpanModel`.

Compute is serialised by one lock: on a CPU server concurrent requests would only fight
over the same cores, and one-at-a-time keeps each step's latency predictable. Hidden states
arrive on the CPU; the span computes on its device and answers on the CPU, ready to encode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedswarm.protos import swarm_pb2, swarm_pb2_grpc
from fedswarm.protos.tensors import PROTOCOL_VERSION, from_proto, to_proto
from fedswarm.server.swarm.sessions import SessionLimitError, SessionTable

if TYPE_CHECKING:
    import torch

    from fedswarm.server.swarm.blocks import SpanModel

log = logging.getLogger("fedswarm.swarm.handler")


class BlockServicer(swarm_pb2_grpc.BlockServerServicer):
    """Serves ``Info``, stateless ``Forward`` and streaming ``Inference`` for one span."""

    def __init__(self, span: SpanModel, info: swarm_pb2.ServerInfo, sessions: SessionTable, max_length: int) -> None:
        self.span = span
        self.info = info
        self.sessions = sessions
        self.max_length = max_length  # longest session, in tokens
        self._compute = threading.Lock()

    def Info(self, request: swarm_pb2.InfoRequest, context: Any) -> swarm_pb2.ServerInfo:  # noqa: N802
        _check_version(request.protocol_version, context)
        return self.info

    def Forward(self, request: swarm_pb2.ForwardRequest, context: Any) -> swarm_pb2.ForwardReply:  # noqa: N802
        _check_version(request.protocol_version, context)
        self._check_span(request.start, request.end, context)
        hidden = self._hidden(request.hidden, context)
        begin = time.perf_counter()
        with self._compute:
            out = self.span.forward(hidden, request.start, request.end)
        ms = (time.perf_counter() - begin) * 1e3
        return swarm_pb2.ForwardReply(protocol_version=PROTOCOL_VERSION, hidden=to_proto(out), compute_ms=ms)

    def Inference(  # noqa: N802
        self, requests: Iterator[swarm_pb2.InferenceRequest], context: Any
    ) -> Iterator[swarm_pb2.InferenceReply]:
        import grpc

        first = next(requests, None)
        if first is None:
            return
        _check_version(first.protocol_version, context)
        start, end, max_length = first.start, first.end, first.max_length
        self._check_span(start, end, context)
        if not 0 < max_length <= self.max_length:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_length {max_length} not in 1..{self.max_length}")
        batch = self._hidden(first.hidden, context).shape[0]
        try:
            session = self.sessions.open(self.span.cache_bytes(start, end, batch, max_length), context)
        except SessionLimitError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            cache = self.span.new_cache(start, end, batch, max_length)
            request: swarm_pb2.InferenceRequest | None = first
            while request is not None:
                yield self._step(request, cache, start, end, context)
                self.sessions.touch(session)
                request = next(requests, None)
        finally:
            self.sessions.close(session)
            del cache

    def _step(self, request: swarm_pb2.InferenceRequest, cache: Any, start: int, end: int, context: Any) -> Any:
        import grpc

        _check_version(request.protocol_version, context)
        hidden = self._hidden(request.hidden, context)
        if hidden.shape[0] != cache.keys.shape[1]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {hidden.shape[0]} differs from the session's")
        if cache.length + hidden.shape[1] > cache.max_length:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"session holds {cache.length} tokens, {hidden.shape[1]} more exceed its max_length {cache.max_length}",
            )
        begin = time.perf_counter()
        with self._compute:
            out = self.span.forward(hidden, start, end, cache)
        ms = (time.perf_counter() - begin) * 1e3
        return swarm_pb2.InferenceReply(
            protocol_version=PROTOCOL_VERSION, hidden=to_proto(out), length=cache.length, compute_ms=ms
        )

    def _check_span(self, start: int, end: int, context: Any) -> None:
        import grpc

        if not self.span.start <= start < end <= self.span.end:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"blocks {start}:{end} asked, this server holds {self.span.start}:{self.span.end}",
            )

    def _hidden(self, message: swarm_pb2.Tensor, context: Any) -> torch.Tensor:
        import grpc

        try:
            hidden = from_proto(message)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if hidden.dim() != 3 or hidden.shape[2] != self.span.hidden_size or hidden.shape[1] == 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"hidden states of shape {tuple(hidden.shape)}, expected [batch, tokens>0, {self.span.hidden_size}]",
            )
        return hidden  # the span moves it to its device and dtype, and answers on the CPU in the caller's dtype


def _check_version(version: int, context: Any) -> None:
    import grpc

    if version != PROTOCOL_VERSION:
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}",
        )
