"""The layout: roles meet only through ``common/`` (and the wire); training does not need the simulation."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package folder -> the fedswarm packages its modules may not import
FORBIDDEN = {
    "client": ("fedswarm.server", "fedswarm.simulation"),
    "server": ("fedswarm.client", "fedswarm.simulation"),
    "common": ("fedswarm.client", "fedswarm.server", "fedswarm.simulation"),
    "protos": ("fedswarm.client", "fedswarm.server", "fedswarm.simulation"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_roles_do_not_import_each_other(folder):
    crossings = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, name in _imports(path)
        if name.startswith(FORBIDDEN[folder])
    ]
    assert crossings == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fedswarm.server.swarm.blocks import SpanModel\n")
    assert _imports(module) == [(2, "fedswarm.server.swarm.blocks")]


def test_the_web_page_files_ship_with_the_package():
    """A non-editable install carries every file the exported page is copied from."""
    import tomllib

    from fedswarm.client.edge.webpage import PAGE_FILES

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = set(data["fedswarm.client.edge"])
    assert {f"web/{name}" for name in PAGE_FILES} <= shipped, sorted(shipped)
    assert all((ROOT / "client" / "edge" / name).is_file() for name in shipped)
