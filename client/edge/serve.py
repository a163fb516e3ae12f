"""``fedswarm serve-web EDGE_DIR``: the export's web page and model files on localhost.

Served under ``/edge/`` so the page can name the model folder (transformers.js joins
``localModelPath`` and a model id). Cross-origin isolation headers let onnxruntime-web use
threads (SharedArrayBuffer). Missing runtime files fall back to the npm install.
"""

from __future__ import annotations

import argparse
import mimetypes
import posixpath
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fedswarm.common.errors import FedswarmError
from fedswarm.common.options import add_arguments, option, positional

PREFIX = "/edge/"
PAGE = PREFIX + "web/"
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}
CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class ServeWebCommand:
    """``fedswarm serve-web``."""

    edge_dir: str = positional("folder written by 'fedswarm export'", metavar="EDGE_DIR")
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "port (0: any free port)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve-web",
        help="serve an edge export's web page on localhost",
        description="Serve EDGE_DIR (written by 'fedswarm export') so a browser can chat with the model locally.",
    )
    add_arguments(parser, ServeWebCommand)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    server = make_server(Path(args.edge_dir), args.host, args.port)
    host, port = server.server_address[:2]
    host = host.decode() if isinstance(host, bytes) else host
    print(f"serving {args.edge_dir} at http://{host}:{port}{PAGE} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def check_edge_dir(edge_dir: Path) -> Path:
    """Refuse, in one line, a folder that is not a finished export."""
    edge_dir = edge_dir.expanduser()
    if not edge_dir.is_dir():
        raise FedswarmError(f"EDGE_DIR {str(edge_dir)!r}: no such folder; write one with 'fedswarm export'")
    missing = [p for p in ("config.json", "onnx", "web/index.html", "web/edge.json") if not (edge_dir / p).exists()]
    if missing:
        raise FedswarmError(f"EDGE_DIR {str(edge_dir)!r}: not an edge export ({', '.join(missing)} missing)")
    return edge_dir.resolve()


def make_server(edge_dir: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server for ``edge_dir`` (not yet serving: call ``serve_forever``, e.g. in a thread)."""
    root = check_edge_dir(edge_dir)
    handler = type("EdgeHandler", (_Handler,), {"root": root})
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise FedswarmError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from exc


def serve_in_thread(edge_dir: Path, host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, str]:
    """Start serving in a daemon thread; returns the server (``shutdown()`` it) and the page URL."""
    server = make_server(edge_dir, host, 0)
    threading.Thread(target=server.serve_forever, daemon=True, name="serve-web").start()
    return server, f"http://{host}:{server.server_address[1]}{PAGE}"


class _Handler(BaseHTTPRequestHandler):
    root: Path

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(head_only=True)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if "-v" in sys.argv:
            super().log_message(format, *args)

    def _send(self, head_only: bool) -> None:
        raw = unquote(urlsplit(self.path).path)
        if raw in ("/", "/edge", PREFIX, PAGE.rstrip("/")):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", PAGE)
            self.end_headers()
            return
        path = posixpath.normpath(raw) + ("/index.html" if raw.endswith("/") else "")
        file = self._resolve(path)
        if file is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        size = file.stat().st_size
        self.send_response(HTTPStatus.OK)
        self.send_header(
            "Content-Type", TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        )
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        if head_only:
            return
        with file.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                self.wfile.write(chunk)

    def _resolve(self, path: str) -> Path | None:
        if not path.startswith(PREFIX):
            return None
        rel = path[len(PREFIX) :]
        candidate = (self.root / rel).resolve()
        if candidate.is_relative_to(self.root) and candidate.is_file():
            return candidate
        if rel.startswith("web/vendor/"):
            from fedswarm.client.edge.webpage import vendor_source

            return vendor_source(rel.split("/", 2)[2])
        return None
