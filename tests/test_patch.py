"""Patches between checkpoints (rlvr_optim.patch) and ``rlvr-optim patch make/apply``.

A patch is a delta of rlvr_optim.sync with the state checksums of its base and result.
The command line refuses, with one line on stderr and exit status 2, anything that would
destroy an input or leave a half-written file, and leaves inputs and earlier outputs
byte-identical and no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlvr_optim import AdamW, sync
from rlvr_optim.cli import main
from rlvr_optim.patch import DeltaError, apply_patches, load_patch, make_patch
from rlvr_optim.sync import Delta


def _bits(weights):
    return {k: v.detach().view(torch.int16).clone() for k, v in weights.items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
def run():
    """Weights before and after each of 4 SR steps, and each step's bitmaps."""
    model = _model()
    opt = AdamW(model.named_parameters(), lr=2e-3, track_changes="step", rounding="stochastic")
    g = torch.Generator().manual_seed(1)
    states, maps = [_weights(model)], []
    for _ in range(4):
        model(torch.randn(8, 16, generator=g).bfloat16()).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        states.append(_weights(model))
        maps.append({n: opt.change_bitmap(p).clone() for n, p in model.named_parameters()})
    return {"states": states, "bitmaps": maps}


def _patches(run):
    s = run["states"]
    return [make_patch(s[k + 1], base=s[k], sequence=k + 1) for k in range(4)]


def test_patches_applied_in_order_give_bit_identical_weights(run, tmp_path):
    weights = {k: v.clone() for k, v in run["states"][0].items()}
    for i, patch in enumerate(_patches(run)):
        patch.save(tmp_path / f"{i}.safetensors")
    apply_patches(weights, [load_patch(tmp_path / f"{i}.safetensors") for i in range(4)])
    assert _same(_bits(weights), _bits(run["states"][4]))
    assert not _same(_bits(run["states"][0]), _bits(run["states"][4]))


def test_bitmap_patches_equal_diff_patches_and_missed_changes_are_refused(run):
    s = run["states"]
    for k, diff in enumerate(_patches(run)):
        from_bitmaps = make_patch(s[k + 1], base=s[k], sequence=k + 1, changed=run["bitmaps"][k])
        assert from_bitmaps.to_bytes() == diff.to_bytes()
    short = {n: torch.zeros_like(b) for n, b in run["bitmaps"][0].items()}
    with pytest.raises(ValueError, match="elements differ from the base but their change bits"):
        make_patch(s[1], base=s[0], sequence=1, changed=short)


def test_patch_sizes(run):
    for patch in _patches(run):
        report = patch.report()
        assert report["full_bytes"] == 2 * report["numel"]
        assert 0 < report["changed"] < report["numel"]
        # 4 index bytes + 2 value bytes per change, plus the header (names, checksums).
        assert 6 * report["changed"] < report["file_bytes"] < 6 * report["changed"] + 4000


def test_wrong_base_and_out_of_order_are_refused_with_weights_untouched(run):
    p1, p2, p3, _ = _patches(run)
    other = {k: v.clone() for k, v in run["states"][0].items()}
    other["0.bias"][3] += 1
    before = _bits(other)
    with pytest.raises(DeltaError, match="applies to other weights: tensor '0.bias'"):
        apply_patches(other, [p1])
    assert _same(_bits(other), before)
    weights = {k: v.clone() for k, v in run["states"][0].items()}
    with pytest.raises(DeltaError, match=r"out of order: patch 1 \(sequence 1\)"):
        apply_patches(weights, [p2, p1])
    with pytest.raises(DeltaError, match="patch sequence 2 applies to other weights"):
        apply_patches(weights, [p2])
    apply_patches(weights, [p1])
    with pytest.raises(DeltaError, match="patch sequence 1 applies to other weights"):
        apply_patches(weights, [p1])  # already applied
    assert _same(_bits(weights), _bits(run["states"][1]))


def test_a_corrupt_last_patch_leaves_the_weights_untouched(run):
    p1, p2, p3, _ = _patches(run)
    name = next(iter(p3.values))
    p3.values[name] = p3.values[name].clone()
    p3.values[name][0] += 1
    weights = {k: v.clone() for k, v in run["states"][0].items()}
    with pytest.raises(DeltaError, match="the delta is corrupt"):
        apply_patches(weights, [p1, p2, p3])
    assert _same(_bits(weights), _bits(run["states"][0]))


# ------------------------------------------------------------------ the command line


@pytest.fixture
def files(run, tmp_path):
    """BASE and NEW safetensors files, a patch from one to the other, in tmp_path."""
    base, new = tmp_path / "base.safetensors", tmp_path / "new.safetensors"
    save_file(run["states"][0], base, metadata={"format": "pt"})
    save_file(run["states"][2], new, metadata={"format": "pt"})
    patch = tmp_path / "p.safetensors"
    assert main(["patch", "make", str(base), str(new), "-o", str(patch), "--sequence", "2"]) == 0
    return base, new, patch


def _contents(folder):
    return {p.name: p.read_bytes() if p.is_file() else None for p in Path(folder).iterdir()}


def _refused(capsys, status, command, *needles):
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"rlvr-optim {command}: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in captured.err


def test_cli_make_and_apply_round_trip(files, run, tmp_path, capsys):
    base, new, patch = files
    assert main(["patch", "make", str(base), str(new), "-o", str(patch), "--sequence", "2"]) == 0
    assert "441 of 676 elements changed" in capsys.readouterr().out
    out = tmp_path / "out.safetensors"
    assert main(["patch", "apply", str(base), str(patch), "-o", str(out)]) == 0
    assert _same(_bits(load_file(out)), _bits(run["states"][2]))
    made = load_patch(patch)
    assert made.base_sums == sync.state_checksums(run["states"][0])
    assert made.result_sums == sync.state_checksums(run["states"][2])


def test_patch_make_refuses_an_output_that_is_an_input(files, tmp_path, capsys):
    base, new, patch = files
    (tmp_path / "sub").mkdir()
    os.link(base, tmp_path / "hard.safetensors")
    before = _contents(tmp_path)
    for output in (base, new, tmp_path / "sub" / ".." / "base.safetensors",
                   tmp_path / "hard.safetensors"):
        status = main(["patch", "make", str(base), str(new), "-o", str(output), "--sequence", "2"])
        _refused(capsys, status, "patch make", f"-o {output}", "would destroy it")
        assert _contents(tmp_path) == before


def test_patch_apply_refuses_an_output_that_is_an_input(files, tmp_path, capsys):
    base, new, patch = files
    before = _contents(tmp_path)
    for output in (base, patch):
        status = main(["patch", "apply", str(base), str(patch), "-o", str(output)])
        _refused(capsys, status, "patch apply", f"-o {output}", "would destroy it")
        assert _contents(tmp_path) == before


def test_patch_apply_reads_what_patch_make_reads(files, run, tmp_path):
    base, new, patch = files
    folder = tmp_path / "base_hf"
    folder.mkdir()
    save_file(run["states"][0], folder / "model.safetensors")
    torch_file = tmp_path / "base.bin"
    torch.save(run["states"][0], torch_file)
    for weights in (folder, torch_file):
        out = tmp_path / f"out-{weights.name}.safetensors"
        assert main(["patch", "apply", str(weights), str(patch), "-o", str(out)]) == 0
        assert _same(_bits(load_file(out)), _bits(run["states"][2]))


def test_a_full_disk_leaves_the_earlier_output_and_no_temporary_file(files, tmp_path, capsys,
                                                                     monkeypatch):
    base, new, patch = files
    before = _contents(tmp_path)

    def full(f, entries, metadata):
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sync, "_write_safetensors", full)
    status = main(["patch", "make", str(base), str(new), "-o", str(patch), "--sequence", "2"])
    _refused(capsys, status, "patch make", f"-o {patch}", "No space left on device")
    out = tmp_path / "applied.safetensors"
    status = main(["patch", "apply", str(base), str(patch), "-o", str(out)])
    _refused(capsys, status, "patch apply", f"-o {out}", "No space left on device")
    assert _contents(tmp_path) == before


def test_the_same_patch_made_twice_gives_identical_bytes(files, tmp_path):
    base, new, patch = files
    again = tmp_path / "again.safetensors"
    code = ("import sys; from rlvr_optim.cli import main; "
            f"sys.exit(main(['patch', 'make', {str(base)!r}, {str(new)!r}, '-o', {str(again)!r}, "
            "'--sequence', '2']))")
    for seed in ("1", "2"):  # another process, another hash seed (dict and set order)
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                       timeout=300)
        assert again.read_bytes() == patch.read_bytes()


def _rewrite_indices(path, change):
    """Rewrite a patch file's first index tensor with ``change`` applied, header kept."""
    data = bytearray(Path(path).read_bytes())
    delta = Delta.from_bytes(bytes(data))
    name = sorted(delta.indices)[0]
    indices = delta.indices[name].clone()
    change(indices)
    header = int.from_bytes(data[:8], "little")
    import json
    entry = json.loads(data[8:8 + header])[name + ".indices"]
    start, end = (8 + header + o for o in entry["data_offsets"])
    data[start:end] = indices.numpy().tobytes()
    Path(path).write_bytes(bytes(data))
    return name


@pytest.mark.parametrize("damage, reason", [
    ("unsorted", "is not above index"), ("repeated", "is not above index"),
    ("negative", "index 0 is negative"), ("out of range", "past the tensor's"),
    ("truncated", "truncated"),
])
def test_patch_apply_names_a_damaged_patch_file(files, tmp_path, capsys, damage, reason):
    base, new, patch = files

    def middle(indices, value):
        indices[indices.numel() // 2] = value

    changes = {
        "unsorted": lambda i: middle(i, int(i[0])),
        "repeated": lambda i: middle(i, int(i[i.numel() // 2 - 1])),
        "negative": lambda i: i.__setitem__(0, -5),
        "out of range": lambda i: i.__setitem__(-1, 10**6),
    }
    if damage == "truncated":
        patch.write_bytes(patch.read_bytes()[:-7])
        needle = str(patch)
    else:
        name = _rewrite_indices(patch, changes[damage])
        needle = f"indices of {name!r}"
    before = _contents(tmp_path)
    out = tmp_path / "applied.safetensors"
    status = main(["patch", "apply", str(base), str(patch), "-o", str(out)])
    _refused(capsys, status, "patch apply", str(patch), needle, reason)
    assert _contents(tmp_path) == before


def test_sigkill_during_patch_apply_leaves_no_temporary_file(files, tmp_path):
    base, new, patch = files
    out = tmp_path / "applied.safetensors"
    out.write_bytes(b"earlier output")
    before = _contents(tmp_path)
    code = textwrap.dedent(f"""
        import sys, time
        from rlvr_optim import sync
        from rlvr_optim.cli import main

        def slow(f, entries, metadata):
            f.write(b"x" * (4 << 20))
            f.flush()
            print("writing", flush=True)
            time.sleep(60)

        sync._write_safetensors = slow
        main(["patch", "apply", {str(base)!r}, {str(patch)!r}, "-o", {str(out)!r}])
    """)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()
        writer.wait(timeout=60)
    assert _contents(tmp_path) == before
