"""Tests of rlvr_optim.analysis: the paper's measurements on pairs of checkpoints.

Ground truths: counts of elements changed on purpose, numpy's SVD, numpy's sort, and the
independent-Bernoulli expectations of random masks.
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlvr_optim import AdamW, analysis, bitmaps, cli

SEEDS = [0, 1, 2024]


def _state(seed: int) -> dict[str, torch.Tensor]:
    """A small model-shaped state dict: two blocks of bf16 matrices, fp32 norms, a head."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(2):
        out[f"model.layers.{layer}.self_attn.q_proj.weight"] = (
            0.05 * torch.randn(24, 16, generator=gen)).bfloat16()
        out[f"model.layers.{layer}.mlp.up_proj.weight"] = (
            0.05 * torch.randn(40, 16, generator=gen)).bfloat16()
        norm = 1 + 0.1 * torch.randn(16, generator=gen)
        out[f"model.layers.{layer}.input_layernorm.weight"] = norm
    out["lm_head.weight"] = (0.05 * torch.randn(10, 16, generator=gen)).bfloat16()
    return out


def _next_bf16(t: torch.Tensor) -> torch.Tensor:
    """Each value's neighbour one bf16 ULP away (bits + 1): a distinct bf16 value."""
    bits = analysis.bf16_bits(t)
    return (bits + 1).view(torch.bfloat16).to(t.dtype)


def _change(state, seed: int, k_per_tensor: int):
    """A copy of ``state`` with exactly k elements per tensor moved to another bf16 value."""
    gen = torch.Generator().manual_seed(seed)
    tuned, changed = {}, {}
    for name, t in state.items():
        flat = t.clone().reshape(-1)
        idx = torch.randperm(flat.numel(), generator=gen)[:k_per_tensor]
        flat[idx] = _next_bf16(flat[idx])
        tuned[name] = flat.reshape(t.shape)
        changed[name] = idx
    return tuned, changed


# --------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize("seed", SEEDS)
def test_checkpoint_against_itself_is_fully_unchanged(seed, tmp_path):
    state = _state(seed)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    for base, tuned in ((state, state), (path, path), (tmp_path, state)):
        result = analysis.update_sparsity(base, tuned)
        overall = result["overall"]
        assert overall["numel"] == sum(t.numel() for t in state.values())
        assert overall["unchanged"] == overall["numel"]
        assert overall["sparsity"] == 1.0 and overall["sparsity_atol"] == 1.0
        assert overall["tensors"] == len(state)
        assert result["skipped"] == []


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 5])
def test_known_changes_are_counted_exactly(seed, k):
    state = _state(seed)
    tuned, _ = _change(state, seed + 100, k)
    result = analysis.update_sparsity(state, tuned)
    for row in result["tensors"]:
        assert row["unchanged"] == row["numel"] - k, row["name"]
    by_module = {r["module"]: r for r in result["modules"]}
    assert by_module["self_attn.q_proj.weight"]["unchanged"] == 2 * (24 * 16 - k)
    assert by_module["lm_head.weight"]["unchanged"] == 10 * 16 - k
    by_layer = {r["layer"]: r for r in result["layers"]}
    assert by_layer[0]["numel"] == 24 * 16 + 40 * 16 + 16
    assert by_layer[0]["unchanged"] == by_layer[0]["numel"] - 3 * k
    assert by_layer[None]["unchanged"] == 10 * 16 - k
    n = result["overall"]["numel"]
    assert result["overall"]["unchanged"] == n - k * len(state)
    assert result["overall"]["sparsity"] == (n - k * len(state)) / n


def test_streaming_readers_agree_with_state_dicts(tmp_path):
    """Sharded safetensors with an index, a single file, and a torch .bin give the same rows."""
    state = _state(3)
    tuned, _ = _change(state, 4, 7)
    names = list(state)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tuned[n] for n in part}, str(shard_dir / file))
        weight_map.update({n: file for n in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shard_dir / "config.json").write_text("{}")
    torch.save(state, tmp_path / "pytorch_model.bin")
    expected = analysis.update_sparsity(state, tuned)["tensors"]
    got = analysis.update_sparsity(tmp_path / "pytorch_model.bin", shard_dir)["tensors"]

    def key(rows):
        return sorted((r["name"], r["unchanged"], r["unchanged_atol"]) for r in rows)

    assert key(got) == key(expected)


def test_missing_and_reshaped_tensors_are_skipped_and_named():
    state = _state(0)
    tuned = dict(state)
    del tuned["lm_head.weight"]
    tuned["model.layers.0.mlp.up_proj.weight"] = torch.zeros(8, 16).bfloat16()
    tuned["extra.weight"] = torch.zeros(3)
    result = analysis.update_sparsity(state, tuned)
    reasons = {r["name"]: r["reason"] for r in result["skipped"]}
    assert reasons["lm_head.weight"] == "only in base"
    assert reasons["extra.weight"] == "only in tuned"
    assert "shape" in reasons["model.layers.0.mlp.up_proj.weight"]
    assert result["overall"]["tensors"] == len(state) - 2


def test_absolute_tolerance_disagrees_with_bits_in_both_directions():
    """|delta| <= 1e-5 misses one-ULP moves of small weights and counts nothing else."""
    w0 = torch.tensor([1e-4, 1e-4, 0.5, 0.5, 3.0]).bfloat16()
    w1 = w0.clone()
    w1[0] = _next_bf16(w0[0:1])[0]           # moves by ~5e-7: bits differ, |delta| tiny
    w1[2] = _next_bf16(w0[2:3])[0]           # moves by 2**-8: both tests see it
    result = analysis.update_sparsity({"w": w0}, {"w": w1})["overall"]
    assert result["unchanged"] == 3
    assert result["unchanged_atol"] == 4


# --------------------------------------------------------------------------- eta = 1e-3


def _random_finite_bf16(rng, n):
    bits = rng.integers(0, 2**16, size=n, dtype=np.int64).astype(np.uint16)
    exponent = (bits >> 7) & 0xFF
    bits = bits[exponent != 0xFF]                      # drop inf and NaN
    return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16)


def _edge_pairs():
    """Pairs at the edges of the proof: binade boundaries, subnormals, zeros, signs."""
    values = [0.0, -0.0]
    for e in (-133, -127, -126, -125, -10, -1, 0, 5, 126, 127):
        values += [2.0**e, -(2.0**e)]
    w0 = torch.tensor(values, dtype=torch.float32).bfloat16()
    bits = analysis.bf16_bits(w0)
    lower = (bits - 1).view(torch.bfloat16)            # the next value towards zero
    upper = (bits + 1).view(torch.bfloat16)            # the next value away from zero
    keep = torch.isfinite(upper.float())
    pairs0 = torch.cat([w0, w0[keep], w0, w0])
    pairs1 = torch.cat([lower, upper[keep], w0, -w0])
    return pairs0, pairs1


@pytest.mark.parametrize("seed", SEEDS)
def test_relative_test_with_eta_1e_3_is_bit_equality(seed):
    rng = np.random.default_rng(seed)
    a = _random_finite_bf16(rng, 20000)
    neighbours = (analysis.bf16_bits(a) + torch.from_numpy(
        rng.choice([-1, 1], size=a.numel()).astype(np.int16))).view(torch.bfloat16)
    same_bits = a.clone()
    b = _random_finite_bf16(rng, a.numel() * 2)[: a.numel()]
    e0, e1 = _edge_pairs()
    w0 = torch.cat([a, a, a, e0])
    w1 = torch.cat([neighbours, same_bits, b, e1])
    finite = torch.isfinite(w0.float()) & torch.isfinite(w1.float())
    w0, w1 = w0[finite], w1[finite]
    bitwise = analysis.unchanged_bitwise(w0, w1)
    relative = analysis.unchanged_relative(w0, w1, eta=1e-3)
    signed_zeros = (w0.float() == 0) & (w1.float() == 0) & ~bitwise
    assert signed_zeros.any()                         # the edge case is in the sample
    assert torch.equal(relative, bitwise | signed_zeros)
    assert bitwise.sum() > 0 and (~bitwise).sum() > 0
    # Any eta below 2**-8 gives the same test; 2**-8 itself counts the lower neighbour of a
    # power of two as unchanged, and a larger eta more: the test above can fail.
    assert torch.equal(analysis.unchanged_relative(w0, w1, eta=0.999 * 2**-8),
                       bitwise | signed_zeros)
    at_gap = analysis.unchanged_relative(w0, w1, eta=2**-8)
    assert (at_gap & ~bitwise & ~signed_zeros).any()


def test_relative_test_edge_cases_named_in_the_docstring():
    pz, nz = torch.tensor([0.0]).bfloat16(), torch.tensor([-0.0]).bfloat16()
    assert not analysis.unchanged_bitwise(pz, nz).item()
    assert analysis.unchanged_relative(pz, nz).item()
    nan = torch.tensor([float("nan")]).bfloat16()
    assert analysis.unchanged_bitwise(nan, nan).item()
    assert not analysis.unchanged_relative(nan, nan).item()
    inf, one = torch.tensor([float("inf")]).bfloat16(), torch.tensor([1.0]).bfloat16()
    assert analysis.unchanged_relative(inf, one).item()
    assert not analysis.unchanged_bitwise(inf, one).item()


def test_fp32_tensors_are_compared_on_bf16_images():
    w0 = torch.tensor([1.0, 1.0, 1.0])
    w1 = torch.tensor([1.0 + 2**-12, 1.0 + 2**-7, 1.0])   # moves under and over half a ULP
    assert analysis.unchanged_bitwise(w0, w1).tolist() == [True, False, True]


def _below_bf16_pair(dtype, n=64, k=5, seed=0):
    """Weights in [1, 2) and a copy with ``k`` of them moved one float16 ULP (2**-10):
    below half a bf16 ULP (2**-8 here), so bf16 images do not show it."""
    g = torch.Generator().manual_seed(seed)
    w0 = (1 + torch.rand(n, generator=g)).half()
    bits = w0.clone().view(torch.int16)
    moved = torch.randperm(n, generator=g)[:k]
    bits[moved] += 1
    w1 = bits.view(torch.float16)
    return w0.to(dtype), w1.to(dtype), moved


def test_float16_checkpoints_are_compared_on_their_own_bits():
    w0, w1, moved = _below_bf16_pair(torch.float16)
    changed = ~analysis.unchanged_bitwise(w0, w1)
    assert sorted(torch.nonzero(changed).reshape(-1).tolist()) == sorted(moved.tolist())
    result = analysis.update_sparsity({"w": w0}, {"w": w1})
    assert result["overall"]["unchanged"] == 64 - 5
    assert result["bits"] == "fp16" and result["tensors"][0]["bits"] == "fp16"
    assert result["compared"] == [{"bits": "fp16", "how": "own bits", "tensors": 1, "numel": 64}]
    # Negative control: the bf16 images of the same values, as float16 pairs were compared
    # before, show none of these moves.
    assert not bool((~analysis.unchanged_bitwise(w0.float(), w1.float())).any())


@pytest.mark.parametrize("image, counted", [(torch.bfloat16, 0), (torch.float16, 5)])
def test_fp32_checkpoints_are_compared_on_the_image_asked_for(image, counted):
    w0, w1, _ = _below_bf16_pair(torch.float32)
    result = analysis.update_sparsity({"w": w0}, {"w": w1}, image_dtype=image)
    assert result["overall"]["unchanged"] == 64 - counted
    short = {torch.bfloat16: "bf16", torch.float16: "fp16"}[image]
    assert result["image_dtype"] == short
    assert result["compared"] == [{"bits": short, "how": "images of float32", "tensors": 1,
                                   "numel": 64}]
    with pytest.raises(ValueError, match="image_dtype"):
        analysis.update_sparsity({"w": w0}, {"w": w1}, image_dtype=torch.float32)


def test_bf16_pairs_keep_their_bits_and_mixed_pairs_take_the_image():
    w0 = torch.tensor([1.0, 1.5]).bfloat16()
    assert analysis.compared_dtype(torch.bfloat16, torch.bfloat16, torch.float16) == \
        torch.bfloat16
    assert analysis.compared_dtype(torch.float16, torch.bfloat16) == torch.bfloat16
    assert analysis.compared_dtype(torch.float16, torch.bfloat16, torch.float16) == \
        torch.float16
    mixed = analysis.update_sparsity({"w": w0}, {"w": w0.half()}, image_dtype=torch.float16)
    assert mixed["overall"]["unchanged"] == 2
    assert mixed["compared"][0]["how"] == "images of bfloat16 / float16"
    both = analysis.update_sparsity({"a": w0, "b": w0.half()}, {"a": w0, "b": w0.half()})
    assert both["bits"] == "bf16/fp16" and "unchanged (bf16/fp16 bits)" in \
        analysis.format_sparsity(both)


# --------------------------------------------------------------------------- masks


def test_top_fraction_counts_and_ties():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    assert analysis.top_fraction(scores, 0.5).tolist() == [True, False, True, True, False, False]
    assert analysis.top_fraction(scores, 0.5, largest=False).tolist() == [
        False, True, True, False, False, True]
    for alpha in (0.0, 0.1, 0.37, 1.0):
        mask = analysis.top_fraction(torch.randn(1001), alpha)
        assert int(mask.sum()) == round(alpha * 1001)
    seeded = [analysis.top_fraction(torch.zeros(100), 0.3, tie_seed=s) for s in (0, 1)]
    assert all(int(m.sum()) == 30 for m in seeded)
    assert not torch.equal(seeded[0], seeded[1])     # random ties, not the first 30


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,alpha,rank", [((48, 32), 0.2, 3), ((17, 60), 0.05, 0.1),
                                              ((30, 30), 0.5, 1)])
def test_principal_mask_matches_numpy_svd(seed, shape, alpha, rank):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    k = analysis.resolve_rank(rank, shape)
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    recon = np.abs((u[:, :k] * s[:k]) @ vt[:k])
    count = round(alpha * w.size)
    expected = np.zeros(w.size, dtype=bool)
    expected[np.argsort(-recon.reshape(-1), kind="stable")[:count]] = True
    got = analysis.principal_mask(torch.from_numpy(w), alpha, rank)
    assert got.shape == shape
    np.testing.assert_array_equal(got.reshape(-1).numpy(), expected)
    low = analysis.low_magnitude_mask(torch.from_numpy(w), alpha)
    expected_low = np.zeros(w.size, dtype=bool)
    expected_low[np.argsort(np.abs(w).reshape(-1), kind="stable")[:count]] = True
    np.testing.assert_array_equal(low.reshape(-1).numpy(), expected_low)


@pytest.mark.parametrize("seed", SEEDS)
def test_overlap_of_a_random_mask_is_near_alpha(seed):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(256, 192, generator=gen)
    alpha = 0.1
    principal = analysis.principal_mask(w0, alpha, 8)
    n_mask = int(principal.sum())
    tolerance = 5 * math.sqrt(alpha * (1 - alpha) / n_mask)
    random_update = torch.rand(w0.shape, generator=gen) < alpha
    result = analysis.overlap(random_update, principal)
    assert abs(result["overlap"] - alpha) < tolerance
    assert abs(result["lift"] - 1.0) < tolerance / alpha
    w1 = w0 + 1e-3 * torch.randn(w0.shape, generator=gen)
    top = analysis.top_update_mask(w0, w1, alpha)
    assert abs(top.float().mean().item() - alpha) < 1e-3
    assert abs(analysis.overlap(top, principal)["overlap"] - alpha) < tolerance
    # Controls: the mask itself and its complement.
    assert analysis.overlap(principal, principal)["overlap"] == 1.0
    assert analysis.overlap(~principal, principal)["overlap"] == 0.0


def test_update_aimed_at_principal_weights_is_detected_by_geometry():
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(64, 48, generator=gen)
    principal = analysis.principal_mask(w0, 0.2, 4)
    w1 = w0.clone()
    w1[principal] *= 1.5                               # SFT-like: moves the principal weights
    g = analysis.geometry({"a.0.w": w0}, {"a.0.w": w1}, alpha=0.2, rank=4)
    o = g["overall"]
    assert o["changed_in_principal"] == 1.0
    assert o["changed_in_principal_lift"] == pytest.approx(1 / o["changed_baseline"])
    assert o["top_in_principal"] == 1.0
    assert o["spectrum_drift"] > 0.05
    untouched = analysis.geometry({"a.0.w": w0}, {"a.0.w": w0.clone()}, alpha=0.2, rank=4)
    assert untouched["overall"]["spectrum_drift"] == 0.0
    assert untouched["overall"]["changed_baseline"] == 0.0


def test_jaccard_against_independent_baseline():
    gen = torch.Generator().manual_seed(0)
    p, q = 0.3, 0.1
    a = torch.rand(200_000, generator=gen) < p
    b = torch.rand(200_000, generator=gen) < q
    result = analysis.jaccard(a, b)
    assert result["baseline"] == pytest.approx(p * q / (p + q - p * q), rel=0.03)
    assert result["jaccard"] == pytest.approx(result["baseline"], rel=0.05)
    assert analysis.jaccard(a, a)["jaccard"] == 1.0
    assert analysis.jaccard(a, ~a)["jaccard"] == 0.0


def test_update_jaccard_of_checkpoints():
    state = _state(1)
    ta, changed_a = _change(state, 10, 6)
    tb = {n: t.clone() for n, t in ta.items()}
    for name, t in tb.items():                          # b: a's changes plus the same count more
        flat = t.reshape(-1)
        taken = set(changed_a[name].tolist())
        extra = torch.tensor([i for i in range(flat.numel()) if i not in taken][:6])
        flat[extra] = _next_bf16(flat[extra])
    result = analysis.update_jaccard(state, ta, tb)["overall"]
    assert result["jaccard"] == pytest.approx(0.5)
    n = sum(t.numel() for t in state.values())
    p, q = 6 * len(state) / n, 12 * len(state) / n
    assert result["baseline"] == pytest.approx(p * q / (p + q - p * q))


def test_spectrum_drift_and_principal_angles():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    assert analysis.spectrum_drift(w, w) == 0.0
    assert analysis.spectrum_drift(w, 2 * w) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    rotated = w @ q                                      # same column space, same spectrum
    angles = analysis.principal_angles(w, rotated, 5)
    assert max(angles["left"]) < 1e-5
    assert analysis.spectrum_drift(w, rotated) < 1e-12
    u0 = np.linalg.svd(w.numpy())[2][:5].T
    u1 = np.linalg.svd(rotated.numpy())[2][:5].T
    expected = np.degrees(np.arccos(np.clip(np.linalg.svd(u0.T @ u1, compute_uv=False), -1, 1)))
    np.testing.assert_allclose(angles["right"], np.sort(expected), atol=1e-6)
    assert max(angles["right"]) > 1.0


# --------------------------------------------------------------------------- freeze masks


def test_masks_round_trip_through_files_into_the_optimizer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    model = model.bfloat16()
    masks = analysis.build_masks(model.state_dict(), alpha=0.25, rank=2, seed=3)
    paths = analysis.save_masks(tmp_path, masks, {"alpha": "0.25"})
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == sorted(
        f"{k}.safetensors" for k in analysis.MASK_KINDS)
    loaded = {k: analysis.load_masks(tmp_path / f"{k}.safetensors")[0] for k in analysis.MASK_KINDS}
    assert set(loaded["principal"]) == {"0.weight", "2.weight"}    # matrices only
    for name, packed in loaded["principal"].items():
        assert torch.equal(packed, masks["principal"]["bitmaps"][name])
        numel = masks["principal"]["numels"][name]
        principal = bitmaps.unpack(packed, numel)
        low = bitmaps.unpack(loaded["low_magnitude"][name], numel)
        assert int(principal.sum()) == round(0.25 * numel)
        assert torch.equal(bitmaps.unpack(loaded["non_principal"][name], numel), ~principal)
        assert torch.equal(bitmaps.unpack(loaded["principal_or_low_magnitude"][name], numel),
                           principal | low)
        rand = bitmaps.unpack(loaded["random"][name], numel)
        assert int(rand.sum()) == int(principal.sum()) and not torch.equal(rand, principal)
        expected = analysis.principal_mask(model.state_dict()[name], 0.25, 2)
        assert torch.equal(principal, expected.reshape(-1))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdamW(model.parameters(), lr=1e-2)
    applied = analysis.apply_freeze_masks(opt, model.named_parameters(),
                                          tmp_path / "non_principal.safetensors")
    assert sorted(applied) == ["0.weight", "2.weight"]
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 16).bfloat16()).float().pow(2).sum().backward()
        opt.step()
    for name, p in model.named_parameters():
        moved = analysis.bf16_bits(p) != analysis.bf16_bits(before[name])
        if name in applied:
            principal = bitmaps.unpack(loaded["principal"][name], p.numel()).reshape(p.shape)
            assert not moved[principal].any(), name          # frozen: bit-identical
            assert moved[~principal].float().mean() > 0.5, name
        else:
            assert moved.any(), name                           # biases have no mask


def test_apply_freeze_masks_names_a_missing_param(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = AdamW(model.parameters())
    with pytest.raises(KeyError, match="decoder.weight"):
        analysis.apply_freeze_masks(opt, model.named_parameters(),
                                    {"decoder.weight": torch.zeros(2, dtype=torch.uint8)})


def test_names_to_layers_and_module_types():
    assert analysis.layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert analysis.layer_index("lm_head.weight") is None
    key = analysis.module_key
    assert key("model.layers.3.self_attn.q_proj.weight") == "self_attn.q_proj.weight"
    assert key("encoder.layer.0.intermediate.dense.weight") == "intermediate.dense.weight"
    assert key("model.layers.1.mlp.experts.7.up_proj.weight") == "mlp.experts.up_proj.weight"
    assert analysis.module_key("model.embed_tokens.weight") == "model.embed_tokens.weight"


# --------------------------------------------------------------------------- command line


def test_cli_sparsity_prints_tables_and_writes_consistent_files(tmp_path, capsys):
    state = _state(7)
    tuned, _ = _change(state, 8, 4)
    other, _ = _change(state, 9, 4)
    for name, s in (("base", state), ("tuned", tuned), ("other", other)):
        save_file(s, str(tmp_path / f"{name}.safetensors"))
    out = tmp_path / "report"
    status = cli.main(["sparsity", str(tmp_path / "base.safetensors"),
                       str(tmp_path / "tuned.safetensors"), "--geometry", "--rank", "2",
                       "--compare", str(tmp_path / "other.safetensors"), "--out", str(out),
                       "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    n = sum(t.numel() for t in state.values())
    expected = f"{(n - 4 * len(state)) / n:.2%}"
    assert expected in printed
    data = json.loads((out / "sparsity.json").read_text())
    assert data["sparsity"]["overall"]["unchanged"] == n - 4 * len(state)
    assert expected in (out / "sparsity.md").read_text()
    assert data["geometry"]["overall"]["matrices"] == 5
    assert 0.0 <= data["jaccard"]["overall"]["jaccard"] < 1.0


@pytest.mark.parametrize("dtype, options, unchanged, line", [
    (torch.float16, [], 59, "compared on: fp16 own bits (1 tensors, 64 elements)"),
    (torch.float32, ["--image-dtype", "fp16"], 59, "compared on: fp16 images of float32"),
    (torch.float32, [], 64, "compared on: bf16 images of float32"),  # the control
])
def test_cli_sparsity_counts_float16_moves_below_bf16_resolution(tmp_path, capsys, dtype,
                                                                 options, unchanged, line):
    w0, w1, _ = _below_bf16_pair(dtype)
    save_file({"w": w0}, str(tmp_path / "base.safetensors"))
    save_file({"w": w1}, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "report"
    assert cli.main(["sparsity", str(tmp_path / "base.safetensors"),
                     str(tmp_path / "tuned.safetensors"), *options, "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert line in printed
    bits = "fp16" if unchanged < 64 else "bf16"
    assert f"unchanged ({bits} bits)" in printed and f"{unchanged / 64:.2%}" in printed
    data = json.loads((out / "sparsity.json").read_text())["sparsity"]
    assert data["overall"]["unchanged"] == unchanged
    assert data["image_dtype"] == ("fp16" if options else "bf16")
    assert line.replace("compared on:", "Compared on:") in (out / "sparsity.md").read_text()


def test_cli_sparsity_warns_first_about_skipped_tensors_and_records_them(tmp_path, capsys):
    state = _state(3)
    tuned, _ = _change(state, 4, 2)
    tuned["lm_head.weight"] = torch.zeros(11, 16).bfloat16()
    del tuned["model.layers.1.input_layernorm.weight"]
    tuned["extra.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "report"
    assert cli.main(["sparsity", str(tmp_path / "base.safetensors"),
                     str(tmp_path / "tuned.safetensors"), "--out", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    warning = printed.splitlines()[0]
    assert warning.startswith("warning: 3 tensors skipped")
    for reason in ("model.layers.1.input_layernorm.weight: only in base",
                   "lm_head.weight: shape (10, 16) vs (11, 16)", "extra.bias: only in tuned"):
        assert reason in warning
    assert f"the {len(state) - 2} compared" in warning
    data = json.loads((out / "sparsity.json").read_text())
    assert f"warning: {data['sparsity']['warning']}" == warning
    assert len(data["sparsity"]["skipped"]) == 3
    md = (out / "sparsity.md").read_text()
    assert md.index("**Warning:** 3 tensors skipped") < md.index("## Overall")
    assert analysis.update_sparsity(state, state)["warning"] is None


def test_per_layer_plot_has_whole_layer_ticks(tmp_path, monkeypatch):
    plt = analysis.load_pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to inspect them
    state = _state(5)
    analysis.write_sparsity_report(tmp_path, analysis.update_sparsity(state, _change(state, 6, 3)[0]))
    ticks = figures[0].axes[0].get_xticks()
    # Two layers: matplotlib's default locator would tick 0.0, 0.2, ..., 1.0.
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_cli_sparsity_reports_a_missing_checkpoint(tmp_path, capsys):
    status = cli.main(["sparsity", str(tmp_path / "nope"), str(tmp_path / "nope2"),
                       "--no-progress"])
    assert status == 2
    assert "no checkpoint file or folder" in capsys.readouterr().err


def test_cli_masks_writes_loadable_files(tmp_path, capsys):
    state = _state(2)
    save_file(state, str(tmp_path / "base.safetensors"))
    status = cli.main(["masks", str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "m"),
                       "--kind", "principal", "--kind", "random", "--alpha", "0.1",
                       "--rank", "2", "--no-progress"])
    assert status == 0
    matrices = [t.numel() for t in state.values() if t.dim() == 2]
    share = sum(round(0.1 * n) for n in matrices) / sum(matrices)
    assert f"{share:.2%}" in capsys.readouterr().out
    packed, numels = analysis.load_masks(tmp_path / "m" / "principal.safetensors")
    assert set(packed) == {n for n, t in state.items() if t.dim() == 2}
    for name, bits in packed.items():
        assert int(bitmaps.popcount(bits)) == round(0.1 * numels[name])


# --------------------------------------------------------------------------- magnitude-matched null


def _bf16_random_update(w0: torch.Tensor, scale: float, gen, where=None) -> torch.Tensor:
    """bf16 ``w0`` plus fp32 noise of one size for every weight (optionally only ``where``),
    stored by nearest rounding: small weights change more often, as in training."""
    noise = scale * torch.randn(w0.shape, generator=gen)
    if where is not None:
        noise = noise * where
    return (w0.float() + noise).bfloat16()


def test_magnitude_bins_are_equal_count_and_ordered():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(50, 40, generator=gen)
    bins = analysis.magnitude_bins(w, 16)
    assert torch.bincount(bins.reshape(-1)).tolist() == [125] * 16
    mags = w.abs().reshape(-1)
    for b in range(15):
        assert mags[bins.reshape(-1) == b].max() <= mags[bins.reshape(-1) == b + 1].min()
    with pytest.raises(ValueError, match="bins must be at least 1, got 0"):
        analysis.magnitude_bins(w, 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_matched_null_is_the_mean_of_permutations_within_bins(seed):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(40, 30, generator=gen).bfloat16()
    update = ~analysis.unchanged_bitwise(w0, _bf16_random_update(w0, 3e-3, gen))
    mask = analysis.principal_mask(w0.float(), 0.2, 3)
    exact = analysis.matched_overlap(update, mask, w0, bins=8)["matched_baseline"]
    # Monte Carlo of the definition: shuffle the update inside each bin, measure the overlap.
    bins = analysis.magnitude_bins(w0, 8).reshape(-1)
    flat = update.reshape(-1)
    draws = []
    for _ in range(400):
        shuffled = flat.clone()
        for b in range(8):
            idx = torch.nonzero(bins == b).reshape(-1)
            shuffled[idx] = flat[idx[torch.randperm(idx.numel(), generator=gen)]]
        draws.append(analysis.overlap(shuffled, mask)["overlap"])
    mean, std = float(np.mean(draws)), float(np.std(draws))
    assert abs(mean - exact) < 5 * std / math.sqrt(len(draws))


def test_random_update_is_magnitude_explained_and_aimed_update_is_not():
    gen = torch.Generator().manual_seed(3)
    # Trained weights have structure: a rank-4 part plus noise, so the principal weights
    # (top 20% of the rank-8 reconstruction) are mostly the large ones.
    structure = torch.randn(256, 4, generator=gen) @ torch.randn(4, 192, generator=gen) / 2
    w0 = (0.05 * (structure + 0.5 * torch.randn(256, 192, generator=gen))).bfloat16()
    base = {"layers.0.w": w0}
    # Noise of one size everywhere: its bf16 image changes mostly where |W0| is small.
    random_tuned = {"layers.0.w": _bf16_random_update(w0, 1.5e-4, gen)}
    g = analysis.geometry(base, random_tuned, alpha=0.2, rank=8)["overall"]
    assert 0.2 < g["changed_in_principal_lift"] < 0.4          # plain baseline: "avoids"
    assert g["changed_in_principal_matched_lift"] == pytest.approx(1.0, abs=0.08)
    assert g["changed_in_principal_not_low_matched_lift"] == pytest.approx(1.0, abs=0.08)
    assert g["changed_in_low_magnitude_lift"] > 1.5
    assert g["changed_in_low_magnitude_matched_lift"] == pytest.approx(1.0, abs=0.02)
    # The same noise aimed at the principal weights.
    principal = analysis.principal_mask(w0.float(), 0.2, 8)
    aimed = {"layers.0.w": _bf16_random_update(w0, 1.5e-4, gen, where=principal)}
    a = analysis.geometry(base, aimed, alpha=0.2, rank=8)["overall"]
    assert a["changed_in_principal_matched_lift"] > 2.0
    assert a["top_in_principal_matched_lift"] > 1.2
    assert a["changed_in_principal_not_low_matched_lift"] > 2.0


def test_drift_and_angles_per_unit_of_update_size():
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(48, 32, generator=gen, dtype=torch.float64)
    small = {"l.0.w": w0 + 1e-3 * torch.randn(w0.shape, generator=gen, dtype=torch.float64)}
    g = analysis.geometry({"l.0.w": w0}, small, alpha=0.2, rank=4)
    (row,) = g["matrices"]
    o = g["overall"]
    expected = float(torch.linalg.vector_norm(small["l.0.w"] - w0) / torch.linalg.vector_norm(w0))
    assert row["update_norm"] == pytest.approx(expected)
    assert o["drift_per_update"] == pytest.approx(row["spectrum_drift"] / expected)
    assert 0.0 < o["drift_per_update"] <= 1.0                # Mirsky: drift <= ||dW|| / ||W0||
    # Scaling W0 moves the spectrum and nothing else: drift per unit update is 1, angles 0.
    scaled = analysis.geometry({"l.0.w": w0}, {"l.0.w": 1.01 * w0}, alpha=0.2, rank=4)["overall"]
    assert scaled["drift_per_update"] == pytest.approx(1.0)
    assert scaled["angle_left_per_update"] < 1e-3
    text = analysis.format_geometry(g)
    assert "magnitude-matched lift" in text and f"{o['drift_per_update']:.3g}" in text
