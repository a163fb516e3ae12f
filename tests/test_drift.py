"""SCAFFOLD drift correction: the node's gradient correction, its c_i, and the coordinator's c."""

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedswarm.client.trainer.drift import DriftCorrection
from fedswarm.client.trainer.local_train import train_lora
from fedswarm.client.trainer.privacy import Accountant, DpSettings, noise_generator, train_lora_dp
from fedswarm.common.config import FederationConfig
from fedswarm.common.contract import arrays_of
from fedswarm.common.data import Example
from fedswarm.common.flower_internals import act_as_node
from fedswarm.common.lora_state import adapter_state, load_adapter_state, lora_parameters
from fedswarm.server.coordinator.controls import CONTROL_KEY, attach_control, pop_mean_control
from fedswarm.server.coordinator.replies import screen_replies

pytestmark = pytest.mark.usefixtures("flower_task")  # replies are stamped as a node's

LR = 1e-2


def _examples(n: int) -> list[Example]:
    return [Example((("user", f"is item {i} odd?"),), "yes" if i % 2 else "no", None) for i in range(n)]


def _b_only(model) -> None:
    """ffa's setting: A frozen, B trained (B starts at zero, so A's gradient would be zero anyway)."""
    for key, param in lora_parameters(model).items():
        param.requires_grad_("lora_B" in key)


def _one_step(model, tokenizer, start, correction: dict | None, dp: bool = False) -> tuple[dict, dict]:
    """One local step from ``start`` with ``server - own = correction``; returns (c_i, new adapter)."""
    load_adapter_state(model, start)
    zeros = {k: torch.zeros_like(p) for k, p in lora_parameters(model).items() if p.requires_grad}
    server = {k: zeros[k] + correction[k] for k in zeros} if correction else zeros
    drift = DriftCorrection(model, server, zeros)
    if dp:  # no noise, no clipping in effect: the private gradient is the batch gradient
        settings = DpSettings(noise_multiplier=0.0, max_grad_norm=1e6, delta=1e-5, budget=0, sample_rate=1.0)
        train_lora_dp(model, tokenizer, _examples(6), 1, LR, 48, settings, Accountant(), 0, noise_generator(0), drift)
    else:
        train_lora(model, tokenizer, _examples(6), 1, 6, LR, 48, 0, "fp32", drift)
    return drift.control(), adapter_state(model)


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_adamw_follows_the_corrected_gradient(tiny_lora, tokenizer, dp):
    _b_only(tiny_lora)
    gen = torch.Generator().manual_seed(0)
    start = adapter_state(tiny_lora)
    for key in start:  # B away from zero, so every gradient is non-trivial
        if "lora_B" in key:
            start[key] = 0.05 * torch.randn(start[key].shape, generator=gen)
    g, _ = _one_step(tiny_lora, tokenizer, start, None, dp)  # c_i = the raw gradient of that one step
    flip = {k: torch.rand(v.shape, generator=gen) < 0.5 for k, v in g.items()}
    correction = {k: torch.where(flip[k], -3 * v, torch.zeros_like(v)) for k, v in g.items()}
    g2, after = _one_step(tiny_lora, tokenizer, start, correction, dp)
    flipped = 0
    for key, grad in g.items():
        torch.testing.assert_close(g2[key], grad)  # c_i is the uncorrected gradient
        seen = grad + correction[key]  # AdamW's first step: -lr * m / (sqrt(v) + eps) with m = v**0.5 = seen
        expected = start[key] - LR * seen / (seen.abs() + 1e-8)
        torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-7)
        flipped += int(((grad.sign() != seen.sign()) & (grad.abs() > 1e-6)).sum())
    assert flipped > 0  # the correction turned steps around: an ignored correction would fail above


def test_control_is_the_mean_gradient_over_steps(tiny_lora, tokenizer):
    _b_only(tiny_lora)
    params = {k: p for k, p in lora_parameters(tiny_lora).items() if p.requires_grad}
    own = {k: torch.full_like(p, 0.5) for k, p in params.items()}
    server = {k: torch.full_like(p, 0.75) for k, p in params.items()}
    drift = DriftCorrection(tiny_lora, server, own)
    raws = []
    for seed in (1, 2):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
        raws.append({k: p.grad.clone() for k, p in params.items()})
        drift()
        for key, p in params.items():  # the optimizer sees g - c_i + c
            torch.testing.assert_close(p.grad, raws[-1][key] + 0.25)
    for p in params.values():  # an fp16 overflow step: skipped by the scaler, left out of c_i
        p.grad = torch.full_like(p, float("inf"))
    drift()
    assert drift.steps == 2
    for key, control in drift.control().items():
        torch.testing.assert_close(control, (raws[0][key] + raws[1][key]) / 2)


def test_round_one_and_new_nodes_train_uncorrected(tiny_lora):
    _b_only(tiny_lora)
    params = {k: p for k, p in lora_parameters(tiny_lora).items() if p.requires_grad}
    server = {k: torch.ones_like(p) for k, p in params.items()}
    for own_c, coordinator_c in ((None, None), (None, server)):
        drift = DriftCorrection(tiny_lora, coordinator_c, own_c)
        for p in params.values():
            p.grad = torch.ones_like(p)
        drift()
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params.values())
    with pytest.raises(ValueError, match="coordinator's control variate does not match"):
        DriftCorrection(tiny_lora, {"x": torch.zeros(1)}, server)


def _reply(node: int, arrays: dict, control: dict | None, examples: int) -> Message:
    act_as_node(node)
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0})})
    content["arrays"] = ArrayRecord(arrays)
    if control is not None:
        content[CONTROL_KEY] = ArrayRecord(control)
    return Message(content=content, dst_node_id=0, message_type="train")


def test_coordinator_c_is_the_example_weighted_mean():
    key = "layer.lora_B.weight"
    replies = [
        _reply(n, {key: torch.zeros(2, 2)}, {key: torch.full((2, 2), v)}, e) for n, v, e in ((1, 1.0, 10), (2, 4.0, 30))
    ]
    c = pop_mean_control(replies)
    assert all(CONTROL_KEY not in r.content for r in replies)  # the strategy sees the adapters only
    torch.testing.assert_close(c[key], torch.full((2, 2), (10 * 1.0 + 30 * 4.0) / 40))
    messages = [Message(content=RecordDict(), dst_node_id=1, message_type="train")]
    attach_control(messages, None)  # round 1: nothing to send
    assert CONTROL_KEY not in messages[0].content
    attach_control(messages, c)
    torch.testing.assert_close(arrays_of(messages[0].content, CONTROL_KEY)[key], c[key])


def test_scaffold_replies_without_a_well_formed_control_are_rejected():
    key = "layer.lora_B.weight"
    cfg = FederationConfig(clients=3, aggregation="ffa", scaffold=True)
    good = {key: torch.zeros(4, 2)}
    replies = [
        _reply(1, good, good, 10),
        _reply(2, good, None, 10),
        _reply(3, good, {key: torch.full((4, 2), float("nan"))}, 10),
        _reply(4, good, {key: torch.zeros(2, 4)}, 10),
    ]
    screened = screen_replies(replies, cfg, {n: good for n in (1, 2, 3, 4)}, round_no=2)
    assert [int(r.metadata.src_node_id) for r in screened.accepted] == [1]
    assert screened.rejected == [
        "node 2: no SCAFFOLD control variate (control record)",
        f"node 3: control variate: {key} holds NaN or Inf",
        f"node 4: control variate: {key} has shape (2, 4), expected (4, 2)",
    ]


def test_scaffold_config_errors():
    with pytest.raises(ValueError, match="--scaffold works with --aggregation fedavg or ffa"):
        FederationConfig(aggregation="svd", scaffold=True)
    with pytest.raises(ValueError, match="outside the central DP guarantee"):
        FederationConfig(aggregation="ffa", scaffold=True, central_dp=True)
    FederationConfig(aggregation="ffa", scaffold=True, dp=True, epsilon=8.0)  # local DP covers c_i
