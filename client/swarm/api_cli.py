"""``fedswarm swarm api``: the swarm behind an OpenAI-compatible HTTP API (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from typing import Any

from fedswarm.common.options import add_arguments, host_option, option, registry_option, threads_option
from fedswarm.common.swarm_cli import SwarmSecurity, security_of

API_KEY_ENV = "FEDSWARM_API_KEY"
GRACEFUL_STOP_S = 5.0  # on SIGTERM/Ctrl-C, how long running requests may finish


@dataclass(frozen=True, kw_only=True)
class ApiCommand(SwarmSecurity):
    """``fedswarm swarm api``: applications authenticate with ``Authorization: Bearer API_KEY``."""

    registry: list[str] = registry_option()
    host: str = host_option()
    port: int = option(8000, "port (0 picks a free one and prints it)")
    concurrency: int = option(8, "generations run at once; more requests wait for a worker")
    max_context: int = option(
        4096, "longest prompt + completion, tokens (a server refuses sessions past its own --max-length)"
    )
    default_max_tokens: int = option(256, "max_tokens of a request that gives none (cut to what the context leaves)")
    threads: int = threads_option()
    api_key: list[str] | None = option(
        None,
        "a bearer token applications may send (repeatable; default: $FEDSWARM_API_KEY, comma-separated; "
        "none: the swarm token, if any)",
        repeat=True,
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    api = commands.add_parser("api", help="serve the swarm over an OpenAI-compatible HTTP API")
    add_arguments(api, ApiCommand)
    api.set_defaults(handler=run_api)


def run_api(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from fedswarm.client.swarm.service import SwarmService
    from fedswarm.common.addresses import registries_arg
    from fedswarm.common.errors import InputError

    for name in ("concurrency", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    keys = _api_keys(args)
    security = security_of(args, client=True)
    keys = keys or ((security.token,) if security.token else ())  # type: ignore[attr-defined]
    if not keys and not args.insecure:
        raise InputError(
            "the HTTP API needs --api-key KEY (or $FEDSWARM_API_KEY) for its applications' bearer tokens, "
            "or --insecure on a trusted machine"
        )
    service = SwarmService(registries_arg(args.registry), security, args.max_context)  # type: ignore[arg-type]
    servers = service.servers()  # an unreachable registry is one line, before torch imports
    sock = _listen(args.host, args.port)
    import torch

    from fedswarm.client.swarm.api import ApiState, build_app
    from fedswarm.client.swarm.metrics import ApiMetrics

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for model_id in sorted({info.model_id for info in servers}):  # the first request should not wait for them
        service.runtime(model_id)
    metrics = ApiMetrics()
    metrics.watch(service)
    pool = ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="generate")
    state = ApiState(service, metrics, pool, keys, args.default_max_tokens)
    try:
        _serve(build_app(state), sock)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        service.close()
    return 0


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """``--api-key`` values, else ``$FEDSWARM_API_KEY`` (comma-separated); a one-line error for an empty one."""
    import os

    from fedswarm.common.errors import InputError

    given = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, "").split(",")
    keys = tuple(key.strip() for key in given)
    if args.api_key is not None and not all(keys):
        raise InputError("--api-key: an empty key would let every request in")
    return tuple(key for key in keys if key)


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket (so port 0 can be printed); uvicorn listens on it."""
    from fedswarm.common.errors import FedswarmError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FedswarmError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return sock


def _serve(app: Any, sock: socket.socket) -> None:
    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            print(f"api ready on {url}/v1 (metrics on {url}/metrics)", flush=True)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(GRACEFUL_STOP_S))
    Server(config).run(sockets=[sock])
