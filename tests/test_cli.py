"""Tests of the ``rlvr-optim`` command line: bad input and the cost of starting it.

Bad input (a corrupt file, checkpoints with nothing in common, a device this machine lacks,
an option value out of range) must end in one line on stderr that names the file or option,
exit status 2, and nothing written where the command would have written its output.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlvr_optim import analysis
from rlvr_optim.cli import main
from rlvr_optim.patch import load_patch, make_patch

# Modules that take seconds to import (or, for triton, start a compiler stack) and that
# neither `import rlvr_optim` nor parsing the command line needs.
HEAVY = ("triton", "transformers", "matplotlib")

_STARTUP = """
import sys
import rlvr_optim
after_import = sorted(m for m in {heavy!r} if m in sys.modules)
from rlvr_optim import cli
for argv in (["--help"], ["sparsity", "--help"], ["masks", "b", "--out", "o", "--rank", "0"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
print(after_import, sorted(m for m in {heavy!r} if m in sys.modules))
rlvr_optim.integrations.ChangeStats
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_import_and_help_import_no_heavy_module():
    code = _STARTUP.format(heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == "[] []", lines
    # The lazy attribute still gives the module, which does import transformers: so the
    # check above looks at the right names.
    assert "transformers" in lines[-1]


# ------------------------------------------------------------------ bad input: one line, status 2

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")


def _state(seed: int, width: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8, width, generator=gen).bfloat16()
            for i in range(2)} | {"lm_head.weight": torch.randn(4, width, generator=gen).bfloat16()}


def _nudged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy with every fourth element moved one bf16 step."""
    out = {}
    for name, t in state.items():
        bits = t.clone().view(torch.int16).reshape(-1)
        bits[::4] += 1
        out[name] = bits.view(torch.bfloat16).reshape(t.shape)
    return out


def _refused(capsys, status: int, command: str, *named: str) -> str:
    """Assert a refusal: status 2 and one stderr line naming each of ``named``."""
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"rlvr-optim {command}: error: "), lines[0]
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture
def pair(tmp_path):
    """base.safetensors and tuned.safetensors of one small model."""
    base = _state(0)
    save_file(base, tmp_path / "base.safetensors")
    save_file(_nudged(base), tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def test_sparsity_refuses_checkpoints_whose_every_tensor_differs_in_shape(pair, tmp_path, capsys):
    other = tmp_path / "wider.safetensors"
    save_file(_state(1, width=12), other)
    out = tmp_path / "report"
    status = main(["sparsity", str(pair[0]), str(other), "--out", str(out), "--no-progress"])
    _refused(capsys, status, "sparsity", str(pair[0]), str(other), "differs in shape")
    assert not out.exists()


def test_sparsity_refuses_checkpoints_with_no_tensor_name_in_common(pair, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, other)
    out = tmp_path / "report"
    status = main(["sparsity", str(pair[0]), str(other), "--out", str(out), "--no-progress"])
    _refused(capsys, status, "sparsity", str(other), "no tensor name in common")
    assert not out.exists()
    # --compare checks its checkpoint the same way (after the tables are printed).
    status = main(["sparsity", str(pair[0]), str(pair[1]), "--compare", str(other),
                   "--out", str(out), "--no-progress"])
    assert status == 2
    assert "no tensor name in common" in capsys.readouterr().err
    assert not out.exists()


def _broken_files(folder):
    """name -> bytes of files that are not safetensors files."""
    good = (folder / "base.safetensors").read_bytes()
    return {"empty": b"", "text": b"these are not weights\n" * 20, "truncated": good[:len(good) // 2]}


@pytest.mark.parametrize("kind", ["empty", "text", "truncated"])
@pytest.mark.parametrize("command", ["sparsity", "masks"])
def test_a_corrupt_safetensors_file_is_named(pair, tmp_path, capsys, kind, command):
    bad = tmp_path / f"{kind}.safetensors"
    bad.write_bytes(_broken_files(tmp_path)[kind])
    out = tmp_path / "out"
    argv = (["sparsity", str(pair[0]), str(bad)] if command == "sparsity"
            else ["masks", str(bad)]) + ["--out", str(out), "--no-progress"]
    _refused(capsys, main(argv), command, str(bad), "not a readable safetensors file")
    assert not out.exists()


def test_a_broken_file_in_a_checkpoint_folder_is_named_with_the_folder(pair, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(pair[1].read_bytes())
    (folder / "notes.safetensors").write_bytes(b"{}")
    out = tmp_path / "report"
    status = main(["sparsity", str(pair[0]), str(folder), "--out", str(out), "--no-progress"])
    line = _refused(capsys, status, "sparsity", str(folder / "notes.safetensors"))
    assert f"every weight file in {folder}" in line
    assert not out.exists()


def test_a_corrupt_torch_state_dict_is_named(pair, tmp_path, capsys):
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"PK\x03\x04 not a zip archive")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    for path, reason in ((bad, "not a readable torch state dict"), (listed, "holds a list")):
        status = main(["sparsity", str(pair[0]), str(path), "--no-progress"])
        _refused(capsys, status, "sparsity", str(path), reason)


def test_a_broken_hf_index_is_named(pair, tmp_path, capsys):
    folder = tmp_path / "sharded"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    for text, reason in (("{not json", "is not an HF weight index"),
                         (json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}),
                          "model-00001-of-00002.safetensors")):
        index.write_text(text)
        status = main(["sparsity", str(pair[0]), str(folder), "--no-progress"])
        _refused(capsys, status, "sparsity", str(index), reason)


def test_patch_make_reads_what_sparsity_reads(pair, tmp_path, capsys):
    """HF folders, safetensors files and torch state dicts all give the same patch."""
    base, tuned = load_file(pair[0]), load_file(pair[1])
    base_folder, tuned_folder = tmp_path / "base_hf", tmp_path / "tuned_hf"
    base_folder.mkdir()
    tuned_folder.mkdir()
    save_file(base, base_folder / "model.safetensors")
    torch.save(tuned, tuned_folder / "pytorch_model.bin")
    expected = make_patch(tuned, base=base, sequence=3)
    for i, (b, t) in enumerate([(pair[0], pair[1]), (base_folder, tuned_folder)]):
        out = tmp_path / f"p{i}.safetensors"
        assert main(["patch", "make", str(b), str(t), "-o", str(out), "--sequence", "3"]) == 0
        made = load_patch(out)
        assert (made.base_sums, made.result_sums) == (expected.base_sums, expected.result_sums)
        assert made.indices.keys() == expected.indices.keys()
        assert all(torch.equal(made.indices[k], expected.indices[k]) for k in made.indices)
    assert "elements changed" in capsys.readouterr().out
    # A folder without weights is refused as sparsity refuses it, and -o is not written.
    empty, out = tmp_path / "empty_hf", tmp_path / "refused.safetensors"
    empty.mkdir()
    status = main(["patch", "make", str(empty), str(tuned_folder), "-o", str(out),
                   "--sequence", "3"])
    _refused(capsys, status, "patch make", str(empty), "holds no .safetensors")
    assert not out.exists()


@NO_CUDA
@pytest.mark.parametrize("device, reason", [("cuda", "no CUDA device"),
                                            ("tpu", "not a device name")])
@pytest.mark.parametrize("command", ["bench", "ablate"])
def test_bench_and_ablate_refuse_a_device_this_machine_lacks(tmp_path, capsys, device, reason,
                                                              command):
    out = tmp_path / "results"
    status = main([command, "--device", device, "--out", str(out), "--no-progress"])
    _refused(capsys, status, command, "--device", reason)
    assert not out.exists()


def test_a_gpu_index_past_the_last_gpu_is_refused(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    status = main(["sparsity", *map(str, pair), "--geometry", "--device", "cuda:2",
                   "--no-progress"])
    _refused(capsys, status, "sparsity", "--device cuda:2", "2 CUDA device(s), cuda:0 to cuda:1")


def test_outputs_that_cannot_be_written_are_refused_before_any_work(pair, tmp_path, capsys):
    missing = tmp_path / "no such folder" / "p.safetensors"
    status = main(["patch", "make", *map(str, pair), "-o", str(missing), "--sequence", "1"])
    _refused(capsys, status, "patch make", f"-o {missing}", "does not exist")
    status = main(["demo", "--quick", "--json", str(missing), "--no-progress"])
    _refused(capsys, status, "demo", f"--json {missing}", "does not exist")
    status = main(["sparsity", *map(str, pair), "--out", str(pair[0]), "--no-progress"])
    captured = capsys.readouterr()
    assert status == 2 and f"--out {pair[0]} is a file" in captured.err
    assert captured.out == ""  # refused before the tables


@NO_CUDA
def test_sparsity_refuses_cuda_without_cuda(pair, tmp_path, capsys):
    out = tmp_path / "report"
    status = main(["sparsity", *map(str, pair), "--geometry", "--device", "cuda", "--out",
                   str(out), "--no-progress"])
    _refused(capsys, status, "sparsity", "--device cuda", "use --device cpu")
    assert not out.exists()


def test_sparsity_says_that_device_is_unused_without_geometry(pair, capsys):
    assert main(["sparsity", *map(str, pair), "--device", "cpu", "--no-progress"]) == 0
    assert "without --geometry everything runs on the CPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["masks", "B", "--out", "O", "--rank", "0"],
     "argument --rank: must be a positive integer or a fraction in (0, 1] of the smaller "
     "dimension, got '0'"),
    (["sparsity", "B", "T", "--rank", "1.5"], "argument --rank: must be a positive integer or"),
    (["sparsity", "B", "T", "--alpha", "2"], "argument --alpha: must be a number in [0, 1], got '2'"),
    (["demo", "--quick", "--steps", "0"], "argument --steps: must be a positive integer, got '0'"),
    (["demo", "--quick", "--steps", "x"], "argument --steps: must be a positive integer, got 'x'"),
    (["sparsity", "B", "T", "--atol", "-1"], "argument --atol: must be a number >= 0, got '-1'"),
])
def test_bad_option_values_name_the_option_and_the_value(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if a in ("B", "T", "O") else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"rlvr-optim {argv[0]}: error: {message}"), last
    assert not list(tmp_path.iterdir())


def test_an_unexpected_error_keeps_its_traceback(pair, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(analysis, "update_sparsity", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["sparsity", *map(str, pair), "--no-progress"])
