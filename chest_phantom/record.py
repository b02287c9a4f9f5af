"""Case records of the synthetic chest-CT cohort: the one truth labels, reports and images derive from.

Contract (shared with the report writer and the cohort orchestrator)::

    sample_case_record(patient_id: str, scan: str, seed: int,
                       prevalence: dict | str = "ctrate", balanced: bool | float = False,
                       label_noise: float = 0.0) -> dict

returns a JSON-serialisable dict::

    {"patient_id": "train_12", "scan": "a", "seed": int, "age": int, "sex": "M"|"F",
     "latent": {"smoker", "heart_failure", "infection", "airway_disease", "post_op",
                "prior_infection": bool},
     "labels": {<each of ctclip_contract.CTRATE_PATHOLOGIES>: 0|1},
     "findings": [{"label": <CT-RATE name>, "severity": "minimal"|"mild"|"moderate"|"marked",
                   "side": "right"|"left"|"bilateral"|"midline", "sites": [str, ...],
                   "size_mm": float|None, "count": int, "subtype": str|None,
                   "centers_mm": [[x, y, z], ...]}],      # patient LPS mm, z = 0 at the carina
     "incidental": [str, ...],
     "anatomy": {...},                                      # see anatomy.sample_anatomy
     "label_noise_flips": [str, ...]}                       # only when label_noise > 0

``labels[name] == 1`` iff a finding with that label is listed (before label noise, which flips
entries of ``labels`` only and records them in ``label_noise_flips``). Subtypes use the fixed
vocabulary in :data:`SUBTYPES`; sites are lobe names (:data:`.anatomy.LOBES`) or node stations
(:data:`.anatomy.NODE_STATIONS`). ``size_mm``: nodule = largest diameter, lymphadenopathy =
largest short axis, pleural/pericardial effusion = maximal thickness.

Prevalence follows CT-RATE's label statistics through six latent factors (a small Bayesian
network): every label has a base probability that is raised when one of its parent factors is
present, solved so that the marginal equals the target; the documented pairwise couplings
(coronary ⇒ arterial calcification 0.86, consolidation ⇒ lung opacity 0.63, pleural effusion ⇒
atelectasis 0.63, cardiomegaly ⇒ pleural effusion 0.42) are sampled as conditionals with the
complementary probability solved the same way. ``balanced`` replaces every target by ``p``
(0.4 for ``True``) so that small cohorts have positives for all 18 labels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ctclip_contract import CTRATE_PATHOLOGIES
from .anatomy import LOBE_IDS, LOBES, NODE_STATIONS, ChestAnatomy, sample_anatomy

__all__ = ["CTRATE_PREVALENCE", "INCIDENTAL_FINDINGS", "LATENT_FACTORS", "SEVERITIES", "SUBTYPES", "sample_case_record", "validate_prevalence"]

#: Label frequency per scan in 1,000 manually labelled CT-RATE-style reports (README, "Case records").
CTRATE_PREVALENCE = {
    "Medical material": 0.15,
    "Arterial wall calcification": 0.29,
    "Cardiomegaly": 0.12,
    "Pericardial effusion": 0.08,
    "Coronary artery wall calcification": 0.22,
    "Hiatal hernia": 0.16,
    "Lymphadenopathy": 0.34,
    "Emphysema": 0.24,
    "Atelectasis": 0.28,
    "Lung nodule": 0.45,
    "Lung opacity": 0.31,
    "Pulmonary fibrotic sequela": 0.28,
    "Pleural effusion": 0.15,
    "Mosaic attenuation pattern": 0.09,
    "Peribronchial thickening": 0.10,
    "Consolidation": 0.16,
    "Bronchiectasis": 0.10,
    "Interlobular septal thickening": 0.08,
}

#: Prevalence of the latent factors (per scan).
LATENT_FACTORS = {
    "smoker": 0.35,
    "heart_failure": 0.15,
    "infection": 0.22,
    "airway_disease": 0.15,
    "post_op": 0.12,
    "prior_infection": 0.25,
}

#: Parent factors of each label ("old" = age >= 65 acts like a factor).
_PARENTS = {
    "Medical material": ("post_op",),
    "Arterial wall calcification": ("smoker", "old"),
    "Cardiomegaly": ("heart_failure",),
    "Pericardial effusion": ("heart_failure",),
    "Coronary artery wall calcification": ("smoker", "old"),
    "Hiatal hernia": ("old",),
    "Lymphadenopathy": ("infection",),
    "Emphysema": ("smoker",),
    "Atelectasis": ("heart_failure", "post_op"),
    "Lung nodule": ("smoker", "prior_infection"),
    "Lung opacity": ("infection",),
    "Pulmonary fibrotic sequela": ("prior_infection",),
    "Pleural effusion": ("heart_failure", "infection", "post_op"),
    "Mosaic attenuation pattern": ("airway_disease",),
    "Peribronchial thickening": ("airway_disease",),
    "Consolidation": ("infection",),
    "Bronchiectasis": ("airway_disease",),
    "Interlobular septal thickening": ("heart_failure", "infection"),
}

#: label -> (parent label, P(label | parent)) : documented pairwise couplings.
_COUPLINGS = {
    "Arterial wall calcification": ("Coronary artery wall calcification", 0.86),
    "Lung opacity": ("Consolidation", 0.63),
    "Atelectasis": ("Pleural effusion", 0.63),
    "Pleural effusion": ("Cardiomegaly", 0.42),
}
# sampling order: parents of couplings first
_ORDER = (
    "Cardiomegaly",
    "Pleural effusion",
    "Atelectasis",
    "Coronary artery wall calcification",
    "Arterial wall calcification",
    "Consolidation",
    "Lung opacity",
) + tuple(n for n in CTRATE_PATHOLOGIES if n not in {
    "Cardiomegaly", "Pleural effusion", "Atelectasis", "Coronary artery wall calcification",
    "Arterial wall calcification", "Consolidation", "Lung opacity"})

SEVERITIES = ("minimal", "mild", "moderate", "marked")

#: Subtype vocabulary the report writer relies on (labels absent here have subtype None).
SUBTYPES = {
    "Medical material": ("sternotomy wires", "central venous catheter", "port catheter", "pacemaker", "surgical clips"),
    "Emphysema": ("centrilobular", "paraseptal", "panlobular", "bullous"),
    "Atelectasis": ("subsegmental", "passive"),
    "Lung nodule": ("solid", "ground-glass", "calcified"),
    "Lung opacity": ("ground-glass", "dependent"),
    "Pulmonary fibrotic sequela": ("apical", "basal reticular"),
    "Hiatal hernia": ("sliding",),
    "Bronchiectasis": ("cylindrical", "traction"),
}

INCIDENTAL_FINDINGS = (
    "hepatosteatosis",
    "renal cyst",
    "thyroid nodule",
    "scoliosis",
    "degenerative osteophytes",
    "costal cartilage calcification",
)

_P_OLD = 0.373  # P(age >= 65) under the age model below (18 + 77 Beta(2.4, 2.2))


def validate_prevalence(prevalence) -> dict:
    """Resolve ``prevalence`` ("ctrate" or {label: probability}) to a full {label: p} dict.

    Raises:
        ValueError: for unknown label names (all of them named) or probabilities outside [0, 1].
    """
    if isinstance(prevalence, str):
        if prevalence.lower() != "ctrate":
            raise ValueError(f"unknown prevalence preset {prevalence!r}; use 'ctrate' or a dict")
        return dict(CTRATE_PREVALENCE)
    unknown = [k for k in prevalence if k not in CTRATE_PREVALENCE]
    if unknown:
        raise ValueError(
            f"unknown label name(s) in prevalence: {', '.join(map(repr, unknown))}; valid: {', '.join(CTRATE_PATHOLOGIES)}"
        )
    bad = [k for k, v in prevalence.items() if not 0.0 <= float(v) <= 1.0]
    if bad:
        raise ValueError(f"prevalence must be in [0, 1] for: {', '.join(bad)}")
    out = dict(CTRATE_PREVALENCE)
    out.update({k: float(v) for k, v in prevalence.items()})
    return out


def _p_any(parents, latent_p) -> float:
    q = 1.0
    for f in parents:
        q *= 1.0 - latent_p[f]
    return 1.0 - q


def _conditional(p_target, p_given_active, q_active):
    """P(label | no active parent) such that the marginal equals ``p_target``."""
    if q_active >= 1.0:
        return p_given_active
    return float(np.clip((p_target - q_active * p_given_active) / (1.0 - q_active), 0.0, 1.0))


def _lift(p):
    """P(label | some parent active): a coupling strong enough to show, never certain."""
    return float(min(0.95, p + (1.0 - p) * 0.35, 3.0 * p + 0.05))


def _latent_prob(p, any_active, q):
    """P(label | parents) from the marginal ``p`` and P(any parent active) ``q``."""
    if p <= 0.0 or p >= 1.0:
        return float(np.clip(p, 0.0, 1.0))
    hi = min(_lift(p), p / q) if q > 0 else p  # never so strong that the marginal overshoots
    return hi if any_active else _conditional(p, hi, q)


def sample_case_record(
    patient_id: str,
    scan: str,
    seed: int,
    prevalence="ctrate",
    balanced=False,
    label_noise: float = 0.0,
) -> dict:
    """Sample one scan's case record (demographics, latent factors, findings, anatomy).

    Args:
        patient_id: e.g. ``"train_12"``.
        scan: scan letter, e.g. ``"a"``.
        seed: integer seed; the record (and everything rendered from it) is a pure function of it.
        prevalence: ``"ctrate"`` or a dict {CT-RATE label: probability} overriding some labels.
        balanced: ``True`` targets 0.4 per label, a float targets that probability.
        label_noise: probability of flipping each entry of ``labels`` (findings stay true).

    Returns:
        The JSON-serialisable record described in the module docstring.

    Raises:
        ValueError: unknown label names in ``prevalence``.
    """
    target = validate_prevalence(prevalence)
    if balanced is not False and balanced is not None:
        p_bal = 0.4 if balanced is True else float(balanced)
        target = {k: p_bal for k in target}
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EC0])
    sex = "M" if rng.random() < 0.584 else "F"
    age = int(np.clip(round(18 + 77 * rng.beta(2.4, 2.2)), 18, 95))
    latent = {k: bool(rng.random() < p) for k, p in LATENT_FACTORS.items()}
    active = dict(latent)
    active["old"] = age >= 65
    latent_p = dict(LATENT_FACTORS)
    latent_p["old"] = _P_OLD

    labels = {}
    for name in _ORDER:
        p = target[name]
        q = _p_any(_PARENTS[name], latent_p)
        any_active = any(active[f] for f in _PARENTS[name])
        if name in _COUPLINGS:
            parent, c = _COUPLINGS[name]
            p_par = target[parent]
            # the documented conditional, capped so that the marginal can still equal the target
            c = min(c, p / p_par) if p_par > 0 else 0.0
            prob = c if labels[parent] else _latent_prob(_conditional(p, c, p_par), any_active, q)
        else:
            prob = _latent_prob(p, any_active, q)
        labels[name] = int(rng.random() < prob)
    # passive atelectasis needs an effusion; keep the pair physically consistent
    cmr = 0.0
    if labels["Cardiomegaly"]:
        ctr = float(rng.uniform(0.55, 0.70))
    else:
        ctr = float(rng.uniform(0.38, 0.48))
    del cmr
    anatomy = sample_anatomy(rng, age, sex, ctr)
    incidental = [f for f, p in zip(INCIDENTAL_FINDINGS, (0.08, 0.06, 0.05, 0.06, 0.12 + 0.004 * max(age - 40, 0), 0.15 + 0.005 * max(age - 40, 0))) if rng.random() < p]
    if "hepatosteatosis" in incidental:
        anatomy["liver_hu"] = float(rng.uniform(20, 38))
    anat = ChestAnatomy(anatomy, incidental)

    findings = []
    for name in CTRATE_PATHOLOGIES:
        if labels[name]:
            findings.append(_sample_finding(name, rng, anat, age, labels))
    record = {
        "patient_id": str(patient_id),
        "scan": str(scan),
        "seed": int(seed),
        "age": age,
        "sex": sex,
        "latent": latent,
        "labels": {n: int(labels[n]) for n in CTRATE_PATHOLOGIES},
        "findings": findings,
        "incidental": incidental,
        "anatomy": anatomy,
    }
    if label_noise > 0:
        flips = [n for n in CTRATE_PATHOLOGIES if rng.random() < label_noise]
        for n in flips:
            record["labels"][n] = 1 - record["labels"][n]
        record["label_noise_flips"] = flips
    return record


# ---------------------------------------------------------------------------------------------
def _severity(rng, weights=(0.35, 0.35, 0.2, 0.1)) -> str:
    return str(rng.choice(SEVERITIES, p=np.asarray(weights) / sum(weights)))


def _sev_index(sev: str) -> int:
    return SEVERITIES.index(sev)


def _side_lobes(rng, lobes_pool, p_bilateral=0.4):
    """Pick a side and 1–3 lobes from a pool of lobe names."""
    right = [l for l in lobes_pool if l.startswith("right")]
    left = [l for l in lobes_pool if not l.startswith("right")]
    u = rng.random()
    if u < p_bilateral and right and left:
        side = "bilateral"
        sites = [str(rng.choice(right)), str(rng.choice(left))]
    elif (u < p_bilateral + (1 - p_bilateral) / 2 and right) or not left:
        side = "right"
        sites = list(rng.choice(right, size=min(len(right), int(rng.integers(1, 3))), replace=False))
    else:
        side = "left"
        sites = list(rng.choice(left, size=min(len(left), int(rng.integers(1, 3))), replace=False))
    return side, [str(s) for s in sites]


def _side_of(sites):
    r = any(s.startswith("right") for s in sites)
    l = any(not s.startswith("right") for s in sites)
    return "bilateral" if (r and l) else ("right" if r else "left")


def _pts(arr):
    return [[round(float(v), 1) for v in p] for p in np.atleast_2d(arr)]


ALL_LOBES = tuple(LOBES.values())
LOWER = ("right lower lobe", "left lower lobe")
UPPER = ("right upper lobe", "left upper lobe")


# ---------------------------------------------------------------------------------------------
# One sampler per finding. Each fills the finding dict ``f`` (label, severity, side, sites, size,
# count, subtype, centres and its own extra fields) from the record's generator. The order of the
# random draws inside a sampler, and the order of the samplers (CT-RATE label order, positives
# only), is part of the output: changing either changes every cohort generated from a seed.
# ---------------------------------------------------------------------------------------------
def _medical_material(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """1-3 distinct devices at fixed places (sternum, SVC, anterior chest wall, left pectoral region, mediastinum)."""
    n = int(rng.choice([1, 1, 1, 2, 3]))
    subs = list(rng.choice(SUBTYPES["Medical material"], size=n, replace=False, p=[0.25, 0.25, 0.15, 0.15, 0.2]))
    f["subtype"] = str(subs[0])
    f["devices"] = [str(s) for s in subs]
    f["count"] = n
    f["severity"] = "mild"
    sides = []
    centers = []
    for s in subs:
        if s == "sternotomy wires":
            centers.append([0.0, -anat.B - 6, -30.0]); sides.append("midline")
        elif s == "central venous catheter":
            centers.append(list(anat.svc[-1])); sides.append("right")
        elif s == "port catheter":
            centers.append([-0.5 * anat.A, -anat.B - 22 - 0.5 * anat.fat, 55.0]); sides.append("right")
        elif s == "pacemaker":
            centers.append([0.55 * anat.A, -anat.B - 24 - 0.5 * anat.fat, 60.0]); sides.append("left")
        else:
            centers.append([-8.0, anat.yt, -10.0]); sides.append("midline")
    f["side"] = sides[0] if len(set(sides)) == 1 else "bilateral"
    f["sites"] = [{"central venous catheter": "superior vena cava", "port catheter": "right anterior chest wall",
                   "pacemaker": "left pectoral region", "sternotomy wires": "sternum", "surgical clips": "mediastinum"}[s] for s in subs]
    f["centers_mm"] = _pts(centers)
    f["device_seed"] = int(rng.integers(0, 2**31 - 1))


def _arterial_calcification(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Aortic plaques: severity (worse with age) sets the plaque count; up to 6 centres on the aorta."""
    sev = _severity(rng, (0.25 + (age < 60) * 0.2, 0.35, 0.25, 0.15 + (age > 75) * 0.15))
    f.update(severity=sev, side="midline", sites=["aortic arch", "descending aorta"] if rng.random() < 0.7 else ["aortic arch"],
             count=int([4, 8, 16, 28][_sev_index(sev)] + rng.integers(0, 5)))
    idx = rng.integers(0, len(anat.aorta_points), size=min(f["count"], 6))
    f["centers_mm"] = _pts(anat.aorta_points[idx])
    f["plaque_seed"] = int(rng.integers(0, 2**31 - 1))


def _cardiomegaly(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Severity from the anatomy's cardiothoracic ratio (the enlarged heart itself is part of the anatomy)."""
    ctr = anat.p["cardiothoracic_ratio"]
    sev = "mild" if ctr < 0.6 else ("moderate" if ctr < 0.66 else "marked")
    f.update(severity=sev, side="midline", sites=["heart"], centers_mm=_pts(anat.heart_center))


def _pericardial_effusion(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Maximal thickness 5-28 mm by severity, centred on the heart."""
    sev = _severity(rng, (0.45, 0.3, 0.17, 0.08))
    t = float(rng.uniform(*[(5, 8), (8, 12), (12, 18), (18, 28)][_sev_index(sev)]))
    f.update(severity=sev, side="midline", sites=["pericardium"], size_mm=round(t, 1), centers_mm=_pts(anat.heart_center))


def _coronary_calcification(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """3-17 foci on LAD (half), LCx and RCA, each at a position along the first 70 % of its artery."""
    sev = _severity(rng, (0.3, 0.35, 0.22, 0.13))
    n = int([3, 6, 10, 15][_sev_index(sev)] + rng.integers(0, 3))
    arteries = [str(a) for a in rng.choice(["LAD", "LCx", "RCA"], size=n, p=[0.5, 0.25, 0.25])]
    f.update(severity=sev, side="midline", count=n, sites=sorted(set({"LAD": "left anterior descending", "LCx": "circumflex", "RCA": "right coronary"}[a] for a in arteries)))
    f["arteries"] = arteries
    f["positions"] = [float(v) for v in rng.uniform(0.0, 0.7, n)]
    f["centers_mm"] = _pts([_along(getattr(anat, a.lower()), t) for a, t in zip(arteries, f["positions"])])


def _hiatal_hernia(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Sliding hernia, sac diameter 28-78 mm by severity, on the oesophagus above the hiatus."""
    sev = _severity(rng, (0.2, 0.4, 0.3, 0.1))
    d = float(rng.uniform(*[(28, 36), (36, 46), (46, 60), (60, 78)][_sev_index(sev)]))
    c = anat.esophagus[np.argmin(np.abs(anat.esophagus[:, 2] - (anat.z_hiatus + 0.45 * d)))]
    f.update(severity=sev, side="midline", subtype="sliding", sites=["esophageal hiatus"], size_mm=round(d, 1),
             centers_mm=_pts(c + np.array([4.0, 0.0, 0.0])))


def _lymphadenopathy(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """1-6 enlarged nodes at distinct stations, short axes 10-30 mm by severity."""
    sev = _severity(rng, (0.3, 0.35, 0.25, 0.1))
    n = int(np.clip([1, 2, 3, 5][_sev_index(sev)] + rng.integers(0, 2), 1, 6))
    stations = [str(s) for s in rng.choice(NODE_STATIONS[:7], size=n, replace=False)]
    sizes = rng.uniform(*[(10, 13), (11, 16), (13, 22), (16, 30)][_sev_index(sev)], size=n)
    f.update(severity=sev, count=n, sites=stations, size_mm=round(float(sizes.max()), 1))
    f["node_sizes_mm"] = [round(float(s), 1) for s in sizes]
    has_r = any("right" in s for s in stations)
    has_l = any("left" in s or "aortopulmonary" in s for s in stations)
    f["side"] = "bilateral" if has_r and has_l else ("right" if has_r else ("left" if has_l else "midline"))
    f["centers_mm"] = _pts([anat.node_station(s) + rng.normal(0, 1.5, 3) for s in stations])


def _emphysema(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Subtype picks the lobe pool; severity sets the LAA%-950 target of the affected lobes."""
    sub = str(rng.choice(SUBTYPES["Emphysema"], p=[0.55, 0.2, 0.12, 0.13]))
    sev = _severity(rng, (0.3, 0.35, 0.22, 0.13))
    pool = {"centrilobular": UPPER + ("right middle lobe", "lingula"), "paraseptal": UPPER + LOWER, "panlobular": LOWER,
            "bullous": UPPER}[sub]
    side, sites = _side_lobes(rng, pool, 0.7)
    f.update(severity=sev, subtype=sub, side=side, sites=sites)
    f["centers_mm"] = _pts([anat.lobe_centroid(s) for s in sites])
    # LAA%-950 of the affected lobes (emphysema: 5-30 %), from the clearly visible end upwards
    f["laa_fraction"] = float([0.12, 0.16, 0.22, 0.30][_sev_index(sev)])
    f["emphysema_seed"] = int(rng.integers(0, 2**31 - 1))
    if sub == "bullous":
        f["size_mm"] = round(float(rng.uniform(15, 45)), 1)


def _atelectasis(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Passive in the lower lobes (60 % when there is a pleural effusion) or subsegmental plates (lower lobes, middle lobe, lingula)."""
    passive = labels.get("Pleural effusion", 0) and rng.random() < 0.6
    sub = "passive" if passive else "subsegmental"
    sev = _severity(rng, (0.35, 0.4, 0.2, 0.05))
    if sub == "passive":
        side, sites = _side_lobes(rng, LOWER, 0.4)
        f.update(centers_mm=_pts([anat.sample_points_in_lobe(rng, s, 1, periphery_mm=20)[0] for s in sites]))
        f["band_mm"] = float(rng.uniform(*[(10, 14), (12, 18), (16, 24), (22, 30)][_sev_index(sev)]))
    else:
        side, sites = _side_lobes(rng, LOWER + ("right middle lobe", "lingula"), 0.4)
        n = int([1, 2, 3, 4][_sev_index(sev)] + rng.integers(0, 2))
        pts = np.concatenate([anat.sample_points_in_lobe(rng, sites[i % len(sites)], 1, periphery_mm=35) for i in range(n)])
        f["count"] = n
        f["centers_mm"] = _pts(pts)
        f["band_lengths_mm"] = [round(float(v), 1) for v in rng.uniform(25, 50, n)]
    f.update(severity=sev, subtype=sub, side=side, sites=sites)


def _lung_nodule(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """1-8 nodules in lobes drawn by lobe weight; index nodule 8-18 mm (ground glass >= 10 mm, rarely 20-28 mm)."""
    sub = str(rng.choice(SUBTYPES["Lung nodule"], p=[0.75, 0.15, 0.10]))
    n = int(rng.choice([1, 1, 2, 2, 3, 4, 6, 8]))
    # the visible part of the usual 3-20 mm: every nodule >= 5 mm and the index nodule 8-20 mm
    # (a reportable nodule with a solid core; at 3-4 mm voxels smaller ones vanish in the noise),
    # ground-glass ones >= 10 mm (their contrast to lung is half that of solid tissue)
    sizes = np.exp(rng.uniform(np.log(5.0), np.log(16.0), n))
    sizes[0] = max(sizes[0], rng.uniform(8.0, 18.0), 10.0 if sub == "ground-glass" else 0.0)
    if rng.random() < 0.05:
        sizes[0] = rng.uniform(20, 28)
    lobes = [str(l) for l in rng.choice(ALL_LOBES, size=n, p=[0.25, 0.08, 0.17, 0.22, 0.08, 0.2])]
    pts = np.concatenate([anat.sample_points_in_lobe(rng, l, 1) for l in lobes])
    big = float(sizes.max())
    sev = "minimal" if big < 6 else ("mild" if big < 10 else ("moderate" if big < 20 else "marked"))
    sites = sorted(set(lobes), key=lobes.index)
    f.update(severity=sev, subtype=sub, count=n, sites=sites, side=_side_of(sites), size_mm=round(big, 1), centers_mm=_pts(pts))
    f["diameters_mm"] = [round(float(s), 1) for s in sizes]


def _lung_opacity(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Ground-glass patches in one or two lobes, or a dependent band in both lower lobes."""
    sub = str(rng.choice(SUBTYPES["Lung opacity"], p=[0.7, 0.3]))
    sev = _severity(rng, (0.25, 0.4, 0.25, 0.1))
    if sub == "dependent":
        side, sites = "bilateral", list(LOWER)
    else:
        side, sites = _side_lobes(rng, ALL_LOBES, 0.45)
    n = int([1, 2, 3, 5][_sev_index(sev)] + rng.integers(0, 2))
    pts = np.concatenate([anat.sample_points_in_lobe(rng, sites[i % len(sites)], 1) for i in range(n)])
    f.update(severity=sev, subtype=sub, side=side, sites=sites, count=n, centers_mm=_pts(pts))
    f["patch_mm"] = [round(float(v), 1) for v in rng.uniform(*[(26, 36), (30, 45), (36, 60), (45, 80)][_sev_index(sev)], size=n)]


def _fibrotic_sequela(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Apical bands (points high in the upper lobes) or basal reticulation in the lower lobes."""
    sub = str(rng.choice(SUBTYPES["Pulmonary fibrotic sequela"], p=[0.75, 0.25]))
    sev = _severity(rng, (0.35, 0.4, 0.2, 0.05))
    pool = UPPER if sub == "apical" else LOWER
    side, sites = _side_lobes(rng, pool, 0.5)
    n = int([3, 5, 7, 10][_sev_index(sev)])
    if sub == "apical":
        pts = []
        for i in range(n):
            s = sites[i % len(sites)]
            cand = anat.sample_points_in_lobe(rng, s, 20, periphery_mm=25)
            pts.append(cand[np.argmax(cand[:, 2])])
        pts = np.array(pts)
    else:
        pts = np.concatenate([anat.sample_points_in_lobe(rng, sites[i % len(sites)], 1, periphery_mm=20) for i in range(n)])
    f.update(severity=sev, subtype=sub, side=side, sites=sites, count=n, centers_mm=_pts(pts))
    f["fibrosis_seed"] = int(rng.integers(0, 2**31 - 1))


def _pleural_effusion(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Side (bilateral 50 %) and maximal thickness 8-75 mm by severity; the other side thinner."""
    sev = _severity(rng, (0.3, 0.35, 0.25, 0.1))
    t = float(rng.uniform(*[(8, 14), (14, 25), (25, 45), (45, 75)][_sev_index(sev)]))
    side = str(rng.choice(["bilateral", "right", "left"], p=[0.5, 0.3, 0.2]))
    sites = {"bilateral": ["right pleural space", "left pleural space"], "right": ["right pleural space"], "left": ["left pleural space"]}[side]
    f.update(severity=sev, side=side, sites=sites, size_mm=round(t, 1))
    xs = {"right pleural space": -0.6, "left pleural space": 0.6}
    f["centers_mm"] = _pts([[xs[s] * anat.A, anat.B - t / 2, min(anat.z_dome_r, anat.z_dome_l) + 10] for s in sites])
    f["thickness_ratio_other_side"] = float(rng.uniform(0.5, 1.0))


def _mosaic_attenuation(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Both lungs; severity and a texture seed only."""
    sev = _severity(rng, (0.2, 0.45, 0.25, 0.1))
    f.update(severity=sev, side="bilateral", sites=["both lungs"], centers_mm=[])
    f["mosaic_seed"] = int(rng.integers(0, 2**31 - 1))


def _peribronchial_thickening(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """One or two lobes; bilateral cases always include both lower lobes."""
    sev = _severity(rng, (0.25, 0.45, 0.22, 0.08))
    side, sites = _side_lobes(rng, ALL_LOBES, 0.7)
    if side == "bilateral":
        sites = sorted(set(sites) | {"right lower lobe", "left lower lobe"})
    f.update(severity=sev, side=side, sites=sites, centers_mm=_pts([anat.lobe_centroid(s) for s in sites]))


def _consolidation(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """One region per site, mostly lower lobes, extent 35-95 mm by severity."""
    sev = _severity(rng, (0.2, 0.4, 0.28, 0.12))
    side, sites = _side_lobes(rng, LOWER + LOWER + ("right middle lobe", "lingula", "right upper lobe", "left upper lobe"), 0.3)
    n = len(sites)
    pts = np.concatenate([anat.sample_points_in_lobe(rng, s, 1, periphery_mm=40) for s in sites])
    f.update(severity=sev, side=side, sites=sites, count=n, centers_mm=_pts(pts))
    f["extent_mm"] = [round(float(v), 1) for v in rng.uniform(*[(35, 45), (40, 55), (50, 70), (65, 95)][_sev_index(sev)], size=n)]


def _bronchiectasis(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Traction (with fibrotic sequela, 50 %) or cylindrical; severity sets the dilation factor."""
    sub = "traction" if (labels.get("Pulmonary fibrotic sequela") and rng.random() < 0.5) else "cylindrical"
    sev = _severity(rng, (0.35, 0.35, 0.2, 0.1))
    side, sites = _side_lobes(rng, LOWER + ("right middle lobe", "lingula"), 0.6)
    f.update(severity=sev, subtype=sub, side=side, sites=sites, centers_mm=_pts([anat.lobe_centroid(s) for s in sites]))
    f["dilation"] = float([1.6, 1.9, 2.3, 2.7][_sev_index(sev)])


def _septal_thickening(f: dict, rng, anat: ChestAnatomy, age: int, labels: dict) -> None:
    """Lower lobes (bilateral 80 %), plus middle lobe/lingula when moderate or marked."""
    sev = _severity(rng, (0.25, 0.4, 0.25, 0.1))
    side = "bilateral" if rng.random() < 0.8 else str(rng.choice(["right", "left"]))
    sites = {"bilateral": list(LOWER), "right": ["right lower lobe"], "left": ["left lower lobe"]}[side]
    if sev in ("moderate", "marked"):
        sites = sites + [s for s in ("right middle lobe", "lingula") if side in ("bilateral", "right" if s.startswith("right") else "left")]
    f.update(severity=sev, side=side, sites=sites, centers_mm=_pts([anat.lobe_centroid(s) for s in sites]))
    f["septal_seed"] = int(rng.integers(0, 2**31 - 1))


#: Sampler of each CT-RATE label, in CT-RATE order.
_FINDING_SAMPLERS: dict[str, Callable[[dict, np.random.Generator, ChestAnatomy, int, dict], None]] = {
    "Medical material": _medical_material,
    "Arterial wall calcification": _arterial_calcification,
    "Cardiomegaly": _cardiomegaly,
    "Pericardial effusion": _pericardial_effusion,
    "Coronary artery wall calcification": _coronary_calcification,
    "Hiatal hernia": _hiatal_hernia,
    "Lymphadenopathy": _lymphadenopathy,
    "Emphysema": _emphysema,
    "Atelectasis": _atelectasis,
    "Lung nodule": _lung_nodule,
    "Lung opacity": _lung_opacity,
    "Pulmonary fibrotic sequela": _fibrotic_sequela,
    "Pleural effusion": _pleural_effusion,
    "Mosaic attenuation pattern": _mosaic_attenuation,
    "Peribronchial thickening": _peribronchial_thickening,
    "Consolidation": _consolidation,
    "Bronchiectasis": _bronchiectasis,
    "Interlobular septal thickening": _septal_thickening,
}
assert tuple(_FINDING_SAMPLERS) == CTRATE_PATHOLOGIES


def _sample_finding(name, rng, anat: ChestAnatomy, age, labels) -> dict:
    """The finding dict of one positive label, filled by its sampler in :data:`_FINDING_SAMPLERS`."""
    f = {"label": name, "severity": "mild", "side": "midline", "sites": [], "size_mm": None, "count": 1, "subtype": None, "centers_mm": []}
    _FINDING_SAMPLERS[name](f, rng, anat, age, labels)
    assert all(s in LOBE_IDS or not s.endswith("lobe") for s in f["sites"])
    return f


def _along(curve, t):
    """Point at fraction ``t`` of a polyline's arc length."""
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    cum = np.concatenate([[0], np.cumsum(seg)])
    s = t * cum[-1]
    i = int(np.clip(np.searchsorted(cum, s) - 1, 0, len(seg) - 1))
    u = (s - cum[i]) / max(seg[i], 1e-9)
    return curve[i] + u * (curve[i + 1] - curve[i])
