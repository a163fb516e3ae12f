"""Token batches: prompts through the chat template, loss on the answer tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedswarm.common.data import Example

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from fedswarm.common.prefix import PrefixCache

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; ``prompt_len`` tokens of prompt, then the answer."""

    input_ids: tuple[int, ...]
    prompt_len: int


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """The prompt as the chat template renders it, ending with the assistant header."""
    text = tokenizer.apply_chat_template(example.chat(), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, max_len: int) -> Encoded:
    """Prompt + answer + end-of-turn, cutting the prompt from the left to fit ``max_len``."""
    answer = list(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
    answer.append(int(tokenizer.eos_token_id))
    answer = answer[: max(1, max_len // 2)]
    prompt = prompt_ids(tokenizer, example)
    keep = max_len - len(answer)
    prompt = prompt[-keep:] if keep > 0 else []
    return Encoded(tuple(prompt + answer), len(prompt))


# Training pads each batch's width up to a multiple of this many tokens. A process that trains on
# batches of ever new shapes (a Ray actor or a worker serving several nodes' data in turn) grows its
# heap with every new shape, below Python and torch's objects: 4 nodes served in turn crept from 1.93
# to 2.34 GB of peak RSS over 2 rounds, and stayed within 1.86-2.01 GB with widths rounded up to 64.
TRAIN_PAD_MULTIPLE = 64


def padded_width(longest: int, multiple: int = 1) -> int:
    """``longest`` rounded up to a multiple of ``multiple``."""
    return -(-longest // multiple) * multiple


def collate(batch: Sequence[Encoded], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the answer), the width
    rounded up to a multiple of ``multiple`` (padding is masked and unlabelled: the loss is unchanged)."""
    import torch

    width = padded_width(max(len(e.input_ids) for e in batch), multiple)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, e.prompt_len : n] = torch.tensor(e.input_ids[e.prompt_len :])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def answer_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: PrefixCache | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict answer tokens only, and those tokens.

    The loss never looks at prompt positions, so the LM head (a 49k-wide matmul for
    SmolLM2, ~20% of a token's compute) runs on the answer positions alone. With ``prefix``,
    ``batch`` holds the rows' suffixes after that shared prefix (``fedswarm.common.prefix``).
    """
    wrapped: Any = model
    base: Any = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped  # PEFT or not
    if prefix is not None:
        hidden = prefix.hidden(model, batch)
    else:
        hidden = base.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return base.get_output_embeddings()(hidden[:, :-1][keep]), targets[keep]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the loss; float32 and float64 stay as they are."""
    import torch

    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def answer_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], total: int | None = None, prefix: PrefixCache | None = None
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the batch; with ``total``, their sum over ``total``.

    ``total`` is the answer-token count of a whole batch this one is a micro-batch of: the
    micro-batches' losses then add up to the whole batch's mean.
    """
    import torch.nn.functional as F

    logits, targets = answer_logits(model, batch, prefix)
    if total is None:
        return F.cross_entropy(_upcast(logits), targets)
    return F.cross_entropy(_upcast(logits), targets, reduction="sum") / total


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many positions of ``batch`` predict an answer token (the terms of its loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def per_sample_answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's mean cross-entropy over its answer tokens, shape ``(batch,)``.

    DP-SGD clips per example, so the loss must keep one term per example.
    """
    import torch
    import torch.nn.functional as F

    logits, targets = answer_logits(model, batch)
    token_loss = F.cross_entropy(_upcast(logits), targets, reduction="none")
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    rows = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    sums = torch.zeros(counts.numel(), dtype=token_loss.dtype).index_add(0, rows, token_loss)
    return sums / counts.clamp(min=1)
