"""What a user sees when a bundle run stops: one line that names the file and the reason.

``python -m monai.bundle run`` wraps an error raised inside a config expression in ``RuntimeError: Failed to
evaluate ConfigExpression`` (or ``Failed to instantiate``) and prints a traceback of 50 to 180 lines whose last
line hides the cause. When a bundle run imports this package, :func:`install_bundle_excepthook` replaces the
printout of an error that this project raises on purpose (a bad input under ``--strict``, a bad config, a missing
file, a held output folder, a full disk: anything raised from the project's own code, or a machine fault) with
the cause itself, on one line. ``CTCLIP_TRACEBACK=1`` prints the full traceback as before. An error raised
elsewhere (a bug, a library failure) keeps its full traceback, and its cause is repeated as the last line.

An error raised in a DataLoader worker reaches the main process as text: torch raises a new exception whose
message is ``Caught <Type> in DataLoader worker process <n>.`` followed by the worker's whole traceback. That text
is read back here (the innermost exception of the chain, where it was raised), so a bad input found in a worker
ends in the same one line as one found in the main process.
"""

from __future__ import annotations

import builtins
import os
import re
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Optional

from .files import ENVIRONMENT_ERRNOS, is_environment_fault

__all__ = ["root_cause", "raised_by_the_project", "summary_line", "install_bundle_excepthook", "TRACEBACK_ENV"]

TRACEBACK_ENV = "CTCLIP_TRACEBACK"
_PROJECT_PACKAGES = ("ctclip_contract", "custom_nets", "transforms", "workflows", "chest_phantom")
_PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / p) + os.sep for p in _PROJECT_PACKAGES)


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (``raise ... from``, or raised while handling another)."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None:
            return err
        err = nxt
    return err


class _Cause(NamedTuple):
    type_name: str
    message: str
    on_purpose: bool


_WORKER_HEAD = re.compile(r"\ACaught \w+ in DataLoader worker process \d+\.\s*Original (Traceback \(most recent call "
                          r"last\):\n.*)\Z", re.S)
_CHAINED = re.compile(r"\n\s*\n(?:The above exception was the direct cause of the following exception:|During handling "
                      r"of the above exception, another exception occurred:)\s*\n\s*\n")
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line \d+', re.M)
_ERRNO = re.compile(r"\A\[Errno (\d+)\] ")


def _os_error_name(name: str) -> bool:
    cls = getattr(builtins, name, None)
    return isinstance(cls, type) and issubclass(cls, OSError)


def _worker_cause(err: BaseException) -> Optional[_Cause]:
    """The innermost exception of a DataLoader worker's traceback text that torch re-raised as ``err``, or None
    when ``err`` is not such an exception."""
    found = _WORKER_HEAD.match(str(err))
    if found is None:
        return None
    first = _CHAINED.split(found.group(1))[0]  # the chain is printed from its innermost exception on
    frames = list(_FRAME.finditer(first))
    if not frames:
        return None
    # after the last frame: its source and caret lines (indented), then "<module.Type>: <message>"
    tail = first[frames[-1].end():].split("\n")[1:]
    while tail and (tail[0].startswith("    ") or not tail[0].strip()):
        tail.pop(0)
    if not tail:
        return None
    qualified, _, message = "\n".join(tail).partition(": ")
    name = qualified.strip().rsplit(".", 1)[-1]
    message = " ".join(message.split()) or "(no message)"
    errno_found = _ERRNO.match(message)
    fault = name == "MemoryError" or (_os_error_name(name) and errno_found is not None and
                                      int(errno_found.group(1)) in ENVIRONMENT_ERRNOS)
    named_file = _os_error_name(name) and errno_found is not None and ": '" in message
    ours = frames[-1].group("file").startswith(_PROJECT_DIRS)
    return _Cause(name, message, fault or named_file or ours)


def _describe(err: BaseException) -> _Cause:
    cause = root_cause(err)
    worker = _worker_cause(cause)
    if worker is not None:
        return worker
    return _Cause(type(cause).__name__, " ".join(str(cause).split()) or "(no message)", _on_purpose(cause))


def _on_purpose(err: BaseException) -> bool:
    if is_environment_fault(err) or (isinstance(err, OSError) and err.filename is not None):
        return True
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
    return bool(frames) and frames[-1].filename.startswith(_PROJECT_DIRS)


def raised_by_the_project(err: BaseException) -> bool:
    """Whether ``err`` was raised on purpose: from the project's own code, a fault of the machine
    (:func:`~ctclip_contract.files.is_environment_fault`), or an operating-system error about a named file. An
    error re-raised from a DataLoader worker is judged by the worker's own exception."""
    worker = _worker_cause(err)
    return worker.on_purpose if worker is not None else _on_purpose(err)


def summary_line(err: BaseException) -> str:
    """``<Type>: <message>`` of the root cause, on one line (for an error from a DataLoader worker: of the
    worker's innermost exception)."""
    cause = _describe(err)
    return f"{cause.type_name}: {cause.message}"


def _hook(exc_type: type, exc: BaseException, tb: Optional[TracebackType]) -> None:
    if issubclass(exc_type, KeyboardInterrupt) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        sys.__excepthook__(exc_type, exc, tb)
        return
    if _describe(exc).on_purpose:
        print(f"(the traceback: set {TRACEBACK_ENV}=1)\nerror: {summary_line(exc)}", file=sys.stderr)
        return
    sys.__excepthook__(exc_type, exc, tb)
    print(f"error: {summary_line(exc)}", file=sys.stderr)


def _running_a_bundle() -> bool:
    main = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return main is not None and main.name == "__main__.py" and main.parent.name == "bundle" and \
        main.parent.parent.name == "monai"


def install_bundle_excepthook(force: bool = False) -> bool:
    """Install the one-line error printout for this process when it is ``python -m monai.bundle`` (or ``force``).

    Returns:
        whether it was installed.
    """
    if not (force or _running_a_bundle()):
        return False
    sys.excepthook = _hook
    return True
