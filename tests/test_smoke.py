"""The bit-exactness smoke check (rlvr_optim.smoke) on the CPU: Triton under its interpreter."""

import pytest
import torch

from rlvr_optim import bitmaps, smoke
from rlvr_optim.errors import InputError


def test_triton_matches_the_reference_in_every_mode_and_cuda_says_why_it_is_skipped():
    results = smoke.check("cpu")
    assert results[0] == {"backend": "cuda", "mode": "default", "status": "skipped",
                          "detail": "needs a CUDA device"}
    triton = [r for r in results if r["backend"] == "triton"]
    assert [r["mode"] for r in triton] == list(smoke.OUR_MODES)
    assert all(r["status"] == "bit-exact" for r in triton), triton


def test_the_compared_state_includes_bitmaps_with_both_values():
    tensors = smoke._final_tensors("reference", "default", torch.device("cpu"))
    assert {"param 0", "exp_avg 0", "exp_avg_sq 0", "change_bitmap 0", "change_counts 0"} <= set(tensors)
    changed = int(bitmaps.popcount(tensors["change_bitmap 0"]))
    assert 0 < changed < smoke.SHAPES[0][0]  # a bitmap of all 0 or all 1 could hide a bug


def test_one_flipped_bit_is_reported_with_its_tensor(monkeypatch, capsys):
    real = smoke._final_tensors

    def flip_one(backend, mode, device):
        tensors = real(backend, mode, device)
        if backend == "triton":
            tensors["exp_avg_sq 1"].view(torch.int16).reshape(-1)[5] ^= 1
        return tensors

    monkeypatch.setattr(smoke, "_final_tensors", flip_one)
    monkeypatch.setattr(smoke, "OUR_MODES", {"default": smoke.OUR_MODES["default"]})
    assert smoke.main(["--device", "cpu", "--backend", "triton"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["smoke cuda (all modes): skipped: needs a CUDA device",
                   "smoke triton default: differs: exp_avg_sq 1: 1 of 231 elements differ",
                   "smoke cpu (all modes): skipped: not selected (--backend)"]


def test_bad_options_are_refused_with_the_value():
    with pytest.raises(InputError, match="--backend reference: .* choose from cuda, triton, cpu"):
        smoke.check("cpu", ["reference"])
    with pytest.raises(InputError, match="--device tpu"):
        smoke.check("tpu")
