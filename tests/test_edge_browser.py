"""The exported page in a real browser: headless Chromium runs the tiny model's export with transformers.js on
wasm and on WebGPU (where there is no GPU, Chromium's software adapter, SwiftShader). Its greedy tokens must
equal onnxruntime's in Python on the same file, it must say what it runs, and leave WebGPU for wasm, saying
why, when WebGPU fails or takes too long. One export and one Chromium serve every test."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.chromium import CHROMIUM, Chromium
from tests.edge_support import ANSWER_TOKENS, tiny_run

WEB = Path(__file__).resolve().parents[1] / "client" / "edge" / "web"
MESSAGES = [
    {
        "role": "system",
        "content": "Respond with only a 1 or 0 to signify if the user's message includes sarcasm, or not",
    },
    {"role": "user", "content": "I just love waiting in line for hours."},
]
NEW_TOKENS = ANSWER_TOKENS
PRIVACY = {"local": {"epsilon_max": 3.5, "delta": 1e-5, "accountant": "prv"}}  # as a local-DP run records it
# SwiftShader takes ~1 minute to the tiny model's first q4 token here (wasm: 0.1 s): past the page's default
# limit (60 s) the page rightly falls back to wasm, so the WebGPU tests give it longer.
SOFTWARE_FIRST_TOKEN_S = "300"
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (bash scripts/install_web.sh)")


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    from fedswarm.client.edge.webpage import VENDOR_FILES, vendor_source

    missing = [name for name in VENDOR_FILES if vendor_source(name) is None]
    assert not missing, f"web runtime missing ({missing}): run bash scripts/install_web.sh"
    root = tmp_path_factory.mktemp("browser")
    adapter = tiny_run(root / "run", PRIVACY)  # decisive replies: kernel-level float differences cannot flip them
    out = root / "edge"
    cmd = [sys.executable, "-m", "fedswarm.common.cli", "export", "--adapter", str(adapter), "--out", str(out)]
    cmd += ["--quant", "fp32,q4,q4f16", "--min-agreement", "0", "--parity-samples", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def site(edge):
    """The page's URL, served from the export for the module's tests."""
    from fedswarm.client.edge.serve import serve_in_thread

    server, url = serve_in_thread(edge)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    """One Chromium tab (WebGPU enabled), shared by every browser test."""
    with Chromium(tmp_path_factory.mktemp("chromium")) as browser:
        yield browser.tab


class Reference:
    """onnxruntime's greedy tokens (Python, CPU) for MESSAGES on each variant's file."""

    def __init__(self, edge: Path) -> None:
        from fedswarm.common.model import load_tokenizer

        self.edge = edge
        self.tokenizer = load_tokenizer(str(edge))
        self.prompt = list(self.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))
        self.tokens: dict[str, list[int]] = {}

    def __call__(self, variant: str) -> list[int]:
        from fedswarm.client.edge.runtime import OrtCausalLM
        from fedswarm.client.edge.variants import FILES

        if variant not in self.tokens:
            model = OrtCausalLM(self.edge / "onnx" / FILES[variant])
            self.tokens[variant] = model.greedy(self.prompt, NEW_TOKENS, self.tokenizer.eos_token_id)
        return self.tokens[variant]


@pytest.fixture(scope="module")
def reference(edge):
    return Reference(edge)


def _open(tab, site: str, **query: str) -> dict:
    tab.open(site + "?" + urlencode({"firstTokenTimeout": SOFTWARE_FIRST_TOKEN_S, **query}))
    return tab.ready()


def _answer_matches(tab, reference: Reference, backend: str) -> dict:
    """Have the page answer MESSAGES on ``backend``; its tokens must be onnxruntime's on the variant it ran."""
    state = tab.ask(MESSAGES, NEW_TOKENS, timeout=2 * float(SOFTWARE_FIRST_TOKEN_S))
    assert state["backend"] == backend, state["fallback"]
    last = state["last"]
    assert last["promptIds"] == reference.prompt, "transformers.js rendered the chat template differently"
    assert last["newIds"] == reference(state["variant"]), f"{state['backend']} {state['variant']}"
    assert last["text"] == reference.tokenizer.decode(last["newIds"], skip_special_tokens=True)
    return state


@pytest.mark.integration
@needs_chromium
@pytest.mark.parametrize(("backend", "variant"), [(b, v) for b in ("wasm", "webgpu") for v in ("fp32", "q4")])
def test_page_generates_onnxruntimes_greedy_tokens(tab, site, reference, backend, variant):
    state = _open(tab, site, device=backend, variant=variant)
    assert (state["backend"], state["variant"], state["fallback"], state["choice"]) == (backend, variant, None, None)
    if (backend, variant) == ("webgpu", "q4") and not state["adapter"]["shaderF16"]:
        pytest.skip("without shader-f16 the page's own pick on WebGPU is q4: the best-variant test runs it")
    _answer_matches(tab, reference, backend)
    status = tab.text("status")
    assert f" · {variant} · loaded in " in status and " tokens/s (first after " in status, status
    if backend == "webgpu":
        _assert_names_the_adapter(status, state["adapter"])
    else:
        assert status.startswith("wasm (CPU) · ")


@pytest.mark.integration
@needs_chromium
def test_webgpu_runs_the_best_variant_its_adapter_can(tab, site, reference, tmp_path):
    state = _open(tab, site, device="webgpu")
    assert state["backend"] == "webgpu" and state["fallback"] is None
    if state["adapter"]["shaderF16"]:
        assert state["variant"] == "q4f16" and state["choice"] is None
    else:
        assert state["variant"] == "q4"
        assert state["choice"] == "q4f16 needs shader-f16, which this adapter lacks: running q4"
        assert tab.text("notice") == state["choice"]
    _answer_matches(tab, reference, "webgpu")
    status = tab.text("status")
    _assert_names_the_adapter(status, state["adapter"])
    assert f" · {state['variant']} · loaded in " in status and " tokens/s" in status, status
    facts = tab.text("facts")
    for shown in ("tiny (seeded random test model)", "run/adapter", "1 round, 2 clients on sarcasm"):
        assert shown in facts, facts
    assert "(ε = 3.5, δ = 0.00001)-DP, local, per node" in facts, facts
    assert f"{state['variant']} against PyTorch\nnext-token agreement " in facts, facts
    png = tab.screenshot(tmp_path / "page.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 300_000


@pytest.mark.integration
@needs_chromium
def test_page_falls_back_to_wasm_when_webgpu_refuses_the_variant(tab, site, reference):
    state = _open(tab, site, device="webgpu", variant="q4f16")  # asked for: the page tries it
    if state["adapter"]["shaderF16"]:
        pytest.skip("this adapter has shader-f16: it runs q4f16 (the best-variant test)")
    # the first run fails on WebGPU; the page reloads itself on wasm and asks again
    state = _answer_matches(tab, reference, "wasm")
    assert state["variant"] == "q4f16"
    why = "WebGPU failed (Program Gather requires f16 but the device does not support it): running on wasm"
    assert state["fallback"] == why and tab.text("notice") == why


@pytest.mark.integration
@needs_chromium
@pytest.mark.parametrize(
    ("limit", "why"),
    [("loadTimeout", "loading fp32 on webgpu"), ("firstTokenTimeout", "the first token on webgpu")],
)
def test_page_falls_back_to_wasm_past_a_time_limit(tab, site, reference, limit, why):
    _open(tab, site, device="webgpu", variant="fp32", **{limit: "0.001"})
    state = _answer_matches(tab, reference, "wasm")
    assert state["variant"] == "fp32"
    why = f"WebGPU failed ({why} took longer than 0.001 s): running on wasm"
    assert state["fallback"] == why and tab.text("notice") == why
    assert tab.text("status").startswith("wasm (CPU) · fp32 · loaded in ")


def _assert_names_the_adapter(status: str, adapter: dict) -> None:
    name = f"{adapter['vendor']} {adapter['architecture']}".strip()
    if adapter["software"]:
        assert status.startswith(f"WebGPU (software adapter: {name}) · "), status
    else:
        assert status.startswith(f"WebGPU ({name}) · "), status
    if adapter["architecture"] == "swiftshader":  # what headless Chromium offers without a GPU
        assert adapter["software"] and name == "google swiftshader"


@pytest.mark.processes
def test_variant_choice_and_facts_without_a_browser():
    """choose.js and facts.js on their own (node): what the page picks and shows for adapters this machine lacks."""
    if shutil.which("node") is None:
        pytest.skip("node not installed (bash scripts/install_web.sh needs it)")
    script = """
    const { chooseVariant, describeAdapter, backendLabel, oneLine } = await import("./choose.js");
    const { factRows } = await import("./facts.js");
    const variants = ["fp32", "q4", "q4f16"];
    const gpu = (f16, info) => describeAdapter(info, new Set(f16 ? ["shader-f16"] : []));
    const pick = (backend, asked, adapter) => chooseVariant({ variants, fallback: "q4", backend, asked, adapter });
    const card = { base_model: "b", adapter: "r/adapter", run: { rounds: 3, clients: 4, data: "sarcasm" },
                   privacy: null };
    const parity = { texts: 2, variants: { q4: { next_token_agreement: 1, max_logit_error: 0.5, size_bytes: 2e6,
                     size_vs_fp32: 0.25, perplexity_change: -0.01 } } };
    console.log(JSON.stringify({
      f16: pick("webgpu", null, gpu(true, { vendor: "nvidia", architecture: "ampere" })),
      noF16: pick("webgpu", null, gpu(false, {})),
      wasm: pick("wasm", null, null),
      asked: pick("webgpu", "fp32", gpu(false, {})),
      unknown: pick("wasm", "int8", null),
      soft: backendLabel("webgpu", gpu(false, { vendor: "google", architecture: "swiftshader" })),
      hard: backendLabel("webgpu", gpu(true, { vendor: "nvidia", architecture: "ampere" })),
      rows: factRows({ card, parity }, "q4"),
      none: factRows({ card: null, parity: null }, "q4"),
      ort: oneLine(new Error("failed to call OrtRun(). ERROR_CODE: 1, ERROR_MESSAGE: Non-zero status code returned " +
        "while running Gather node. Status Message: shader_helper.cc:416 GenerateSourceCode Program Gather " +
        "requires f16 but the device does not support it.\\n  at x")),
    }));
    """
    proc = subprocess.run(
        ["node", "--input-type=module", "-e", script], cwd=WEB, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["f16"] == {"variant": "q4f16", "note": None}
    assert got["noF16"] == {"variant": "q4", "note": "q4f16 needs shader-f16, which this adapter lacks: running q4"}
    assert got["wasm"] == {"variant": "q4", "note": None} and got["asked"] == {"variant": "fp32", "note": None}
    assert got["unknown"] == {"variant": "q4", "note": "no int8 in this export (fp32, q4, q4f16); running q4"}
    assert got["soft"] == "WebGPU (software adapter: google swiftshader)" and got["hard"] == "WebGPU (nvidia ampere)"
    rows = dict(got["rows"])
    assert rows["Adapter"] == "r/adapter, merged (3 rounds, 4 clients on sarcasm)"
    assert rows["Privacy"] == "no differential-privacy guarantee recorded"
    assert rows["q4 against PyTorch"].startswith("next-token agreement 1.0000, max logit error 0.5, perplexity -1.00%")
    assert got["none"][0][0] == "Model card"
    assert got["ort"] == "Program Gather requires f16 but the device does not support it"


def test_model_card_front_matter_holds_the_facts(tmp_path):
    from fedswarm.client.edge.card import FACTS_KEY, card_facts, model_card
    from fedswarm.client.edge.merge import RunInfo
    from fedswarm.client.edge.parity import Parity, VariantParity

    adapter = tmp_path / "run-1" / "adapter"
    config = {"rounds": 3, "clients": 4, "data": "sarcasm", "lora_rank": 8, "seed": 0}
    run = RunInfo(adapter, {"config": config, "privacy": PRIVACY})
    row = VariantParity("fp32", "onnx/model.onnx", 10, 1.0, 1.0, 0.0, 0.0, 5.0, 0.0, 0.999, True)
    card = model_card("tiny", run, Parity([row], 5.0, 2, 20))
    front = card.split("\n---\n", 1)[0].splitlines()
    assert front[0] == "---" and front[1] == "library_name: transformers.js"
    facts = json.loads(front[2].removeprefix(f"{FACTS_KEY}: "))
    assert facts == card_facts("tiny", run)
    assert facts["adapter"] == "run-1/adapter" and facts["run"] == {k: config[k] for k in config if k != "seed"}
    assert facts["privacy"] == {"epsilon": 3.5, "delta": 1e-5, "kind": "local, per node"}
    assert card_facts("tiny", RunInfo(None))["adapter"] is None
