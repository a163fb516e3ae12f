"""A step's batch runs in micro-batches of bounded size: the same gradient as the whole batch at once."""

from __future__ import annotations

import torch

from fedswarm.client.trainer.local_train import micro_batches
from fedswarm.common.batches import Encoded, answer_loss, answer_tokens, collate, encode
from fedswarm.common.data import Example


def _rows(lengths: list[int]) -> list[Encoded]:
    return [Encoded(tuple(range(n)), 1) for n in lengths]


def test_micro_batches_stay_within_the_token_budget_in_order():
    rows = _rows([100, 120, 128, 60, 128, 30, 10, 10])
    parts = micro_batches(rows, max_tokens=256)
    # by hand: [100, 120] -> 2 x 120 = 240; adding 128 -> 3 x 128 = 384 > 256, so a new part, and so on
    assert [[len(r.input_ids) for r in p] for p in parts] == [[100, 120], [128, 60], [128, 30], [10, 10]]
    assert [r for p in parts for r in p] == rows
    assert [len(p) for p in micro_batches(rows, max_tokens=10_000)] == [8]  # small enough: one part
    assert [len(p) for p in micro_batches(_rows([300, 5]), max_tokens=256)] == [1, 1]  # a long row stands alone


def test_micro_batched_gradient_equals_the_whole_batch(tiny_lora_f64, tokenizer):
    """In float64 (exact to ~1e-16 relative on any CPU): sum of part losses over the batch's token count."""
    examples = [
        Example((("system", "Reply 1 or 0."), ("user", "number " + "7 " * (i % 5))), str(i % 2), str(i % 2))
        for i in range(8)
    ]
    pad = int(tokenizer.pad_token_id)
    rows = [encode(tokenizer, e, 64) for e in examples]
    params = [p for p in tiny_lora_f64.parameters() if p.requires_grad]

    whole = collate(rows, pad)
    answer_loss(tiny_lora_f64, whole).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    parts = [collate(part, pad) for part in micro_batches(rows, max_tokens=3 * max(len(r.input_ids) for r in rows))]
    assert len(parts) == 3  # 3 + 3 + 2 rows: the split is exercised
    total = sum(answer_tokens(part) for part in parts)
    assert total == answer_tokens(whole)
    loss = sum(float(answer_loss(tiny_lora_f64, part, total).detach()) for part in parts)
    for part in parts:
        answer_loss(tiny_lora_f64, part, total).backward()
    eps = torch.finfo(torch.float64).eps
    for got, want in zip((p.grad for p in params), expected, strict=True):
        assert torch.allclose(got, want, rtol=1e4 * eps, atol=1e4 * eps * float(want.abs().max()))
    with torch.no_grad():
        assert abs(loss - float(answer_loss(tiny_lora_f64, whole))) < 1e4 * eps * abs(loss)


def test_padding_to_a_multiple_keeps_the_budget_and_the_shapes_few():
    from fedswarm.common.batches import padded_width

    assert [padded_width(n, 64) for n in (1, 63, 64, 65, 128)] == [64, 64, 64, 128, 128]
    rows = _rows([60, 50, 70, 10, 10, 10, 10, 10, 10])
    # by hand, widths rounded to 64: [60, 50] 2 x 64; + 70 -> 3 x 128 > 256: new part [70, 10] 2 x 128;
    # + 10 -> 3 x 128 > 256: new part [10 x 4] 4 x 64 = 256; + 10 -> 5 x 64 > 256: [10]
    parts = micro_batches(rows, max_tokens=256, multiple=64)
    assert [[len(r.input_ids) for r in p] for p in parts] == [[60, 50], [70, 10], [10, 10, 10, 10], [10]]
    widths = {tuple(collate(p, 0, 64)["input_ids"].shape) for p in parts}
    assert widths == {(2, 64), (2, 128), (4, 64), (1, 64)}


def test_padding_to_a_multiple_leaves_loss_and_gradient_unchanged(tiny_lora_f64, tokenizer):
    """Right padding is masked and unlabelled, and causal attention never lets a real token see it."""
    examples = [
        Example((("system", "Reply 1 or 0."), ("user", "number " + "7 " * (i % 5))), str(i % 2), str(i % 2))
        for i in range(4)
    ]
    pad = int(tokenizer.pad_token_id)
    rows = [encode(tokenizer, e, 64) for e in examples]
    params = [p for p in tiny_lora_f64.parameters() if p.requires_grad]
    grads, losses = [], []
    for multiple in (1, 64):
        batch = collate(rows, pad, multiple)
        assert batch["input_ids"].shape[1] % multiple == 0
        loss = answer_loss(tiny_lora_f64, batch)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    eps = torch.finfo(torch.float64).eps
    assert abs(losses[0] - losses[1]) < 1e4 * eps * abs(losses[0])
    for got, want in zip(grads[1], grads[0], strict=True):
        assert torch.allclose(got, want, rtol=1e4 * eps, atol=1e4 * eps * float(want.abs().max()))
