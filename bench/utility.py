"""Held-out margin over the constant answer: centralised LoRA, the main job's recipe, plain ffa and the DP recipe.

Every variant sees the same example budget (clients x rounds x local steps x batch 8; the
DP recipe's expected private batch makes its own, printed beside it) on the same seed's
held-out split (``--eval-size``, 1,000 by default), so every federated figure is read
against centralised LoRA trained on the pooled data:

  centralised  one process, all training data, one AdamW run of clients x rounds x local steps steps
               (the main recipe's learning rate, or --central-lr's: the table reads against the best of them);
  main         the README's first command (``MAIN_RECIPE``);
  ffa          plain ffa (A frozen, no label balancing), the main job's rounds and steps;
  dp           plain ffa under local DP-SGD at epsilon 8, delta 1e-5 (the DP defaults).

The margin is held-out accuracy minus the held-out share of the commonest label (what always
answering it scores); its per-run standard error is binomial (on that seed's held-out
examples), and over seeds the standard error of the mean. Every (variant, seed) result is
appended to ``--results`` as soon as it is measured, so an interrupted bench loses nothing
and several invocations (one variant or seed each) add up to one table:

    .venv/bin/python bench/utility.py --seeds 0,1,2,3,4            # all four variants
    .venv/bin/python bench/utility.py --only centralised --seeds 0  # one of them
    .venv/bin/python bench/utility.py --summary                     # the table of what --results holds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The README's first command after `fedswarm simulate` (the data set, skew and model are the defaults' and
# --partition's); --eval-every 0 scores the held-out set once, after the last round.
MAIN_RECIPE = [
    "--partition", "dirichlet:0.5", "--aggregation", "ffa", "--balance-labels", "--rounds", "3", "--local-steps", "32",
    "--batch-size", "2", "--learning-rate", "2e-3", "--eval-every", "0",
]  # fmt: skip
PLAIN_FFA = ["--partition", "dirichlet:0.5", "--aggregation", "ffa", "--rounds", "3", "--local-steps", "32",
             "--batch-size", "2", "--learning-rate", "2e-3", "--eval-every", "0"]  # fmt: skip
BATCH_8 = ["--partition", "dirichlet:0.5", "--aggregation", "ffa", "--balance-labels", "--rounds", "3",
           "--local-steps", "8", "--batch-size", "8"]  # fmt: skip
VARIANTS: dict[str, list[str]] = {
    "main": MAIN_RECIPE,
    "ffa": PLAIN_FFA,
    # DP-SGD's expected private batch is its own (--dp-batch-size 32, in micro-batches of --batch-size 8)
    "dp": [*BATCH_8[:4], *BATCH_8[5:], "--learning-rate", "2e-3", "--eval-every", "0", "--dp", "--epsilon", "8",
           "--delta", "1e-5"],
    # recipes measured on the way (see the README's frontier): the same examples in batches of 8 (a quarter of
    # the sequential local steps) at learning rate 5e-3, and at 2e-3 with the server moving 4x the mean update
    "batch-8 lr 5e-3": [*BATCH_8, "--learning-rate", "5e-3", "--eval-every", "0"],
    "batch-8 server-lr 4": [*BATCH_8, "--learning-rate", "2e-3", "--server-lr", "4", "--eval-every", "0"],
}  # fmt: skip
CENTRAL_BATCH = 8
ORDER = ("centralised", "main", "ffa", "dp", "batch-8")
RESULTS = Path(__file__).parent / "results" / "utility.jsonl"


def option(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args else default


def budget(extra: list[str]) -> tuple[int, int, int]:
    """(rounds, local steps, batch) of a variant's arguments (simulate's defaults where absent)."""
    rounds, steps = int(option(extra, "--rounds", "3")), int(option(extra, "--local-steps", "12"))
    batch = int(option(extra, "--dp-batch-size", "32")) if "--dp" in extra else int(option(extra, "--batch-size", "8"))
    return rounds, steps, batch


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def centralised(args: argparse.Namespace) -> dict[str, Any]:
    """Plain LoRA on the pooled training data: the main job's example budget and learning rate, batch 8."""
    import torch

    from fedswarm.client.trainer.local_train import train_lora
    from fedswarm.common.config import FederationConfig
    from fedswarm.common.evaluate import evaluate
    from fedswarm.common.splits import run_records
    from fedswarm.server.coordinator.central_eval import CentralEvaluator

    torch.set_num_threads(2)
    lr = args.central_lr or float(option(MAIN_RECIPE, "--learning-rate", "2e-3"))
    cfg = FederationConfig(data=args.data, eval_size=args.eval_size, learning_rate=lr, seed=args.seed)
    evaluator = CentralEvaluator(cfg)
    records, split = run_records(cfg.data, cfg.max_samples, cfg.eval_size, cfg.seed)
    rounds, steps, batch = budget(MAIN_RECIPE)
    examples = args.clients * rounds * steps * batch  # the main job's budget, in plain LoRA's batches of 8
    trained = train_lora(
        evaluator.model, evaluator.tokenizer, [records[i] for i in split.train], examples // CENTRAL_BATCH,
        CENTRAL_BATCH, cfg.learning_rate, cfg.max_seq_len, cfg.seed, cfg.precision,
    )  # fmt: skip
    result = evaluate(evaluator.model, evaluator.tokenizer, evaluator.holdout, cfg.max_seq_len)
    return {
        "accuracy": result.accuracy, "margin": result.margin, "margin_se": result.margin_se, "loss": result.loss,
        "example_gradients": examples // CENTRAL_BATCH * CENTRAL_BATCH, "train_seconds": trained.seconds,
    }  # fmt: skip


def federated(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """One ``fedswarm simulate`` run; its final held-out figures from ``summary.json``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable, "-m", "fedswarm.common.cli", "simulate", "--data", args.data, "--clients",
            str(args.clients), "--eval-size", str(args.eval_size), "--seed", str(args.seed), "--out", str(out), *extra,
        ]  # fmt: skip
        log = Path(tmp) / "log.txt"
        with log.open("w", encoding="utf-8") as handle:
            done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            tail = log.read_text(encoding="utf-8").splitlines()[-5:]
            raise SystemExit(f"fedswarm simulate failed ({done.returncode}): {' | '.join(tail)}")
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    final = summary["final"]
    rounds, steps, batch = budget(extra)
    row = {
        "accuracy": final["eval_accuracy"], "margin": final["eval_margin"], "margin_se": final["eval_margin_se"],
        "loss": final["eval_loss"], "example_gradients": args.clients * rounds * steps * batch,
        "run_seconds": summary["seconds"],
    }  # fmt: skip
    if "privacy" in summary:
        row["epsilon"] = summary["privacy"]["local"]["epsilon_max"]
    return row


def measure(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    started = time.perf_counter()
    row = centralised(args) if variant == "centralised" else federated(args, VARIANTS[variant])
    if variant == "centralised" and args.central_lr:
        variant = f"centralised lr {args.central_lr:g}"
    row.update(
        variant=variant, seed=args.seed, eval_size=args.eval_size, wall_seconds=time.perf_counter() - started,
        args=VARIANTS.get(variant, []), cpu=cpu_model(),
    )  # fmt: skip
    return row


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan"))


def summary(rows: list[dict[str, Any]]) -> str:
    """Per variant: each seed's margin (± binomial se), the mean over seeds ± its se, and the ratio to centralised's."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:  # the last result of a (variant, seed) counts
        by.setdefault(row["variant"], {})[int(row["seed"])] = row
    central = [n for n in by if n.startswith("centralised")]  # the best centralised learning rate is the yardstick
    best = max(central, key=lambda n: statistics.fmean(r["margin"] for r in by[n].values()), default="")
    ref = by.get(best, {})
    lines = [
        "margin = held-out accuracy - the constant answer's (the held-out share of the commonest label); "
        "mean ± standard error over seeds",
        f"{'variant':<22} {'seeds':<11} {'mean margin':>15} {'/ centralised':>15} {'loss':>6} {'ex-grads':>8}"
        f" {'wall s':>7}  per seed (margin ± binomial se)",
    ]
    for name in sorted(by, key=lambda n: (ORDER.index(n.split()[0]) if n.split()[0] in ORDER else len(ORDER), n)):
        seeds = sorted(by[name])
        margins = [by[name][s]["margin"] for s in seeds]
        m, se = mean_se(margins)
        common = [s for s in seeds if s in ref]
        ratio = "-"
        if not name.startswith("centralised") and common:
            (a, sa) = mean_se([by[name][s]["margin"] for s in common])
            (b, sb) = mean_se([ref[s]["margin"] for s in common])
            if b > 0 and len(common) > 1:
                ratio = f"{a / b:.2f} ± {abs(a / b) * ((sa / (a or 1e-9)) ** 2 + (sb / b) ** 2) ** 0.5:.2f}"
            elif b > 0:
                ratio = f"{a / b:.2f}"
        per_seed = ", ".join(f"s{s} {by[name][s]['margin']:+.3f}±{by[name][s]['margin_se']:.3f}" for s in seeds)
        loss = statistics.fmean(by[name][s]["loss"] for s in seeds)
        wall = statistics.fmean(by[name][s]["wall_seconds"] for s in seeds)
        lines.append(
            f"{name:<22} {','.join(map(str, seeds)):<11} {m:>+8.3f} ± {se:.3f} {ratio:>15} {loss:>6.3f}"
            f" {by[name][seeds[0]]['example_gradients']:>8} {wall:>7.0f}  {per_seed}"
        )
    cpus = sorted({row.get("cpu", "?") for row in rows})
    held = sorted({row["eval_size"] for row in rows})
    lines.append(f"/ centralised: the ratio of mean margins to {best or 'centralised'}'s on the same seeds")
    lines.append(f"held-out examples per seed: {', '.join(map(str, held))}; measured on: {'; '.join(cpus)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sarcasm")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument(
        "--central-lr", type=float, default=0.0, help="centralised's learning rate (0: the main recipe's)"
    )
    parser.add_argument("--seeds", default="0", help="comma-separated: held-out split, partitions, init, batch order")
    parser.add_argument(
        "--only", default="centralised,main,ffa,dp", help="comma-separated: centralised or a name in VARIANTS"
    )
    parser.add_argument("--results", default=str(RESULTS), help="JSON-lines file every result is appended to")
    parser.add_argument("--summary", action="store_true", help="only print the table of what --results holds")
    args = parser.parse_args()
    wanted = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = [v for v in wanted if v != "centralised" and v not in VARIANTS]
    if unknown:
        choices = ", ".join(["centralised", *VARIANTS])
        raise SystemExit(f"--only: unknown variant(s) {', '.join(unknown)}; choose from {choices}")
    results = Path(args.results)
    if not args.summary:
        results.parent.mkdir(parents=True, exist_ok=True)
        for seed in [int(s) for s in args.seeds.split(",")]:
            args.seed = seed
            for variant in wanted:
                row = measure(args, variant)
                with results.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(
                    f"{variant} seed {seed}: accuracy {row['accuracy']:.3f}, margin {row['margin']:+.3f} ± "
                    f"{row['margin_se']:.3f}, loss {row['loss']:.3f}, {row['wall_seconds']:.0f} s",
                    flush=True,
                )
    if results.is_file():
        print(summary([json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line]))


if __name__ == "__main__":
    main()
