"""A partner group's machine, for the tests of exported bundles: a new virtual environment, outside the repository,
with the bundle's wheel installed and nothing of the source tree importable.

CI cannot afford a full ``pip install -r requirements.txt`` per test run, so :func:`received_python` builds the
environment from the packages already installed here: a new venv whose only link to this one is a ``.pth`` line
naming its site-packages folder. Python adds that folder to ``sys.path`` without processing the ``.pth`` files in
it, so the editable install of this project (a ``.pth`` finder) stays invisible, and the bundle's code comes from
the wheel installed into the new venv. ``without`` hides installed distributions, to play a partner who forgot
one. ``CTCLIP_FRESH_VENV=1`` runs the real install instead (``test_bundle_export.py::test_fresh_virtualenv``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path
from typing import Sequence

from ctclip_contract.anatomy import is_mask_file
from transforms.qc import is_dicom_file

PROJECT_SITE = Path(sysconfig.get_paths()["purelib"])
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _site_packages(root: Path) -> Path:
    return root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def received_python(root: Path, wheel: Path, without: Sequence[str] = ()) -> Path:
    """A venv at ``root`` with ``wheel`` installed and this environment's third-party packages visible.

    Args:
        root: the new venv's folder.
        wheel: the bundle's ``wheels/ctclip_monai-*.whl``.
        without: distribution names (e.g. ``"transformers"``) to leave out.

    Returns:
        the venv's python.
    """
    venv.create(root, with_pip=False, symlinks=True)
    site = _site_packages(root)
    deps = PROJECT_SITE
    if without:
        # a folder of links to every installed entry but the hidden distributions
        deps = root / "third_party"
        deps.mkdir()
        hidden = tuple(n.replace("-", "_").lower() for n in without)
        for entry in PROJECT_SITE.iterdir():
            name = entry.name.lower()
            if not any(name == h or name.startswith(h + "-") or name.startswith(h + ".") for h in hidden):
                (deps / entry.name).symlink_to(entry)
    (site / "received_deps.pth").write_text(f"{deps}\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True)
    return root / "bin" / "python"


def bundle_env(cache: Path) -> dict[str, str]:
    """The environment of a partner's run: no PYTHONPATH, offline, an empty tokenizer cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OFFLINE, CTCLIP_MONAI_CACHE=str(cache))
    return env


def run_bundle(python: Path, bundle: Path, args: Sequence[str], cache: Path, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` with the bundle folder as the working directory."""
    proc = subprocess.run([str(python), "-m", "monai.bundle", *map(str, args)], cwd=bundle, env=bundle_env(cache),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def nifti_scans(folder: Path) -> list[Path]:
    """The NIfTI scans under a cohort folder, sorted, without the label maps and finding masks beside them."""
    return [p for p in sorted(Path(folder).rglob("*.nii.gz")) if not is_mask_file(p.name)]


def scan_folder(cohort: Path, dest: Path, nifti: int = 2) -> Path:
    """A partner's input folder: ``nifti`` NIfTI files and one DICOM series folder from the tiny cohort."""
    dest.mkdir()
    for path in nifti_scans(cohort)[:nifti]:
        shutil.copy(path, dest / path.name)
    series = dicom_series_folder(cohort)
    shutil.copytree(series, dest / series.name)
    return dest


def dicom_series_folder(cohort: Path) -> Path:
    """The first DICOM series folder of a cohort."""
    return next(p for p in sorted(cohort.rglob("*")) if p.is_dir() and any(is_dicom_file(f) for f in p.iterdir()
                                                                            if f.is_file()))


def unzip(archive: Path, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    (bundle,) = [p for p in dest.iterdir() if p.is_dir()]
    return bundle


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def verify_offline(bundle: Path) -> None:
    """MONAI's ``verify_metadata`` (against the schema the bundle ships, no download) and ``verify_net_in_out`` pass
    on the unzipped bundle (run in this process: they read the bundle's files, whatever environment runs them)."""
    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"),
                    filepath=str(bundle / "docs" / "metadata_schema.json"))
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle))
