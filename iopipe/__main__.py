"""``python -m iopipe``: the ``iopipe`` command (see iopipe/probe/cli.py)."""

from __future__ import annotations

import sys

from .probe.cli import main

if __name__ == "__main__":
    sys.exit(main())
