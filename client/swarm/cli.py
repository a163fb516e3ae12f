"""``fedswarm swarm registry|serve|generate|perplexity``: the swarm from the command line."""

from __future__ import annotations

import argparse
import sys

SECURITY_HELP = "shared swarm token (default: $FEDSWARM_SWARM_TOKEN; empty disables the check)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from fedswarm.common.config import add_arguments
    from fedswarm.server.swarm.options import ServeOptions

    parser = sub.add_parser(
        "swarm",
        help="serve a model over a swarm of block servers, or query it",
        description="A registry, block servers holding spans of a model, and a client that routes through them.",
    )
    commands = parser.add_subparsers(dest="swarm_command", required=True, metavar="SWARM_COMMAND")

    registry = commands.add_parser("registry", help="run a registry of live block servers")
    registry.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    registry.add_argument("--port", type=int, default=0, help="port (0 picks a free one and prints it)")
    _security(registry, server=True)
    registry.set_defaults(handler=run_registry)

    serve = commands.add_parser("serve", help="serve a span of decoder blocks")
    serve.add_argument("--registry", action="append", required=True, help="HOST:PORT; repeat for several registries")
    serve.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, or a local HF folder")
    serve.add_argument("--blocks", required=True, help="START:END, END exclusive (e.g. 0:15)")
    serve.add_argument("--adapter", help="PEFT LoRA folder to merge into the blocks (e.g. a run's adapter/)")
    add_arguments(serve, ServeOptions)
    _security(serve, server=True)
    serve.set_defaults(handler=run_serve)

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


def _security(parser: argparse.ArgumentParser, server: bool) -> None:
    parser.add_argument("--token", default=None, help=SECURITY_HELP)
    parser.add_argument("--tls-ca", help="CA certificate (PEM) that signed the swarm's server certificates")
    if server:
        parser.add_argument("--tls-cert", help="this server's certificate chain (PEM); enables TLS")
        parser.add_argument("--tls-key", help="this server's private key (PEM)")


def _client(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", action="append", required=True, help="HOST:PORT; repeat for several registries")
    parser.add_argument("--model", default="", help="model to use (default: the one the servers announce)")
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--adapter-id", default=None, help="adapter to use ('' for none; default: the servers')")
    adapter.add_argument("--adapter", default=None, help="use servers that merged this PEFT adapter folder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    _security(parser, server=False)


def _security_of(args: argparse.Namespace) -> object:
    from fedswarm.protos.transport import security_from_args

    return security_from_args(args.token, args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None))


def run_registry(args: argparse.Namespace) -> int:
    from fedswarm.server.swarm.registry import run_registry as run

    return run(args.host, args.port, _security_of(args))  # type: ignore[arg-type]


def run_serve(args: argparse.Namespace) -> int:
    from fedswarm.common.config import from_args
    from fedswarm.common.model import parse_model
    from fedswarm.server.swarm.adapter import check_adapter_folder
    from fedswarm.server.swarm.options import ServeConfig, ServeOptions
    from fedswarm.server.swarm.server import parse_blocks, registries_arg, run_server

    start, end = parse_blocks(args.blocks)
    cfg = ServeConfig(
        spec=parse_model(args.model),
        start=start,
        end=end,
        registries=registries_arg(args.registry),
        adapter=check_adapter_folder(args.adapter) if args.adapter else None,
        options=from_args(ServeOptions, args),
    )
    return run_server(cfg, _security_of(args))  # type: ignore[arg-type]


def _connect(args: argparse.Namespace) -> tuple[object, object, object]:
    """Client, model and tokenizer for the model the swarm serves."""
    from fedswarm.client.swarm.client import SwarmClient
    from fedswarm.common.model import load_tokenizer, parse_model
    from fedswarm.server.swarm.server import registries_arg

    if args.model:
        args.model = parse_model(args.model).model_id
    if args.adapter:
        from fedswarm.server.swarm.adapter import adapter_id, check_adapter_folder

        args.adapter_id = adapter_id(check_adapter_folder(args.adapter))
    # the registries first: their errors should not wait for torch to import
    client = SwarmClient(registries_arg(args.registry), _security_of(args), args.model, args.adapter_id)  # type: ignore[arg-type]
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
