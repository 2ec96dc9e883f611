"""Precision ablations: RLVR vs SFT under bf16 storage modes, with the paper's measures.

``run_ablation(preset("tiny"), "out")`` or ``rlvr-optim ablate --preset tiny``.
"""

from .ablate import format_summary, run_ablation, run_for_cli
from .config import PRESETS, Arm, LMAblation, MiniLMAblation, RunSpec, preset

__all__ = ["Arm", "LMAblation", "MiniLMAblation", "PRESETS", "RunSpec", "format_summary",
           "preset", "run_ablation", "run_for_cli"]
