"""Errors that a command-line user can fix.

A function that finds bad input it can name (a file that is not a checkpoint, two
checkpoints with nothing in common, a device this machine lacks, an option value out of
range) raises :class:`InputError` with a message that names the file or option and says
what to do. The ``rlvr-optim`` command prints such a message as one line on stderr and
exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input the user can fix; ``str(error)`` is the whole message for them."""
