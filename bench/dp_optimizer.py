"""DP optimiser choice: AdamW against SGD (momentum) on one label-skewed node, same private steps.

One node's shard of the utility bench's split (SmolLM2-135M, sarcasm, Dirichlet 0.5, seed 0),
trained alone with the DP defaults (expected private batch 32 in micro-batches of 8, rank 2,
B only as under ffa, balanced per-label rates, noise for epsilon 8 over the steps by PRV);
each optimiser's held-out loss and accuracy on the run's held-out split after the same steps.

    .venv/bin/python bench/dp_optimizer.py [--steps 24] [--node 0] [--seed 0] [--eval-size 200]
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> None:
    import torch

    from fedswarm.client.trainer.privacy import Accountant, DpSettings, noise_generator, sample_rates, train_lora_dp
    from fedswarm.client.trainer.runtime import lora_model, simulated_shard
    from fedswarm.common.accounting import calibrate_noise
    from fedswarm.common.config import FederationConfig
    from fedswarm.common.evaluate import constant_answer, evaluate
    from fedswarm.common.lora_state import adapter_state, load_adapter_state
    from fedswarm.common.splits import run_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--node", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", default="adam:0.002,sgd:0.5,sgd:2.0", help="OPTIMIZER:LR,...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = FederationConfig(
        model=args.model, partition="dirichlet:0.5", seed=args.seed, eval_size=args.eval_size, dp=True, epsilon=8.0,
        balance_labels=True, aggregation="ffa",
    )  # fmt: skip
    shard = simulated_shard({"partition-id": args.node, "num-partitions": 4}, cfg, cfg.data)
    records, split = run_records(cfg.data, cfg.max_samples, cfg.eval_size, cfg.seed)
    holdout = [records[i] for i in split.holdout]
    loaded = lora_model(cfg.model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_("lora_B" in name)
    start = {k: v.clone() for k, v in adapter_state(model).items()}
    rates = sample_rates(shard.train, cfg.dp_batch_size, balance=True)
    q = float(rates.max())
    sigma = calibrate_noise(8.0, 1e-5, q, args.steps, "prv")
    labels = dict(Counter(e.label for e in shard.train))
    const = constant_answer(holdout)
    print(f"node {args.node} of seed {args.seed}: {len(shard.train)} examples {labels}, q {q:.4f}, sigma {sigma:.3f}")
    print(f"constant answer {const}; {args.steps} private steps of expected batch {rates.sum():.1f}")
    for recipe in args.recipes.split(","):
        name, lr = recipe.split(":")
        load_adapter_state(model, start)
        settings = DpSettings(sigma, cfg.max_grad_norm, 1e-5, 8.0, q, "prv", name, 0.9, cfg.batch_size)
        result = train_lora_dp(
            model, tokenizer, shard.train, args.steps, float(lr), cfg.max_seq_len, settings, Accountant(kind="prv"),
            args.seed, noise_generator(args.seed), rates=rates,
        )  # fmt: skip
        ev = evaluate(model, tokenizer, holdout, cfg.max_seq_len)
        print(
            f"{name:>4} lr {lr:>6}: train loss {result.loss:.3f}, held-out loss {ev.loss:.3f}, "
            f"accuracy {ev.accuracy:.3f} ({(ev.accuracy or 0) - (const[1] if const else 0):+.3f} vs constant), "
            f"epsilon {result.epsilon:.2f}, {result.seconds:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
