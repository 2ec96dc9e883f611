"""rlvr_optim: AdamW that shows and controls what bf16 storage does to each update.

See README.md for the modes and ``rlvr_optim.reference`` for the exact numerics.
"""

from . import bitmaps, reference
from .optimizer import AdamW, format_table

__all__ = ["AdamW", "bitmaps", "format_table", "reference"]
__version__ = "0.1.0"
