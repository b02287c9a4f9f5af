"""Files the project writes and reads: the one atomic writer, JSON read with errors that name the file, a file's
sha256, the output-folder lock, what counts as a fault of the machine rather than of an input, and gzip (every
``.gz`` the project reads or writes goes through :func:`gzip_open` and its siblings, at ISA-L speed).

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
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, Optional

try:  # ISA-L (python-isal, a core dependency): the same gzip format as zlib, inflated about twice as fast
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # a platform without its wheels: zlib does the same work, slower
    _igzip = _isal_zlib = None

logger = logging.getLogger(__name__)

# the process umask, read once (reading it means setting it, which is not thread-safe)
_UMASK = os.umask(0o022)
os.umask(_UMASK)

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "fsync_path", "read_json",
           "file_sha256", "is_environment_fault", "OutputFolderLocked", "output_folder_lock",
           "remove_stale_temporaries", "HAVE_ISAL", "GZIP_LEVEL", "GZIP_LEVEL_ZLIB", "GZIP_LEVEL_LABELS", "gzip_open",
           "gzip_compress", "gzip_decompress", "gzip_stream_size", "route_nibabel_gzip"]


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


# ---------------------------------------------------------------------------------------------------------------
# gzip: one definition for every .gz the project reads or writes (raw inputs, preprocessed volumes, the loaders
# through nibabel, the synthetic cohort)

#: whether ISA-L (``isal``) is importable; without it every function below falls back to zlib (same files)
HAVE_ISAL = _igzip is not None

#: ISA-L level (0-3) of every gzip stream the project writes. Measured with ``benchmarks/gzip_levels.py`` on the
#: project's shared 2-core AMD EPYC (AVX-512; load average 5-7, so CPU seconds, best of 3, one thread), on the
#: ct_preprocess output of the benchmark phantom (480x480x240 int16, 110.6 MB uncompressed):
#:
#: =========  =======  =====  ===========  ==================
#: level      MB       ratio  deflate CPU  ISA-L inflate CPU
#: =========  =======  =====  ===========  ==================
#: zlib 1     43.2     2.56   0.98 s       0.21 s
#: zlib 6     42.6     2.60   7.86 s       0.19 s
#: zlib 9     41.8     2.65   20.4 s       0.18 s
#: ISA-L 0    49.7     2.23   0.29 s       0.23 s
#: ISA-L 1    44.7     2.47   0.32 s       0.23 s
#: ISA-L 2    44.1     2.51   0.33 s       0.22 s
#: ISA-L 3    43.8     2.52   0.35 s       0.18 s
#: =========  =======  =====  ===========  ==================
#:
#: On the raw-like 512x512x300 phantom (157 MB, 15 HU noise everywhere) the order is the same: ISA-L 3 83.1 MB in
#: 0.59 s, zlib 1 84.0 MB in 1.96 s, zlib 6 82.2 MB in 14.1 s, ISA-L 0 102.4 MB in 0.57 s.
#: Level 3, ISA-L's best: a preprocessed volume is written once and read every epoch, and level 3 writes the
#: smallest ISA-L stream (1.4 % above zlib 1, nibabel's default and what the volumes were written with before) in
#: about a third of zlib 1's time, and its stream inflates as fast as any. Levels 0-2 save at most 0.06 s per
#: volume and cost 0.7-13 % in size, which every epoch reads again (50,000 CT-RATE volumes of this size: 2.2 TB
#: at level 3). zlib 6 and 9 are 3-5 % smaller for 22-58x the time: noise, most of a CT's bytes, does not compress.
GZIP_LEVEL = 3

#: zlib level when ISA-L is absent: level 1, within 1.4 % of ISA-L level 3's size (the table) at zlib's fastest
GZIP_LEVEL_ZLIB = 1

#: ISA-L level of label maps and masks (``gzip_compress(..., labels=True)``): long runs of one value, which ISA-L
#: level 1 writes smaller and faster than level 3 (measured on the demo cohort's masks, 128x128x144 voxels, one
#: thread: the uint8 anatomical label map, 2.4 MB raw, level 1 141 kB in 1.1 ms against level 3 150 kB in 5.5 ms;
#: the int32 finding bits, 9.4 MB raw, 29 kB in 0.6 ms against 52 kB in 24.8 ms). Without ISA-L: zlib level 1.
GZIP_LEVEL_LABELS = 1


def _gzip_class(compresslevel: Optional[int]) -> tuple[type, int]:
    """The GzipFile class and level that write at ``compresslevel`` (None: the project's level)."""
    if compresslevel is None:
        return (_igzip.IGzipFile, GZIP_LEVEL) if HAVE_ISAL else (gzip.GzipFile, GZIP_LEVEL_ZLIB)
    return gzip.GzipFile, int(compresslevel)


def gzip_open(filename: str | os.PathLike, mode: str = "rb", compresslevel: Optional[int] = None, mtime: int = 0,
              keep_open: bool = False) -> gzip.GzipFile:
    """Open a gzip file for binary reading (``"rb"``) or writing (``"wb"``, ``"xb"``, ``"ab"``).

    Reading inflates with ISA-L (any gzip file, written by any tool: multi-member streams too). Writing deflates at
    the project's level (:data:`GZIP_LEVEL`) with ISA-L, with no file name and ``mtime`` 0 in the header, so the
    bytes depend on the data only; the result is a standard gzip file that zlib, ``gzip -d`` and any NIfTI reader
    open. Without ``isal`` zlib does both, at :data:`GZIP_LEVEL_ZLIB`.

    Args:
        filename: the file.
        mode: binary mode (``"b"`` is implied).
        compresslevel: None (the default) is the project's level; an int is a zlib level (0-9, 0 = stored) and is
            written by zlib, exactly as ``gzip.open`` would (ISA-L's levels are not zlib's).
        mtime: the header's modification time when writing.
        keep_open: ignored (nibabel's opener passes it; the file is opened once either way).

    Returns:
        a ``gzip.GzipFile`` (``isal.igzip.IGzipFile`` is one) that closes the file it opened.
    """
    mode = mode.replace("t", "").replace("b", "") + "b"
    raw = open(filename, mode)
    try:
        if mode.startswith("r"):
            f = (_igzip.IGzipFile if HAVE_ISAL else gzip.GzipFile)(filename=os.fspath(filename), mode="rb",
                                                                    fileobj=raw)
        else:
            cls, level = _gzip_class(compresslevel)  # no file name in the header: the bytes depend on the data only
            f = cls(filename="", mode=mode, compresslevel=level, fileobj=raw, mtime=mtime)
    except BaseException:
        raw.close()
        raise
    f.myfileobj = raw  # GzipFile closes the file object it opened itself: this one
    return f


def gzip_compress(data: bytes | bytearray | memoryview, compresslevel: Optional[int] = None, mtime: int = 0,
                  labels: bool = False) -> bytes:
    """``data`` as one gzip stream (no file name, ``mtime`` 0): ISA-L at the project's level (:data:`GZIP_LEVEL`,
    or :data:`GZIP_LEVEL_LABELS` for a label map or mask, ``labels``), or zlib at ``compresslevel`` when one is
    given (see :func:`gzip_open`)."""
    if compresslevel is None and HAVE_ISAL:
        return _igzip.compress(data, compresslevel=GZIP_LEVEL_LABELS if labels else GZIP_LEVEL, mtime=mtime)
    return gzip.compress(data, compresslevel=GZIP_LEVEL_ZLIB if compresslevel is None else compresslevel, mtime=mtime)


def gzip_decompress(data: bytes | bytearray | memoryview) -> bytes:
    """Inflate a whole gzip stream (all its members) with ISA-L, or zlib without it."""
    return _igzip.decompress(data) if HAVE_ISAL else gzip.decompress(data)


_INFLATE_ERRORS = (zlib.error,) + ((_isal_zlib.error,) if HAVE_ISAL else ())


def _decompressobj():
    # wbits 47 = 32 + 15: a gzip or zlib header, detected; 32 KiB window
    return _isal_zlib.decompressobj(wbits=47) if HAVE_ISAL else zlib.decompressobj(wbits=47)


def gzip_stream_size(f: BinaryIO, chunk: int = 1 << 22) -> tuple[int, bool]:
    """Inflate the gzip stream read from ``f`` (every member, in ``chunk``-byte reads) without keeping it.

    Returns:
        ``(bytes, complete)``: the uncompressed byte count up to the end or the first error, and whether the stream
        ended where a gzip member ends (False for a truncated file or corrupt deflate data, whichever inflater).
    """
    total, d = 0, _decompressobj()
    try:
        while True:
            data = f.read(chunk)
            if not data:
                break
            while data:
                total += len(d.decompress(data))
                if d.eof:
                    data = d.unused_data
                    if data:
                        d = _decompressobj()
                else:
                    data = b""
    except _INFLATE_ERRORS:
        return total, False
    return total, d.eof


def route_nibabel_gzip(openers: ModuleType) -> None:
    """Make nibabel open every ``.gz`` (and ``.mgz``) through :func:`gzip_open`: ``nib.load``, the lazy
    ``dataobj`` reads, ``nib.save`` and MONAI's ``NibabelReader`` then inflate and deflate with ISA-L.

    The documented extension point of nibabel (``nibabel.openers``: "To add an extension, add a line to the class
    definition ... ``ImageOpener.compress_ext_map[ext] = func_def``"): the ``.gz`` entry of ``Opener`` and of
    ``ImageOpener`` (which holds a copy of the map). nibabel's own default level (1) is not passed on, so files
    that nibabel writes get the project's level; a ``compresslevel`` a caller gives nibabel still reaches
    :func:`gzip_open`. Idempotent; the packages that import nibabel (``transforms``, ``chest_phantom``) call it at
    import, with ``nibabel.openers``, so that this layer never imports nibabel itself.
    """
    entry = (gzip_open, ("mode", "mtime", "keep_open"))
    nibabel_gzip = getattr(openers, "gzip_open", None)
    for cls in (openers.Opener, openers.ImageOpener):
        for ext, value in list(cls.compress_ext_map.items()):
            if ext is not None and (ext.lower() == ".gz" or value[0] is nibabel_gzip):
                cls.compress_ext_map[ext] = entry
    openers.Opener.gz_def = entry  # what a later registration (``.mgz``) copies; ImageOpener inherits it


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
