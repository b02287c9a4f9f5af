"""Stand-ins for the renderer side, used where a test must not depend on it (text, encodings).

A few ellipsoids in HU make a volume with air, lung, soft tissue and bone; records follow the
``sample_case_record`` contract closely enough for the report writer and parser.
"""

import numpy as np

from ctclip_contract import CTRATE_PATHOLOGIES

SUBTYPES = {
    "Medical material": ["sternotomy wires", "central venous catheter", "port catheter", "pacemaker", "surgical clips"],
    "Emphysema": ["centrilobular", "paraseptal", "panlobular", "bullous"],
    "Atelectasis": ["subsegmental", "passive"],
    "Lung nodule": ["solid", "ground-glass", "calcified"],
    "Lung opacity": ["ground-glass", "dependent"],
    "Pulmonary fibrotic sequela": ["apical", "basal reticular"],
    "Hiatal hernia": ["sliding"],
    "Bronchiectasis": ["cylindrical", "traction"],
}
LOBES = ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "lingula", "left lower lobe"]
STATIONS = ["subcarinal", "prevascular", "right hilar", "left hilar", "right paratracheal"]
INCIDENTAL = ["hepatosteatosis", "renal cyst", "thyroid nodule", "scoliosis", "degenerative osteophytes", "costal cartilage calcification"]
SIZED = {"Lung nodule": (3, 25), "Lymphadenopathy": (8, 25), "Pleural effusion": (5, 60), "Pericardial effusion": (4, 20), "Emphysema": (10, 40)}


def standin_record(index: int, p: float = 0.35) -> dict:
    rng = np.random.default_rng([index, 77])
    findings = []
    for label in CTRATE_PATHOLOGIES:
        if rng.random() >= p:
            continue
        side = str(rng.choice(["right", "left", "bilateral"]))
        if label == "Lymphadenopathy":
            sites = [str(s) for s in rng.choice(STATIONS, size=int(rng.integers(1, 3)), replace=False)]
        elif rng.random() < 0.6 and label not in ("Cardiomegaly", "Pericardial effusion", "Hiatal hernia", "Medical material"):
            sites = [str(s) for s in rng.choice(LOBES, size=int(rng.integers(1, 3)), replace=False)]
        else:
            sites = []
        size = float(np.round(rng.uniform(*SIZED[label]), 1)) if label in SIZED else None
        sub = str(rng.choice(SUBTYPES[label])) if label in SUBTYPES else None
        findings.append({"label": label, "severity": str(rng.choice(["minimal", "mild", "moderate", "marked"])),
                         "side": side, "sites": sites, "size_mm": size, "count": int(rng.integers(1, 5)),
                         "subtype": sub, "centers_mm": [[float(rng.uniform(-80, 80)), float(rng.uniform(-40, 60)), float(rng.uniform(-100, 80))]]})
    labels = {name: int(any(f["label"] == name for f in findings)) for name in CTRATE_PATHOLOGIES}
    return {"patient_id": f"train_{index}", "scan": "a", "seed": index, "age": int(rng.integers(18, 95)),
            "sex": str(rng.choice(["M", "F"])),
            "latent": {k: bool(rng.random() < 0.3) for k in ("smoker", "heart_failure", "infection", "airway_disease", "post_op", "prior_infection")},
            "labels": labels, "findings": findings,
            "incidental": [str(s) for s in rng.choice(INCIDENTAL, size=int(rng.integers(0, 3)), replace=False)], "anatomy": {}}


def standin_volume(shape=(40, 36, 24), spacing=(4.0, 4.0, 5.0), seed=0) -> tuple[np.ndarray, dict]:
    """Air, a body ellipse with fat, two lungs, a spine; integer-valued HU with a few extreme voxels."""
    nx, ny, nz = shape
    origin = [-(nx - 1) * spacing[0] / 2, -(ny - 1) * spacing[1] / 2, -(nz - 1) * spacing[2] / 2]
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    x, y = origin[0] + i * spacing[0], origin[1] + j * spacing[1]
    hu = np.full(shape, -1000.0, np.float32)
    body = (x / 75) ** 2 + (y / 55) ** 2 <= 1
    hu[body] = -100
    hu[((x / 70) ** 2 + (y / 50) ** 2 <= 1)] = 40
    hu[(((x - 35) / 28) ** 2 + (y / 38) ** 2 <= 1)] = -860
    hu[(((x + 35) / 28) ** 2 + (y / 38) ** 2 <= 1)] = -860
    hu[((x / 12) ** 2 + ((y - 40) / 12) ** 2 <= 1)] = 700
    rng = np.random.default_rng(seed)
    hu += rng.normal(0, 15, shape).astype(np.float32)
    hu[0, 0, 0], hu[1, 0, 0], hu[2, 0, 0] = 3500.0, -1300.0, 3071.4  # outside the 12-bit range: clipped
    return hu, {"shape": list(shape), "spacing_mm": list(spacing), "origin_mm": origin}


# The renderer contract, for cohort tests that must not depend on the real renderer's speed.
def sample_case_record(patient_id, scan, seed, prevalence="ctrate", balanced=False):
    if isinstance(prevalence, dict):
        unknown = [k for k in prevalence if k not in CTRATE_PATHOLOGIES]
        if unknown:
            raise ValueError(f"unknown finding names in prevalence: {unknown}")
    rec = standin_record(int(seed) % 100000, p=0.5 if balanced else 0.3)
    rec.update(patient_id=patient_id, scan=scan, seed=int(seed))
    return rec


def default_grid(record, geometry, rng):
    if geometry not in ("tests", "demo"):
        raise ValueError(f"unknown geometry {geometry!r}")
    shape = (40, 36, 24) if geometry == "tests" else (96, 80, 60)
    spacing = (4.0, 4.0, 5.0)
    return {"shape": list(shape), "spacing_mm": list(spacing),
            "origin_mm": [-(shape[0] - 1) * spacing[0] / 2, -(shape[1] - 1) * spacing[1] / 2, -(shape[2] - 1) * spacing[2] / 2]}


def sample_recon(record, rng, index):
    return {"kernel": "soft" if index == 1 else "sharp", "noise_sd_hu": 15.0, "slice_thickness_mm": 5.0,
            "fov_diameter_mm": 150.0, "padding_value_hu": float(rng.choice([-1024, -2048, -3024, -8192])), "iterative": False}


def render_truth(record, grid):
    hu, _ = standin_volume(tuple(grid["shape"]), tuple(grid["spacing_mm"]), seed=int(record["seed"]) % 1000)
    return {"hu": hu}


def apply_scanner(truth, grid, recon, seed):
    rng = np.random.default_rng(seed)
    hu = truth["hu"] + rng.normal(0, recon["noise_sd_hu"], truth["hu"].shape).astype(np.float32)
    nx, ny, _ = hu.shape
    i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    outside = ((i - (nx - 1) / 2) * grid["spacing_mm"][0]) ** 2 + ((j - (ny - 1) / 2) * grid["spacing_mm"][1]) ** 2 > (recon["fov_diameter_mm"] / 2) ** 2
    hu[outside] = recon["padding_value_hu"]
    return hu
