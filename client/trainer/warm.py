"""The warm worker: runs the SuperNode's ClientApp tasks in one long-lived process.

Flower 1.42's SuperNode (``--isolation process``) serves its Runtime API and leaves running
the tasks to an executor. Flower's own (``flower-superexec``) starts a fresh
``flwr-clientapp`` process per message: every round re-imports torch, transformers, peft and
flwr and reloads the model. This worker speaks the same Runtime API calls those two make —
acquire a task and its single-use token, pull the message and context, run the ClientApp,
push the reply, the context and the task's status — but runs fedswarm's ClientApp in this
process, so imports, the base model, the tokenised data and the LoRA wrapper stay loaded
across messages and rounds. What must not carry over (adapter weights, optimiser state,
RNG) is rebuilt from each message (``runtime.py``, ``node_round.py``).

A ClientApp exception becomes an error reply, as in ``flwr-clientapp``; the worker goes on.
``fedswarm node`` starts the worker beside the SuperNode and restarts it if it dies.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

log = logging.getLogger("fedswarm")

POLL_SECONDS = 0.1  # between AcquireTask calls while idle (Flower's SuperExec: 1 s)
APP_NAME = "fedswarm"  # the FAB this worker runs (its publisher); any other app gets an error reply


def _client(address: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")
    ]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API is the SuperNode's, on this machine's loopback
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


class Worker:
    """Acquires ClientApp tasks from one SuperNode and runs them in this process, one at a time."""

    def __init__(self, address: str, app: ClientApp) -> None:
        self.address = address
        self.app = app
        self.tasks = 0
        self.seconds: list[float] = []
        self.stop = threading.Event()

    def serve(self) -> None:
        """Run tasks until :attr:`stop` is set."""
        client = _client(self.address)
        try:
            while not self.stop.is_set():
                res = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
                )
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                else:
                    self.stop.wait(POLL_SECONDS)
        finally:
            client.close()

    def run_task(self, token: str) -> None:
        """What ``flwr-clientapp`` does for one token, with the ClientApp already loaded."""
        client = _client(self.address, token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        started = time.perf_counter()
        try:
            heartbeat.start()
            message, context, run, _fab = pull_task_input(client)
            pulled = time.perf_counter()
            log.info(
                "task %d: %s message of run %d (pulled in %.1f s)",
                self.tasks + 1, message.metadata.message_type, run.run_id, pulled - started,
            )  # fmt: skip
            if not str(run.fab_id).startswith(APP_NAME + "/"):
                raise RuntimeError(f"this node's warm worker runs fedswarm's ClientApp only, not {run.fab_id!r}")
            reply = self.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - as flwr-clientapp: any ClientApp error becomes an error reply
            details = f"{type(exc)}:<'{exc}'>"
            log.error("ClientApp raised an exception", exc_info=exc)
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as exc:  # noqa: BLE001 - the SuperNode went away; the task expires there
                log.error("could not push the reply: %s", exc)
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        self.tasks += 1
        log.info("task %d done in %.1f s (%s)", self.tasks, time.perf_counter() - started, status)
        self.seconds.append(time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedswarm.client.trainer.warm", description=__doc__)
    parser.add_argument("--runtime-api", required=True, help="HOST:PORT of the SuperNode's Runtime API")
    args = parser.parse_args(argv)
    from fedswarm.client.trainer.app import app
    from fedswarm.common.logs import setup_logging

    setup_logging()
    worker = Worker(args.runtime_api, app)

    def _stop(signum: int, frame: FrameType | None) -> None:
        worker.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("warm worker: running ClientApp tasks of the SuperNode at %s in this process", args.runtime_api)
    worker.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
