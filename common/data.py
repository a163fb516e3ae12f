"""Reading training data: the evals datasets shipped on PyPI, or a user's JSONL/CSV file.

Every format becomes a list of :class:`Example`: the prompt as chat messages, the answer
the model should learn, and a label where the data has one (used for accuracy).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedswarm.common.errors import FedswarmError

BUILTIN_DATASETS = ("sarcasm", "diabetes")
DEFAULT_DATA = "sarcasm"


@dataclass(frozen=True)
class Example:
    """One training record: ``messages`` is the prompt, ``answer`` the target text."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, ending with a user turn
    answer: str
    label: str | None = None  # set (equal to ``answer``) where the data is labelled

    def chat(self) -> list[dict[str, str]]:
        """The prompt in the ``[{"role": ..., "content": ...}]`` form chat templates take."""
        return [{"role": role, "content": content} for role, content in self.messages]


DATA_SUFFIXES = (".jsonl", ".json", ".csv")


def resolve_data(value: str) -> Path:
    """Map ``--data`` (a built-in name or a file path) to a readable file."""
    if value in BUILTIN_DATASETS:
        spec = importlib.util.find_spec("evals")
        if spec is None or not spec.submodule_search_locations:
            raise FedswarmError(
                f"--data {value}: the evals package is missing; install it with "
                "'pip install --no-deps evals==3.0.1.post1'"
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        return root / "registry" / "data" / value / "samples.jsonl"
    path = Path(value).expanduser()
    if not path.exists():
        raise FedswarmError(
            f"--data {value!r}: no such file; expected one of {', '.join(BUILTIN_DATASETS)} "
            "or a path to a .jsonl or .csv file"
        )
    if not path.is_file():
        raise FedswarmError(f"--data {value!r}: not a file")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise FedswarmError(
            f"--data {value!r}: unsupported file type {path.suffix or '(none)'!r}; expected "
            f"{', '.join(DATA_SUFFIXES)} (chat/evals/Alpaca JSON lines, or a text,label CSV)"
        )
    return path


def load_examples(value: str, max_samples: int = 0) -> list[Example]:
    """Read every record of ``--data`` (the first ``max_samples`` if positive)."""
    path = resolve_data(value)
    reader = _read_csv if path.suffix.lower() == ".csv" else _read_jsonl
    examples: list[Example] = []
    try:
        for example in reader(path):
            examples.append(example)
            if 0 < max_samples <= len(examples):
                break
    except UnicodeDecodeError as exc:
        raise FedswarmError(f"--data {path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise FedswarmError(f"--data {path}: cannot read it ({exc.strerror})") from exc
    if not examples:
        raise FedswarmError(f"--data {path}: the file holds no records")
    return examples


def _read_jsonl(path: Path) -> Iterator[Example]:
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FedswarmError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise FedswarmError(f"{path}:{lineno}: expected a JSON object per line")
            try:
                yield _parse_record(record)
            except ValueError as exc:
                raise FedswarmError(f"{path}:{lineno}: {exc}") from exc


def _parse_record(record: dict[str, Any]) -> Example:
    if "messages" in record:
        return _from_chat(record["messages"])
    if "input" in record and "ideal" in record and isinstance(record["input"], list):
        ideal = record["ideal"]
        if isinstance(ideal, list):
            ideal = ideal[0] if ideal else None
        if not isinstance(ideal, str) or not ideal.strip():
            raise ValueError("'ideal' must be a non-empty string")
        messages = _messages(record["input"])
        return Example(messages, ideal.strip(), ideal.strip())
    if "instruction" in record and "output" in record:
        instruction, extra, output = record["instruction"], record.get("input", ""), record["output"]
        if not all(isinstance(v, str) for v in (instruction, extra, output)):
            raise ValueError("'instruction', 'input' and 'output' must be strings")
        if not instruction.strip() or not output.strip():
            raise ValueError("'instruction' and 'output' must be non-empty")
        content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example((("user", content),), output)
    raise ValueError(
        "unknown record format: expected 'messages', evals' 'input' + 'ideal', or Alpaca's 'instruction' + 'output'"
    )


def _from_chat(raw: Any) -> Example:
    messages = _messages(raw)
    if len(messages) < 2 or messages[-1][0] != "assistant":
        raise ValueError("'messages' must end with an assistant turn after at least one other turn")
    answer = messages[-1][1]
    if not answer.strip():
        raise ValueError("the final assistant message is empty")
    return Example(messages[:-1], answer)


def _messages(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("the chat must be a non-empty list of messages")
    out = []
    for message in raw:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError("each message needs a 'role' and a 'content' string")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message with role {message['role']!r} has no 'content' string")
        out.append((message["role"], content))
    return tuple(out)


def _read_csv(path: Path) -> Iterator[Example]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "text" not in columns or "label" not in columns:
            raise FedswarmError(f"{path}:1: a CSV needs 'text' and 'label' columns, found {columns}")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            row = {k.strip().lower(): v for k, v in row.items() if k is not None}
            text, label = (row.get("text") or "").strip(), (row.get("label") or "").strip()
            if not text or not label:
                raise FedswarmError(f"{path}:{lineno}: empty 'text' or 'label'")
            rows.append((text, label))
    labels = sorted({label for _, label in rows})
    system = f"Classify the text. Respond with only one of: {', '.join(labels)}."
    for text, label in rows:
        yield Example((("system", system), ("user", text)), label, label)
