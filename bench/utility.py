"""Held-out accuracy gain over round 0: centralised LoRA vs federated fedavg / ffa / svd / ffa+DP.

Every variant trains the same model for the same total number of steps (clients x
rounds x local steps, same batch size) and is evaluated on the same held-out split:

  (a) centralised: one process, all training data, one AdamW run;
  (b) federated fedavg, non-IID (Dirichlet label skew);
  (c) ffa (A frozen at the shared seed);  (d) svd;
  (e) ffa with local DP-SGD at epsilon 8, delta 1e-5.

    .venv/bin/python bench/utility.py [--clients 4 --rounds 3 --local-steps 8 --partition dirichlet:0.5]

Prints the table and each gain's ratio to (a).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "(b) fedavg": ["--aggregation", "fedavg"],
    "(c) ffa": ["--aggregation", "ffa"],
    "(d) svd": ["--aggregation", "svd"],
    "(e) ffa + DP eps 8": ["--aggregation", "ffa", "--dp", "--epsilon", "8", "--delta", "1e-5"],
}


def centralised(args: argparse.Namespace) -> tuple[float, float, str]:
    """Round-0 and final held-out accuracy of plain LoRA on the pooled training data, and its held-out loss."""
    import torch

    from fedswarm.client.trainer.local_train import train_lora
    from fedswarm.common.config import FederationConfig
    from fedswarm.common.data import load_examples
    from fedswarm.common.evaluate import evaluate
    from fedswarm.common.splits import holdout_split
    from fedswarm.server.coordinator.central_eval import CentralEvaluator

    torch.set_num_threads(2)
    cfg = FederationConfig(
        model=args.model, data=args.data, eval_size=args.eval_size, learning_rate=args.learning_rate, seed=args.seed
    )
    evaluator = CentralEvaluator(cfg)
    start = evaluator(evaluator.initial_state())
    records = load_examples(cfg.data)
    train = [records[i] for i in holdout_split(len(records), cfg.eval_size, cfg.seed).train]
    steps = args.clients * args.rounds * args.local_steps
    model, tokenizer = evaluator.model, evaluator.tokenizer
    train_lora(
        model, tokenizer, train, steps, cfg.batch_size, cfg.learning_rate, cfg.max_seq_len, cfg.seed, cfg.precision
    )  # the precision the federated clients resolve too (fp32 on CPUs without native bf16)

    end = evaluate(evaluator.model, evaluator.tokenizer, evaluator.holdout, cfg.max_seq_len)
    return float(start.accuracy or 0.0), float(end.accuracy or 0.0), f"loss {start.loss:.3f} -> {end.loss:.3f}"


def federated(args: argparse.Namespace, extra: list[str], out: Path) -> tuple[dict, dict]:
    """The first (round 0) and last rows of a federated run's metrics.jsonl."""
    cmd = [
        sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", args.model, "--data", args.data,
        "--clients", str(args.clients), "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
        "--partition", args.partition, "--eval-size", str(args.eval_size), "--learning-rate", str(args.learning_rate),
        "--server-lr", str(args.server_lr), "--seed", str(args.seed), "--out", str(out), *extra,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[0], rows[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="sarcasm")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0, help="held-out split, partitions, adapter init, batch order")
    parser.add_argument("--server-lr", type=float, default=1.0, help="federated variants' server learning rate")
    parser.add_argument("--only", default="", help="comma-separated variant letters to run, e.g. a,b")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else set("abcde")

    results: dict[str, tuple[float, float, str]] = {}
    if "a" in wanted:
        before, after, note = centralised(args)
        results["(a) centralised"] = (before, after, note)
        print(f"(a) centralised: {before:.3f} -> {after:.3f} {note}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            if name[1] not in wanted:
                continue
            first, last = federated(args, extra, Path(tmp) / name[1])
            before, after = float(first["eval_accuracy"]), float(last["eval_accuracy"])
            note = f"loss {first['eval_loss']:.3f} -> {last['eval_loss']:.3f}"
            note += f", residual {last.get('aggregation_residual', 0):.2e}"
            note += f", epsilon {last['epsilon_max']:.2f}" if "epsilon_max" in last else ""
            results[name] = (before, after, note)
            print(f"{name}: {before:.3f} -> {after:.3f} {note}", flush=True)

    steps = args.clients * args.rounds * args.local_steps
    print(
        f"\n{args.model} on {args.data}, {steps} total steps, partition {args.partition}, {args.eval_size} held out,"
        f" server lr {args.server_lr:g}, seed {args.seed}"
    )
    print(f"{'variant':<22} {'round 0':>8} {'final':>8} {'gain':>8} {'gain / (a)':>11}  notes")
    base = results.get("(a) centralised")
    base_gain = base[1] - base[0] if base else None
    for name, (before, after, note) in results.items():
        gain = after - before
        ratio = f"{gain / base_gain:.2f}" if base_gain else "-"
        print(f"{name:<22} {before:>8.3f} {after:>8.3f} {gain:>8.3f} {ratio:>11}  {note}")
    dp, ffa = results.get("(e) ffa + DP eps 8"), results.get("(c) ffa")
    if dp and ffa and ffa[1] - ffa[0] > 0:
        print(f"DP keeps {(dp[1] - dp[0]) / (ffa[1] - ffa[0]):.2f} of the non-DP (ffa) gain (goal >= 0.75)")


if __name__ == "__main__":
    main()
