"""CT-RATE-style radiology reports written from a synthetic case record (README, "Reports").

The report is derived from the record's ``findings`` (the truth), never from its ``labels``: a
label-noise flip therefore shows up as a disagreement between ``labels.csv`` and the text, exactly
like CT-RATE, whose labels come from a text classifier run over the reports.

Style: translated-from-Turkish, passive voice, fixed section order (airways → mediastinum/heart →
aorta → pericardium → oesophagus → lymph nodes → "lung parenchyma window" → lungs → pleura → upper
abdomen → bones), negations in both the pre- ("No X was detected.") and the post- form ("X was not
observed."), normal sentences dropped at random, incidental findings that are not labels.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ctclip_contract import NOT_GIVEN

__all__ = ["generate_report", "format_mm"]

# Sentence-level dropout probability of a normal ("nothing here") statement.
NORMAL_DROPOUT = 0.2

_SEVERITY_WORD = {
    "minimal": ("minimal", "minimal", "slight"),
    "mild": ("mild", "mild", "minimal"),
    "moderate": ("moderate", "moderate", "significant"),
    "marked": ("marked", "prominent", "widespread"),
}


class _Writer:
    """Random choices for one report, drawn from one generator in a fixed order."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


def format_mm(value: float, rng: np.random.Generator | None = None) -> str:
    """Write a length the way the reports do: "3 mm", "3.5 mm", "14 mm" (no unit here).

    Args:
        value: length in millimetres.
        rng: when given, values below 10 mm are sometimes written with one decimal even when whole.

    Returns:
        the number as text without the unit.
    """
    value = float(value)
    if value >= 10:
        return str(int(round(value)))
    rounded = round(value * 2) / 2 if rng is None or rng.random() < 0.6 else round(value, 1)
    if float(rounded).is_integer():
        return str(int(rounded))
    return f"{rounded:.1f}"


def _join(items: Sequence[str], conj: str = "and") -> str:
    items = [i for i in items if i]
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def _lobe_phrase(site: str, w: _Writer) -> str:
    """"right upper lobe" → one of "right upper lobe", "upper lobe of the right lung", "right lung upper lobe"."""
    parts = site.split()
    if len(parts) == 3 and parts[0] in ("right", "left") and parts[2] == "lobe":
        side, level = parts[0], parts[1]
        return w.pick((f"{side} {level} lobe", f"{level} lobe of the {side} lung", f"{side} lung {level} lobe"))
    return site


_LOBE_ORDER = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "lingula", "left lower lobe")


def _where(finding: dict, w: _Writer, default_both: str = "both lungs") -> str:
    """Location of a lung finding: lobes when the record names them, else the side."""
    sites = [s for s in _LOBE_ORDER if s in (finding.get("sites") or [])]
    side = finding.get("side")
    if "both lungs" in (finding.get("sites") or []):
        return "both lungs"
    for level in ("upper", "lower"):  # "right lower lobe" + "left lower lobe" → "the lower lobes of both lungs"
        pair = (f"right {level} lobe", f"left {level} lobe")
        if all(p in sites for p in pair) and w.chance(0.7):
            rest = [_lobe_phrase(s, w) for s in sites if s not in pair]
            both = w.pick((f"{level} lobes of both lungs", f"bilateral {level} lobes"))
            return "the " + _join([both] + rest)
    if sites:
        return "the " + _join([_lobe_phrase(s, w) for s in sites[:3]])
    if side == "right":
        return "the right lung"
    if side == "left":
        return "the left lung"
    return default_both


def _severity(finding: dict, w: _Writer) -> str:
    return w.pick(_SEVERITY_WORD.get(finding.get("severity") or "mild", ("mild",)))


def _sizes(finding: dict, w: _Writer) -> str:
    """Size text for a group of lesions: "6 mm" or "4 and 6.5 mm" (the largest is ``size_mm``)."""
    size = finding.get("size_mm")
    if size is None:
        return ""
    count = int(finding.get("count") or 1)
    largest = format_mm(size, w.rng)
    if count >= 2 and size > 3.5 and w.chance(0.5):
        smaller = format_mm(max(2.0, size * float(w.rng.uniform(0.4, 0.85))), w.rng)
        if smaller != largest:
            return f"{smaller} and {largest}"
    return largest


# --------------------------------------------------------------------------------------------
# Positive statements, one function per CT-RATE label. Each returns (findings sentences,
# impression phrase). Sentences are the project's own wording in the CT-RATE register.
# --------------------------------------------------------------------------------------------


def _medical_material(f: dict, w: _Writer) -> tuple[list[str], str]:
    sub = f.get("subtype") or "surgical clips"
    side = f.get("side") if f.get("side") in ("right", "left") else w.pick(("right", "left"))
    if sub == "sternotomy wires":
        s = w.pick((
            "Sternotomy wires are observed secondary to previous surgery.",
            "Median sternotomy wires were noted in the sternum.",
            "Postoperative changes and sternotomy wires were observed in the sternum.",
            "Sternal wire sutures related to the previous operation are seen.",
        ))
        imp = "Sternotomy wires (postoperative)."
    elif sub == "central venous catheter":
        s = w.pick((
            f"A catheter extending from the {side} internal jugular vein to the superior vena cava was observed.",
            f"A central venous catheter was observed, entering from the {side} subclavian vein with its tip in the superior vena cava.",
            f"A central venous catheter inserted through the {side} jugular vein is observed, its distal end at the cavoatrial junction.",
        ))
        imp = "Central venous catheter."
    elif sub == "port catheter":
        s = w.pick((
            f"A port catheter is observed in the {side} anterior chest wall, its tip extending to the superior vena cava.",
            f"A port catheter placed in the subcutaneous tissue of the {side} hemithorax was observed.",
            f"Port catheter reservoir in the {side} pectoral region and the catheter extending to the superior vena cava were noted.",
        ))
        imp = "Port catheter."
    elif sub == "pacemaker":
        s = w.pick((
            f"A pacemaker generator in the {side} pectoral region and its leads extending to the right heart chambers were observed.",
            f"A cardiac pacemaker is present in the {side} infraclavicular region with leads in the right atrium and ventricle.",
            "Pacemaker and its electrodes are observed.",
        ))
        imp = "Pacemaker."
    else:
        s = w.pick((
            "Surgical clips are observed in the mediastinum.",
            "Metallic surgical clips related to previous surgery were noted.",
            "Surgical clips compatible with the previous operation are seen.",
        ))
        imp = "Surgical clips."
    return [s], imp


def _cardiomegaly(f: dict, w: _Writer) -> tuple[list[str], str]:
    s = w.pick((
        "Heart size increased.",
        "Cardiothoracic index increased in favor of the heart (cardiomegaly).",
        "The heart is enlarged.",
        "Cardiomegaly was observed.",
        "Heart dimensions are increased.",
        "Heart size is increased, mediastinal main vascular structures are of normal width.",
    ))
    return [s], w.pick(("Cardiomegaly.", "Heart size increased.", "Cardiomegaly"))


def _pericardial_effusion(f: dict, w: _Writer) -> tuple[list[str], str]:
    sev = _severity(f, w)
    d = format_mm(f["size_mm"], w.rng) if f.get("size_mm") else None
    options = [f"There is {sev} pericardial effusion.", f"{sev.capitalize()} pericardial effusion was observed."]
    if d:
        options += [
            f"There is {sev} pericardial effusion, which is {d} mm in its thickest part.",
            f"Pericardial effusion reaching {d} mm in thickness was observed.",
            f"Effusion in the pericardium measuring {d} mm at its thickest point was observed.",
        ]
    return [w.pick(options)], w.pick(("Pericardial effusion.", f"{sev.capitalize()} pericardial effusion."))


def _hiatal_hernia(f: dict, w: _Writer) -> tuple[list[str], str]:
    s = w.pick((
        "Sliding type hiatal hernia was observed at the lower end of the esophagus.",
        "Hiatal hernia is observed.",
        "A sliding hiatal hernia is present.",
        "Herniation of the stomach through the esophageal hiatus (hiatal hernia) was observed.",
        "At the distal end of the esophagus, a hiatal hernia was observed.",
    ))
    return [s], w.pick(("Hiatal hernia.", "Sliding type hiatal hernia."))


_STATION_TEXT = {
    "prevascular": "prevascular",
    "subcarinal": "subcarinal",
    "right hilar": "right hilar",
    "left hilar": "left hilar",
    "right paratracheal": "right paratracheal",
    "left paratracheal": "left paratracheal",
    "aortopulmonary window": "aorticopulmonary window",
    "right upper paratracheal": "right upper paratracheal",
    "right lower paratracheal": "right lower paratracheal",
    "left lower paratracheal": "left lower paratracheal",
}


def _lymphadenopathy(f: dict, w: _Writer) -> tuple[list[str], str]:
    stations = [_STATION_TEXT.get(s, s) for s in (f.get("sites") or [])][:3]
    where = f"in the {_join(stations)} " + ("stations" if len(stations) > 1 else "station") if stations else "in the mediastinum"
    size = f.get("size_mm")
    if size:
        d = format_mm(size, w.rng)
        long_axis = format_mm(size * float(w.rng.uniform(1.2, 1.6)), None)
        options = (
            f"Lymph nodes with a short axis reaching {d} mm are observed {where}.",
            f"Enlarged lymph nodes, the largest measuring {long_axis}x{d} mm, were observed {where}.",
            f"A lymph node measuring {long_axis}x{d} mm is observed {where}.",
            f"Lymph nodes reaching pathological size ({d} mm in short axis) were detected {where}.",
            f"Lymphadenopathy with a short axis of {d} mm was observed {where}.",
        )
    else:
        options = (f"Lymphadenopathies were observed {where}.", f"Enlarged lymph nodes were observed {where}.")
    return [w.pick(options)], w.pick(("Mediastinal lymphadenopathy.", "Lymphadenopathy.", "Enlarged mediastinal lymph nodes."))


def _emphysema(f: dict, w: _Writer) -> tuple[list[str], str]:
    sub = f.get("subtype") or "centrilobular"
    sev = _severity(f, w)
    where = _where(f, w)
    if sub == "bullous":
        d = format_mm(f["size_mm"], w.rng) if f.get("size_mm") else None
        extra = f", the largest bulla measuring {d} mm," if d else ""
        s = w.pick((
            f"Bullous emphysematous changes{extra} are observed in {where}.",
            f"There are bullae and emphysematous areas in {where}.",
        ))
    elif sub == "paraseptal":
        s = w.pick((
            f"Paraseptal emphysema is observed in {where}.",
            f"There are {sev} paraseptal emphysematous changes in the subpleural areas of {where}.",
        ))
    elif sub == "panlobular":
        s = w.pick((f"Panlobular emphysema was observed in {where}.", f"There are {sev} panlobular emphysematous changes in {where}."))
    else:
        s = w.pick((
            f"There are {sev} emphysematous changes in {where}.",
            f"Centrilobular emphysema is observed in {where}.",
            f"{sev.capitalize()} centrilobular emphysematous changes were observed, predominantly in the upper lobes.",
            f"Emphysematous areas are noted in {where}.",
        ))
    return [s], w.pick(("Emphysematous changes in both lungs." if f.get("side") == "bilateral" else "Emphysema.", "Emphysema."))


def _atelectasis(f: dict, w: _Writer, with_effusion: bool) -> tuple[list[str], str]:
    where = _where(f, w, default_both="the lower lobes of both lungs")
    if f.get("subtype") == "passive":
        if with_effusion:
            s = w.pick((
                f"Passive atelectasis secondary to the pleural effusion is observed in {where}.",
                f"Compressive atelectasis adjacent to the pleural effusion was observed in {where}.",
            ))
        else:
            s = w.pick((f"Passive atelectasis is observed in {where}.", f"Compressive atelectatic changes are observed in {where}."))
    else:
        s = w.pick((
            f"There are subsegmental atelectasis in {where}.",
            f"Linear atelectasis was observed in {where}.",
            f"Plate-like atelectasis is observed in {where}.",
            f"Subsegmental atelectatic changes are observed in {where}.",
        ))
    return [s], w.pick(("Atelectasis.", "Subsegmental atelectasis.", "Atelectatic changes."))


def _lung_nodule(f: dict, w: _Writer) -> tuple[list[str], str]:
    sub = f.get("subtype") or "solid"
    count = int(f.get("count") or 1)
    size = f.get("size_mm") or 4.0
    where = _where(f, w)
    sizes = _sizes(f, w)
    kind = {"solid": "solid", "ground-glass": "ground-glass", "calcified": "calcified"}.get(sub, "")
    if size < 5 and count > 1 and w.chance(0.6):
        s = w.pick((
            f"There are millimetric nonspecific nodules in {where}.",
            f"Millimetric nodules were observed in {where}.",
            f"Several nonspecific nodules, the largest {format_mm(size, w.rng)} mm in diameter, are observed in {where}.",
        ))
        imp = w.pick(("Millimetric nodules in both lungs." if f.get("side") == "bilateral" else "Millimetric nodules.", "Nonspecific pulmonary nodules."))
    elif count > 1:
        largest = format_mm(size, w.rng)
        options = [f"There are {count} {kind} nodules in {where}, the largest being {largest} mm.",
                   f"{kind.capitalize()} nodules, the largest measuring {largest} mm, were observed in {where}."]
        if " and " in sizes:  # two sizes quoted: "4 and 6.5 mm"
            options += [f"{kind.capitalize()} nodules measuring {sizes} mm were observed in {where}.",
                        f"Nodules with diameters of {sizes} mm are observed in {where}."]
        s = w.pick(options)
        imp = "Pulmonary nodules."
    else:
        d = format_mm(size, w.rng)
        s = w.pick((
            f"A {d} mm {kind} nodule is observed in {where}.",
            f"A {kind} nodule of {d} mm was observed in {where}.",
            f"In {where}, a {kind} nodule {d} mm in diameter is observed.",
            f"A nodule measuring {d} mm is observed in {where}.",
        ))
        if sub == "solid" and size < 6 and w.chance(0.3):
            s = s[:-1] + " (intrapulmonary lymph node?)."
        imp = w.pick((f"{d} mm nodule in {where}.", "Pulmonary nodule."))
    if sub == "calcified" and w.chance(0.5):
        imp = "Calcified nodule (granuloma?)."
    return [" ".join(s.split())], imp


def _lung_opacity(f: dict, w: _Writer) -> tuple[list[str], str]:
    where = _where(f, w)
    if f.get("subtype") == "dependent":
        s = w.pick((
            f"Dependent density increases are observed in the posterior parts of {where}.",
            f"Gravity-dependent ground-glass density increases were observed in the posterior segments of {where}.",
        ))
    else:
        s = w.pick((
            f"Ground-glass opacities were observed in {where}.",
            f"Patchy ground-glass density increases are observed in {where}.",
            f"There are ground-glass areas in {where}.",
            f"Opacities with ground-glass density were detected in {where}.",
            f"Infiltrative areas in ground-glass density were observed in {where}.",
        ))
    return [s], w.pick(("Ground-glass opacities.", "Density increases in the lung parenchyma.", "Lung opacities."))


def _fibrotic(f: dict, w: _Writer) -> tuple[list[str], str]:
    where = _where(f, w)
    if f.get("subtype") == "basal reticular":
        s = w.pick((
            f"Reticular fibrotic changes are observed in the basal segments of {where}.",
            f"Fibrotic changes with a reticular pattern were observed in the lower lobes of {where}.",
        ))
    else:
        s = w.pick((
            "Sequelae changes are observed at the apical level in both lungs.",
            f"Pleuroparenchymal sequelae changes were observed in the apical parts of {where}.",
            f"Fibrotic bands are observed in {where}.",
            f"Linear sequelae fibrotic densities are observed in {where}.",
            f"Fibroatelectatic sequelae bands were observed in {where}.",
        ))
    return [s], w.pick(("Sequelae fibrotic changes.", "Pulmonary fibrotic sequelae.", "Apical sequelae changes."))


def _mosaic(f: dict, w: _Writer) -> tuple[list[str], str]:
    s = w.pick((
        "Mosaic attenuation pattern was observed in both lungs (small airway disease? small vessel disease?).",
        f"There is a mosaic attenuation pattern in {_where(f, w)}.",
        "Mosaic attenuation areas were observed in both lungs.",
    ))
    return [s], w.pick(("Mosaic attenuation pattern.", "Mosaic attenuation in both lungs."))


def _peribronchial(f: dict, w: _Writer) -> tuple[list[str], str]:
    s = w.pick((
        "Bilateral peribronchial thickenings are observed.",
        f"Peribronchial thickening is observed in {_where(f, w)}.",
        f"Bronchial wall thickening is observed in {_where(f, w)}.",
        f"There are peribronchial thickenings in {_where(f, w)}.",
    ))
    return [s], w.pick(("Peribronchial thickening.", "Bronchial wall thickening."))


def _consolidation(f: dict, w: _Writer) -> tuple[list[str], str]:
    where = _where(f, w)
    s = w.pick((
        f"Patchy areas of consolidation are observed in {where}.",
        f"Consolidation with air bronchograms was observed in {where}.",
        f"There are consolidative changes in {where}.",
        f"A consolidated area is observed in {where}.",
    ))
    return [s], w.pick(("Consolidation (pneumonia?).", "Consolidation.", "Pneumonic consolidation."))


def _bronchiectasis(f: dict, w: _Writer) -> tuple[list[str], str]:
    sev = _severity(f, w)
    where = _where(f, w)
    if f.get("subtype") == "traction":
        s = w.pick((f"Traction bronchiectasis is observed in {where}.", f"There are traction bronchiectases in {where}."))
    else:
        s = w.pick((
            f"There is {sev} bronchiectasis in the central parts of {where}.",
            f"Cylindrical bronchiectasis was observed in {where}.",
            f"Bronchiectatic changes are observed in {where}.",
        ))
    return [s], w.pick(("Bronchiectasis.", "Bronchiectatic changes."))


def _septal(f: dict, w: _Writer) -> tuple[list[str], str]:
    where = _where(f, w)
    s = w.pick((
        f"There are interlobular septal thickenings in {where}.",
        f"Interlobular septal thickening is observed in {where}.",
        f"Thickening of the interlobular septa was observed in {where}.",
        f"Smooth septal thickenings are observed in the peripheral parts of {where}.",
    ))
    return [s], w.pick(("Interlobular septal thickening.", "Septal thickenings."))


def _pleural_effusion(f: dict, w: _Writer) -> tuple[list[str], str]:
    sev = _severity(f, w)
    side = f.get("side")
    d = format_mm(f["size_mm"], w.rng) if f.get("size_mm") else None
    if side == "bilateral":
        first = w.pick((f"There is bilateral {sev} pleural effusion.", f"Bilateral {sev} pleural effusion was observed."))
    else:
        first = w.pick((
            f"There is {sev} pleural effusion on the {side}.",
            f"{sev.capitalize()} pleural effusion was observed in the {side} hemithorax.",
            f"{side.capitalize()}-sided {sev} pleural effusion is present.",
        ))
    out = [first]
    if d:
        out.append(w.pick((
            f"The pleural effusion measured approximately {d} mm at its thickest point.",
            f"The thickest part of the effusion was {d} mm.",
        )))
    return out, w.pick(("Pleural effusion.", f"{'Bilateral p' if side == 'bilateral' else 'P'}leural effusion."))


def _calcification(arterial: dict | None, coronary: dict | None, w: _Writer) -> tuple[list[str], list[str]]:
    if arterial and coronary:
        s = w.pick((
            "There are calcific atheroma plaques in the aorta and coronary arteries.",
            "Atherosclerotic calcifications were observed in the thoracic aorta and coronary arteries.",
            "Calcified atheromatous plaques are observed in the aortic wall and in the coronary arteries.",
        ))
        imp = w.pick(("Atherosclerotic changes in the aorta and coronary arteries.", "Aortic and coronary artery calcifications."))
        return [s], [imp]
    if arterial:
        s = w.pick((
            "There are calcific atheroma plaques in the aorta.",
            "Atherosclerotic calcifications were observed in the thoracic aorta.",
            "Calcified plaques are observed in the wall of the aortic arch and descending aorta.",
            "Mural calcifications were observed in the thoracic aorta.",
        ))
        return [s], [w.pick(("Atherosclerotic changes in the aorta.", "Aortic calcification."))]
    s = w.pick((
        "There are calcific plaques in the coronary arteries.",
        "Coronary artery calcifications were observed.",
        "Calcified atheromas are observed along the course of the coronary arteries.",
    ))
    return [s], [w.pick(("Coronary artery calcification.", "Coronary atherosclerosis."))]


# Incidental, non-label findings: sentence for the findings, optional impression phrase.
_INCIDENTAL = {
    "hepatosteatosis": (
        ("Liver density decreased in favor of hepatosteatosis.", "Hepatosteatosis was observed in the liver sections included in the study.",
         "Diffuse hypodensity of the liver is compatible with hepatosteatosis."),
        "Hepatosteatosis.",
    ),
    "renal cyst": (
        ("A simple cyst is observed in the upper pole of the left kidney.", "A cystic lesion compatible with a simple renal cyst is observed in the right kidney.",
         "A hypodense lesion in the kidney in favor of a cyst was observed."),
        "Renal cyst.",
    ),
    "thyroid nodule": (
        ("A hypodense nodule was observed in the right lobe of the thyroid gland.", "A thyroid nodule is observed in the left lobe of the thyroid gland.",
         "Nodular appearance in the thyroid gland; ultrasonography is recommended."),
        "Thyroid nodule; correlation with ultrasonography is recommended.",
    ),
    "scoliosis": (("Scoliosis is observed in the thoracic spine.", "There is a mild scoliosis in the thoracic vertebrae."), "Scoliosis."),
    "degenerative osteophytes": (
        ("Degenerative changes with osteophytes are observed in the thoracic vertebrae.", "Degenerative osteophytes were observed at the vertebral corners."),
        "Degenerative changes in the thoracic spine.",
    ),
    "costal cartilage calcification": (
        ("Calcification is observed in the costal cartilages.", "Costal cartilage calcifications were noted."),
        None,
    ),
}
_INCIDENTAL_BLOCK = {
    "thyroid nodule": "mediastinum",
    "hepatosteatosis": "abdomen",
    "renal cyst": "abdomen",
    "scoliosis": "bones",
    "degenerative osteophytes": "bones",
    "costal cartilage calcification": "bones",
}

# Normal statements, several surface forms each. Both negation forms appear.
_NORMAL = {
    "airway": (
        "Trachea, both main bronchi are open.",
        "Trachea and both main bronchi are open.",
        "The trachea and main bronchi are patent.",
        "Trachea and lumen of both main bronchi are open and no obstructive lesion was detected.",
        "The trachea and both main bronchi were evaluated as patent.",
    ),
    "mediastinum": (
        "Mediastinal main vascular structures, heart contour, size are normal.",
        "Heart contour and size are normal.",
        "Mediastinal main vascular structures and heart size are within normal limits.",
        "The heart is of normal size and the mediastinal vascular structures are of normal width.",
    ),
    "aorta": (
        "Thoracic aorta diameter is normal.",
        "The diameter of the thoracic aorta is within normal limits.",
        "Thoracic aorta is of normal calibre.",
    ),
    "no_calcification": (
        "No calcific atheroma plaque was observed in the aorta or coronary arteries.",
        "Calcification was not detected in the aorta and coronary arteries.",
        "There is no atherosclerotic calcification in the thoracic aorta or the coronary arteries.",
    ),
    "pericardium": (
        "Pericardial effusion-thickening was not observed.",
        "No pericardial effusion or thickening was detected.",
        "Pericardial thickening-effusion was not detected.",
        "There is no pericardial effusion.",
    ),
    "oesophagus": (
        "Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected.",
        "The esophagus is of normal calibre.",
        "No hiatal hernia was detected.",
        "Thoracic esophagus was evaluated as normal.",
    ),
    "lymph": (
        "No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary pathological dimensions were detected.",
        "No lymph node was detected in mediastinal and bilateral hilar regions in pathological size and appearance.",
        "Lymph nodes of pathological size and appearance were not observed in the mediastinum or hila.",
        "There is no lymphadenopathy in the mediastinum.",
    ),
    "lymph_millimetric": (
        "Millimetric lymph nodes that did not reach pathological size were observed in the mediastinum.",
        "A few lymph nodes not reaching pathological size were observed in the prevascular and pretracheal areas.",
    ),
    "window": (
        "When examined in the lung parenchyma window;",
        "In the lung parenchyma window examination;",
        "Evaluation in the lung parenchyma window:",
    ),
    "lungs_clear": (
        "Aeration of both lung parenchyma is normal and no nodular or infiltrative lesion is detected in the lung parenchyma.",
        "Both lung parenchyma are normally aerated, no nodular or infiltrative lesion was detected.",
        "No mass, nodule or infiltrative lesion was observed in either lung.",
        "Lung parenchyma aeration is normal; no active infiltration or nodule was detected.",
    ),
    "pleura": (
        "Pleural effusion-thickening was not detected.",
        "No pleural effusion or thickening was observed.",
        "There is no pleural effusion.",
        "Pleural effusion was not observed.",
    ),
    "pleura_pericardium": (
        "No pleural or pericardial effusion was detected.",
        "Pleural and pericardial effusion was not observed.",
    ),
    "abdomen": (
        "No mass lesion was detected in the upper abdominal organs included in the study area.",
        "Upper abdominal organs included in the sections are natural.",
        "Upper abdominal sections within the study area are unremarkable.",
    ),
    "mediastinum_mass": (
        "No mass lesion with distinguishable borders was detected in the mediastinum.",
        "There is no mass lesion in the mediastinum.",
        "A mass lesion was not observed in the mediastinum.",
    ),
    "thyroid": (
        "Thyroid gland lobes are of normal size and density.",
        "The sections of the thyroid gland included in the study are natural.",
    ),
    "axilla": (
        "No pathologically enlarged lymph nodes were observed in both axillary regions.",
        "Both axillary regions are natural.",
        "Lymph nodes in pathological size were not detected in the axillary regions.",
    ),
    "trachea_lumen": (
        "No pathological lesion was detected in the tracheal and bronchial lumens.",
        "Tracheal and bronchial lumens are clear.",
    ),
    "pneumothorax": (
        "No pneumothorax was detected.",
        "Pneumothorax was not observed.",
        "There is no pneumothorax.",
    ),
    "diaphragm": (
        "Both hemidiaphragms are in normal position and contour.",
        "The diaphragm contours are smooth.",
    ),
    "chest_wall": (
        "Chest wall soft tissues are natural.",
        "No pathological finding was detected in the soft tissues of the chest wall.",
    ),
    "bones": (
        "Bone structures in the study area are natural.",
        "Vertebral corpus heights are preserved.",
        "No lytic or destructive lesion was detected in the bone structures within the study area.",
    ),
}

# Lung-window labels named in grouped negations ("No emphysema, bronchiectasis or consolidation was detected.").
_NEGATION_NAMES = {
    "Emphysema": ("emphysema", "emphysematous change"),
    "Lung nodule": ("nodule", "nodular lesion"),
    "Lung opacity": ("ground-glass opacity", "infiltration"),
    "Consolidation": ("consolidation",),
    "Atelectasis": ("atelectasis",),
    "Pulmonary fibrotic sequela": ("fibrotic sequela", "sequelae change"),
    "Mosaic attenuation pattern": ("mosaic attenuation",),
    "Peribronchial thickening": ("peribronchial thickening",),
    "Bronchiectasis": ("bronchiectasis",),
    "Interlobular septal thickening": ("interlobular septal thickening",),
}

_LUNG_ORDER = (
    "Emphysema", "Lung nodule", "Lung opacity", "Consolidation", "Atelectasis", "Pulmonary fibrotic sequela",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Bronchiectasis", "Interlobular septal thickening",
)

_POSITIVE = {
    "Emphysema": _emphysema,
    "Lung nodule": _lung_nodule,
    "Lung opacity": _lung_opacity,
    "Consolidation": _consolidation,
    "Pulmonary fibrotic sequela": _fibrotic,
    "Mosaic attenuation pattern": _mosaic,
    "Peribronchial thickening": _peribronchial,
    "Bronchiectasis": _bronchiectasis,
    "Interlobular septal thickening": _septal,
}

_INDICATIONS = {
    "infection": ("Cough, fever.", "covid?", "Fever, cough, shortness of breath.", "Pneumonia?"),
    "heart_failure": ("Shortness of breath.", "Dyspnea, leg swelling.", "Chest pain"),
    "post_op": ("Postoperative control.", "Follow-up after surgery."),
    "smoker": ("Cough.", "Smoker, cough.", "Follow-up of known lung nodule."),
    "airway_disease": ("Chronic cough.", "Asthma?", "Shortness of breath."),
    "prior_infection": ("History of tuberculosis.", "Cough, fatigue."),
}


def _technique(thickness_mm: float | None, w: _Writer) -> str:
    t = format_mm(thickness_mm) if thickness_mm else w.pick(("1", "1.5", "2"))
    return w.pick((
        f"Non-contrast images were taken in the axial plane with a section thickness of {t} mm.",
        "Sections were taken without contrast medium and there were no reconstructions at the workstation.",
        f"Non-contrast axial sections of {t} mm thickness were obtained and reconstruction was performed at the workstation.",
        f"Thorax CT was performed without contrast material with {t} mm slice thickness.",
        NOT_GIVEN,
    ))


def generate_report(record: dict[str, Any], seed: int | None = None, slice_thickness_mm: float | None = None) -> dict[str, str]:
    """Write the CT-RATE-style report of one scan from its case record.

    Args:
        record: case record from ``sample_case_record`` (uses ``findings``, ``incidental``,
            ``latent``; never ``labels``).
        seed: seed of the wording choices; default derived from ``record["seed"]``, so the same
            record always gets the same text.
        slice_thickness_mm: thickness quoted in Technique_EN (the first reconstruction's); a
            plausible value is drawn when omitted.

    Returns:
        dict with ``ClinicalInformation_EN``, ``Technique_EN``, ``Findings_EN``, ``Impressions_EN``
        (a missing section is the literal ``"Not given."``, as in CT-RATE).
    """
    base = int(record.get("seed", 0)) if seed is None else int(seed)
    w = _Writer(np.random.default_rng([base, 0x5E9047]))
    findings = list(record.get("findings") or [])
    by_label: dict[str, list[dict]] = {}
    for f in findings:
        by_label.setdefault(f["label"], []).append(f)
    present = set(by_label)
    incidental = [i for i in record.get("incidental") or [] if i in _INCIDENTAL]

    def normal(key: str, keep_always: bool = False) -> list[str]:
        if not keep_always and w.chance(NORMAL_DROPOUT):
            return []
        return [w.pick(_NORMAL[key])]

    blocks: dict[str, list[str]] = {k: [] for k in ("airway", "mediastinum", "aorta", "pericardium", "oesophagus", "lymph", "lungs", "pleura", "abdomen", "bones")}
    impressions: list[str] = []

    def add(block: str, result: tuple[list[str], str | None]) -> None:
        sentences, imp = result
        blocks[block].extend(sentences)
        if imp:
            impressions.append(imp)

    blocks["airway"] += normal("airway")
    if w.chance(0.5):
        blocks["airway"] += normal("trachea_lumen")

    # Mediastinum, heart and devices.
    if "Cardiomegaly" in present:
        add("mediastinum", _cardiomegaly(by_label["Cardiomegaly"][0], w))
    else:
        blocks["mediastinum"] += normal("mediastinum")
    seen_devices = set()
    for f in by_label.get("Medical material", []):
        if f.get("subtype") in seen_devices:
            continue
        seen_devices.add(f.get("subtype"))
        add("mediastinum", _medical_material(f, w))
    if w.chance(0.25):
        blocks["mediastinum"].append("Mediastinal structures cannot be evaluated optimally because contrast material is not given.")
    blocks["mediastinum"] += normal("mediastinum_mass")
    if "thyroid nodule" not in incidental and w.chance(0.4):
        blocks["mediastinum"] += normal("thyroid")

    blocks["aorta"] += normal("aorta")
    arterial = by_label.get("Arterial wall calcification", [None])[0]
    coronary = by_label.get("Coronary artery wall calcification", [None])[0]
    if arterial or coronary:
        sentences, imps = _calcification(arterial, coronary, w)
        blocks["aorta"] += sentences
        impressions += imps
    elif w.chance(0.5):
        blocks["aorta"].append(w.pick(_NORMAL["no_calcification"]))

    both_effusions_absent = "Pericardial effusion" not in present and "Pleural effusion" not in present
    combined_effusion_sentence = both_effusions_absent and w.chance(0.3)
    if "Pericardial effusion" in present:
        add("pericardium", _pericardial_effusion(by_label["Pericardial effusion"][0], w))
    elif not combined_effusion_sentence:
        blocks["pericardium"] += normal("pericardium")

    if "Hiatal hernia" in present:
        add("oesophagus", _hiatal_hernia(by_label["Hiatal hernia"][0], w))
    else:
        blocks["oesophagus"] += normal("oesophagus")

    if "Lymphadenopathy" in present:
        add("lymph", _lymphadenopathy(by_label["Lymphadenopathy"][0], w))
    else:
        blocks["lymph"] += normal("lymph")
        if w.chance(0.25):  # hard negative: small nodes that are not lymphadenopathy
            blocks["lymph"].append(w.pick(_NORMAL["lymph_millimetric"]))
    if w.chance(0.6):
        blocks["lymph"] += normal("axilla")

    # Lungs.
    lung_positive = [name for name in _LUNG_ORDER if name in present]
    if not lung_positive:
        blocks["lungs"] += normal("lungs_clear", keep_always=w.chance(0.7))
    for name in lung_positive:
        f = by_label[name][0]
        if name == "Atelectasis":
            add("lungs", _atelectasis(f, w, with_effusion="Pleural effusion" in present))
        else:
            add("lungs", _POSITIVE[name](f, w))
    if lung_positive:
        negatives = [n for n in _LUNG_ORDER if n not in present]
        order = w.rng.permutation(len(negatives))
        chosen = [negatives[i] for i in order[: int(w.rng.integers(0, 4))]]
        if chosen:
            terms = [w.pick(_NEGATION_NAMES[n]) for n in chosen]
            if w.chance(0.5):
                blocks["lungs"].append(f"No {_join(terms, 'or')} was detected.")
            else:
                blocks["lungs"].append(f"{_join(terms, 'or').capitalize()} {'were' if len(terms) > 1 else 'was'} not observed.")
    # Slight reordering inside the lung block, as radiologists do.
    if len(blocks["lungs"]) > 2 and w.chance(0.3):
        i = int(w.rng.integers(len(blocks["lungs"]) - 1))
        blocks["lungs"][i], blocks["lungs"][i + 1] = blocks["lungs"][i + 1], blocks["lungs"][i]

    if w.chance(0.6):
        blocks["lungs"] += normal("pneumothorax")
    if "Pleural effusion" in present:
        add("pleura", _pleural_effusion(by_label["Pleural effusion"][0], w))
    elif combined_effusion_sentence:
        blocks["pleura"].append(w.pick(_NORMAL["pleura_pericardium"]))
    else:
        blocks["pleura"] += normal("pleura")

    for name in incidental:
        sentences, imp = _INCIDENTAL[name]
        blocks[_INCIDENTAL_BLOCK[name]].append(w.pick(sentences))
        if imp and w.chance(0.5):
            impressions.append(imp)
    if not any("cyst" in s or "steatosis" in s for s in blocks["abdomen"]):
        blocks["abdomen"] += normal("abdomen")
    if w.chance(0.4):
        blocks["pleura"] += normal("diaphragm")
    if w.chance(0.4):
        blocks["bones"] += normal("chest_wall")
    blocks["bones"] += normal("bones")
    if w.chance(0.4):
        blocks["bones"].append("Vertebral corpus heights are preserved.")
    blocks["bones"] = list(dict.fromkeys(blocks["bones"]))

    ordered = (
        blocks["airway"] + blocks["mediastinum"] + blocks["aorta"] + blocks["pericardium"] + blocks["oesophagus"]
        + blocks["lymph"] + [w.pick(_NORMAL["window"])] + blocks["lungs"] + blocks["pleura"] + blocks["abdomen"] + blocks["bones"]
    )
    findings_text = " ".join(ordered)

    if impressions:
        impression_text = "\n".join(f"{i}" for i in dict.fromkeys(impressions))
    else:
        impression_text = w.pick(("Thoracic CT examination within normal limits.", "Findings within normal limits.", NOT_GIVEN))

    latent = record.get("latent") or {}
    active = [k for k in _INDICATIONS if latent.get(k)]
    if active and w.chance(0.6):
        clinical = w.pick(_INDICATIONS[active[int(w.rng.integers(len(active)))]])
    else:
        clinical = w.pick((NOT_GIVEN, NOT_GIVEN, "Cough.", "Shortness of breath.", "Chest pain"))

    return {
        "ClinicalInformation_EN": clinical,
        "Technique_EN": _technique(slice_thickness_mm, w),
        "Findings_EN": findings_text,
        "Impressions_EN": impression_text,
    }
