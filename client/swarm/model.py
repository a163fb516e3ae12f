"""Generation and scoring through the swarm: the local head around remote blocks.

Greedy decoding here is token-for-token the single-process model's: the prompt goes through
the swarm once (prefill), then one token per step with the KV caches on the servers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedswarm.client.swarm.forward import forward_blocks
from fedswarm.client.swarm.session import InferenceSession
from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    import torch

    from fedswarm.client.swarm.client import SwarmClient
    from fedswarm.client.swarm.head import LocalHead


@dataclass
class Generation:
    """New token ids, the logits each was chosen from, and per-step timings (seconds)."""

    tokens: list[int] = field(default_factory=list)
    logits: list[Any] = field(default_factory=list)  # one [vocab] tensor per new token
    step_s: list[float] = field(default_factory=list)
    remote_s: list[float] = field(default_factory=list)  # of step_s, the time spent in the swarm
    server_ms: list[float] = field(default_factory=list)  # server compute per step, summed over hops
    hops: int = 0


class SwarmModel:
    """A causal LM whose blocks live on the swarm."""

    def __init__(self, client: SwarmClient, head: LocalHead) -> None:
        self.client = client
        self.head = head

    def generate(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int,
        eos_token_id: int | Collection[int] | None = None,
        on_token: Callable[[int, InferenceSession], bool | None] | None = None,
        pick: Callable[[torch.Tensor], int] | None = None,
        keep_logits: bool = True,
        adapter: str | None = None,
    ) -> Generation:
        """Decoding until ``max_new_tokens`` or an end-of-sequence token (``eos_token_id``: one id or several).

        ``on_token`` sees each new token as it comes (for printing, streaming, tests) and may
        return True to stop there; ``pick`` chooses a token from its logits (default: greedy,
        see :class:`~fedswarm.client.swarm.sampling.TokenPicker`); ``keep_logits=False`` keeps
        no per-step logits (a server answering many requests needs only the tokens); ``adapter``
        names the unmerged adapter the servers announce ("" the base; default: the client's).
        """
        import time

        import torch

        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        result = Generation()
        ids = torch.tensor([list(input_ids)], dtype=torch.long)
        with InferenceSession(self.client, ids.shape[1] + max_new_tokens, adapter) as session:
            for _ in range(max_new_tokens):
                begin = time.perf_counter()
                embeds = self.head.embed(ids)
                sent = time.perf_counter()
                hidden = session.step(embeds)
                result.remote_s.append(time.perf_counter() - sent)
                logits = self.head.logits(hidden[:, -1])[0]
                token = int(torch.argmax(logits)) if pick is None else pick(logits)
                result.step_s.append(time.perf_counter() - begin)
                result.server_ms.append(session.server_ms())
                result.tokens.append(token)
                if keep_logits:
                    result.logits.append(logits)
                result.hops = len(session.links)
                stop = on_token(token, session) if on_token is not None else None
                if token in eos or stop is True:
                    break
                ids = torch.tensor([[token]], dtype=torch.long)
        return result

    def logits(self, input_ids: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """Logits of every position of right-padded ``input_ids`` ([batch, seq]), via stateless Forward."""
        hidden = forward_blocks(self.client, self.head.embed(input_ids), adapter)
        return self.head.logits(hidden)

    def answer_nll(self, sequences: Sequence[tuple[Sequence[int], int]], batch_size: int = 8) -> tuple[float, int]:
        """Summed negative log-likelihood of the answer tokens, and their count.

        ``sequences`` are ``(ids, prompt_len)``: tokens from ``prompt_len`` on are scored.
        Right padding is harmless: under a causal mask no real token attends to a pad.
        """
        import torch

        total, count = 0.0, 0
        for offset in range(0, len(sequences), batch_size):
            chunk = sequences[offset : offset + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            batch = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (ids, _) in enumerate(chunk):
                batch[row, : len(ids)] = torch.tensor(list(ids))
            logprobs = torch.log_softmax(self.logits(batch), dim=-1)
            for row, (ids, prompt_len) in enumerate(chunk):
                for pos in range(max(prompt_len, 1), len(ids)):
                    total -= float(logprobs[row, pos - 1, ids[pos]])
                    count += 1
        return total, count


def perplexity(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")
