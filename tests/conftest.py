"""Shared fixtures: the tiny model (seeded, same in every process) and small data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from fedswarm.common.model import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture()
def tiny_lora():
    from fedswarm.common.lora import attach_lora
    from fedswarm.common.model import load_model

    return attach_lora(load_model("tiny"), rank=4, alpha=8.0, seed=0)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def labelled_file(tmp_path: Path) -> Path:
    """A small evals-format file: 120 records, labels 'yes'/'no' (60 each)."""
    records = []
    for i in range(120):
        label = "yes" if i % 2 else "no"
        records.append(
            {
                "input": [
                    {"role": "system", "content": "Answer yes or no."},
                    {"role": "user", "content": f"Is {i} odd?"},
                ],
                "ideal": label,
            }
        )
    return write_jsonl(tmp_path / "odd.jsonl", records)
