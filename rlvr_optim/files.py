"""Writing files so that none is ever lost or half-written.

Every file and folder the package writes goes through this module (git and sqlite do the
same): the new content is written to a temporary name in the destination folder, flushed
and fsynced, then renamed over the target, so a reader sees the old file or the new one,
never a part. A failure, Ctrl-C or SIGTERM (see :func:`raise_on_sigterm`) removes the
temporary file and leaves the target as it was. A set of files (a report) is built in a
temporary folder and added at the end (:func:`atomic_files`); an ``OSError`` met on a
temporary name names the target instead, so a one-line message can say which output failed.

Before any work starts, a command checks that no output is one of its inputs
(:func:`refuse_output_over_inputs`, :func:`refuse_folder_over_inputs`) and takes the output folder's lock
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
from typing import IO, Any, Iterable, Iterator, Mapping

from .errors import InputError

__all__ = [
    "Terminated",
    "atomic_files",
    "atomic_folder",
    "atomic_write",
    "atomic_write_unnamed",
    "folder_lock",
    "raise_on_sigterm",
    "refuse_folder_over_inputs",
    "refuse_output_over_inputs",
    "same_file",
    "write_bytes",
    "write_figure",
    "write_json",
    "write_safetensors",
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


def _name_target(exc: BaseException, temp: str, target: str) -> None:
    """Make an ``OSError`` met while writing ``temp`` (a file or folder of this module)
    name ``target``, the path the user gave, so that its message means something to them.
    A write that fails for a full disk names no file at all; it gets ``target`` too."""
    if not isinstance(exc, OSError):
        return
    name = exc.filename
    if name is None:
        exc.filename = target
        return
    name = os.fspath(name)
    if name == temp:
        exc.filename = target
    elif name.startswith(temp.rstrip(os.sep) + os.sep):
        exc.filename = os.path.join(target, os.path.relpath(name, temp))


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
    try:
        fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX + os.path.basename(path) + ".",
                                    suffix=".tmp", dir=folder)
    except OSError as exc:
        _name_target(exc, exc.filename and os.fspath(exc.filename), path)
        raise
    try:
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        _name_target(exc, temp, path)
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


def write_figure(path: PathLike, fig: Any, **savefig_options: Any) -> None:
    """Save a matplotlib figure to ``path`` atomically, in the format its suffix names
    (default png); ``savefig_options`` go to ``fig.savefig``."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_write(path) as f:
        fig.savefig(f, format=fmt, **savefig_options)


def write_safetensors(path: PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write ``tensors`` (name -> torch tensor) as a safetensors file, atomically.

    Args:
        path: the target file.
        tensors: contiguous CPU or device tensors; they are serialized in memory first.
        metadata: the header's string metadata (default None: none).

    Returns the number of bytes written.
    """
    from safetensors.torch import save  # noqa: PLC0415 - safetensors is imported where used

    data = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    write_bytes(path, data)
    return len(data)


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
    temp = _make_temp_folder(path, parent)
    try:
        yield Path(temp)
        _fsync_files(temp)
        os.chmod(temp, 0o777 & ~_umask())
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=_TEMP_PREFIX + "old.", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        _name_target(exc, temp, path)
        raise
    _fsync_folder(parent)


def _make_temp_folder(target: str, parent: str) -> str:
    """A new empty folder in ``parent`` named after ``target``; errors name ``target``."""
    try:
        return tempfile.mkdtemp(prefix=_TEMP_PREFIX + os.path.basename(target) + ".",
                                dir=parent)
    except OSError as exc:
        _name_target(exc, exc.filename and os.fspath(exc.filename), target)
        raise


def _fsync_files(folder: str) -> None:
    """fsync every file under ``folder``, so that a rename publishes complete files."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_files(folder: PathLike) -> Iterator[Path]:
    """Add a set of files to ``folder``: every one of them, whole, or none.

    Yields an empty temporary folder to write the files into. When the block ends, a
    ``folder`` that did not exist is the temporary folder renamed (its missing parents are
    created first); into an existing one each file is renamed, replacing the file of its
    name and keeping the others (a report folder may hold other files: unlike
    :func:`atomic_folder`, nothing else is removed). If the block raises, the temporary
    folder and the parents made for it are removed, and ``folder`` is as it was.

    The temporary folder lies in ``folder`` when it exists (so that the renames stay on
    its file system), else beside it; errors met there name the path under ``folder``.
    """
    folder = os.path.abspath(os.fspath(folder))
    if os.path.lexists(folder) and not os.path.exists(folder):
        os.stat(folder)  # a dangling link or a loop: raises the OSError that says which
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"{folder} is a file; give a folder")
    made = []
    parent = os.path.dirname(folder)
    while not os.path.lexists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        os.stat(parent)  # a loop or a dangling link raises here, saying which
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), parent)
    try:
        for missing in reversed(made):
            os.mkdir(missing)
        existed = os.path.isdir(folder)
        temp = _make_temp_folder(folder, folder if existed else os.path.dirname(folder))
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield Path(temp)
        _fsync_files(temp)
        if existed:
            for name in sorted(os.listdir(temp)):
                os.replace(os.path.join(temp, name), os.path.join(folder, name))
            os.rmdir(temp)
            _fsync_folder(folder)
        else:
            os.chmod(temp, 0o777 & ~_umask())
            os.replace(temp, folder)
            _fsync_folder(os.path.dirname(folder))
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        _remove_empty(made)
        _name_target(exc, temp, folder)
        raise


def _remove_empty(folders: list[str]) -> None:
    """Remove the folders (innermost first) that are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


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


def refuse_folder_over_inputs(option: str, folder: PathLike, names: Iterable[str],
                              inputs: Iterable[PathLike]) -> None:
    """Raise :class:`InputError` if adding the files ``names`` to ``folder`` (see
    :func:`atomic_files`) would replace an input, or if ``folder`` is an input folder
    (files added to a checkpoint folder would be read as part of it).

    Args:
        option: the option that named the folder (``"--out"``), named in the message.
        folder: the output folder.
        names: the file names the command writes there.
        inputs: files or folders read by the command.
    """
    inputs = [os.fspath(given) for given in inputs]
    for given in inputs:
        if os.path.isdir(given) and same_file(folder, given):
            raise InputError(f"{option} {os.fspath(folder)} is the input folder {given}; "
                             "files written there would be read as part of it; give another "
                             "folder")
    for name in names:
        refuse_output_over_inputs(option, os.path.join(os.fspath(folder), name), inputs)


@contextlib.contextmanager
def folder_lock(folder: PathLike, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (its ``.lock`` file) for the block.

    Raises :class:`InputError` at once if another process holds it, or with ``wait=True``
    waits for it (a first-use extension build another process is running). The folder is
    created if missing.
    """
    import fcntl  # noqa: PLC0415 - POSIX only; imported where a lock is taken

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise InputError(f"{folder} is being written by another rlvr-optim process; "
                                 "wait for it to finish or choose another folder") from None
            raise
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
