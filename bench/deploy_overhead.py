"""Per-round overhead of the deployment engine against the simulation, for the same run.

Overhead = a round's wall time minus the nodes' own training seconds (the slowest node:
nodes train side by side), and the same for the training phase alone (send, train,
collect; without the coordinator's held-out evaluation and checkpoint). Deployment: a
SuperLink with TLS and node authentication and N SuperNodes on 127.0.0.1, all through the
``fedswarm`` commands. Simulation: ``fedswarm simulate`` (Ray) with the same settings.
The deployment runs twice: with warm nodes (``fedswarm node``'s default: one worker per node
runs every message and keeps the model loaded) and with ``--cold`` (Flower's executor: a
fresh ``flwr-clientapp`` process per message). Also measured apart, to say where the cold
time goes: starting a Python process that imports the ClientApp's stack, and loading the
model (a cold node does both for every message).

    .venv/bin/python bench/deploy_overhead.py [--clients 3] [--rounds 3] [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDSWARM = [sys.executable, "-m", "fedswarm.common.cli"]


def records(start: int, count: int) -> list[dict]:
    return [
        {
            "input": [{"role": "system", "content": "Answer yes or no."}, {"role": "user", "content": f"Is {i} odd?"}],
            "ideal": "yes" if i % 2 else "no",
        }
        for i in range(start, start + count)
    ]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overheads(metrics: Path) -> list[dict]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()][1:]
    out = []
    for r in rows:
        slowest = max(c["seconds"] for c in r["per_client"])
        out.append(
            {
                "round": r["round"],
                "wall": r["seconds"],
                "train_phase": r["train_seconds"],
                "node_train": slowest,
                "overhead": r["seconds"] - slowest,
                "train_overhead": r["train_seconds"] - slowest,
                "eval": r["eval_seconds"],
                "peak_rss": [c.get("peak_rss_mb", 0.0) for c in r["per_client"]],
            }
        )
    return out


def settings(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.model, "--clients", str(args.clients), "--rounds", str(args.rounds),
        "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size), "--eval-size", "12",
    ]  # fmt: skip


def deployed(root: Path, args: argparse.Namespace, cold: bool) -> list[dict]:
    from fedswarm.common.cli import main
    from fedswarm.common.processes import Supervisor, free_port

    main(["certs", "--out", str(root / "certs"), "--host", "127.0.0.1"])
    (root / "auth").mkdir()
    for i in range(args.clients):
        main(["node-key", "--out", str(root / "keys"), "--name", f"n{i}"])
        shutil.copy(root / "keys" / f"n{i}.pub", root / "auth")
        write(root / f"node{i}.jsonl", records(100 * i, 24))
    held = write(root / "held.jsonl", records(1000, 24))
    port = free_port()
    sup = Supervisor(grace=30.0)

    def start(name: str, *cmd: str) -> subprocess.Popen:
        with (root / f"{name}.log").open("w") as log:
            return sup.start(name, [*FEDSWARM, *cmd], output=log, quiet=True)

    try:
        start("coordinator", "coordinator", "--host", "127.0.0.1", "--port", str(port), "--certs",
              str(root / "certs"), "--auth-keys", str(root / "auth"), "--run-dir", str(root / "runs"))  # fmt: skip
        while (root / "coordinator.log").read_text().count("registered node key") < args.clients:
            time.sleep(0.5)
        for i in range(args.clients):
            node = ["--data", str(root / f"node{i}.jsonl"), "--auth-key", str(root / "keys" / f"n{i}")]
            node += ["--cold"] if cold else []
            start(f"node{i}", "node", "--coordinator", f"127.0.0.1:{port}", "--root-cert",
                  str(root / "certs" / "ca.crt"), *node)  # fmt: skip
        run = subprocess.run(
            [*FEDSWARM, "run", "--federation", "bench", "--coordinator", f"127.0.0.1:{port}", "--root-cert",
             str(root / "certs" / "ca.crt"), "--flwr-home", str(root / "flwr"), "--data", str(held),
             *settings(args), "--out", "deployed"],
            capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode:
            raise SystemExit(f"deployment run failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    finally:
        sup.stop_all()
    return overheads(root / "runs" / "deployed" / "metrics.jsonl")


def simulated(root: Path, args: argparse.Namespace) -> list[dict]:
    pool = write(root / "pool.jsonl", records(0, 24 * args.clients + 24))
    env = {**os.environ, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "local")}  # never a stray `ray start` cluster
    cmd = [*FEDSWARM, "simulate", "--data", str(pool), *settings(args), "--out", str(root / "simulated")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode:
        raise SystemExit(f"simulation failed:\n{run.stderr[-2000:]}")
    return overheads(root / "simulated" / "metrics.jsonl")


def where_time_goes(model: str) -> dict[str, float]:
    """What a fresh ClientApp process pays before it trains: interpreter, imports, model (seconds)."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "import torch, transformers, peft, flwr.clientapp, fedswarm.client.trainer.app\n"
        "import fedswarm.client.trainer.runtime as r\n"
        "t1 = time.perf_counter()\n"
        f"r.lora_model({model!r}, 8, 16.0, 0, 'cpu', '')\n"
        "print(t1 - t0, time.perf_counter() - t1)"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    total = time.perf_counter() - started
    imports, load = (float(x) for x in out.split()[-2:])
    return {"interpreter": total - imports - load, "imports": imports, "model": load, "total": total}


def table(name: str, rows: list[dict]) -> None:
    print(
        f"\n{name}: round | wall s | node train s | overhead s | train phase s | its overhead s | eval s "
        "| each training process's peak RSS MB"
    )
    for r in rows:
        print(
            f"  {r['round']:>5} | {r['wall']:6.1f} | {r['node_train']:12.2f} | {r['overhead']:10.1f} | "
            f"{r['train_phase']:13.1f} | {r['train_overhead']:14.1f} | {r['eval']:6.2f} | "
            + " ".join(f"{m:.0f}" for m in r["peak_rss"])
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--engines", default="warm,cold,sim", help="comma-separated: warm, cold, sim")
    args = parser.parse_args()
    engines = set(args.engines.split(","))
    if not engines or not engines <= {"warm", "cold", "sim"}:
        raise SystemExit(f"--engines: a comma-separated subset of warm,cold,sim, got {args.engines!r}")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        root = Path(tmp)
        for name in ("warm", "cold", "sim"):
            (root / name).mkdir()
        warm = deployed(root / "warm", args, cold=False) if "warm" in engines else []
        cold = deployed(root / "cold", args, cold=True) if "cold" in engines else []
        sim = simulated(root / "sim", args) if "sim" in engines else []
    cost = where_time_goes(args.model)
    for title, rows in (
        ("deployment, warm nodes (TLS + node auth, SuperNodes on 127.0.0.1)", warm),
        ("deployment, --cold nodes (a flwr-clientapp process per message)", cold),
        ("simulation (Ray)", sim),
    ):
        if rows:
            table(title, rows)
    s = statistics.mean(r["overhead"] for r in sim) if sim else float("nan")
    st = statistics.mean(r["train_overhead"] for r in sim) if sim else float("nan")
    print(f"\nmean per-round overhead ({args.model}, {args.clients} nodes, {args.rounds} rounds):")
    print(f"  simulation {s:.1f} s (training phase {st:.1f} s)")
    for name, rows in (("warm", warm), ("cold", cold)):
        if not rows:
            continue
        d = statistics.mean(r["overhead"] for r in rows)
        dt = statistics.mean(r["train_overhead"] for r in rows)
        share = d / statistics.mean(r["wall"] for r in rows)
        print(
            f"  {name:<10} {d:.1f} s (training phase {dt:.1f} s): {d / max(s, 1e-9):.2f}x the simulation's, "
            f"{100 * share:.0f}% of its rounds' wall time"
        )
    print(
        f"a fresh ClientApp process before it can train: {cost['total']:.1f} s = interpreter "
        f"{cost['interpreter']:.1f} + imports (torch, transformers, peft, flwr) {cost['imports']:.1f} + "
        f"{args.model} model with LoRA {cost['model']:.2f}"
    )
    print("(cold: Flower starts one flwr-clientapp process per message, so each round pays both, per node;")
    print(" warm nodes and the simulation's Ray actors live through the run and keep the model loaded)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
