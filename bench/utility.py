"""Held-out accuracy gain over round 0: centralised LoRA vs federated fedavg / ffa / svd / ffa+DP.

Every variant trains the same model for the same total number of steps (clients x
rounds x local steps, same batch size) and is evaluated on the same held-out split:

  (a) centralised: one process, all training data, one AdamW run;
  (b) federated fedavg, non-IID (Dirichlet label skew);
  (c) ffa (A frozen at the shared seed);  (d) svd;
  (e) ffa with local DP-SGD at epsilon 8, delta 1e-5, the old recipe (expected batch 8, rank 8, RDP);
  (f) fedavg, (g) ffa and (h) ffa + DP eps 8, each with SCAFFOLD drift correction (--scaffold);
  (j) ffa with label-balanced local batches (--balance-labels);
  (i) centralised with the same examples in rounds x local steps steps of clients x batch size:
      what averaging IID clients approximates (as many sequential updates as the federation);
  (n), (l), (m) ffa with local DP at epsilon 8, 3 and 1 with the DP defaults (expected private
      batch 32 in micro-batches of 8, rank 2, AdamW, PRV);
  (k) the same at epsilon 8 with label-balanced per-label Poisson rates (--balance-labels).

Utility is read as the margin over the constant answer (accuracy minus the held-out share of
the commonest label on that seed's split): round 0 scores 0 only because the base model
never answers in the label format.

    .venv/bin/python bench/utility.py [--clients 4 --rounds 3 --local-steps 8 --partition dirichlet:0.5]
    .venv/bin/python bench/utility.py --only a,c,g --seeds 0,1   # a subset, over two seeds

Prints the table (per seed) and each gain's ratio to (a); over several seeds, each variant's
mean gain and its ratio to (a)'s mean gain (the goals' figure), with every seed's ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DP8 = ["--dp", "--epsilon", "8", "--delta", "1e-5"]
OLD_DP = ["--dp-batch-size", "8", "--lora-rank", "8", "--accountant", "rdp"]  # before the DP recipe
VARIANTS = {
    "(b) fedavg": ["--aggregation", "fedavg"],
    "(c) ffa": ["--aggregation", "ffa"],
    "(d) svd": ["--aggregation", "svd"],
    "(e) ffa + DP eps 8": ["--aggregation", "ffa", *DP8, *OLD_DP],
    "(f) fedavg + scaffold": ["--aggregation", "fedavg", "--scaffold"],
    "(g) ffa + scaffold": ["--aggregation", "ffa", "--scaffold"],
    "(h) ffa + scaffold + DP 8": ["--aggregation", "ffa", "--scaffold", *DP8, *OLD_DP],
    "(j) ffa + balanced labels": ["--aggregation", "ffa", "--balance-labels"],
    "(k) balanced ffa + DP 8": ["--aggregation", "ffa", "--balance-labels", *DP8],
    "(l) ffa + DP 3": ["--aggregation", "ffa", *DP8[:2], "3", *DP8[3:]],
    "(m) ffa + DP 1": ["--aggregation", "ffa", *DP8[:2], "1", *DP8[3:]],
    "(n) ffa + DP 8": ["--aggregation", "ffa", *DP8],
}
REFERENCE = "(j) ffa + balanced labels"  # the best non-DP federated variant: the DP goal's yardstick
DP_BATCH = 32  # FederationConfig's --dp-batch-size default, which the DP rows use
LARGE_BATCH = "(i) centralised, big batch"
DP_PAIRS = (("(e) ffa + DP eps 8", "(c) ffa"), ("(h) ffa + scaffold + DP 8", "(g) ffa + scaffold"))


def centralised(args: argparse.Namespace, large_batch: bool = False) -> tuple[float, float, str]:
    """Round-0 and final held-out accuracy of plain LoRA on the pooled training data, and its held-out loss.

    ``large_batch``: the same examples in ``clients`` times fewer, ``clients`` times larger
    steps (rounds x local steps of them), the trajectory that averaging IID clients approximates.
    """
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
    steps, batch = args.clients * args.rounds * args.local_steps, cfg.batch_size
    if large_batch:
        steps, batch = args.rounds * args.local_steps, cfg.batch_size * args.clients
    model, tokenizer = evaluator.model, evaluator.tokenizer
    train_lora(
        model, tokenizer, train, steps, batch, cfg.learning_rate, cfg.max_seq_len, cfg.seed, cfg.precision
    )  # the precision the federated clients resolve too (fp32 on CPUs without native bf16)

    end = evaluate(evaluator.model, evaluator.tokenizer, evaluator.holdout, cfg.max_seq_len)
    return float(start.accuracy or 0.0), float(end.accuracy or 0.0), f"loss {start.loss:.3f} -> {end.loss:.3f}"


def federated(args: argparse.Namespace, extra: list[str], out: Path) -> list[dict]:
    """The rows of a federated run's metrics.jsonl (round 0 first)."""
    cmd = [
        sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", args.model, "--data", args.data,
        "--clients", str(args.clients), "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
        "--partition", args.partition, "--eval-size", str(args.eval_size), "--learning-rate", str(args.learning_rate),
        "--server-lr", str(args.server_lr), "--seed", str(args.seed), "--out", str(out), *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["wall_s"] = time.perf_counter() - started  # the whole command, start-up included
    return rows


def constant_answer(args: argparse.Namespace) -> float:
    """Accuracy of always giving the held-out split's commonest label: the floor a classifier must beat."""
    from fedswarm.common.evaluate import constant_answer as commonest
    from fedswarm.common.splits import run_records

    records, split = run_records(args.data, 0, args.eval_size, args.seed)
    found = commonest([records[i] for i in split.holdout])
    if found is None:
        raise SystemExit(f"--data {args.data}: unlabelled records have no constant answer")
    return found[1]


def one_seed(args: argparse.Namespace, wanted: set[str]) -> dict[str, tuple[float, float, str]]:
    """Every wanted variant at ``args.seed``: round-0 accuracy, final accuracy, notes; prints the table."""
    results: dict[str, tuple[float, float, str]] = {}
    if "a" in wanted:
        before, after, note = centralised(args)
        results["(a) centralised"] = (before, after, note)
        record(args, "(a) centralised", after, None, [])
        print(f"(a) centralised: {before:.3f} -> {after:.3f} {note}", flush=True)
    if "i" in wanted:
        before, after, note = centralised(args, large_batch=True)
        results[LARGE_BATCH] = (before, after, note)
        record(args, LARGE_BATCH, after, None, [])
        print(f"{LARGE_BATCH}: {before:.3f} -> {after:.3f} {note}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            if name[1] not in wanted:
                continue
            rows = federated(args, extra, Path(tmp) / name[1])
            first, last = rows[0], rows[-1]
            before, after = float(first["eval_accuracy"]), float(last["eval_accuracy"])
            note = f"loss {first['eval_loss']:.3f} -> {last['eval_loss']:.3f}"
            note += ", by round " + "/".join(f"{r['eval_accuracy']:.2f}" for r in rows[1:])
            note += f", residual {last.get('aggregation_residual', 0):.1e}"
            note += f", epsilon {last['epsilon_max']:.2f}" if "epsilon_max" in last else ""
            note += f", wall {last['wall_s']:.0f} s"
            results[name] = (before, after, note)
            record(args, name, after, float(last["eval_loss"]), extra)
            print(f"{name}: {before:.3f} -> {after:.3f} {note}", flush=True)

    steps = args.clients * args.rounds * args.local_steps
    print(
        f"\n{args.model} on {args.data}, {steps} total steps, partition {args.partition}, {args.eval_size} held out,"
        f" server lr {args.server_lr:g}, seed {args.seed}"
    )
    print(f"a constant answer scores {constant_answer(args):.3f} here (the held-out share of the commonest label)")
    print(f"{'variant':<26} {'round 0':>8} {'final':>8} {'gain':>8} {'gain / (a)':>11}  notes")
    base = results.get("(a) centralised")
    base_gain = base[1] - base[0] if base else None
    for name, (before, after, note) in results.items():
        gain = after - before
        ratio = f"{gain / base_gain:.2f}" if base_gain else "-"
        print(f"{name:<26} {before:>8.3f} {after:>8.3f} {gain:>8.3f} {ratio:>11}  {note}")
    for private, plain in DP_PAIRS:
        dp, ref = results.get(private), results.get(plain)
        if dp and ref and ref[1] - ref[0] > 0:
            print(f"{private} keeps {(dp[1] - dp[0]) / (ref[1] - ref[0]):.2f} of {plain}'s gain (goal >= 0.75)")
    print(flush=True)
    return results


def example_gradients(args: argparse.Namespace, extra: list[str]) -> int:
    """A variant's compute: example-gradients over the run (DP: expected, at most, as balancing caps rates)."""
    batch = 8  # FederationConfig's --batch-size default
    if "--dp" in extra:
        batch = int(extra[extra.index("--dp-batch-size") + 1]) if "--dp-batch-size" in extra else DP_BATCH
    return args.clients * args.rounds * args.local_steps * batch


def record(args: argparse.Namespace, name: str, accuracy: float, loss: float | None, extra: list[str]) -> None:
    """Append one (variant, seed) result to ``--results`` (a JSON-lines file several runs can share)."""
    if not args.results:
        return
    row = {
        "variant": name, "seed": args.seed, "accuracy": accuracy, "constant": constant_answer(args), "loss": loss,
        "example_gradients": example_gradients(args, extra), "eval_size": args.eval_size,
    }  # fmt: skip
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def margin_summary(rows: list[dict]) -> str:
    """Per variant: each seed's accuracy, constant answer and margin; the mean margin, its standard error,
    its ratio to the reference's (with a delta-method standard error), held-out loss and compute."""
    import statistics

    by: dict[str, dict[int, dict]] = {}
    for row in rows:  # the last result of a (variant, seed) counts
        by.setdefault(row["variant"], {})[int(row["seed"])] = row

    def mean_se(values: list[float]) -> tuple[float, float]:
        m = statistics.fmean(values)
        return m, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan"))

    ref = by.get(REFERENCE, {})
    lines = ["margin = held-out accuracy - constant answer (the held-out share of the commonest label)"]
    for name in sorted(by):
        seeds = sorted(by[name])
        margins = [by[name][s]["accuracy"] - by[name][s]["constant"] for s in seeds]
        m, se = mean_se(margins)
        losses = [by[name][s]["loss"] for s in seeds if by[name][s]["loss"] is not None]
        per_seed = ", ".join(
            f"s{s} {by[name][s]['accuracy']:.3f}-{by[name][s]['constant']:.3f}={mg:+.3f}"
            for s, mg in zip(seeds, margins, strict=True)
        )
        line = f"{name:<26} mean margin {m:+.3f} ± {se:.3f} (n={len(seeds)})"
        common = [s for s in seeds if s in ref]
        if name != REFERENCE and common:
            mine = [by[name][s]["accuracy"] - by[name][s]["constant"] for s in common]
            theirs = [ref[s]["accuracy"] - ref[s]["constant"] for s in common]
            (a, sa), (b, sb) = mean_se(mine), mean_se(theirs)
            if b > 0:
                ratio = a / b
                rse = abs(ratio) * ((sa / a) ** 2 + (sb / b) ** 2) ** 0.5 if a and len(common) > 1 else float("nan")
                line += f", / {REFERENCE[:3]} on seeds {common}: {ratio:.2f} ± {rse:.2f}"
        line += f", loss {statistics.fmean(losses):.3f}" if losses else ""
        line += f", example-gradients {by[name][seeds[0]]['example_gradients']}"
        lines += [line, f"    {per_seed}"]
    return "\n".join(lines)


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
    parser.add_argument("--seeds", default="0", help="comma-separated: held-out split, partitions, init, batch order")
    parser.add_argument("--server-lr", type=float, default=1.0, help="federated variants' server learning rate")
    parser.add_argument("--only", default="", help="comma-separated variant letters to run, e.g. a,b (default: all)")
    parser.add_argument(
        "--results", default="", help="append every (variant, seed) result to this JSON-lines file and summarise "
        "the margins over all of its rows (several runs may share one file)"
    )  # fmt: skip
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else set("abcdefghijklmn")
    seeds = [int(s) for s in args.seeds.split(",")]

    gains: dict[str, list[float]] = {}
    for seed in seeds:
        args.seed = seed
        for name, (before, after, _) in one_seed(args, wanted).items():
            gains.setdefault(name, []).append(after - before)
    if len(seeds) > 1:
        print(seed_summary(gains, args.seeds))
    if args.results:
        rows = [json.loads(line) for line in Path(args.results).read_text(encoding="utf-8").splitlines() if line]
        print(margin_summary(rows))


def seed_summary(gains: dict[str, list[float]], seeds: str) -> str:
    """Each variant's mean gain over the seeds, its ratio to (a)'s mean gain, and the per-seed ratios.

    The ratio of means is the figure the goals are read from: one seed's accuracy at 200 held
    out moves by about 0.035 per standard error, and a ratio of two such numbers by more.
    """
    base = gains.get("(a) centralised")
    lines = [f"over seeds {seeds}: mean gain, its ratio to (a)'s mean gain, and each seed's gain / (a)"]
    for name, values in gains.items():
        mean = sum(values) / len(values)
        line = f"{name:<26} mean gain {mean:.3f}"
        if base and sum(base) > 0:  # every variant ran every seed (a failed run stops the bench)
            line += f"  mean / (a) {mean / (sum(base) / len(base)):.2f}  per seed ("
            line += ", ".join(f"{v / b:.2f}" if b > 0 else "-" for v, b in zip(values, base, strict=True)) + ")"
        lines.append(line)
    for private, plain in DP_PAIRS:
        if gains.get(private) and gains.get(plain) and sum(gains[plain]) > 0:
            kept = sum(gains[private]) / sum(gains[plain])
            lines.append(f"{private} keeps {kept:.2f} of {plain}'s mean gain (goal >= 0.75)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
