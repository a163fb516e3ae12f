"""Adapters travel packed: one flat array and a manifest, decoded exactly into the named tensors."""

from __future__ import annotations

import pytest
import torch

from fedswarm.common.contract import MANIFEST, PACKED, from_record, is_packed, to_record


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_packing_round_trips_bit_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 16, generator=g).to(dtype),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(16, 4, generator=g).to(dtype),
        "scalar-ish": torch.randn(1, generator=g).to(dtype),
    }
    record = to_record(tensors)
    assert set(record.keys()) == {PACKED, MANIFEST} and is_packed(record)
    back = from_record(record)
    assert list(back) == list(tensors)  # names and their order
    for name, t in tensors.items():
        assert back[name].dtype == dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)


def test_unpacked_when_asked_or_when_dtypes_differ():
    same = {"a": torch.ones(2), "b": torch.zeros(3)}
    assert set(to_record(same, packed=False).keys()) == {"a", "b"}
    mixed = {"a": torch.ones(2), "b": torch.zeros(3, dtype=torch.float64)}
    record = to_record(mixed)
    assert not is_packed(record) and set(record.keys()) == {"a", "b"}
    assert torch.equal(from_record(record)["b"], mixed["b"])


def test_a_manifest_that_does_not_cover_the_array_is_refused():
    from flwr.app import Array, ArrayRecord

    record = to_record({"a": torch.ones(2), "b": torch.ones(3)})
    record[PACKED] = Array(torch.ones(6).numpy())  # one value too many
    with pytest.raises(ValueError, match="covers 5 values of 6"):
        from_record(ArrayRecord(dict(record)))
