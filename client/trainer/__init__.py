"""The training node: Flower ClientApp that fine-tunes LoRA on local data."""
