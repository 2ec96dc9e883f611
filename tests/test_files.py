"""rlvr_optim.files: atomic writes, folders built beside, input protection, folder locks."""

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from file_faults import fill, leftovers, snapshot, tmpfs

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


# ------------------------------------------------------------------ errors name the target


def _failing_fsync(monkeypatch, fail_at: int = 1, code: int = errno.ENOSPC):
    """Make the ``fail_at``-th fsync of a written file raise ``code``, as a full disk does
    (a write can succeed in the page cache and fail when it reaches the disk)."""
    real = os.fsync
    calls = []

    def fsync(fd):
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder's fsync after a rename
            return real(fd)
        calls.append(fd)
        if len(calls) == fail_at:
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return calls


def test_a_full_disk_names_the_target_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "rows.json"
    target.write_text("old")
    _failing_fsync(monkeypatch)
    with pytest.raises(OSError) as exc:
        files.write_json(target, {"a": 1})
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
    assert target.read_text() == "old" and _listing(tmp_path) == ["rows.json"]


def test_a_missing_or_unreachable_folder_names_the_target(tmp_path):
    for folder in (tmp_path / "missing", Path("/proc/self/no such folder")):
        target = folder / "out.json"
        with pytest.raises(OSError) as exc:
            files.write_text(target, "x")
        assert exc.value.filename == str(target)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OSError) as exc:
        files.write_text(loop / "out.json", "x")
    assert exc.value.errno == errno.ELOOP and exc.value.filename == str(loop / "out.json")
    assert leftovers(tmp_path) == []


def test_a_full_file_system_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    with tmpfs(tmp_path / "small", "64k") as disk:
        target = disk / "weights.safetensors"
        target.write_bytes(b"old")
        fill(disk, leave=4096)
        tensors = {"w": torch.arange(64 * 1024, dtype=torch.float32)}
        with pytest.raises(OSError) as exc:
            files.write_safetensors(target, tensors)
        assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(target)
        assert target.read_bytes() == b"old"
        assert sorted(os.listdir(disk)) == ["filler", "weights.safetensors"]


def test_write_safetensors_and_write_figure(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.uint8)}
    size = files.write_safetensors(tmp_path / "t.safetensors", tensors, {"k": "v"})
    assert size == (tmp_path / "t.safetensors").stat().st_size
    loaded = load_file(tmp_path / "t.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    files.write_figure(tmp_path / "f.png", fig)
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _listing(tmp_path) == ["f.png", "t.safetensors"]


# ------------------------------------------------------------------ atomic_files


def test_atomic_files_builds_a_new_folder_beside_and_renames_it(tmp_path):
    out = tmp_path / "a" / "b" / "report"
    with files.atomic_files(out) as temp:
        assert temp.parent == out.parent and not out.exists()
        files.write_text(temp / "one.md", "1")
        (temp / "two.json").write_text("2")
    assert _listing(out) == ["one.md", "two.json"]
    assert leftovers(tmp_path) == []


def test_atomic_files_replaces_its_files_and_keeps_the_others(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "one.md").write_text("old")
    (out / "notes.txt").write_text("mine")
    with files.atomic_files(out) as temp:
        assert temp.parent == out  # on the folder's own file system
        (temp / "one.md").write_text("new")
    assert _listing(out) == ["notes.txt", "one.md"]
    assert (out / "one.md").read_text() == "new" and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("exists", [False, True])
def test_atomic_files_failing_leaves_everything_as_it_was(tmp_path, monkeypatch, exists):
    out = tmp_path / "new" / "report"
    if exists:
        out.mkdir(parents=True)
        (out / "one.md").write_text("old")
    before = snapshot(tmp_path)
    _failing_fsync(monkeypatch, fail_at=2)
    with pytest.raises(OSError) as exc:
        with files.atomic_files(out) as temp:
            files.write_text(temp / "one.md", "new")
            files.write_text(temp / "two.md", "new")
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(out / "two.md")
    assert snapshot(tmp_path) == before  # no half folder, no parent made for it
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_files(out) as temp:
            (temp / "one.md").write_text("new")
            raise KeyboardInterrupt
    assert snapshot(tmp_path) == before


def test_atomic_files_refuses_a_file_a_loop_and_a_dangling_link(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        with files.atomic_files(tmp_path / "f"):
            pass
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(OSError) as exc:
        with files.atomic_files(tmp_path / "loop"):
            pass
    assert exc.value.errno == errno.ELOOP
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        with files.atomic_files(tmp_path / "dangling"):
            pass
    assert (tmp_path / "dangling").is_symlink() and leftovers(tmp_path) == []


def test_refuse_folder_over_inputs(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"m")
    (tmp_path / "principal.safetensors").write_bytes(b"p")
    base = tmp_path / "principal.safetensors"
    with pytest.raises(InputError, match="--out .* is the input folder"):
        files.refuse_folder_over_inputs("--out", hf, ["principal.safetensors"], [hf])
    with pytest.raises(InputError, match="--out .* is the input"):
        files.refuse_folder_over_inputs("--out", tmp_path, ["principal.safetensors"], [base])
    # A folder that merely holds an input is fine when no file of that name is written.
    files.refuse_folder_over_inputs("--out", tmp_path, ["random.safetensors"], [base, hf])
    files.refuse_folder_over_inputs("--out", hf / "masks", ["principal.safetensors"], [hf])


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


def test_folder_lock_with_wait_waits_for_the_holder(tmp_path):
    """``wait=True`` (the extensions' first-use build): a second holder waits instead of
    failing, and gets the lock when the first lets go."""
    import threading

    folder = tmp_path / "ext"
    code = textwrap.dedent(f"""
        import sys
        from rlvr_optim import files
        with files.folder_lock({str(folder)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    got = threading.Event()

    def second():
        with files.folder_lock(folder, wait=True):
            got.set()

    try:
        assert holder.stdout.readline().strip() == "locked"
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not got.wait(0.5)  # still held
        holder.stdin.write("go\n")
        holder.stdin.flush()
        waiter.join(60)
        assert got.is_set()
    finally:
        holder.kill()
        holder.wait()
