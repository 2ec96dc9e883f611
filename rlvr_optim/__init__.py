"""rlvr_optim: AdamW that shows and controls what bf16 storage does to each update.

See README.md for the modes and ``rlvr_optim.reference`` for the exact numerics.
"""

from . import bitmaps, distributed, reference
from .optimizer import AdamW, format_table
from . import integrations, patch  # noqa: E402 - they build on AdamW

__all__ = [
    "AdamW", "bitmaps", "distributed", "format_table", "integrations", "patch", "reference",
]
__version__ = "0.1.0"
