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
``fedswarm node`` starts the worker beside the SuperNode and restarts it if it dies. The task
running when a worker dies is in its journal (``--journal``: the task's token and the message's
metadata, never its content), so the restarted worker answers it at once with Flower's
"ClientApp stopped responding" error reply: the coordinator counts the node as failed for that
round and goes on, instead of waiting for the SuperNode's heartbeat expiry (which only happens
when a later task arrives, and then answers every unanswered message of the run, the new one too).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedswarm.common.flower_internals import (
    AcquireTaskRequest,
    ErrorCode,
    HeartbeatSender,
    Node,
    ProtobufClientInterceptor,
    ProtoMessage,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    Run,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SubStatus,
    TaskType,
    context_from_proto,
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
    make_simple_http_retry_invoker,
    make_task_heartbeat_fn_http,
    message_from_proto,
    message_to_proto,
    pull_and_inflate_object_from_tree,
    push_message,
    push_task_output,
    remove_content_from_message,
    run_from_proto,
    set_message_id,
)

log = logging.getLogger("fedswarm")

POLL_SECONDS = 0.1  # between AcquireTask calls while idle (Flower's SuperExec: 1 s)
APP_NAME = "fedswarm"  # the FAB this worker runs (its publisher); any other app gets an error reply
# Pulling a message's objects: the SuperNode stores them only once it has the whole message from the
# SuperLink, so the first tries usually miss. Flower's defaults (1 s, doubling to 10 s) cost seconds
# per round; these retry fast. A task whose objects never come (the SuperNode gave up on a message
# of a run that stopped) fails after PULL_SECONDS, in its own thread: it never holds up other tasks.
PULL_BACKOFF, PULL_BACKOFF_CAP, PULL_SECONDS = 0.02, 0.25, 600.0


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


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run]:
    """Flower's ``run_clientapp.pull_task_input`` with fast, bounded retries for the message's objects."""
    res = client.PullTaskInput(PullTaskInputRequest())
    context, run = context_from_proto(res.context), run_from_proto(res.run)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        max_time=PULL_SECONDS,
        max_tries_per_object=None,
        initial_backoff=PULL_BACKOFF,
        backoff_cap=PULL_BACKOFF_CAP,
    )
    set_message_id(message, tree.object_id)  # as Flower: the deflated message lacks its id
    return message, context, run


CRASHED = "ClientApp stopped responding."  # Flower's own reason for a ClientApp that died mid-task


def write_journal(path: Path, token: str, message: Message, context: Context) -> None:
    """Record the running task (token, node, run, the message without its content), atomically."""
    metadata_only = message_to_proto(remove_content_from_message(message)).SerializeToString()
    entry = {
        "token": token,
        "node_id": context.node_id,
        "run_id": context.run_id,
        "message": base64.b64encode(metadata_only).decode(),
    }
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the token is a secret of this node
    with os.fdopen(fd, "w") as f:
        json.dump(entry, f)
    os.replace(tmp, path)


def recover(address: str, path: Path) -> bool:
    """Answer the task a dead worker left in its journal with Flower's crash error reply; True if there was one."""
    if not path.exists():
        return False
    entry = json.loads(path.read_text())
    proto = ProtoMessage()
    proto.ParseFromString(base64.b64decode(entry["message"]))
    message = message_from_proto(proto)
    context = Context(
        run_id=entry["run_id"], node_id=entry["node_id"], node_config={}, state=RecordDict(), run_config={}
    )
    client = _client(address, entry["token"])
    try:
        reply = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=CRASHED), reply_to=message)
        push_message(client, reply, context)
        push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=CRASHED)
        log.warning("answered the task of run %d that the last worker left unfinished: %s", entry["run_id"], CRASHED)
    except Exception as exc:  # noqa: BLE001 - its token expired: the SuperNode answers it itself
        log.error("could not answer the task the last worker left unfinished: %s", exc)
    finally:
        client.close()
        path.unlink(missing_ok=True)
    return True


@dataclass
class Task:
    """One acquired task, from its token to the moment it is pushed back."""

    token: str
    client: RuntimeHttpClient
    heartbeat: HeartbeatSender
    started: float = field(default_factory=time.perf_counter)
    message: Message | None = None
    context: Context | None = None
    run: Run | None = None

    def finish(self, reply: Message | None, status: str, details: str) -> None:
        """Push the reply (if any), the context and the task's status; release the token."""
        try:
            if reply is not None and self.context is not None:
                push_message(self.client, reply, self.context)
        except Exception as exc:  # noqa: BLE001 - the SuperNode went away; the task expires there
            log.error("could not push the reply: %s", exc)
        try:
            push_task_output(client=self.client, context=self.context, sub_status=status, details=details)
        finally:
            if self.heartbeat.is_running:
                self.heartbeat.stop()
            self.client.close()


def _error_details(exc: BaseException) -> str:
    return f"{type(exc)}:<'{exc}'>"  # flwr-clientapp's format


class Worker:
    """Acquires ClientApp tasks from one SuperNode and runs them in this process, one at a time.

    Each acquired task's input is pulled in its own thread (network waits overlap, and a task
    whose message never arrives cannot hold up the next); the ClientApp runs on the serving
    thread, one task at a time, in the order their inputs arrived.
    """

    def __init__(self, address: str, app: ClientApp, journal: Path | None = None) -> None:
        self.address = address
        self.app = app
        self.journal = journal
        self.tasks = 0
        self.seconds: list[float] = []
        self.stop = threading.Event()
        self.ready: queue.Queue[Task] = queue.Queue()

    def serve(self) -> None:
        """Run tasks until :attr:`stop` is set."""
        client = _client(self.address)
        try:
            while not self.stop.is_set():
                res = client.AcquireTask(
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
                )
                if res.HasField("task") and res.token:
                    threading.Thread(target=self.prepare, args=(res.token,), daemon=True).start()
                    continue
                try:
                    task = self.ready.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                self.run_task(task)
        finally:
            client.close()

    def prepare(self, token: str) -> None:
        """Pull one task's message and context (its own thread); queue it, or fail it as Flower would."""
        client = _client(self.address, token)
        task = Task(token, client, HeartbeatSender(make_task_heartbeat_fn_http(client)))
        try:
            task.heartbeat.start()
            task.message, task.context, task.run = pull_task_input(client)
        except Exception as exc:  # noqa: BLE001 - the task fails; the worker goes on
            log.error("could not pull a task's input: %s", exc)
            task.finish(None, SubStatus.FAILED, _error_details(exc))
            return
        self.ready.put(task)

    def run_task(self, task: Task) -> None:
        """What ``flwr-clientapp`` does with a pulled task, with the ClientApp already loaded."""
        assert task.message is not None and task.context is not None and task.run is not None
        message, run = task.message, task.run
        log.info(
            "task %d: %s message of run %d (pulled in %.2f s)",
            self.tasks + 1, message.metadata.message_type, run.run_id, time.perf_counter() - task.started,
        )  # fmt: skip
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        if self.journal is not None:
            write_journal(self.journal, task.token, message, task.context)
        try:
            if not str(run.fab_id).startswith(APP_NAME + "/"):
                raise RuntimeError(f"this node's warm worker runs fedswarm's ClientApp only, not {run.fab_id!r}")
            reply = self.app(message=message, context=task.context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - as flwr-clientapp: any ClientApp error becomes an error reply
            details = _error_details(exc)
            log.error("ClientApp raised an exception", exc_info=exc)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            task.finish(reply, status, details)
            if self.journal is not None:
                self.journal.unlink(missing_ok=True)
        self.tasks += 1
        seconds = time.perf_counter() - task.started
        log.info("task %d done in %.1f s (%s)", self.tasks, seconds, status)
        self.seconds.append(seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedswarm.client.trainer.warm", description=__doc__)
    parser.add_argument("--runtime-api", required=True, help="HOST:PORT of the SuperNode's Runtime API")
    parser.add_argument("--journal", type=Path, help="file recording the running task (for a restarted worker)")
    args = parser.parse_args(argv)
    from fedswarm.client.trainer.app import app
    from fedswarm.common.logs import setup_logging

    setup_logging()
    if args.journal is not None:
        recover(args.runtime_api, args.journal)
    worker = Worker(args.runtime_api, app, args.journal)

    def _stop(signum: int, frame: FrameType | None) -> None:
        worker.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("warm worker: running ClientApp tasks of the SuperNode at %s in this process", args.runtime_api)
    worker.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
