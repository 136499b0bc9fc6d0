"""``python -m bitshard``: the same as the ``bitshard`` command (bitshard.cli)."""

import sys

from .cli import main

sys.exit(main())
