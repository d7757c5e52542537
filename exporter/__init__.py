"""Checkpoint → ONNX graphs + manifest, refused unless the graphs reproduce PyTorch."""
