"""The MONAI Label app (monailabel_app/) served for real: `monailabel start_server` in a subprocess on 127.0.0.1 with a
tiny exported zero-shot and ClassFine bundle and a studies folder of three volumes. /infer equals the bundle's own
`python -m monai.bundle run`; a train task on confirmed labels changes the next /infer; a class added to the prompt
file is listed and scored; every bad request gets a 4xx with its reason and the server answers the next one.

The server runs in the MONAI Label environment that `make label` builds (.venv-label, or $CTCLIP_LABEL_PYTHON);
without it the test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctclip_contract import CTRATE_PATHOLOGIES, file_sha256
from custom_nets import ClassFineClassifier, create_model
from received_bundle import OFFLINE, dicom_series_folder, nifti_scans
from workflows.calibration import Calibration
from workflows.monailabel_server import monailabel_server
from workflows.writers import read_predictions_csv

REPO = Path(__file__).resolve().parents[1]
LABEL_PYTHON = Path(os.environ.get("CTCLIP_LABEL_PYTHON", REPO / ".venv-label" / "bin" / "python"))


def _label_env_reason() -> str | None:
    if not LABEL_PYTHON.is_file():
        return f"no MONAI Label environment at {LABEL_PYTHON} (make label builds it)"
    probe = subprocess.run([str(LABEL_PYTHON), "-c", "import monailabel.app, workflows.served_bundle"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"{LABEL_PYTHON} cannot import MONAI Label and this package: {probe.stderr.strip().splitlines()[-1:]}"
    return None


pytestmark = pytest.mark.skipif(_label_env_reason() is not None, reason=str(_label_env_reason()))

requests = pytest.importorskip("requests", reason="the test talks to the server with requests (the test extra)")


def _export(bundle: str, overrides: list[str], dest: Path) -> Path:
    root = REPO / "bundles" / bundle
    config = f"['{root}/configs/inference.json','{root}/configs/export.json']"
    subprocess.run([str(LABEL_PYTHON), "-m", "monai.bundle", "run", "--config_file", config, "--bundle_root",
                    str(root), "--model_config", "ctclip_tiny", "--export_dir", str(dest), *overrides],
                   cwd=REPO, check=True, capture_output=True, timeout=300, env={**os.environ, **OFFLINE})
    return dest


def _own_inference(bundle: Path, scan: Path, out: Path) -> dict[str, float]:
    """The bundle's own `python -m monai.bundle run` on one scan, in the same environment as the server."""
    subprocess.run([str(LABEL_PYTHON), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                    "--input", str(scan), "--output_dir", str(out)], cwd=bundle, check=True, capture_output=True,
                   timeout=300, env={**os.environ, **OFFLINE})
    csv = next(out.rglob("predictions.csv"))
    names, probs = read_predictions_csv(csv, CTRATE_PATHOLOGIES)
    return dict(zip(CTRATE_PATHOLOGIES, probs[0]))


#: the ClassFine bundle's calibration (a Platt map per finding, not the identity)
CALIBRATION = Calibration("platt", CTRATE_PATHOLOGIES, np.linspace(0.5, 2.0, 18), np.linspace(-1.0, 1.0, 18))


@pytest.fixture(scope="module")
def server(tiny_cohort_dir, tiny_clip_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("monailabel")
    bundles = work / "bundles"
    # a ClassFine model: the tiny CT-CLIP with a seeded head, and validation thresholds beside it
    run = work / "classfine_run" / "models"
    run.mkdir(parents=True)
    torch.manual_seed(3)
    net = ClassFineClassifier(create_model("ctclip_tiny"), num_classes=18, freeze_backbone=True)
    net.trained_model.load_state_dict(torch.load(tiny_clip_checkpoint, weights_only=True))
    torch.save(net.state_dict(), run / "model.pt")
    (run / "thresholds.json").write_text(json.dumps({
        "protocol": "val_youden", "description": "per-class Youden-J thresholds fitted on the validation split",
        "source": "test", "class_names": list(CTRATE_PATHOLOGIES), "thresholds": [0.5] * 18}))
    # and a calibration beside them (not the identity), which the bundle's postprocessing applies
    (run / "calibration.json").write_text(json.dumps(CALIBRATION.to_dict()))
    _export("ct_clip_classfine", ["--ckpt_path", str(run / "model.pt")], bundles / "ctclip_classfine")
    _export("ct_clip_zeroshot", ["--pretrained", str(tiny_clip_checkpoint)], bundles / "ctclip_zeroshot")
    # a bundle whose weights are another architecture's (their sha256 recorded, so only the strict load can tell)
    broken = Path(shutil.copytree(bundles / "ctclip_classfine", bundles / "ctclip_broken"))
    other = ClassFineClassifier(create_model("ctclip_tiny", ctclip={"dim_latent": 16}), num_classes=18)
    torch.save(other.state_dict(), broken / "models" / "model.pt")
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    meta["files_sha256"]["models/model.pt"] = file_sha256(broken / "models" / "model.pt")
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))

    studies = work / "studies"
    studies.mkdir()
    scans = nifti_scans(tiny_cohort_dir)[:3]
    for scan in scans:
        shutil.copy(scan, studies / scan.name)
    app = Path(shutil.copytree(REPO / "monailabel_app", work / "app", ignore=shutil.ignore_patterns(
        "bin", "lib", "model", "logs", "finetuned")))
    conf = {"models": "ctclip_zeroshot,ctclip_classfine,ctclip_broken", "bundles": str(bundles),
            "finetuned_dir": str(work / "finetuned")}
    with monailabel_server(LABEL_PYTHON, app, studies, conf, work, env={**os.environ, **OFFLINE}) as url:
        yield {"url": url, "bundles": bundles, "studies": studies, "work": work, "ids": [s.name[:-7] for s in scans],
               "cohort": Path(tiny_cohort_dir)}


def _infer(server, model: str, image: str) -> requests.Response:
    return requests.post(f"{server['url']}/infer/{model}", params={"image": image, "output": "json"}, timeout=120)


def test_info_lists_both_models_with_their_classes(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    for name in ("ctclip_zeroshot", "ctclip_classfine"):
        assert info["models"][name]["type"] == "classification"
        assert info["models"][name]["labels"] == list(CTRATE_PATHOLOGIES)
    assert "ctclip_classfine" in info["trainers"] and "ctclip_zeroshot" not in info["trainers"]


@pytest.mark.parametrize("model", ["ctclip_zeroshot", "ctclip_classfine"])
def test_infer_equals_the_bundle_run(server, model, tmp_path):
    image = server["ids"][0]
    response = _infer(server, model, image)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["class_names"] == list(CTRATE_PATHOLOGIES)
    own = _own_inference(server["bundles"] / model, server["studies"] / f"{image}.nii.gz", tmp_path / "own")
    for name in CTRATE_PATHOLOGIES:
        assert abs(result["probabilities"][name] - own[name]) <= 1e-6, name  # predictions.csv keeps 6 decimals
    if model == "ctclip_classfine":
        # calibrated probabilities, decided at the thresholds (0.5 on the uncalibrated probability) mapped through
        # the same calibration
        assert result["calibration"].startswith("platt calibration")
        mapped = CALIBRATION.thresholds([0.5] * 18)
        assert [result["thresholds"][c] for c in CTRATE_PATHOLOGIES] == pytest.approx(list(mapped), abs=1e-12)
        assert result["decisions"] == {c: int(result["probabilities"][c] >= t) for c, t in zip(CTRATE_PATHOLOGIES, mapped)}
    else:
        assert result["calibration"].startswith("none")  # exported without --calibration_path


def test_a_dicom_series_folder_as_the_dicomweb_datastore_hands_it_over(server, tmp_path):
    """A DICOMweb datastore downloads a series into a folder and passes its path as the image."""
    series = dicom_series_folder(server["cohort"])
    response = _infer(server, "ctclip_zeroshot", str(series))
    assert response.status_code == 200, response.text
    own = _own_inference(server["bundles"] / "ctclip_zeroshot", series, tmp_path / "own")
    for name in CTRATE_PATHOLOGIES:
        assert abs(response.json()["probabilities"][name] - own[name]) <= 1e-6, name


def test_upload_variant_gives_the_same_result(server):
    image = server["ids"][1]
    by_id = _infer(server, "ctclip_zeroshot", image).json()
    with open(server["studies"] / f"{image}.nii.gz", "rb") as f:
        uploaded = requests.post(f"{server['url']}/infer/ctclip_zeroshot", params={"output": "json"},
                                 files={"file": (f"{image}.nii.gz", f)}, timeout=120)
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["probabilities"] == by_id["probabilities"]


def _volume_file(path: Path, shape) -> Path:
    nib.save(nib.Nifti1Image(np.full(shape, -1000, np.int16), np.diag([1.0, 1.0, 1.0, 1.0])), path)
    return path


@pytest.mark.parametrize("case", ["not_an_image", "two_d", "four_d", "unknown_image", "unknown_model",
                                  "weights_of_another_network"])
def test_bad_request_gets_a_4xx_with_its_reason_and_the_server_stays_up(server, case, tmp_path):
    if case in ("not_an_image", "two_d", "four_d"):
        path = {"not_an_image": lambda: (tmp_path / "notes.nii.gz").write_text("no image") and tmp_path / "notes.nii.gz",
                "two_d": lambda: _volume_file(tmp_path / "slice.nii.gz", (32, 32)),
                "four_d": lambda: _volume_file(tmp_path / "series.nii.gz", (16, 16, 12, 3))}[case]()
        with open(path, "rb") as f:
            response = requests.post(f"{server['url']}/infer/ctclip_zeroshot", params={"output": "json"},
                                     files={"file": (path.name, f)}, timeout=120)
        expected = (422, {"not_an_image": "not a readable NIfTI", "two_d": "not a 3-D volume",
                           "four_d": "not a 3-D volume"}[case])
    elif case == "unknown_image":
        response, expected = _infer(server, "ctclip_zeroshot", "no_such_scan"), (404, "no image 'no_such_scan'")
    elif case == "unknown_model":
        response, expected = _infer(server, "no_such_model", server["ids"][0]), (404, "no model 'no_such_model'")
    else:
        response, expected = _infer(server, "ctclip_broken", server["ids"][0]), (409, "size mismatch")
    assert response.status_code == expected[0], response.text
    assert expected[1] in response.json()["detail"], response.text
    assert _infer(server, "ctclip_zeroshot", server["ids"][0]).status_code == 200  # still serving


def test_training_on_confirmed_labels_changes_the_next_inference(server):
    url, image = server["url"], server["ids"][0]
    before = _infer(server, "ctclip_classfine", image).json()["probabilities"]["Cardiomegaly"]
    for i, image_id in enumerate(server["ids"]):
        label = server["work"] / f"{image_id}.json"
        label.write_text(json.dumps({"Cardiomegaly": 1, "Emphysema": i % 2}))
        with open(label, "rb") as f:
            r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                             files={"label": (label.name, f)}, timeout=60)
        assert r.status_code == 200, r.text
    r = requests.post(f"{url}/train/ctclip_classfine", json={"epochs": 50}, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.time() + 300
    while True:
        task = requests.get(f"{url}/train/", timeout=30).json()
        task = task[-1] if isinstance(task, list) else task
        if task.get("status") in ("DONE", "ERROR") or time.time() > deadline:
            break
        time.sleep(2)
    assert task.get("status") == "DONE", task
    after = _infer(server, "ctclip_classfine", image).json()
    assert after["weights"].endswith("model.pt") and "finetuned" in after["weights"]
    assert after["probabilities"]["Cardiomegaly"] > before + 0.05  # all three confirmed positive


def test_a_class_added_to_the_prompt_file_is_listed_and_scored(server):
    prompts_path = server["bundles"] / "ctclip_zeroshot" / "configs" / "prompts.json"
    prompts = json.loads(prompts_path.read_text())
    prompts["classes"].append({"name": "Pneumothorax", "prompt": "pneumothorax"})
    prompts_path.write_text(json.dumps(prompts))
    info = requests.get(f"{server['url']}/info/", timeout=60).json()
    assert info["models"]["ctclip_zeroshot"]["labels"][-1] == "Pneumothorax"
    result = _infer(server, "ctclip_zeroshot", server["ids"][2]).json()
    assert 0.0 <= result["probabilities"]["Pneumothorax"] <= 1.0
