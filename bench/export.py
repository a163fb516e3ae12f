"""Edge export on the default model with a trained adapter: size, decode latency, agreement, perplexity.

    .venv/bin/python bench/export.py [--adapter RUN_DIR/adapter] [--out DIR] [--threads 2]

Without --adapter it first trains one (LoRA on the sarcasm training split, the federation's
held-out split untouched). Every variant is then exported and checked by the same code as
``fedswarm export``; latency is measured side by side in this process: per-token decode
(batch 1, KV cache, same prompt, same tokens) in onnxruntime against PyTorch eager on the
merged model, both with the same thread count, alternating, median of repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SIZE_GOALS = {"int8": 0.26, "q4": 0.39, "q4f16": 0.24}
AGREEMENT_GOALS = {"int8": 0.95, "q4": 0.9}
PROMPT = [{"role": "user", "content": "Is this sarcastic? 'Oh great, another Monday. Just what I needed.'"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="a run's adapter/ folder (default: train one here)")
    parser.add_argument("--out", default=None, help="where to write the run and EDGE_DIR (default: a temp folder)")
    parser.add_argument("--train-steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="threads for training, export and parity")
    parser.add_argument(
        "--latency-threads", type=int, default=1, help="threads per runtime when timing (1: steady on shared cores)"
    )
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parity-samples", type=int, default=64, help="held-out texts (64: ~1350 distinct positions)")
    parser.add_argument("--calibration-samples", type=int, default=128, help="training texts for GPTQ")
    parser.add_argument("--parity-decode-steps", type=int, default=8, help="cached decode steps per parity text")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-export-"))
    adapter = Path(args.adapter) if args.adapter else train_adapter(root / "run", args.train_steps)
    edge = root / "edge"
    from fedswarm.client.edge import parity as parity_module
    from fedswarm.client.edge.export import export
    from fedswarm.client.edge.merge import resolve_adapter, resolve_model
    from fedswarm.client.edge.variants import DEFAULT_QUANT

    parity_module.DECODE_STEPS = args.parity_decode_steps
    run = resolve_adapter(str(adapter))
    spec = resolve_model(None, run)
    t0 = time.perf_counter()
    export(spec, run, edge, DEFAULT_QUANT, 0.0, args.parity_samples, 96, args.threads, args.calibration_samples)
    export_s = time.perf_counter() - t0
    parity = json.loads((edge / "parity.json").read_text())
    torch.set_num_threads(args.latency_threads)
    latency = decode_latency(spec, run, edge, args.latency_threads, args.decode_tokens, args.repeats)
    print_table(parity, latency, export_s, args)


def train_adapter(run_dir: Path, steps: int) -> Path:
    """A LoRA trained on the sarcasm training split, saved as a federated run would save it."""
    from fedswarm.client.trainer.local_train import train_lora
    from fedswarm.common.data import load_examples
    from fedswarm.common.lora_state import adapter_state, attach_lora, save_adapter
    from fedswarm.common.model import load_model, load_tokenizer
    from fedswarm.common.splits import holdout_split

    config = {"model": "smollm2-135m", "data": "sarcasm", "clients": 1, "rounds": 1, "eval_size": 200, "seed": 0}
    config |= {"lora_rank": 8, "lora_alpha": 16.0, "local_steps": steps, "partition": "iid", "max_samples": 0}
    records = load_examples("sarcasm")
    split = holdout_split(len(records), 200, 0)
    tokenizer = load_tokenizer("smollm2-135m")
    model = attach_lora(load_model("smollm2-135m"), rank=8, alpha=16.0, seed=0)
    precision = "auto"  # bf16 autocast where the CPU has it natively, else fp32
    t0 = time.perf_counter()
    result = train_lora(model, tokenizer, [records[i] for i in split.train], steps, 8, 2e-3, 128, 0, precision)
    print(f"trained the adapter: {steps} steps ({precision}), loss {result.loss:.3f}, {time.perf_counter() - t0:.0f} s")
    save_adapter(model, adapter_state(model), run_dir / "adapter")
    summary = {"config": config, "rounds": 1, "final": {"eval_loss": None, "eval_accuracy": None}}
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run_dir / "adapter"


def decode_latency(spec, run, edge: Path, threads: int, tokens: int, repeats: int) -> dict[str, float]:
    """Median ms per decoded token: each ONNX variant and PyTorch eager, same prompt and tokens."""
    import torch

    from fedswarm.client.edge.merge import merged_model
    from fedswarm.client.edge.runtime import OrtCausalLM
    from fedswarm.client.edge.variants import FILES
    from fedswarm.common.model import load_tokenizer

    tokenizer = load_tokenizer(spec)
    prompt = list(tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True))
    model = merged_model(spec, run)
    steps = list(range(1000, 1000 + tokens))  # fixed tokens: equal work whatever each variant would pick
    sessions = {v: OrtCausalLM(edge / "onnx" / f, threads) for v, f in FILES.items() if (edge / "onnx" / f).exists()}

    def ort_run(session: OrtCausalLM) -> float:
        session.reset()
        session.forward(prompt)
        t = time.perf_counter()
        for token in steps:
            session.forward([token])
        return (time.perf_counter() - t) / tokens * 1000

    def torch_run() -> float:
        with torch.no_grad():
            out = model(torch.tensor([prompt]), use_cache=True)
            past = out.past_key_values
            t = time.perf_counter()
            for token in steps:
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
            return (time.perf_counter() - t) / tokens * 1000

    times: dict[str, list[float]] = {name: [] for name in [*sessions, "pytorch"]}
    for session in sessions.values():  # warm-up
        ort_run(session)
    torch_run()
    for _ in range(repeats):
        for name, session in sessions.items():
            times[name].append(ort_run(session))
        times["pytorch"].append(torch_run())
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(parity: dict, latency: dict[str, float], export_s: float, args: argparse.Namespace) -> None:
    eager = latency["pytorch"]
    print(
        f"\nedge export of smollm2-135m + trained adapter ({export_s:.0f} s incl. parity on {parity['texts']} "
        f"held-out texts, {parity['positions']} positions; decode: {args.decode_tokens} tokens, "
        f"{args.latency_threads} thread(s) each, median of {args.repeats}; PyTorch eager {eager:.1f} ms/token)"
    )
    header = (
        "variant | size MB | x fp32 | decode ms/tok (ORT) | speed-up vs eager | next-token agreement "
        "| max/mean logit err | perplexity change"
    )
    print(header)
    print("-" * len(header))
    for name, v in parity["variants"].items():
        ms = latency.get(name, float("nan"))
        print(
            f"{name:7} | {v['size_bytes'] / 1e6:7.1f} | {v['size_vs_fp32']:6.4f} | {ms:19.1f} | {eager / ms:16.2f}x "
            f"| {v['next_token_agreement']:20.4f} | {v['max_logit_error']:.2f} / {v['mean_logit_error']:.3f} "
            f"| {v['perplexity_change'] * 100:+.2f}%"
        )
    print(f"pytorch | {'':7} | {'':6} | {eager:19.1f} (eager, merged fp32 model)")
    variants = parity["variants"]
    for name, limit in SIZE_GOALS.items():  # transformers.js' own files for Qwen2.5-0.5B-Instruct
        if name in variants:
            ratio = variants[name]["size_vs_fp32"]
            print(f"goal: {name} size {ratio:.4f} of fp32 <= {limit}: {'met' if ratio <= limit else 'MISSED'}")
    for name, floor in AGREEMENT_GOALS.items():
        if name in variants:
            agreement = variants[name]["next_token_agreement"]
            print(f"goal: {name} agreement {agreement:.4f} >= {floor}: {'met' if agreement >= floor else 'MISSED'}")
    if "int8" in latency:
        speed = eager / latency["int8"]
        print(f"goal: int8 decode {speed:.2f}x PyTorch eager >= 2: {'met' if speed >= 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
