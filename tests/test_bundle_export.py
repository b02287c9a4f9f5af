"""Bundles that travel: a zero-shot model exported with ``configs/export.json``, unzipped outside the repository and
run in a new environment that has only the bundle's wheel (tests/received_bundle.py says how that environment is
made in CI), on NIfTI files and a DICOM series; the probabilities equal the in-repository run. Then the four ways a
received bundle goes wrong, each one line that names the file or package, with no output left behind.

The ClassFine export is tested in test_classfine_bundle.py, on the model trained there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctclip_contract import CTRATE_PATHOLOGIES, file_sha256
from custom_nets import create_model
from received_bundle import (bundle_env, last_line, received_python, run_bundle, scan_folder, unzip,
                             verify_offline)
from workflows.bundle_export import export_bundle
from workflows.served_bundle import ServedBundle
from workflows.writers import read_predictions_csv
from workflows.zeroshot import build_zeroshot_network

REPO = Path(__file__).resolve().parents[1]
ZEROSHOT = REPO / "bundles" / "ct_clip_zeroshot"


def in_repo_run(configs: list[str], bundle: Path, **overrides) -> None:
    """The bundle as it is used in the repository, run in this process (``monai.bundle.run``, what
    ``python -m monai.bundle run`` calls) from the repository root."""
    from monai.bundle import run

    configs_dir = bundle / "configs"
    run(config_file=[str(configs_dir / c) for c in configs], meta_file=str(configs_dir / "metadata.json"),
        logging_file=str(configs_dir / "logging.conf") if (configs_dir / "logging.conf").is_file() else None,
        bundle_root=str(bundle), **overrides)


@pytest.fixture(scope="module")
def received(tiny_clip_checkpoint, tiny_cohort_dir, tmp_path_factory):
    """The zero-shot export, unzipped on the 'partner's machine', its environment, and the scans."""
    work = tmp_path_factory.mktemp("zeroshot_export")
    in_repo_run(["inference.json", "export.json"], ZEROSHOT, model_config="ctclip_tiny",
                pretrained=str(tiny_clip_checkpoint), export_dir=str(work / "ct_clip_zeroshot_tiny"))
    partner = tmp_path_factory.mktemp("partner_site")
    bundle = unzip(work / "ct_clip_zeroshot_tiny.zip", partner / "unzipped")
    python = received_python(partner / "venv", next((bundle / "wheels").glob("ctclip_monai-*.whl")))
    scans = scan_folder(tiny_cohort_dir, partner / "scans")
    return {"work": work, "bundle": bundle, "python": python, "scans": scans, "cache": partner / "cache",
            "checkpoint": tiny_clip_checkpoint}


def test_the_export_is_a_standard_bundle(received):
    bundle = received["bundle"]
    for rel in ("configs/inference.json", "configs/metadata.json", "configs/prompts.json", "models/model.pt",
                "models/text_encoder/config.json", "docs/README.md", "docs/metadata_schema.json", "LICENSE",
                "requirements.txt"):
        assert (bundle / rel).is_file(), rel
    texts = [p.read_text() for p in (bundle / "configs").glob("*.json")]
    assert not any("bundles/" in t for t in texts), "a config still names a file of the repository"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["required_packages_version"]["ctclip-monai"] == meta["exported"]["package_version"]
    assert meta["compatible_packages"]["ctclip-monai"] == "==" + meta["exported"]["package_version"]
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 32, 32]  # ctclip_tiny, (D, H, W)
    assert set(meta["files_sha256"]) == {p.relative_to(bundle).as_posix() for p in (bundle / "models").rglob("*")
                                         if p.is_file()}
    for rel, sha in meta["files_sha256"].items():
        assert file_sha256(bundle / rel) == sha
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    network_def = build_zeroshot_network("ctclip_tiny", bundle / "configs" / "prompts.json")
    assert set(state) == set(network_def.state_dict())
    readme = (bundle / "docs" / "README.md").read_text()
    assert "Research only" in readme and "pip install -r requirements.txt" in readme


def test_the_received_bundle_runs_outside_the_repository_like_the_original(received, tmp_path):
    python, bundle, scans = received["python"], received["bundle"], received["scans"]
    where = subprocess.run([str(python), "-c", "import workflows, custom_nets; print(workflows.__file__)"],
                           cwd=bundle, env=bundle_env(received["cache"]), capture_output=True, text=True, check=True)
    assert not where.stdout.strip().startswith(str(REPO)), "the code must come from the bundle's wheel"

    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    run_bundle(python, bundle, ["run", "--config_file", "configs/inference.json", "--input", scans,
                                "--output_dir", theirs], received["cache"])
    in_repo_run(["inference.json"], ZEROSHOT, model_config="ctclip_tiny", pretrained=str(received["checkpoint"]),
                input=str(scans), output_dir=str(ours))
    names_t, probs_t = read_predictions_csv(theirs / "predictions.csv", CTRATE_PATHOLOGIES)
    names_o, probs_o = read_predictions_csv(ours / "predictions.csv", CTRATE_PATHOLOGIES)
    assert len(names_t) == 3 and list(names_t) == list(names_o)  # two NIfTI files and a DICOM series
    np.testing.assert_allclose(probs_t, probs_o, rtol=0, atol=1e-6)
    # one scan at a time through the bundle held in memory (what the MONAI Label app serves): the same numbers
    served = ServedBundle(bundle)
    for name, probs in zip(names_o, probs_o):
        scan = next(p for p in scans.iterdir() if p.name.split(".")[0] == name)
        got = served.predict(scan)["probabilities"]
        np.testing.assert_allclose([got[c] for c in CTRATE_PATHOLOGIES], probs, rtol=0, atol=1e-6)


def test_metadata_and_network_io_verify_offline(received):
    verify_offline(received["bundle"])


def _other_architecture(bundle: Path) -> str:
    """Weights of a CT-CLIP with another latent size in place of model.pt, its sha256 recorded as if exported so."""
    other = create_model("ctclip_tiny", ctclip={"dim_latent": 16})
    torch.save(other.state_dict(), bundle / "models" / "model.pt")
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["files_sha256"]["models/model.pt"] = file_sha256(bundle / "models" / "model.pt")
    meta_path.write_text(json.dumps(meta))
    return "size mismatch"


def _numpy_out_of_range(bundle: Path) -> str:
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["compatible_packages"]["numpy"] = ">=99.0,<99.1"
    meta_path.write_text(json.dumps(meta))
    return f"package numpy {np.__version__} is installed; this bundle needs numpy>=99.0,<99.1"


def _tamper(bundle: Path) -> str:
    path = bundle / "models" / "model.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "model.pt: sha256"


def _remove_weights(bundle: Path) -> str:
    (bundle / "models" / "model.pt").unlink()
    return "model.pt: missing"


def test_each_spoilt_bundle_stops_with_one_line_and_no_output(received, tmp_path):
    """Missing, tampered and other-architecture weights, and a package out of range: four copies of the bundle,
    each spoilt one way and run at the same time (the runs are independent; in turn they took 4 x 12 s)."""
    python, scans, cache = received["python"], received["scans"], received["cache"]
    runs = {}
    for spoil in (_remove_weights, _tamper, _other_architecture, _numpy_out_of_range):
        bundle = Path(shutil.copytree(received["bundle"], tmp_path / spoil.__name__ / "bundle"))
        expected, out = spoil(bundle), tmp_path / spoil.__name__ / "out"
        proc = subprocess.Popen([str(python), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                                 "--input", str(scans), "--output_dir", str(out)], cwd=bundle, env=bundle_env(cache),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs[spoil.__name__] = (proc, expected, out)
    for name, (proc, expected, out) in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode != 0, name
        assert lines and expected in lines[-1], f"{name}: {stderr[-2000:]}"
        assert not out.exists(), f"{name}: a refused bundle wrote output"


def test_a_missing_package_is_named(received, tmp_path):
    python = received_python(tmp_path / "venv", next((received["bundle"] / "wheels").glob("*.whl")),
                             without=["transformers"])
    out = tmp_path / "out"
    proc = run_bundle(python, received["bundle"], ["run", "--config_file", "configs/inference.json",
                                                   "--input", received["scans"], "--output_dir", out],
                      received["cache"], check=False)
    assert proc.returncode != 0
    assert "package transformers is not installed; this bundle needs transformers>=" in last_line(proc), \
        proc.stderr[-2000:]
    assert not out.exists()


def test_export_refuses_to_overwrite_and_names_the_folder(received):
    with pytest.raises(FileExistsError, match="ct_clip_zeroshot_tiny exists; choose another or pass --overwrite True"):
        export_bundle(ZEROSHOT, received["work"] / "ct_clip_zeroshot_tiny", ["inference.json"])


@pytest.mark.skipif(os.environ.get("CTCLIP_FRESH_VENV") != "1",
                    reason="installs torch and the bundle's requirements into a new venv from the package index "
                           "(minutes); run with CTCLIP_FRESH_VENV=1")
def test_fresh_virtualenv(received, tmp_path):
    """What the bundle README says, to the letter: a new venv, torch first, then requirements.txt."""
    bundle, root = received["bundle"], tmp_path / "fresh"
    venv_python = root / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    subprocess.run([str(venv_python), "-m", "pip", "install", "--quiet", f"torch=={meta['pytorch_version']}"],
                   check=True)
    subprocess.run([str(venv_python), "-m", "pip", "install", "--quiet", "-r", "requirements.txt"], cwd=bundle,
                   check=True)
    out = tmp_path / "out"
    run_bundle(venv_python, bundle, ["run", "--config_file", "configs/inference.json", "--input", received["scans"],
                                     "--output_dir", out], received["cache"])
    ours = tmp_path / "ours"
    in_repo_run(["inference.json"], ZEROSHOT, model_config="ctclip_tiny", pretrained=str(received["checkpoint"]),
                input=str(received["scans"]), output_dir=str(ours))
    _, theirs_p = read_predictions_csv(out / "predictions.csv", CTRATE_PATHOLOGIES)
    _, ours_p = read_predictions_csv(ours / "predictions.csv", CTRATE_PATHOLOGIES)
    np.testing.assert_allclose(theirs_p, ours_p, rtol=0, atol=1e-6)


def test_the_preprocessing_travels_with_its_geometry(received, tmp_path):
    """ct_preprocess exported at a model's geometry prepares a partner's scans byte for byte as the repository does."""
    source = REPO / "bundles" / "ct_preprocess"
    export = tmp_path / "ct_preprocess_tiny"
    in_repo_run(["preprocess.json", "export.json"], source, model_config="ctclip_tiny", export_dir=str(export))
    bundle = unzip(export.with_name(export.name + ".zip"), tmp_path / "partner")
    assert json.loads((bundle / "configs" / "preprocess.json").read_text())["model_config"]["name"] == "ctclip_tiny"
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    run_bundle(received["python"], bundle, ["run", "--config_file", "configs/preprocess.json", "--input",
                                            received["scans"], "--output_dir", theirs], received["cache"])
    in_repo_run(["preprocess.json"], source, model_config="ctclip_tiny", input=str(received["scans"]),
                output_dir=str(ours), num_workers=0, progress=False)
    volumes = sorted(p.name for p in (ours / "volumes").iterdir())
    assert len(volumes) == 3 and volumes == sorted(p.name for p in (theirs / "volumes").iterdir())
    for name in volumes:
        assert (theirs / "volumes" / name).read_bytes() == (ours / "volumes" / name).read_bytes(), name
    assert (theirs / "qc.csv").read_text() == (ours / "qc.csv").read_text()
    run_bundle(received["python"], bundle, ["verify_metadata", "--meta_file", "configs/metadata.json",
                                            "--filepath", "docs/metadata_schema.json"], received["cache"])
