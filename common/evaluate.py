"""Held-out evaluation: answer-token loss, and accuracy of the greedy answer against labels.

Accuracy comes from the same teacher-forced forward pass as the loss: greedy decoding
returns exactly the label (then end-of-turn) if and only if, at every answer position,
the arg-max token is the label's token there, since each greedy step then sees the
same prefix as teacher forcing. ``greedy_answers`` decodes for real; a test checks that
both agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedswarm.common.batches import IGNORE_INDEX, answer_logits, collate, encode, prompt_ids, to_device
from fedswarm.common.data import Example

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per answer token (nats)
    accuracy: float | None  # share of labelled examples answered exactly; None without labels
    examples: int


def constant_answer(examples: Sequence[Example]) -> tuple[str, float] | None:
    """The commonest label and its share: what always giving one answer scores (None: unlabelled data).

    The floor a classifier must beat: round 0 scores 0 only because the base model never
    answers in the label format, so a gain over round 0 alone says little.
    """
    labels = [e.label for e in examples if e.label is not None]
    if not labels or len(labels) < len(examples):
        return None
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    label = max(sorted(counts), key=counts.__getitem__)
    return label, counts[label] / len(labels)


def evaluate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int = 16,
) -> EvalResult:
    """Loss over all examples and greedy-answer accuracy over the labelled ones."""
    import torch
    import torch.nn.functional as F

    if not examples:
        raise ValueError("evaluate() needs at least one example")
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total, tokens, hits, labelled = 0.0, 0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate([encode(tokenizer, e, max_len) for e in chunk], int(tokenizer.pad_token_id))
            logits, targets = answer_logits(model, to_device(batch, device))
            total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            tokens += int(targets.numel())
            correct = (logits.argmax(-1) == targets).cpu()
            rows = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
            for example, per_row in zip(chunk, torch.split(correct, rows), strict=True):
                if example.label is not None:
                    labelled += 1
                    hits += int(per_row.all())
    model.train(was_training)
    loss = total / max(tokens, 1)
    return EvalResult(
        loss if math.isfinite(loss) else float("inf"), hits / labelled if labelled else None, len(examples)
    )


def greedy_answers(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers by real decoding, long enough for the longest answer plus end-of-turn."""
    import torch

    longest = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
    answers: list[str] = []
    pad = int(tokenizer.pad_token_id)
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            prompts = [prompt_ids(tokenizer, e)[-max_len:] for e in examples[start : start + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(prompts):  # left padding: every row ends at its prompt's end
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            device = next(model.parameters()).device
            generator: Any = model  # PeftModel or a GenerationMixin model
            out = generator.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=longest + 1,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=int(tokenizer.eos_token_id),
            )
            answers.extend(tokenizer.decode(row, skip_special_tokens=True) for row in out[:, width:].cpu())
    return answers
