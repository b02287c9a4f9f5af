"""The checks a received bundle passes before it runs: its files are the ones exported, and the installed packages
are the ones it was exported with.

An exported bundle's ``configs/metadata.json`` records

- ``files_sha256``: ``{"models/model.pt": "<hex sha256>", ...}``, every file of ``models/``;
- ``compatible_packages``: ``{"transformers": ">=4.40,<6", "ctclip-monai": "==0.1.0", ...}``, the range of each
  package the bundle accepts (``workflows.bundle_export.accepted_ranges`` says how the exporter sets them).

:func:`verify_bundle` checks both and raises one :class:`BundleError` that names the file or package and the
reason. It needs only the standard library, so it runs (and says what is missing) even when a required package
is not installed; ``inference.json`` of an exported bundle calls it first in ``initialize``.

The sha256 tells a damaged or swapped weights file from the exported one; it is not a signature. A bundle from
someone else is code (its configs are evaluated by Python): review it before running it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any, Mapping

from .files import file_sha256, read_json

__all__ = ["BundleError", "FILES_SHA256_KEY", "PACKAGES_KEY", "METADATA_SCHEMA", "verify_bundle", "verify_files", "verify_packages",
           "release", "version_in_range"]

#: metadata.json key of the recorded sha256 of every file under ``models/`` (paths relative to the bundle root)
FILES_SHA256_KEY = "files_sha256"
#: metadata.json key of the accepted version range of each required package
PACKAGES_KEY = "compatible_packages"
#: the JSON schema an exported bundle's metadata is checked against offline (``verify_metadata --filepath``)
METADATA_SCHEMA = Path(__file__).with_name("bundle_metadata_schema.json")

_CLAUSE = re.compile(r"^\s*(==|!=|>=|<=|>|<)\s*([0-9][0-9A-Za-z.+!-]*)\s*$")


class BundleError(RuntimeError):
    """A received bundle does not match what was exported, or the environment lacks what it needs."""


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string (``"2.13.0+cpu"`` -> ``(2, 13, 0)``; pre-release tags dropped)."""
    m = re.match(r"\d+(?:\.\d+)*", version.strip())
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p) for p in m.group(0).split("."))


def _compare(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (a > b) - (a < b)


def version_in_range(version: str, spec: str) -> bool:
    """Whether ``version`` satisfies ``spec``, comma-separated clauses such as ``">=2.13.0,<2.14"``.

    Only release numbers are compared (a local label like ``+cu128`` is ignored), which is what a bundle's
    package ranges need; the standard library has no PEP 440 parser.

    Raises:
        ValueError: ``spec`` is not a list of ``<op><version>`` clauses.
    """
    ops = {"==": lambda c: c == 0, "!=": lambda c: c != 0, ">=": lambda c: c >= 0, "<=": lambda c: c <= 0,
           ">": lambda c: c > 0, "<": lambda c: c < 0}
    have = release(version)
    for clause in spec.split(","):
        m = _CLAUSE.match(clause)
        if m is None:
            raise ValueError(f"version range {spec!r}: {clause!r} is not <op><version>")
        if not ops[m.group(1)](_compare(have, release(m.group(2)))):
            return False
    return True


def verify_files(bundle_root: str | os.PathLike, recorded: Mapping[str, str]) -> None:
    """Check that every recorded file exists, stays inside the bundle, and has its recorded sha256.

    Raises:
        BundleError: naming the file and the reason.
    """
    root = Path(bundle_root).resolve()
    for rel, expected in recorded.items():
        path = (root / rel).resolve()
        if root not in path.parents:
            raise BundleError(f"bundle {root}: recorded file {rel!r} lies outside the bundle folder")
        if not path.is_file():
            raise BundleError(f"{path}: missing (the bundle was exported with it; copy the whole bundle, or unzip "
                              "it again)")
        actual = file_sha256(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 {actual[:16]}... does not match the recorded {expected[:16]}... "
                              "(the file was changed or damaged after export; do not run it)")


def verify_packages(ranges: Mapping[str, str], install_hint: str = "") -> None:
    """Check that each package is installed within its range.

    Raises:
        BundleError: the first missing package or version out of range, with the range and ``install_hint``.
    """
    hint = f" ({install_hint})" if install_hint else ""
    for name, spec in ranges.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise BundleError(f"package {name} is not installed; this bundle needs {name}{spec}{hint}") from None
        if not version_in_range(installed, spec):
            raise BundleError(f"package {name} {installed} is installed; this bundle needs {name}{spec}{hint}")


def verify_bundle(bundle_root: str | os.PathLike, meta_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check a received bundle before it runs: installed packages (``compatible_packages``), then the files
    (``files_sha256``) of its ``configs/metadata.json``.

    Args:
        bundle_root: the bundle folder.
        meta_file: its metadata (default ``<bundle_root>/configs/metadata.json``).

    Returns:
        the metadata.

    Raises:
        BundleError: naming the file or package and the reason.
    """
    meta_path = Path(meta_file) if meta_file else Path(bundle_root) / "configs" / "metadata.json"
    try:
        meta = read_json(meta_path, "bundle metadata")
    except (FileNotFoundError, ValueError) as err:
        raise BundleError(str(err)) from None
    verify_packages(meta.get(PACKAGES_KEY) or {}, install_hint=f"install as {Path(bundle_root) / 'docs' / 'README.md'} says")
    verify_files(bundle_root, meta.get(FILES_SHA256_KEY) or {})
    return meta
