"""Generated Python code of the ``attention.v1`` protocol (``proto/generate.py``); ``_pb`` marks protocol-buffer
code."""
