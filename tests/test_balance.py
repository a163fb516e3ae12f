"""--balance-labels: label-balanced local batches for nodes whose labels are skewed."""

import numpy as np
import pytest

from fedswarm.client.trainer.local_train import draw_order
from fedswarm.client.trainer.node_round import train_round
from fedswarm.client.trainer.runtime import Shard
from fedswarm.common.config import FederationConfig
from fedswarm.common.data import Example
from fedswarm.common.errors import FedswarmError
from fedswarm.common.evaluate import evaluate


def _skewed(yes: int, no: int, offset: int = 0) -> list[Example]:
    labels = ["yes"] * yes + ["no"] * no
    return [Example((("user", f"is item {i + offset} odd?"),), label, label) for i, label in enumerate(labels)]


def test_balanced_order_alternates_labels_and_repeats_the_rare_one():
    examples = _skewed(10, 2)
    order = draw_order(examples, 8, seed=3, balance=True)
    labels = [examples[i].label for i in order]
    assert labels == ["no", "yes"] * 4  # labels in sorted order, one slot each in turn
    rare = order[0::2].tolist()
    assert sorted(set(rare)) == [10, 11] and rare[:2] == rare[2:]  # 2 "no" examples, each twice, same order
    common = order[1::2].tolist()
    assert len(set(common)) == 4  # "yes" has enough: no repeat
    permutation = np.random.default_rng(3).permutation(12).tolist()
    assert rare[:2] == [i for i in permutation if i >= 10]  # each label's examples in the seeded permutation
    assert common == [i for i in permutation if i < 10][:4]


def test_unbalanced_order_is_the_seeded_permutation():
    examples = _skewed(10, 2)  # the order every earlier run used: results stay reproducible
    assert draw_order(examples, 24, seed=3).tolist() == np.random.default_rng(3).permutation(12).tolist()


def test_balance_needs_labels():
    unlabelled = [Example((("user", "hi"),), "hello", None)] * 3
    with pytest.raises(FedswarmError, match="--balance-labels needs labelled examples"):
        draw_order(unlabelled, 4, seed=0, balance=True)
    FederationConfig(balance_labels=True, dp=True, epsilon=8.0)  # with DP: per-label Poisson rates (test_privacy)


@pytest.mark.slow
def test_balanced_training_does_not_learn_the_nodes_label_skew(tiny_lora, tokenizer):
    """A node's round (``train_round``, as the ClientApp runs it) on one question, answered "yes" 36
    times and "no" 4 times: all a model can learn is the label mix.

    Plain batches learn to prefer "yes" (the node's 90%); balanced batches see both equally often.
    """
    from fedswarm.common.lora_state import adapter_state, load_adapter_state

    def asked(label: str, n: int) -> list[Example]:
        return [Example((("user", "is it odd?"),), label, label)] * n

    start = adapter_state(tiny_lora)
    gaps = {}
    for balance in (False, True):
        load_adapter_state(tiny_lora, start)
        cfg = FederationConfig(
            model="tiny", local_steps=30, learning_rate=3e-2, max_seq_len=48, precision="fp32", balance_labels=balance
        )
        train_round(tiny_lora, tokenizer, Shard(asked("yes", 36) + asked("no", 4), [], 0), cfg, 1, None)
        no, yes = (evaluate(tiny_lora, tokenizer, asked(label, 1), 48).loss for label in ("no", "yes"))
        gaps[balance] = no - yes  # > 0: the model prefers "yes"
    print(f"loss('no') - loss('yes'): plain {gaps[False]:.3f}, balanced {gaps[True]:.3f}")
    assert gaps[False] > 2.0
    assert abs(gaps[True]) < gaps[False] / 4
