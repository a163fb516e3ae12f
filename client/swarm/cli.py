"""``fedswarm swarm generate|perplexity``: querying the swarm from the command line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from fedswarm.common.options import (
    DATA,
    add_arguments,
    flag,
    max_seq_len_option,
    model_option,
    option,
    positional,
    registry_option,
    required,
    threads_option,
)
from fedswarm.common.swarm_cli import SwarmSecurity, security_of


@dataclass(frozen=True, kw_only=True)
class SwarmClientOptions(SwarmSecurity):
    """How a client reaches the swarm: the registries, the model and adapter to use, its own threads."""

    registry: list[str] = registry_option()
    model: str = model_option("", "model to use ('': the one the servers announce)")
    adapter_id: str | None = option(None, "adapter to use ('' for none; default: the servers')", group="adapter")
    adapter: str | None = option(None, "use servers that merged this PEFT adapter folder", group="adapter")
    lora: str = option("", "unmerged adapter to apply, by the name servers announce it under ('': the base model)")
    threads: int = threads_option()


@dataclass(frozen=True, kw_only=True)
class GenerateCommand(SwarmClientOptions):
    """``fedswarm swarm generate``."""

    prompt: str = positional("text to continue")
    max_new_tokens: int = option(32, "tokens to generate")
    chat: bool = flag("wrap the prompt in the model's chat template")


@dataclass(frozen=True, kw_only=True)
class PerplexityCommand(SwarmClientOptions):
    """``fedswarm swarm perplexity``."""

    data: str = required(DATA)
    max_samples: int = option(64, "records to score (0: all)")
    max_seq_len: int = max_seq_len_option()
    batch_size: int = option(8, "records per Forward call")


def add_commands(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="greedy generation through the swarm")
    add_arguments(generate, GenerateCommand)
    generate.set_defaults(handler=run_generate)

    ppl = commands.add_parser("perplexity", help="perplexity of a dataset's answers through the swarm")
    add_arguments(ppl, PerplexityCommand)
    ppl.set_defaults(handler=run_perplexity)


def _connect(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Client, model and tokenizer for the model the swarm serves."""
    from fedswarm.client.swarm.client import SwarmClient
    from fedswarm.common.addresses import registries_arg
    from fedswarm.common.model import load_tokenizer, parse_model

    if args.model:
        args.model = parse_model(args.model).model_id
    if args.adapter:
        from fedswarm.common.adapter_digest import adapter_id, check_adapter_folder

        args.adapter_id = adapter_id(check_adapter_folder(args.adapter))
    # the registries first: their errors should not wait for torch to import
    client = SwarmClient(
        registries_arg(args.registry),
        security_of(args, client=True),  # type: ignore[arg-type]
        args.model,
        args.adapter_id,
        adapter=args.lora,
    )
    client.adapter_version()  # an unknown adapter name fails here, before the model loads
    import torch

    from fedswarm.client.swarm.head import load_head
    from fedswarm.client.swarm.model import SwarmModel

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    spec = parse_model(client.swarm.model_id)
    return client, SwarmModel(client, load_head(spec)), load_tokenizer(spec)


def run_generate(args: argparse.Namespace) -> int:
    from fedswarm.client.swarm.textgen import chat_prompt, encode, eos_token_ids, generate_text
    from fedswarm.common.model import parse_model

    client, model, tokenizer = _connect(args)
    text = chat_prompt(tokenizer, [{"role": "user", "content": args.prompt}]) if args.chat else args.prompt

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    eos = eos_token_ids(parse_model(client.swarm.model_id), tokenizer)
    try:
        result = generate_text(model, tokenizer, encode(tokenizer, text), args.max_new_tokens, eos, on_text=show)
    finally:
        client.close()
    sys.stdout.write("\n")
    rate = result.completion_tokens / max(result.elapsed_s, 1e-9)
    print(f"{result.completion_tokens} tokens, {rate:.1f} tokens/s over {result.hops} hops", file=sys.stderr)
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    from fedswarm.client.swarm.model import perplexity
    from fedswarm.common.batches import encode
    from fedswarm.common.data import load_examples

    examples = load_examples(args.data, args.max_samples)
    client, model, tokenizer = _connect(args)
    encoded = [encode(tokenizer, example, args.max_seq_len) for example in examples]
    try:
        nll, count = model.answer_nll([(e.input_ids, e.prompt_len) for e in encoded], args.batch_size)
    finally:
        client.close()
    print(f"perplexity {perplexity(nll, count):.3f} over {count} answer tokens of {len(encoded)} records")
    return 0
