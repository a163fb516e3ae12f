"""The swarm's OpenAI-compatible HTTP API, end to end: a registry, two block servers and the API as
separate processes on 127.0.0.1 (the tiny model), the official ``openai`` package as the client, and
a real Prometheus scraping the API and a block server.

Layout: reg; a[0:2], b[2:4], c[2:4] (each with a metrics port and adapter "alpha" unmerged; c announces
a huge throughput, so routes go a -> c until c is killed mid-stream); api. The last test stops b.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch

from fedswarm.common.model import load_model
from fedswarm.common.processes import free_port
from tests.conftest import assert_no_leftovers
from tests.swarm_support import FORKSERVER, TOKEN, Procs, make_adapter, noop, run_cli

pytestmark = pytest.mark.integration

PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"
END_TOKENS = {0, 2}  # <|endoftext|>, <|im_end|>
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class ApiSwarm:
    procs: Procs
    registry: str
    url: str  # the API's base URL, http://127.0.0.1:P/v1
    metrics: dict[str, str]  # process name -> its /metrics URL

    def client(self, token: str = TOKEN) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=token, max_retries=0, timeout=120)

    def scrape(self, name: str) -> dict[str, float]:
        """``name``'s metrics: ``'series{labels}' -> value`` (labels sorted, as Prometheus prints them)."""
        text = httpx.get(self.metrics[name], timeout=30).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    warm = FORKSERVER.Process(target=noop)  # the forkserver imports torch while the registry starts
    warm.start()
    procs = Procs(folder)
    try:
        port = free_port()
        procs.start("reg", "registry", "--port", str(port), "--insecure")
        registry = f"127.0.0.1:{port}"
        common = ["--registry", registry, "--model", "tiny", "--threads", "1", "--ttl", "30", "--metrics-port", "0"]
        common.append("--insecure")  # the secure swarm is tested in test_swarm_integration
        common += ["--adapter", f"alpha={make_adapter(folder / 'alpha', seed=1)}"]
        procs.fork("a", "serve", *common, "--blocks", "0:2")
        procs.fork("b", "serve", *common, "--blocks", "2:4")
        procs.fork("c", "serve", *common, "--blocks", "2:4", "--throughput", "1e9", "--ttl", "3")  # preferred to b
        procs.wait_ready("reg")
        procs.fork("api", "api", "--registry", registry, "--port", "0", "--threads", "1", "--insecure")
        procs.wait_ready("a", "b", "c", "api")
        metrics = {name: _metrics_url(folder / f"{name}.log") for name in ("a", "b", "c", "api")}
        swarm = ApiSwarm(procs, registry, procs.addresses["api"], metrics)
        _wait_for_blocks(swarm)
        yield swarm
    finally:
        procs.stop_all()
        warm.join(timeout=5)
    assert_no_leftovers(procs.sup)


def _metrics_url(log: Path) -> str:
    match = re.search(r"metrics on (http://\S+/metrics)", log.read_text())
    assert match, log.read_text()
    return match.group(1)


def _wait_for_blocks(swarm: ApiSwarm) -> None:
    """Until the API sees a server for every block (the servers may have announced after it started)."""
    deadline = time.monotonic() + 30
    while True:
        coverage = {k: v for k, v in swarm.scrape("api").items() if k.startswith("fedswarm_swarm_block_servers")}
        if list(coverage.values()) == [1, 1, 2, 2]:
            return
        assert time.monotonic() < deadline, coverage
        time.sleep(0.3)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _local_text(model, tokenizer, ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    """Greedy decoding in one process up to an end token; the text as the API should show it."""
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(END_TOKENS)
    )
    tokens = out[0, len(ids) :].tolist()
    return tokenizer.decode(tokens, skip_special_tokens=True), tokens


def _chat_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models_lists_the_base_model_and_its_adapters(api):
    models = {m.id: m for m in api.client().models.list()}
    assert sorted(models) == ["alpha", "tiny"]
    assert models["alpha"].model_extra["parent"] == "tiny" and models["tiny"].model_extra["parent"] is None


def test_a_request_naming_an_adapter_gets_its_tokens(api, tokenizer, tmp_path):
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(load_model("tiny"), api.procs.folder / "alpha").eval()
    with torch.no_grad():
        expected, _ = _local_text(adapted, tokenizer, PROMPT, 8)
    client = api.client()
    reply = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.model == "alpha"
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert base.choices[0].text != expected  # the adapter changes the answer
    assert api.scrape("a")['fedswarm_server_requests_total{adapter="alpha",method="Inference"}'] >= 1


def test_greedy_completion_equals_the_local_model_and_the_cli(api, tiny, tokenizer, tmp_path):
    expected, tokens = _local_text(tiny, tokenizer, PROMPT, 12)
    reply = api.client().completions.create(model="tiny", prompt=tokenizer.decode(PROMPT), max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == ("stop" if tokens[-1] in END_TOKENS else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(PROMPT), len(tokens))

    out, err = tmp_path / "generate.out", tmp_path / "generate.err"
    argv = ["swarm", "generate", "--registry", api.registry, "--threads", "1", "--insecure", tokenizer.decode(PROMPT)]
    run = FORKSERVER.Process(target=run_cli, args=(str(out), [*argv, "--max-new-tokens", "12"], str(err)))
    run.start()
    api.procs.sup.adopt("generate", run.pid)
    run.join(timeout=120)
    assert run.exitcode == 0, err.read_text()
    assert out.read_text() == expected + "\n"


def test_streamed_completion_equals_the_whole_one(api, tokenizer):
    client = api.client()
    prompt = tokenizer.decode(PROMPT)
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text and len([t for t in texts if t]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_streamed_and_not_equals_the_local_model(api, tiny, tokenizer):
    ids = _chat_ids(tokenizer)
    expected, tokens = _local_text(tiny, tokenizer, ids, 10)
    client = api.client()
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(tokens))
    chunks = list(
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_stop_strings_cut_the_text_and_seeds_repeat_samples(api, tiny, tokenizer):
    expected, _ = _local_text(tiny, tokenizer, PROMPT, 12)
    stop = expected[len(expected) // 2 : len(expected) // 2 + 3]
    client = api.client()
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].text == expected[: expected.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=5)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_each_get_their_own_tokens(api, tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [PROMPT, PROMPT[:3], [504, 2988, 314], PROMPT[1:], _chat_ids(tokenizer)]
    client = api.client()

    def complete(prompt: list[int]) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0).choices[0].text

    alone = [complete(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(complete, prompts))
    assert together == alone


def _server_state(api: ApiSwarm) -> list[tuple[float, float]]:
    """Per block server: Inference calls received, sessions open."""
    state = []
    for name in ("a", "b", "c"):
        metrics = api.scrape(name)
        calls = sum(v for k, v in metrics.items() if k.startswith("fedswarm_server_requests_total{"))
        state.append((calls, metrics["fedswarm_server_active_sessions"]))
    return state


def _error(exc_info) -> dict:
    return exc_info.value.body if "message" in (exc_info.value.body or {}) else exc_info.value.body["error"]


def test_bad_requests_get_openai_errors_and_open_no_session(api):
    before = _server_state(api)
    client = api.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert _error(info)["code"] == "model_not_found" and _error(info)["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[504] * 2040, max_tokens=100)
    assert _error(info)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=CHAT, temperature=3.0)
    assert _error(info)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hi", n=2)
    assert _error(info)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[10**9], max_tokens=2)
    assert "outside the vocabulary" in _error(info)["message"]
    with pytest.raises(openai.AuthenticationError) as info:
        api.client(token="wrong").models.list()
    assert _error(info)["code"] == "invalid_api_key"

    headers = {"Authorization": f"Bearer {TOKEN}"}
    raw = {
        "bad json": ("/completions", b'{"model": "tiny", "prompt": '),
        "no messages": ("/chat/completions", json.dumps({"model": "tiny"}).encode()),
        "not an object": ("/completions", b"[1, 2]"),
    }
    answers = {k: httpx.post(api.url + path, content=body, headers=headers) for k, (path, body) in raw.items()}
    assert {k: r.status_code for k, r in answers.items()} == dict.fromkeys(raw, 400)
    assert answers["bad json"].json()["error"]["code"] == "invalid_json"
    assert answers["no messages"].json()["error"] == {
        "message": "messages: required field missing",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "missing_required_parameter",
    }
    assert httpx.post(api.url + "/completions", content=b"{}").status_code == 401
    nowhere = httpx.get(api.url + "/engines", headers=headers)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "invalid_route"
    assert _server_state(api) == before  # not one session was opened
    errors = api.scrape("api")
    assert errors['fedswarm_api_errors_total{kind="model_not_found"}'] >= 1
    assert errors['fedswarm_api_errors_total{kind="invalid_api_key"}'] >= 2


def test_a_client_gone_mid_stream_ends_its_sessions(api):
    before = api.scrape("api").get('fedswarm_api_completion_tokens_total{adapter="",model="tiny"}', 0.0)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1900, "temperature": 0, "stream": True}
    with httpx.stream("POST", api.url + "/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
    deadline = time.monotonic() + 20
    while [sessions for _, sessions in _server_state(api)] != [0, 0, 0]:
        assert time.monotonic() < deadline, _server_state(api)
        time.sleep(0.2)
    while (
        after := api.scrape("api").get('fedswarm_api_completion_tokens_total{adapter="",model="tiny"}', 0.0)
    ) == before:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert after - before < 1900  # cut short, not generated to the end


def test_a_server_killed_mid_stream_is_replaced_and_the_text_is_unchanged(api):
    """Kills c: later requests go a -> b."""
    client = api.client()
    series = 'fedswarm_client_replays_total{adapter="",model="tiny"}'
    alone = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0).choices[0].text
    before = api.scrape("api")[series]
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0, stream=True)
    texts = []
    for chunk in stream:
        texts.append(chunk.choices[0].text)
        if len(texts) == 3:
            api.procs.kill("c")
    assert "".join(texts) == alone
    assert api.scrape("api")[series] > before  # the hop on c was re-routed to b and replayed


def test_prometheus_scrapes_the_api_and_a_block_server(api, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus is not installed: bash scripts/install_monitoring.sh")
    api.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    port = free_port()
    targets = {name: urllib.parse.urlsplit(url).netloc for name, url in api.metrics.items()}
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: ['" + str(Path(__file__).resolve().parent.parent / "deploy/prometheus/fedswarm-rules.yml") + "']\n"
        "scrape_configs:\n"
        f"  - {{job_name: fedswarm-api, static_configs: [{{targets: ['{targets['api']}']}}]}}\n"
        f"  - {{job_name: fedswarm-block-servers, static_configs: [{{targets: ['{targets['a']}']}}]}}\n"
    )
    cmd = [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"]
    cmd += [f"--storage.tsdb.path={tmp_path / 'data'}"]
    with (tmp_path / "prometheus.log").open("w") as log:
        api.procs.sup.start("prometheus", cmd, output=log, quiet=True)
    try:
        queries = {
            "api": 'sum(fedswarm_api_requests_total{job="fedswarm-api"})',
            "server": 'sum(fedswarm_server_requests_total{job="fedswarm-block-servers",method="Inference"})',
            "coverage": 'min(fedswarm_swarm_block_servers{job="fedswarm-api"})',
        }
        values = _query_until(f"http://127.0.0.1:{port}", queries, tmp_path / "prometheus.log")
        assert values["api"] > 0 and values["server"] > 0 and values["coverage"] == 1
        rules = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert len(rules[0]["rules"]) == 8  # the shipped alerting rules load into a real Prometheus
    finally:
        api.procs.sup.stop("prometheus")


def _query_until(base: str, queries: dict[str, str], log: Path, timeout_s: float = 60.0) -> dict[str, float]:
    """Each query's value once Prometheus has scraped data for all of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        values: dict[str, float] = {}
        for name, query in queries.items():
            try:
                result = httpx.get(f"{base}/api/v1/query", params={"query": query}, timeout=5).json()["data"]["result"]
            except (httpx.HTTPError, KeyError, ValueError):
                result = []
            if result:
                values[name] = float(result[0]["value"][1])
        if len(values) == len(queries):
            return values
        assert time.monotonic() < deadline, (
            f"prometheus has no data for {set(queries) - set(values)}:\n{log.read_text()}"
        )
        time.sleep(0.5)


def test_no_live_server_for_a_block_is_503(api):
    """Last: stops server b, which withdraws its blocks from the registry (c's entry lapses after 3 s)."""
    api.procs.sup.stop("b")
    deadline = time.monotonic() + 20
    while api.scrape("api")['fedswarm_swarm_block_servers{block="2",model="tiny"}'] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    client = api.client()
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, stream=stream)
            list(reply) if stream else None
        assert info.value.status_code == 503
        assert _error(info)["code"] == "no_live_server" and "blocks 2-3" in _error(info)["message"]
    coverage = api.scrape("api")
    assert coverage['fedswarm_swarm_block_servers{block="2",model="tiny"}'] == 0
    assert coverage['fedswarm_swarm_block_servers{block="0",model="tiny"}'] == 1
