"""The layout: roles meet only through ``common/`` (and the wire); training does not need the simulation;
Flower's internals are taken in one module.

Imports are read from the syntax tree: ``import``/``from`` statements anywhere (in functions too),
and imports by name in strings (``importlib.import_module("...")``, ``__import__("...")``, and any
string that names a fedswarm module, as entry points and Flower component strings do), so a
role cannot reach another through a string the check does not see.
"""

import ast
import re
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


# Flower's public API; anything else of flwr is an internal, taken only in FLOWER_DOOR
FLOWER_PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp")
FLOWER_DOOR = ROOT / "common" / "flower_internals.py"
MODULE_NAME = re.compile(r"^(fedswarm|flwr)(\.[A-Za-z_]\w*)+(:[\w.]+)?$")
IMPORTERS = {"import_module", "__import__"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of ``path``: statements, ``import_module``/``__import__`` calls with a
    constant name, and string constants naming a fedswarm or flwr module (``module`` or ``module:attr``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and _called(node) in IMPORTERS and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                out.append((node.lineno, first.value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.match(node.value):
            out.append((node.lineno, node.value.split(":")[0]))
    return sorted(set(out))


def _called(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_roles_do_not_import_each_other(folder):
    assert _crossings(ROOT, folder) == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fedswarm.server.swarm.blocks import SpanModel\n")
    assert _imports(module) == [(2, "fedswarm.server.swarm.blocks")]


def test_the_check_sees_imports_by_name_in_strings(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import importlib\n"
        "importlib.import_module('fedswarm.server.swarm.cli').add_commands(None)\n"
        "from importlib import import_module as load\n"
        "COMMANDS = ('fedswarm.client.trainer.launch', 'fedswarm.server.coordinator.app:app')\n"
        "m = __import__('fedswarm.simulation.engine')\n"
        "text = 'fedswarm. is not a module, nor is this sentence'\n"
    )
    assert _imports(module) == [
        (1, "importlib"), (2, "fedswarm.server.swarm.cli"), (3, "importlib"), (4, "fedswarm.client.trainer.launch"),
        (4, "fedswarm.server.coordinator.app"), (5, "fedswarm.simulation.engine"),
    ]  # fmt: skip


def test_a_planted_string_import_fails_the_layout_check(tmp_path):
    """The check itself: a common/ module reaching a role through importlib is a crossing."""
    common = tmp_path / "common"
    common.mkdir()
    (common / "ok.py").write_text("from fedswarm.common.errors import FedswarmError\n")
    (common / "planted.py").write_text("import importlib\nimportlib.import_module('fedswarm.server.swarm.cli')\n")
    assert _crossings(tmp_path, "common") == ["common/planted.py:2 imports fedswarm.server.swarm.cli"]


# Strings that name another role's module without importing it: the Flower App that `fedswarm run` ships
# names its ClientApp component (Flower's nodes load it; the coordinator never does).
NAMED_NOT_IMPORTED = {("server/coordinator/submit.py", "fedswarm.client.trainer.app")}


def _crossings(root: Path, folder: str) -> list[str]:
    return [
        f"{path.relative_to(root)}:{line} imports {name}"
        for path in sorted((root / folder).rglob("*.py"))
        for line, name in _imports(path)
        if name.startswith(FORBIDDEN[folder]) and (str(path.relative_to(root)), name) not in NAMED_NOT_IMPORTED
    ]


def test_flowers_internals_are_taken_in_one_module():
    """Outside ``common/flower_internals.py`` fedswarm uses Flower's public API only (that module checks the
    installed Flower against the release it was read in: ``tests/test_flower_internals.py``)."""
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for folder in (*FORBIDDEN, "simulation")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != FLOWER_DOOR
        for line, name in _imports(path)
        if (name == "flwr" or name.startswith("flwr.")) and not name.startswith(FLOWER_PUBLIC)
    ]
    assert found == []


def test_the_web_page_files_ship_with_the_package():
    """A non-editable install carries every file the exported page is copied from."""
    import tomllib

    from fedswarm.client.edge.webpage import PAGE_FILES

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = set(data["fedswarm.client.edge"])
    assert {f"web/{name}" for name in PAGE_FILES} <= shipped, sorted(shipped)
    assert all((ROOT / "client" / "edge" / name).is_file() for name in shipped)
