"""Local DP: cumulative accounting, budgets, per-sample clipping, noise scale (tiny model)."""

import math

import pytest
import torch

from fedswarm.client.trainer.node_round import train_round
from fedswarm.client.trainer.privacy import Accountant, DpSettings, _check_updated, dp_components, noise_generator
from fedswarm.client.trainer.runtime import Shard
from fedswarm.common.batches import collate, encode, per_sample_answer_loss
from fedswarm.common.data import Example
from tests.conftest import dp_config


def _examples(n: int) -> list[Example]:
    return [Example((("user", f"item number {i} " * (1 + i % 3)),), "yes" if i % 2 else "no", None) for i in range(n)]


def test_epsilon_accumulates_like_opacus_rdp(tiny_lora, tokenizer):
    from opacus.accountants import RDPAccountant

    cfg = dp_config()
    shard = Shard(_examples(40), [], 0)
    history, eps = None, []
    for rnd in (1, 2, 3):  # the node state carries the history between rounds
        out = train_round(tiny_lora, tokenizer, shard, cfg, rnd, history)
        history = out.privacy_history
        eps.append(out.metrics["epsilon"])
        assert out.metrics["steps"] == 3 and out.metrics["noise-multiplier"] == 1.1
    q = cfg.dp_batch_size / len(shard.train)
    independent = RDPAccountant()
    independent.history = [(1.1, q, 9)]  # the same sigma and rate, all 3 x 3 steps
    assert eps[-1] == pytest.approx(independent.get_epsilon(cfg.delta), rel=1e-9)
    assert eps[0] < eps[1] < eps[2]
    assert out.metrics["sample-rate"] == pytest.approx(q)


def test_node_past_budget_declines(tiny_lora, tokenizer):
    shard = Shard(_examples(40), [], 0)
    q = 4 / 40
    budget = Accountant([(1.1, q, 3)]).epsilon(1e-5) * 1.01  # one round fits, two do not
    cfg = dp_config(epsilon=budget)
    first = train_round(tiny_lora, tokenizer, shard, cfg, 1, None)
    assert first.state is not None and first.metrics["epsilon"] <= budget
    second = train_round(tiny_lora, tokenizer, shard, cfg, 2, first.privacy_history)
    assert second.state is None and second.metrics["declined"] == 1
    assert second.metrics["projected-epsilon"] > budget
    assert "declined: the next round would reach epsilon" in second.note
    assert second.privacy_history == first.privacy_history  # declining spends nothing


@pytest.mark.slow
def test_noise_calibrated_from_target_epsilon(tiny_lora, tokenizer):
    cfg = dp_config(noise_multiplier=0.0, epsilon=8.0, rounds=2)
    shard = Shard(_examples(40), [], 0)
    history = None
    for rnd in (1, 2):
        out = train_round(tiny_lora, tokenizer, shard, cfg, rnd, history)
        history = out.privacy_history
    assert out.state is not None
    assert 7.5 < out.metrics["epsilon"] <= 8.0  # Opacus' calibration reaches the target over all rounds


def test_per_sample_gradients_are_exact_and_clipped(tiny_lora_f64, tokenizer):
    # In float64 (see the fixture): the invariant (hook gradient == the example's own gradient) holds to
    # float64 round-off on any CPU, where float32 kernels differ in their last bits from one CPU to another.
    tiny_lora = tiny_lora_f64
    examples = _examples(5)
    c = 1e-3  # far below the raw per-sample norms, so every sample is clipped
    settings = DpSettings(noise_multiplier=0.0, max_grad_norm=c, delta=1e-5, budget=0, sample_rate=1.0)
    gsm, optimizer = dp_components(tiny_lora, settings, len(examples), 1e-3, noise_generator(0))
    params = [p for p in tiny_lora.parameters() if p.requires_grad]
    pad = int(tokenizer.pad_token_id)
    try:
        batch = collate([encode(tokenizer, e, 48) for e in examples], pad)
        per_sample_answer_loss(tiny_lora, batch).mean().backward()
        grad_samples = [p.grad_sample.clone() for p in params]
        optimizer.clip_and_accumulate()
        summed = [p.summed_grad.clone() for p in params]
        optimizer.zero_grad(set_to_none=True)
    finally:
        gsm._close()
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grad_samples]).norm(dim=0)  # (batch,)
    assert bool((norms > c).all())
    for i, example in enumerate(examples):  # the hooks' per-sample gradient = that example alone
        tiny_lora.zero_grad()
        alone = collate([encode(tokenizer, example, 48)], pad)
        per_sample_answer_loss(tiny_lora, alone).sum().backward()
        for p, g in zip(params, grad_samples, strict=True):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-10, atol=1e-12)
    tiny_lora.zero_grad()
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    clipped_norms = norms * factors
    assert float(clipped_norms.max()) <= c * (1 + 1e-12)
    for g, s in zip(grad_samples, summed, strict=True):  # Opacus summed exactly the clipped samples
        torch.testing.assert_close(s, torch.einsum("i,i...->...", factors, g), rtol=1e-10, atol=1e-15)


def test_noise_has_the_expected_std(tiny_lora):
    sigma, c, expected_batch = 1.3, 0.5, 4
    settings = DpSettings(sigma, c, 1e-5, 0, 0.1)

    def noise(seed: int) -> torch.Tensor:
        gsm, optimizer = dp_components(tiny_lora, settings, expected_batch, 1e-3, noise_generator(seed))
        params = [p for p in tiny_lora.parameters() if p.requires_grad]
        try:
            for p in params:  # an empty Poisson draw: zero clipped sum, noise only
                p.grad_sample = torch.zeros((1, *p.shape))
            assert optimizer.pre_step()
            out = torch.cat([p.grad.flatten() for p in params])
            optimizer.zero_grad(set_to_none=True)
        finally:
            gsm._close()
        return out

    sample = noise(123)
    n = sample.numel()
    expected = sigma * c / expected_batch
    # the sample std of n normals is within 5 standard errors (sigma / sqrt(2n)) of the truth
    assert abs(float(sample.std()) - expected) < 5 * expected / math.sqrt(2 * n)
    assert abs(float(sample.mean())) < 5 * expected / math.sqrt(n)
    assert torch.equal(sample, noise(123)) and not torch.equal(sample, noise(124))  # seeded, and seed matters


def test_silent_no_op_step_fails_loudly():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match="Opacus issue 820"):
        _check_updated([p], [p.detach().clone()], expect_change=True)
    _check_updated([p], [p.detach().clone()], expect_change=False)


def test_accountant_history_round_trips():
    acc = Accountant()
    acc.record(1.0, 0.1, 3)
    acc.record(1.0, 0.1, 2)
    acc.record(2.0, 0.1, 1)
    assert acc.history == [(1.0, 0.1, 5), (2.0, 0.1, 1)]
    assert Accountant.loads(acc.dumps()).history == acc.history
    assert acc.steps == 6
