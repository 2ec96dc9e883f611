"""Writing files so that none is ever lost or half-written.

Every file and folder the package writes goes through this module (git and sqlite do the
same): the new content is written to a temporary name in the destination folder, flushed
and fsynced, then renamed over the target, so a reader sees the old file or the new one,
never a part. A failure, Ctrl-C or SIGTERM (see :func:`raise_on_sigterm`) removes the
temporary file and leaves the target as it was.

Before any work starts, a command checks that no output is one of its inputs
(:func:`refuse_output_over_inputs`) and takes the output folder's lock
(:func:`folder_lock`) when it writes there over a long time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .errors import InputError

__all__ = [
    "Terminated",
    "atomic_folder",
    "atomic_write",
    "atomic_write_unnamed",
    "folder_lock",
    "raise_on_sigterm",
    "refuse_output_over_inputs",
    "same_file",
    "write_bytes",
    "write_json",
    "write_text",
]

PathLike = str | os.PathLike
_TEMP_PREFIX = ".rlvr-optim-"


class Terminated(BaseException):
    """SIGTERM arrived (see :func:`raise_on_sigterm`); unwinds like ``KeyboardInterrupt``."""


@contextlib.contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` inside the block, so that the ``finally``
    clauses of this module run and remove their temporary files (main thread only)."""

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fsync_folder(folder: PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; rename it over ``path`` on success.

    Args:
        path: the target file; its folder must exist.
        mode: ``"wb"`` (default) or ``"w"`` (text, ``encoding`` default utf-8).
        encoding: text encoding for ``mode="w"``.

    The temporary file is created in the target's folder (a rename is atomic only within
    one file system), flushed and fsynced before the rename, and removed if the block
    raises anything, ``KeyboardInterrupt`` included. A symlink at ``path`` is replaced by
    the file, not followed.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX + os.path.basename(path) + ".",
                                suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(folder)


@contextlib.contextmanager
def atomic_write_unnamed(path: PathLike) -> Iterator[IO[bytes]]:
    """:func:`atomic_write` (binary) for large outputs: nothing is left behind if the
    process is killed.

    The data go to a file without a name (Linux ``O_TMPFILE``) in the target's folder; it
    gets a name only when it is complete and fsynced, and is then renamed over ``path``. A
    process killed mid-write, even by SIGKILL, leaves no temporary file: the kernel frees
    a file that has no name when it is closed. (Between the link and the rename, a few
    system calls, the complete file has a temporary name beside the target.) Where the file
    system cannot make unnamed files, this is :func:`atomic_write`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd = None
    unnamed = getattr(os, "O_TMPFILE", None)
    if unnamed is not None:
        try:
            fd = os.open(folder, unnamed | os.O_RDWR, 0o666)
        except OSError as exc:
            # EISDIR: a kernel without O_TMPFILE; EOPNOTSUPP: a file system without it.
            if exc.errno not in (errno.EISDIR, errno.EOPNOTSUPP, errno.EINVAL):
                raise
    if fd is None:
        with atomic_write(path, "wb") as f:
            yield f
        return
    temp = os.path.join(folder, f"{_TEMP_PREFIX}{os.path.basename(path)}."
                                f"{secrets.token_hex(4)}.tmp")
    with os.fdopen(fd, "w+b") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
        try:
            os.link(f"/proc/self/fd/{f.fileno()}", temp)
        except OSError:  # no /proc: copy the finished file into a named temporary one
            f.seek(0)
            with atomic_write(path, "wb") as named:
                shutil.copyfileobj(f, named)
            return
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(folder)


def _umask() -> int:
    """The process umask (mkstemp creates files 0600; written files get the usual mode)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (utf-8) to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: PathLike, value: Any, **dump_options: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically (``dump_options`` go to json.dump)."""
    with atomic_write(path, "w") as f:
        json.dump(value, f, **dump_options)
        f.write("\n")


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Build a folder beside ``path`` and put it in place of ``path`` when the block ends.

    Yields the temporary folder to write into. On success an existing ``path`` (a folder)
    is moved aside, the new folder renamed to ``path``, and the old one removed; if the
    block raises, the temporary folder is removed and ``path`` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path} is a file; give a folder")
    temp = tempfile.mkdtemp(prefix=_TEMP_PREFIX + os.path.basename(path) + ".", dir=parent)
    try:
        yield Path(temp)
        for root, _, names in os.walk(temp):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(temp, 0o777 & ~_umask())
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=_TEMP_PREFIX + "old.", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync_folder(parent)


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: the same path after resolving links and ``..``,
    or the same inode (a hard link). A path that does not exist equals only itself."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _files_under(path: PathLike) -> Iterable[str]:
    path = os.fspath(path)
    if os.path.isdir(path):
        for root, _, names in os.walk(path):
            for name in names:
                yield os.path.join(root, name)
    else:
        yield path


def refuse_output_over_inputs(option: str, output: PathLike,
                              inputs: Iterable[PathLike]) -> None:
    """Raise :class:`InputError` if writing ``output`` would replace an input: the same
    file (by path, link or hard link), a file inside an input folder, or a folder that
    holds an input.

    Args:
        option: the option that named the output (``"-o"``), named in the message.
        output: the file or folder to be written.
        inputs: files or folders read by the command.
    """
    out = os.fspath(output)
    for given in inputs:
        given = os.fspath(given)
        for name in (given, *_files_under(given)):
            if same_file(out, name):
                raise InputError(f"{option} {out} is the input {name}; writing there would "
                                 "destroy it; give another path")
        if os.path.isdir(out) and os.path.realpath(given).startswith(
                os.path.realpath(out).rstrip(os.sep) + os.sep):
            raise InputError(f"{option} {out} holds the input {given}; replacing that folder "
                             "would destroy it; give another path")


@contextlib.contextmanager
def folder_lock(folder: PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (its ``.lock`` file) for the block.

    Raises :class:`InputError` at once if another process holds it. The folder is created
    if missing.
    """
    import fcntl  # noqa: PLC0415 - POSIX only; imported where a lock is taken

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise InputError(f"{folder} is being written by another rlvr-optim process; "
                                 "wait for it to finish or choose another folder") from None
            raise
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
