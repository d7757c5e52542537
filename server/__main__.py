"""``python -m server``: the same as ``attn-serve``."""

import sys

from server.cli import main

sys.exit(main())
