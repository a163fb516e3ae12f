"""The coordinator's Flower strategy: the aggregation mode's own (its codec's), optionally under central DP.

- The codecs' strategies (``common/codecs/strategies.py``) are Flower's FedAvg with the
  mode's aggregation rule: fedavg and ffa the weighted mean of what clients send (both
  factors, or only B when A is frozen at the shared seed); svd averages the products
  ``s*B@A`` and re-factorises them.
- ``--server-lr`` (FedOpt's server SGD): fedavg/ffa move the global factors that many
  times the clients' mean change (the codec's ``complete``, after any central DP noise);
  svd takes the same step in product space, inside its aggregation.
- ``--central-dp`` wraps the strategy in Flower's server-side fixed-clipping DP wrapper with
  Flower's RDP accountant; that needs equal client weights, so it weights by
  ``unit-weight`` (every client counts once: user-level DP).
"""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedswarm.common.codecs import AdapterCodec
from fedswarm.common.config import FederationConfig


def build_strategy(cfg: FederationConfig, codec: AdapterCodec, min_clients: int) -> Strategy:
    if not cfg.central_dp:
        return codec.strategy(min_clients)
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
        codec.strategy(min_clients, central_dp=True),
        noise_multiplier=cfg.central_noise,
        clipping_norm=cfg.central_clip,
        num_sampled_clients=cfg.clients,
        accountant=accountant,
    )
