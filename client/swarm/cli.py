"""``fedswarm swarm generate|perplexity``: querying the swarm from the command line."""

from __future__ import annotations

import argparse
import sys

from fedswarm.common.swarm_cli import add_security, security_of


def add_commands(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="greedy generation through the swarm")
    _client(generate)
    generate.add_argument("prompt", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.set_defaults(handler=run_generate)

    ppl = commands.add_parser("perplexity", help="perplexity of a dataset's answers through the swarm")
    _client(ppl)
    ppl.add_argument("--data", required=True, help="sarcasm, diabetes, or a .jsonl/.csv file")
    ppl.add_argument("--max-samples", type=int, default=64, help="records to score (0: all)")
    ppl.add_argument("--max-seq-len", type=int, default=128, help="tokens per record (prompt cut from the left)")
    ppl.add_argument("--batch-size", type=int, default=8, help="records per Forward call")
    ppl.set_defaults(handler=run_perplexity)


def _client(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", action="append", required=True, help="HOST:PORT; repeat for several registries")
    parser.add_argument("--model", default="", help="model to use (default: the one the servers announce)")
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--adapter-id", default=None, help="adapter to use ('' for none; default: the servers')")
    adapter.add_argument("--adapter", default=None, help="use servers that merged this PEFT adapter folder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_security(parser, server=False)


def _connect(args: argparse.Namespace) -> tuple[object, object, object]:
    """Client, model and tokenizer for the model the swarm serves."""
    from fedswarm.client.swarm.client import SwarmClient
    from fedswarm.common.addresses import registries_arg
    from fedswarm.common.model import load_tokenizer, parse_model

    if args.model:
        args.model = parse_model(args.model).model_id
    if args.adapter:
        from fedswarm.common.adapter_files import adapter_id, check_adapter_folder

        args.adapter_id = adapter_id(check_adapter_folder(args.adapter))
    # the registries first: their errors should not wait for torch to import
    client = SwarmClient(registries_arg(args.registry), security_of(args), args.model, args.adapter_id)  # type: ignore[arg-type]
    import torch

    from fedswarm.client.swarm.head import load_head
    from fedswarm.client.swarm.model import SwarmModel

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    spec = parse_model(client.swarm.model_id)
    return client, SwarmModel(client, load_head(spec)), load_tokenizer(spec)


def run_generate(args: argparse.Namespace) -> int:
    client, model, tokenizer = _connect(args)
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    else:
        text = args.prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]

    def show(token: int, _session: object) -> None:
        sys.stdout.write(tokenizer.decode([token]))  # type: ignore[attr-defined]
        sys.stdout.flush()

    try:
        result = model.generate(ids, args.max_new_tokens, tokenizer.eos_token_id, on_token=show)  # type: ignore[attr-defined]
    finally:
        client.close()  # type: ignore[attr-defined]
    sys.stdout.write("\n")
    rate = len(result.tokens) / max(sum(result.step_s), 1e-9)
    print(f"{len(result.tokens)} tokens, {rate:.1f} tokens/s over {result.hops} hops", file=sys.stderr)
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    from fedswarm.client.swarm.model import perplexity
    from fedswarm.common.batches import encode
    from fedswarm.common.data import load_examples

    examples = load_examples(args.data, args.max_samples)
    client, model, tokenizer = _connect(args)
    encoded = [encode(tokenizer, example, args.max_seq_len) for example in examples]
    try:
        nll, count = model.answer_nll([(e.input_ids, e.prompt_len) for e in encoded], args.batch_size)  # type: ignore[attr-defined]
    finally:
        client.close()  # type: ignore[attr-defined]
    print(f"perplexity {perplexity(nll, count):.3f} over {count} answer tokens of {len(encoded)} records")
    return 0
