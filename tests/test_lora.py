import torch

from fedswarm.client.trainer.local_train import train_lora
from fedswarm.common.data import Example
from fedswarm.common.evaluate import evaluate, greedy_answers
from fedswarm.common.lora_state import adapter_state, attach_lora, load_adapter_state, save_adapter
from fedswarm.common.model import load_model


def _examples(n: int = 24) -> list[Example]:
    out = []
    for i in range(n):
        label = "1" if i % 2 else "0"
        out.append(Example((("system", "Reply 1 or 0."), ("user", f"number {i}")), label, label))
    return out


def test_only_lora_parameters_change(tiny_lora, tokenizer):
    before = {n: p.detach().clone() for n, p in tiny_lora.named_parameters()}
    train_lora(
        tiny_lora,
        tokenizer,
        _examples(),
        steps=3,
        batch_size=4,
        learning_rate=1e-2,
        max_seq_len=64,
        seed=0,
        precision="fp32",
    )
    changed = {n for n, p in tiny_lora.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "training changed nothing"
    assert all("lora_" in n for n in changed), sorted(n for n in changed if "lora_" not in n)
    assert any("lora_B" in n for n in changed)


def test_initial_adapter_is_seeded_and_a_no_op(tokenizer):
    a = attach_lora(load_model("tiny"), 4, 8.0, seed=5)
    b = attach_lora(load_model("tiny"), 4, 8.0, seed=5)
    c = attach_lora(load_model("tiny"), 4, 8.0, seed=6)
    sa, sb, sc = adapter_state(a), adapter_state(b), adapter_state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "lora_A" in k)
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.allclose(a(input_ids=ids).logits, load_model("tiny")(input_ids=ids).logits, atol=1e-6)


def test_checkpoint_reloads_with_peft_to_same_logits(tiny_lora, tokenizer, tmp_path):
    from peft import PeftModel

    train_lora(
        tiny_lora,
        tokenizer,
        _examples(),
        steps=2,
        batch_size=4,
        learning_rate=1e-2,
        max_seq_len=64,
        seed=1,
        precision="fp32",
    )
    state = adapter_state(tiny_lora)
    save_adapter(tiny_lora, state, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter_config.json").is_file()
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(load_model("tiny"), tmp_path / "ckpt")
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 198]])
    with torch.no_grad():
        expected, got = tiny_lora(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert not torch.allclose(got, load_model("tiny")(input_ids=ids).logits, atol=1e-4)  # the adapter matters


def test_load_adapter_state_rejects_bad_shapes(tiny_lora):
    import pytest

    state = adapter_state(tiny_lora)
    key = next(iter(state))
    bad = dict(state)
    bad[key] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_state(tiny_lora, bad)
    del bad[key]
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(tiny_lora, bad)


def test_teacher_forced_accuracy_equals_greedy_decoding(tokenizer):
    from fedswarm.common.batches import answer_loss, collate, encode

    # Fully fine-tune the tiny model until it answers some examples right, so that the
    # comparison below is between non-trivial accuracies.
    model = load_model("tiny")
    examples = _examples(16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = collate([encode(tokenizer, e, 64) for e in examples], int(tokenizer.pad_token_id))
    model.train()
    for _ in range(25):
        answer_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    result = evaluate(model, tokenizer, examples, max_len=64)
    decoded = greedy_answers(model, tokenizer, examples, max_len=64)
    by_decoding = sum(d == e.label for d, e in zip(decoded, examples, strict=True)) / len(examples)
    assert result.accuracy == by_decoding
    assert result.accuracy > 0  # the check above is not vacuous: some answers are right
