"""Shared fixtures: the tiny model (seeded, same in every process) and small data files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fedswarm.common.config import FederationConfig
    from fedswarm.common.processes import Supervisor


FAST_LANE_SKIPS = ("integration", "processes", "slow")  # marks the fast lane (--fast) leaves out


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast",
        action="store_true",
        help="the fast lane: no test marked integration, processes or slow; a subprocess a test starts fails it",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "processes: starts subprocesses (outside the --fast lane)")
    config.addinivalue_line("markers", "slow: trains or calibrates for tens of seconds (outside the --fast lane)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--fast"):
        return
    kept = [item for item in items if not any(item.get_closest_marker(m) for m in FAST_LANE_SKIPS)]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


@pytest.fixture(autouse=True)
def _fast_lane_starts_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --fast, starting a subprocess fails the test with what to do about it."""
    if not request.config.getoption("--fast"):
        return
    import multiprocessing.process
    import subprocess

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the --fast lane starts no subprocess: mark this test @pytest.mark.processes")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@pytest.fixture()
def flower_task() -> None:
    """Messages built in the test are stamped as Flower's engine stamps them inside a task of node 0
    (``act_as_node`` switches the node, for replies from several)."""
    from fedswarm.common.flower_internals import act_as_node

    act_as_node(0)


@pytest.fixture(scope="session")
def tokenizer():
    from fedswarm.common.model import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture()
def tiny_lora():
    from fedswarm.common.lora_state import attach_lora
    from fedswarm.common.model import load_model

    return attach_lora(load_model("tiny"), rank=4, alpha=8.0, seed=0)


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * __import__("torch").rsqrt(variance + self.variance_epsilon))


@pytest.fixture()
def tiny_lora_f64(tiny_lora, monkeypatch):
    """The tiny LoRA model in float64, for exact invariants that float32 kernels only meet to their last bits.

    Llama's RMSNorm computes in float32 whatever its input, so it is made to keep float64 here; SDPA
    attention already does. On any CPU float64 round-off is ~1e-16 relative; float32 kernels (batched
    vs alone, fused vs not) differ by ~1e-6 from one CPU to another (3.8e-6 seen on an AMD EPYC).
    """
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    return tiny_lora.double()


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


def assert_no_leftovers(supervisor: Supervisor) -> None:
    """The integration fixtures' check, after stopping: nothing a supervised process started still runs."""
    left = supervisor.leftovers()
    assert left == [], "processes left running after stopping: " + "; ".join(map(str, left))


@pytest.fixture()
def supervisor() -> Iterator[Supervisor]:
    """A process supervisor whose trees are all stopped, and checked for leftovers, after the test."""
    from fedswarm.common.processes import Supervisor

    sup = Supervisor(grace=5.0)
    try:
        yield sup
    finally:
        sup.stop_all()
    assert_no_leftovers(sup)


def dp_config(**changes: object) -> FederationConfig:
    """A small local-DP run of the tiny model (RDP, a fixed noise seed), the DP tests' common ground."""
    from fedswarm.common.config import FederationConfig

    base = dict(
        model="tiny", dp=True, noise_multiplier=1.1, local_steps=3, batch_size=4, dp_batch_size=4, max_seq_len=48,
        dp_seed=7, accountant="rdp",
    )  # fmt: skip
    return FederationConfig(**{**base, **changes})  # type: ignore[arg-type]
