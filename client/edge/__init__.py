"""Edge export: a run's adapter merged into its base model, as quantised ONNX for devices and the browser."""
