"""Strategies over LoRA arrays: Flower's FedAvg (fedavg, ffa), an SVD variant, central DP.

- ``fedavg`` and ``ffa`` use Flower's FedAvg unchanged (weighted mean of what clients
  send: both factors, or only B when A is frozen at the shared seed).
- ``svd`` averages the products ``s*B@A`` and re-factorises them (``aggregation.py``).
- ``--server-lr`` (FedOpt's server SGD): fedavg/ffa move the global factors that many
  times the clients' mean change (``federation.py``, after any central DP noise); svd
  takes the same step in product space, inside its aggregation.
- ``--central-dp`` wraps FedAvg in Flower's server-side fixed-clipping DP wrapper with
  Flower's RDP accountant; that needs equal client weights, so it weights by
  ``unit-weight`` (every client counts once: user-level DP).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedswarm.common.config import FederationConfig
from fedswarm.common.contract import Reply
from fedswarm.server.coordinator.aggregation import Client, server_step, svd_aggregate, svd_state


class LoraFedAvg(FedAvg):
    """Flower's FedAvg over the LoRA arrays (its aggregate_train, untouched)."""

    def __init__(
        self, min_clients: int, fraction_evaluate: float = 0.0, weighted_by_key: str = Reply.NUM_EXAMPLES
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_clients,
            min_evaluate_nodes=min_clients if fraction_evaluate > 0 else 0,
            min_available_nodes=min_clients,
            weighted_by_key=weighted_by_key,
        )


class LoraSvd(LoraFedAvg):
    """Aggregate ``sum p s B A`` per layer and truncate its SVD at ``global_rank``.

    Clients may have different ranks; ``last_residual`` holds the relative error of the
    truncation (0 when ``global_rank`` >= the sum of the client ranks). A ``server_lr`` other
    than 1 steps in product space: the global adapter sent this round (``configure_train``)
    joins the sum with weight ``1 - server_lr`` (:func:`aggregation.server_step`).
    """

    def __init__(
        self, min_clients: int, global_rank: int, alpha: float, fraction_evaluate: float = 0.0, server_lr: float = 1.0
    ) -> None:
        super().__init__(min_clients, fraction_evaluate)
        self.global_rank = global_rank
        self.alpha = alpha
        self.server_lr = server_lr
        self.prior: dict | None = None
        self.last_residual = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.prior = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        clients = [client_of(r, self.alpha) for r in valid]
        clients = server_step(clients, self.prior, self.alpha / self.global_rank, self.server_lr)
        result = svd_aggregate(clients, self.global_rank)
        self.last_residual = result.residual
        state = svd_state(result, self.global_rank, self.alpha / self.global_rank)
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        return ArrayRecord(state), metrics


def client_of(reply: Message, alpha: float, fixed: dict | None = None) -> Client:
    """A reply as an aggregation input; ``fixed`` supplies the frozen A under ffa."""
    from fedswarm.common.lora import lora_rank_of

    state = reply.content["arrays"].to_torch_state_dict()
    if fixed:
        state = {**fixed, **state}
    weight = float(reply.content["metrics"][Reply.NUM_EXAMPLES])
    return Client(state, weight, alpha / lora_rank_of(state))


def build_strategy(cfg: FederationConfig, min_clients: int) -> Strategy:
    if cfg.aggregation == "svd":
        return LoraSvd(min_clients, cfg.server_rank(), cfg.lora_alpha, cfg.fraction_evaluate, cfg.server_lr)
    if not cfg.central_dp:
        return LoraFedAvg(min_clients, cfg.fraction_evaluate)
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod

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
        LoraFedAvg(min_clients, cfg.fraction_evaluate, weighted_by_key=Reply.UNIT_WEIGHT),
        noise_multiplier=cfg.central_noise,
        clipping_norm=cfg.central_clip,
        num_sampled_clients=cfg.clients,
        accountant=accountant,
    )
