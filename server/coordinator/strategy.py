"""The coordinator's Flower strategy: Flower's FedAvg with the aggregation mode's rule, per-node messages and SCAFFOLD.

The coordinator drives Flower's Strategy contract round by round (``federation.py``):
``configure_train`` -> send -> screen -> ``aggregate_train`` -> complete -> ``configure_evaluate``
-> ``aggregate_evaluate``. What fedswarm adds sits in the two train hooks, as Flower's own
FedOpt strategies keep their state:

- ``configure_train`` waits once for the nodes (everyone at the run's start, ``--min-clients``
  later, with a deadline and a clear error), samples the round's nodes (``--clients-per-round``
  K, over-selected ``--over-select`` times, drawn from the connected node ids with a generator
  seeded by ``--seed`` and the round: the same draw after ``--resume``; every node without K:
  Flower's FedAvg samples with the unseeded global ``random``, so fedswarm draws itself), then
  personalises each message: the node's DP accountant history, its own adapter where the codec
  says so (svd: the node's rank) and SCAFFOLD's ``c``. A node sitting a round out keeps its own
  state (its ``c_i``, DP accountant, warm model) in Flower's node context.
- ``aggregate_train`` turns each reply into an aggregation input once (``codec.clients``),
  aggregates with the codec's rule and reports the aggregate's residual in its metrics
  (``aggregation-residual``); under ``--scaffold`` it first takes each node's ``c_i`` out of
  its reply and keeps their mean as the next round's ``c``.
- ``--central-dp`` wraps the strategy in Flower's server-side fixed-clipping DP wrapper with
  Flower's RDP accountant; the wrapped strategy then aggregates with Flower's own FedAvg
  (its accounting re-encodes the clipped replies) weighted by ``unit-weight`` (every client
  counts once: user-level DP), and the coordinator measures the residual of the noised aggregate.

The codec stays a stateless rule; the state a round carries (the frozen tensors of the
adapter, ``c``, the node book) lives here and in the coordinator, and is checkpointed there.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedswarm.common.contract import Reply, from_record
from fedswarm.common.errors import FedswarmError
from fedswarm.common.flower_internals import check_replies
from fedswarm.server.coordinator.controls import attach_control, pop_mean_control
from fedswarm.server.coordinator.round_plan import NodeBook, personalise

if TYPE_CHECKING:
    import torch

    from fedswarm.common.codecs import AdapterCodec
    from fedswarm.common.config import FederationConfig

log = logging.getLogger("fedswarm")

RESIDUAL = "aggregation-residual"  # aggregate_train's metric: the aggregate's relative product-space error
NODE_POLL_SECONDS = 1.0


class LoraStrategy(FedAvg):
    """Flower's FedAvg (sampling, metric aggregation, reply checks) with the codec's aggregation rule."""

    def __init__(
        self,
        codec: AdapterCodec,
        book: NodeBook,
        *,
        clients: int,
        min_clients: int,
        node_wait: float,
        frozen: dict[str, torch.Tensor] | None = None,
        server_lr: float = 1.0,
        fraction_evaluate: float = 0.0,
        scaffold: bool = False,
        control: dict[str, torch.Tensor] | None = None,
        sample_size: int = 0,
        seed: int = 0,
        weighted_by_key: str = Reply.NUM_EXAMPLES,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_clients,
            min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
            min_available_nodes=min_clients,
            weighted_by_key=weighted_by_key,
        )
        self.codec, self.book = codec, book
        self.clients, self.min_clients, self.node_wait = clients, min_clients, node_wait
        self.frozen = dict(frozen or {})  # the adapter's tensors no node trains (ffa's A): never sent
        self.server_lr = server_lr
        self.scaffold = scaffold
        self.control = control  # SCAFFOLD's c: None until the first --scaffold round's replies
        self.prior: dict[str, torch.Tensor] = {}  # the adapter this round's nodes start from
        self.sample_size = sample_size  # nodes a round's training goes to (0: every connected node)
        self.seed = seed
        self.started = False

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One wait for the nodes, the round's seeded sample, then each node's own message (sorted by node id)."""
        chosen = self.sample(self.wait_for_nodes(grid), server_round)
        self.prior = {**self.frozen, **from_record(arrays)}
        config["server-round"] = server_round  # as FedAvg's configure_train
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in chosen]
        messages = personalise(messages, self.codec, self.prior, self.book)
        attach_control(messages, self.control)  # None unless --scaffold, and before round 1's c
        return messages

    def sample(self, node_ids: Sequence[int], server_round: int) -> list[int]:
        """The nodes round ``server_round`` trains, sorted: ``sample_size`` of ``node_ids`` drawn with a generator
        seeded by the run's seed and the round (every node when ``sample_size`` is 0 or not below their number)."""
        ordered = sorted(int(n) for n in node_ids)
        if not self.sample_size or self.sample_size >= len(ordered):
            return ordered
        draw = random.Random(f"fedswarm-sample:{self.seed}:{server_round}")  # str seeds hash alike everywhere
        return sorted(draw.sample(ordered, self.sample_size))

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Connected node ids once all ``clients`` are online (at the run's start) or ``min_clients`` (later);
        at the start, ``min_clients`` suffice once ``node_wait`` seconds have passed. Raises
        :class:`FedswarmError` when fewer are online by then."""
        wanted = self.min_clients if self.started else self.clients
        deadline = time.monotonic() + self.node_wait
        while True:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= wanted:
                break
            if time.monotonic() > deadline:
                if len(node_ids) < self.min_clients:
                    raise FedswarmError(
                        f"only {len(node_ids)} client nodes connected within {self.node_wait:.0f} s; "
                        f"the run needs {self.min_clients}"
                    )
                log.warning(
                    "%d of %d client nodes online; going on with them (--min-clients %d)",
                    len(node_ids), wanted, self.min_clients,
                )  # fmt: skip
                break
            time.sleep(NODE_POLL_SECONDS)
        self.started = True
        return node_ids

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.scaffold:
            self.control = pop_mean_control(replies)  # FedAvg's checks want one ArrayRecord per reply
        valid, _ = check_replies(self, replies, is_train=True, validate=not self.codec.mixed_ranks)
        if not valid:
            return None, None
        result = self.codec.aggregate(self.codec.clients(valid, self.prior), self.prior, self.server_lr)
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        metrics[RESIDUAL] = result.residual
        return ArrayRecord(result.state), metrics

    def residual(self, replies: Iterable[Message], aggregated: ArrayRecord) -> float:
        """The residual of an aggregate this strategy did not compute (Flower's own, under central DP)."""
        clients = self.codec.clients(replies, self.prior)
        return self.codec.residual(clients, from_record(aggregated), self.prior, self.server_lr)


class CentralDpFedAvg(LoraStrategy):
    """The strategy Flower's central DP wrapper wraps: Flower's own FedAvg aggregation, as its accounting
    requires (the wrapper checks that ``aggregate_train`` is FedAvg's); its metrics carry no residual, so the
    coordinator measures it with :meth:`LoraStrategy.residual` on the replies as the nodes sent them."""

    aggregate_train = FedAvg.aggregate_train


def build_strategy(
    cfg: FederationConfig,
    codec: AdapterCodec,
    book: NodeBook,
    frozen: dict[str, torch.Tensor],
    node_wait: float,
    control: dict[str, torch.Tensor] | None = None,
) -> Strategy:
    """The run's strategy: :class:`LoraStrategy`, or Flower's central DP wrapper around :class:`CentralDpFedAvg`."""
    # server SGD is the codec's (svd takes it in product space); the other optimizers step after complete()
    server_lr = cfg.server_lr if cfg.server_optimizer == "sgd" else 1.0
    settings: dict[str, Any] = {
        "clients": cfg.clients, "min_clients": cfg.needed_clients(), "node_wait": node_wait, "frozen": frozen,
        "server_lr": server_lr, "fraction_evaluate": cfg.fraction_evaluate, "scaffold": cfg.scaffold,
        "control": control, "sample_size": cfg.sampled_per_round() if cfg.clients_per_round else 0, "seed": cfg.seed,
    }  # fmt: skip
    if not cfg.central_dp:
        return LoraStrategy(codec, book, **settings)
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    from fedswarm.common.flower_internals import NeighboringRelation, PrivacyConfig, SamplingMethod
    from fedswarm.server.coordinator.central_privacy import OpacusRdpAccountant

    accountant = OpacusRdpAccountant(
        PrivacyConfig(
            target_delta=cfg.delta,
            population_size=cfg.clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    return DifferentialPrivacyServerSideFixedClipping(
        CentralDpFedAvg(codec, book, weighted_by_key=Reply.UNIT_WEIGHT, **settings),
        noise_multiplier=cfg.central_noise,
        clipping_norm=cfg.central_clip,
        num_sampled_clients=cfg.clients_per_round or cfg.clients,  # the noise is sigma C / this
        accountant=accountant,
    )


def inner(strategy: Strategy) -> LoraStrategy:
    """The :class:`LoraStrategy` of ``strategy``, inside Flower's central DP wrapper or not."""
    found = getattr(strategy, "strategy", strategy)
    if not isinstance(found, LoraStrategy):
        raise TypeError(f"not a fedswarm strategy: {type(strategy).__name__}")
    return found
