"""Sparse weight patches: encoding, optimizer-driven chains, refusals, the CLI."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlvr_optim import AdamW, bitmaps
from rlvr_optim.cli import main
from rlvr_optim.patch import (
    PatchError, apply_patch, apply_patches, changes_from_optimizer, decode_indices,
    encode_indices, load_patch, make_patch, weights_checksum,
)


def _bits(weights):
    return {k: v.detach().view(torch.int16).clone() for k, v in weights.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ index coding


@pytest.mark.parametrize("seed", [0, 1])
def test_gap_encoding_round_trips_and_uses_one_byte_for_short_gaps(seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.nonzero(torch.rand(5000, generator=g) < 0.3).reshape(-1)
    sparse = torch.tensor([0, 1, 2, 200, 2**14 + 200, 2**40, 2**40 + 1, 2**62])
    for indices in (dense, sparse, torch.zeros(0, dtype=torch.int64), torch.tensor([7])):
        data = encode_indices(indices)
        assert data.dtype == torch.uint8
        assert torch.equal(decode_indices(data, indices.numel()), indices)
    # Gaps below 128 take one byte each: 30% density gives gaps of ~3.
    assert encode_indices(dense).numel() <= dense.numel() * 1.01
    assert encode_indices(torch.tensor([0, 1, 2, 129])).tolist() == [0, 0, 0, 126]
    assert encode_indices(torch.tensor([128])).tolist() == [0x80, 0x01]


def test_bad_index_data_is_refused():
    with pytest.raises(PatchError, match="ends inside a number"):
        decode_indices(torch.tensor([0x80], dtype=torch.uint8))
    with pytest.raises(PatchError, match="holds 2 indices, expected 3"):
        decode_indices(torch.tensor([1, 2], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="strictly ascending"):
        encode_indices(torch.tensor([3, 3]))


# ------------------------------------------------------------------ a chain from the optimizer


def _model():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.bfloat16()


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def chain():
    """Base weights, 4 steps' patches made from the optimizer's bitmaps, final weights."""
    model = _model()
    opt = AdamW(model.named_parameters(), lr=2e-3, track_changes="step", rounding="stochastic")
    g = torch.Generator().manual_seed(1)
    base = _weights(model)
    checksum = weights_checksum(base)
    patches, diffs = [], []
    for step in range(1, 5):
        before = _weights(model)
        model(torch.randn(8, 16, generator=g).bfloat16()).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        changed = changes_from_optimizer(opt, model.named_parameters())
        patch = make_patch(_weights(model), changed=changed, base_checksum=checksum,
                           sequence=step)
        checksum = patch.checksum
        patches.append(patch)
        diffs.append(make_patch(_weights(model), base=before, sequence=step))
    return {"base": base, "final": _weights(model), "patches": patches, "diffs": diffs}


def test_patches_applied_in_order_give_bit_identical_weights(chain, tmp_path):
    weights = {k: v.clone() for k, v in chain["base"].items()}
    for i, patch in enumerate(chain["patches"]):
        patch.save(tmp_path / f"{i}.safetensors")
    loaded = [load_patch(tmp_path / f"{i}.safetensors") for i in range(4)]
    for patch in loaded:
        assert apply_patch(weights, patch) == patch.checksum
    assert _same(_bits(weights), _bits(chain["final"]))
    assert not _same(_bits(chain["base"]), _bits(chain["final"]))


def test_bitmap_patches_equal_snapshot_diffs(chain):
    for from_bitmaps, from_diff in zip(chain["patches"], chain["diffs"]):
        assert from_bitmaps.indices.keys() == from_diff.indices.keys()
        for name in from_diff.indices:
            assert torch.equal(from_bitmaps.indices[name], from_diff.indices[name])
            assert torch.equal(from_bitmaps.values[name].view(torch.int16),
                               from_diff.values[name].view(torch.int16))
        assert from_bitmaps.checksum == from_diff.checksum
        assert from_bitmaps.base_checksum == from_diff.base_checksum


def test_patch_size_report(chain):
    for patch in chain["patches"]:
        report = patch.report()
        assert report["full_bytes"] == 2 * report["numel"] == 2 * sum(
            t.numel() for t in chain["base"].values())
        assert 0 < report["changed"] < report["numel"]
        # 2 value bytes + ~1 index byte per change, plus the header (names, checksums).
        payload = report["patch_bytes"] - 2 * report["changed"]
        assert report["changed"] <= payload <= 1.2 * report["changed"] + 2500
        assert report["patch_to_full"] == report["patch_bytes"] / report["full_bytes"]


# ------------------------------------------------------------------ refusals


def test_wrong_base_is_refused_and_weights_untouched(chain):
    other = {k: v.clone() for k, v in chain["base"].items()}
    other["0.bias"][3] = other["0.bias"][3] + 1
    before = _bits(other)
    with pytest.raises(PatchError, match="applies to weights .* these weights are"):
        apply_patch(other, chain["patches"][0])
    assert _same(_bits(other), before)


def test_out_of_order_is_refused_and_weights_untouched(chain):
    weights = {k: v.clone() for k, v in chain["base"].items()}
    before = _bits(weights)
    p1, p2, p3 = chain["patches"][:3]
    with pytest.raises(PatchError, match=r"out of order: patch 1 \(sequence 1\)"):
        apply_patches(weights, [p2, p1])
    with pytest.raises(PatchError, match="sequence 2 applies to weights"):
        apply_patch(weights, p2)  # skips patch 1
    assert _same(_bits(weights), before)
    apply_patch(weights, p1)
    after_one = _bits(weights)
    with pytest.raises(PatchError, match="what sequence 1 produces \\(already applied\\)"):
        apply_patch(weights, p1)
    with pytest.raises(PatchError, match="sequence 3 applies"):
        apply_patch(weights, p3)
    assert _same(_bits(weights), after_one)


def test_corrupt_patch_is_refused_and_weights_untouched(chain):
    weights = {k: v.clone() for k, v in chain["base"].items()}
    before = _bits(weights)
    patch = chain["patches"][0]
    name = next(iter(patch.values))
    bad = make_patch(chain["final"], base=chain["base"], sequence=1)  # a different result
    bad.checksum = patch.checksum
    with pytest.raises(PatchError, match="a patch is corrupt"):
        apply_patch(weights, bad)
    shape_mismatch = {k: v.clone() for k, v in weights.items()}
    shape_mismatch[name] = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(PatchError, match=f"tensor {name!r} is 3 x"):
        apply_patch(shape_mismatch, patch)
    assert _same(_bits(weights), before)


def test_bitmaps_that_miss_changes_are_refused(chain):
    nothing = {k: torch.zeros(bitmaps.bitmap_bytes(v.numel()), dtype=torch.uint8)
               for k, v in chain["base"].items()}
    with pytest.raises(ValueError, match="change bits are 0"):
        make_patch(chain["final"], base=chain["base"], changed=nothing, sequence=4)
    with pytest.raises(ValueError, match="base_checksum"):
        make_patch(chain["final"], changed=nothing, sequence=4)


def test_fp32_weights_patch_by_diff():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(37, generator=g), "b": torch.randn(2, 3, generator=g)}
    new = {k: v.clone() for k, v in base.items()}
    new["w"][[0, 5, 36]] += 1e-6
    new["b"][1, 2] = float("nan")
    patch = make_patch(new, base=base, sequence=9)
    assert patch.changed == 4 and patch.full_bytes == 4 * 43
    target = {k: v.clone() for k, v in base.items()}
    apply_patch(target, patch)
    assert all(torch.equal(target[k].view(torch.int32), new[k].view(torch.int32)) for k in new)


# ------------------------------------------------------------------ the command line


def test_cli_make_and_apply(chain, tmp_path, capsys):
    base, final = tmp_path / "base.safetensors", tmp_path / "final.safetensors"
    save_file(chain["base"], base, metadata={"format": "pt"})
    steps = [chain["base"]]
    for i, patch in enumerate(chain["patches"]):  # rebuild each step's checkpoint
        w = {k: v.clone() for k, v in steps[-1].items()}
        apply_patch(w, patch)
        steps.append(w)
        save_file(w, tmp_path / f"step{i + 1}.safetensors")
    save_file(chain["final"], final)
    for i in range(1, 3):
        bitmap_file = tmp_path / f"bitmaps{i}.safetensors"
        changed = {k: bitmaps.pack(_bits(steps[i])[k] != _bits(steps[i - 1])[k])
                   for k in steps[i]}
        bitmaps.save_bitmaps(bitmap_file, changed, {k: v.numel() for k, v in steps[i].items()})
        args = ["patch", "make", str(tmp_path / f"step{i - 1}.safetensors") if i > 1 else str(base),
                str(tmp_path / f"step{i}.safetensors"), "-o", str(tmp_path / f"p{i}.safetensors"),
                "--sequence", str(i)]
        assert main(args + (["--bitmaps", str(bitmap_file)] if i == 2 else [])) == 0
        out = capsys.readouterr().out
        assert f"sequence {i}: {chain['patches'][i - 1].changed} of" in out
        assert f"full checkpoint {chain['patches'][i - 1].full_bytes} bytes" in out
    result = tmp_path / "out.safetensors"
    assert main(["patch", "apply", str(base), str(tmp_path / "p1.safetensors"),
                 str(tmp_path / "p2.safetensors"), "-o", str(result)]) == 0
    assert _same(_bits(load_file(result)), _bits(steps[2]))

    refused = tmp_path / "refused.safetensors"
    assert main(["patch", "apply", str(base), str(tmp_path / "p2.safetensors"),
                 str(tmp_path / "p1.safetensors"), "-o", str(refused)]) == 2
    assert "out of order" in capsys.readouterr().err
    assert main(["patch", "apply", str(final), str(tmp_path / "p1.safetensors"),
                 "-o", str(refused)]) == 2
    assert "applies to weights" in capsys.readouterr().err
    assert not refused.exists()


def test_sparse_step_patch_is_a_fraction_of_the_checkpoint():
    # 5% of 131k bf16 weights changed: 2 value bytes + 1 gap byte (mean gap 20 < 128)
    # per change, so about 3 * 0.05 / 2 = 7.5% of the checkpoint, plus the header.
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(512, 256, generator=g).bfloat16()}
    new = {"w": base["w"].clone()}
    flat = new["w"].view(-1)
    changed = torch.rand(flat.numel(), generator=g) < 0.05
    flat[changed] = (flat[changed].float() * 1.01).bfloat16()
    report = make_patch(new, base=base, sequence=1).report()
    assert report["changed"] == int((_bits(new)["w"] != _bits(base)["w"]).sum())
    assert 0.07 < report["patch_to_full"] < 0.08
