"""CT-RATE-style radiology reports written from a synthetic case record (README, "Reports").

The report is derived from the record's ``findings`` (the truth), never from its ``labels``: a
label-noise flip therefore shows up as a disagreement between ``labels.csv`` and the text, exactly
like CT-RATE, whose labels come from a text classifier run over the reports.

Style: translated-from-Turkish, passive voice, fixed section order (airways → mediastinum/heart →
aorta → pericardium → oesophagus → lymph nodes → "lung parenchyma window" → lungs → pleura → upper
abdomen → bones), negations in both the pre- ("No X was detected.") and the post- form ("X was not
observed."), normal sentences dropped at random, incidental findings that are not labels.

The wording is data in :mod:`.report_phrases`; this module decides what is said and draws every choice
from one generator, in a fixed order: the findings section by section, then the impressions, the clinical
information and the technique. The order of the draws is part of the output: a record's report stays the
same only as long as every draw keeps its place.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ctclip_contract import CTRATE_PATHOLOGIES
from .report_phrases import (
    FINDING_PHRASES, INCIDENTAL, INCIDENTAL_BLOCK, INDICATIONS, NEGATION_NAMES, NO_CONTRAST, NORMAL, NORMAL_IMPRESSIONS,
    SEVERITY_WORDS, STATION_TEXT, TECHNIQUE, TECHNIQUE_THICKNESSES, UNSPECIFIED_INDICATIONS, VERTEBRAE,
)

__all__ = ["generate_report", "format_mm"]

# Sentence-level dropout probability of a normal ("nothing here") statement.
NORMAL_DROPOUT = 0.2

#: The blocks of Findings_EN, in order; the "lung parenchyma window" sentence opens "lungs".
_BLOCKS = ("airway", "mediastinum", "aorta", "pericardium", "oesophagus", "lymph", "lungs", "pleura", "abdomen", "bones")

#: The labels of the lung block, in the order it states them.
_LUNG_ORDER = (
    "Emphysema", "Lung nodule", "Lung opacity", "Consolidation", "Atelectasis", "Pulmonary fibrotic sequela",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Bronchiectasis", "Interlobular septal thickening",
)


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


def _severity_fields(finding: dict, w: _Writer) -> dict[str, str]:
    """The fields {sev} ("mild") and {Sev} ("Mild") of a finding's severity."""
    sev = w.pick(SEVERITY_WORDS.get(finding.get("severity") or "mild", ("mild",)))
    return {"sev": sev, "Sev": sev.capitalize()}


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
# Positive statements. Each writer returns (findings sentences, impression phrase); the words come
# from FINDING_PHRASES, the writer draws the facts (severity, location, sizes) and the variant.
# --------------------------------------------------------------------------------------------


def _say(w: _Writer, label: str, part: str, variant: str | None = None, **fields: Any) -> str:
    """One phrase of ``FINDING_PHRASES[label]``: the options of ``variant`` (else of ``None``), one drawn, filled in.

    ``part`` is ``"sentences"`` or ``"impressions"``; a fixed phrase (a plain string) draws nothing.
    """
    table = getattr(FINDING_PHRASES[label], part)
    options = table[variant] if variant in table else table[None]
    return (options if isinstance(options, str) else w.pick(options)).format(**fields)


def _stated(w: _Writer, label: str, variant: str | None = None, impression: str | None = None, **fields: Any) -> tuple[list[str], str]:
    """A finding's sentence (of ``variant``) and then its impression phrase (of ``impression``)."""
    sentence = _say(w, label, "sentences", variant, **fields)
    return [sentence], _say(w, label, "impressions", impression, **fields)


def _simple_finding(f: dict, w: _Writer, variant: str | None = None) -> tuple[list[str], str]:
    """A finding whose wording needs only what its FindingPhrases names: a severity word, then locations.

    The sentence variant is the finding's subtype unless ``variant`` is given.
    """
    phrases = FINDING_PHRASES[f["label"]]
    fields = _severity_fields(f, w) if phrases.severity else {}
    for name in phrases.locations:
        fields[name] = _where(f, w, phrases.default_location)
    return _stated(w, f["label"], variant or f.get("subtype"), **fields)


def _medical_material(f: dict, w: _Writer) -> tuple[list[str], str]:
    sub = f.get("subtype") or "surgical clips"
    side = f.get("side") if f.get("side") in ("right", "left") else w.pick(("right", "left"))
    return _stated(w, "Medical material", sub, sub, side=side)


def _calcification(arterial: dict | None, coronary: dict | None, w: _Writer) -> tuple[list[str], str]:
    """The arterial and the coronary calcification labels, stated together."""
    variant = "aorta and coronary" if arterial and coronary else "aorta" if arterial else "coronary"
    return _stated(w, "calcification", variant, variant)


def _pericardial_effusion(f: dict, w: _Writer) -> tuple[list[str], str]:
    fields = _severity_fields(f, w)
    d = format_mm(f["size_mm"], w.rng) if f.get("size_mm") else None
    return _stated(w, "Pericardial effusion", "measured" if d else None, d=d, **fields)


def _lymphadenopathy(f: dict, w: _Writer) -> tuple[list[str], str]:
    stations = [STATION_TEXT.get(s, s) for s in (f.get("sites") or [])][:3]
    where = f"in the {_join(stations)} " + ("stations" if len(stations) > 1 else "station") if stations else "in the mediastinum"
    size = f.get("size_mm")
    if not size:
        return _stated(w, "Lymphadenopathy", where=where)
    d = format_mm(size, w.rng)
    long_axis = format_mm(size * float(w.rng.uniform(1.2, 1.6)), None)
    return _stated(w, "Lymphadenopathy", "measured", where=where, d=d, long_axis=long_axis)


def _emphysema(f: dict, w: _Writer) -> tuple[list[str], str]:
    sub = f.get("subtype") or "centrilobular"
    fields = _severity_fields(f, w)
    where = _where(f, w)
    extra = ""
    if sub == "bullous":
        d = format_mm(f["size_mm"], w.rng) if f.get("size_mm") else None
        extra = f", the largest bulla measuring {d} mm," if d else ""
    impression = "bilateral" if f.get("side") == "bilateral" else None
    return _stated(w, "Emphysema", sub, impression, where=where, extra=extra, **fields)


def _atelectasis(f: dict, w: _Writer, with_effusion: bool) -> tuple[list[str], str]:
    passive_with_effusion = f.get("subtype") == "passive" and with_effusion
    return _simple_finding(f, w, "passive, with effusion" if passive_with_effusion else None)


def _lung_nodule(f: dict, w: _Writer) -> tuple[list[str], str]:
    """Millimetric nodules, several nodules (one or two sizes quoted) or one nodule."""
    label = "Lung nodule"
    sub = f.get("subtype") or "solid"
    count = int(f.get("count") or 1)
    size = f.get("size_mm") or 4.0
    where = _where(f, w)
    sizes = _sizes(f, w)
    kind = {"solid": "solid", "ground-glass": "ground-glass", "calcified": "calcified"}.get(sub, "")
    fields = {"where": where, "sizes": sizes, "count": count, "kind": kind, "Kind": kind.capitalize()}
    if size < 5 and count > 1 and w.chance(0.6):
        fields["largest"] = format_mm(size, w.rng)
        s = _say(w, label, "sentences", "millimetric", **fields)
        imp = _say(w, label, "impressions", "millimetric, bilateral" if f.get("side") == "bilateral" else "millimetric")
    elif count > 1:
        fields["largest"] = format_mm(size, w.rng)
        s = _say(w, label, "sentences", "several, two sizes" if " and " in sizes else "several", **fields)
        imp = _say(w, label, "impressions", "several")
    else:
        fields["d"] = format_mm(size, w.rng)
        s = _say(w, label, "sentences", "single", **fields)
        if sub == "solid" and size < 6 and w.chance(0.3):
            s = s[:-1] + " (intrapulmonary lymph node?)."
        imp = _say(w, label, "impressions", "single", **fields)
    if sub == "calcified" and w.chance(0.5):
        imp = _say(w, label, "impressions", "calcified")
    return [" ".join(s.split())], imp


def _pleural_effusion(f: dict, w: _Writer) -> tuple[list[str], str]:
    label = "Pleural effusion"
    fields = _severity_fields(f, w)
    side = f.get("side")
    d = format_mm(f["size_mm"], w.rng) if f.get("size_mm") else None
    variant = "bilateral" if side == "bilateral" else None
    sentences = [_say(w, label, "sentences", variant, side=side, Side=side.capitalize(), **fields)]
    if d:
        sentences.append(_say(w, label, "sentences", "thickness", d=d))
    return sentences, _say(w, label, "impressions", variant)


#: The writer of each label's statement; atelectasis (which looks at the pleura) and the two
#: calcifications (stated together) are written where their context is known.
_WRITERS = {
    "Medical material": _medical_material,
    "Cardiomegaly": _simple_finding,
    "Pericardial effusion": _pericardial_effusion,
    "Hiatal hernia": _simple_finding,
    "Lymphadenopathy": _lymphadenopathy,
    "Emphysema": _emphysema,
    "Lung nodule": _lung_nodule,
    "Lung opacity": _simple_finding,
    "Pulmonary fibrotic sequela": _simple_finding,
    "Pleural effusion": _pleural_effusion,
    "Mosaic attenuation pattern": _simple_finding,
    "Peribronchial thickening": _simple_finding,
    "Consolidation": _simple_finding,
    "Bronchiectasis": _simple_finding,
    "Interlobular septal thickening": _simple_finding,
}
assert set(_WRITERS) | {"Atelectasis", "Arterial wall calcification", "Coronary artery wall calcification"} == set(CTRATE_PATHOLOGIES)


# --------------------------------------------------------------------------------------------
# The findings section, block by block, then the other sections.
# --------------------------------------------------------------------------------------------


class _Draft:
    """One report while it is written: the record's findings by label, the sentences of each findings
    block, the impression phrases, and the writer every random choice comes from."""

    def __init__(self, record: dict[str, Any], w: _Writer):
        self.w = w
        self.by_label: dict[str, list[dict]] = {}
        for f in record.get("findings") or []:
            self.by_label.setdefault(f["label"], []).append(f)
        self.present = set(self.by_label)
        self.incidental = [i for i in record.get("incidental") or [] if i in INCIDENTAL]
        self.blocks: dict[str, list[str]] = {k: [] for k in _BLOCKS}
        self.impressions: list[str] = []
        #: "No pleural or pericardial effusion": decided with the pericardium, written with the pleura
        self.effusions_in_one_sentence = False

    def state(self, block: str, key: str) -> None:
        """Add one of the normal statements ``NORMAL[key]`` to ``block``."""
        self.blocks[block].append(self.w.pick(NORMAL[key]))

    def normal(self, block: str, key: str, keep_always: bool = False) -> None:
        """The same, unless dropped (probability NORMAL_DROPOUT, not drawn when ``keep_always``)."""
        if keep_always or not self.w.chance(NORMAL_DROPOUT):
            self.state(block, key)

    def add(self, block: str, result: tuple[list[str], str | None]) -> None:
        sentences, imp = result
        self.blocks[block].extend(sentences)
        if imp:
            self.impressions.append(imp)

    def write(self, label: str) -> tuple[list[str], str]:
        """The statement of the record's (first) finding with this label."""
        f = self.by_label[label][0]
        if label == "Atelectasis":
            return _atelectasis(f, self.w, with_effusion="Pleural effusion" in self.present)
        return _WRITERS[label](f, self.w)

    def finding_or_normal(self, label: str, block: str, key: str) -> bool:
        """The finding's statement when the record has it (True), else a normal statement (False)."""
        if label not in self.present:
            self.normal(block, key)
            return False
        self.add(block, self.write(label))
        return True


def _airways(d: _Draft) -> None:
    d.normal("airway", "airway")
    if d.w.chance(0.5):
        d.normal("airway", "trachea_lumen")


def _mediastinum(d: _Draft) -> None:
    """Heart, devices (each kind once), the mediastinum and the thyroid."""
    d.finding_or_normal("Cardiomegaly", "mediastinum", "mediastinum")
    seen_devices = set()
    for f in d.by_label.get("Medical material", []):
        if f.get("subtype") in seen_devices:
            continue
        seen_devices.add(f.get("subtype"))
        d.add("mediastinum", _medical_material(f, d.w))
    if d.w.chance(0.25):
        d.blocks["mediastinum"].append(NO_CONTRAST)
    d.normal("mediastinum", "mediastinum_mass")
    if "thyroid nodule" not in d.incidental and d.w.chance(0.4):
        d.normal("mediastinum", "thyroid")


def _aorta(d: _Draft) -> None:
    d.normal("aorta", "aorta")
    arterial = d.by_label.get("Arterial wall calcification", [None])[0]
    coronary = d.by_label.get("Coronary artery wall calcification", [None])[0]
    if arterial or coronary:
        d.add("aorta", _calcification(arterial, coronary, d.w))
    elif d.w.chance(0.5):
        d.state("aorta", "no_calcification")


def _pericardium(d: _Draft) -> None:
    both_absent = "Pericardial effusion" not in d.present and "Pleural effusion" not in d.present
    d.effusions_in_one_sentence = both_absent and d.w.chance(0.3)
    if not d.effusions_in_one_sentence:
        d.finding_or_normal("Pericardial effusion", "pericardium", "pericardium")


def _oesophagus(d: _Draft) -> None:
    d.finding_or_normal("Hiatal hernia", "oesophagus", "oesophagus")


def _lymph_nodes(d: _Draft) -> None:
    if not d.finding_or_normal("Lymphadenopathy", "lymph", "lymph") and d.w.chance(0.25):
        d.state("lymph", "lymph_millimetric")  # hard negative: small nodes that are not lymphadenopathy
    if d.w.chance(0.6):
        d.normal("lymph", "axilla")


def _lungs(d: _Draft) -> None:
    """The lung findings in _LUNG_ORDER, a grouped negation of a few absent ones, pneumothorax."""
    positive = [name for name in _LUNG_ORDER if name in d.present]
    if not positive:
        d.normal("lungs", "lungs_clear", keep_always=d.w.chance(0.7))
    for name in positive:
        d.add("lungs", d.write(name))
    if positive:
        _grouped_negation(d)
    _swap_neighbours(d.blocks["lungs"], d.w)
    if d.w.chance(0.6):
        d.normal("lungs", "pneumothorax")


def _grouped_negation(d: _Draft) -> None:
    """0-3 absent lung labels in one sentence: "No emphysema or consolidation was detected." or the post-form."""
    negatives = [n for n in _LUNG_ORDER if n not in d.present]
    order = d.w.rng.permutation(len(negatives))
    chosen = [negatives[i] for i in order[: int(d.w.rng.integers(0, 4))]]
    if not chosen:
        return
    terms = _join([d.w.pick(NEGATION_NAMES[n]) for n in chosen], "or")
    if d.w.chance(0.5):
        d.blocks["lungs"].append(f"No {terms} was detected.")
    else:
        d.blocks["lungs"].append(f"{terms.capitalize()} {'were' if len(chosen) > 1 else 'was'} not observed.")


def _swap_neighbours(sentences: list[str], w: _Writer) -> None:
    """Sometimes swap two neighbouring sentences (of three or more), as radiologists do."""
    if len(sentences) > 2 and w.chance(0.3):
        i = int(w.rng.integers(len(sentences) - 1))
        sentences[i], sentences[i + 1] = sentences[i + 1], sentences[i]


def _pleura(d: _Draft) -> None:
    if d.effusions_in_one_sentence:
        d.state("pleura", "pleura_pericardium")
    else:
        d.finding_or_normal("Pleural effusion", "pleura", "pleura")


def _incidental(d: _Draft) -> None:
    """Incidental findings in their blocks; half of them (those with one) in the impressions."""
    for name in d.incidental:
        sentences, imp = INCIDENTAL[name]
        d.blocks[INCIDENTAL_BLOCK[name]].append(d.w.pick(sentences))
        if imp and d.w.chance(0.5):
            d.impressions.append(imp)


def _abdomen_diaphragm_bones(d: _Draft) -> None:
    if not any("cyst" in s or "steatosis" in s for s in d.blocks["abdomen"]):
        d.normal("abdomen", "abdomen")
    if d.w.chance(0.4):
        d.normal("pleura", "diaphragm")
    if d.w.chance(0.4):
        d.normal("bones", "chest_wall")
    d.normal("bones", "bones")
    if d.w.chance(0.4):
        d.blocks["bones"].append(VERTEBRAE)
    d.blocks["bones"] = list(dict.fromkeys(d.blocks["bones"]))


def _findings(d: _Draft) -> str:
    """Findings_EN: the blocks written in this order (the order of the draws), then joined in _BLOCKS order."""
    for section in (_airways, _mediastinum, _aorta, _pericardium, _oesophagus, _lymph_nodes, _lungs, _pleura,
                    _incidental, _abdomen_diaphragm_bones):
        section(d)
    window = d.w.pick(NORMAL["window"])
    ordered: list[str] = []
    for block in _BLOCKS:
        if block == "lungs":
            ordered.append(window)
        ordered += d.blocks[block]
    return " ".join(ordered)


def _impressions(d: _Draft) -> str:
    if d.impressions:
        return "\n".join(dict.fromkeys(d.impressions))
    return d.w.pick(NORMAL_IMPRESSIONS)


def _clinical_information(record: dict[str, Any], w: _Writer) -> str:
    """60 % of the time an indication matching one of the record's latent factors, else a generic one."""
    latent = record.get("latent") or {}
    active = [k for k in INDICATIONS if latent.get(k)]
    if active and w.chance(0.6):
        return w.pick(INDICATIONS[active[int(w.rng.integers(len(active)))]])
    return w.pick(UNSPECIFIED_INDICATIONS)


def _technique(thickness_mm: float | None, w: _Writer) -> str:
    t = format_mm(thickness_mm) if thickness_mm else w.pick(TECHNIQUE_THICKNESSES)
    return w.pick(TECHNIQUE).format(t=t)


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
    draft = _Draft(record, w)
    findings = _findings(draft)  # the sections draw in this order: findings, impressions, clinical, technique
    impressions = _impressions(draft)
    clinical = _clinical_information(record, w)
    return {
        "ClinicalInformation_EN": clinical,
        "Technique_EN": _technique(slice_thickness_mm, w),
        "Findings_EN": findings,
        "Impressions_EN": impressions,
    }
