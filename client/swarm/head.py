"""The part of the model a swarm client runs itself: token embeddings, final norm, LM head.

For a model folder only those three tensors are read (the blocks stay on the servers);
the ``tiny`` model exists only as a seeded construction, so it is built and trimmed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedswarm.common.model import ModelSpec

if TYPE_CHECKING:
    import torch

HEAD_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@dataclass
class LocalHead:
    """Embeddings in, logits out; everything between runs on the swarm."""

    embed_tokens: Any  # torch.nn.Embedding
    norm: Any  # LlamaRMSNorm
    lm_head: Any  # torch.nn.Linear (may share its weight with the embeddings)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.lm_head(self.norm(hidden)).float()


def load_head(spec: ModelSpec) -> LocalHead:
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if spec.name == "tiny":
        from fedswarm.common.model import load_model

        full = load_model(spec)
        return LocalHead(full.model.embed_tokens, full.model.norm, full.lm_head)
    from transformers import AutoConfig

    from fedswarm.common.model import model_folder
    from fedswarm.common.weights import read_tensors

    folder = model_folder(spec)
    config = AutoConfig.from_pretrained(folder)
    tensors = {name: t.to(torch.float32) for name, t in read_tensors(folder, lambda n: n in HEAD_TENSORS)}
    embed = torch.nn.Embedding.from_pretrained(tensors["model.embed_tokens.weight"], freeze=True)
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight.data = tensors["model.norm.weight"]
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    head.weight.data = tensors.get("lm_head.weight", embed.weight)  # tied when the file has no lm_head
    return LocalHead(embed, norm.eval(), head.eval())
