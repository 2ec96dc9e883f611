"""Triton kernels of rlvr_optim, installed as ``rlvr_optim.triton_kernels``.

``adamw`` holds the fused AdamW step (:func:`rlvr_optim.triton_kernels.adamw.adamw`), with
the keyword signature of :func:`rlvr_optim.reference.adamw`, equal to it bit for bit. On CPU
it runs only under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported).
"""
