"""Triton kernels of rlvr_optim, installed as ``rlvr_optim.triton_kernels``.

The fused AdamW kernel arrives with the Triton backend; until then this package is empty
and ``backend="triton"`` reports that it is not available.
"""
