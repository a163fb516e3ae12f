"""Greedy decoding through a 3-server swarm on localhost against the same model in one process.

A registry and three block servers (blocks 0:10, 10:20, 20:30 of SmolLM2-135M) run as
separate processes; the client runs embeddings and LM head. Local and swarm generations
alternate (same prompt, same thread count) so background load hits both alike. Per-hop
overhead is the time a step spends in the swarm minus the servers' own compute, per hop
(serialisation, gRPC, the loopback network, thread hand-offs).
"Local span code" runs the servers' block code and the client's head in one process (no network).
Memory: a server of blocks 0:15 against one of 0:30 (weights and resident set).
Continuous batching: aggregate tokens/s of 1, 4 and 8 concurrent greedy streams through the
same servers, and each stream's median inter-token latency. Adapters: one stream through
servers applying a random rank-8 LoRA unmerged (``--adapter bench=DIR``, per request) against
servers with the same adapter merged (``--adapter DIR``, on their own registry). Security: one
stream through the plaintext (``--insecure``) servers against one through the same split served
with mutual TLS (certificates from ``fedswarm certs``, the token on top), on their own registry.
HTTP API: one greedy completion streamed through ``fedswarm swarm api`` with the ``openai``
client against ``fedswarm swarm generate``, on the same servers.

    .venv/bin/python bench/swarm.py [--tokens 32] [--repeats 3] [--threads 2] [--streams 1,4,8] [--no-tls]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedswarm.common.processes import free_port

PROMPT = "The capital of France is"
INSECURE = ["--insecure"]  # the plaintext swarm; compare_tls starts a mutual-TLS one
SPLIT = ("0:10", "10:20", "20:30")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=3, help="generations of each kind, interleaved")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the client, local model and servers")
    parser.add_argument("--streams", default="1,4,8", help="concurrent stream counts to measure ('' skips)")
    parser.add_argument("--no-adapters", action="store_true", help="skip the unmerged-vs-merged adapter comparison")
    parser.add_argument("--no-tls", action="store_true", help="skip the mutual-TLS-vs-plaintext comparison")
    parser.add_argument("--only-tls", action="store_true", help="only the mutual-TLS-vs-plaintext comparison")
    parser.add_argument("--only-streams", action="store_true", help="only the concurrent streams")
    parser.add_argument("--no-api", action="store_true", help="skip the HTTP-API-vs-CLI comparison")
    parser.add_argument("--only-api", action="store_true", help="only the HTTP-API-vs-CLI comparison")
    args = parser.parse_args()

    # Idle OpenMP threads must not spin while another process of the pipeline computes; the
    # local model gets the same policy (set before torch loads) so the comparison is fair.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        procs: list[subprocess.Popen] = []
        try:
            if args.only_tls:
                args.no_adapters, args.streams = True, ""
            if args.only_streams:
                args.no_adapters, args.no_tls, args.no_api = True, True, True
            if args.only_api:
                args.no_adapters, args.no_tls, args.streams = True, True, ""
            if args.only_tls:
                args.no_api = True
            alone = args.only_tls or args.only_streams or args.only_api
            memory = {} if alone else measure_memory(Path(tmp), args.model, env, procs)
            adapter = None if args.no_adapters else make_adapter(Path(tmp) / "adapter", args.model)
            unmerged = [f"--adapter=bench={adapter}"] if adapter else []
            registry = start(Path(tmp), "reg", ["registry", "--port", str(free_port()), *INSECURE], env, procs)
            servers = []
            for i, span in enumerate(SPLIT):
                serve = [*serve_args(registry, args.model, span, args.threads), *unmerged, *INSECURE]
                servers.append(start(Path(tmp), f"s{i}", serve, env, procs))
            wait_listed(registry, len(servers))
            if not alone:
                report(run(args, registry), memory, args)
            counts = [int(n) for n in args.streams.split(",") if n]
            if counts:
                report_streams(concurrent_streams(args, registry, counts))
            if adapter is not None:
                mreg = start(Path(tmp), "mreg", ["registry", "--port", str(free_port()), *INSECURE], env, procs)
                for i, span in enumerate(SPLIT):
                    merged = [*serve_args(mreg, args.model, span, args.threads), f"--adapter={adapter}", *INSECURE]
                    start(Path(tmp), f"m{i}", merged, env, procs)
                wait_listed(mreg, len(SPLIT))
                report_adapters(compare_adapters(args, registry, mreg))
            if not args.no_tls:
                report_tls(compare_tls(args, Path(tmp), registry, env, procs))
            if not args.no_api:
                report_api(compare_api(args, Path(tmp), registry, env, procs))
        finally:
            stop(procs)


def run(args: argparse.Namespace, registry: str) -> dict[str, list[float]]:
    from fedswarm.client.swarm.client import SwarmClient
    from fedswarm.client.swarm.head import load_head
    from fedswarm.client.swarm.model import SwarmModel
    from fedswarm.common.model import load_model, load_tokenizer, parse_model
    from fedswarm.server.swarm.blocks import load_span, num_blocks

    spec = parse_model(args.model)
    tokenizer = load_tokenizer(spec)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    local = load_model(spec)
    whole = load_span(spec, 0, num_blocks(spec))  # the servers' code, in this process: no network
    client = SwarmClient([registry])
    swarm = SwarmModel(client, load_head(spec))
    out: dict[str, list[float]] = {"local": [], "blocks": [], "swarm": [], "hop_ms": [], "server_ms": [], "head_ms": []}
    try:
        local_greedy(local, ids, 4)  # warm-up both paths
        swarm.generate(ids, 4)
        for _ in range(args.repeats):
            tokens, step_s = local_greedy(local, ids, args.tokens)
            out["local"].append(statistics.median(step_s[1:]))
            if span_greedy(whole, swarm.head, ids, args.tokens, out["blocks"]) != tokens:
                raise SystemExit("the in-process span differs from the local model")
            result = swarm.generate(ids, args.tokens)
            if result.tokens != tokens:
                raise SystemExit(f"swarm tokens {result.tokens} differ from local {tokens}")
            out["swarm"].append(statistics.median(result.step_s[1:]))
            out["server_ms"].append(statistics.median(result.server_ms[1:]))
            hops = zip(result.remote_s[1:], result.server_ms[1:], strict=True)
            out["hop_ms"].append(statistics.median((s * 1e3 - ms) / result.hops for s, ms in hops))
            out["head_ms"].append(
                statistics.median((a - b) * 1e3 for a, b in zip(result.step_s, result.remote_s, strict=True))
            )
        print(f"text: {PROMPT!r} -> {tokenizer.decode(tokens)!r}")
        print(f"route: {', '.join(f'{h.address} [{h.start}:{h.end}]' for h in client.plan())}")
    finally:
        client.close()
    return out


def concurrent_streams(args: argparse.Namespace, registry: str, counts: list[int]) -> dict[int, tuple[float, float]]:
    """Per stream count: aggregate tokens/s of that many concurrent greedy streams, and their inter-token latency."""
    import threading

    from fedswarm.client.swarm.client import SwarmClient
    from fedswarm.client.swarm.head import load_head
    from fedswarm.client.swarm.model import SwarmModel
    from fedswarm.common.model import load_tokenizer, parse_model

    spec = parse_model(args.model)
    ids = load_tokenizer(spec)(PROMPT, add_special_tokens=False)["input_ids"]
    head = load_head(spec)
    out: dict[int, tuple[float, float]] = {}

    def stream(client: SwarmClient, barrier: threading.Barrier, results: list, i: int) -> None:
        barrier.wait()
        results[i] = SwarmModel(client, head).generate(ids, args.tokens, keep_logits=False)

    for count in counts:
        rates, latencies = [], []
        for _ in range(args.repeats):
            clients = [SwarmClient([registry]) for _ in range(count)]
            results: list = [None] * count
            barrier = threading.Barrier(count + 1)
            threads = [threading.Thread(target=stream, args=(clients[i], barrier, results, i)) for i in range(count)]
            for thread in threads:
                thread.start()
            barrier.wait()
            begin = time.perf_counter()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - begin
            for client in clients:
                client.close()
            if len({tuple(r.tokens) for r in results}) != 1:
                raise SystemExit(f"{count} concurrent streams gave different tokens")
            rates.append(sum(len(r.tokens) for r in results) / wall)
            latencies.append(statistics.median(s for r in results for s in r.step_s[1:]))
        out[count] = (statistics.median(rates), statistics.median(latencies))
    return out


def compare_adapters(args: argparse.Namespace, registry: str, merged_registry: str) -> dict[str, float]:
    """Median seconds per token of one stream with the adapter unmerged (per request) and merged; same tokens."""
    from fedswarm.client.swarm.client import SwarmClient

    clients = {"unmerged": SwarmClient([registry], adapter="bench"), "merged": SwarmClient([merged_registry])}
    return compare_streams(args, clients)


def compare_tls(args: argparse.Namespace, folder: Path, registry: str, env: dict, procs: list) -> dict[str, float]:
    """The same split served with mutual TLS and the token (certificates from `fedswarm certs`) against the
    plaintext servers: median seconds per token of one stream each, interleaved; same tokens."""
    from fedswarm.client.swarm.client import SwarmClient
    from fedswarm.common.security.certificates import issue_certificate, make_certificates
    from fedswarm.common.security.transport import Security

    certs = folder / "certs"
    make_certificates(certs, ["127.0.0.1"])
    for kind, name, hosts in (("server", "registry", ["127.0.0.1"]), ("server", "blocks", ["127.0.0.1"])):
        issue_certificate(certs, kind, name, hosts)
    issue_certificate(certs, "client", "app", [])

    def tls(name: str) -> list[str]:
        return ["--tls-ca", f"{certs}/ca.crt", "--tls-cert", f"{certs}/{name}.pem", "--tls-key", f"{certs}/{name}.key"]

    tls_env = {**env, "FEDSWARM_SWARM_TOKEN": "bench-token"}
    treg = start(folder, "treg", ["registry", "--port", str(free_port()), *tls("registry")], tls_env, procs)
    for i, span in enumerate(SPLIT):
        start(folder, f"t{i}", [*serve_args(treg, args.model, span, args.threads), *tls("blocks")], tls_env, procs)
    app = Security("bench-token", certs / "ca.crt", certs / "app.pem", certs / "app.key")
    wait_listed(treg, len(SPLIT), app)
    return compare_streams(args, {"plaintext": SwarmClient([registry]), "mutual TLS": SwarmClient([treg], app)})


def compare_api(args: argparse.Namespace, folder: Path, registry: str, env: dict, procs: list) -> dict[str, float]:
    """Tokens/s of one greedy completion streamed through `fedswarm swarm api` (the `openai` client, from the
    request to the last chunk) and of `fedswarm swarm generate` (its own figure: start to last token),
    interleaved; both must give the same text."""
    import openai

    url = start(folder, "api", ["api", "--registry", registry, "--port", "0", "--threads", str(args.threads),
                                *INSECURE], env, procs)  # fmt: skip
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    cli = [sys.executable, "-m", "fedswarm.common.cli", "swarm", "generate", "--registry", registry, *INSECURE]
    cli += ["--threads", str(args.threads), "--max-new-tokens", str(args.tokens), PROMPT]

    def through_api() -> tuple[str, float]:
        begin, text, count = time.perf_counter(), "", 0
        stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=args.tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True})  # fmt: skip
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        return text, count / (time.perf_counter() - begin)

    def through_cli() -> tuple[str, float]:
        done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=600, check=True)
        rate = float(re.search(r"tokens, ([\d.]+) tokens/s", done.stderr).group(1))  # type: ignore[union-attr]
        return done.stdout.removesuffix("\n"), rate

    through_api()  # warm-up: the API loads its head and tokenizer on the first request
    rates: dict[str, list[float]] = {"api": [], "cli": []}
    for _ in range(args.repeats):
        (api_text, api_rate), (cli_text, cli_rate) = through_api(), through_cli()
        if api_text != cli_text:
            raise SystemExit(f"the API's text {api_text!r} differs from the CLI's {cli_text!r}")
        rates["api"].append(api_rate)
        rates["cli"].append(cli_rate)
    return {name: statistics.median(values) for name, values in rates.items()}


def compare_streams(args: argparse.Namespace, clients: dict) -> dict[str, float]:
    """Median seconds per token of one stream through each client's swarm, interleaved; the tokens must agree."""
    from fedswarm.client.swarm.head import load_head
    from fedswarm.client.swarm.model import SwarmModel
    from fedswarm.common.model import load_tokenizer, parse_model

    spec = parse_model(args.model)
    ids = load_tokenizer(spec)(PROMPT, add_special_tokens=False)["input_ids"]
    head = load_head(spec)
    models = {name: SwarmModel(client, head) for name, client in clients.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for model in models.values():
            model.generate(ids, 4)  # warm-up
        for _ in range(args.repeats):
            tokens = {}
            for name, model in models.items():  # interleaved, so background load hits both alike
                result = model.generate(ids, args.tokens)
                times[name].append(statistics.median(result.step_s[1:]))
                tokens[name] = result.tokens
            if len({tuple(t) for t in tokens.values()}) != 1:
                raise SystemExit(f"the swarms disagree on the tokens: {tokens}")
    finally:
        for client in clients.values():
            client.close()
    return {name: statistics.median(values) for name, values in times.items()}


def make_adapter(folder: Path, model: str) -> Path:
    """A rank-8 LoRA on every block linear with random, non-zero B (so applying it costs what a trained one does)."""
    import torch

    from fedswarm.common.lora_state import attach_lora
    from fedswarm.common.model import load_model

    peft_model = attach_lora(load_model(model), rank=8, alpha=16.0, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)
    peft_model.save_pretrained(folder)
    return folder


def local_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    import torch

    x, past, tokens, times = torch.tensor([ids]), None, [], []
    with torch.inference_mode():
        for _ in range(steps):
            begin = time.perf_counter()
            result = model(input_ids=x, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            times.append(time.perf_counter() - begin)
            tokens.append(token)
            x = torch.tensor([[token]])
    return tokens, times


def span_greedy(span, head, ids: list[int], steps: int, medians: list[float]) -> list[int]:
    """Greedy decoding with the block servers' code and the client's head, all in this process."""
    import torch

    cache = span.new_cache(span.start, span.end, 1, len(ids) + steps)
    x, tokens, times = torch.tensor([ids]), [], []
    for _ in range(steps):
        begin = time.perf_counter()
        hidden = span.forward(head.embed(x), span.start, span.end, cache)
        token = int(head.logits(hidden[:, -1])[0].argmax())
        times.append(time.perf_counter() - begin)
        tokens.append(token)
        x = torch.tensor([[token]])
    medians.append(statistics.median(times[1:]))
    return tokens


def measure_memory(folder: Path, model: str, env: dict, procs: list) -> dict[str, tuple[float, float]]:
    """Weights (MiB, from the server's log) and resident set (MiB) of a half-span and a full-span server."""
    registry = start(folder, "memreg", ["registry", "--port", str(free_port()), *INSECURE], env, procs)
    out = {}
    for name, span in (("half 0:15", "0:15"), ("full 0:30", "0:30")):
        log_name = f"mem{span.replace(':', '_')}"
        start(folder, log_name, [*serve_args(registry, model, span, 1), *INSECURE], env, procs)
        proc = procs[-1]
        text = (folder / f"{log_name}.log").read_text()
        weights = float(re.search(r"([\d.]+) MiB of weights", text).group(1))
        rss = rss_mib(proc.pid)
        proc.terminate()
        proc.wait(timeout=10)
        out[name] = (weights, rss)
    return out


def serve_args(registry: str, model: str, span: str, threads: int) -> list[str]:
    return ["serve", "--registry", registry, "--model", model, "--blocks", span, "--threads", str(threads)]


def start(folder: Path, name: str, args: list[str], env: dict, procs: list) -> str:
    """Start ``fedswarm swarm ARGS`` and wait for its ready line; returns the address it printed."""
    log = folder / f"{name}.log"
    cmd = [sys.executable, "-m", "fedswarm.common.cli", "swarm", *args]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    procs.append(proc)
    deadline = time.monotonic() + 300
    while not (match := re.search(r"ready on (\S+)", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} failed to start:\n{log.read_text()}")
        time.sleep(0.2)
    return match.group(1)


def wait_listed(registry: str, count: int, security: object = None) -> None:
    from fedswarm.client.swarm.discovery import list_servers
    from fedswarm.common.security.transport import Security

    while len(list_servers([registry], security or Security())) < count:  # type: ignore[arg-type]
        time.sleep(0.2)


def stop(procs: list[subprocess.Popen]) -> None:
    """Servers first (they withdraw from the registry), then the registries; kill what lingers."""
    for proc in sorted(procs, key=lambda p: "registry" in p.args):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(timing: dict[str, list[float]], memory: dict[str, tuple[float, float]], args) -> None:
    local = statistics.median(timing["local"])
    swarm = statistics.median(timing["swarm"])
    print(f"threads per process: {args.threads}; {args.tokens} new tokens; median over {args.repeats} interleaved runs")
    blocks = statistics.median(timing["blocks"])
    print(f"local HF model          : {1 / local:7.1f} tokens/s ({local * 1e3:.1f} ms/token)")
    print(f"local span code, 0 hops : {1 / blocks:7.1f} tokens/s ({blocks * 1e3:.1f} ms/token)")
    print(f"swarm, 3 hops           : {1 / swarm:7.1f} tokens/s ({swarm * 1e3:.1f} ms/token)")
    print(f"ratio swarm/local HF: {local / swarm:.2f}; swarm/local span code: {blocks / swarm:.2f} (goal >= 0.70)")
    print(
        f"per step: servers compute {statistics.median(timing['server_ms']):.1f} ms, client head "
        f"{statistics.median(timing['head_ms']):.1f} ms, overhead {statistics.median(timing['hop_ms']):.2f} ms per hop"
    )
    (hw, hr), (fw, fr) = memory["half 0:15"], memory["full 0:30"]
    print(f"memory: half-span server {hw:.1f} MiB weights / {hr:.0f} MiB RSS; full-span {fw:.1f} / {fr:.0f}")
    print(f"        weights ratio {hw / fw:.3f}; RSS ratio {hr / fr:.2f} (RSS includes ~the torch runtime)")


def report_streams(streams: dict[int, tuple[float, float]]) -> None:
    one_rate, one_latency = streams.get(1, next(iter(streams.values())))
    for count, (rate, latency) in streams.items():
        print(
            f"{count} concurrent stream(s)  : {rate:7.1f} tokens/s aggregate ({rate / one_rate:.2f}x one stream); "
            f"inter-token {latency * 1e3:.1f} ms ({latency / one_latency:.2f}x one stream's)"
        )
    print("goal: 8 streams >= 4x one stream's tokens/s, each stream's inter-token latency <= 2x")


def report_api(rates: dict[str, float]) -> None:
    print(f"fedswarm swarm generate : {rates['cli']:7.1f} tokens/s (start to last token)")
    print(f"HTTP API, streamed      : {rates['api']:7.1f} tokens/s (request to last chunk, openai client)")
    print(f"ratio API/CLI: {rates['api'] / rates['cli']:.2f} (goal >= 0.95)")


def report_tls(times: dict[str, float]) -> None:
    plain, secure = times["plaintext"], times["mutual TLS"]
    print(f"swarm, --insecure       : {1 / plain:7.1f} tokens/s ({plain * 1e3:.1f} ms/token)")
    print(f"swarm, mutual TLS+token : {1 / secure:7.1f} tokens/s ({secure * 1e3:.1f} ms/token)")
    print(f"ratio mutual TLS/plaintext: {plain / secure:.2f} (goal >= 0.95)")


def report_adapters(times: dict[str, float]) -> None:
    unmerged, merged = times["unmerged"], times["merged"]
    print(f"adapter merged          : {1 / merged:7.1f} tokens/s ({merged * 1e3:.1f} ms/token)")
    print(f"adapter unmerged        : {1 / unmerged:7.1f} tokens/s ({unmerged * 1e3:.1f} ms/token)")
    print(f"ratio unmerged/merged: {merged / unmerged:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
