"""Shared fixtures: one tiny synthetic cohort per test session, raw and preprocessed.

Every stage's tests run on the same generated data so the suite pays for generation and
preprocessing once. Sizes are the ``tests`` phantom geometry and the ``ctclip_tiny`` model
contract (8x8x10 mm, 32x32x16): enough to exercise every reader, encoding and engine on two cores.
"""

from __future__ import annotations

import os

import pytest
import torch

TINY_COHORT_CASES = 16


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Keep tokenizer caches out of the user's home and never reach for the hub."""
    cache = tmp_path_factory.mktemp("ctclip_monai_cache")
    previous = {k: os.environ.get(k) for k in ("CTCLIP_MONAI_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["CTCLIP_MONAI_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    torch.manual_seed(0)
    yield
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_cohort_dir(tmp_path_factory):
    """A raw synthetic cohort in the CT-RATE layout (NIfTI files and DICOM series folders, every
    encoding and orientation variant the generator knows), balanced so that small splits have
    positives."""
    from chest_phantom.cohort import generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    generate_cohort(out, num_cases=TINY_COHORT_CASES, seed=7, geometry="tests", balanced=True,
                    dicom_fraction=0.25, num_workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_preprocessed_dir(tiny_cohort_dir, tmp_path_factory):
    """``tiny_cohort_dir`` through the ct_preprocess pipeline at the ``ctclip_tiny`` contract:
    ``volumes/*.nii.gz`` (int16 HU, RAS), ``datalist.json`` with patient-wise splits, ``qc.csv``."""
    from workflows.preprocess_cohort import CTPreprocessor

    out = tmp_path_factory.mktemp("tiny_preprocessed")
    CTPreprocessor(input_dir=str(tiny_cohort_dir), output_dir=str(out), model_config="ctclip_tiny",
                   num_workers=0, progress=False).run()
    return out


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory):
    """A randomly initialised ``ctclip_tiny`` CT-CLIP saved as a plain state dict: the stand-in for a
    pretrained model in the fine-tuning and zero-shot bundle tests."""
    from custom_nets import create_model

    torch.manual_seed(0)
    model = create_model("ctclip_tiny")
    path = tmp_path_factory.mktemp("tiny_clip") / "model.pt"
    torch.save(model.state_dict(), path)
    return path
