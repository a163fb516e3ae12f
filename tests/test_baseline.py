"""The constant-answer baseline a run prints, stores and plots beside its rounds."""

import json

from fedswarm.common.data import Example
from fedswarm.common.evaluate import constant_answer
from fedswarm.server.coordinator.federation import results_table
from fedswarm.server.coordinator.run_dir import RunDir, curves_figure


def _labelled(*labels: str) -> list[Example]:
    return [Example((("user", "q"),), label, label) for label in labels]


def test_constant_answer_is_the_commonest_labels_share():
    assert constant_answer(_labelled("no", "yes", "no", "no", "yes")) == ("no", 0.6)
    assert constant_answer(_labelled("b", "a")) == ("a", 0.5)  # a tie goes to the first label in order
    assert constant_answer([Example((("user", "q"),), "free text")]) is None  # unlabelled: no such floor


def test_results_table_shows_each_rounds_margin_over_the_constant_answer():
    rows = [
        {"round": 0, "eval_loss": 2.0, "eval_accuracy": 0.0, "train_loss": None},
        {"round": 1, "eval_loss": None, "eval_accuracy": None, "train_loss": 0.7},  # skipped by --eval-every
        {"round": 2, "eval_loss": 0.5, "eval_accuracy": 0.7, "eval_margin_se": 0.0142, "train_loss": 0.6},
    ]
    lines = results_table(rows, ("no", 0.55)).splitlines()
    assert lines[0].endswith("| margin over constant")
    assert lines[2].endswith("|               -0.550")
    assert lines[3] == "    1 |             - |        - |     0.7000 |                    -"
    assert lines[4].endswith("|       +0.150 ± 0.014")  # the margin and its standard error
    assert lines[-1] == "constant answer (always 'no'): accuracy 0.550, the floor to beat"
    assert "margin" not in results_table(rows)


def test_curves_plot_the_constant_answer(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"round": r, "eval_loss": 1.0 / (r + 1), "eval_accuracy": 0.2 * r, "train_loss": None})
                + "\n" for r in range(3))
    )  # fmt: skip
    run.plot_curves(0.55)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    fig = curves_figure(run.read_metrics(), 0.55)
    acc = fig.axes[1]
    floor = [line for line in acc.get_lines() if line.get_label().startswith("constant answer")]
    assert len(floor) == 1 and list(floor[0].get_ydata()) == [0.55, 0.55]
    fig.canvas.draw()
    ticks = [t for t in acc.get_xticks() if 0 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks)  # rounds are whole numbers


def test_eval_every_scores_every_nth_round_and_always_the_last():
    from fedswarm.common.config import FederationConfig
    from fedswarm.server.coordinator.federation import evaluates

    def scored(every: int) -> list[int]:
        cfg = FederationConfig(model="tiny", rounds=5, eval_every=every)
        return [r for r in range(6) if evaluates(cfg, r)]

    assert scored(1) == [0, 1, 2, 3, 4, 5]
    assert scored(2) == [0, 2, 4, 5]
    assert scored(0) == [5]  # the last round only, not even the base model
