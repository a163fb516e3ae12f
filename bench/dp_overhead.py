"""DP-SGD step cost against a plain LoRA step: same model, batch and sequence length.

Both steps run on the same fixed batch, interleaved, after a warm-up; the DP step
includes Opacus' per-sample gradients, per-sample clipping and the noise.

    .venv/bin/python bench/dp_overhead.py [--model smollm2-135m] [--batch-size 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    import torch

    from fedswarm.client.trainer.privacy import DpSettings, dp_components, noise_generator
    from fedswarm.common.batches import answer_loss, collate, encode, per_sample_answer_loss
    from fedswarm.common.data import load_examples
    from fedswarm.common.lora import attach_lora
    from fedswarm.common.model import load_model, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="sarcasm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    model = attach_lora(load_model(args.model), 8, 16.0, 0)
    examples = load_examples(args.data, max_samples=args.batch_size)
    batch = collate([encode(tokenizer, e, args.max_seq_len) for e in examples], int(tokenizer.pad_token_id))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    plain_opt = torch.optim.AdamW(params, lr=1e-4)

    def plain_step() -> float:
        started = time.perf_counter()
        answer_loss(model, batch).backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    settings = DpSettings(1.0, 1.0, 1e-5, 0.0, 0.01)
    gsm, dp_opt = dp_components(model, settings, args.batch_size, 1e-4, noise_generator(0))

    def dp_step() -> float:
        started = time.perf_counter()
        per_sample_answer_loss(model, batch).mean().backward()
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    # hooks stay registered for the plain step too; disable them while it runs
    plain, dp = [], []
    dp_step()
    gsm.disable_hooks()
    plain_step()
    for _ in range(args.repeats):
        gsm.disable_hooks()
        plain.append(plain_step())
        gsm.enable_hooks()
        dp.append(dp_step())
    gsm._close()
    p, d = statistics.median(plain), statistics.median(dp)
    tokens = int(batch["attention_mask"].sum())
    print(f"model {args.model}, batch {args.batch_size} ({tokens} tokens), {args.threads} threads")
    print(f"median of {args.repeats} interleaved steps each")
    print(f"plain LoRA step: {p * 1000:8.1f} ms")
    print(f"DP-SGD step:     {d * 1000:8.1f} ms")
    print(f"ratio DP / plain: {d / p:7.3f}   (goal < 1.5)")


if __name__ == "__main__":
    main()
