"""SCAFFOLD drift correction on a node (Karimireddy et al., 2020), for label-skewed data.

Each node keeps a control variate ``c_i``: the mean gradient of its last round's local
steps. The coordinator's ``c`` is the weighted mean of the nodes' ``c_i``. Every local
step then follows ``g - c_i + c`` instead of ``g``: the node's own pull (what its skewed
data alone asks for) is swapped for the federation's, so local steps stop drifting
towards each node's majority label. The correction is added to the gradient the
optimizer sees: the plain one, or under DP-SGD the clipped and noised one (Opacus' step
hook), so ``c_i`` is post-processing of already-private gradients. A node without its own
``c_i`` yet (first round, a new or restarted node) trains uncorrected for that round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from peft import PeftModel


class DriftCorrection:
    """Collects the mean raw gradient of a round and corrects each step by ``server - own``.

    Call the instance once per optimizer step, after the gradients are in ``p.grad`` and
    before the optimizer reads them. Keys are the adapter-state keys (``adapter_state``).
    """

    def __init__(
        self,
        model: PeftModel,
        server: Mapping[str, torch.Tensor] | None,
        own: Mapping[str, torch.Tensor] | None,
    ) -> None:
        import torch

        from fedswarm.common.lora_state import lora_parameters

        self.params = {k: p for k, p in lora_parameters(model).items() if p.requires_grad}
        self.sums = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in self.params.items()}
        self.steps = 0
        self.correction: dict[str, torch.Tensor] | None = None
        if server is not None and own is not None:
            for name, given in (("coordinator", server), ("node", own)):
                if set(given) != set(self.params):
                    raise ValueError(f"the {name}'s control variate does not match the trained LoRA tensors")
            self.correction = {k: (server[k].float() - own[k].float()).to(p.device) for k, p in self.params.items()}

    def __call__(self, *_: object) -> None:
        grads = {k: p.grad for k, p in self.params.items() if p.grad is not None}
        if not all(bool(g.isfinite().all()) for g in grads.values()):
            return  # an fp16 overflow: the gradient scaler skips this step, and c_i leaves it out too
        for key, grad in grads.items():
            self.sums[key] += grad.detach().float()
            if self.correction is not None:
                grad.add_(self.correction[key].to(grad.dtype))
        self.steps += 1

    def control(self) -> dict[str, torch.Tensor]:
        """This round's ``c_i``: the mean (uncorrected) gradient over its steps, on the CPU."""
        if self.steps == 0:
            raise RuntimeError("no optimizer step was taken: no control variate to report")
        return {k: (s / self.steps).cpu() for k, s in self.sums.items()}
