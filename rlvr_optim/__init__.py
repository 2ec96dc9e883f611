"""rlvr_optim: AdamW (and Adam) that show and control what bf16 storage does to each update.

See README.md for the modes and ``rlvr_optim.reference`` for the exact numerics.
"""

import importlib

from . import bitmaps, distributed, patch, reference
from .optimizer import Adam, AdamW, format_table

__all__ = [
    "Adam", "AdamW", "bitmaps", "distributed", "format_table", "integrations", "patch",
    "reference",
]
__version__ = "0.1.0"

# Imported on first use: ``integrations`` imports transformers (seconds), which neither
# ``import rlvr_optim`` nor the command line's ``--help`` should wait for.
_LAZY_SUBMODULES = ("integrations",)


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
