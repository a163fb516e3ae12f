"""Federation overhead: one simulated round against the same LoRA steps in a plain PEFT loop.

Both sides train the same model on the same data for the same total number of steps
(clients x local steps, batch size, sequence length); they run one after the other
in this one invocation, so the ratio compares like with like on this machine.

    .venv/bin/python bench/federation_overhead.py [--model smollm2-135m] [--clients 4] [--local-steps 8]

Prints: plain-loop seconds, the simulated round's training wall time (send -> all
replies -> aggregated), their ratio, and each client's peak memory (RSS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def plain_loop(model: str, data: str, steps: int, batch_size: int, lr: float, max_len: int, threads: int) -> float:
    import torch

    from fedswarm.client.trainer.local_train import train_lora
    from fedswarm.common.data import load_examples
    from fedswarm.common.lora_state import attach_lora
    from fedswarm.common.model import load_model, load_tokenizer
    from fedswarm.common.splits import holdout_split

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model)
    peft_model = attach_lora(load_model(model), 8, 16.0, 0)
    records = load_examples(data)
    split = holdout_split(len(records), 200, 0)
    train = [records[i] for i in split.train]
    train_lora(peft_model, tokenizer, train, 1, batch_size, lr, max_len, seed=99, precision="auto")  # warm-up
    started = time.perf_counter()
    train_lora(peft_model, tokenizer, train, steps, batch_size, lr, max_len, seed=0, precision="auto")
    return time.perf_counter() - started


def simulated_round(args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", args.model, "--data", args.data,
        "--clients", str(args.clients), "--rounds", "1", "--local-steps", str(args.local_steps),
        "--batch-size", str(args.batch_size), "--eval-size", "16", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="sarcasm")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop (all cores)")
    args = parser.parse_args()
    total_steps = args.clients * args.local_steps
    with tempfile.TemporaryDirectory() as tmp:
        row = simulated_round(args, Path(tmp) / "run")
    plain = plain_loop(args.model, args.data, total_steps, args.batch_size, 2e-3, 128, args.threads)
    ratio = row["train_seconds"] / plain
    print(f"model {args.model}, {args.clients} clients x {args.local_steps} steps, batch {args.batch_size}")
    print(f"plain PEFT loop, one process, {args.threads} threads: {plain:8.1f} s for {total_steps} steps")
    print(f"simulated round (train phase):              {row['train_seconds']:8.1f} s")
    print(f"ratio round / plain loop:                   {ratio:8.3f}   (goal < 1.10)")
    for client in row["per_client"]:
        print(
            f"  client node {client['node']}: {client['seconds']:.1f} s training, "
            f"peak RSS {client['peak_rss_mb'] / 1024:.2f} GB (goal < 3 GB)"
        )


if __name__ == "__main__":
    main()
