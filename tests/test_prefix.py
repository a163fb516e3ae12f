"""The shared prompt prefix: its step and its evaluation equal whole rows' (float64), and the prefix is found right."""

import contextlib

import pytest
import torch

from fedswarm.client.trainer.local_train import _forward_backward
from fedswarm.common.batches import Encoded, encode
from fedswarm.common.data import Example
from fedswarm.common.evaluate import evaluate, margin_over_constant, score_examples
from fedswarm.common.prefix import shared_prefix_len, suffixes

SYSTEM = "Respond with only a 1 or 0 to signify if the user's message includes sarcasm, or not"
TEXTS = ["a", "thirtysomething scientists unveil doomsday clock", "eat your veggies", "my white inheritance", "ok"]


def _examples(n: int = 10) -> list[Example]:
    out = []
    for i in range(n):
        label = "1" if i % 3 == 0 else "0"
        out.append(Example((("system", SYSTEM), ("user", f"{TEXTS[i % len(TEXTS)]} {i}")), label, label))
    return out


def test_shared_prefix_stops_before_each_rows_last_prompt_token():
    rows = [Encoded((1, 2, 3, 4, 5, 9, 9), 5), Encoded((1, 2, 3, 4, 6, 9), 5), Encoded((1, 2, 3, 4, 5, 7, 9), 6)]
    assert shared_prefix_len(rows, minimum=1) == 4  # where the rows part
    assert shared_prefix_len([rows[0], rows[0]], minimum=1) == 4  # identical rows: up to the prompt's last token
    assert shared_prefix_len(rows, minimum=5) == 0  # too short to be worth a pass
    assert suffixes(rows[:1], 4) == [Encoded((5, 9, 9), 1)]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_prefix_shared_step_gives_the_plain_loss_and_gradient(tiny_lora_f64, tokenizer):
    model = tiny_lora_f64
    with torch.no_grad():  # B = 0 at init would leave A's gradient zero: give every LoRA factor a value
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    rows = [encode(tokenizer, e, 96) for e in _examples(7)]
    assert shared_prefix_len(rows) >= 20  # the system prompt and the user header
    pad, nothing = int(tokenizer.pad_token_id), contextlib.nullcontext()
    model.train()
    plain = _forward_backward(model, rows, pad, torch.device("cpu"), nothing, None, share_prefix=False)
    plain_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    shared = _forward_backward(model, rows, pad, torch.device("cpu"), nothing, None, share_prefix=True)
    shared_grads = _grads(model)
    assert shared == pytest.approx(plain, rel=1e-12)
    assert plain_grads.keys() == shared_grads.keys()
    assert any("lora_A" in n for n in plain_grads) and any("lora_B" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_prefix_shared_step_splits_into_micro_batches_exactly(tiny_lora_f64, tokenizer, monkeypatch):
    """Several micro-batches against one prefix: the prefix's gradient is the sum over all of them."""
    import fedswarm.client.trainer.local_train as local_train

    model = tiny_lora_f64
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    rows = [encode(tokenizer, e, 96) for e in _examples(6)]
    pad, nothing = int(tokenizer.pad_token_id), contextlib.nullcontext()
    model.train()
    whole = _forward_backward(model, rows, pad, torch.device("cpu"), nothing, None, share_prefix=True)
    whole_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(local_train, "MICRO_BATCH_TOKENS", 24)  # a suffix or two per micro-batch
    split_rows = sorted(suffixes(rows, shared_prefix_len(rows)), key=lambda r: len(r.input_ids))
    assert len(local_train.micro_batches(split_rows, 24, local_train.SUFFIX_PAD_MULTIPLE)) > 2
    seen: list[int] = []
    real_loss = local_train.answer_loss
    monkeypatch.setattr(local_train, "answer_loss", lambda *a: seen.append(1) or real_loss(*a))
    parts = _forward_backward(model, rows, pad, torch.device("cpu"), nothing, None, share_prefix=True)
    assert len(seen) > 2  # the step really ran in several micro-batches against the one prefix
    assert parts == pytest.approx(whole, rel=1e-12)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(_grads(model)[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_batched_evaluation_gives_each_examples_plain_score(tiny_lora_f64, tokenizer):
    model = tiny_lora_f64
    examples = _examples(11)
    alone = [score_examples(model, tokenizer, [e], 96, batch_size=1, share_prefix=False)[0] for e in examples]
    batched = score_examples(model, tokenizer, examples, 96, batch_size=4, share_prefix=True)
    assert [s.tokens for s in batched] == [s.tokens for s in alone]
    assert [s.correct for s in batched] == [s.correct for s in alone]
    for b, a in zip(batched, alone, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-12)


def test_margin_and_its_standard_error_against_hand_computed_values():
    examples = [Example((("user", str(i)),), lab, lab) for i, lab in enumerate("0001101000")]  # 7 x "0": constant 0.7
    hits = [True, True, False, True, True, False, True, True, True, True]  # accuracy 0.8
    margin, se = margin_over_constant(examples, hits)
    assert margin == pytest.approx(0.8 - 0.7, abs=1e-12)
    assert se == pytest.approx((0.8 * 0.2 / 10) ** 0.5, rel=1e-12)
    assert margin_over_constant([Example((("user", "x"),), "y")], [True]) is None  # unlabelled


def test_evaluate_reports_the_margin_over_the_constant_answer(tiny_lora, tokenizer):
    examples = _examples(9)
    result = evaluate(tiny_lora, tokenizer, examples, 96)
    share = sum(e.label == "0" for e in examples) / len(examples)
    assert result.accuracy is not None and result.margin is not None and result.margin_se is not None
    assert result.margin == pytest.approx(result.accuracy - share, abs=1e-12)
