"""SuperLink connections in Flower's own configuration file (``$FLWR_HOME/config.toml``).

Flower 1.42 keeps the address and TLS root certificate of each SuperLink under a name
(``[superlink.NAME]``); ``flwr run``, ``flwr supernode register`` and ``flwr ls`` take
that name. fedswarm writes the entries it needs and leaves the others as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: Flower depends on tomli
    import tomli as tomllib  # type: ignore[no-redef]

from fedswarm.common.errors import InputError
from fedswarm.common.paths import atomic_write_text


def flwr_home(explicit: str | None = None) -> Path:
    """``explicit``, else ``$FLWR_HOME``, else Flower's default ``~/.flwr``."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if env := os.environ.get("FLWR_HOME"):
        return Path(env).expanduser().resolve()
    return Path.home() / ".flwr"


def write_connection(home: Path, name: str, address: str, root_cert: str | None, insecure: bool) -> Path:
    """Add or replace ``[superlink.NAME]``; the first connection written becomes the default."""
    import tomli_w

    if not name or any(c in name for c in ' ."[]'):
        raise InputError(f"--federation must be a plain name (letters, digits, '-', '_'), got {name!r}")
    path = home / "config.toml"
    doc = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    links = doc.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if insecure:
        entry["insecure"] = True
    else:
        if not root_cert or not Path(root_cert).is_file():
            raise InputError(f"--root-cert: the coordinator's CA certificate (ca.crt) is needed, got {root_cert!r}")
        entry["root-certificates"] = str(Path(root_cert).resolve())
    links[name] = entry
    links.setdefault("default", name)
    home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tomli_w.dumps(doc))
    return path


def has_connection(home: Path, name: str) -> bool:
    path = home / "config.toml"
    if not path.exists():
        return False
    links = tomllib.loads(path.read_text(encoding="utf-8")).get("superlink", {})
    return isinstance(links.get(name), dict)
