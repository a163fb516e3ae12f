"""The exported page in a real browser: headless Chromium runs the q4 tiny model with transformers.js
(wasm), and its greedy tokens must equal onnxruntime's in Python on the same file."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tests.edge_support import ANSWER_TOKENS, tiny_run

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MESSAGES = [
    {
        "role": "system",
        "content": "Respond with only a 1 or 0 to signify if the user's message includes sarcasm, or not",
    },
    {"role": "user", "content": "I just love waiting in line for hours."},
]
NEW_TOKENS = ANSWER_TOKENS
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


@pytest.fixture(scope="module")
def q4_edge(tmp_path_factory):
    from fedswarm.client.edge.webpage import VENDOR_FILES, vendor_source

    missing = [name for name in VENDOR_FILES if vendor_source(name) is None]
    assert not missing, f"web runtime missing ({missing}): run bash scripts/install_web.sh"
    root = tmp_path_factory.mktemp("browser")
    adapter = tiny_run(root / "run")  # decisive replies: kernel-level float differences cannot flip them
    out = root / "edge"
    cmd = [sys.executable, "-m", "fedswarm.common.cli", "export", "--adapter", str(adapter)]
    cmd += ["--out", str(out), "--quant", "q4", "--min-agreement", "0", "--parity-samples", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (bash scripts/install_web.sh installs it)")
def test_page_generates_onnxruntimes_greedy_tokens(q4_edge, tmp_path):
    from fedswarm.client.edge.runtime import OrtCausalLM
    from fedswarm.client.edge.serve import serve_in_thread
    from fedswarm.common.model import load_tokenizer

    server, url = serve_in_thread(q4_edge)
    browser = subprocess.Popen(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # chromium's own temp folders go with the test's
    )
    try:
        page = asyncio.run(asyncio.wait_for(_run_page(browser, url + "?variant=q4&device=wasm"), timeout=300))
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()
        server.shutdown()
        server.server_close()
    assert page.get("error") is None, page
    assert page["state"]["dtype"] == "q4" and page["state"]["device"] == "wasm"

    tokenizer = load_tokenizer(str(q4_edge))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert page["promptIds"] == list(prompt), "transformers.js rendered the chat template differently"
    want = OrtCausalLM(q4_edge / "onnx" / "model_q4.onnx").greedy(prompt, NEW_TOKENS, tokenizer.eos_token_id)
    assert page["newIds"] == want
    assert page["text"] == tokenizer.decode(want, skip_special_tokens=True)


async def _run_page(browser: subprocess.Popen, url: str) -> dict:
    import websockets

    endpoint = await asyncio.to_thread(_devtools_endpoint, browser)
    targets = json.loads(urllib.request.urlopen(f"http://{endpoint}/json/list").read())
    target = next(t for t in targets if t["type"] == "page")
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
        cdp = _Cdp(ws)
        await cdp.call("Runtime.enable")
        await cdp.call("Page.enable")
        await cdp.call("Page.navigate", url=url)
        script = (
            "(async () => {"
            " for (let i = 0; i < 1200 && !(window.fedswarm && window.fedswarm.ready); i++)"
            "   await new Promise(r => setTimeout(r, 100));"
            " if (!window.fedswarm) return JSON.stringify({error: 'page script did not start'});"
            " try {"
            "  const state = await window.fedswarm.ready;"
            f"  const out = await window.fedswarm.generate({json.dumps(MESSAGES)}, {NEW_TOKENS});"
            "  return JSON.stringify({state, ...out});"
            " } catch (e) { return JSON.stringify({error: String(e && e.stack || e), state: window.fedswarm.state}); }"
            "})()"
        )
        reply = await cdp.call("Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True)
        result = reply.get("result", {})
        if "value" not in result:
            return {"error": json.dumps(reply)[:2000], "console": cdp.console[-20:]}
        page = json.loads(result["value"])
        if page.get("error"):
            page["console"] = cdp.console[-20:]
        return page


def _devtools_endpoint(browser: subprocess.Popen) -> str:
    """Chromium prints 'DevTools listening on ws://HOST:PORT/...' on stderr once it is up."""
    assert browser.stderr is not None
    for line in browser.stderr:
        match = re.search(r"DevTools listening on ws://([^/]+)/", line)
        if match:
            return match.group(1)
    raise RuntimeError(f"chromium exited ({browser.poll()}) without opening DevTools")


class _Cdp:
    """Just enough Chrome DevTools Protocol: numbered calls, console messages kept for diagnostics."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0
        self.console: list[str] = []

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif message.get("method") == "Runtime.exceptionThrown":
                self.console.append(json.dumps(message["params"].get("exceptionDetails", {}))[:500])
