"""Bundles that travel: every bundle runs from its own folder, or from anywhere with ``--bundle_root``, as in the
MONAI model zoo.

``bundle_root`` defaults to ``"."`` in every config, every default path derives from it (or from an explicit
``output_dir`` / ``dataset_dir`` / ``input``), and no config names a path of this repository (``bundles/...``).
The bundles are parsed from a copy outside the repository, so a path that only works from the repository root
would show up here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workflows.bundle_export import repository_paths

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"

# every entry point of every bundle: the merged config lists of docs/bundle_conventions.md
ENTRY_POINTS = {
    "ct_preprocess": [["preprocess.json"], ["preprocess.json", "export.json"]],
    "synthetic_chest_ct": [["generate.json"]],
    "ct_clip_pretrain": [["train.json"], ["train.json", "evaluate.json"], ["train.json", "multi_gpu_train.json"],
                         ["train.json", "multilevel.json"],
                         *(["train.json", f"patch_ib_{v}.json"] for v in "ABCDE")],
    "ct_clip_classfine": [["train.json"], ["train.json", "evaluate.json"], ["train.json", "vocabfine.json"],
                          ["train.json", "vocabfine.json", "evaluate.json"], ["inference.json"],
                          ["inference.json", "export.json"]],
    "ct_clip_zeroshot": [["inference.json"], ["inference.json", "evaluate.json"], ["inference.json", "retrieval.json"],
                         ["inference.json", "export.json"], ["inference.json", "salience.json"],
                         ["inference.json", "multilevel_eval.json"]],
}
CASES = [(bundle, files) for bundle, lists in ENTRY_POINTS.items() for files in lists]

# ids that hold a default path: each one, where a config has it and it is not empty, must lie in the bundle folder
PATH_IDS = ("output_dir", "ckpt_dir", "ckpt_path", "eval_dir", "state_dir", "cache_dir", "inference_dir",
            "thresholds_path", "pretrained", "prompt_file", "model_config", "export_dir", "retrieval_dir",
            "embeddings_file", "eval_output_dir", "calibration_path")
DEFAULT_OUTPUT_DIR = {"ct_preprocess": "", "synthetic_chest_ct": "synthetic_cohort", "ct_clip_pretrain": "runs",
                      "ct_clip_classfine": "runs", "ct_clip_zeroshot": "runs"}

_IGNORE = shutil.ignore_patterns("runs", "synthetic_cohort", "models", "__pycache__")


def test_every_bundle_and_config_is_covered():
    """A new bundle or config file has to be listed above (and so is checked below)."""
    assert set(ENTRY_POINTS) == {p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir()}
    for bundle, lists in ENTRY_POINTS.items():
        configs = {p.name for p in (BUNDLES / bundle / "configs").glob("*.json")} - {"metadata.json", "prompts.json"}
        assert configs <= {f for files in lists for f in files}, bundle


@pytest.fixture(scope="module")
def bundle_copies(tmp_path_factory):
    """Each bundle folder copied outside the repository (without any run outputs or exported weights)."""
    base = tmp_path_factory.mktemp("travelled_bundles")
    return {name: Path(shutil.copytree(BUNDLES / name, base / name, ignore=_IGNORE)) for name in ENTRY_POINTS}


def _parser(folder: Path, files):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(folder / "configs" / f) for f in files])
    return parser


@pytest.mark.parametrize("bundle, files", CASES, ids=[f"{b}:{'+'.join(f)}" for b, f in CASES])
def test_paths_derive_from_bundle_root(bundle, files, bundle_copies, tmp_path, monkeypatch):
    folder = bundle_copies[bundle]
    missing = [f for f in files if not (folder / "configs" / f).is_file()]
    if missing:
        pytest.skip(f"{bundle}: {missing} not in this checkout")
    parser = _parser(folder, files)
    assert parser["bundle_root"] == ".", "bundle_root defaults to the folder the bundle runs from"
    repo_paths = repository_paths(parser.get())
    assert not repo_paths, f"{bundle} {files} names paths of this repository: {repo_paths}"

    # from anywhere else, with bundle_root set: every default path lies in the bundle folder
    monkeypatch.chdir(tmp_path)
    parser["bundle_root"] = str(folder)
    resolved = {}
    for key in PATH_IDS:
        if key in parser:
            value = parser.get_parsed_content(key)
            if isinstance(value, (str, os.PathLike)) and str(value) and os.path.sep in str(value):
                resolved[key] = Path(value)
    outside = {k: str(v) for k, v in resolved.items() if not v.resolve().is_relative_to(folder.resolve())}
    assert not outside, f"{bundle} {files}: default paths outside the bundle folder {folder}: {outside}"
    expected = DEFAULT_OUTPUT_DIR[bundle]
    if expected:
        want = folder / expected / ("vocabfine" if "vocabfine.json" in files else "")
        assert Path(parser.get_parsed_content("output_dir")).resolve() == want.resolve()
    else:
        assert parser.get_parsed_content("output_dir") == "", "ct_preprocess still requires --output_dir"

    # from the bundle's own folder with the default bundle_root ".": the same paths, relative to it
    monkeypatch.chdir(folder)
    parser = _parser(folder, files)
    for key, path in resolved.items():
        assert Path(parser.get_parsed_content(key)).resolve() == path.resolve(), key


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the installed packages, not this checkout's folder on the path
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_zeroshot_runs_from_its_own_folder_and_with_bundle_root(tiny_preprocessed_dir, tiny_clip_checkpoint,
                                                                  tmp_path):
    """The model-zoo way: ``cd`` into a copy of the bundle (outside the repository) and run ``configs/inference.json``
    without ``--bundle_root`` or ``--output_dir``; then the same copy from another folder with ``--bundle_root``."""
    folder = Path(shutil.copytree(BUNDLES / "ct_clip_zeroshot", tmp_path / "ct_clip_zeroshot", ignore=_IGNORE))
    options = ["--dataset_dir", str(tiny_preprocessed_dir), "--model_config", "ctclip_tiny", "--pretrained",
               str(tiny_clip_checkpoint), "--num_workers", "0", "--n_bootstrap", "10"]
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *options], folder)
    n_test = len(json.loads((tiny_preprocessed_dir / "datalist.json").read_text())["test"])
    predictions = folder / "runs" / "predictions.csv"
    assert len(predictions.read_text().strip().splitlines()) == n_test + 1

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    predictions.unlink()
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(folder / "configs" / "inference.json"),
          "--bundle_root", str(folder), *options], elsewhere)
    assert len(predictions.read_text().strip().splitlines()) == n_test + 1
    assert not any(elsewhere.iterdir()), "nothing is written to the working directory"
