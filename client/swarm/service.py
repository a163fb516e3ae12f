"""The swarm as one long-lived generator for many requests: model names, clients and heads, kept warm.

A request names a model the way OpenAI clients do; :func:`served_models` maps each name the
swarm offers (a base model, or an adapter of it) to what routing needs. Each (model, merged adapter)
pair gets one :class:`SwarmClient` (its bans and channels shared by the requests that use it),
and each model one local head and tokenizer, loaded once. Everything here blocks: the HTTP
layer runs it in worker threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedswarm.client.swarm.discovery import list_servers
from fedswarm.common.errors import FedswarmError, InputError

if TYPE_CHECKING:
    from fedswarm.client.swarm.client import SwarmClient
    from fedswarm.client.swarm.model import SwarmModel
    from fedswarm.client.swarm.sampling import Sampling
    from fedswarm.client.swarm.textgen import TextResult
    from fedswarm.common.security.transport import Security
    from fedswarm.protos import swarm_pb2

log = logging.getLogger("fedswarm.swarm.service")

REFRESH_S = 2.0  # a client's server list is re-read from the registries when older than this, seconds


class ModelNotFoundError(FedswarmError):
    """The request names a model the swarm does not serve."""


class ContextLengthError(InputError):
    """Prompt and completion do not fit the model's context."""


@dataclass(frozen=True)
class Target:
    """What a model name routes to: a base model, the adapter its servers merged, an unmerged adapter."""

    name: str  # as requests and /v1/models spell it
    model_id: str
    adapter_id: str = ""  # merged into the servers' blocks (a digest); "" for none
    lora: str = ""  # unmerged adapter chosen per generation, by the name servers announce; "" for none

    @property
    def adapter(self) -> str:
        """The metrics label: the adapter's name, or "" for the base model."""
        return self.lora or self.adapter_id

    @property
    def group(self) -> tuple[str, str]:
        """The servers a generation may use: one model, one merged adapter (a client per group)."""
        return self.model_id, self.adapter_id


def served_models(servers: Sequence[swarm_pb2.ServerInfo]) -> dict[str, Target]:
    """Every name a request may use: each model, each merged adapter, each unmerged adapter servers announce.

    A model is offered by its id (servers without a merged adapter), a merged adapter by its id
    (a digest), an unmerged adapter by the name its servers announce it under. The first
    announcement of a name wins, so a name never means two things.
    """
    names: dict[str, Target] = {}
    for info in servers:
        name = info.adapter_id or info.model_id
        names.setdefault(name, Target(name, info.model_id, info.adapter_id))
        for adapter in getattr(info, "adapters", ()):
            names.setdefault(adapter.name, Target(adapter.name, info.model_id, info.adapter_id, adapter.name))
    return dict(sorted(names.items()))


@dataclass
class Runtime:
    """What generating text with one model needs locally: its head, tokenizer, end tokens and context."""

    head: Any  # LocalHead
    tokenizer: Any
    eos_ids: frozenset[int]
    context: int  # longest prompt + completion, tokens


class SwarmService:
    """Thread-safe: names to clients and runtimes, created on first use and reused."""

    def __init__(
        self, registries: Sequence[str], security: Security, max_context: int = 4096, ban_s: float = 60.0
    ) -> None:
        if max_context < 2:
            raise InputError(f"--max-context must be >= 2, got {max_context}")
        self.registries = list(registries)
        self.security = security
        self.max_context = max_context  # at most the servers' --max-length
        self.ban_s = ban_s
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], SwarmClient] = {}
        self._refreshed: dict[tuple[str, str], float] = {}  # time.monotonic() of each client's last server list
        self._runtimes: dict[str, Runtime] = {}
        self.last_servers: list[swarm_pb2.ServerInfo] = []
        self._listed_at = -float("inf")  # time.monotonic() of the last registry read

    def servers(self, max_age_s: float = 0.0) -> list[swarm_pb2.ServerInfo]:
        """The registries' live servers, read at most ``max_age_s`` ago (FedswarmError when no registry answers)."""
        if time.monotonic() - self._listed_at > max_age_s:
            self.last_servers = list_servers(self.registries, self.security)
            self._listed_at = time.monotonic()
        return self.last_servers

    def models(self) -> dict[str, Target]:
        """The names on offer, from a server list at most a second old (one registry call serves a burst)."""
        return served_models(self.servers(max_age_s=1.0))

    def resolve(self, name: str) -> Target:
        models = self.models()
        if name not in models:
            offered = ", ".join(models) or "none (no block server is registered)"
            raise ModelNotFoundError(f"model {name!r} is not served by this swarm; models: {offered}")
        return models[name]

    def runtime(self, model_id: str) -> Runtime:
        """The model's local head, tokenizer and end tokens, loaded on first use."""
        with self._lock:
            if model_id not in self._runtimes:
                self._runtimes[model_id] = _load_runtime(model_id, self.max_context)
            return self._runtimes[model_id]

    def client(self, target: Target) -> SwarmClient:
        """The target's client, its server list at most ``REFRESH_S`` old (servers join and leave)."""
        from fedswarm.client.swarm.client import SwarmClient

        now = time.monotonic()
        with self._lock:
            client = self._clients.get(target.group)
            if client is None:
                client = self._clients[target.group] = SwarmClient(
                    self.registries, self.security, target.model_id, target.adapter_id, ban_s=self.ban_s
                )
                self._refreshed[target.group] = now
            stale = now - self._refreshed[target.group] > REFRESH_S
            if stale:
                self._refreshed[target.group] = now
        if stale:
            client.try_refresh()
        return client

    def replays(self) -> dict[tuple[str, str], int]:
        """Hops re-routed and replayed after a server failed, per (model, merged adapter), since start."""
        with self._lock:
            return {group: getattr(client, "replays", 0) for group, client in self._clients.items()}

    def check_length(self, runtime: Runtime, prompt_ids: Sequence[int], max_tokens: int | None, default: int) -> int:
        """``max_tokens`` (or the default, cut to what fits), after checking that the request fits the context."""
        if not prompt_ids:
            raise InputError("prompt: empty (the swarm needs at least one token)")
        room = runtime.context - len(prompt_ids)
        if max_tokens is not None and max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
        if room < 1:
            raise ContextLengthError(
                f"this model's context is {runtime.context} tokens; the prompt alone has {len(prompt_ids)}"
            )
        wanted = max_tokens if max_tokens is not None else min(default, room)
        if wanted > room:
            raise ContextLengthError(
                f"this model's context is {runtime.context} tokens; the prompt has {len(prompt_ids)} and "
                f"{wanted} more were asked for (max_tokens)"
            )
        return wanted

    def generate(
        self,
        target: Target,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str] = (),
        on_text: Callable[[str], bool | None] | None = None,
    ) -> TextResult:
        from fedswarm.client.swarm.textgen import generate_text

        runtime = self.runtime(target.model_id)
        return generate_text(
            self._model(target, runtime), runtime.tokenizer, prompt_ids, max_tokens, runtime.eos_ids, sampling,
            stop, on_text, adapter=target.lora,
        )  # fmt: skip

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def _model(self, target: Target, runtime: Runtime) -> SwarmModel:
        from fedswarm.client.swarm.model import SwarmModel

        return SwarmModel(self.client(target), runtime.head)


def _load_runtime(model_id: str, max_context: int) -> Runtime:
    from fedswarm.client.swarm.head import load_head
    from fedswarm.client.swarm.textgen import eos_token_ids
    from fedswarm.common.model import load_tokenizer, parse_model

    spec = parse_model(model_id)
    tokenizer = load_tokenizer(spec)
    head = load_head(spec)
    positions = _max_positions(spec)
    log.info("loaded the head and tokenizer of %s (context %d tokens)", model_id, min(positions, max_context))
    return Runtime(head, tokenizer, eos_token_ids(spec, tokenizer), min(positions, max_context))


def _max_positions(spec: Any) -> int:
    if spec.name == "tiny":
        from fedswarm.common.model import tiny_config

        return int(tiny_config().max_position_embeddings)
    from transformers import AutoConfig

    from fedswarm.common.model import model_folder

    return int(AutoConfig.from_pretrained(model_folder(spec)).max_position_embeddings)
