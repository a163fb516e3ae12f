"""Flower's internals are read in one release: the installed Flower must be it, or a test names the module to port."""

import re

import pytest

from fedswarm.common.flower_internals import WRITTEN_FOR, FlowerVersionError, check_flower_version


def test_the_installed_flower_is_the_release_the_internals_were_read_in():
    assert check_flower_version() == WRITTEN_FOR


def test_another_flower_fails_naming_the_module_to_port(monkeypatch):
    import fedswarm.common.flower_internals as door

    monkeypatch.setattr(door, "version", lambda name: "1.43.0" if name == "flwr" else "?")  # a faked upgrade
    with pytest.raises(FlowerVersionError) as failed:
        check_flower_version()
    message = str(failed.value)
    assert message.startswith(
        f"fedswarm.common.flower_internals was written against flwr {WRITTEN_FOR}, but flwr 1.43.0"
    )
    assert f"install flwr=={WRITTEN_FOR}" in message and "\n" not in message


def test_the_pin_in_pyproject_is_the_release_the_internals_were_read_in():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    pins = [d for d in project["project"]["dependencies"] if re.match(r"flwr\b", d)]
    assert pins == [f"flwr[simulation]=={WRITTEN_FOR}"]
