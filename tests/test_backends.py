"""Backend selection, and the call-level checks every backend shares."""

import pytest
import torch

from rlvr_optim import backends, reference


def _backend_functions():
    out = [pytest.param(reference.adamw, id="reference")]
    if backends.unavailable_reason("cpu") is None:
        from rlvr_optim import cpu_backend

        out.append(pytest.param(cpu_backend.adamw, id="cpu"))
    if backends.unavailable_reason("triton") is None:
        from rlvr_optim.triton_kernels import adamw as triton_adamw

        out.append(pytest.param(triton_adamw.adamw, id="triton"))
    if backends.unavailable_reason("cuda") is None:
        from rlvr_optim import cuda_backend

        out.append(pytest.param(cuda_backend.adamw, id="cuda"))
    return out


@pytest.mark.parametrize("adamw", _backend_functions())
@pytest.mark.parametrize("overrides, match", [
    (dict(rounding="up"), "rounding"),
    (dict(rounding="stochastic"), "sr_keys"),
    (dict(masters=[torch.zeros(16)], remainders=[torch.zeros(16, dtype=torch.int16)]),
     "not both"),
    (dict(remainders=[torch.zeros(16, dtype=torch.int16)], rounding="stochastic",
          sr_keys=torch.zeros(1, 2, dtype=torch.int64)), "nearest"),
    (dict(amsgrad=True), "max_exp_avg_sqs"),
    (dict(masters=[torch.zeros(16)], params=[torch.zeros(16)]), "need bf16 or float16 params"),
    (dict(scalars=torch.zeros(1, 7)), "scalars must be a float32"),
    (dict(rounding="stochastic", sr_keys=torch.zeros(1, 3, dtype=torch.int64)), "sr_keys must be"),
])
def test_every_backend_refuses_bad_calls_before_touching_a_tensor(adamw, overrides, match):
    n = 16
    args = dict(
        params=[torch.randn(n).bfloat16()], grads=[torch.randn(n).bfloat16()],
        exp_avgs=[torch.zeros(n)], exp_avg_sqs=[torch.zeros(n)],
        scalars=reference.step_scalars(torch.tensor([1]), 1e-3, 0.9, 0.999, 0.0, 1e-8),
    )
    args.update(overrides)
    param = args["params"][0]
    before = param.clone()
    with pytest.raises(ValueError, match=match):
        adamw(args.pop("params"), args.pop("grads"), args.pop("exp_avgs"),
              args.pop("exp_avg_sqs"), **args)
    assert torch.equal(param, before)
