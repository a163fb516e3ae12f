"""Shared by the edge tests: a tiny federated-looking run with a trained adapter, and exporting it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

TRAIN_STEPS = 30
# Trained to one fixed reply, the tiny model answers every prompt with it by margins of ~6 logits.
# Untrained, it is random: next-token margins of ~0.05 logits, where int8 rounding flips greedy
# choices and a token comparison would test float noise rather than the export.
ANSWER = "Yes, that is sarcasm."
ANSWER_TOKENS = 6


def tiny_run(folder: Path, privacy: dict[str, Any] | None = None) -> Path:
    """RUN_DIR with adapter/ (LoRA trained on sarcasm) and summary.json, as a federated run writes them.

    ``privacy``: the summary's privacy record (as a DP run writes it), for tests of what shows it.
    """
    from fedswarm.client.trainer.local_train import train_lora
    from fedswarm.common.data import load_examples
    from fedswarm.common.lora_state import adapter_state, attach_lora, save_adapter
    from fedswarm.common.model import load_model, load_tokenizer
    from fedswarm.common.splits import holdout_split

    config = {"model": "tiny", "data": "sarcasm", "clients": 2, "rounds": 1, "eval_size": 50, "seed": 0}
    config |= {"lora_rank": 4, "lora_alpha": 8.0, "local_steps": TRAIN_STEPS, "partition": "iid", "max_samples": 600}
    records = load_examples("sarcasm", config["max_samples"])
    split = holdout_split(len(records), config["eval_size"], config["seed"])
    tokenizer = load_tokenizer("tiny")
    model = attach_lora(load_model("tiny"), rank=4, alpha=8.0, seed=0)
    train = [dataclasses.replace(records[i], answer=ANSWER) for i in split.train]
    train_lora(model, tokenizer, train, TRAIN_STEPS, 8, 1e-2, 64, 0, precision="fp32")
    save_adapter(model, adapter_state(model), folder / "adapter")
    summary: dict[str, Any] = {"config": config, "rounds": 1, "final": {"eval_loss": None, "eval_accuracy": None}}
    if privacy is not None:
        summary["privacy"] = privacy
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder / "adapter"


def held_out_prompts(count: int) -> list[list[int]]:
    """Chat-rendered prompts of held-out examples of :func:`tiny_run`'s data."""
    from fedswarm.common.batches import prompt_ids
    from fedswarm.common.data import load_examples
    from fedswarm.common.model import load_tokenizer
    from fedswarm.common.splits import holdout_split

    records = load_examples("sarcasm", 600)
    split = holdout_split(len(records), 50, 0)
    tokenizer = load_tokenizer("tiny")
    return [prompt_ids(tokenizer, records[int(i)])[-48:] for i in split.holdout[:count]]
