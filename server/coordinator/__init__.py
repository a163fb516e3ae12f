"""The federated coordinator: Flower ServerApp, LoRA strategy, checkpoints and metrics."""
