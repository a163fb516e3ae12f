"""EDGE_DIR/web/: the static chat page, its settings, and the runtime files it needs, all local.

The page itself lives in this package (``web/index.html``, ``web/app.js`` and its two modules); the runtime
(transformers.js and onnxruntime-web's wasm build) comes from ``web/node_modules``, installed
by ``scripts/install_web.sh`` from the pinned ``web/package.json``. Copying it into EDGE_DIR
makes the folder a complete static site; without the npm install the page is still written
and ``fedswarm serve-web`` serves the runtime from node_modules directly.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from fedswarm.client.edge.variants import JS_DTYPES

log = logging.getLogger(__name__)

WEB_SOURCE = Path(__file__).resolve().parent / "web"
PAGE_FILES = ("index.html", "app.js", "choose.js", "facts.js")
# served name -> path under node_modules
VENDOR_FILES = {
    "transformers.min.js": "@huggingface/transformers/dist/transformers.min.js",
    "ort-wasm-simd-threaded.asyncify.mjs": "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.mjs",
    "ort-wasm-simd-threaded.asyncify.wasm": "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.wasm",
}
INSTALL_HINT = "run 'bash scripts/install_web.sh' (npm install of client/edge/web)"


def vendor_source(name: str) -> Path | None:
    """Where the installed npm packages keep vendor file ``name`` (None if not installed)."""
    rel = VENDOR_FILES.get(name)
    if rel is None:
        return None
    path = WEB_SOURCE / "node_modules" / rel
    return path if path.is_file() else None


def write_web(edge_dir: Path, variants: tuple[str, ...]) -> Path:
    """Write the page into ``edge_dir/web`` and copy the runtime there when it is installed."""
    web = edge_dir / "web"
    web.mkdir(parents=True, exist_ok=True)
    for name in PAGE_FILES:
        shutil.copyfile(WEB_SOURCE / name, web / name)
    default = "q4" if "q4" in variants else variants[-1]
    settings = {"variants": list(variants), "dtypes": {v: JS_DTYPES[v] for v in variants}, "default": default}
    (web / "edge.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    sources = {name: vendor_source(name) for name in VENDOR_FILES}
    missing = [name for name, path in sources.items() if path is None]
    if missing:
        log.warning("The web runtime is not installed (%s): the page is written; %s", ", ".join(missing), INSTALL_HINT)
        return web
    vendor = web / "vendor"
    vendor.mkdir(exist_ok=True)
    for name, path in sources.items():
        assert path is not None
        shutil.copyfile(path, vendor / name)
    return web
