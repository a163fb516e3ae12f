"""Throughput measurement: how fast this server decodes one token through its span.

Clients plan routes from these figures, so they must reflect the real per-token cost of an
inference step (the common case), not a large-batch forward that would flatter the server.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedswarm.server.swarm.blocks import SpanModel

WARMUP_STEPS = 2  # first calls pay for allocation and kernel selection
CONTEXT_TOKENS = 32  # a short prompt already in the cache, as in a real session


def measure_throughput(span: SpanModel, steps: int = 8) -> float:
    """Block-tokens per second of one-token decoding (blocks × tokens / second)."""
    import torch

    # Inputs start on the CPU, as they arrive over the wire: the timing includes the copies to and
    # from a GPU span, and copying the result back waits for the device, so the clock is honest.
    cache = span.new_cache(span.start, span.end, 1, CONTEXT_TOKENS + WARMUP_STEPS + steps)
    with torch.inference_mode():
        span.forward(torch.randn(1, CONTEXT_TOKENS, span.hidden_size), span.start, span.end, cache)
        token = torch.randn(1, 1, span.hidden_size)
        for _ in range(WARMUP_STEPS):
            span.forward(token, span.start, span.end, cache)
        begin = time.perf_counter()
        for _ in range(steps):
            span.forward(token, span.start, span.end, cache)
        elapsed = time.perf_counter() - begin
    return (span.end - span.start) * steps / max(elapsed, 1e-9)
