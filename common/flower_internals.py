"""Everything fedswarm takes from Flower's internals, behind one door, for the Flower it was written against.

Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``) is used where it is
needed. What it does not offer is taken from its internals here, and only here
(``tests/test_layout.py`` refuses an internal import anywhere else):

- warm nodes (``client/trainer/warm.py``) speak the SuperNode's Runtime API as ``flwr-clientapp``
  does, with the ClientApp loaded once (Flower issue 3670): its protobuf messages, serde,
  interceptors, object inflation and push helpers;
- the SuperNode launcher (``client/trainer/supernode.py``) shortens the SuperNode's idle poll
  and its reconnect back-off (module-level ``time`` and ``MAX_RETRY_DELAY``);
- the simulation (``simulation/engine.py``) runs Flower's engine behind ``run_simulation()``
  (``_run_simulation``), which takes an exit event and a ServerApp context;
- central DP (``server/coordinator``) uses Flower's privacy accounting types;
- the coordinator's strategy calls FedAvg's reply check (``_check_and_log_replies``).

These change between Flower releases without notice. :func:`check_flower_version` compares
the installed Flower with :data:`WRITTEN_FOR` and fails with a message naming this module:
``tests/test_flower_internals.py`` runs it, so a Flower upgrade fails one clear test first.
Heavy engines (Ray's) are imported only by the functions that need them.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from flwr.app.message import remove_content_from_message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, message_from_proto, message_to_proto, run_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullAppMessagesRequest, PullTaskInputRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedswarm.common.errors import FedswarmError

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.serverapp.strategy import FedAvg

WRITTEN_FOR = "1.42.0"  # the flwr release every name below was read in (pyproject.toml pins it)

__all__ = [
    "WRITTEN_FOR", "AcquireTaskRequest", "act_as_node", "ErrorCode", "GaussianPrivacyEvent", "HeartbeatSender",
    "NeighboringRelation", "Node", "PrivacyConfig", "PrivacySpent", "ProtoMessage", "ProtobufClientInterceptor",
    "PullAppMessagesRequest", "PullTaskInputRequest", "Run", "RuntimeHttpClient", "RuntimeTokenHttpInterceptor",
    "RuntimeVersionHttpInterceptor", "SamplingMethod", "SubStatus", "TaskType", "check_flower_version",
    "check_replies", "context_from_proto", "is_simulation_grid", "make_confirm_message_received_fn_protobuf",
    "make_pull_object_fn_protobuf", "make_simple_http_retry_invoker", "make_task_heartbeat_fn_http",
    "message_from_proto", "message_to_proto", "pull_and_inflate_object_from_tree", "push_message",
    "push_task_output", "remove_content_from_message", "run_from_proto", "run_simulation_engine",
    "set_message_id", "shorten_supernode_waits", "flower_supernode",
]  # fmt: skip


class FlowerVersionError(FedswarmError):
    """The installed Flower is not the release this module's internals were read in."""


def check_flower_version(installed: str | None = None) -> str:
    """The installed flwr version; :class:`FlowerVersionError` naming this module when it is not :data:`WRITTEN_FOR`."""
    if installed is None:
        try:
            installed = version("flwr")
        except PackageNotFoundError:
            installed = "none"
    if installed != WRITTEN_FOR:
        raise FlowerVersionError(
            f"fedswarm.common.flower_internals was written against flwr {WRITTEN_FOR}, but flwr {installed} is "
            "installed: warm nodes, the SuperNode launcher, the simulation engine and central DP use Flower "
            f"internals read in {WRITTEN_FOR}; install flwr=={WRITTEN_FOR} (pyproject.toml pins it) or port this module"
        )
    return installed


def is_simulation_grid(grid: object) -> bool:
    """Whether the ServerApp runs in a simulation (``flwr run .`` on a local federation, or ``fedswarm simulate``):
    Flower gives it the in-memory Grid there."""
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def act_as_node(node_id: int, run_id: int = 1, task_id: int = 1) -> None:
    """Stamp the messages built from now on as Flower's engine does inside a task of node ``node_id``
    (a reply's source is the node that built it); tests build replies without an engine."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id


def set_message_id(message: Message, message_id: str) -> None:
    """Give an inflated message the id its object tree has (Flower does it so; the metadata has no setter)."""
    message.metadata.__dict__["_message_id"] = message_id


def check_replies(
    strategy: FedAvg, replies: Iterable[Message], is_train: bool, validate: bool = True
) -> tuple[list[Message], list[Message]]:
    """FedAvg's own reply check: (replies with content, error replies), logged as Flower logs them."""
    valid, errors = strategy._check_and_log_replies(replies, is_train=is_train, validate=validate)  # noqa: SLF001
    return list(valid), list(errors)


def shorten_supernode_waits(sleeps: Any, max_retry_delay: float) -> None:
    """The SuperNode's idle poll sleeps through ``sleeps`` (a stand-in for its module's ``time``) and its
    reconnect back-off grows to ``max_retry_delay`` seconds at most (read when each retry schedule starts)."""
    import flwr.supercore.retry.grpc_retry as grpc_retry
    import flwr.supercore.retry.http_retry as http_retry
    import flwr.supernode.start_client_internal as loop

    loop.time = sleeps
    for retry in (grpc_retry, http_retry):
        setattr(retry, "MAX_RETRY_DELAY", max_retry_delay)  # noqa: B010 - Flower's module constant


def flower_supernode() -> None:
    """``flower-supernode``'s entry point (reads ``sys.argv``)."""
    from flwr.supernode.cli import flower_supernode as main

    main()


def run_simulation_engine(**kwargs: Any) -> None:
    """Flower's simulation engine (``_run_simulation``, behind ``run_simulation()``), with its exit event."""
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    _run_simulation(exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE, **kwargs)
