import json

import numpy as np
import pytest

from fedswarm.common.data import load_examples
from fedswarm.common.errors import FedswarmError
from fedswarm.common.partition import PartitionSpec, parse_partition, partition
from fedswarm.common.splits import holdout_split
from tests.conftest import write_jsonl


def test_builtin_sarcasm_reads_labels():
    examples = load_examples("sarcasm", max_samples=50)
    assert len(examples) == 50
    assert {e.label for e in examples} <= {"0", "1"}
    assert examples[0].messages[0][0] == "system" and examples[0].answer == examples[0].label


def test_formats(tmp_path):
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    )
    [e] = load_examples(str(chat))
    assert e.chat() == [{"role": "user", "content": "hi"}] and e.answer == "hello" and e.label is None
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2+2", "output": "4"}])
    [e] = load_examples(str(alpaca))
    assert e.chat() == [{"role": "user", "content": "Add\n\n2+2"}] and e.answer == "4"
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("text,label\ngreat film,pos\nawful,neg\n", encoding="utf-8")
    examples = load_examples(str(csv_file))
    assert [e.label for e in examples] == ["pos", "neg"]
    assert "neg, pos" in examples[0].messages[0][1]


def test_malformed_record_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text(f"{good}\n{good}\n{{not json\n", encoding="utf-8")
    with pytest.raises(FedswarmError, match=rf"{path}:3: invalid JSON"):
        load_examples(str(path))
    path.write_text(f"{good}\n" + json.dumps({"text": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(FedswarmError, match=rf"{path}:2: unknown record format"):
        load_examples(str(path))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(FedswarmError, match="holds no records"):
        load_examples(str(empty))
    with pytest.raises(FedswarmError, match="no such file; expected one of sarcasm, diabetes"):
        load_examples(str(tmp_path / "nope.jsonl"))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FedswarmError, match="not UTF-8"):
        load_examples(str(binary))


def test_partitions_are_disjoint_cover_training_and_exclude_holdout():
    n = 1000
    split = holdout_split(n, eval_size=100, seed=3)
    labels = ["a" if i % 3 else "b" for i in split.train]
    for spec in (PartitionSpec("iid"), PartitionSpec("dirichlet", 0.5)):
        parts = partition(split.train.tolist(), labels, 7, spec, seed=3)
        flat = [i for p in parts for i in p]
        assert len(flat) == len(set(flat))  # disjoint
        assert sorted(flat) == sorted(split.train.tolist())  # cover the training pool
        assert not set(flat) & set(split.holdout.tolist())  # never the held-out split
        assert all(parts)


def test_holdout_is_fixed_by_seed():
    a, b = holdout_split(500, 50, seed=1), holdout_split(500, 50, seed=1)
    assert np.array_equal(a.holdout, b.holdout)
    assert not np.array_equal(a.holdout, holdout_split(500, 50, seed=2).holdout)


def test_dirichlet_is_reproducible_and_skewed():
    idx = list(range(2000))
    labels = ["x" if i % 2 else "y" for i in idx]
    spec = parse_partition("dirichlet:0.1")
    first = partition(idx, labels, 5, spec, seed=11)
    assert first == partition(idx, labels, 5, spec, seed=11)
    assert first != partition(idx, labels, 5, spec, seed=12)
    shares = [sum(labels[i] == "x" for i in p) / len(p) for p in first]
    assert max(shares) - min(shares) > 0.5  # alpha 0.1 skews labels strongly


def test_bad_partition_values():
    for bad in ("dirichlet", "dirichlet:-1", "dirichlet:abc", "random"):
        with pytest.raises(FedswarmError, match="expected 'iid' or 'dirichlet:ALPHA'"):
            parse_partition(bad)
    with pytest.raises(FedswarmError, match="needs labelled data"):
        partition([0, 1, 2], [None, None, None], 2, PartitionSpec("dirichlet", 1.0), 0)
