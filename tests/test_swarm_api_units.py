"""The HTTP API's pure parts: model names, error answers, request bodies, metrics (no processes)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fedswarm.client.swarm import openai_schema as oa
from fedswarm.client.swarm.api_errors import from_exception, from_validation
from fedswarm.client.swarm.metrics import ApiMetrics
from fedswarm.client.swarm.routing import NoRouteError
from fedswarm.client.swarm.service import ContextLengthError, ModelNotFoundError, Target, served_models
from fedswarm.common.errors import FedswarmError, InputError
from fedswarm.protos import swarm_pb2


def _info(address: str, model: str = "tiny", merged: str = "", adapters: tuple[str, ...] = ()) -> swarm_pb2.ServerInfo:
    info = swarm_pb2.ServerInfo(address=address, model_id=model, adapter_id=merged, num_blocks=4, start=0, end=4)
    for name in adapters:
        info.adapters.add(name=name, digest="d" + name)
    return info


def test_served_models_names_bases_merged_and_unmerged_adapters():
    servers = [_info("a:1", adapters=("alpha",)), _info("b:1", merged="0123abcd"), _info("c:1", model="other")]
    assert served_models(servers) == {
        "0123abcd": Target("0123abcd", "tiny", "0123abcd"),
        "alpha": Target("alpha", "tiny", "", "alpha"),
        "other": Target("other", "other"),
        "tiny": Target("tiny", "tiny"),
    }
    assert served_models(servers)["alpha"].adapter == "alpha" and served_models(servers)["tiny"].adapter == ""
    assert served_models(servers)["alpha"].group == served_models(servers)["tiny"].group  # one client serves both


@pytest.mark.parametrize(
    ("exc", "status", "code", "param"),
    [
        (ModelNotFoundError("model 'x' is not served"), 404, "model_not_found", "model"),
        (ContextLengthError("context is 2048 tokens"), 400, "context_length_exceeded", "max_tokens"),
        (InputError("top_p must be in (0, 1], got 0"), 400, "invalid_value", "top_p"),
        (InputError("stop: at most 4 strings"), 400, "invalid_value", "stop"),
        (NoRouteError([(2, 4)]), 503, "no_live_server", None),
        (FedswarmError("registry unreachable: h:1 (UNAVAILABLE)"), 503, "swarm_unavailable", None),
        (RuntimeError("bug"), 500, "internal_error", None),
    ],
)
def test_exceptions_become_openai_errors_with_their_status(exc, status, code, param):
    error = from_exception(exc)
    assert (error.status, error.code, error.param) == (status, code, param)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    assert error.body()["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")


def test_a_bug_does_not_leak_its_message():
    assert from_exception(RuntimeError("secret path /x/y")).message == "internal error: RuntimeError"


def _validation_errors(body: dict) -> list:
    with pytest.raises(ValidationError) as info:
        oa.ChatCompletionRequest.model_validate(body)
    return list(info.value.errors(include_url=False))


def test_validation_errors_name_the_field():
    missing = from_validation(_validation_errors({"model": "tiny"}))
    assert (missing.status, missing.param, missing.code) == (400, "messages", "missing_required_parameter")
    wrong = from_validation(_validation_errors({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}))
    assert wrong.param == "messages" and wrong.message.startswith("messages.0.role:")
    images = [{"role": "user", "content": [{"type": "image_url"}]}]
    assert "only text" in from_validation(_validation_errors({"model": "tiny", "messages": images})).message


def test_request_bodies_refuse_what_the_swarm_cannot_honour():
    with pytest.raises(InputError, match="n: only 1"):
        oa.CompletionRequest(model="m", prompt="x", n=3).check_supported()
    with pytest.raises(InputError, match="one prompt per request"):
        oa.CompletionRequest(model="m", prompt=["a", "b"]).prompt_text_or_ids()
    assert oa.CompletionRequest(model="m", prompt=["a"]).prompt_text_or_ids() == "a"
    assert oa.CompletionRequest(model="m", prompt=[1, 2]).prompt_text_or_ids() == [1, 2]
    chat = oa.ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}],
            "user": "u",
        }
    )
    assert chat.messages[0].as_template_message() == {"role": "system", "content": "be brief"}
    assert oa.CompletionRequest(model="m", prompt="x", stop="\n").stop_strings() == ["\n"]
    assert oa.ChatCompletionRequest(model="m", messages=[{"role": "user"}], max_completion_tokens=7).token_limit() == 7


def test_chat_chunks_carry_only_the_changed_fields():
    chunk = oa.ChatCompletionChunk(
        id="c", created=1, model="m", choices=[oa.ChatChunkChoice(delta=oa.Delta(content="a"))]
    )
    event = oa.sse(chunk)
    assert event.startswith("data: {") and event.endswith("\n\n")
    assert json.loads(event[len("data: ") :])["choices"][0] == {
        "index": 0,
        "delta": {"content": "a"},
        "logprobs": None,
        "finish_reason": None,
    }


def test_metrics_live_in_their_own_registry_and_time_tokens():
    first, second = ApiMetrics(), ApiMetrics()  # no clash: neither uses the global registry
    first.observe_tokens("tiny", "", arrived=10.0, token_times=[10.5, 10.6, 10.8])
    value = first.registry.get_sample_value
    assert value("fedswarm_api_time_to_first_token_seconds_sum", {"model": "tiny", "adapter": ""}) == 0.5
    assert value("fedswarm_api_inter_token_latency_seconds_count", {"model": "tiny", "adapter": ""}) == 2
    assert (
        second.registry.get_sample_value(
            "fedswarm_api_inter_token_latency_seconds_count", {"model": "tiny", "adapter": ""}
        )
        is None
    )


def test_max_tokens_must_fit_the_context_and_defaults_to_what_is_left():
    from fedswarm.client.swarm.service import Runtime, SwarmService
    from fedswarm.common.security.transport import Security

    service = SwarmService(["127.0.0.1:1"], Security())  # no registry is contacted for this
    runtime = Runtime(head=None, tokenizer=None, eos_ids=frozenset(), context=10)
    assert service.check_length(runtime, [1] * 4, None, default=256) == 6
    assert service.check_length(runtime, [1] * 4, 6, default=256) == 6
    with pytest.raises(ContextLengthError, match="context is 10 tokens; the prompt has 4 and 7 more"):
        service.check_length(runtime, [1] * 4, 7, default=256)
    with pytest.raises(ContextLengthError, match="the prompt alone has 10"):
        service.check_length(runtime, [1] * 10, None, default=256)
    with pytest.raises(InputError, match="prompt: empty"):
        service.check_length(runtime, [], None, default=256)


def test_applications_authenticate_with_their_own_api_keys():
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from fedswarm.client.swarm.api import ApiState, build_app
    from fedswarm.client.swarm.service import SwarmService
    from fedswarm.common.security.transport import Security

    service = SwarmService(["127.0.0.1:1"], Security())  # unreachable: an admitted request gets 503
    with ThreadPoolExecutor(1) as pool:
        app = build_app(ApiState(service, ApiMetrics(), pool, api_keys=("key-one", "key-two")))
        with TestClient(app) as http:
            answers = {
                header: http.get("/v1/models", headers={"Authorization": header} if header else {})
                for header in ("", "Bearer wrong", "Basic key-one", "Bearer key-one", "bearer  key-two ")
            }
    for header in ("", "Basic key-one"):
        assert answers[header].status_code == 401
        assert answers[header].json()["error"]["message"] == (
            "missing bearer token: send 'Authorization: Bearer <an API key>'"
        )
    assert answers["Bearer wrong"].status_code == 401
    assert (
        answers["Bearer wrong"].json()["error"] | {"message": "invalid API key", "code": "invalid_api_key"}
        == (answers["Bearer wrong"].json()["error"])
    )
    for header in ("Bearer key-one", "bearer  key-two "):
        assert answers[header].status_code == 503, answers[header].text  # admitted; the swarm is unreachable
