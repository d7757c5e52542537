"""``attn-serve``: the gRPC server on the models under ``ATTN_MODELS_DIR`` (see ``attn-serve --help``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from server import logs
from server.app import serve
from server.processes import frontend_count, supervise
from server.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_sources(argv)
    logs.configure(settings.log_level, settings.log_format)
    if frontend_count(settings) == 0:
        return asyncio.run(serve(settings))  # everything in this process
    return supervise(settings)


if __name__ == "__main__":
    sys.exit(main())
