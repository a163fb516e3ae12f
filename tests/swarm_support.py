"""What the swarm's tests share: the process harness (a supervisor, a preloaded forkserver for block
servers), the local reference generation, seeded adapters and a float32 round-off bound."""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedswarm.common.model import load_model, tiny_config
from fedswarm.common.processes import Supervisor


def make_adapter(folder: Path, seed: int, rank: int = 4, alpha: float = 8.0, b_seed: int | None = None) -> Path:
    """A PEFT adapter of the tiny model with random A (from ``seed``) and random, non-zero B (from ``b_seed``,
    default ``1000 + seed``)."""
    from fedswarm.common.lora_state import attach_lora

    peft_model = attach_lora(load_model("tiny"), rank=rank, alpha=alpha, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed if b_seed is None else b_seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(folder)
    return folder


def roundoff_tol(reference: torch.Tensor, config: Any = None) -> float:
    """A float32 round-off bound for two computations of ``reference`` that differ only in kernels.

    A dot product of length n has relative rounding error at most n·eps (Higham's gamma_n); each
    block's longest is the MLP's (intermediate_size), and the blocks' errors add up. Relative to
    the largest magnitude, that gives eps · |reference|max · intermediate_size · layers.
    """
    config = config or tiny_config()
    eps = torch.finfo(torch.float32).eps
    return float(eps * reference.abs().max() * config.intermediate_size * config.num_hidden_layers)


TOKEN = "test-swarm-token"
PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"
NEW_TOKENS = 12
START_TIMEOUT_S = 150.0


@dataclass
class Procs:
    """Processes started by a test module; every one is stopped in the finaliser."""

    folder: Path
    token: str | None = TOKEN  # the swarm token every process is given (None: none)
    sup: Supervisor = field(default_factory=lambda: Supervisor(grace=5.0))
    forked: dict[str, multiprocessing.process.BaseProcess] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> None:
        """``fedswarm swarm ARGS`` as a subprocess of this interpreter."""
        cmd = [sys.executable, "-m", "fedswarm.common.cli", "swarm", *args]
        with (self.folder / f"{name}.log").open("w") as log:
            self.sup.start(name, cmd, swarm_env(self.token), output=log, quiet=True)

    def fork(self, name: str, *args: str) -> None:
        """``fedswarm swarm ARGS`` in a process forked from a server that already imported torch.

        Importing torch and transformers takes ~10 s per process on a busy 2-core machine;
        forking from a preloaded forkserver starts each block server in a fraction of that,
        and each is still its own process with its own gRPC server (killable, with its own memory).
        """
        (self.folder / f"{name}.log").touch()
        log = str(self.folder / f"{name}.log")
        proc = FORKSERVER.Process(target=run_cli, args=(log, ["swarm", *args], "", swarm_env(self.token)))
        proc.start()
        self.forked[name] = proc
        self.sup.adopt(name, proc.pid)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def wait_ready(self, *names: str) -> dict[str, str]:
        """Each process's address, once it prints that it is ready (also kept in ``addresses``)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = set(names)
        while pending:
            for name in sorted(pending):
                text = (self.folder / f"{name}.log").read_text()
                match = re.search(r"ready on (\S+)", text)
                if match:
                    self.addresses[name] = match.group(1)
                    pending.discard(name)
                elif not self.sup.running(name) or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start:\n{text}")
            time.sleep(0.2)
        return {name: self.addresses[name] for name in names}

    def kill(self, name: str) -> None:
        self.sup.kill(name)

    def stop_all(self) -> None:
        """Servers first (they withdraw from the registries), then the registries."""
        self.sup.stop(*(tree.name for tree in self.sup.trees if not tree.name.startswith("reg")))
        self.sup.stop_all()
        for proc in self.forked.values():  # gone: the forkserver has its exit code
            proc.join(timeout=5)


def swarm_env(token: str | None = TOKEN) -> dict[str, str]:
    """This process's environment for a swarm process: one thread, the swarm token (or none)."""
    env = {k: v for k, v in os.environ.items() if k != "FEDSWARM_SWARM_TOKEN"}
    return {**env, **({"FEDSWARM_SWARM_TOKEN": token} if token else {}), "OMP_NUM_THREADS": "1"}


def run_cli(log_path: str, argv: list[str], err_path: str = "", env: dict[str, str] | None = None) -> None:
    """``fedswarm ARGV`` in this (forked) process, its output to ``log_path`` (stderr to ``err_path``)."""
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    if err_path:
        with open(err_path, "a") as err:
            os.dup2(err.fileno(), 2)
    os.environ.clear()
    os.environ.update(env or swarm_env())
    from fedswarm.common.cli import main

    sys.exit(main(argv))


FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(
    [
        "torch",
        "transformers.models.llama.modeling_llama",
        "transformers.models.auto.modeling_auto",
        "fedswarm.client.swarm.cli",
        "fedswarm.server.swarm.server",
        "fedswarm.server.swarm.handler",
    ]
)


def noop() -> None:
    pass


def local_greedy(model, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding in one process, with the model's own KV cache."""
    ids = torch.tensor([PROMPT])
    tokens, logits = [], []
    past = None
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            step_logits = out.logits[0, -1].float()
            token = int(step_logits.argmax())
            tokens.append(token)
            logits.append(step_logits)
            ids = torch.tensor([[token]])
    return tokens, logits


@contextmanager
def served(servicer: Any) -> Iterator[Any]:
    """A block servicer served in this process on 127.0.0.1 (plaintext gRPC); yields a stub to it, stops after."""
    import grpc

    from fedswarm.protos import swarm_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    swarm_pb2_grpc.add_BlockServerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield swarm_pb2_grpc.BlockServerStub(channel)
    finally:
        channel.close()
        server.stop(None)
