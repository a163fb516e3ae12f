"""FedProx's proximal term: each step's gradient gains mu (w - w_round_start) on the trained LoRA tensors only."""

import torch

from fedswarm.client.trainer.proximal import ProximalTerm, chain
from fedswarm.common.lora_state import lora_parameters


def test_proximal_term_adds_mu_times_the_distance_from_the_rounds_start(tiny_lora):
    params = {k: p for k, p in lora_parameters(tiny_lora).items() if p.requires_grad}
    term = ProximalTerm(tiny_lora, mu=0.5)
    start = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.25)  # every entry drifted by 0.25 from where the round started
            p.grad = torch.full_like(p, 2.0)
    term()
    for key, p in params.items():
        assert torch.equal(p.grad, torch.full_like(p, 2.0 + 0.5 * 0.25)), key
        assert torch.equal(p.detach(), start[key] + 0.25)  # the term only touches gradients


def test_proximal_term_pulls_training_back_towards_the_start(tiny_lora, tokenizer):
    from fedswarm.client.trainer.local_train import train_lora
    from fedswarm.common.data import Example

    examples = [Example((("user", f"n {i}"),), str(i % 2), str(i % 2)) for i in range(16)]
    start = {k: p.detach().clone() for k, p in lora_parameters(tiny_lora).items()}

    def drift(model, mu: float) -> float:
        from fedswarm.common.lora_state import load_adapter_state

        load_adapter_state(model, start)
        hook = ProximalTerm(model, mu) if mu else None
        train_lora(model, tokenizer, examples, 6, 4, 5e-2, 32, seed=0, precision="fp32", on_grads=chain(hook))
        now = lora_parameters(model)
        return sum(float((now[k].detach() - start[k]).norm() ** 2) for k in start) ** 0.5

    assert drift(tiny_lora, 100.0) < drift(tiny_lora, 0.0)


def test_chain_runs_every_hook_in_turn():
    seen: list[str] = []
    assert chain(None, None) is None
    run = chain(lambda: seen.append("a"), None, lambda: seen.append("b"))
    assert run is not None
    run()
    assert seen == ["a", "b"]
