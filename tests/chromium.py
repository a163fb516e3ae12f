"""Headless Chromium driven over the DevTools protocol: for the browser test and bench/browser.py.

Chromium starts with WebGPU enabled (``--enable-unsafe-webgpu``): on a machine without a GPU it
offers a software adapter (SwiftShader, architecture "swiftshader"), so the page's WebGPU path
runs everywhere. Everything waits on the page's own state (``window.fedswarm.state``), with a bound.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--enable-unsafe-webgpu",  # WebGPU in headless Linux Chromium; SwiftShader where there is no GPU
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1100,760",
]
POLL_S = 0.25
STATE = "JSON.stringify(window.fedswarm.state)"


class PageError(AssertionError):
    """The page did not reach the awaited state in time, or stopped on an error; carries its state and console."""


class Chromium:
    """One headless Chromium with one tab; ``close()`` (or ``with``) always stops it."""

    def __init__(self, profile: Path) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium not installed (bash scripts/install_web.sh installs it)")
        profile.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile / 'profile'}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(profile)},  # chromium's own temp folders go with the caller's
        )
        try:
            self.tab = Tab(_page_socket(self.process))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        tab = getattr(self, "tab", None)
        if tab is not None:
            tab.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tab:
    """Just enough of the DevTools protocol: numbered calls, console messages kept for diagnostics."""

    def __init__(self, websocket_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(websocket_url, max_size=None, open_timeout=30)
        self.next_id = 0
        self.console: list[str] = []
        self.url = ""
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.001)))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (promises are not awaited)."""
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"page script failed: {json.dumps(reply['exceptionDetails'])[:500]}")
        return reply.get("result", {}).get("value")

    def open(self, url: str) -> None:
        """Navigate; :meth:`state` reads nothing of the page before (the page's own reloads are read)."""
        self.evaluate("window.fedswarmStale = true")  # a new document, this URL's or a reload's, lacks it
        self.url = url
        self.call("Page.navigate", url=url)

    def state(self) -> dict[str, Any] | None:
        """The page's state; None before it has one (or while one document gives way to the next)."""
        try:
            value = self.evaluate(f"!window.fedswarmStale && window.fedswarm ? {STATE} : null")
        except RuntimeError:  # "Execution context was destroyed": the page is navigating
            return None
        return json.loads(value) if value else None

    def wait(self, done: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """Poll the page's state until ``done(state)``; a PageError once it stops on an error or past ``timeout``."""
        deadline = time.monotonic() + timeout
        state: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            state = self.state()
            if state is not None and done(state):
                return state
            if state is not None and state.get("phase") == "error":
                break
            time.sleep(POLL_S)
        why = "stopped on an error" if state and state.get("phase") == "error" else f"not within {timeout:.0f} s"
        raise PageError(f"{what}: {why}; state {json.dumps(state)}; console {self.console[-12:]}")

    def ready(self, timeout: float = 240.0) -> dict[str, Any]:
        return self.wait(lambda s: s["phase"] == "ready", timeout, f"loading {self.url}")

    def ask(self, messages: list[dict[str, str]], max_new_tokens: int, timeout: float = 240.0) -> dict[str, Any]:
        """Have the page answer (as its form does); the state once the answer is in."""
        before = self.ready(timeout)["answers"]
        self.evaluate(f"window.fedswarm.ask({json.dumps(messages)}, {max_new_tokens}).catch(() => {{}}), true")
        state = self.wait(
            lambda s: s["answers"] > before or (s["phase"] == "ready" and bool(s["error"])), timeout, "answering"
        )
        if state["answers"] == before:
            raise PageError(f"answering: failed ({state['error']}); console {self.console[-12:]}")
        return state

    def text(self, element_id: str) -> str:
        return str(self.evaluate(f"document.getElementById({json.dumps(element_id)}).innerText"))

    def screenshot(self, path: Path) -> Path:
        """A PNG of the page down to the end of its content."""
        height = self.evaluate("Math.ceil(document.body.getBoundingClientRect().bottom) + 16")
        width = self.evaluate("document.documentElement.clientWidth")
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", clip=clip)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.ws.close()

    def _event(self, message: dict[str, Any]) -> None:
        if message.get("method") == "Runtime.consoleAPICalled":
            args = message["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif message.get("method") == "Runtime.exceptionThrown":
            self.console.append(json.dumps(message["params"].get("exceptionDetails", {}))[:500])


def _page_socket(browser: subprocess.Popen[str]) -> str:
    """Chromium prints 'DevTools listening on ws://HOST:PORT/...' on stderr once it is up; its tab's socket URL."""
    stderr = browser.stderr
    assert stderr is not None
    for line in stderr:
        match = re.search(r"DevTools listening on ws://([^/]+)/", line)
        if match:
            # keep reading stderr, or a chatty GPU process fills the pipe and blocks the browser
            threading.Thread(target=_drain, args=(stderr,), daemon=True, name="chromium-stderr").start()
            targets = json.loads(urllib.request.urlopen(f"http://{match.group(1)}/json/list", timeout=30).read())
            return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
    raise RuntimeError(f"chromium exited ({browser.poll()}) without opening DevTools")


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass
