"""Whether the files a long command writes at its end can go where it was told, asked before its work starts."""

from __future__ import annotations

import tempfile
from pathlib import Path


def why_unwritable(folder: Path) -> str | None:
    """Why no file can be written in ``folder`` (made, when missing, below the nearest folder already there), or
    None when one can: that folder's path is not a folder, or a file made in it fails (its reason)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:  # the rest will be made below it
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):  # the only sure test, whoever runs it (root passes os.access)
            pass
    except OSError as error:
        return str(error.strerror or error)
    return None
