"""What every aggregation mode answers: the adapter codec's contract, and its shared defaults.

A round's adapter crosses the wire twice. The coordinator sends the global adapter
(:meth:`AdapterCodec.outgoing`, per node :meth:`AdapterCodec.personal`); the node rebuilds
its own adapter from it (:meth:`rebuild`, :meth:`trainable`) and replies (:meth:`reply`);
the coordinator checks the reply's shape (:meth:`expected_shapes`), decodes it once
(:meth:`decode`), aggregates the replies with the codec's Flower strategy
(:meth:`strategy`), completes the global adapter (:meth:`complete`) and measures how far
the aggregate is from the clients' mean product (:meth:`residual`). Everything that
differs between fedavg, ffa and svd is a method or a class attribute here; nothing else
in fedswarm compares the mode's name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from fedswarm.common.codecs.product import Client, State, apply_server_lr, residual, server_step
from fedswarm.common.contract import Reply, from_record, number
from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord, Message
    from flwr.serverapp.strategy import Strategy

    from fedswarm.common.config import FederationConfig


class AdapterCodec:
    """fedavg's behaviour (both factors travel, are trained and are averaged); modes override."""

    name: ClassVar[str]
    help: ClassVar[str]
    trains_a: ClassVar[bool] = True  # nodes train (and send) lora_A
    mixed_ranks: ClassVar[bool] = False  # clients may train at different ranks
    scaffold: ClassVar[bool] = True  # --scaffold's control variates fit it
    central_dp: ClassVar[bool] = True  # Flower's central DP wrapper fits its strategy
    server_optimizers: ClassVar[bool] = True  # the aggregate is factor-wise: any --server-optimizer applies

    def __init__(self, cfg: FederationConfig) -> None:
        self.alpha = cfg.lora_alpha
        self.rank = cfg.server_rank()
        # server SGD is the codec's (svd takes it in product space); other optimizers step after complete()
        self.server_lr = cfg.server_lr if cfg.server_optimizer == "sgd" else 1.0
        self.fraction_evaluate = cfg.fraction_evaluate
        self._decoded: dict[int, tuple[ArrayRecord, dict[str, torch.Tensor]]] = {}

    # ---- settings -------------------------------------------------------------------------
    @classmethod
    def check(cls, cfg: FederationConfig) -> None:
        """Refuse settings this mode cannot honour (one-line :class:`InputError`)."""
        from fedswarm.common.codecs import CODECS, spoken

        if cfg.scaffold and not cls.scaffold:
            fits = spoken([c.name for c in CODECS.values() if c.scaffold])
            raise InputError(f"--scaffold works with --aggregation {fits} ({cls.scaffold_why()})")
        if cfg.central_dp and not cls.central_dp:
            fits = spoken([c.name for c in CODECS.values() if c.central_dp])
            raise InputError(f"--central-dp works with --aggregation {fits} (it wraps FedAvg)")
        if cfg.server_optimizer != "sgd" and not cls.server_optimizers:
            fits = spoken([c.name for c in CODECS.values() if c.server_optimizers])
            raise InputError(
                f"--server-optimizer {cfg.server_optimizer} works with --aggregation {fits}: {cls.name} re-factorises "
                "a product-space mean, so only server SGD (--server-lr) applies to it"
            )
        if not cls.mixed_ranks and len(set(cfg.ranks())) > 1:
            fits = spoken([c.name for c in CODECS.values() if c.mixed_ranks])
            raise InputError(f"clients with different --client-ranks need --aggregation {fits}")

    @classmethod
    def scaffold_why(cls) -> str:
        return f"{cls.name} re-bases the factors each round"

    @classmethod
    def global_rank(cls, cfg: FederationConfig) -> int:
        """Rank of the global adapter the coordinator holds."""
        return cfg.lora_rank

    # ---- coordinator -> node ------------------------------------------------------------------
    def outgoing(self, state: State) -> dict[str, torch.Tensor]:
        """The global adapter as every node receives it (also for federated evaluation)."""
        return dict(state)

    def personal(self, state: State, rank: int | None) -> dict[str, torch.Tensor] | None:
        """What a node of ``rank`` receives instead of :meth:`outgoing`; None when that one fits."""
        return None

    # ---- on the node --------------------------------------------------------------------------
    def rebuild(self, current: State, received: State, rank: int) -> dict[str, torch.Tensor]:
        """The node's adapter for this round, at its own ``rank``, from what it received.

        ``current`` is the node's adapter as it stands (its seeded A on a fresh model); a
        received adapter of another rank is resized keeping ``s * B @ A``, new rows of A taken
        from ``current`` so the padding can train.
        """
        from fedswarm.common.lora import lora_rank_of, resize_rank

        sent_rank = lora_rank_of(received)
        if sent_rank == rank:
            return dict(received)
        return resize_rank(received, rank, self.alpha / sent_rank, self.alpha / rank, filler=current)

    def trainable(self, name: str) -> bool:
        """Whether the node trains the LoRA parameter ``name``."""
        return self.trains_a or "lora_A" not in name

    def reply(self, state: State) -> dict[str, torch.Tensor]:
        """What the node sends back: the tensors it trained."""
        return {k: v for k, v in state.items() if self.trainable(k)}

    # ---- replies on the coordinator -----------------------------------------------------------
    def expected_shapes(self, sent: State, rank: object) -> dict[str, tuple[int, ...]]:
        """A well-formed reply holds exactly the tensors the node was sent, in their shapes."""
        return {k: tuple(v.shape) for k, v in sent.items()}

    def decode(self, reply: Message) -> dict[str, torch.Tensor]:
        """The reply's adapter as tensors, decoded once per record (screening, aggregation and
        the residual all ask; a record Flower's central DP replaced by a clipped one is new)."""
        record = reply.content.array_records["arrays"]
        hit = self._decoded.get(id(record))
        if hit is None or hit[0] is not record:
            hit = (record, from_record(record))
            self._decoded[id(record)] = hit
        return hit[1]

    def forget(self) -> None:
        """Drop the decoded replies (between rounds)."""
        self._decoded.clear()

    def client(self, reply: Message, prior: State) -> Client:
        """A reply as an aggregation input: its full adapter (frozen tensors from ``prior``), weight and scale."""
        from fedswarm.common.lora import lora_rank_of

        state = {**{k: v for k, v in prior.items() if not self.trainable(k)}, **self.decode(reply)}
        return Client(state, number(reply.content["metrics"], Reply.NUM_EXAMPLES), self.alpha / lora_rank_of(state))

    def strategy(self, min_clients: int, central_dp: bool = False) -> Strategy:
        """The Flower strategy that aggregates this mode's replies (to be wrapped in Flower's central DP
        when ``central_dp``; such a strategy weights every client once)."""
        raise NotImplementedError

    def complete(self, aggregated: State, prior: State) -> dict[str, torch.Tensor]:
        """The next global adapter from the strategy's aggregate and the adapter sent (``prior``).

        Factor-wise modes take FedOpt's server step here (after any central DP noise): each
        array moves ``--server-lr`` times its change; tensors the nodes do not train are kept.
        """
        stepped = apply_server_lr(prior, aggregated, self.server_lr)
        return {**{k: v for k, v in prior.items() if not self.trainable(k)}, **stepped}

    def residual(self, strategy: Any, replies: Iterable[Message], new: State, prior: State) -> float:
        """Relative Frobenius error of ``new``'s product against the server-stepped ``sum p s B A``."""
        clients = [self.client(r, prior) for r in replies]
        scale = self.alpha / self.rank
        return residual(server_step(clients, prior, scale, self.server_lr), new, scale)


def shapes_at_rank(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """``shapes`` with every LoRA factor's rank dimension set to ``rank``."""
    out = {}
    for key, shape in shapes.items():
        if "lora_A" in key:
            out[key] = (rank, *shape[1:])
        elif "lora_B" in key:
            out[key] = (*shape[:-1], rank)
        else:
            out[key] = shape
    return out
