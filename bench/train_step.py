"""Examples per second of a local training step: fedswarm's against a plain PEFT loop, side by side.

Both train the same LoRA (rank 8, every linear layer of the default model) with AdamW on the
same examples in the same order, batch 8, fp32, two threads. The plain loop is what a PEFT
user writes: whole rows padded to the batch's longest, ``model(..., labels=labels)`` (the
LM head over every position). fedswarm's step runs the system prompt every row shares once
(``fedswarm.common.prefix``), the suffixes sorted into micro-batches, and the LM head on
answer positions only. The two rounds alternate, so drift in the machine's speed hits both.

    .venv/bin/python bench/train_step.py [--steps 12 --repeats 3 --data sarcasm]

Also prints the held-out evaluation's examples per second: today's batched whole rows
(batch 16, in data order) against the sorted, prefix-shared evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any


def plain_peft_steps(model: Any, tokenizer: Any, examples: Sequence[Any], steps: int, batch: int, lr: float) -> float:
    """Seconds for ``steps`` steps of the plain loop."""
    import torch

    from fedswarm.common.batches import collate, encode

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        rows = [encode(tokenizer, e, 256) for e in examples[step * batch : (step + 1) * batch]]
        encoded = collate(rows, int(tokenizer.pad_token_id))
        loss = model(**encoded).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def fedswarm_steps(model: Any, tokenizer: Any, examples: Sequence[Any], steps: int, batch: int, lr: float) -> float:
    from fedswarm.client.trainer.local_train import draw_order, train_lora

    # train_lora draws its batches by a seeded permutation; hand it the examples in that order's inverse
    # so that it trains on exactly the plain loop's batches
    pool = list(examples[: steps * batch])
    order = draw_order(pool, len(pool), seed=0)
    arranged: list[Any] = [None] * len(pool)
    for slot, index in enumerate(order.tolist()):
        arranged[index] = pool[slot]
    return train_lora(model, tokenizer, arranged, steps, batch, lr, 256, seed=0, precision="fp32").seconds


def plain_eval(model: Any, tokenizer: Any, examples: Sequence[Any], batch: int = 16) -> float:
    """Seconds of the evaluation before this change: whole rows, batch 16, in data order."""
    import torch

    from fedswarm.common.batches import answer_logits, collate, encode

    started = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(examples), batch):
            rows = [encode(tokenizer, e, 256) for e in examples[start : start + batch]]
            logits, targets = answer_logits(model, collate(rows, int(tokenizer.pad_token_id)))
            torch.nn.functional.cross_entropy(logits, targets)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sarcasm")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-examples", type=int, default=400)
    args = parser.parse_args()

    import torch

    from fedswarm.common.evaluate import score_examples
    from fedswarm.common.lora_state import attach_lora
    from fedswarm.common.model import load_model, load_tokenizer
    from fedswarm.common.splits import run_records

    torch.set_num_threads(2)
    tokenizer = load_tokenizer("smollm2-135m")
    records, split = run_records(args.data, 0, 1000, 0)
    train = [records[i] for i in split.train[: args.steps * args.batch_size]]
    held = [records[i] for i in split.holdout[: args.eval_examples]]
    model = attach_lora(load_model("smollm2-135m"), 8, 16.0, seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def reset() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(start[n])

    n = args.steps * args.batch_size
    print(f"CPU threads 2; {args.steps} steps of batch {args.batch_size} on {args.data}, fp32, LoRA rank 8")
    plain_eps, ours_eps = [], []
    for repeat in range(args.repeats):
        reset()
        plain = plain_peft_steps(model, tokenizer, train, args.steps, args.batch_size, 2e-3)
        reset()
        ours = fedswarm_steps(model, tokenizer, train, args.steps, args.batch_size, 2e-3)
        plain_eps.append(n / plain)
        ours_eps.append(n / ours)
        print(
            f"  repeat {repeat}: plain PEFT {n / plain:6.2f} ex/s   fedswarm {n / ours:6.2f} ex/s   x{plain / ours:.2f}"
        )  # noqa: E501
    ratio = statistics.median(o / p for o, p in zip(ours_eps, plain_eps, strict=True))
    print(f"training: fedswarm step / plain PEFT loop, examples per second: x{ratio:.2f} (median of {args.repeats})")

    reset()
    ratios = []
    for repeat in range(args.repeats):
        before = plain_eval(model, tokenizer, held)
        started = time.perf_counter()
        score_examples(model, tokenizer, held, 256)
        after = time.perf_counter() - started
        ratios.append(before / after)
        print(
            f"  repeat {repeat}: evaluation before {len(held) / before:6.2f} ex/s   "
            f"now {len(held) / after:6.2f} ex/s   x{before / after:.2f}"
        )
    print(f"evaluation: held-out examples per second, now / before: x{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
