"""In-browser decode speed of the default model's edge export: every variant on wasm and on WebGPU.

    .venv/bin/python bench/browser.py [--adapter RUN_DIR/adapter] [--edge EDGE_DIR] [--variants q4,fp32]

Exports smollm2-135m (the run's adapter merged, or the base model: speed does not depend on the
weights' values) with every variant, serves it, and has the page in headless Chromium
(tests/chromium.py, as the browser test drives it) answer one prompt per (backend, variant),
greedy, up to --tokens new tokens. Figures are the page's own: load time, first-token latency and
decode tokens/s (after the first token). Without a GPU, Chromium's WebGPU adapter is SwiftShader,
software on the CPU: those rows say so, and a real GPU will differ. No figure is asserted.
Saves a screenshot of the page after its WebGPU q4 answer (--screenshot, default docs/edge-page.png).
On 2 cores without a GPU: ~4 min to export, ~18 min in the browser (software WebGPU is slow).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="none", help="a run's adapter/ folder (default: none, the base model)")
    parser.add_argument("--edge", default=None, help="an existing EDGE_DIR to measure (default: export one)")
    parser.add_argument("--out", default=None, help="where to write EDGE_DIR (default: a temp folder)")
    parser.add_argument("--variants", default="fp32,int8,q4,q4f16", help="variants to export and measure")
    parser.add_argument("--backends", default="wasm,webgpu")
    parser.add_argument("--tokens", type=int, default=16, help="most new tokens per answer")
    parser.add_argument("--threads", type=int, default=2, help="threads for the export")
    parser.add_argument("--parity-samples", type=int, default=8, help="held-out texts for the export's parity check")
    parser.add_argument("--calibration-samples", type=int, default=64, help="training texts for GPTQ")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the page may take to load or answer")
    parser.add_argument("--screenshot", default=str(ROOT / "docs" / "edge-page.png"))
    args = parser.parse_args()

    variants = tuple(v for v in args.variants.split(",") if v)
    edge = Path(args.edge) if args.edge else export(args, variants)
    rows = measure(edge, variants, args.backends.split(","), args)
    print_table(rows, args)


def export(args: argparse.Namespace, variants: tuple[str, ...]) -> Path:
    from fedswarm.client.edge.export import export as export_edge
    from fedswarm.client.edge.merge import resolve_adapter, resolve_model
    from fedswarm.client.edge.variants import parse_quant

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-browser-"))
    run = resolve_adapter(args.adapter)
    spec = resolve_model(None, run)
    t0 = time.perf_counter()
    export_edge(
        spec, run, root / "edge", parse_quant(",".join(variants)), 0.0, args.parity_samples, 96, args.threads,
        args.calibration_samples,
    )  # fmt: skip
    print(f"exported {spec.name} ({', '.join(variants)}) to {root / 'edge'} in {time.perf_counter() - t0:.0f} s")
    return root / "edge"


def measure(edge: Path, variants: tuple[str, ...], backends: list[str], args: argparse.Namespace) -> list[dict]:
    """One page load and one answer per (backend, variant), in one Chromium; the page's state after each."""
    sys.path.insert(0, str(ROOT))  # tests/chromium.py: the browser test's driver
    from fedswarm.client.edge.serve import serve_in_thread
    from tests.chromium import Chromium, PageError

    server, url = serve_in_thread(edge)
    rows = []
    limits = {name: str(args.timeout) for name in ("loadTimeout", "firstTokenTimeout", "wasmTimeout")}
    try:
        with Chromium(Path(tempfile.mkdtemp(prefix="bench-chromium-"))) as browser:
            tab = browser.tab
            for backend in backends:
                for variant in variants:
                    tab.open(url + "?" + urlencode({"device": backend, "variant": variant, **limits}))
                    try:
                        state = tab.ask(PROMPT, args.tokens, timeout=2 * args.timeout)
                    except PageError as exc:
                        rows.append({"asked": (backend, variant), "failed": str(exc).split(";")[0]})
                        continue
                    rows.append({"asked": (backend, variant), **state})
                    print(f"{backend} {variant}: {state['last']['tokensPerSecond']:.1f} tokens/s", flush=True)
                    if (backend, variant) == ("webgpu", "q4") and args.screenshot:
                        print(f"screenshot: {tab.screenshot(Path(args.screenshot))}")
    finally:
        server.shutdown()
        server.server_close()
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\nin-browser greedy decode, headless Chromium, page's own figures; prompt {PROMPT[0]['content']!r}, "
        f"up to {args.tokens} new tokens; tokens/s after the first token"
    )
    header = "backend                                | variant | load s | first token s | new tokens | tokens/s"
    print(header)
    print("-" * len(header))
    for row in rows:
        backend, variant = row["asked"]
        if "failed" in row:
            print(f"{backend:38} | {variant:7} | failed: {row['failed']}")
            continue
        label = backend_label(row) if not row["fallback"] else f"{backend} -> wasm (fallback, see below)"
        last = row["last"]
        print(
            f"{label:38} | {row['variant']:7} | {row['loadSeconds']:6.1f} | {last['firstTokenSeconds']:12.2f} "
            f"| {len(last['newIds']):10d} | {last['tokensPerSecond']:8.2f}"
        )
    for row in rows:
        if row.get("fallback"):
            print(f"asked {' '.join(row['asked'])}: {row['fallback']}")
    adapters = {tuple(sorted(r["adapter"].items())) for r in rows if r.get("adapter")}
    for adapter in adapters:
        print("WebGPU adapter: " + ", ".join(f"{k} {v!r}" for k, v in adapter))


def backend_label(row: dict) -> str:
    if row["backend"] != "webgpu":
        return "wasm (CPU)"
    adapter = row["adapter"] or {}
    if adapter.get("architecture") == "swiftshader":
        return "software WebGPU (SwiftShader)"
    kind = "software WebGPU" if adapter.get("software") else "WebGPU"
    return f"{kind} ({adapter.get('vendor', '?')} {adapter.get('architecture', '?')})"


if __name__ == "__main__":
    main()
