"""What an exported model directory contains, as the server and the exporter both read it."""

from server.artifacts.manifest import DecoderBinding, GraphSpec, Manifest, ManifestError, TensorSpec
from server.artifacts.tokenizer import Token, Tokenizer

__all__ = ["DecoderBinding", "GraphSpec", "Manifest", "ManifestError", "TensorSpec", "Token", "Tokenizer"]
