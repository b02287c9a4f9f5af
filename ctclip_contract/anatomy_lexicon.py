"""Which anatomical regions a report sentence talks about: a small lexicon of words and phrases onto the regions of
:data:`ctclip_contract.anatomy.ANATOMY_REGIONS`.

Region-level alignment in pretraining pairs each region embedding of a volume with the sentences of its report that
mention that region; :func:`sentence_regions` decides the mention. Reading is by rules, in this order, each matched
span used once (so "aorticopulmonary window" is a lymph-node station, not the aorta, and "upper lobe of the right
lung" is one lobe, not also the whole right lung):

1. Phrases that name anatomy without being about it are dropped: "lung parenchyma window" is a display setting.
2. **Lung lobes with laterality**: "right lower lobe", "lower lobe of the right lung", "right lung lower lobe",
   "lower lobes of both lungs", "bilateral upper lobes", "the upper lobes" (both sides), "middle lobe" (right),
   "lingula" (the left upper lobe: the lingula is part of it, as in TotalSegmentator).
3. **Lungs by side**: "right lung", "left lung", "both lungs", "either lung".
4. **Other anatomy**, :data:`ANATOMY_TERMS`, longest phrase first: "pericardial" → heart, "mediastinal" and the
   node stations → mediastinum, "aortic" → aorta, "pulmonary artery" → pulmonary artery, "pleural"/"pneumothorax"
   → pleural space, "tracheal" → trachea, "bronchial"/"main bronchi" → bronchi, "hepatic" → liver,
   "vertebral"/"costal"/"rib"/"sternotomy" → bone, ... Then a lung word without a side ("lung", "pulmonary",
   "parenchyma", "subpleural"), in a sentence that names no lobe and no side, means both lungs. A side-level
   mention is narrowed by "apical"/"apex" to the upper lobes and by "basal"/"bases" to the lower lobes ("at the
   apical level in both lungs").
5. **Findings that name their organ by themselves**, :data:`FINDING_TERMS` ("Emphysema.", "Lymphadenopathy.",
   "Hepatosteatosis."), only when nothing above matched: "Emphysematous areas in the right upper lobe" is about
   that lobe, not both lungs, and "thyroid nodule" is about the thyroid, not the lungs.

Negated sentences mention their anatomy too ("No pleural effusion was observed." is about the pleural space): a
region's sentences say what is there and what is not. Sentences that name no region ("Findings within normal
limits.", "The thickest part of the effusion was 5 mm.") map to none.

Matching is on whole words, case-insensitive; British spellings ("oesophagus", "haemothorax") are listed beside the
American ones. Pure Python, like the rest of the contract layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .anatomy import ANATOMY_REGIONS, REGION_IDS

__all__ = ["ANATOMY_TERMS", "FINDING_TERMS", "IGNORED_PHRASES", "LUNG_LOBES", "sentence_regions",
           "sentence_region_ids", "region_sentence_mask"]

#: (side, level) -> lobe region. The lingula belongs to the left upper lobe.
LUNG_LOBES: dict[tuple[str, str], str] = {
    ("left", "upper"): "lung_upper_lobe_left",
    ("left", "lower"): "lung_lower_lobe_left",
    ("right", "upper"): "lung_upper_lobe_right",
    ("right", "middle"): "lung_middle_lobe_right",
    ("right", "lower"): "lung_lower_lobe_right",
}
_SIDES = {"right": ("right",), "left": ("left",), "both": ("right", "left")}

_ABDOMEN = ("abdomen", "liver", "stomach")  # the upper-abdominal sections hold all three regions
_LYMPH = ("mediastinum",)

#: Anatomy words and phrases -> regions (step 4 of the module docstring). Matched as whole words, longest first.
ANATOMY_TERMS: dict[str, tuple[str, ...]] = {
    # airways
    "trachea": ("trachea",), "tracheal": ("trachea",),
    "main bronchi": ("bronchi",), "main bronchus": ("bronchi",), "bronchi": ("bronchi",),
    "bronchus": ("bronchi",), "bronchial": ("bronchi",), "lobar bronchi": ("bronchi",),
    # heart and pericardium (no pericardium region: the heart region holds it)
    "heart": ("heart",), "cardiac": ("heart",), "cardiomegaly": ("heart",), "cardiothoracic": ("heart",),
    "coronary": ("heart",), "pericardial": ("heart",), "pericardium": ("heart",), "atrium": ("heart",),
    "atrial": ("heart",), "ventricle": ("heart",), "ventricular": ("heart",),
    "cavoatrial junction": ("superior_vena_cava", "heart"),
    # great vessels
    "aorta": ("aorta",), "aortic": ("aorta",), "aortic arch": ("aorta",),
    "pulmonary artery": ("pulmonary_artery",), "pulmonary arteries": ("pulmonary_artery",),
    "pulmonary trunk": ("pulmonary_artery",),
    "superior vena cava": ("superior_vena_cava",), "vena cava": ("superior_vena_cava",),
    # mediastinum, its node stations and the hila
    "mediastinum": ("mediastinum",), "mediastinal": ("mediastinum",), "prevascular": _LYMPH,
    "paratracheal": _LYMPH, "pre-paratracheal": _LYMPH, "pretracheal": _LYMPH, "subcarinal": _LYMPH,
    "aorticopulmonary window": _LYMPH, "aortopulmonary window": _LYMPH, "hilar": _LYMPH, "hilum": _LYMPH,
    "hila": _LYMPH,
    # oesophagus, stomach
    "esophagus": ("esophagus",), "esophageal": ("esophagus",), "oesophagus": ("esophagus",),
    "oesophageal": ("esophagus",), "hiatal hernia": ("esophagus", "stomach"), "hiatus": ("esophagus",),
    "stomach": ("stomach",), "gastric": ("stomach",),
    "thyroid": ("thyroid_gland",), "thyroid gland": ("thyroid_gland",),
    # pleura
    "pleural": ("pleural_space",), "pleura": ("pleural_space",), "pneumothorax": ("pleural_space",),
    "hydrothorax": ("pleural_space",), "hemothorax": ("pleural_space",), "haemothorax": ("pleural_space",),
    "empyema": ("pleural_space",),
    # bone
    "bone": ("bone",), "bones": ("bone",), "osseous": ("bone",), "vertebra": ("bone",), "vertebrae": ("bone",),
    "vertebral": ("bone",), "spine": ("bone",), "scoliosis": ("bone",), "osteophytes": ("bone",),
    "rib": ("bone",), "ribs": ("bone",), "costal": ("bone",), "sternum": ("bone",), "sternal": ("bone",),
    "sternotomy": ("bone",), "clavicle": ("bone",), "scapula": ("bone",),
    # upper abdomen
    "liver": ("liver",), "hepatic": ("liver",), "hepatosteatosis": ("liver",),
    "abdomen": _ABDOMEN, "abdominal": _ABDOMEN,
    "kidney": ("abdomen",), "renal": ("abdomen",), "spleen": ("abdomen",), "splenic": ("abdomen",),
    "adrenal": ("abdomen",), "gallbladder": ("abdomen",), "pancreas": ("abdomen",),
    # body wall
    "chest wall": ("body_wall",), "subcutaneous": ("body_wall",), "axillary": ("body_wall",),
    "axilla": ("body_wall",), "pectoral": ("body_wall",), "infraclavicular": ("body_wall",),
    "breast": ("body_wall",), "skin": ("body_wall",),
}

_LUNGS = ("lungs",)  # FINDING_TERMS placeholder: every lobe, narrowed by apical / basal
#: Findings that name their organ by themselves (step 5): used only when the sentence names no region.
FINDING_TERMS: dict[str, tuple[str, ...]] = {
    **{word: _LUNGS for word in (
        "emphysema", "emphysematous", "bulla", "bullae", "bullous", "nodule", "nodules", "nodular", "ground-glass",
        "opacity", "opacities", "infiltration", "infiltrative", "consolidation", "consolidative", "consolidated",
        "atelectasis", "atelectatic", "fibroatelectatic", "bronchiectasis", "bronchiectases", "bronchiectatic",
        "peribronchial", "bronchial wall thickening", "septal", "interlobular", "mosaic attenuation", "fibrotic",
        "sequela", "sequelae", "pneumonia", "pneumonic", "granuloma", "aeration", "air bronchograms")},
    "lymphadenopathy": _LYMPH, "lymphadenopathies": _LYMPH, "lymph node": _LYMPH, "lymph nodes": _LYMPH,
    "central venous catheter": ("superior_vena_cava",), "port catheter": ("body_wall",),
    "pacemaker": ("heart", "body_wall"),
}

#: Phrases that name anatomy without being about it (step 1): a display setting, and a lung finding that is not
#: about the central airways (bronchial wall thickening is the peribronchial thickening of the lungs' bronchi; step 5
#: still reads it).
IGNORED_PHRASES: tuple[str, ...] = ("lung parenchyma window", "parenchyma window", "lung window", "bronchial wall")

_LEVEL = r"(upper|middle|lower)"
# step 2, most specific first: (pattern, sides); None: the side is the pattern's group "side"
_LOBE_RULES: tuple[tuple[re.Pattern, tuple[str, ...] | None], ...] = tuple((re.compile(p), sides) for p, sides in (
    (rf"\b(?P<side>right|left) lung (?P<level>upper|middle|lower) lobes?\b", None),
    (rf"\b(?P<level>upper|middle|lower) lobes? of (?:the )?(?P<side>right|left) lung\b", None),
    (rf"\b(?P<level>upper|middle|lower) lobes? of (?:the )?both lungs\b", ("right", "left")),
    (rf"\b(?P<side>right|left) (?P<level>upper|middle|lower) lobes?\b", None),
    (rf"\bbilateral (?P<level>upper|middle|lower) lobes?\b", ("right", "left")),
    (rf"\b(?P<level>upper|middle|lower) lobes?\b", ("right", "left")),  # "the upper lobes": both sides
    (r"\blingula(?:r)?\b(?P<level>)", ("left",)),
))
# step 3: a lung named by side; then, only when no lobe or side is named, a lung word means both lungs
_SIDE_RULES: tuple[tuple[re.Pattern, tuple[str, ...] | None], ...] = (
    (re.compile(r"\b(?P<side>right|left) lungs?\b"), None),
    (re.compile(r"\b(?:both|either|each) lungs?\b"), ("right", "left")),
)
_LUNG_WORDS = re.compile(r"\b(?:lungs?|pulmonary|parenchyma|parenchymal|pleuroparenchymal|subpleural)\b")
_APICAL = re.compile(r"\b(?:apical|apex|apices|apically)\b")
_BASAL = re.compile(r"\b(?:basal|base|bases|basilar|basally)\b")


def _alternation(phrases: Iterable[str]) -> re.Pattern:
    """One pattern matching any of ``phrases`` as whole words; longer phrases first, so that at a position a phrase
    wins over the words inside it ("pulmonary artery" before "pulmonary")."""
    ordered = sorted(phrases, key=lambda p: (-len(p), p))
    return re.compile(r"\b(?:" + "|".join(re.escape(p) for p in ordered) + r")\b")


_ANATOMY = _alternation(ANATOMY_TERMS)
_FINDINGS = _alternation(FINDING_TERMS)
_IGNORED = _alternation(IGNORED_PHRASES)


def _take(pattern: re.Pattern, text: str) -> tuple[list[re.Match], str]:
    """The matches of ``pattern`` and the text with their spans blanked (each span is read once)."""
    matches = list(pattern.finditer(text))
    for m in matches:
        text = text[:m.start()] + " " * (m.end() - m.start()) + text[m.end():]
    return matches, text


def _lobes(sides: Iterable[str], levels: Iterable[str] = ("upper", "middle", "lower")) -> set[str]:
    levels = tuple(levels)
    return {LUNG_LOBES[(s, lv)] for s in sides for lv in levels if (s, lv) in LUNG_LOBES}


def _narrowed(sides: Iterable[str], text: str) -> set[str]:
    """All lobes of ``sides``, or only the upper / lower ones when the sentence says apical / basal."""
    levels = (("upper",) if _APICAL.search(text) else ()) + (("lower",) if _BASAL.search(text) else ())
    return _lobes(sides, levels or ("upper", "middle", "lower"))


def sentence_regions(sentence: str) -> frozenset[str]:
    """The regions of :data:`~ctclip_contract.anatomy.ANATOMY_REGIONS` a report sentence mentions.

    Args:
        sentence: one sentence (split a report first, e.g. with ``transforms.report_text.split_sentences``).

    Returns:
        region names (empty when the sentence names no region), e.g. ``"Passive atelectasis secondary to the
        pleural effusion is observed in the right lower lobe."`` -> ``{"lung_lower_lobe_right", "pleural_space"}``.
    """
    text = " ".join(str(sentence).lower().split())
    findings_text = text  # step 5 reads the findings in the whole sentence
    _, text = _take(_IGNORED, text)
    found: set[str] = set()
    for pattern, sides in _LOBE_RULES:  # step 2
        matches, text = _take(pattern, text)
        for m in matches:
            level = m.group("level") or "upper"  # the lingula is part of the left upper lobe
            if sides is None:
                sides_here: tuple[str, ...] = (m.group("side"),)
            else:
                sides_here = ("right",) if level == "middle" else sides  # only the right lung has a middle lobe
            found |= _lobes(sides_here, (level,))
    named: set[str] = set()
    for pattern, sides in _SIDE_RULES:  # step 3
        matches, text = _take(pattern, text)
        for m in matches:
            named.update((m.group("side"),) if sides is None else sides)
    lobes_named = bool(found)
    matches, text = _take(_ANATOMY, text)  # step 4, before the bare lung words: "pulmonary artery" is not the lungs
    for m in matches:
        found.update(ANATOMY_TERMS[m.group(0)])
    matches, text = _take(_LUNG_WORDS, text)
    if matches and not lobes_named and not named:
        named = {"right", "left"}
    if named:
        found |= _narrowed(named, text)
    if not found:  # step 5
        for m in _FINDINGS.finditer(findings_text):
            regions = FINDING_TERMS[m.group(0)]
            found |= _narrowed(("right", "left"), text) if regions is _LUNGS else set(regions)
    return frozenset(found)


def sentence_region_ids(sentence: str) -> tuple[int, ...]:
    """:func:`sentence_regions` as sorted region ids (1..R, the ids of the label maps)."""
    return tuple(sorted(REGION_IDS[name] for name in sentence_regions(sentence)))


def region_sentence_mask(sentences: Sequence[str], regions: Sequence[str] = ANATOMY_REGIONS) -> list[list[bool]]:
    """``(S, R)`` booleans: whether sentence ``s`` mentions region ``r`` (``regions`` in id order by default), the
    pairing of region-level alignment (a region whose column is all False has no sentence and leaves the loss).

    Raises:
        KeyError: a name in ``regions`` that is not an anatomical region.
    """
    unknown = [r for r in regions if r not in REGION_IDS]
    if unknown:
        raise KeyError(f"unknown anatomical regions {unknown}; valid: {', '.join(ANATOMY_REGIONS)}")
    mentioned = [sentence_regions(s) for s in sentences]
    return [[r in m for r in regions] for m in mentioned]
