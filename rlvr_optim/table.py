"""The step table's row layout and the counters, read from ``csrc/step_table.h``.

That header defines them once for every fused backend: the CUDA kernel and the CPU step
compile it, the Triton kernel and the planner read the names here. Imports nothing of the
package (a leaf module).

- :data:`ROW_FIELDS`: the int64 fields of a row, in order; :data:`ROW` maps a name to its
  index;
- :data:`COUNTER_NAMES`: the per-tensor counters a step writes, in order;
- :data:`LAYOUT_BITS`: the bits of the ``layout`` field (``kLayoutParamBf16`` is
  ``"param_bf16"``).

The compiled extensions export the same names (``ROW_FIELDS``, ``COUNTER_NAMES``,
``LAYOUT_BITS``); a build whose names differ from these is not used.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["COUNTER_NAMES", "LAYOUT_BITS", "ROW", "ROW_FIELDS", "header_path"]

HEADER = "step_table.h"


def header_path() -> Path:
    """csrc/step_table.h beside the package (installed as package data) or in the checkout."""
    here = Path(__file__).resolve().parent
    for folder in (here / "csrc", here.parent / "csrc"):
        if (folder / HEADER).is_file():
            return folder / HEADER
    raise FileNotFoundError(f"csrc/{HEADER} is neither installed with rlvr_optim nor beside it")


def _x_macro(text: str, name: str) -> tuple[str, ...]:
    """The X(...) names of ``#define name(X)``, a macro continued over lines by backslashes."""
    found = re.search(rf"#define {name}\(X\)((?:[^\n]*\\\n)*[^\n]*)", text)
    if found is None:
        raise ValueError(f"{HEADER} defines no {name}(X)")
    body = re.sub(r"/\*.*?\*/", "", found.group(1))
    return tuple(re.findall(r"\bX\((\w+)\)", body))


def _layout_bits(text: str) -> dict[str, int]:
    bits = {}
    for camel, value in re.findall(r"constexpr int64_t kLayout(\w+) = (\d+);", text):
        bits[re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()] = int(value)
    return bits


_TEXT = header_path().read_text()
ROW_FIELDS: tuple[str, ...] = _x_macro(_TEXT, "RLVR_ROW_FIELDS")
ROW: dict[str, int] = {name: i for i, name in enumerate(ROW_FIELDS)}
COUNTER_NAMES: tuple[str, ...] = _x_macro(_TEXT, "RLVR_COUNTERS")
LAYOUT_BITS: dict[str, int] = _layout_bits(_TEXT)
del _TEXT
