"""What a user sees when a bundle run stops: one line that names the file and the reason.

``python -m monai.bundle run`` wraps an error raised inside a config expression in ``RuntimeError: Failed to
evaluate ConfigExpression`` (or ``Failed to instantiate``) and prints a traceback of 50 to 180 lines whose last
line hides the cause. When a bundle run imports this package, :func:`install_bundle_excepthook` replaces the
printout of an error that this project raises on purpose (a bad input under ``--strict``, a bad config, a missing
file, a held output folder, a full disk: anything raised from the project's own code, or a machine fault) with
the cause itself, on one line. ``CTCLIP_TRACEBACK=1`` prints the full traceback as before. An error raised
elsewhere (a bug, a library failure) keeps its full traceback, and its cause is repeated as the last line.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Optional

from .files import is_environment_fault

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


def raised_by_the_project(err: BaseException) -> bool:
    """Whether ``err`` was raised on purpose: from the project's own code, a fault of the machine
    (:func:`~ctclip_contract.files.is_environment_fault`), or an operating-system error about a named file."""
    if is_environment_fault(err) or (isinstance(err, OSError) and err.filename is not None):
        return True
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
    return bool(frames) and frames[-1].filename.startswith(_PROJECT_DIRS)


def summary_line(err: BaseException) -> str:
    """``<Type>: <message>`` of the root cause, on one line."""
    cause = root_cause(err)
    message = " ".join(str(cause).split()) or "(no message)"
    return f"{type(cause).__name__}: {message}"


def _hook(exc_type: type, exc: BaseException, tb: Optional[TracebackType]) -> None:
    if issubclass(exc_type, KeyboardInterrupt) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        sys.__excepthook__(exc_type, exc, tb)
        return
    cause = root_cause(exc)
    if raised_by_the_project(cause):
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
