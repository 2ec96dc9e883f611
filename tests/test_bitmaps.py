"""Tests of rlvr_optim.bitmaps: the packed bitmap format and its utilities.

numpy.packbits(..., bitorder="little") is the ground truth of the format.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlvr_optim import bitmaps
from rlvr_optim.bitmaps import (
    bitmap_bytes,
    load_bitmaps,
    module_type,
    or_accumulate,
    pack,
    popcount,
    save_bitmaps,
    summarize_bitmaps,
    summarize_by_module,
    unpack,
)

SIZES = [0, 1, 7, 8, 9, 33, 4099]
SEEDS = [0, 1, 2024]


def _random_bits(rng: np.random.Generator, shape, p: float = 0.5) -> np.ndarray:
    return rng.random(shape) < p


def _np_pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.reshape(-1), bitorder="little")


# ---------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("p", [0.5, 0.05, 0.95])
def test_pack_matches_numpy(size, seed, p):
    rng = np.random.default_rng([seed, size])
    bits = _random_bits(rng, size, p)
    packed = pack(torch.from_numpy(bits))
    assert packed.dtype == torch.uint8
    assert packed.shape == (bitmap_bytes(size),)
    assert packed.numel() == (size + 7) // 8
    np.testing.assert_array_equal(packed.numpy(), _np_pack(bits))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
def test_unpack_matches_numpy(size, seed):
    rng = np.random.default_rng([seed, size, 1])
    bits = _random_bits(rng, size)
    packed = _np_pack(bits)
    out = unpack(torch.from_numpy(packed.copy()), size)
    assert out.dtype == torch.bool
    assert out.shape == (size,)
    expected = np.unpackbits(packed, bitorder="little", count=size).astype(bool)
    np.testing.assert_array_equal(out.numpy(), expected)
    np.testing.assert_array_equal(out.numpy(), bits)


@pytest.mark.parametrize("seed", SEEDS)
def test_unpack_default_numel_is_all_bits(seed):
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, size=13, dtype=np.uint8)
    out = unpack(torch.from_numpy(packed))
    assert out.shape == (13 * 8,)
    expected = np.unpackbits(packed, bitorder="little").astype(bool)
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("size", [1, 7, 9, 33, 4099])
def test_pack_padding_bits_are_zero(size):
    # All-ones input: every padding bit past numel must still be zero.
    packed = pack(torch.ones(size, dtype=torch.bool))
    tail = size % 8
    last = int(packed[-1])
    if tail:
        assert last == (1 << tail) - 1, f"padding bits set: last byte {last:#04x}"
    else:
        assert last == 0xFF
    assert int(popcount(packed)) == size


def test_pack_known_bytes():
    # Element i is bit i % 8 of byte i // 8.
    bits = torch.zeros(20, dtype=torch.bool)
    bits[[0, 3, 8, 15, 19]] = True
    assert pack(bits).tolist() == [0b00001001, 0b10000001, 0b00001000]


@pytest.mark.parametrize("seed", SEEDS)
def test_pack_accepts_zero_one_tensors(seed):
    rng = np.random.default_rng(seed)
    bits = _random_bits(rng, 77)
    expected = _np_pack(bits)
    for dtype in (torch.uint8, torch.int32, torch.int64):
        np.testing.assert_array_equal(pack(torch.from_numpy(bits).to(dtype)).numpy(), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7), (16, 9), (1, 0, 4)])
def test_pack_multidimensional_is_row_major(shape, seed):
    rng = np.random.default_rng([seed, *shape])
    bits = _random_bits(rng, shape)
    packed = pack(torch.from_numpy(bits))
    np.testing.assert_array_equal(packed.numpy(), _np_pack(bits))
    back = unpack(packed, shape=shape)
    assert back.shape == shape
    np.testing.assert_array_equal(back.numpy(), bits)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(5, 9), (16, 33), (8, 1)])
def test_pack_non_contiguous(shape, seed):
    rng = np.random.default_rng([seed, *shape, 7])
    base = torch.from_numpy(_random_bits(rng, shape))
    transposed = base.t()
    assert not transposed.is_contiguous() or 1 in shape
    # numpy's reshape(-1) of the transposed view is the row-major order of the logical tensor.
    expected = _np_pack(base.numpy().T)
    np.testing.assert_array_equal(pack(transposed).numpy(), expected)
    np.testing.assert_array_equal(pack(transposed).numpy(), pack(transposed.contiguous()).numpy())
    # A strided slice as well.
    sliced = base[:, ::2]
    np.testing.assert_array_equal(pack(sliced).numpy(), _np_pack(base.numpy()[:, ::2]))
    back = unpack(pack(transposed), shape=transposed.shape)
    assert torch.equal(back, transposed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
def test_unpack_pack_round_trip(size, seed):
    rng = np.random.default_rng([seed, size, 3])
    bits = torch.from_numpy(_random_bits(rng, size))
    assert torch.equal(unpack(pack(bits), size), bits)
    assert torch.equal(unpack(pack(bits), shape=(size,)), bits)


def test_unpack_rejects_wrong_size():
    packed = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="has 4 bytes, got 3"):
        unpack(packed, 25)
    with pytest.raises(ValueError, match="has 2 bytes, got 3"):
        unpack(packed, shape=(4, 4))
    # 17..24 elements all take 3 bytes.
    for numel in range(17, 25):
        assert unpack(packed, numel).shape == (numel,)


def test_unpack_rejects_non_uint8():
    with pytest.raises(TypeError, match="a bitmap is a torch.uint8 tensor, got torch.int8"):
        unpack(torch.zeros(2, dtype=torch.int8), 16)
    with pytest.raises(TypeError, match="a bitmap is a torch.uint8 tensor, got list"):
        unpack([1, 2], 16)


# ---------------------------------------------------------------------------------------
# popcount / or_accumulate
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("p", [0.5, 0.01, 1.0])
def test_popcount(size, seed, p):
    rng = np.random.default_rng([seed, size, 5])
    bits = _random_bits(rng, size, p)
    count = popcount(pack(torch.from_numpy(bits)))
    assert isinstance(count, torch.Tensor)
    assert count.dtype == torch.int64
    assert count.dim() == 0
    assert int(count) == int(bits.sum())


@pytest.mark.parametrize("seed", SEEDS)
def test_popcount_of_arbitrary_bytes(seed):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(7, 11), dtype=np.uint8)
    assert int(popcount(torch.from_numpy(raw))) == int(np.unpackbits(raw).sum())
    assert int(popcount(torch.full((5,), 255, dtype=torch.uint8))) == 40


def test_popcount_rejects_non_uint8():
    with pytest.raises(TypeError, match="a bitmap is a torch.uint8 tensor"):
        popcount(torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", [0, 1, 9, 4099])
def test_or_accumulate(size, seed):
    rng = np.random.default_rng([seed, size, 9])
    a = _random_bits(rng, size, 0.2)
    b = _random_bits(rng, size, 0.2)
    acc = pack(torch.from_numpy(a))
    out = or_accumulate(acc, pack(torch.from_numpy(b)))
    assert out is acc  # in place
    np.testing.assert_array_equal(acc.numpy(), _np_pack(a | b))
    np.testing.assert_array_equal(acc.numpy(), _np_pack(a) | _np_pack(b))
    # Idempotent.
    or_accumulate(acc, pack(torch.from_numpy(b)))
    np.testing.assert_array_equal(acc.numpy(), _np_pack(a | b))


def test_or_accumulate_rejects_mismatched_sizes():
    acc = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"bitmaps differ in size: \(3,\) vs \(4,\)"):
        or_accumulate(acc, torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bitmaps differ in size"):
        or_accumulate(acc, torch.zeros(1, 3, dtype=torch.uint8))
    assert acc.tolist() == [0, 0, 0]


def test_or_accumulate_rejects_non_uint8():
    with pytest.raises(TypeError, match="a bitmap is a torch.uint8 tensor, got torch.bool"):
        or_accumulate(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="a bitmap is a torch.uint8 tensor, got torch.int64"):
        or_accumulate(torch.zeros(3, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_save_load_round_trip(tmp_path, seed):
    rng = np.random.default_rng(seed)
    numels = {
        "model.layers.0.mlp.up_proj.weight": 4099,
        "model.layers.0.self_attn.q_proj.weight": 64,
        "model.norm.weight": 9,
        "lm_head.weight": 1,
    }
    originals = {n: _random_bits(rng, k) for n, k in numels.items()}
    maps = {n: pack(torch.from_numpy(b)) for n, b in originals.items()}
    path = tmp_path / "changes.safetensors"
    save_bitmaps(path, maps, numels, metadata={"step": "17", "run": "abc"})

    loaded, loaded_numels, extra = load_bitmaps(path)
    assert set(loaded) == set(maps)
    assert loaded_numels == numels
    assert extra == {"step": "17", "run": "abc"}
    for name, bitmap in maps.items():
        assert loaded[name].dtype == torch.uint8
        assert torch.equal(loaded[name], bitmap)
        np.testing.assert_array_equal(
            unpack(loaded[name], loaded_numels[name]).numpy(), originals[name]
        )


def test_save_load_without_metadata_and_2d_bitmap(tmp_path):
    bitmap = torch.arange(6, dtype=torch.uint8).reshape(2, 3)  # stored flat
    path = str(tmp_path / "m.safetensors")
    save_bitmaps(path, {"w": bitmap}, {"w": 41})
    loaded, numels, extra = load_bitmaps(path)
    assert extra == {}
    assert numels == {"w": 41}
    assert torch.equal(loaded["w"], bitmap.reshape(-1))


def test_save_rejects_wrong_size(tmp_path):
    with pytest.raises(ValueError, match="has 2 bytes, 17 elements need 3"):
        save_bitmaps(
            tmp_path / "x.safetensors", {"w": torch.zeros(2, dtype=torch.uint8)}, {"w": 17}
        )
    with pytest.raises(TypeError, match="a bitmap is a torch.uint8 tensor"):
        save_bitmaps(tmp_path / "x.safetensors", {"w": torch.zeros(2, dtype=torch.int8)}, {"w": 16})


def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(4, dtype=torch.uint8)}, str(path))
    with pytest.raises(ValueError, match="is not an rlvr_optim bitmap file"):
        load_bitmaps(path)
    path2 = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(4, dtype=torch.uint8)}, str(path2), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not an rlvr_optim bitmap file \(format='pt'\)"):
        load_bitmaps(path2)


def test_load_rejects_numel_mismatch(tmp_path):
    path = tmp_path / "bad.safetensors"
    meta = {"format": "rlvr_optim.bitmaps/1", "numel.a": "16", "numel.b": "33"}
    tensors = {"a": torch.zeros(2, dtype=torch.uint8), "b": torch.zeros(4, dtype=torch.uint8)}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="bitmap 'b' does not match its recorded size"):
        load_bitmaps(path)
    # The same file with a consistent numel loads.
    meta["numel.b"] = "32"
    save_file(tensors, str(path), metadata=meta)
    _, numels, _ = load_bitmaps(path)
    assert numels == {"a": 16, "b": 32}


# ---------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------


def test_module_type():
    assert module_type("model.layers.3.self_attn.q_proj.weight") == "q_proj.weight"
    assert module_type("model.layers.12.mlp.down_proj.bias") == "down_proj.bias"
    assert module_type("model.norm.weight") == "norm.weight"
    assert module_type("lm_head.weight") == "lm_head.weight"
    assert module_type("experts.0.w1.3") == "experts.w1"


def _bitmap_with(numel: int, set_indices) -> torch.Tensor:
    bits = torch.zeros(numel, dtype=torch.bool)
    bits[list(set_indices)] = True
    return pack(bits)


def test_summarize_bitmaps():
    numels = {"a": 10, "b": 16, "c": 0, "d": 3}
    maps = {
        "a": _bitmap_with(10, [0, 9]),
        "b": _bitmap_with(16, range(16)),
        "c": torch.zeros(0, dtype=torch.uint8),
        "d": _bitmap_with(3, []),
    }
    rows = summarize_bitmaps(maps, numels)
    assert rows == [
        {"name": "a", "numel": 10, "set": 2, "fraction": 0.2},
        {"name": "b", "numel": 16, "set": 16, "fraction": 1.0},
        {"name": "c", "numel": 0, "set": 0, "fraction": 0.0},
        {"name": "d", "numel": 3, "set": 0, "fraction": 0.0},
    ]
    assert all(isinstance(r["set"], int) for r in rows)
    assert summarize_bitmaps({}, {}) == []


def test_summarize_by_module():
    numels = {
        "model.layers.0.self_attn.q_proj.weight": 40,
        "model.layers.1.self_attn.q_proj.weight": 40,
        "model.layers.0.mlp.up_proj.weight": 100,
        "model.layers.1.mlp.up_proj.weight": 60,
        "model.norm.weight": 8,
    }
    sets = {
        "model.layers.0.self_attn.q_proj.weight": range(0, 40, 2),  # 20
        "model.layers.1.self_attn.q_proj.weight": range(10),  # 10
        "model.layers.0.mlp.up_proj.weight": [5],  # 1
        "model.layers.1.mlp.up_proj.weight": range(3, 60, 3),  # 19
        "model.norm.weight": [],
    }
    maps = {n: _bitmap_with(numels[n], s) for n, s in sets.items()}
    rows = summarize_bitmaps(maps, numels)
    assert [r["set"] for r in rows] == [20, 10, 1, 19, 0]
    table = summarize_by_module(rows)
    assert table == [
        {"module": "norm.weight", "numel": 8, "set": 0, "fraction": 0.0},
        {"module": "q_proj.weight", "numel": 80, "set": 30, "fraction": 30 / 80},
        {"module": "up_proj.weight", "numel": 160, "set": 20, "fraction": 20 / 160},
    ]
    # A custom key.
    def layer(name):
        return name.split(".")[2] if "layers" in name else "other"

    by_layer = summarize_by_module(rows, key=layer)
    assert by_layer == [
        {"module": "0", "numel": 140, "set": 21, "fraction": 21 / 140},
        {"module": "1", "numel": 100, "set": 29, "fraction": 29 / 100},
        {"module": "other", "numel": 8, "set": 0, "fraction": 0.0},
    ]
    assert summarize_by_module([]) == []


def test_module_exports():
    for name in bitmaps.__all__:
        assert hasattr(bitmaps, name)
