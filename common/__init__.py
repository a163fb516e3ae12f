"""What every fedswarm role shares: config, base-model loading, data, LoRA state.

Kept import-light on purpose: heavy libraries (torch, transformers, flwr, opacus,
onnxruntime) are imported inside the functions that need them.
"""
