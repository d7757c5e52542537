"""``attn-serve``: the gRPC server on the models under ``ATTN_MODELS_DIR`` (see ``attn-serve --help``)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from server import logs
from server.app import serve
from server.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_sources(argv)
    logs.configure(settings.log_level, settings.log_format)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
