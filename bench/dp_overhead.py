"""DP-SGD cost per example-gradient against plain LoRA, and a private step's peak memory.

Interleaved after a warm-up, on the same examples and sequence length:

  plain:  a LoRA step on a batch of --batch-size (the non-DP default shape: rank 8, A and B);
  plain*: the same step on the DP default shape (rank 2, B only, as ffa trains it);
  DP:     one private step of --dp-batch-size examples in micro-batches of --batch-size
          (Opacus per-sample gradients, per-example clipping, one noise draw), DP default shape.

Time per example-gradient = step time / examples in the step; the ratio DP / plain* is the
cost of privacy itself (goal <= 1.3). Peak memory: the process's peak RSS growth over a
private step in micro-batches, then over the same step in one pass (peak RSS only grows, so
the micro-batched step runs first).

Ghost clipping (Opacus' fast gradient clipping, ``use_ghost_clipping=True``): the same private
step computing per-example norms without per-example gradients, in two backward passes; its
clipped, noise-free mean gradient is compared with the standard path's on the same examples.

    .venv/bin/python bench/dp_overhead.py [--model smollm2-135m] [--batch-size 8] [--dp-batch-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any


def main() -> None:
    import torch

    from fedswarm.client.trainer.privacy import DpSettings, dp_components, noise_generator
    from fedswarm.common.batches import answer_loss, collate, encode, per_sample_answer_loss
    from fedswarm.common.config import DP_LORA_RANK, LORA_RANK
    from fedswarm.common.data import load_examples
    from fedswarm.common.lora_state import attach_lora
    from fedswarm.common.memory import peak_rss_mb
    from fedswarm.common.model import load_model, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="sarcasm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dp-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    pad = int(tokenizer.pad_token_id)
    examples = load_examples(args.data, max_samples=args.dp_batch_size)
    micro = [
        collate([encode(tokenizer, e, args.max_seq_len) for e in examples[i : i + args.batch_size]], pad)
        for i in range(0, len(examples), args.batch_size)
    ]
    whole = collate([encode(tokenizer, e, args.max_seq_len) for e in examples], pad)
    base = load_model(args.model)

    def plain_model(rank: int, b_only: bool) -> tuple[Any, Callable[[], float]]:
        model = attach_lora(base, rank, 16.0, 0)
        for name, p in model.named_parameters():
            if "lora_A" in name and b_only:
                p.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()

        def step() -> float:
            started = time.perf_counter()
            answer_loss(model, micro[0]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return (time.perf_counter() - started) / args.batch_size

        return model, step

    default_model, plain = plain_model(LORA_RANK, False)
    plain_times = [plain() for _ in range(args.repeats + 1)][1:]
    default_model.unload()  # back to the bare base for the DP shape

    model, plain_dp_shape = plain_model(DP_LORA_RANK, True)
    settings = DpSettings(1.0, 1.0, 1e-5, 0.0, 0.01, "prv", "adam", 0.0, args.batch_size)
    gsm, dp_opt = dp_components(model, settings, args.dp_batch_size, 1e-4, noise_generator(0))

    def dp_step(parts: list[dict]) -> float:
        started = time.perf_counter()
        for k, batch in enumerate(parts):
            per_sample_answer_loss(model, batch).mean().backward()
            if k < len(parts) - 1:
                dp_opt.signal_skip_step(do_skip=True)
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - started) / args.dp_batch_size

    rss0 = peak_rss_mb()
    dp_step(micro)  # warm-up, and the micro-batched step's peak
    rss_micro = peak_rss_mb() - rss0
    plain_star, dp = [], []
    for _ in range(args.repeats):
        gsm.disable_hooks()
        plain_star.append(plain_dp_shape())
        gsm.enable_hooks()
        dp.append(dp_step(micro))
    rss1 = peak_rss_mb()
    dp_step([whole])
    rss_whole = peak_rss_mb() - rss1
    gsm._close()

    standard = clipped_mean(model, settings, micro)
    ghost_times, ghost_mean = ghost(model, settings, whole, args.repeats)
    diff = max(float((a - b).abs().max()) for a, b in zip(standard, ghost_mean, strict=True))
    scale = max(float(a.abs().max()) for a in standard)

    p, ps, d = (statistics.median(t) * 1000 for t in (plain_times, plain_star, dp))
    grad_sample_mb = sum(p.numel() for p in model.parameters() if p.requires_grad) * args.batch_size * 4 / 2**20
    print(f"model {args.model}, seq len {args.max_seq_len}, {args.threads} threads, median of {args.repeats} steps")
    print(f"plain, rank {LORA_RANK} A+B, batch {args.batch_size}:  {p:8.1f} ms per example-gradient")
    print(f"plain, rank {DP_LORA_RANK} B only, batch {args.batch_size}: {ps:8.1f} ms per example-gradient")
    print(
        f"DP, rank {DP_LORA_RANK} B only, private batch {args.dp_batch_size} in micro-batches of {args.batch_size}: "
        f"{d:8.1f} ms per example-gradient"
    )
    print(f"ratio DP / plain (same shape): {d / ps:6.3f}   (goal <= 1.3)")
    print(f"ratio DP / plain (non-DP default shape): {d / p:6.3f}")
    print(
        f"peak RSS growth of a private step: {rss_micro:.0f} MB in micro-batches of {args.batch_size}, "
        f"then {rss_whole:.0f} MB more in one pass of {args.dp_batch_size}; "
        f"per-sample gradients of a micro-batch: {grad_sample_mb:.1f} MB"
    )
    g = statistics.median(ghost_times) * 1000
    print(
        f"ghost clipping, same private step in one pass: {g:8.1f} ms per example-gradient "
        f"({g / d:.2f} x the standard DP step); "
        f"clipped mean gradient differs by at most {diff:.1e} (largest entry {scale:.1e})"
    )


def clipped_mean(model: Any, settings: Any, parts: list[dict]) -> list[Any]:
    """The standard path's clipped mean gradient (no noise) over the micro-batches."""
    import dataclasses

    from fedswarm.client.trainer.privacy import dp_components, noise_generator
    from fedswarm.common.batches import per_sample_answer_loss

    quiet = dataclasses.replace(settings, noise_multiplier=0.0)
    n = sum(int(b["input_ids"].shape[0]) for b in parts)
    gsm, opt = dp_components(model, quiet, n, 0.0, noise_generator(0))
    out = []
    try:
        for k, batch in enumerate(parts):
            per_sample_answer_loss(model, batch).mean().backward()
            if k < len(parts) - 1:
                opt.signal_skip_step(do_skip=True)
            opt.pre_step()
            if k == len(parts) - 1:
                out = [p.grad.detach().clone() for p in opt.params]
            opt.zero_grad(set_to_none=True)
    finally:
        gsm._close()
    return out


def ghost(model: Any, settings: Any, whole: dict, repeats: int) -> tuple[list[float], list[Any]]:
    """Ghost clipping's time per example-gradient and its clipped mean, in one pass over all examples.

    (Its backward zeroes ``p.grad`` first, so micro-batches do not accumulate the way DPOptimizer's do.)
    """
    import dataclasses

    import torch
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
    from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from fedswarm.common.batches import per_sample_answer_loss

    n = int(whole["input_ids"].shape[0])
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", strict=False, max_grad_norm=settings.max_grad_norm,
        use_ghost_clipping=True,
    )  # fmt: skip

    def step(sigma: float) -> float:
        quiet = dataclasses.replace(settings, noise_multiplier=sigma)
        opt = DPOptimizerFastGradientClipping(
            torch.optim.SGD(params, lr=0.0), noise_multiplier=quiet.noise_multiplier,
            max_grad_norm=quiet.max_grad_norm, expected_batch_size=n, loss_reduction="mean",
        )  # fmt: skip
        started = time.perf_counter()
        total: list[Any] = []
        DPTensorFastGradientClipping(gsm, opt, per_sample_answer_loss(model, whole), "mean").backward()
        opt.pre_step()
        total = [p.grad.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        step.last = total  # type: ignore[attr-defined]
        return (time.perf_counter() - started) / n

    try:
        times = [step(1.0) for _ in range(repeats + 1)][1:]
        step(0.0)
        mean = step.last  # type: ignore[attr-defined]
    finally:
        gsm._close()
    return times, mean


if __name__ == "__main__":
    main()
