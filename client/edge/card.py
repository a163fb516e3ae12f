"""EDGE_DIR/README.md: what the files are, where they came from, how far to trust them, how to run them."""

from __future__ import annotations

import json
from typing import Any

from fedswarm.client.edge.merge import RunInfo
from fedswarm.client.edge.parity import Parity
from fedswarm.client.edge.variants import JS_DTYPES

FACTS_KEY = "fedswarm"  # the front-matter key of card_facts' JSON
RUN_FACTS = ("data", "rounds", "clients", "local_steps", "aggregation", "lora_rank")  # summary.json config keys
BASE_NAMES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0)",
    "tiny": "tiny (seeded random test model)",
}


def model_card(model_name: str, run: RunInfo, parity: Parity, quantisation: dict[str, str] | None = None) -> str:
    """The model card as Markdown; every figure comes from the run's summary or parity.json.

    Its front matter (Hugging Face's place for a card's metadata) carries :func:`card_facts`
    as one JSON line, which is also YAML: the web page's facts panel reads it from there.
    """
    facts = json.dumps(card_facts(model_name, run), ensure_ascii=True)
    lines = ["---", "library_name: transformers.js", f"{FACTS_KEY}: {facts}", "---", ""]
    lines += [f"# {BASE_NAMES.get(model_name, model_name)}, federated LoRA merged, ONNX for the edge", ""]
    lines += _provenance(model_name, run)
    lines += ["", "## Privacy", "", _privacy(run), ""]
    lines += _parity_table(parity)
    if quantisation:
        lines += ["Quantisation (onnxruntime MatMulNBits):", ""]
        lines += [f"- {name}: {text}" for name, text in quantisation.items()]
        lines.append("")
    lines += _usage(parity)
    return "\n".join(lines) + "\n"


def card_facts(model_name: str, run: RunInfo) -> dict[str, Any]:
    """The card's provenance as data: base model, adapter, the run's federation and privacy (None: none known)."""
    base = BASE_NAMES.get(model_name, model_name)
    facts: dict[str, Any] = {"base_model": base, "adapter": None, "run": None, "privacy": None}
    if run.adapter is None:
        return facts
    facts["adapter"] = f"{run.adapter.parent.name}/{run.adapter.name}"
    if run.config:
        facts["run"] = {k: run.config[k] for k in RUN_FACTS if k in run.config}
    privacy = run.privacy
    if privacy and privacy.get("epsilon") is not None:
        facts["privacy"] = {k: privacy[k] for k in ("epsilon", "delta", "kind") if k in privacy}
    return facts


def _provenance(model_name: str, run: RunInfo) -> list[str]:
    cfg = run.config
    rows = [f"- Base model: {BASE_NAMES.get(model_name, model_name)}"]
    if run.adapter is None:
        rows.append("- Adapter: none (the base model as it is)")
        return ["## Provenance", "", *rows]
    rows.append(f"- Adapter: `{run.adapter.parent.name}/{run.adapter.name}`, merged into the weights (W + B·A·α/r)")
    if cfg:
        rows += [
            f"- Data: {cfg.get('data', '?')} (held-out split of {cfg.get('eval_size', '?')} examples never trained on)",
            f"- Federation: {cfg.get('rounds', '?')} rounds, {cfg.get('clients', '?')} clients, "
            f"{cfg.get('local_steps', '?')} local steps per round, partition {cfg.get('partition', '?')}",
            f"- LoRA: rank {cfg.get('lora_rank', '?')}, alpha {cfg.get('lora_alpha', '?')}",
        ]
        final = run.summary.get("final") or {}
        if final.get("eval_loss") is not None:
            accuracy = final.get("eval_accuracy")
            shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
            margin = final.get("eval_margin")
            if margin is not None:
                se = final.get("eval_margin_se") or 0.0
                shown += f" ({margin:+.3f} ± {se:.3f} over always giving the commonest label)"
            rows.append(f"- Held-out after training (PyTorch): loss {final['eval_loss']:.4f}, accuracy {shown}")
    else:
        rows.append("- Run: no summary.json beside the adapter, so data, rounds and clients are unknown")
    return ["## Provenance", "", *rows]


def _privacy(run: RunInfo) -> str:
    if run.adapter is None:
        return "Not applicable: no federated training was merged."
    privacy = run.privacy
    if not privacy or privacy.get("epsilon") is None:
        return "The run recorded no differential-privacy guarantee: treat the weights as trained on the clients' data."
    text = f"(ε = {_num(privacy.get('epsilon'))}, δ = {_num(privacy.get('delta'))})-differential privacy"
    extra = {k: v for k, v in privacy.items() if k not in ("epsilon", "delta")}
    if extra:
        text += " (" + ", ".join(f"{k} {_num(v)}" for k, v in extra.items()) + ")"
    text += ", as accounted by the run; merging and quantising are post-processing and do not change it."
    nodes = run.privacy_nodes
    if not nodes:
        return text
    rows = [
        "",
        "",
        "Each node's figures, enough to recompute its epsilon with any accountant (Poisson sampling at rate q, "
        "per-example clipping to the bound, Gaussian noise of std sigma x bound on each step's clipped sum):",
        "",
        "| node | accountant | (sigma, q, steps) | clipping bound | δ | ε |",
        "|---|---|---|---:|---:|---:|",
    ]
    for node, f in nodes.items():
        history = "; ".join(f"({_num(s)}, {_num(q)}, {int(n)})" for s, q, n in map(_composition, f.get("history", [])))
        rows.append(
            f"| {node} | {f.get('accountant', '?')} | {history} | {_num(f.get('max_grad_norm'))} "
            f"| {_num(f.get('delta'))} | {_num(f.get('epsilon'))} |"
        )
    return text + "\n".join(rows)


def _composition(entry: Any) -> tuple[float, float, int]:
    """(sigma, q, steps) of a history entry: named (``noise_multiplier``, ``sample_rate``, ``steps``) or, from runs
    written before the fields were named, a plain list in that order."""
    if isinstance(entry, dict):
        return float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"])
    sigma, q, steps = entry
    return float(sigma), float(q), int(steps)


def _parity_table(parity: Parity) -> list[str]:
    lines = [
        "## Files and parity",
        "",
        f"Each variant against the merged PyTorch model on {parity.texts} held-out texts "
        f"({parity.positions} distinct next-token predictions; PyTorch perplexity {parity.reference_perplexity:.3f}). "
        "Figures also in `parity.json`.",
        "",
        "| variant | file | size (MB) | × fp32 | next-token agreement | max logit error | mean logit error "
        "| perplexity | Δ perplexity |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in parity.variants:
        lines.append(
            f"| {v.variant} | `{v.file}` | {v.size_bytes / 1e6:.1f} | {v.size_vs_fp32:.3f} | "
            f"{v.next_token_agreement:.4f} | {v.max_logit_error:.4f} | {v.mean_logit_error:.5f} | "
            f"{v.perplexity:.3f} | {v.perplexity_change * 100:+.2f}% |"
        )
    return [*lines, ""]


def _usage(parity: Parity) -> list[str]:
    names = [v.variant for v in parity.variants]
    pick = "q4" if "q4" in names else names[-1]
    return [
        "## Run it",
        "",
        "In the browser (transformers.js, WebGPU where available, else wasm; every file served locally):",
        "",
        "```",
        "fedswarm serve-web EDGE_DIR   # then open the printed http://127.0.0.1:PORT/ address",
        "```",
        "",
        "In Python (optimum + onnxruntime):",
        "",
        "```python",
        "from optimum.onnxruntime import ORTModelForCausalLM",
        "from transformers import AutoTokenizer",
        f'model = ORTModelForCausalLM.from_pretrained("EDGE_DIR", subfolder="onnx", file_name="{_file(parity, pick)}")',
        'tokenizer = AutoTokenizer.from_pretrained("EDGE_DIR")',
        "```",
        "",
        "In JavaScript (`@huggingface/transformers`), always naming the variant's dtype:",
        "",
        "```js",
        f'const generator = await pipeline("text-generation", "EDGE_DIR", {{ dtype: "{JS_DTYPES[pick]}" }});',
        "```",
        "",
        "dtype per variant: " + ", ".join(f"{v} → `{JS_DTYPES[v]}`" for v in names) + ".",
    ]


def _file(parity: Parity, variant: str) -> str:
    return next(v.file for v in parity.variants if v.variant == variant).split("/")[-1]


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
