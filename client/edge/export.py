"""``fedswarm export``: a run's adapter -> merged, quantised ONNX in the transformers.js layout.

Everything is written into a temporary folder beside EDGE_DIR that replaces it only when
every variant has passed its parity check: a failed or interrupted export leaves no
partial EDGE_DIR (and an earlier good one stays).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedswarm.client.edge.merge import RunInfo
from fedswarm.client.edge.variants import DEFAULT_QUANT, QUANT_MIN_AGREEMENT, parse_quant
from fedswarm.common.errors import FedswarmError
from fedswarm.common.model import DEFAULT_MODEL, ModelSpec
from fedswarm.common.options import MODELS, add_arguments, model_option, option, required, threads_option

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedswarm.client.edge.gptq import QuantizedLinear
    from fedswarm.client.edge.quantize import Calibrate, Recipe

log = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 128


@dataclass(frozen=True, kw_only=True)
class ExportCommand:
    """``fedswarm export``."""

    adapter: str = required("a run's adapter/ folder (RUN_DIR/adapter), or 'none'")
    out: str = required("EDGE_DIR to write (replaced only on success)")
    model: str | None = model_option(None, f"base model: {MODELS} (default: the run's, else {DEFAULT_MODEL})")
    quant: str = option(",".join(DEFAULT_QUANT), "variants: a comma-separated subset of fp32,int8,q4,q4f16")
    min_agreement: float = option(
        QUANT_MIN_AGREEMENT, "least next-token agreement with PyTorch for a quantised variant (fp32 must reach 0.999)"
    )
    parity_samples: int = option(16, "held-out texts for the parity check")
    parity_max_len: int = option(96, "tokens per parity text")
    calibration_samples: int = option(
        CALIBRATION_SAMPLES, "training texts GPTQ calibrates the quantised variants on (never the parity texts)"
    )
    threads: int = threads_option("torch/onnxruntime threads (0: their default)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="export a trained adapter as quantised ONNX for the edge and the browser",
        description="Merge the adapter into its base model, export ONNX (KV cache) with optimum, quantise it, "
        "check every variant against PyTorch, and write a model card and a web page.",
    )
    add_arguments(parser, ExportCommand)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fedswarm.client.edge.merge import resolve_adapter, resolve_model

    variants = parse_quant(args.quant)  # validate every input before anything is loaded or written
    if not 0.0 <= args.min_agreement <= 1.0:
        raise FedswarmError(f"--min-agreement must be within [0, 1], got {args.min_agreement}")
    for flag, value in (
        ("--parity-samples", args.parity_samples),
        ("--parity-max-len", args.parity_max_len),
        ("--calibration-samples", args.calibration_samples),
    ):
        if value < 2:
            raise FedswarmError(f"{flag} must be >= 2, got {value}")
    run_info = resolve_adapter(args.adapter)
    spec = resolve_model(args.model, run_info)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise FedswarmError(f"--out {args.out!r}: exists and is not a folder")
    export(
        spec, run_info, out, variants, args.min_agreement, args.parity_samples, args.parity_max_len, args.threads,
        args.calibration_samples,
    )  # fmt: skip
    print(f"edge export written to {out} (parity.json, README.md, onnx/, web/); serve it: fedswarm serve-web {out}")
    return 0


def export(
    spec: ModelSpec,
    run_info: RunInfo,
    out: Path,
    variants: tuple[str, ...],
    min_agreement: float,
    parity_samples: int,
    parity_max_len: int,
    threads: int = 0,
    calibration_samples: int = CALIBRATION_SAMPLES,
) -> dict[str, Any]:
    """Build EDGE_DIR atomically; returns the parity report. Raises FedswarmError when parity fails."""
    import torch

    from fedswarm.client.edge.card import model_card
    from fedswarm.client.edge.layout import write_model_files
    from fedswarm.client.edge.merge import merged_model
    from fedswarm.client.edge.onnx_export import export_fp32
    from fedswarm.client.edge.parity import check_variants, held_out_texts
    from fedswarm.client.edge.quantize import describe, quantize_variant
    from fedswarm.client.edge.variants import FILES
    from fedswarm.client.edge.webpage import write_web
    from fedswarm.common.model import load_tokenizer
    from fedswarm.common.paths import atomic_dir

    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(spec)
    model = merged_model(spec, run_info)
    calibrate = _gptq_calibration(model, tokenizer, run_info, calibration_samples, parity_max_len)
    with atomic_dir(out) as tmp:
        onnx_dir = tmp / "onnx"
        files = {"fp32": export_fp32(model, onnx_dir / FILES["fp32"])}
        for variant in variants:
            if variant != "fp32":
                log.info("Quantising: %s", variant)
                files[variant] = quantize_variant(variant, files["fp32"], onnx_dir / FILES[variant], files, calibrate)
        files = {v: files[v] for v in variants}
        write_model_files(tmp, model, tokenizer)
        texts = held_out_texts(tokenizer, run_info, parity_samples, parity_max_len)
        log.info("Parity: %d variants on %d held-out texts", len(files), len(texts))
        parity = check_variants(model, files, texts, min_agreement, threads)
        report = parity.to_json()
        quantised = [v for v in variants if v != "fp32"]
        if quantised:
            report["quantisation"] = {
                "calibration": f"GPTQ on {calibration_samples} training texts of the run's data (not the parity texts)",
                **{v: describe(v) for v in quantised},
            }
        (tmp / "parity.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        card = model_card(spec.name, run_info, parity, report.get("quantisation"))
        table = "\n".join(line for line in card.splitlines() if line.startswith("|"))
        log.info("parity against PyTorch (%d held-out texts):\n%s", parity.texts, table)
        if not parity.passed:
            raise FedswarmError(f"parity check failed: {'; '.join(parity.failures())}; {out} not written")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_web(tmp, variants)
    return report


def _gptq_calibration(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, run_info: RunInfo, samples: int, max_len: int
) -> Calibrate:
    """GPTQ codes for a recipe, computed once per layer plan on the run's training texts (q4 and q4f16 share)."""
    from fedswarm.client.edge.gptq import gptq_model
    from fedswarm.client.edge.parity import training_texts

    done: dict[tuple, dict[str, QuantizedLinear]] = {}

    def calibrate(recipe: Recipe) -> dict[str, QuantizedLinear]:
        key = (recipe.bits, recipe.block, recipe.eight_bit_layers)
        if key not in done:
            texts = training_texts(tokenizer, run_info, samples, max_len)
            log.info("GPTQ: calibrating on %d training texts (%d tokens)", len(texts), sum(map(len, texts)))
            done[key] = gptq_model(model, texts, recipe.layer_plan)
        return done[key]

    return calibrate
