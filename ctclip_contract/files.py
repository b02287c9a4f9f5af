"""Files the project writes and reads: the one atomic writer, JSON read with errors that name the file, a file's
sha256, the output-folder lock, and what counts as a fault of the machine rather than of an input.

Every file the project writes appears whole or not at all: a temporary file in the destination folder takes the
content, is flushed to disk, and is renamed over the destination; a kill at any moment leaves the old file or the
new one, never a truncated one, and the temporary file is removed on any error (after a kill, by the next run
that takes the folder's lock). :func:`atomic_path` hands the temporary path to writers that want a file name
(nibabel, ``torch.save``, matplotlib, ``numpy.savez``); the others are shorthands.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

# the process umask, read once (reading it means setting it, which is not thread-safe)
_UMASK = os.umask(0o022)
os.umask(_UMASK)

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_path", "read_json",
           "file_sha256", "is_environment_fault", "OutputFolderLocked", "output_folder_lock",
           "remove_stale_temporaries"]


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk (best effort where the file system refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit it is flushed and renamed to ``path``.

    Args:
        path: the destination; its parent folders are created.
        suffix: ending of the temporary name, for writers that pick the format from it (``".nii.gz"``).
        directory: the temporary path is a new empty folder that replaces a folder at ``path`` (a DICOM
            series written file by file).

    On an exception nothing is renamed and the temporary file or folder is removed. A fault of the machine met on
    the way (a full disk, :func:`is_environment_fault`) is made to name ``path``: a writer that reports it without a
    file name (``f.write``), or wrapped in its own error (``torch.save`` into a file object), then still says which
    file could not be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private; the result is an ordinary folder
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp" + suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the result is an ordinary file
    try:
        yield tmp
        if directory:
            for child in tmp.iterdir():
                fsync_path(child)
            if path.exists():
                shutil.rmtree(path)
        else:
            fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself, durable
    except BaseException as err:
        _name_the_destination(err, path, tmp)
        raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _name_the_destination(err: BaseException, path: Path, tmp: Path) -> None:
    """Give every machine fault in ``err``'s chain (an OSError of :data:`ENVIRONMENT_ERRNOS`; a failed write is often
    followed by a failed flush on close) the destination as its file name when it has none or names the temporary
    file (which is removed)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS and err.filename2 is None and (
                err.filename is None or str(err.filename).startswith(str(tmp))):
            err.filename = str(path)
        err = err.__cause__ or err.__context__


#: the names :func:`atomic_path` gives its temporary files and folders: ``.<name>.<8 random characters>.tmp<suffix>``
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\..+)?$")


#: when this process started writing nothing yet (this module is imported before any write of the project)
_PROCESS_START = time.time()


def remove_stale_temporaries(folder: str | os.PathLike, max_depth: int = 3,
                             older_than: Optional[float] = None) -> list[Path]:
    """Remove what :func:`atomic_path` left behind in ``folder`` and its subfolders (down to ``max_depth``) when a run
    was killed mid-write: hidden ``.<name>.*.tmp`` files and folders last modified before ``older_than`` (default:
    this process's start). Call it only while holding the folder's lock (:func:`output_folder_lock` does); the time
    bound keeps the files that the other ranks of this run (torchrun, one shared folder) are writing already.

    Returns:
        the paths removed.
    """
    older_than = _PROCESS_START if older_than is None else older_than
    removed: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if _TEMPORARY.match(e.name) and e.stat(follow_symlinks=False).st_mtime < older_than:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    Path(e.path).unlink(missing_ok=True)
                removed.append(Path(e.path))
            elif depth < max_depth and e.is_dir(follow_symlinks=False) and not e.name.startswith("."):
                walk(Path(e.path), depth + 1)

    walk(Path(folder), 0)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2, **kwargs) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically; ``kwargs`` go to ``json.dumps``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing file or invalid JSON is one error that names ``what`` and the path.

    Raises:
        FileNotFoundError: the file does not exist (or is a folder).
        ValueError: the content is not valid JSON (with the line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path}: not valid JSON ({err})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: errors of the machine, not of an input: a full disk or quota, a read-only file system, no permission, I/O
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def is_environment_fault(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps: MONAI wraps transform errors in RuntimeError) is a fault of the machine
    (:data:`ENVIRONMENT_ERRNOS`, or memory exhausted). Such a fault stops a run; it is never recorded as a bad
    input, since the same input succeeds once the machine is fixed."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError) or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS):
            return True
        err = err.__cause__ or err.__context__
    return False


class OutputFolderLocked(RuntimeError):
    """Another live run holds the output folder; the message names the folder, the holder and the lock file."""


LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class _FolderLock:
    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.held = False

    def acquire(self) -> "_FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    holder = {}  # half-written by a killed run
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return self  # this process holds it already
                if holder and (holder.get("host") != me["host"] or _alive(int(holder.get("pid", -1)))):
                    raise OutputFolderLocked(
                        f"{self.path.parent}: in use by pid {holder.get('pid')} on {holder.get('host')} since "
                        f"{holder.get('started')} (lock file {self.path}); wait for that run or choose another output "
                        "folder (delete the lock file only if that run is gone)") from None
                logger.warning(f"{self.path}: taking over the lock of a run that is gone ({holder or 'unreadable'})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            stale = remove_stale_temporaries(self.path.parent)  # ours now: no live writer can own them
            if stale:
                logger.warning(f"{self.path.parent}: removed {len(stale)} temporary file(s) a killed run left behind "
                               f"({', '.join(str(p.relative_to(self.path.parent)) for p in stale[:5])}"
                               f"{', ...' if len(stale) > 5 else ''})")
            return self

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


_HELD: dict[Path, _FolderLock] = {}


def output_folder_lock(folder: str | os.PathLike, rank: Optional[int] = None) -> Optional[_FolderLock]:
    """Take the lock of an output folder for this process, so that two runs never write into one folder.

    The lock is a file ``<folder>/.lock`` with the holder's pid, host and start time. A lock whose process is
    gone (same host) is taken over with a warning; a live one raises :class:`OutputFolderLocked` at once. Once
    taken, the temporary files a killed run left (:func:`remove_stale_temporaries`) are removed, with a warning. Under
    torchrun only rank 0 takes it (the ranks of one run share the folder by design). The lock is released at
    exit, or by ``release()`` on the returned object (None on ranks other than 0).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0:
        return None
    folder = Path(folder).resolve()
    lock = _HELD.get(folder)
    if lock is None or not lock.held:
        lock = _HELD[folder] = _FolderLock(folder)
        lock.acquire()
        atexit.register(lock.release)
    return lock
