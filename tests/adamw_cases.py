"""The bit-exactness cases that tests/test_csrc.py (the CUDA extension and its header on
the host), tests/test_cpu_backend.py (the CPU extension) and, for its forms,
tests/test_triton_kernels.py run against the reference, so that every compiled backend
meets the same cases. Not a test module; the tests import it from their own folder."""

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8

# (param dtype, master form, rounding): every combination the reference accepts (rounding
# only affects bf16 params).
FORMS = [
    (torch.float32, None, "nearest"),
    (torch.float32, None, "stochastic"),
    (torch.bfloat16, None, "nearest"),
    (torch.bfloat16, None, "stochastic"),
    (torch.bfloat16, "fp32", "nearest"),
    (torch.bfloat16, "fp32", "stochastic"),
    (torch.bfloat16, "remainder", "nearest"),
]
FORM_IDS = ["fp32", "fp32-sr", "bf16", "bf16-sr", "master", "master-sr", "remainder"]

FEATURES = {
    "plain": {},
    "amsgrad-freeze-nonfinite-scale": dict(amsgrad=True, freeze=True, nonfinite=True,
                                           grad_scale=3.0),
    "maximize-skip-offset-othergrad": dict(
        maximize=True, freeze=True, nonfinite=True, found_inf=(0.0, 1.0, 0.0),
        # Not a multiple of 8, so a group of 8 elements spans two Philox calls, and the
        # counter (index >> 3) crosses 2**32: its high word matters.
        element_offset=2**35 - 603,
        other_grad_dtype=True,
    ),
    "untracked-amsgrad": dict(amsgrad=True, track=False, nonfinite=True),
}
