"""Resume: the last completed round's checkpoint, settings that may and may not change."""

import json
from dataclasses import asdict

import pytest
import torch

from fedswarm.common.config import FederationConfig
from fedswarm.common.errors import FedswarmError
from fedswarm.server.coordinator.resume import load_resume, merge_config, restore_strategy, strategy_state
from fedswarm.server.coordinator.round_plan import NodeBook
from fedswarm.server.coordinator.run_dir import RunDir


def _saved_run(tmp_path, tiny_lora, rounds_done=2, orphan=True):
    """A run folder as the coordinator leaves it, plus (orphan) a checkpoint whose metrics line never came."""
    from fedswarm.common.lora_state import adapter_state, save_adapter

    cfg = FederationConfig(model="tiny", clients=3, rounds=5, lora_rank=4, lora_alpha=8.0, out=str(tmp_path / "run"))
    run = RunDir(cfg.out)
    run.append_metrics({"round": 0, "eval_loss": 3.0})
    states = {}
    for round_no in range(1, rounds_done + 1 + int(orphan)):
        state = {k: torch.full_like(v, float(round_no)) for k, v in adapter_state(tiny_lora).items()}
        save_adapter(tiny_lora, state, run.checkpoint(round_no))
        book = NodeBook({11: 4, 12: 4}, {11: json.dumps([[1.0, 0.1, 3 * round_no]])})
        saved = {"round": round_no, "config": asdict(cfg), "nodes": book.to_json(), "strategy": {"x": round_no}}
        run.write_state(round_no, saved)
        states[round_no] = state
        if round_no <= rounds_done:
            run.append_metrics({"round": round_no, "eval_loss": 3.0 - round_no})
    return cfg, states


def test_resume_takes_the_last_round_with_a_metrics_line(tmp_path, tiny_lora):
    cfg, states = _saved_run(tmp_path, tiny_lora)
    resumed = load_resume(cfg.out, FederationConfig())
    assert resumed.round == 2  # round 3's checkpoint has no metrics line: it is redone
    assert set(resumed.state) == set(states[2])
    assert all(torch.equal(resumed.state[k], states[2][k]) for k in states[2])
    assert resumed.book.ranks == {11: 4, 12: 4}
    assert json.loads(resumed.book.privacy[11]) == [[1.0, 0.1, 6]]  # the DP history as of round 2
    assert resumed.strategy_state == {"x": 2}
    assert [r["round"] for r in resumed.rows] == [0, 1, 2]
    assert resumed.cfg.rounds == 5 and resumed.cfg.lora_rank == 4 and resumed.cfg.out == cfg.out


def test_resume_may_change_operational_settings_only():
    saved = asdict(FederationConfig(model="tiny", clients=3, rounds=2, lora_rank=4))
    more = merge_config(saved, FederationConfig(rounds=4, min_clients=2, round_timeout=60.0), "run")
    assert (more.rounds, more.min_clients, more.round_timeout, more.lora_rank) == (4, 2, 60.0, 4)
    assert merge_config(saved, FederationConfig(lora_rank=4), "run").lora_rank == 4  # same as saved: fine
    with pytest.raises(FedswarmError, match="--lora-rank 16 differs from the run's 4"):
        merge_config(saved, FederationConfig(lora_rank=16), "run")
    with pytest.raises(FedswarmError, match="--learning-rate"):
        merge_config(saved, FederationConfig(learning_rate=0.5), "run")


def test_resume_applies_a_typed_setting_even_at_its_default():
    from fedswarm.common.cli import build_parser
    from fedswarm.common.config import federation_from_args

    saved = asdict(FederationConfig(model="tiny", rounds=2, min_clients=3, lora_rank=4))
    parser = build_parser()
    typed = federation_from_args(parser.parse_args(["simulate", "--resume", "run", "--rounds", "3"]))
    assert typed.resume_given == "resume,rounds"
    assert merge_config(saved, typed, "run").rounds == 3  # 3 is the default, asked for all the same
    assert merge_config(saved, typed, "run").min_clients == 3  # not typed: the run's own value
    untyped = FederationConfig(resume="run", rounds=3)  # e.g. flwr run with every key: defaults cannot count
    assert merge_config(saved, untyped, "run").rounds == 2
    toggled = federation_from_args(parser.parse_args(["simulate", "--resume", "run", "--no-dp", "--lora-rank", "8"]))
    assert toggled.resume_given == "dp,lora_rank,resume"
    with pytest.raises(FedswarmError, match="--lora-rank 8 differs from the run's 4"):
        merge_config(saved, toggled, "run")  # typed, so refused, although 8 is the default
    fresh = federation_from_args(parser.parse_args(["simulate", "--rounds", "3"]))
    assert fresh.resume_given == ""  # only a resume lists what was typed


def test_resume_refuses_folders_without_a_completed_round(tmp_path):
    with pytest.raises(FedswarmError, match="not a run folder"):
        load_resume(str(tmp_path / "nothing"), FederationConfig())
    run = RunDir(tmp_path / "fresh")
    run.append_metrics({"round": 0, "eval_loss": 1.0})
    with pytest.raises(FedswarmError, match="no completed round"):
        load_resume(str(run.root), FederationConfig())


def test_central_dp_accountant_survives_a_resume():
    from fedswarm.common.codecs import codec_for
    from fedswarm.common.flower_internals import GaussianPrivacyEvent
    from fedswarm.server.coordinator.strategy import build_strategy

    cfg = FederationConfig(clients=3, central_dp=True, central_noise=0.8)
    first = build_strategy(cfg, codec_for(cfg), NodeBook(), {}, 1.0)
    for _ in range(2):
        first.accountant.compose(GaussianPrivacyEvent(noise_multiplier=0.8, sample_size=3, population_size=3))
    saved = json.loads(json.dumps(strategy_state(first)))  # through state.json
    second = build_strategy(cfg, codec_for(cfg), NodeBook(), {}, 1.0)
    restore_strategy(second, saved)
    assert second.accountant.num_releases == 2
    assert second.privacy_spent().epsilon == pytest.approx(first.privacy_spent().epsilon)


@pytest.mark.parametrize("orphan", [True, False], ids=["torn-round-checkpointed", "torn-round-without-checkpoint"])
def test_a_torn_last_metrics_line_is_dropped_and_its_round_redone(tmp_path, tiny_lora, caplog, monkeypatch, orphan):
    import logging

    cfg, states = _saved_run(tmp_path, tiny_lora, orphan=orphan)
    metrics = RunDir(cfg.out).metrics_path
    whole = metrics.read_text()
    metrics.write_text(whole + '{"round": 3, "eval_lo')  # the coordinator died writing round 3's line
    monkeypatch.setattr(logging.getLogger("fedswarm"), "propagate", True)  # setup_logging() may have turned it off
    with caplog.at_level(logging.WARNING, logger="fedswarm"):
        resumed = load_resume(cfg.out, FederationConfig())
    assert resumed.round == 2 and [r["round"] for r in resumed.rows] == [0, 1, 2]
    assert all(torch.equal(resumed.state[k], states[2][k]) for k in states[2])
    warnings = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}  # pytest may see it twice
    assert len(warnings) == 1 and all("dropped a torn last line" in w and "\n" not in w for w in warnings), warnings
    assert metrics.read_text() == whole  # rewritten without it, byte for byte
    assert [p.name for p in metrics.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedswarm"):
        assert load_resume(cfg.out, FederationConfig()).round == 2  # once dropped, nothing left to drop
    assert caplog.records == []


def test_a_whole_last_metrics_line_without_its_newline_is_kept(tmp_path, tiny_lora):
    cfg, _ = _saved_run(tmp_path, tiny_lora, orphan=False)
    metrics = RunDir(cfg.out).metrics_path
    whole = metrics.read_text()
    metrics.write_text(whole.rstrip("\n"))  # the newline was the part a crash cut off
    assert load_resume(cfg.out, FederationConfig()).round == 2
    assert metrics.read_text() == whole  # a newline again, so the next line appends cleanly


def test_a_bad_metrics_line_before_the_last_is_an_error(tmp_path, tiny_lora):
    cfg, _ = _saved_run(tmp_path, tiny_lora, orphan=False)
    metrics = RunDir(cfg.out).metrics_path
    lines = metrics.read_text().splitlines(keepends=True)
    damaged = "".join([lines[0], '{"round": 1, "eval_lo\n', *lines[2:]])  # a torn line that is not the last
    metrics.write_text(damaged)
    with pytest.raises(FedswarmError, match=r"metrics.jsonl: line 2 is not a JSON object") as caught:
        load_resume(cfg.out, FederationConfig())
    assert "\n" not in str(caught.value)
    assert metrics.read_text() == damaged  # left as it was
    metrics.write_text(lines[0] + '{"round": 1')
    with pytest.raises(FedswarmError, match="the last line is torn"):  # only --resume drops a torn line
        RunDir(cfg.out).read_metrics()
