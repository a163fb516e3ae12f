"""What every aggregation mode answers: the adapter codec's contract, and its shared defaults.

A round's adapter crosses the wire twice. The coordinator sends the global adapter
(:meth:`AdapterCodec.outgoing`, per node :meth:`AdapterCodec.personal`); the node rebuilds
its own adapter from it (:meth:`rebuild`, :meth:`trainable`) and replies (:meth:`reply`);
the coordinator checks the reply's shape (:meth:`expected_shapes`), turns the replies into
aggregation inputs (:meth:`clients`, one decode per reply), aggregates them
(:meth:`aggregate`: the mode's rule, with the residual of that aggregate) and completes the
global adapter (:meth:`complete`). Everything that differs between fedavg, ffa and svd is a
method or a class attribute here; nothing else in fedswarm compares the mode's name.

A codec is a rule, not a store: it holds the run's alpha and global rank and nothing else,
so every method is a function of its arguments (``tests/test_codecs.py`` interleaves two
rounds' calls). The Flower strategy that calls it lives with the coordinator
(``server/coordinator/strategy.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedswarm.common.codecs.product import Client, State, apply_server_lr, residual, server_step
from fedswarm.common.contract import Reply, from_record, number
from fedswarm.common.errors import InputError

if TYPE_CHECKING:
    import torch
    from flwr.app import Message

    from fedswarm.common.config import FederationConfig, NodeSettings


@dataclass(frozen=True)
class Aggregate:
    """A mode's aggregate of one round's replies, and how far its product lies from the clients' mean product."""

    state: dict[str, torch.Tensor]  # what complete() turns into the next global adapter
    residual: float  # ||sum p s B A - s' B' A'||_F / ||sum p s B A||_F of the adapter complete() gives


class AdapterCodec:
    """fedavg's behaviour (both factors travel, are trained and are averaged); modes override."""

    name: ClassVar[str]
    help: ClassVar[str]
    trains_a: ClassVar[bool] = True  # nodes train (and send) lora_A
    mixed_ranks: ClassVar[bool] = False  # clients may train at different ranks
    scaffold: ClassVar[bool] = True  # --scaffold's control variates fit it
    central_dp: ClassVar[bool] = True  # Flower's central DP wrapper fits its strategy
    server_optimizers: ClassVar[bool] = True  # the aggregate is factor-wise: any --server-optimizer applies

    def __init__(self, cfg: NodeSettings) -> None:
        self.alpha = cfg.lora_alpha
        self.rank = cfg.server_rank()

    # ---- settings -------------------------------------------------------------------------
    @classmethod
    def check_node(cls, cfg: NodeSettings) -> None:
        """Refuse node settings this mode cannot honour (one-line :class:`InputError`)."""
        from fedswarm.common.codecs import CODECS, spoken

        if cfg.scaffold and not cls.scaffold:
            fits = spoken([c.name for c in CODECS.values() if c.scaffold])
            raise InputError(f"--scaffold works with --aggregation {fits} ({cls.scaffold_why()})")
        if not cls.mixed_ranks and len(set(cfg.ranks())) > 1:
            fits = spoken([c.name for c in CODECS.values() if c.mixed_ranks])
            raise InputError(f"clients with different --client-ranks need --aggregation {fits}")

    @classmethod
    def check(cls, cfg: FederationConfig) -> None:
        """Refuse a run's settings this mode cannot honour: the node's, central DP and the server optimiser."""
        from fedswarm.common.codecs import CODECS, spoken

        cls.check_node(cfg)
        if cfg.central_dp and not cls.central_dp:
            fits = spoken([c.name for c in CODECS.values() if c.central_dp])
            raise InputError(f"--central-dp works with --aggregation {fits} (it wraps FedAvg)")
        if cfg.server_optimizer != "sgd" and not cls.server_optimizers:
            fits = spoken([c.name for c in CODECS.values() if c.server_optimizers])
            raise InputError(
                f"--server-optimizer {cfg.server_optimizer} works with --aggregation {fits}: {cls.name} re-factorises "
                "a product-space mean, so only server SGD (--server-lr) applies to it"
            )

    @classmethod
    def scaffold_why(cls) -> str:
        return f"{cls.name} re-bases the factors each round"

    @classmethod
    def global_rank(cls, cfg: NodeSettings) -> int:
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
        from fedswarm.common.lora_state import lora_rank_of, resize_rank

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
        """The reply's adapter as tensors (decoded anew on every call: callers decode a reply once)."""
        return from_record(reply.content.array_records["arrays"])

    def clients(self, replies: Iterable[Message], prior: State) -> list[Client]:
        """The replies as aggregation inputs, each decoded once: its full adapter (the tensors nodes do not
        train taken from ``prior``), its weight (``num-examples``) and its scale."""
        from fedswarm.common.lora_state import lora_rank_of

        frozen = {k: v for k, v in prior.items() if not self.trainable(k)}
        out = []
        for reply in replies:
            state = {**frozen, **self.decode(reply)}
            weight = number(reply.content["metrics"], Reply.NUM_EXAMPLES)
            out.append(Client(state, weight, self.alpha / lora_rank_of(state)))
        return out

    def aggregate(self, clients: Sequence[Client], prior: State, server_lr: float = 1.0) -> Aggregate:
        """The mode's aggregate of ``clients`` (who started from ``prior``) and its residual."""
        raise NotImplementedError

    def complete(self, aggregated: State, prior: State, server_lr: float = 1.0) -> dict[str, torch.Tensor]:
        """The next global adapter from an aggregate and the adapter sent (``prior``).

        Factor-wise modes take FedOpt's server step here (after any central DP noise): each
        array moves ``server_lr`` times its change; tensors the nodes do not train are kept.
        """
        stepped = apply_server_lr(prior, aggregated, server_lr)
        return {**{k: v for k, v in prior.items() if not self.trainable(k)}, **stepped}

    def residual(self, clients: Sequence[Client], aggregated: State, prior: State, server_lr: float = 1.0) -> float:
        """Relative Frobenius error of the completed adapter's product against the server-stepped ``sum p s B A``."""
        scale = self.alpha / self.rank
        new = self.complete(aggregated, prior, server_lr)
        return residual(server_step(clients, prior, scale, server_lr), new, scale)


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
