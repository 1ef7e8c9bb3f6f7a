"""The command line (`ownership ...`, `python -m ownership ...`): every command, its rendering, and the demo.

Example:
    >>> main(["schema"]) == 0  # doctest: +ELLIPSIS
    {
    ...
    True
"""

from __future__ import annotations

from ownership.cli.commands import main

__all__ = ["main"]
