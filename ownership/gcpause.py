"""Pausing the cyclic garbage collector around bulk parsing.

Parsing a checkpoint's header or pickle makes tens of thousands of small acyclic objects; each allocation burst
triggers collections that scan them all again, which cost more than the parsing itself. Reference counting
still frees everything; only the cycle search waits until the block ends.

Example:
    >>> import gc
    >>> with paused_gc():
    ...     gc.isenabled()
    False
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block, restoring its previous state after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
