"""One optimizer step per (backend, mode) on a flat 2**26-element bf16 tensor, for a profiler
to look at (bench/gpu_check.sh runs it under ``ncu --section SpeedOfLight`` with PROFILE=1):
torch's fused AdamW first, then our default, stochastic-rounding and fp32-master modes with
per-step change tracking on each fused backend. Each of our steps is one kernel launch
(one tensor, one layout group). Every configuration takes two steps and ncu reports both
launches: read the second, the steady state.

    ncu --clock-control none --section SpeedOfLight --kernel-name 'regex:adamw|Adam' \\
        python3 bench/profile_step.py
"""

import torch

from rlvr_optim import AdamW, backends

NUMEL = 1 << 26
MODES = {
    "default": {},
    "sr + fp32 states": {"rounding": "stochastic", "state_dtype": torch.float32},
    "fp32 master": {"master_weights": "fp32"},
}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device")
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)

    def param():
        p = (torch.randn(NUMEL, generator=gen, device=device) * 0.02).bfloat16().requires_grad_()
        p.grad = (torch.randn(NUMEL, generator=gen, device=device) * 1e-3).bfloat16()
        return p

    p = param()
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    for _ in range(2):
        opt.step()
    del p, opt
    for backend in ("cuda", "triton"):
        if backends.unavailable_reason(backend) is not None:
            print(f"{backend}: unavailable ({backends.unavailable_reason(backend)})")
            continue
        for mode, options in MODES.items():
            p = param()
            opt = AdamW([p], lr=1e-4, backend=backend, track_changes="step", **options)
            for _ in range(2):
                opt.step()
            torch.cuda.synchronize()
            print(f"profiled: {backend} {mode}", flush=True)
            del p, opt
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
