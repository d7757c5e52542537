"""Writing the pictures of ``--heatmap`` and ``--overlay``: PNG where the path has no extension, the extension's
format otherwise, and one ``attn:`` line, not a traceback, for a file that cannot be written."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def writing(path: Path) -> Iterator[str | None]:
    """Yields the format to hand the writer: ``"png"`` for a path without an extension (matplotlib would otherwise
    add ``.png`` to the name, and PIL refuse it), None to let the extension choose. A folder that does not exist, a
    file that may not be written or an extension no writer knows ends the command with the reason (exit status 1);
    the answer is already printed by then. A folder is refused as one, whatever its name's extension."""
    if path.is_dir():
        raise SystemExit(f"attn: cannot write {path}: {os.strerror(errno.EISDIR)}")
    try:
        yield None if path.suffix else "png"
    except (OSError, ValueError) as exc:  # PIL and matplotlib refuse an unknown extension with a ValueError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SystemExit(f"attn: cannot write {path}: {reason}") from exc
