"""fedavg / ffa / svd on the same client updates: residuals against sum p*s*B@A."""

import pytest
import torch

from fedswarm.common.codecs import codec_for
from fedswarm.common.codecs.product import Client, residual, svd_aggregate, svd_state, weighted_product
from fedswarm.common.config import FederationConfig
from fedswarm.common.lora_state import resize_rank

LAYERS = {"m.l0.q_proj": (24, 16), "m.l1.up_proj": (32, 16)}  # name -> (out, in)
ALPHA = 16.0


def _state(rank: int, gen: torch.Generator, shared_a: dict | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for name, (out_f, in_f) in LAYERS.items():
        a = shared_a[name + ".lora_A.weight"] if shared_a else torch.randn(rank, in_f, generator=gen)
        state[name + ".lora_A.weight"] = a
        state[name + ".lora_B.weight"] = torch.randn(out_f, rank, generator=gen)
    return state


def _clients(ranks, shared_a=None, seed=0) -> list[Client]:
    gen = torch.Generator().manual_seed(seed)
    return [Client(_state(r, gen, shared_a), float(w), ALPHA / r) for r, w in zip(ranks, (10, 30, 60), strict=False)]


def _fedavg(clients: list[Client]) -> dict[str, torch.Tensor]:
    total = sum(c.weight for c in clients)
    return {k: sum(c.weight / total * c.state[k] for c in clients) for k in clients[0].state}


def test_residuals_order_ffa_fedavg_svd():
    rank = 4
    clients = _clients([rank] * 3)
    fedavg_res = residual(clients, _fedavg(clients), ALPHA / rank)
    assert fedavg_res > 0.1  # averaging A and B apart is clearly not the mean product

    shared = _state(rank, torch.Generator().manual_seed(99))
    ffa = _clients([rank] * 3, shared_a={k: v for k, v in shared.items() if "lora_A" in k}, seed=1)
    assert residual(ffa, _fedavg(ffa), ALPHA / rank) < 1e-5  # a shared A makes the mean of B exact

    svd = svd_aggregate(clients, global_rank=rank)
    svd_res = residual(clients, svd_state(svd, rank, ALPHA / rank), ALPHA / rank)
    assert svd.residual == pytest.approx(svd_res, rel=1e-6)  # the cheap residual is the real one
    assert svd_res <= fedavg_res
    full = svd_aggregate(clients, global_rank=3 * rank)  # >= the sum of the client ranks
    assert full.residual < 1e-5
    assert residual(clients, svd_state(full, 3 * rank, ALPHA / (3 * rank)), ALPHA / (3 * rank)) < 1e-5


def test_svd_with_mixed_ranks_gives_each_client_its_rank():
    clients = _clients([4, 8, 16])
    cfg = FederationConfig(model="tiny", aggregation="svd", client_ranks="4,8,16", lora_alpha=ALPHA)
    assert cfg.server_rank() == 16
    result = svd_aggregate(clients, cfg.server_rank())
    global_state = svd_state(result, 16, ALPHA / 16)
    for rank in (4, 8, 16):
        mine = codec_for(cfg).personal(global_state, rank) or global_state  # None: the broadcast one fits
        for name, (out_f, in_f) in LAYERS.items():
            assert mine[name + ".lora_A.weight"].shape == (rank, in_f)
            assert mine[name + ".lora_B.weight"].shape == (out_f, rank)
        # the client's factors reproduce the best rank-r approximation of the mean product
        for name in LAYERS:
            target = weighted_product(clients, name)
            u, s, vh = torch.linalg.svd(target)
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]
            got = (ALPHA / rank) * mine[name + ".lora_B.weight"].double() @ mine[name + ".lora_A.weight"].double()
            torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-4)


def test_resize_rank_keeps_the_product_and_pads_with_trainable_a():
    gen = torch.Generator().manual_seed(3)
    state = _state(4, gen)
    own = _state(8, gen)
    bigger = resize_rank(state, 8, ALPHA / 4, ALPHA / 8, filler=own)
    for name in LAYERS:
        before = (ALPHA / 4) * state[name + ".lora_B.weight"] @ state[name + ".lora_A.weight"]
        after = (ALPHA / 8) * bigger[name + ".lora_B.weight"] @ bigger[name + ".lora_A.weight"]
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        assert torch.equal(bigger[name + ".lora_A.weight"][4:], own[name + ".lora_A.weight"][4:])


def test_config_rejects_mixed_ranks_without_svd():
    with pytest.raises(ValueError, match="need --aggregation svd"):
        FederationConfig(model="tiny", client_ranks="4,8")
    with pytest.raises(ValueError, match="--aggregation must be fedavg, ffa or svd"):
        FederationConfig(model="tiny", aggregation="mean")


def _product(state: dict, name: str, scale: float) -> torch.Tensor:
    return scale * state[name + ".lora_B.weight"].double() @ state[name + ".lora_A.weight"].double()


def test_server_lr_steps_ffa_exactly_and_fedavg_factor_wise():
    from fedswarm.common.codecs.product import apply_server_lr, server_step

    rank, lr, scale = 4, 2.5, ALPHA / 4
    gen = torch.Generator().manual_seed(7)
    prior = _state(rank, gen)
    shared = {k: v for k, v in prior.items() if "lora_A" in k}
    ffa = _clients([rank] * 3, shared_a=shared, seed=3)
    mean_b = {k: v for k, v in _fedavg(ffa).items() if "lora_B" in k}
    stepped = {**shared, **apply_server_lr(prior, mean_b, lr)}
    p = torch.tensor([10.0, 30.0, 60.0]) / 100
    for name in LAYERS:  # (1 - lr) s B0 A + lr sum p s B A, by hand
        want = (1 - lr) * _product(prior, name, scale) + lr * sum(
            pk * _product(c.state, name, scale) for pk, c in zip(p, ffa, strict=True)
        )
        torch.testing.assert_close(_product(stepped, name, scale), want, rtol=1e-5, atol=1e-5)
    assert residual(server_step(ffa, prior, scale, lr), stepped, scale) < 1e-5
    assert residual(ffa, stepped, scale) > 0.1  # against the plain mean, the step is no longer the target
    clients = _clients([rank] * 3, seed=4)
    fedavg = apply_server_lr(prior, _fedavg(clients), lr)
    key = "m.l0.q_proj.lora_A.weight"
    torch.testing.assert_close(fedavg[key], prior[key] + lr * (_fedavg(clients)[key] - prior[key]))
    assert residual(server_step(clients, prior, scale, lr), fedavg, scale) > 1e-2  # factor-wise: not exact
    assert server_step(clients, prior, scale, 1.0) == clients and apply_server_lr(prior, fedavg, 1.0) == fedavg


def test_svd_server_lr_is_the_product_space_step():
    from fedswarm.common.codecs.product import server_step

    rank, lr = 4, 0.5
    gen = torch.Generator().manual_seed(9)
    prior = _state(rank, gen)
    clients = _clients([rank] * 3, seed=5)
    stepped = server_step(clients, prior, ALPHA / rank, lr)
    full = svd_aggregate(stepped, global_rank=4 * rank)  # the prior adds its own rank to the sum
    assert full.residual < 1e-6
    state = svd_state(full, 4 * rank, ALPHA / (4 * rank))
    p = torch.tensor([10.0, 30.0, 60.0]) / 100
    for name in LAYERS:
        want = (1 - lr) * _product(prior, name, ALPHA / rank) + lr * sum(
            pk * _product(c.state, name, c.scale) for pk, c in zip(p, clients, strict=True)
        )
        torch.testing.assert_close(_product(state, name, ALPHA / (4 * rank)), want, rtol=1e-5, atol=1e-5)


def test_config_rejects_a_negative_server_lr_and_zero_takes_the_optimizers_default():
    with pytest.raises(ValueError, match=r"--server-lr must be > 0 \(0: the optimizer's default\), got -1"):
        FederationConfig(model="tiny", server_lr=-1.0)
    assert FederationConfig(model="tiny", server_lr=0.0).server_lr == 1.0
