"""Keeps gRPC's C core from logging to ``attn``'s stderr: imported by :mod:`client.cli` before anything imports grpc.

Left to itself the C core writes lines of its own to stderr for what the command then reports in one ``attn:`` line
(a TLS client meeting a plaintext server: "I0000 ... ssl_transport_security.cc ... Handshake failed ..."). It reads
``GRPC_VERBOSITY`` once, when grpc is imported, so the variable is set to NONE for that import only and taken away
again (the processes a program that imports :mod:`client.cli` starts keep their logs). A ``GRPC_VERBOSITY`` the user
set is left as it is: with it, the C core's lines are back.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "GRPC_VERBOSITY"

if "grpc" not in sys.modules and VARIABLE not in os.environ:
    os.environ[VARIABLE] = "NONE"
    try:
        import grpc  # noqa: F401
    finally:
        del os.environ[VARIABLE]
