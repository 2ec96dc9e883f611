"""rlvr_optim.files: atomic writes, folders built beside, input protection, folder locks."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rlvr_optim import files
from rlvr_optim.errors import InputError


def _listing(folder):
    return sorted(os.listdir(folder))


def test_atomic_write_replaces_and_keeps_mode(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    files.write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert _listing(tmp_path) == ["out.bin"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~mask


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("disk full, say")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["out.json"]
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_write(target) as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["out.json"]


def test_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path):
    real = tmp_path / "real"
    real.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(real)
    files.write_text(link, "new")
    assert real.read_text() == "keep"
    assert not link.is_symlink() and link.read_text() == "new"


def test_write_json_round_trip(tmp_path):
    files.write_json(tmp_path / "a.json", {"b": [1, 2]}, sort_keys=True)
    assert (tmp_path / "a.json").read_text() == '{"b": [1, 2]}\n'


def test_atomic_folder_replaces_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with files.atomic_folder(out) as temp:
        assert temp.parent == tmp_path and temp != out
        (temp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old folder stands until the end
    assert _listing(out) == ["new.txt"]
    assert _listing(tmp_path) == ["report"]
    with pytest.raises(OSError):
        with files.atomic_folder(out) as temp:
            (temp / "part.txt").write_text("part")
            raise OSError("no space left on device")
    assert _listing(out) == ["new.txt"]
    assert _listing(tmp_path) == ["report"]


def test_atomic_folder_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        with files.atomic_folder(tmp_path / "f"):
            pass
    assert (tmp_path / "f").read_text() == "x"


def test_refuse_output_over_inputs(tmp_path):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"b")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"m")
    os.link(base, tmp_path / "hard")
    (tmp_path / "soft").symlink_to(base)
    (tmp_path / "sub").mkdir()
    for bad in (base, tmp_path / "sub" / ".." / "base.safetensors", tmp_path / "hard",
                tmp_path / "soft", hf / "model.safetensors", hf, tmp_path):
        with pytest.raises(InputError, match="-o"):
            files.refuse_output_over_inputs("-o", bad, [base, hf])
    files.refuse_output_over_inputs("-o", tmp_path / "patch.safetensors", [base, hf])
    files.refuse_output_over_inputs("-o", tmp_path / "sub", [base, hf])


def test_folder_lock_refuses_a_second_holder(tmp_path):
    folder = tmp_path / "runs"
    code = textwrap.dedent(f"""
        import sys, time
        from rlvr_optim import files
        with files.folder_lock({str(folder)!r}):
            print("locked", flush=True)
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match="another rlvr-optim process"):
            with files.folder_lock(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with files.folder_lock(folder):  # released when its holder died
        pass


def test_sigterm_removes_the_temporary_file(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    code = textwrap.dedent(f"""
        import sys, time
        from rlvr_optim import files
        try:
            with files.raise_on_sigterm(), files.atomic_write({str(target)!r}) as f:
                f.write(b"part")
                print("writing", flush=True)
                time.sleep(30)
        except files.Terminated:
            sys.exit(143)
    """)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=30) == 143
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["big.bin"]


def test_unnamed_write_has_no_name_until_complete(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with files.atomic_write_unnamed(target) as f:
        f.write(b"new " * 1000)
        assert _listing(tmp_path) == ["weights.safetensors"]  # nothing named yet
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new " * 1000
    assert _listing(tmp_path) == ["weights.safetensors"]
    with pytest.raises(OSError):
        with files.atomic_write_unnamed(target) as f:
            f.write(b"half")
            raise OSError("no space left on device")
    assert target.read_bytes() == b"new " * 1000
    assert _listing(tmp_path) == ["weights.safetensors"]
    with files.atomic_write_unnamed(tmp_path / "fresh.bin") as f:
        f.write(b"x")
    assert (tmp_path / "fresh.bin").read_bytes() == b"x"


def test_sigkill_during_an_unnamed_write_leaves_nothing(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    code = textwrap.dedent(f"""
        import time
        from rlvr_optim import files
        with files.atomic_write_unnamed({str(target)!r}) as f:
            f.write(b"x" * (8 << 20))
            f.flush()
            print("writing", flush=True)
            time.sleep(30)
    """)
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait(timeout=30)
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["big.bin"]
