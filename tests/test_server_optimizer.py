"""Server optimisers (FedAvgM, FedAdam, FedYogi as Flower computes them) against hand-computed updates."""

import math

import pytest
import torch

from fedswarm.common.config import FederationConfig
from fedswarm.common.errors import InputError
from fedswarm.server.coordinator.server_optimizer import ServerOptimizer


def _two_rounds(opt: ServerOptimizer) -> tuple[float, float]:
    """x0 = 1.0; round 1's aggregate 1.5 (delta 0.5), round 2's aggregate x1 - 0.2 (delta -0.2)."""
    x1 = float(opt.step(1, {"b": torch.tensor([1.0])}, {"b": torch.tensor([1.5])})["b"])
    x2 = float(opt.step(2, {"b": torch.tensor([x1])}, {"b": torch.tensor([x1 - 0.2])})["b"])
    return x1, x2


def test_sgd_moves_lr_times_the_mean_update():
    x1, x2 = _two_rounds(ServerOptimizer("sgd", 0.5))
    assert x1 == pytest.approx(1.25, rel=1e-6) and x2 == pytest.approx(1.15, rel=1e-6)


def test_avgm_accumulates_momentum():
    x1, x2 = _two_rounds(ServerOptimizer("avgm", 1.0, momentum=0.9))
    # m1 = 0.5 -> x1 = 1.5; m2 = 0.9 * 0.5 - 0.2 = 0.25 -> x2 = 1.75
    assert x1 == pytest.approx(1.5, rel=1e-6) and x2 == pytest.approx(1.75, rel=1e-6)


def test_adam_with_flowers_bias_correction():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x1, x2 = _two_rounds(ServerOptimizer("adam", lr, beta1=b1, beta2=b2, tau=tau))
    m1, v1 = 0.1 * 0.5, 0.01 * 0.25
    e1 = lr * math.sqrt(1 - b2**2) / (1 - b1**2)  # Flower: exponent server_round + 1
    assert x1 == pytest.approx(1.0 + e1 * m1 / (math.sqrt(v1) + tau), rel=1e-6)
    m2, v2 = b1 * m1 + 0.1 * -0.2, b2 * v1 + 0.01 * 0.04
    e2 = lr * math.sqrt(1 - b2**3) / (1 - b1**3)
    assert x2 == pytest.approx(x1 + e2 * m2 / (math.sqrt(v2) + tau), rel=1e-6)


def test_yogi_moves_the_second_moment_by_the_sign_rule():
    lr, tau = 0.01, 1e-3
    x1, x2 = _two_rounds(ServerOptimizer("yogi", lr, beta1=0.9, beta2=0.99, tau=tau))
    m1, v1 = 0.05, 0.0 + 0.01 * 0.25  # v0 = 0 < delta^2: v grows by (1 - b2) delta^2
    assert x1 == pytest.approx(1.0 + lr * m1 / (math.sqrt(v1) + tau), rel=1e-6)
    m2 = 0.9 * m1 - 0.02
    v2 = v1 - 0.01 * 0.04 * math.copysign(1.0, v1 - 0.04)  # v1 = 0.0025 < 0.04: grows again
    assert x2 == pytest.approx(x1 + lr * m2 / (math.sqrt(v2) + tau), rel=1e-6)


def test_moments_survive_a_checkpoint_exactly():
    a = ServerOptimizer("adam", 0.1)
    a.step(1, {"b": torch.tensor([1.0, 2.0])}, {"b": torch.tensor([1.5, 1.0])})
    b = ServerOptimizer("adam", 0.1)
    b.load_state_dict(a.state_dict())
    start, agg = {"b": torch.tensor([1.5, 1.0])}, {"b": torch.tensor([1.2, 1.4])}
    assert torch.equal(a.step(2, start, agg)["b"], b.step(2, start, agg)["b"])


def test_server_lr_defaults_per_optimizer_and_svd_refuses_stateful_ones():
    assert FederationConfig(model="tiny").server_lr == 1.0
    assert FederationConfig(model="tiny", server_optimizer="adam").server_lr == 1e-2
    with pytest.raises(InputError, match="--server-optimizer adam works with --aggregation fedavg or ffa"):
        FederationConfig(model="tiny", aggregation="svd", server_optimizer="adam")
    with pytest.raises(InputError, match="--server-optimizer must be one of"):
        FederationConfig(model="tiny", server_optimizer="lamb")


def test_a_resumed_run_continues_the_moments_and_a_missing_file_is_one_line(tmp_path):
    from fedswarm.common.errors import FedswarmError
    from fedswarm.server.coordinator.federation import server_optimizer
    from fedswarm.server.coordinator.run_dir import SERVER_OPTIMIZER_FILE, RunDir

    cfg = FederationConfig(model="tiny", aggregation="ffa", server_optimizer="avgm")
    run = RunDir(tmp_path)
    first = server_optimizer(cfg, run, 0)
    first.step(1, {"b": torch.tensor([0.0])}, {"b": torch.tensor([0.5])})
    run.checkpoint(1).mkdir(parents=True, exist_ok=True)
    run.write_control(1, first.state_dict(), SERVER_OPTIMIZER_FILE)
    again = server_optimizer(cfg, run, 1)
    assert torch.equal(again.m["b"], first.m["b"])
    with pytest.raises(FedswarmError, match=r"round 2 has no server_optimizer\.safetensors"):
        server_optimizer(cfg, run, 2)
