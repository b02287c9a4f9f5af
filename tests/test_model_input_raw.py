"""Raw scan (NIfTI or DICOM folder) straight to a model input, as inference bundles use it."""

import sys
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

sys.path.insert(0, str(Path(__file__).parent))
from test_preprocess_phantom import NODULE_LPS, write_dicom_series, write_nifti  # noqa: E402

from transforms import raw_to_model_input_transforms  # noqa: E402


def test_raw_nifti_and_dicom_give_the_same_model_input(tmp_path):
    chain = Compose(raw_to_model_input_transforms("ctclip_tiny"))
    a = chain({"image": str(write_nifti(tmp_path / "v.nii.gz", "LAS", "raw_scl"))})
    b = chain({"image": str(write_dicom_series(tmp_path / "dcm", descending=True))})
    for d in (a, b):
        img = d["image"]
        assert img.dtype == torch.float32 and tuple(img.shape) == (1, 16, 32, 32)  # (C, D, H, W) = S, L, P
        assert float(img.min()) >= -1.0 and float(img.max()) <= 1.0
        assert d["hu_provenance"]["decision"] == "header"
    assert float((a["image"] - b["image"]).abs().mean()) < 2e-3  # < 2 HU
    # the nodule (LPS x=+40: patient left) is where the affine says, and H runs R -> L ("SLP")
    img = a["image"][0].numpy()
    aff = a["image"].affine.numpy()
    inv = np.linalg.inv(aff)
    ras = NODULE_LPS * [-1, -1, 1]
    d, h, w = np.round(inv[:3, :3] @ ras + inv[:3, 3]).astype(int)
    assert img[d, h, w] > 0.15  # > 150 HU: the nodule, not lung or soft tissue
    md, mh, mw = np.round(inv[:3, :3] @ (ras * [-1, 1, 1]) + inv[:3, 3]).astype(int)
    assert img[md, mh, mw] < 0.15 and mh < h  # the mirrored spot is lung, further right
    assert aff[2, 0] > 0 and aff[0, 1] < 0 and aff[1, 2] < 0  # D -> S, H -> L, W -> P
