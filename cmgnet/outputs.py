"""Result folders: one writer at a time, and failed writes that name the path.

Every command that writes results holds an :class:`OutputLock` on its folder while it
writes: ``cmgnet predict|export|evaluate --out``, a training run's directory, the
``compare``/``ablate`` study folder and ``launch/ship_model.py``'s target. A second writer
fails at once with one line naming the folder and the holder's pid, instead of the two
mixing their files or deleting each other's checkpoints. The lock is the operating system's
(``flock`` on ``<folder>/.lock``; ``msvcrt.locking`` on Windows), so a killed holder, ``kill -9``
included, never leaves a stale lock: the OS drops it with the process. The file is removed
on release; one left by a killed process is simply reused.

:func:`writing` turns a failed write (a full disk, a read-only file system, no permission)
into one line naming the path being written: ``open``/``write`` report ENOSPC without a
file name and safetensors' writer reports it as a ``SafetensorError`` without a path.

:func:`refuse_existing` is the one ``--overwrite`` rule of the commands that write results.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cmgnet.errors import CmgnetError, one_line

LOCK_NAME = ".lock"
WRITE_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES,
                                           errno.EPERM, errno.EIO, errno.EFBIG) if code is not None)
"""Error codes that mean a write failed for a reason outside the program (disk, permissions)."""
_WIN_LOCK_OFFSET = 1 << 30  # Windows locks a byte range: lock one far from the pid, which others read


class OutputInUseError(CmgnetError):
    """Another process holds the lock of an output folder."""


class WriteFailedError(CmgnetError):
    """A result could not be written (disk full, read-only file system, no permission)."""


def _lock(fd: int) -> bool:
    """Try to lock ``fd`` exclusively without waiting; ``False`` when another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # a file system without locks (some network mounts): write unguarded, say so
        print(f"warning: {err.strerror}: cannot lock output folders here; do not run two writers at once",
              file=sys.stderr)
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    os.close(fd)  # POSIX: closing the only descriptor drops the flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> str:
    """The pid written by the lock's holder (it may still be writing it: wait a moment)."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


class OutputLock:
    """An exclusive lock on one output folder, held while a command writes it.

    Use as a context manager, or :meth:`acquire` / :meth:`release`. The folder is created if
    missing (and removed again on release if nothing was written into it).

    Args:
        folder: the output folder.
        what: the folder's role in messages (``output folder``, ``run directory``, ...).
        hint: how to avoid the clash, appended to the message.

    Raises:
        OutputInUseError: (from :meth:`acquire`) another process holds the lock; the message
            names the folder and the holder's pid.
    """

    def __init__(self, folder: str | Path, what: str = "output folder",
                 hint: str = "wait for it to finish or choose another --out") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.hint = hint
        self._fd: int | None = None
        self._created = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        """Take the lock or fail at once (never waits for the holder)."""
        if self._fd is not None:
            return self
        self._created = not self.folder.exists()
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            with writing(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _lock(fd):
                holder = _holder(fd)
                os.close(fd)
                raise OutputInUseError(f"{self.what} in use by another process (pid {holder}); {self.hint}",
                                       self.folder)
            if _same_file(fd, self.path):
                break
            _unlock(fd)  # the holder released and removed the file between our open and lock: retry
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and remove its file (and the folder, when this lock created it and it stayed empty)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if _same_file(fd, self.path):  # not after the folder was replaced wholesale (ship_model)
            with contextlib.suppress(OSError):  # Windows cannot remove an open file: it is reused next time
                os.unlink(self.path)
        _unlock(fd)
        if self._created:
            with contextlib.suppress(OSError):  # only an empty folder goes
                self.folder.rmdir()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_on_main(accelerator: Any, folder: str | Path, what: str = "output folder",
                 hint: str = "wait for it to finish or choose another --out",
                 prepare: Callable[[], None] | None = None) -> OutputLock | None:
    """:class:`OutputLock` for a command that may run as several processes (``accelerate launch``).

    The main process takes the lock (then runs ``prepare``, e.g. the ``--overwrite`` check);
    a failure there is raised on every process, so no rank waits forever for the others.

    Args:
        accelerator: the run's :class:`~accelerate.Accelerator` (``is_main_process``, ``num_processes``).
        folder, what, hint: see :class:`OutputLock`.
        prepare: called on the main process once the lock is held.

    Returns:
        The held lock on the main process, ``None`` elsewhere.

    Raises:
        CmgnetError: the folder is in use, or ``prepare`` refused it (on every process; the main
            process raises the original error).
    """
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = OutputLock(folder, what, hint).acquire()
            if prepare is not None:
                prepare()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other processes heard of it
            if lock is not None:
                lock.release()
            problem = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = broadcast_object_list([one_line(problem) if problem is not None else None])[0]
        if shared is not None and problem is None:
            raise CmgnetError(shared)
    if problem is not None:
        raise problem
    return lock


def _under(path: str | Path, folder: Path) -> bool:
    try:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def writing(path: str | Path, what: str = "") -> Iterator[None]:
    """Name ``path`` in a failed write (full disk, read-only file system, no permission) inside the block.

    An ``OSError`` whose file is elsewhere (a read of an input) passes unchanged, as does
    anything else.

    Args:
        path: the file or folder being written.
        what: what it is, for the message (``checkpoint``, ``bundle``, ...).

    Raises:
        WriteFailedError: ``error: <path>: cannot write [what] (<reason>)``; the most precise
            path known (the file in the error, when it is inside ``path``).
    """
    path = Path(path)
    label = f"cannot write {what}".rstrip()
    try:
        yield
    except WriteFailedError:
        raise
    except OSError as err:
        if err.errno not in WRITE_ERRNOS or (err.filename is not None and not _under(err.filename, path)):
            raise
        where = err.filename if err.filename is not None else path
        raise WriteFailedError(f"{label} ({err.strerror or os.strerror(err.errno)})", where) from err
    except Exception as err:
        # Rust and C++ writers (safetensors, ONNX) report the OS error in their message only.
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found is None or int(found.group(1)) not in WRITE_ERRNOS:
            raise
        raise WriteFailedError(f"{label} ({os.strerror(int(found.group(1)))})", path) from err


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (where the OS supports it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every OS/file system; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file so readers see either the old or the new content.

    Raises:
        WriteFailedError: the disk is full, read-only or not writable (naming ``path``; the old
            content stays).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes writing the same file do not share it
    with writing(path), open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place (``dst`` is replaced; a crash keeps one of them)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def refuse_existing(folder: str | Path, found: Sequence[Path], overwrite: bool, what: str = "results") -> None:
    """The ``--overwrite`` rule: a folder that already holds results is refused unless asked.

    Args:
        folder: the output folder.
        found: result files already in it (each command knows its own).
        overwrite: ``--overwrite`` was given (the caller then replaces ``found``).
        what: what they are, for the message.

    Raises:
        CmgnetError: ``found`` is not empty and ``overwrite`` is false (exit code 1).
    """
    if found and not overwrite:
        folder = Path(folder)
        example = found[0].relative_to(folder) if found[0].is_relative_to(folder) else found[0]
        raise CmgnetError(f"already holds {what} ({len(found)} files, e.g. {example}); pass --overwrite to replace "
                          "them or choose another --out", folder)
