"""`python -m ownership`: the command line."""

from __future__ import annotations

import sys

from ownership.cli.commands import main

sys.exit(main())
