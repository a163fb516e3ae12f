"""LoRA adapters: creation from a seed, the tensors that travel, PEFT-format checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedswarm.common.errors import InputError
from fedswarm.common.paths import atomic_dir

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def attach_lora(model: PreTrainedModel, rank: int, alpha: float, seed: int) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA whose A matrices come from ``seed`` (B starts at zero).

    Every process that calls this with the same base model and seed gets the same
    adapter, so the coordinator's initial adapter is reproducible.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise InputError(f"lora rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float scale is what it computes with
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    return peft_model


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter tensors only (PEFT's names, without the adapter-name infix), detached copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's adapter, refusing missing, extra or mis-shaped tensors."""
    import torch

    params = lora_parameters(model)
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"adapter keys differ: missing {missing[:3]}..., unexpected {extra[:3]}...")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(
                f"adapter tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))


def lora_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters, keyed like ``adapter_state`` (the very tensors, not copies)."""
    from peft import get_peft_model_state_dict

    named = dict(model.named_parameters())
    return {k: named[_param_name(k, model.active_adapter)] for k in get_peft_model_state_dict(model)}


def _param_name(state_key: str, adapter: str) -> str:
    # PEFT drops ".<adapter>" from saved keys: "...lora_A.weight" <- "...lora_A.default.weight"
    head, _, tail = state_key.rpartition(".")
    return f"{head}.{adapter}.{tail}"


def save_adapter(model: PeftModel, state: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Write ``state`` as a PEFT adapter folder (config + safetensors), atomically."""
    load_adapter_state(model, state)
    with atomic_dir(Path(folder)) as tmp:
        model.save_pretrained(str(tmp))


def resize_rank(
    state: Mapping[str, torch.Tensor],
    rank: int,
    from_scale: float,
    to_scale: float,
    filler: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Re-express an adapter at another rank and scale, keeping ``scale * B @ A`` where it can.

    Truncation keeps the leading components (the SVD aggregation orders them by singular
    value); padding adds zero columns to B and takes the extra rows of A from ``filler``
    (the receiver's own A), so the product is unchanged and the new components can train.
    """
    import torch

    factor = (from_scale / to_scale) ** 0.5
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("lora_B.weight"):
            resized = torch.zeros(tensor.shape[0], rank, dtype=tensor.dtype)
            keep = min(rank, tensor.shape[1])
            resized[:, :keep] = tensor[:, :keep] * factor
        elif key.endswith("lora_A.weight"):
            keep = min(rank, tensor.shape[0])
            resized = torch.zeros(rank, tensor.shape[1], dtype=tensor.dtype)
            if filler is not None and key in filler:
                resized[:] = filler[key][:rank]
            resized[:keep] = tensor[:keep] * factor
        else:
            resized = tensor.clone()
        out[key] = resized
    return out


def lora_rank_of(state: Mapping[str, torch.Tensor]) -> int:
    """The rank of an adapter state (from its first lora_A)."""
    for key, tensor in state.items():
        if key.endswith("lora_A.weight"):
            return int(tensor.shape[0])
    raise ValueError("the adapter state holds no lora_A tensors")
