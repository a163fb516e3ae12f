"""The run's settings, one class per role that reads them, read from the CLI or Flower's run config.

- :class:`NodeSettings`: what a node's ClientApp trains with (model, data shape, LoRA, steps).
- :class:`PrivacySettings`: local DP-SGD on each node (Opacus), and how epsilon is accounted.
- :class:`NodeConfig`: both, what a node is sent each round and all a ClientApp reads.
- :class:`CoordinatorSettings`: the ServerApp's own: data, run folder, quorum, screening, server
  optimiser, central DP, evaluation cadence. Nodes are never sent them.
- :class:`SimulationSettings`: the Ray simulation's resources.
- :class:`FederationConfig`: all of them, what ``fedswarm simulate`` and ``flwr run .`` take; it
  checks what needs settings of several roles at once (a codec against the server optimiser...).

Each class validates its own fields when built (a node builds only :class:`NodeConfig`). Field
names map to kebab-case run-config keys (``local_steps`` -> ``local-steps``), the keys of
``[tool.flwr.app.config]`` in pyproject.toml (``tests/test_cli_options.py`` checks them value
for value), so ``fedswarm simulate`` and ``flwr run .`` accept the same settings. The CLI is
generated from the fields.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from fedswarm.common.codecs import codec_class, modes_help
from fedswarm.common.errors import InputError
from fedswarm.common.options import add_arguments as add_arguments
from fedswarm.common.options import data_option, from_args, given_options, max_seq_len_option, model_option, option

T = TypeVar("T")

FLOWER_KEYS = {"rounds": "num-server-rounds"}
LORA_RANK = 8  # --lora-rank 0 without --dp
DP_LORA_RANK = 2  # --lora-rank 0 with --dp: DP noise grows with the square root of the trainable weights
DP_SGD_LEARNING_RATE = 0.5  # --dp-optimizer sgd without --dp-learning-rate (FFA-LoRA's DP-SGD range: 0.1-1.0)
SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")  # server/coordinator/server_optimizer.py
DEFAULT_SERVER_LR = {"sgd": 1.0, "avgm": 1.0, "adam": 1e-2, "yogi": 1e-2}  # --server-lr 0


def _at_least_one(settings: object, *names: str) -> None:
    for name in names:
        if getattr(settings, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")


def _within_unit(settings: object, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(settings, name) < 1.0:
            raise InputError(f"--{name.replace('_', '-')} must be within [0, 1), got {getattr(settings, name)}")


@dataclass
class NodeSettings:
    """What a node trains with; every node is sent these each round."""

    model: str = model_option()
    rounds: int = option(3, "federated rounds")
    local_steps: int = option(12, "optimizer steps per client per round")
    batch_size: int = option(8, "examples per local step")
    learning_rate: float = option(2e-3, "AdamW learning rate")
    lora_rank: int = option(0, "LoRA rank r (0: 8, or 2 under --dp, where fewer private weights carry less noise)")
    lora_alpha: float = option(16.0, "LoRA alpha (scale = alpha / r)")
    partition: str = option("iid", "iid or dirichlet:ALPHA (label skew)")
    seed: int = option(0, "seed of the held-out split, partitions, adapter init and batch order")
    eval_size: int = option(1000, "held-out examples, never given to a client")
    max_samples: int = option(0, "read at most this many records (0: all)")
    max_seq_len: int = max_seq_len_option()
    device: str = option("auto", "auto (CUDA when available), cpu or cuda: training, evaluation")
    quantize_base: str = option("", "4bit: load the frozen base in 4 bits (QLoRA, bitsandbytes; CUDA only)")
    precision: str = option("auto", "training autocast: auto (bf16 where the CPU has it natively), bf16, fp32")
    aggregation: str = option("fedavg", f"LoRA aggregation: {modes_help()}")
    proximal_mu: float = option(0.0, "FedProx: each local step is pulled towards the round's global adapter (mu)")
    scaffold: bool = option(
        False, "SCAFFOLD drift correction for non-IID nodes: each local step follows g - c_i + c (fedavg, ffa)"
    )
    balance_labels: bool = option(
        False,
        "label-balanced local batches: each step draws the node's labels equally often, so nodes with skewed "
        "labels train the same objective (labelled data; with --dp: per-label Poisson rates, accounted at the "
        "largest)",
    )
    client_ranks: str = option("", "simulation: LoRA rank per partition, e.g. 4,8,16 (cycled); default --lora-rank")
    cpus_per_client: float = option(1.0, "CPU cores reserved per virtual client (Ray); torch threads per client")

    def __post_init__(self) -> None:
        self.check_node()

    def check_node(self) -> None:
        _at_least_one(self, "rounds", "local_steps", "batch_size", "eval_size", "max_seq_len")
        if self.lora_rank < 0:
            raise InputError(f"--lora-rank must be >= 1 (or 0: auto), got {self.lora_rank}")
        if self.learning_rate <= 0:
            raise InputError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.proximal_mu < 0:
            raise InputError(f"--proximal-mu must be >= 0, got {self.proximal_mu}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.cpus_per_client <= 0:
            raise InputError(f"--cpus-per-client must be > 0, got {self.cpus_per_client}")
        codec_class(self.aggregation)  # a one-line error naming the modes
        self.ranks()

    def ranks(self) -> list[int]:
        """Per-partition LoRA ranks from ``--client-ranks`` (empty: every client has ``--lora-rank``)."""
        if not self.client_ranks:
            return [self.lora_rank]
        try:
            ranks = [int(r) for r in self.client_ranks.split(",")]
        except ValueError:
            raise InputError(f"--client-ranks must be comma-separated integers, got {self.client_ranks!r}") from None
        if any(r < 1 for r in ranks):
            raise InputError(f"--client-ranks must be >= 1, got {self.client_ranks!r}")
        return ranks

    def server_rank(self) -> int:
        """Rank of the global adapter the coordinator holds."""
        return codec_class(self.aggregation).global_rank(self)


@dataclass
class PrivacySettings:
    """Local DP-SGD on each node (Opacus) and its accounting; nodes train under it, the coordinator reports it."""

    dp: bool = option(False, "train each client's LoRA with Opacus DP-SGD (Poisson sampling, per-sample clipping)")
    noise_multiplier: float = option(0.0, "DP noise std / clipping norm (0: calibrate from --epsilon)")
    epsilon: float = option(0.0, "DP budget per node: calibrate noise for it over all rounds; nodes stop at it")
    delta: float = option(1e-5, "DP delta")
    max_grad_norm: float = option(1.0, "DP per-sample L2 clipping bound")
    dp_batch_size: int = option(
        32, "DP: expected Poisson batch per step (sample rate = it / local examples), run in --batch-size micro-batches"
    )
    dp_optimizer: str = option("adam", "DP: adam (AdamW) or sgd, fed each step's clipped, noised mean gradient")
    dp_learning_rate: float = option(0.0, "DP: optimizer learning rate (0: --learning-rate for adam, 0.5 for sgd)")
    dp_momentum: float = option(0.9, "DP: momentum of --dp-optimizer sgd")
    accountant: str = option("prv", "DP accountant for calibration and reports: prv (tighter) or rdp (Opacus)")
    dp_seed: int = option(-1, "seed of the DP noise (tests); -1: OS randomness")

    def __post_init__(self) -> None:
        self.check_privacy()

    def check_privacy(self) -> None:
        _at_least_one(self, "dp_batch_size")
        if self.dp and self.noise_multiplier <= 0 and self.epsilon <= 0:
            raise InputError("--dp needs --noise-multiplier > 0 or a target --epsilon > 0")
        if not 0 < self.delta < 1:
            raise InputError(f"--delta must be within (0, 1), got {self.delta}")
        if self.max_grad_norm <= 0:
            raise InputError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.dp_optimizer not in ("adam", "sgd"):
            raise InputError(f"--dp-optimizer must be adam or sgd, got {self.dp_optimizer!r}")
        if self.dp_learning_rate < 0:
            raise InputError(f"--dp-learning-rate must be > 0 (or 0: the default), got {self.dp_learning_rate}")
        _within_unit(self, "dp_momentum")
        if self.accountant not in ("rdp", "prv"):
            raise InputError(f"--accountant must be rdp or prv, got {self.accountant!r}")


@dataclass
class NodeConfig(PrivacySettings, NodeSettings):
    """All a node's ClientApp reads: its training settings and local DP. ``--lora-rank 0`` resolves here."""

    def __post_init__(self) -> None:
        self.check_node_config()

    def check_node_config(self) -> None:
        if self.lora_rank == 0:
            self.lora_rank = DP_LORA_RANK if self.dp else LORA_RANK
        self.check_node()
        self.check_privacy()
        codec_class(self.aggregation).check_node(self)

    def dp_lr(self) -> float:
        """The DP optimizer's learning rate: ``--dp-learning-rate``, else its optimizer's default."""
        return self.dp_learning_rate or (DP_SGD_LEARNING_RATE if self.dp_optimizer == "sgd" else self.learning_rate)

    def node_run_config(self) -> dict[str, Any]:
        """What a node is sent each round: the run config of :class:`NodeConfig`'s fields only."""
        node = {run_key(f.name) for f in fields(NodeConfig)}
        return {k: v for k, v in self.to_run_config().items() if k in node}

    def to_run_config(self) -> dict[str, Any]:
        """Flower run-config form (kebab-case keys).

        ``lora-rank`` is 0 (auto) where the rank is the one auto picks for this ``dp`` setting:
        the same configuration, and a deployment's app default then still follows ``--dp``;
        ``server-lr`` likewise where it is ``--server-optimizer``'s default.
        """
        out = {run_key(f.name): getattr(self, f.name) for f in fields(self)}
        if self.lora_rank == (DP_LORA_RANK if self.dp else LORA_RANK):
            out["lora-rank"] = 0
        optimizer = out.get("server-optimizer")
        if optimizer in DEFAULT_SERVER_LR and out.get("server-lr") == DEFAULT_SERVER_LR[optimizer]:
            out["server-lr"] = 0.0
        return out


@dataclass
class CoordinatorSettings:
    """The ServerApp's own settings: never sent to a node."""

    data: str = data_option()
    clients: int = option(4, "number of (virtual) client nodes")
    eval_every: int = option(
        1, "evaluate the global adapter on the held-out set every N rounds and after the last (0: the last only)"
    )
    server_lr: float = option(
        0.0,
        "server learning rate (0: the optimizer's default: sgd and avgm 1, the clients' mean update; adam, yogi 0.01)",
    )
    server_optimizer: str = option(
        "sgd", "server optimizer over the mean update: sgd, avgm (FedAvgM), adam (FedAdam), yogi (FedYogi)"
    )
    server_momentum: float = option(0.9, "--server-optimizer avgm: momentum")
    server_beta1: float = option(0.9, "--server-optimizer adam, yogi: first-moment decay")
    server_beta2: float = option(0.99, "--server-optimizer adam, yogi: second-moment decay")
    server_tau: float = option(1e-3, "--server-optimizer adam, yogi: adaptivity (added to the root second moment)")
    global_rank: int = option(0, "svd: rank of the global adapter (0: the largest client rank)")
    central_dp: bool = option(False, "server-side fixed-clipping DP on client updates (Flower's wrapper)")
    central_noise: float = option(1.0, "central DP noise multiplier")
    central_clip: float = option(1.0, "central DP clipping norm of each client's update")
    fraction_evaluate: float = option(0.0, "share of nodes running federated evaluation each round")
    clients_per_round: int = option(
        0, "nodes sampled to train each round (0: every node), drawn with --seed: the same after --resume"
    )
    over_select: float = option(
        1.0,
        "with --clients-per-round K: send to ceil(K x this) nodes and close the round on the first K good "
        "replies; later ones are counted (late) and dropped",
    )
    min_clients: int = option(
        0, "replies a round needs to go on (0: all of --clients, or --clients-per-round); others may drop out"
    )
    round_timeout: float = option(3600.0, "seconds a round waits for replies; late nodes count as failures")
    max_update_norm: float = option(0.0, "reject an update farther than this (L2) from the sent adapter (0: off)")
    resume: str = option("", "continue the run in this folder from its last completed round's checkpoint")
    resume_given: str = option(
        "",
        "with --resume: the settings given explicitly, comma-separated (the fedswarm CLI fills this in; "
        "empty: those not at their default)",
    )
    out: str = option("", "run folder (default runs/run-DATE-TIME): metrics.jsonl, checkpoints, adapter/")

    def __post_init__(self) -> None:
        self.check_coordinator()

    def check_coordinator(self) -> None:
        _at_least_one(self, "clients")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise InputError(
                f"--server-optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {self.server_optimizer!r}"
            )
        if self.server_lr < 0:
            raise InputError(f"--server-lr must be > 0 (0: the optimizer's default), got {self.server_lr}")
        if self.server_lr == 0:
            self.server_lr = DEFAULT_SERVER_LR[self.server_optimizer]
        _within_unit(self, "server_momentum", "server_beta1", "server_beta2")
        if self.server_tau <= 0:
            raise InputError(f"--server-tau must be > 0, got {self.server_tau}")
        if self.eval_every < 0:
            raise InputError(f"--eval-every must be >= 0, got {self.eval_every}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise InputError(f"--fraction-evaluate must be within [0, 1], got {self.fraction_evaluate}")
        if not 0 <= self.clients_per_round <= self.clients:
            raise InputError(
                f"--clients-per-round must be within [0, --clients={self.clients}], got {self.clients_per_round}"
            )
        if self.over_select < 1.0:
            raise InputError(f"--over-select must be >= 1, got {self.over_select}")
        if self.over_select > 1.0 and not self.clients_per_round:
            raise InputError("--over-select needs --clients-per-round (the replies a round closes on)")
        if not 0 <= self.min_clients <= (self.clients_per_round or self.clients):
            most = (
                f"--clients-per-round={self.clients_per_round}"
                if self.clients_per_round
                else f"--clients={self.clients}"
            )
            raise InputError(f"--min-clients must be within [0, {most}], got {self.min_clients}")
        if self.round_timeout <= 0 or self.max_update_norm < 0:
            raise InputError("--round-timeout must be > 0 and --max-update-norm >= 0")
        if self.central_clip <= 0:
            raise InputError(f"--central-clip must be > 0, got {self.central_clip}")

    def needed_clients(self) -> int:
        """Replies a round needs: ``--min-clients``, or (when it is 0) every node sampled: ``--clients-per-round``,
        else ``--clients``."""
        return self.min_clients or self.clients_per_round or self.clients

    def sampled_per_round(self) -> int:
        """Nodes a round's training is sent to: ``ceil(K x --over-select)`` of ``--clients-per-round`` K (at most
        ``--clients``), or every node."""
        import math

        if not self.clients_per_round:
            return self.clients
        return min(self.clients, math.ceil(self.clients_per_round * self.over_select - 1e-9))


@dataclass
class SimulationSettings:
    """Where a simulation's virtual nodes run (Ray)."""

    gpus_per_client: float = option(
        -1.0, "GPUs per virtual client (Ray; 0.25: four share a GPU); -1: 0.25 with CUDA, else 0"
    )
    ray_address: str = option("", "run on an existing Ray cluster (HOST:PORT of its head); default: a local Ray")

    def __post_init__(self) -> None:
        self.check_simulation()

    def check_simulation(self) -> None:
        if self.gpus_per_client < 0 and self.gpus_per_client != -1:
            raise InputError(f"--gpus-per-client must be >= 0 (or -1: auto), got {self.gpus_per_client}")


@dataclass
class FederationConfig(SimulationSettings, CoordinatorSettings, NodeConfig):
    """Every setting of a federated run (the CLI's and the Flower app's); units in each help text.

    Beyond each role's own checks, the ones that join roles: the aggregation mode against
    SCAFFOLD, central DP, the server optimiser and mixed ranks; SCAFFOLD against central DP.
    """

    def __post_init__(self) -> None:
        self.check_node_config()
        self.check_coordinator()
        self.check_simulation()
        codec_class(self.aggregation).check(self)
        if self.scaffold and self.central_dp:
            raise InputError(
                "--scaffold with --central-dp would send each node's mean gradient (c_i) outside the central DP "
                "guarantee; use --dp (local DP covers c_i) or drop one of them"
            )


def run_key(name: str) -> str:
    return FLOWER_KEYS.get(name, name.replace("_", "-"))


def from_run_config(cls: type[T], run_config: Mapping[str, Any]) -> T:
    """Build ``cls`` from a Flower run config, ignoring keys it does not know."""
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        key = run_key(f.name)
        if key in run_config:
            kwargs[f.name] = _coerce(f.default, run_config[key])
    return cls(**kwargs)


def _coerce(default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    return type(default)(value) if default is not None else value


def federation_from_args(args: argparse.Namespace) -> FederationConfig:
    """The CLI's run config; with ``--resume``, ``resume_given`` names the settings typed (so a default counts)."""
    cfg = from_args(FederationConfig, args)
    if cfg.resume and not cfg.resume_given:
        cfg = dataclasses.replace(cfg, resume_given=",".join(sorted(given_options(args))))
    return cfg
