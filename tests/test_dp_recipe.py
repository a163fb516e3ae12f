"""The DP recipe: private batches in micro-batches, the DP optimiser, PRV accounting, per-label rates."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedswarm.client.trainer.node_round import train_round
from fedswarm.client.trainer.privacy import (
    BALANCE_RATE_CAP,
    Accountant,
    DpSettings,
    calibrate_noise,
    epsilon_of,
    noise_generator,
    sample_rates,
    train_lora_dp,
)
from fedswarm.client.trainer.runtime import Shard
from fedswarm.common.config import FederationConfig
from fedswarm.common.data import Example
from tests.conftest import dp_config


def _examples(n: int, yes_every: int = 2) -> list[Example]:
    return [
        Example((("user", f"item number {i} " * (1 + i % 3)),), *["yes" if i % yes_every == 0 else "no"] * 2)
        for i in range(n)
    ]


def _one_step(model, tokenizer, examples, micro_batch: int, sizes: list[int]) -> tuple[list, list]:
    """One DP-SGD step on every example (rate 1), seeded noise: the noised mean gradient and the new weights."""
    settings = DpSettings(0.7, 1e-3, 1e-5, 0, 1.0, "rdp", "sgd", 0.0, micro_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads: list[torch.Tensor] = []
    hook = model.get_base_model().model.embed_tokens.register_forward_hook(
        lambda _m, args, _out: sizes.append(int(args[0].shape[0]))
    )
    try:
        train_lora_dp(
            model, tokenizer, examples, 1, 0.5, 48, settings, Accountant(), 0, noise_generator(11),
            on_grads=lambda: grads.extend(p.grad.detach().clone() for p in params),
        )  # fmt: skip
    finally:
        hook.remove()
    return grads, [p.detach().clone() for p in params]


@pytest.mark.slow
def test_micro_batches_take_the_same_step_as_one_big_batch(tiny_lora_f64, tokenizer):
    model = tiny_lora_f64
    examples = _examples(10)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    whole_sizes: list[int] = []
    whole_grads, whole_after = _one_step(model, tokenizer, examples, 0, whole_sizes)
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
    micro_sizes: list[int] = []
    micro_grads, micro_after = _one_step(model, tokenizer, examples, 3, micro_sizes)

    assert whole_sizes == [10] and micro_sizes == [3, 3, 3, 1]  # memory: one micro-batch at a time
    assert any(float(g.abs().max()) > 0 for g in whole_grads)
    # the same clipped sum and the same noise draw: equal to float64 round-off (summation order differs)
    for a, b in zip(whole_grads, micro_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for a, b in zip(whole_after, micro_after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_sgd_step_is_the_learning_rate_times_the_noised_gradient(tiny_lora_f64, tokenizer):
    params = [p for p in tiny_lora_f64.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    grads, after = _one_step(tiny_lora_f64, tokenizer, _examples(6), 4, [])
    for s, g, a in zip(start, grads, after, strict=True):
        torch.testing.assert_close(a, s - 0.5 * g, rtol=1e-12, atol=1e-15)


def _cfg(**kw) -> FederationConfig:
    """test_privacy's tiny DP settings with a private batch of 12 (3 micro-batches of 4)."""
    return dp_config(**{"dp_batch_size": 12, **kw})


@pytest.mark.slow
def test_accountant_counts_one_step_per_private_batch(tiny_lora, tokenizer):
    from opacus.accountants import RDPAccountant

    shard = Shard(_examples(40), [], 0)
    out = train_round(tiny_lora, tokenizer, shard, _cfg(), 1, None)
    history = Accountant.loads(out.privacy_history or "").history
    assert history == [(1.1, 12 / 40, 3)]  # 3 steps of expected batch 12, not 9 micro-batches
    independent = RDPAccountant()
    independent.history = [(1.1, 0.3, 3)]
    assert out.metrics["epsilon"] == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    assert out.metrics["expected-batch"] == pytest.approx(12.0)


@pytest.mark.slow
def test_prv_calibration_reaches_the_target_with_less_noise_than_rdp(tiny_lora, tokenizer):
    from opacus.accountants import PRVAccountant

    cfg = _cfg(noise_multiplier=0.0, epsilon=3.0, rounds=2, accountant="prv")
    shard = Shard(_examples(40), [], 0)
    history = None
    for rnd in (1, 2):
        out = train_round(tiny_lora, tokenizer, shard, cfg, rnd, history)
        history = out.privacy_history
    sigma, q = out.metrics["noise-multiplier"], out.metrics["sample-rate"]
    assert 2.9 < out.metrics["epsilon"] <= 3.0 + 0.02  # the target, within PRV's own error bound
    independent = PRVAccountant()  # Opacus' accountant called directly on the recorded figures
    independent.history = [(sigma, q, 6)]
    assert out.metrics["epsilon"] == pytest.approx(independent.get_epsilon(1e-5, eps_error=0.01), abs=0.02)
    assert sigma < calibrate_noise(3.0, 1e-5, q, 6, "rdp")  # PRV is tighter: the same epsilon for less noise


def test_balanced_rates_balance_labels_in_expectation_under_a_cap():
    mild = _examples(40, yes_every=4)  # 10 yes, 30 no
    rates = sample_rates(mild, 8, balance=True)
    yes = np.array([e.label == "yes" for e in mild])
    assert rates[yes] == pytest.approx(np.full(10, 4 / 10))  # 4 expected examples of each label
    assert rates[~yes] == pytest.approx(np.full(30, 4 / 30))
    assert rates.sum() == pytest.approx(8.0)
    skewed = _examples(100, yes_every=50)  # 2 yes, 98 no: the rare label's rate is capped
    rates = sample_rates(skewed, 8, balance=True)
    assert rates.max() == pytest.approx(BALANCE_RATE_CAP * 8 / 100)
    assert sample_rates(skewed, 8).tolist() == [0.08] * 100


@pytest.mark.slow
def test_balanced_dp_is_accounted_at_the_largest_rate(tiny_lora, tokenizer):
    shard = Shard(_examples(40, yes_every=4), [], 0)
    out = train_round(tiny_lora, tokenizer, shard, _cfg(dp_batch_size=8, balance_labels=True), 1, None)
    assert out.metrics["sample-rate"] == pytest.approx(0.4)  # the rare label's rate, charged to every example
    assert Accountant.loads(out.privacy_history or "").history == [(1.1, 0.4, 3)]


def test_rates_beyond_the_accounted_one_are_refused(tiny_lora, tokenizer):
    settings = DpSettings(1.0, 1.0, 1e-5, 0, 0.1)
    with pytest.raises(ValueError, match="within the accounted sample rate"):
        train_lora_dp(
            tiny_lora, tokenizer, _examples(4), 1, 1e-3, 48, settings, Accountant(), 0, noise_generator(0),
            rates=np.array([0.1, 0.1, 0.2, 0.1]),
        )  # fmt: skip


def test_epsilon_of_names_the_accountant_it_uses():
    history = [(1.0, 0.05, 50)]
    assert epsilon_of(history, 1e-5, "prv") < epsilon_of(history, 1e-5, "rdp")
    with pytest.raises(ValueError, match="accountant must be one of rdp, prv, got 'gdp'"):
        epsilon_of(history, 1e-5, "gdp")


def test_dp_defaults_pick_a_small_lora_unless_told():
    assert FederationConfig().lora_rank == 8
    assert FederationConfig(dp=True, epsilon=8).lora_rank == 2
    assert FederationConfig(dp=True, epsilon=8, lora_rank=4).lora_rank == 4
    assert FederationConfig(dp=True, epsilon=8, dp_optimizer="sgd").dp_lr() == 0.5
    assert FederationConfig(dp=True, epsilon=8, learning_rate=1e-3).dp_lr() == 1e-3
    # the run config keeps "auto", so an app default (deployment) still follows --dp; an explicit rank stays
    from fedswarm.common.config import from_run_config

    app_default = FederationConfig().to_run_config()
    assert app_default["lora-rank"] == 0
    assert from_run_config(FederationConfig, {**app_default, "dp": True, "epsilon": 8.0}).lora_rank == 2
    explicit = FederationConfig(dp=True, epsilon=8, lora_rank=8).to_run_config()
    assert from_run_config(FederationConfig, explicit).lora_rank == 8


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"dp_optimizer": "rmsprop"}, "--dp-optimizer must be adam or sgd, got 'rmsprop'"),
        ({"accountant": "gdp"}, "--accountant must be rdp or prv, got 'gdp'"),
        ({"dp_batch_size": 0}, "--dp-batch-size must be >= 1, got 0"),
        ({"dp_momentum": 1.5}, "--dp-momentum must be within [0, 1), got 1.5"),
        ({"dp_learning_rate": -1.0}, "--dp-learning-rate must be > 0 (or 0: the default), got -1.0"),
    ],
)
def test_bad_dp_options_are_refused(kw, message):
    with pytest.raises(ValueError) as err:
        FederationConfig(dp=True, epsilon=8, **kw)
    assert str(err.value) == message


@pytest.mark.processes
def test_bad_dp_option_is_one_line_nonzero_on_the_cli():
    cmd = [sys.executable, "-m", "fedswarm.common.cli", "simulate", "--model", "tiny", "--dp", "--epsilon", "8"]
    proc = subprocess.run([*cmd, "--accountant", "gdp"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["fedswarm simulate: error: --accountant must be rdp or prv, got 'gdp'"]
