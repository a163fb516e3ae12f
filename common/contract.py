"""The coordinator-node contract: record names and keys both ends of a train/evaluate message use.

Roles meet only on the wire; these names are the wire's vocabulary, defined once here so
a rename cannot reach one end only. Metric values are Flower ``MetricRecord`` numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord, RecordDict

# Records in a message's RecordDict (and, for PRIVACY_KEY and CONTROL_KEY, in the node's Context.state)
PRIVACY_KEY = "privacy"  # ConfigRecord: the node's accountant history (JSON) and its decline note
CONTROL_KEY = "control"  # ArrayRecord: SCAFFOLD's c (to nodes) and c_i (from them; kept in node state)
NODE_INFO_KEY = "node-info"  # ConfigRecord: where a reply was computed (host, Ray node, device)


class Sent:
    """Keys of the coordinator's train/evaluate ConfigRecord (besides the run config itself)."""

    SERVER_ROUND = "server-round"
    DP_HISTORY = "dp-history"  # the coordinator's copy of the node's accountant history
    POOL = "pool"  # simulations only: the shared data the virtual nodes partition (a deployed node has its own)


class Reply:
    """Keys of a node's reply MetricRecord."""

    TRAIN_LOSS = "train-loss"
    STEPS = "steps"
    SECONDS = "seconds"
    NUM_EXAMPLES = "num-examples"
    UNIT_WEIGHT = "unit-weight"  # 1 for every node: weighting by node, not by examples
    LORA_RANK = "lora-rank"
    PEAK_RSS_MB = "peak-rss-mb"
    EVAL_LOSS = "eval-loss"
    EVAL_ACCURACY = "eval-accuracy"
    # local DP
    EPSILON = "epsilon"
    DELTA = "delta"
    NOISE_MULTIPLIER = "noise-multiplier"
    MAX_GRAD_NORM = "max-grad-norm"
    SAMPLE_RATE = "sample-rate"
    DECLINED = "declined"
    PROJECTED_EPSILON = "projected-epsilon"
    EMPTY_BATCHES = "empty-batches"
    DP_STEPS_TOTAL = "dp-steps-total"
    EXPECTED_BATCH = "expected-batch"


def number(record: Mapping[str, object], key: str) -> float:
    """A numeric record value (Flower types a record's values as a union of scalars and lists)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"record key {key!r} must be a number, got {value!r}")
    return float(value)


def whole(record: Mapping[str, object], key: str) -> int:
    """An integer record value (a float that is whole is accepted)."""
    return int(number(record, key))


def text(record: Mapping[str, object], key: str) -> str:
    """A record value as text (bytes decoded as UTF-8)."""
    value = record[key]
    return value.decode() if isinstance(value, bytes) else str(value)


# A packed ArrayRecord holds every tensor in one flat array plus a manifest (names, shapes,
# dtype as JSON bytes): Flower moves each Array as its own objects, one HTTPS round trip each
# on every hop (ServerApp, SuperLink, SuperNode, worker and back), so an adapter of 56-420
# tensors costs hundreds of requests per message; packed, it costs a handful.
PACKED = "fedswarm.packed"
MANIFEST = "fedswarm.manifest"


def to_record(tensors: Mapping[str, torch.Tensor], packed: bool = True) -> ArrayRecord:
    """An ArrayRecord of ``tensors``: packed (one flat array and its manifest) when they share a dtype.

    ``packed=False`` keeps one Array per tensor, as Flower's own strategies expect (central DP
    clips and noises every array of a reply, so its replies must not hold a manifest).
    """
    import json

    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord

    dtypes = {t.dtype for t in tensors.values()}
    if not packed or len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64, torch.float16}:
        return ArrayRecord(dict(tensors))
    items = [(name, t.detach().cpu()) for name, t in tensors.items()]
    flat = torch.cat([t.reshape(-1) for _, t in items])
    manifest = json.dumps({"dtype": str(flat.dtype), "tensors": [[n, list(t.shape)] for n, t in items]})
    return ArrayRecord(
        {
            PACKED: Array(flat.numpy()),
            MANIFEST: Array(np.frombuffer(manifest.encode(), dtype=np.uint8).copy()),
        }
    )


def is_packed(record: ArrayRecord) -> bool:
    return PACKED in record


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The named tensors of an ArrayRecord, packed or not."""
    import json
    import math

    import torch

    if not is_packed(record):
        return record.to_torch_state_dict()
    flat = torch.from_numpy(record[PACKED].numpy())
    manifest = json.loads(record[MANIFEST].numpy().tobytes().decode())
    out, at = {}, 0
    for name, shape in manifest["tensors"]:
        n = math.prod(shape)
        out[name] = flat[at : at + n].reshape(shape).clone()
        at += n
    if at != flat.numel():
        raise ValueError(f"packed arrays: the manifest covers {at} values of {flat.numel()}")
    return out


def arrays_of(content: RecordDict, name: str = "arrays") -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord of a message's content."""
    return from_record(content.array_records[name])


def flag(record: Mapping[str, object], key: str) -> bool:
    """A 0/1 record value; absent is 0."""
    return key in record and number(record, key) != 0
