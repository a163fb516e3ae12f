"""Every command's options come from a dataclass: one source for name, type, default, unit and help."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import MISSING, Field, fields
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fedswarm.common.cli import build_parser
from fedswarm.common.config import FederationConfig
from fedswarm.common.options import OPTION_CLASSES, flag_name, given_options, help_text, value_type

COMMANDS = {
    "simulate", "export", "serve-web", "swarm registry", "swarm serve", "swarm generate", "swarm perplexity",
    "swarm api",
    "coordinator", "certs", "node-key", "node", "run",
}  # fmt: skip
Parser = argparse.ArgumentParser


def _commands(parser: Parser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Parser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
        return
    for name, child in subs[0].choices.items():
        yield from _commands(child, (*path, name))


def _options(parser: Parser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def _fields(parser: Parser) -> dict[str, tuple[type, Field]]:
    out: dict[str, tuple[type, Field]] = {}
    for cls in parser.get_default(OPTION_CLASSES) or ():
        for f in fields(cls):
            assert f.name not in out, f"--{f.name} declared twice"
            out[f.name] = (cls, f)
    return out


def test_every_command_parser_is_generated_from_its_dataclasses():
    commands = dict(_commands(build_parser()))
    assert set(commands) == COMMANDS
    for name, parser in commands.items():
        declared, options = _fields(parser), _options(parser)
        assert declared, f"{name}: no option dataclass"
        assert set(options) == set(declared), f"{name}: options {sorted(options)} != fields {sorted(declared)}"
        for dest, action in options.items():
            cls, f = declared[dest]
            where = f"{name} {dest}"
            assert action.default == (None if f.default is MISSING else f.default), where
            assert action.help is not None and action.help.startswith(help_text(f)), where
            if f.metadata.get("positional"):
                assert action.option_strings == [] and action.required, where
                continue
            assert action.option_strings[0] == flag_name(f.name), where
            assert action.required == bool(f.metadata.get("required")), where
            if not isinstance(f.default, bool):
                assert action.type is value_type(cls, f), where


def test_each_option_parses_to_its_field_type():
    parser = build_parser()
    args = parser.parse_args(["swarm", "serve", "--registry", "a:1", "--registry", "b:2", "--blocks", "0:2"])
    assert args.registry == ["a:1", "b:2"] and args.model == "smollm2-135m" and args.port == 0
    args = parser.parse_args(["certs", "--out", "c", "--host", "h1", "h2", "--days", "7"])
    assert args.host == ["h1", "h2"] and args.days == 7
    args = parser.parse_args(["swarm", "generate", "--registry", "a:1", "hi", "--chat"])
    assert args.prompt == "hi" and args.chat is True and args.max_new_tokens == 32 and args.adapter_id is None
    args = parser.parse_args(["node", "--coordinator", "h:1", "--data", "d.jsonl"])
    assert args.insecure is False and args.lora_rank == 0 and args.root_cert is None


def test_shared_options_are_the_same_everywhere():
    commands = dict(_commands(build_parser()))

    def same(option: str, *names: str) -> None:
        shown = {(a.default, a.type, a.help, a.required) for n in names for a in [_options(commands[n])[option]]}
        assert len(shown) == 1, (option, shown)

    same("model", "simulate", "run", "swarm serve")
    same("max_seq_len", "simulate", "swarm perplexity")
    same("registry", "swarm serve", "swarm generate", "swarm perplexity")
    same("token", "swarm registry", "swarm serve", "swarm generate", "swarm perplexity")
    same("tls_ca", "swarm registry", "swarm serve", "swarm generate", "swarm perplexity")
    same("tls_cert", "swarm registry", "swarm serve")
    same("threads", "swarm generate", "swarm perplexity")


def test_run_passes_on_only_the_federation_settings_given():
    args = build_parser().parse_args(["run", "--federation", "f", "--insecure", "--coordinator", "h:1", "--seed", "3"])
    assert given_options(args) >= {"federation", "insecure", "coordinator", "seed"}
    assert given_options(args, FederationConfig) == {"seed"}


def test_pyproject_app_config_equals_federation_config_value_for_value():
    project = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text(encoding="utf-8"))
    app = project["tool"]["flwr"]["app"]["config"]
    expected = FederationConfig().to_run_config()
    assert sorted(app) == sorted(expected)
    wrong = {
        key: (app[key], value)
        for key, value in expected.items()
        if app[key] != value or type(app[key]) is not type(value)  # 1 is not 1.0, nor False 0
    }
    assert wrong == {}, f"pyproject.toml's [tool.flwr.app.config] (left) disagrees with FederationConfig: {wrong}"


def test_every_setting_belongs_to_exactly_one_role():
    """The role classes partition the run's settings: each key of the Flower app config is read by one role."""
    from dataclasses import fields

    from fedswarm.common.config import CoordinatorSettings, NodeSettings, PrivacySettings, SimulationSettings

    roles = [NodeSettings, PrivacySettings, CoordinatorSettings, SimulationSettings]
    names = [f.name for role in roles for f in fields(role)]
    assert len(names) == len(set(names))  # no setting in two roles
    assert sorted(names) == sorted(f.name for f in fields(FederationConfig))  # and none outside them


def test_a_node_validates_only_what_it_reads():
    """A node builds its settings from the round's config alone: coordinator settings are neither read nor
    checked there, while its own are, with the CLI's one-line errors."""
    from fedswarm.common.config import NodeConfig, from_run_config
    from fedswarm.common.errors import InputError

    sent = {"local-steps": 4, "dp": True, "epsilon": 8.0, "server-optimizer": "no-such", "min-clients": -3}
    node = from_run_config(NodeConfig, sent)
    assert node.local_steps == 4 and node.lora_rank == 2  # --lora-rank 0 under --dp: the DP default
    assert not hasattr(node, "server_optimizer") and not hasattr(node, "min_clients")
    with pytest.raises(InputError, match="--server-optimizer must be one of"):
        from_run_config(FederationConfig, sent)
    with pytest.raises(InputError, match=r"^--local-steps must be >= 1, got 0$"):
        from_run_config(NodeConfig, {**sent, "local-steps": 0})
    with pytest.raises(InputError, match=r"^--dp needs --noise-multiplier > 0 or a target --epsilon > 0$"):
        from_run_config(NodeConfig, {"dp": True})


def test_a_stale_egg_info_in_the_working_folder_does_not_hide_the_commands(tmp_path, monkeypatch):
    """An older build's metadata first on sys.path (the repository root, for ``python -m``) declares no commands."""
    from fedswarm.common.cli import COMMANDS, registered

    stale = tmp_path / "fedswarm.egg-info"
    stale.mkdir()
    (stale / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: fedswarm\nVersion: 0.0.1\n")
    (stale / "entry_points.txt").write_text("[console_scripts]\nfedswarm = fedswarm.common.cli:main\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "simulate" in {e.name for e in registered(COMMANDS)}
    assert "simulate" in build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    with pytest.raises(SystemExit, match="no commands registered"):
        registered("fedswarm.no-such-group")
