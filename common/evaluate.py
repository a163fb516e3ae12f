"""Held-out evaluation: answer-token loss, and accuracy of the greedy answer against labels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedswarm.common.batches import IGNORE_INDEX, collate, encode, prompt_ids
from fedswarm.common.data import Example

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per answer token (nats)
    accuracy: float | None  # share of labelled examples answered exactly; None without labels
    examples: int


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int = 16,
) -> EvalResult:
    """Loss over all examples and greedy-answer accuracy over the labelled ones."""
    import torch

    if not examples:
        raise ValueError("evaluate() needs at least one example")
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = [encode(tokenizer, e, max_len) for e in examples[start : start + batch_size]]
            batch = collate(chunk, int(tokenizer.pad_token_id))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum, count = _answer_loss(logits, batch["labels"])
            total += loss_sum
            tokens += count
        labelled = [e for e in examples if e.label is not None]
        accuracy = _accuracy(model, tokenizer, labelled, max_len, batch_size) if labelled else None
    model.train(was_training)
    return EvalResult(total / max(tokens, 1), accuracy, len(examples))


def _answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    import torch.nn.functional as F

    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = int((target != IGNORE_INDEX).sum())
    value = float(loss)
    return (value if math.isfinite(value) else float("inf")), count


def _accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int,
) -> float:
    answers = greedy_answers(model, tokenizer, examples, max_len, batch_size)
    hits = sum(a == e.label for a, e in zip(answers, examples, strict=True))
    return hits / len(examples)


def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers, long enough for the longest label plus the end-of-turn token."""
    import torch

    longest = max(len(tokenizer(e.label or e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
    answers: list[str] = []
    pad = int(tokenizer.pad_token_id)
    for start in range(0, len(examples), batch_size):
        prompts = [prompt_ids(tokenizer, e)[-max_len:] for e in examples[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding, so every row ends at the prompt's end
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest + 1,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=int(tokenizer.eos_token_id),
        )
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers
