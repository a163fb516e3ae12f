"""FedProx's proximal term on a node (Li et al., 2020): local steps are pulled back towards the global adapter.

The node minimises ``f_i(w) + mu/2 ||w - w_global||^2`` over its trainable LoRA tensors, so
each step's gradient gains ``mu (w - w_global)``: the further local steps drift from the
adapter the round started from (client drift grows with local steps under label skew), the
harder they are pulled back. The term does not depend on the data, so adding it to a DP-SGD
step's clipped, noised gradient is post-processing and leaves the node's guarantee as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft import PeftModel


class ProximalTerm:
    """Adds ``mu (w - w_start)`` to every trainable LoRA gradient; ``w_start`` is taken at construction.

    Call it once per optimizer step, after the gradients are in ``p.grad`` and before the
    optimizer reads them (``train_lora``'s ``on_grads``).
    """

    def __init__(self, model: PeftModel, mu: float) -> None:
        from fedswarm.common.lora_state import lora_parameters

        if mu < 0:
            raise ValueError(f"--proximal-mu must be >= 0, got {mu}")
        self.mu = mu
        self.params = [p for p in lora_parameters(model).values() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]

    def __call__(self, *_: object) -> None:
        for param, start in zip(self.params, self.start, strict=True):
            if param.grad is not None:
                param.grad.add_(param.detach() - start, alpha=self.mu)


def chain(*hooks: Callable[[], None] | None) -> Callable[[], None] | None:
    """The given gradient hooks run in turn (None when there are none)."""
    present = [h for h in hooks if h is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def run(*_: object) -> None:
        for hook in present:
            hook()

    return run
