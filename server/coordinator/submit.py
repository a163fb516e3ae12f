"""``fedswarm run``: submit a run to a coordinator with ``flwr run`` and follow it to the end.

The Flower App is built from a small generated ``pyproject.toml`` (components and run
config taken from ``FederationConfig``), so this works from any folder with fedswarm
installed and never lets ``flwr`` rewrite a project's own pyproject.toml. Only the
settings given on the command line go into ``--run-config``; the rest are the App's
defaults, or, with ``--resume``, the resumed run's own settings. The run folder is
written on the coordinator host (relative paths: inside its ``--run-dir``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.common.config import FederationConfig, run_key
from fedswarm.common.errors import FedswarmError
from fedswarm.common.options import add_arguments, flag, given_options, option, required, root_cert_option

if TYPE_CHECKING:
    from fedswarm.common.processes import Supervisor

SERVER_APP = "fedswarm.server.coordinator.app:app"
CLIENT_APP = "fedswarm.client.trainer.app:app"
STARTED = re.compile(r"Successfully started run (\d+)")
FLWR_TIMEOUT_S = 120.0  # `flwr ls` and `flwr stop`


@dataclass(frozen=True, kw_only=True)
class SubmitTarget:
    """``fedswarm run``: where the run goes; its settings are ``FederationConfig``'s options."""

    federation: str = required("name of the SuperLink connection in $FLWR_HOME")
    coordinator: str | None = option(None, "HOST:PORT: (re)write the connection --federation with this address")
    root_cert: str | None = root_cert_option("the coordinator's ca.crt (from `fedswarm certs`), with --coordinator")
    insecure: bool = flag("with --coordinator: no TLS")
    flwr_home: str | None = option(None, "Flower's config folder (default: $FLWR_HOME, else ~/.flwr)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="submit a federated run to a coordinator (flwr run) and stream its progress",
        description="Settings not given keep the App's defaults (or, with --resume, the resumed run's).",
    )
    add_arguments(parser, SubmitTarget)
    add_arguments(parser, FederationConfig)
    parser.set_defaults(handler=run_submit)


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys the user set, checked as a whole unless resuming (the run's own settings fill in)."""
    typed = given_options(args, FederationConfig)  # only these go into --run-config
    given = {name: getattr(args, name) for name in sorted(typed)}
    if not given.get("resume"):
        FederationConfig(**given)  # ValueError naming the option, before anything is submitted
    elif "resume_given" not in given:  # the coordinator then applies exactly these, defaults included
        given["resume_given"] = ",".join(sorted(given))
    return {run_key(name): value for name, value in given.items()}


def app_pyproject() -> dict[str, Any]:
    """The Flower App: fedswarm's components and every run-config key with its default."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("fedswarm")
    except PackageNotFoundError:
        release = "0.1.0"
    return {
        "build-system": {"requires": ["setuptools>=69"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": "fedswarm",
            "version": release,
            "description": "Federated LoRA fine-tuning (fedswarm)",
            "license": "Apache-2.0",
            "dependencies": [],  # the nodes and the coordinator run the fedswarm they have installed
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedswarm",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": FederationConfig().to_run_config(),
                }
            }
        },
    }


def flwr_run_command(app: Path, federation: str, overrides: Path) -> list[str]:
    from fedswarm.common.processes import flower_tool

    return [flower_tool("flwr"), "run", str(app), federation, "--run-config", str(overrides), "--stream"]


def run_submit(args: argparse.Namespace) -> int:
    import tomli_w

    from fedswarm.common.flower_config import flwr_home, has_connection, write_connection
    from fedswarm.common.processes import Supervisor, flower_env, stop_on_sigterm

    home = flwr_home(args.flwr_home)
    if args.coordinator:
        write_connection(home, args.federation, args.coordinator, args.root_cert, args.insecure)
    elif not has_connection(home, args.federation):
        raise FedswarmError(
            f"--federation {args.federation}: no such SuperLink connection in {home / 'config.toml'}; "
            "give --coordinator HOST:PORT --root-cert ca.crt once to add it"
        )
    overrides = run_overrides(args)
    env = flower_env(home)
    stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="fedswarm-app-") as tmp:
        app = Path(tmp) / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject()), encoding="utf-8")
        run_config = Path(tmp) / "run-config.toml"
        run_config.write_text(tomli_w.dumps(overrides), encoding="utf-8")
        print(f"# run config: {json.dumps(overrides)}", flush=True)
        cmd = flwr_run_command(app, args.federation, run_config)
        seen: dict[str, str] = {}
        with Supervisor() as procs:
            proc = procs.start("flwr run", cmd, env, output=subprocess.PIPE)
            try:
                _follow(proc, seen)
            except KeyboardInterrupt:
                if "run_id" in seen:  # the run goes on at the coordinator unless it is stopped
                    _flwr(procs, ["stop", seen["run_id"], args.federation], env, show_it=True)
                raise
            if proc.returncode:
                raise FedswarmError(f"flwr run exited with code {proc.returncode}")
            if "run_id" not in seen:
                raise FedswarmError("flwr run did not report a run id")
            return _final_status(procs, seen["run_id"], args.federation, env)


def _follow(proc: subprocess.Popen, seen: dict[str, str]) -> None:
    """Echo ``flwr run --stream`` line by line; the run id it reports goes into ``seen``."""
    for line in proc.stdout or ():
        print(line, end="", flush=True)
        if "run_id" not in seen and (found := STARTED.search(line)):
            seen["run_id"] = found.group(1)
    proc.wait()


def _final_status(procs: Supervisor, run_id: str, federation: str, env: dict[str, str]) -> int:
    out = _flwr(procs, ["ls", "--run-id", run_id, federation, "--format", "json"], env)
    try:
        runs = json.loads(out[out.index("{") :])["runs"]
        status, details = runs[0]["status"], runs[0].get("status-details", "")
    except (ValueError, KeyError, IndexError):
        raise FedswarmError(f"run {run_id}: could not read its status from `flwr ls`: {out[-300:]}") from None
    if status != "finished:completed":
        raise FedswarmError(f"run {run_id} {status}: {details}")
    print(f"run {run_id} completed", flush=True)
    return 0


def _flwr(procs: Supervisor, arguments: list[str], env: dict[str, str], show_it: bool = False) -> str:
    """``flwr ARGUMENTS`` under the supervisor: its output, or a clear error if it outlives two minutes."""
    from fedswarm.common.processes import flower_tool, show

    cmd = [flower_tool("flwr"), *arguments]
    if show_it:
        show(cmd)
    try:
        done = procs.run(f"flwr {arguments[0]}", cmd, env, timeout=FLWR_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FedswarmError(f"`flwr {arguments[0]}` did not finish within {FLWR_TIMEOUT_S:g} s") from None
    return done.stdout + done.stderr
