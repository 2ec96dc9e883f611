"""Helpers for the tests of failing file systems: full disks, read-only folders, snapshots.

A real small file system (a tmpfs) needs the right to mount one (root in a container that
allows it); where that is missing the tests that need one skip and say why, and the same
failures are also simulated in-process (an ``os.fsync`` that raises ``ENOSPC``), which
runs everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

TEMP_PREFIX = ".rlvr-optim-"


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every file (its bytes), symbolic link (its target) and folder (None) under ``root``,
    hidden ones included."""
    found: dict[str, bytes | str | None] = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[os.path.relpath(path, root)] = os.readlink(path)
            elif name in dirs:
                found[os.path.relpath(path, root)] = None
            else:
                found[os.path.relpath(path, root)] = Path(path).read_bytes()
    return found


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders of rlvr_optim.files under ``root``."""
    return [os.path.join(folder, name) for folder, dirs, names in os.walk(root)
            for name in dirs + names if name.startswith(TEMP_PREFIX)]


def _mount(args: list[str]) -> str | None:
    """Run mount/umount; the reason it failed, or None."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip() or f"status {done.returncode}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m"):
    """A tmpfs of ``size`` mounted at ``path`` (created) for the block; skips the test
    where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    why = _mount(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)])
    if why is not None:
        pytest.skip(f"a small file system needs the right to mount a tmpfs, which this "
                    f"machine refuses ({why}); the in-process ENOSPC tests cover the same path")
    try:
        yield path
    finally:
        _mount(["umount", "-l", str(path)])


def fill(path: Path, leave: int = 0) -> None:
    """Fill the file system of ``path`` with one file, then give back ``leave`` bytes."""
    filler = path / "filler"
    chunk = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while os.write(fd, chunk):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    if leave:
        size = filler.stat().st_size
        os.truncate(filler, max(0, size - leave))


@contextlib.contextmanager
def read_only(folder: Path):
    """Make ``folder`` (already filled) read-only for the block.

    Not root: chmod. Root ignores permissions, so there the folder is replaced by a
    read-only tmpfs holding a copy of it; the test skips, saying why, where that mount is
    not permitted.
    """
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield folder
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    saved = snapshot(folder)
    for name in sorted(saved, reverse=True):  # empty the folder, then mount over it
        p = folder / name
        p.rmdir() if saved[name] is None else p.unlink()
    try:
        with tmpfs(folder, "4m"):
            _restore(folder, saved)
            why = _mount(["mount", "-o", "remount,ro", str(folder)])
            if why is not None:
                pytest.skip(f"root ignores chmod, and remounting a tmpfs read-only failed "
                            f"({why})")
            yield folder
    finally:
        _restore(folder, saved)  # the folder under the mount, as it was


def _restore(folder: Path, saved: dict[str, bytes | str | None]) -> None:
    for name, data in sorted(saved.items()):
        path = folder / name
        if data is None:
            path.mkdir(exist_ok=True)
        elif isinstance(data, str):
            if not path.is_symlink():
                path.symlink_to(data)
        else:
            path.write_bytes(data)
