#!/usr/bin/env bash
# mypy over the package code (generated protobuf stubs excluded), as .ci/run runs it.
# The repository maps folders onto fedswarm.* (pyproject's package-dir: common/ is
# fedswarm.common, ...), which mypy cannot follow; a temporary tree of links lays the
# folders out as the installed package, and mypy checks that.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TREE="$(mktemp -d)"
trap 'rm -rf "$TREE"' EXIT
mkdir "$TREE/fedswarm"
touch "$TREE/fedswarm/__init__.py"
for folder in common server client simulation protos; do ln -s "$ROOT/$folder" "$TREE/fedswarm/$folder"; done
cd "$TREE"
"$ROOT/.venv/bin/mypy" -p fedswarm --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/.mypy_cache" \
    --python-executable "$ROOT/.venv/bin/python"
