"""Command-line client (``attn``) for the attention server; talks to it over gRPC only."""
