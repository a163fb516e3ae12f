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


# Held-out rows per forward pass: sorted by length, a batch's rows are nearly equally long, so a
# large batch costs little padding and amortises each layer's weights over more tokens.
EVAL_BATCH = 64


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per answer token (nats)
    accuracy: float | None  # share of labelled examples answered exactly; None without labels
    examples: int
    margin: float | None = None  # accuracy minus the constant answer's on the same examples (all labelled)
    margin_se: float | None = None  # the margin's standard error on this held-out set (binomial)


@dataclass(frozen=True)
class ExampleScore:
    """One example's answer-token loss (summed), its answer-token count, and whether greedy decoding hits."""

    loss: float
    tokens: int
    correct: bool


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


def margin_over_constant(examples: Sequence[Example], correct: Sequence[bool]) -> tuple[float, float] | None:
    """Accuracy minus the constant answer's share, and the accuracy's binomial standard error (None: unlabelled).

    The constant answer's share is a fixed property of the held-out set, so on that set the
    margin is as uncertain as the accuracy: sqrt(acc (1 - acc) / n). What a different held-out
    set would change shows in the spread over seeds (each seed draws its own split).
    """
    constant = constant_answer(examples)
    if constant is None:
        return None
    n = len(correct)
    accuracy = sum(map(bool, correct)) / n
    return accuracy - constant[1], math.sqrt(accuracy * (1.0 - accuracy) / n)


def score_examples(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int = EVAL_BATCH,
    share_prefix: bool = True,
) -> list[ExampleScore]:
    """Each example's score, in the order given, from teacher-forced passes.

    Rows run sorted by length (little padding), and with ``share_prefix`` the prompt prefix
    they all share (a repeated system prompt) runs once, its keys and values reused by
    every batch (``fedswarm.common.prefix``): the same scores as whole rows, at a fraction
    of the compute.
    """
    import torch
    import torch.nn.functional as F

    from fedswarm.common.prefix import PrefixCache, shared_prefix_len, suffixes

    if not examples:
        raise ValueError("evaluate() needs at least one example")
    rows = [encode(tokenizer, e, max_len) for e in examples]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    cut = shared_prefix_len(rows) if share_prefix else 0
    device = next(model.parameters()).device
    pad = int(tokenizer.pad_token_id)
    scores: list[ExampleScore | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        prefix = PrefixCache.compute(model, rows[0].input_ids[:cut]) if cut else None
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate(suffixes([rows[i] for i in chunk], cut), pad)
            logits, targets = answer_logits(model, to_device(batch, device), prefix)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            token_loss = F.cross_entropy(logits, targets, reduction="none").cpu()
            correct = (logits.argmax(-1) == targets).cpu()
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
            for i, losses, hits in zip(
                chunk, torch.split(token_loss, counts), torch.split(correct, counts), strict=True
            ):
                scores[i] = ExampleScore(float(losses.sum()), len(losses), bool(hits.all()))
    model.train(was_training)
    return [s for s in scores if s is not None]


def evaluate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_len: int,
    batch_size: int = EVAL_BATCH,
    share_prefix: bool = True,
) -> EvalResult:
    """Loss over all examples, greedy-answer accuracy over the labelled ones, the margin over the constant answer."""
    scores = score_examples(model, tokenizer, examples, max_len, batch_size, share_prefix)
    total, tokens = sum(s.loss for s in scores), sum(s.tokens for s in scores)
    labelled = [(e, s.correct) for e, s in zip(examples, scores, strict=True) if e.label is not None]
    accuracy = sum(hit for _, hit in labelled) / len(labelled) if labelled else None
    margin = margin_over_constant(examples, [s.correct for s in scores])
    loss = total / max(tokens, 1)
    return EvalResult(
        loss if math.isfinite(loss) else float("inf"),
        accuracy,
        len(examples),
        margin[0] if margin else None,
        margin[1] if margin else None,
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
