"""Errors that a command-line user can fix.

A function that finds bad input it can name (a file that is not a checkpoint, two
checkpoints with nothing in common, a device this machine lacks, an option value out of
range) raises :class:`InputError` with a message that names the file or option and says
what to do. The ``rlvr-optim`` command prints such a message as one line on stderr and
exits with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "check_device"]


class InputError(ValueError):
    """Bad input the user can fix; ``str(error)`` is the whole message for them."""


def check_device(option: str, text):
    """The ``torch.device`` that ``text`` names, or InputError if this machine lacks it.

    Args:
        option: the option that gave it (e.g. ``"--device"``), named in the message.
        text: a device name or ``torch.device``; None passes through as None.
    """
    if text is None:
        return None
    import torch  # noqa: PLC0415 - errors.py itself stays import-light

    fix = f"use {option} cpu, or {option} cuda on a machine with a CUDA GPU"
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise InputError(f"{option} {text} is not a device name; {fix}") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"{option} {text}: only cpu and cuda devices are supported; {fix}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{option} {text}: this machine has no CUDA device (or torch "
                             f"{torch.__version__} was built without CUDA); use {option} cpu")
        if device.index is not None and device.index >= count:
            raise InputError(f"{option} {text}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return device
