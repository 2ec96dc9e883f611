"""Tests of the ``rlvr-optim`` command line: bad input and the cost of starting it.

Bad input (a corrupt file, checkpoints with nothing in common, a device this machine lacks,
an option value out of range) must end in one line on stderr that names the file or option,
exit status 2, and nothing written where the command would have written its output.
"""

import errno
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from file_faults import fill, leftovers, read_only, snapshot, tmpfs
from safetensors import safe_open
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
    (["sparsity", "B", "T", "--image-dtype", "fp32", "--out", "O"],
     "argument --image-dtype: must be bf16 or fp16, got 'fp32'"),
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


# ============================================================ files: outputs that fail, inputs

# What every case below checks (issue #32): status 2 and one line on stderr naming the file
# or option and the reason (no traceback: main would raise it), and the folder of the test
# as it was, byte for byte: inputs, earlier outputs, no temporary file, no half folder.

FAST_BENCH = ["--preset", "cpu-tiny", "--steps", "1", "--warmup", "0", "--anchor", "none",
              "--backend", "none", "--mode", "none", "--no-graph", "--no-progress"]
WRITERS = ["sparsity", "masks", "demo", "ablate", "bench"]


def _writing(command: str, pair, where: Path) -> tuple[list[str], Path]:
    """The argv of ``command`` writing its output into the folder ``where``, and that output."""
    if command == "sparsity":
        out = where / "report"
        return ["sparsity", *map(str, pair), "--out", str(out), "--no-progress"], out
    if command == "masks":
        out = where / "masks"
        return ["masks", str(pair[0]), "--out", str(out), "--no-progress"], out
    if command == "demo":
        out = where / "rows.json"
        return ["demo", "--quick", "--steps", "2", "--hidden", "8", "--no-progress",
                "--json", str(out)], out
    if command == "ablate":
        out = where / "ablation"
        return ["ablate", "--out", str(out), "--stop-after", "1", "--no-progress"], out
    out = where / "results"
    return ["bench", *FAST_BENCH, "--out", str(out)], out


def _earlier_output(command: str, out: Path) -> None:
    """What an earlier run of ``command`` left at ``out``, to be kept byte for byte."""
    if command == "demo":
        out.write_text('[{"mode": "earlier"}]\n')
        return
    out.mkdir()
    name = {"sparsity": "sparsity.md", "masks": "principal.safetensors",
            "ablate": "report.md", "bench": "earlier.json"}[command]
    (out / name).write_text("earlier\n")
    if command == "ablate":  # an earlier ablation's folder: its lock and its checkpoints
        from rlvr_optim.ablation import preset
        from rlvr_optim.ablation.config import fingerprint

        (out / ".lock").write_text("")
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "fingerprint.txt").write_text(fingerprint(preset("tiny")) + "\n")


def _left_as_it_was(capsys, status, command, root, before, *named) -> str:
    line = _refused(capsys, status, command, *named)
    assert leftovers(root) == []
    assert snapshot(root) == before
    return line


@pytest.mark.parametrize("command", WRITERS)
def test_an_output_in_a_read_only_folder_is_one_line(pair, tmp_path, capsys, command):
    shared = tmp_path / "shared"
    shared.mkdir()
    argv, out = _writing(command, pair, shared)
    _earlier_output(command, out)
    before = snapshot(tmp_path)
    with read_only(shared):
        status = main(argv)
        _left_as_it_was(capsys, status, command, tmp_path, before, str(out))


@pytest.mark.parametrize("command, free", [("sparsity", 8192), ("masks", 4096), ("demo", 0),
                                           ("ablate", 0), ("bench", 8192)])
def test_a_full_disk_is_one_line_and_keeps_the_earlier_output(pair, tmp_path, capsys, command,
                                                              free):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        argv, out = _writing(command, pair, disk)
        _earlier_output(command, out)
        fill(disk, leave=free)
        before = snapshot(tmp_path)
        status = main(argv)
        _left_as_it_was(capsys, status, command, tmp_path, before, str(out),
                        "No space left on device")


def _fsync_fails(monkeypatch, at: int) -> None:
    """The ``at``-th fsync of a written file fails as on a full disk."""
    real, seen = os.fsync, []

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(fd)
            if len(seen) == at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("command, at", [("sparsity", 2), ("masks", 3), ("demo", 1),
                                         ("ablate", 1), ("bench", 2)])
def test_a_write_failing_midway_leaves_no_half_output(pair, tmp_path, capsys, monkeypatch,
                                                      command, at):
    """Runs everywhere (no mount needed): the ``at``-th file written fails with ENOSPC."""
    argv, out = _writing(command, pair, tmp_path)
    _earlier_output(command, out)
    before = snapshot(tmp_path)
    _fsync_fails(monkeypatch, at)
    status = main(argv)
    _left_as_it_was(capsys, status, command, tmp_path, before, str(out),
                    "No space left on device")


@pytest.mark.parametrize("command", WRITERS)
def test_an_output_through_a_symlink_loop_is_refused_before_work(pair, tmp_path, capsys,
                                                                 command):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv, _ = _writing(command, pair, loop)
    before = snapshot(tmp_path)
    status = main(argv)
    line = _left_as_it_was(capsys, status, command, tmp_path, before, str(loop),
                           "Too many levels of symbolic links")
    assert capsys.readouterr().out == ""  # before any work: no table printed
    assert line


@pytest.mark.parametrize("command", WRITERS)
def test_an_output_under_proc_is_one_line(pair, tmp_path, capsys, command):
    argv, out = _writing(command, pair, Path("/proc/self"))
    before = snapshot(tmp_path)
    status = main(argv)
    _left_as_it_was(capsys, status, command, tmp_path, before, str(out))


_STOPPED_MID_WRITE = """
import os, stat, sys, time
from rlvr_optim import cli
real, seen = os.fsync, []
def fsync(fd):
    if stat.S_ISREG(os.fstat(fd).st_mode):
        seen.append(fd)
        if len(seen) == {at}:
            print("writing", flush=True)
            # short sleeps: a signal that lands between the print and a sleep's system call
            # does not end that sleep, and is acted on at the next loop turn
            for _ in range(1200):
                time.sleep(0.1)
    return real(fd)
os.fsync = fsync
sys.exit(cli.main({argv!r}))
"""


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("command, at", [("sparsity", 2), ("demo", 1), ("ablate", 2)])
def test_a_signal_mid_write_ends_quietly_and_leaves_no_half_output(pair, tmp_path, command, at,
                                                                   sig, status):
    argv, out = _writing(command, pair, tmp_path)
    if command == "ablate":  # the second file written is its first checkpoint
        argv += ["--checkpoint-every", "1", "--stop-after", "3"]
    _earlier_output(command, out)
    before = snapshot(tmp_path)
    # A shell that runs the suite in the background starts it with SIGINT ignored, and a
    # child inherits that; the child gets the default disposition, as from a terminal.
    child = subprocess.Popen([sys.executable, "-c", _STOPPED_MID_WRITE.format(at=at, argv=argv)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in child.stdout:  # the tables come first
            if line.strip() == "writing":
                break
        else:
            raise AssertionError(child.communicate()[1])
        child.send_signal(sig)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == status
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no output was left half-written" in lines[0], err
    assert leftovers(tmp_path) == []
    after = snapshot(tmp_path)
    if command == "ablate":  # its checkpoint folders may stand, empty: no file in them
        after = {k: v for k, v in after.items() if not (k.startswith("ablation/checkpoints/")
                                                       and v is None)}
    assert after == before


def test_ctrl_c_in_process_returns_130(pair, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis, "update_sparsity", interrupted)
    assert main(["sparsity", *map(str, pair), "--no-progress"]) == 130
    assert capsys.readouterr().err == "rlvr-optim sparsity: interrupted; no output was left " \
                                      "half-written\n"


# ------------------------------------------------------------------ outputs over inputs


def test_an_output_folder_that_would_replace_or_join_an_input_is_refused(pair, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(load_file(pair[0]), hf / "model.safetensors")
    named = tmp_path / "principal.safetensors"  # a checkpoint that happens to bear a mask's name
    named.write_bytes(pair[0].read_bytes())
    before = snapshot(tmp_path)
    cases = [(["masks", str(hf), "--out", str(hf)], "is the input folder"),
             (["masks", str(hf), "--out", str(tmp_path / "sub" / ".." / "hf")],
              "is the input folder"),
             (["masks", str(named), "--out", str(tmp_path)], "is the input"),
             (["sparsity", str(hf), str(pair[1]), "--out", str(hf)], "is the input folder")]
    for argv, reason in cases:
        status = main(argv + ["--no-progress"])
        _left_as_it_was(capsys, status, argv[0], tmp_path, before, "--out", reason)
    # A folder that only holds an input is fine: nothing of that name is written.
    assert main(["masks", str(named), "--out", str(tmp_path), "--kind", "random",
                 "--no-progress"]) == 0
    assert named.read_bytes() == pair[0].read_bytes()


# ------------------------------------------------------------------ refusals of single commands


def test_argparse_errors_are_one_line_without_the_usage_block(capsys):
    for argv in (["bench", "--warmup", "-1"], ["sparsity", "B"], ["masks", "B", "--out", "O",
                                                                  "--alpha", "x"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "usage:" not in err, err
        assert err.startswith(f"rlvr-optim {argv[0]}: error: ") and f"{argv[0]} --help" in err
    with pytest.raises(SystemExit):
        main(["bench", "--warmup", "-1"])
    assert "argument --warmup: must be an integer >= 0, got '-1'" in capsys.readouterr().err


def test_masks_of_a_checkpoint_without_a_matrix_are_refused(tmp_path, capsys):
    base = tmp_path / "norms.safetensors"
    save_file({"norm.weight": torch.ones(8), "tiny.weight": torch.ones(1, 5)}, base)
    before = snapshot(tmp_path)
    status = main(["masks", str(base), "--out", str(tmp_path / "masks"), "--no-progress"])
    _left_as_it_was(capsys, status, "masks", tmp_path, before, str(base), "no weight matrix")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/model.safetensors",
                                   "sub/../../outside.safetensors", "."])
def test_an_hf_index_naming_a_file_outside_its_folder_is_refused(pair, tmp_path, capsys, shard):
    (tmp_path / "outside.safetensors").write_bytes(pair[1].read_bytes())
    folder = tmp_path / "hf"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {n: shard for n in load_file(pair[1])}}))
    before = snapshot(tmp_path)
    status = main(["sparsity", str(pair[0]), str(folder), "--no-progress"])
    _left_as_it_was(capsys, status, "sparsity", tmp_path, before, str(index), repr(shard),
                    "not in")


# ------------------------------------------------------------------ ablate


def test_ablate_refusals_are_one_line(tmp_path, capsys):
    out = tmp_path / "runs"
    a_file = tmp_path / "a file"
    a_file.write_text("keep")
    before = snapshot(tmp_path)
    status = main(["ablate", "--out", str(out), "--no-progress", "--steps", "3"])
    _left_as_it_was(capsys, status, "ablate", tmp_path, before, "--steps 3",
                    "must be multiples of updates (8)")
    status = main(["ablate", "--out", str(a_file), "--no-progress"])
    _left_as_it_was(capsys, status, "ablate", tmp_path, before, str(a_file), "is a file")


def test_ablate_resume_refuses_a_folder_of_other_settings(tmp_path, capsys):
    out = tmp_path / "runs"
    _earlier_output("ablate", out)
    (out / "checkpoints" / "fingerprint.txt").write_text("0123456789abcdef\n")
    before = snapshot(tmp_path)
    status = main(["ablate", "--out", str(out), "--resume", "--no-progress"])
    _left_as_it_was(capsys, status, "ablate", tmp_path, before, "other settings",
                    "0123456789abcdef")


def test_a_second_ablate_on_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    code = textwrap.dedent(f"""
        import time
        from rlvr_optim import files
        with files.folder_lock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        status = main(["ablate", "--out", str(out), "--stop-after", "1", "--no-progress"])
        _left_as_it_was(capsys, status, "ablate", tmp_path, before, str(out),
                        "being written by another rlvr-optim process")
    finally:
        holder.kill()
        holder.wait()


def test_ablate_stop_after_says_what_a_resume_would_start_from(tmp_path, capsys):
    # tiny-headline: the committed starts serve, so every iteration is one rollout (8 steps)
    # of the first cohort; a checkpoint every 40 steps is one every 5 rollouts.
    out = tmp_path / "runs"
    first = "cohort-sample-bf16-fp32-master-lr2e-05-start0"
    argv = ["ablate", "--preset", "tiny-headline", "--out", str(out), "--no-progress"]
    assert main(argv + ["--stop-after", "4"]) == 0
    printed = capsys.readouterr().out
    assert "before the first checkpoint" in printed and "--resume would start over" in printed
    assert not list((out / "checkpoints").rglob("checkpoint.*"))
    assert main(argv + ["--stop-after", "3", "--checkpoint-every", "16"]) == 0
    printed = capsys.readouterr().out
    assert f"continue with --resume from {out / 'checkpoints'}: {first} at step 2" in printed
    assert (out / "checkpoints" / first / "checkpoint.safetensors").is_file()


# ------------------------------------------------------------------ files are data, never code


class _Planted:
    """Unpickling this makes a folder, ``marker``: a reader that ran the pickle leaves it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant(path: Path, marker: Path, kind: str) -> None:
    """Write at ``path`` a pickle (raw, or in torch's zip format) that would make ``marker``."""
    if kind == "raw":
        path.write_bytes(pickle.dumps(_Planted(str(marker))))
    else:
        torch.save({"weight": _Planted(str(marker))}, path)


def _planted_cases(pair, tmp_path: Path, marker: Path, kind: str):
    """(command, argv) for every file a command reads, each a planted pickle."""
    base, tuned = map(str, pair)
    evil = {ext: tmp_path / f"evil.{ext}" for ext in ("bin", "pt", "pth", "safetensors",
                                                      "jsonl")}
    for path in evil.values():
        _plant(path, marker, kind)
    hf = tmp_path / "hf"
    hf.mkdir()
    _plant(hf / "pytorch_model.bin", marker, kind)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    _plant(sharded / "pytorch_model-00001-of-00001.bin", marker, kind)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
    out = str(tmp_path / "out")
    cases = []
    for checkpoint in (*[evil[e] for e in ("bin", "pt", "pth", "safetensors")], hf, sharded):
        cases += [("sparsity", ["sparsity", base, str(checkpoint), "--out", out]),
                  ("masks", ["masks", str(checkpoint), "--out", out]),
                  ("patch make", ["patch", "make", str(checkpoint), tuned, "-o", out + ".p",
                                  "--sequence", "1"])]
    cases += [("sparsity", ["sparsity", base, tuned, "--compare", str(evil["pt"])]),
              ("patch make", ["patch", "make", base, tuned, "-o", out + ".p", "--sequence", "1",
                              "--bitmaps", str(evil["safetensors"])]),
              ("patch apply", ["patch", "apply", str(evil["safetensors"]), base, "-o", out]),
              ("patch apply", ["patch", "apply", base, str(evil["safetensors"]), "-o", out]),
              ("patch apply", ["patch", "apply", base, str(evil["bin"]), "-o", out]),
              ("bench", ["bench", *FAST_BENCH, "--jsonl", str(evil["jsonl"])])]
    return cases


@pytest.mark.parametrize("kind", ["raw", "torch"])
def test_a_planted_pickle_never_runs_in_any_file_a_command_reads(pair, tmp_path, capsys, kind):
    marker = tmp_path / "the pickle ran"
    cases = _planted_cases(pair, tmp_path, marker, kind)
    before = snapshot(tmp_path)
    for command, argv in cases:
        status = main(argv + (["--no-progress"] if command in ("sparsity", "masks") else []))
        assert not marker.exists(), argv
        _left_as_it_was(capsys, status, command, tmp_path, before)


def test_the_planted_pickles_are_live(tmp_path):
    """The control of the two tests above and below: read as pickles, the planted files do
    make the marker, so a reader that unpickled them would be caught."""
    marker = tmp_path / "the pickle ran"
    _plant(tmp_path / "raw.bin", marker, "raw")
    pickle.loads((tmp_path / "raw.bin").read_bytes())
    assert marker.is_dir()
    marker.rmdir()
    _plant(tmp_path / "torch.pt", marker, "torch")
    torch.load(tmp_path / "torch.pt", weights_only=False)
    assert marker.is_dir()


def test_an_input_through_a_symlink_loop_is_one_line(pair, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    before = snapshot(tmp_path)
    for argv in (["sparsity", str(pair[0]), str(loop)], ["masks", str(loop), "--out",
                                                          str(tmp_path / "masks")]):
        status = main(argv + ["--no-progress"])
        _left_as_it_was(capsys, status, argv[0], tmp_path, before, str(loop),
                        "Too many levels of symbolic links")


def _planted_ablation(tmp_path: Path, marker: Path, kind: str,
                      preset_name: str) -> list[tuple[Path, str]]:
    """Ablation folders of a preset's settings (so a resume reads on), each with one file of
    the first cohort replaced by a planted pickle; with what the refusal names."""
    from rlvr_optim.ablation import preset
    from rlvr_optim.ablation.config import MASTER, fingerprint

    config = preset(preset_name)
    assert config.cohorts()[0] == ("sample", MASTER, 2e-5, 0)   # the folder name below
    first = "cohort-sample-bf16-fp32-master-lr2e-05-start0"
    stamp = fingerprint(config) + "\n"
    cases = []
    for name in ("checkpoint.pt", "checkpoint.safetensors", "result.json", "fingerprint.txt"):
        out = tmp_path / preset_name / name.replace(".", "-")
        run = out / "checkpoints" / first
        run.mkdir(parents=True)
        (out / ".lock").write_text("")
        (out / "checkpoints" / "fingerprint.txt").write_text(stamp)
        target = out / "checkpoints" / name if name == "fingerprint.txt" else run / name
        _plant(target, marker, kind)
        cases.append((out, str(target) if name != "fingerprint.txt" else "other settings"))
    return cases


@pytest.mark.parametrize("kind", ["raw", "torch"])
def test_a_planted_pickle_in_an_ablation_folder_never_runs_on_resume(tmp_path, capsys, kind):
    marker = tmp_path / "the pickle ran"
    cases = {command: _planted_ablation(tmp_path, marker, kind, name)
             for command, name in (("ablate", "tiny"), ("demo", "tiny-headline"))}
    before = snapshot(tmp_path)
    for command, planted in cases.items():
        for out, named in planted:
            status = main([command, "--out", str(out), "--resume", "--no-progress"])
            assert not marker.exists(), out
            _left_as_it_was(capsys, status, command, tmp_path, before, named)
