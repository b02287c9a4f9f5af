"""A NegEx-style reader of CT-RATE-style report text → the 18 labels.

It is the report-label QA check (README, "QA checks": on generated reports it must reproduce the 18
labels exactly) and a usable baseline labeller for any CT-RATE-style text. It does
not know the generator's sentences: it finds *cue phrases* per pathology (regular expressions over
words and stems), then decides per mention whether it lies inside a *negation scope*:

* pre-negation triggers ("no", "without", "there is no", "absence of", "free of") negate the
  mentions that follow them up to the end of the clause;
* post-negation triggers ("was not observed", "were not detected", "did not reach pathological
  size", "is absent") negate the mentions that precede them back to the start of the clause;
* clauses end at a sentence end, ";", ":" or a contrastive conjunction ("but", "however",
  "although", "whereas", "except");
* hedged parentheticals with a question mark ("(intrapulmonary lymph node?)") are uncertainty, not
  a finding, and are removed before matching;
* per-label exclusions drop mentions whose clause is about something else ("thyroid nodule" is not
  a lung nodule, "costal cartilage calcification" is not arterial).

A label is 1 when at least one mention survives.
"""

from __future__ import annotations

import re

from ctclip_contract import CTRATE_PATHOLOGIES

__all__ = ["labels_from_report", "find_mentions", "LABEL_CUES"]

# Cue phrases per label. Stems keep plural/adjective forms ("emphysematous", "atelectases").
LABEL_CUES: dict[str, tuple[str, ...]] = {
    "Medical material": (
        r"\bcatheters?\b", r"\bsternotomy\b", r"\bsternal wires?\b", r"\bpace ?makers?\b", r"\bsurgical clips?\b",
        r"\bclips?\b", r"\bport\b", r"\bstents?\b", r"\bprosthes[ie]s\b", r"\bmedical (material|device)s?\b",
        r"\b(chest|nasogastric|endotracheal|tracheostomy) tubes?\b",
    ),
    "Arterial wall calcification": (
        r"\b(calcific|calcified|calcification|calcifications|atheroma|atheromas|atheromatous|atherosclerotic|mural calcific)\b[^.;]*?\b(aorta|aortic|arterial|supra-aortic)\b",
        r"\b(aorta|aortic|arterial)\b[^.;]*?\b(calcific|calcified|calcifications?|atheroma|atheromas|atheromatous|atherosclerotic)\b",
    ),
    "Cardiomegaly": (
        r"\bcardiomegaly\b", r"\bheart (size|dimensions?) (is |are |was |were )?increased\b",
        r"\b(heart|cardiac silhouette) (is |was )?enlarged\b", r"\benlarged heart\b",
        r"\bcardiothoracic (index|ratio) (is |was )?increased\b",
    ),
    "Pericardial effusion": (
        r"\bpericardial (effusion|fluid)\b", r"\beffusion in the pericardi", r"\bpleural (or|and) pericardial effusion\b",
    ),
    "Coronary artery wall calcification": (
        r"\b(calcific|calcified|calcification|calcifications|atheroma|atheromas|atheromatous|atherosclerotic)\b[^.;]*?\bcoronary\b",
        r"\bcoronary\b[^.;]*?\b(calcific|calcified|calcifications?|atheroma|atheromas|atheromatous|atherosclerosis|atherosclerotic)\b",
    ),
    "Hiatal hernia": (r"\bhiat(al|us) hernia\b", r"\bherniation of the stomach\b", r"\bhiatal herniation\b"),
    "Lymphadenopathy": (r"\blymphadenopath(y|ies)\b", r"\blymph nodes?\b", r"\bconglomerate nodes?\b"),
    "Emphysema": (r"\bemphysem", r"\bbullae?\b", r"\bbullous\b"),
    "Atelectasis": (r"\batelecta(sis|ses|tic)\b",),
    "Lung nodule": (r"\bnodul(e|es|ar)\b",),
    "Lung opacity": (
        r"\bground[- ]glass (opacit|densit|area)", r"\bopacit(y|ies)\b", r"\bdensity increases?\b",
        r"\bincreased density\b", r"\binfiltrat",
    ),
    "Pulmonary fibrotic sequela": (r"\bsequela", r"\bfibrotic\b", r"\bfibrosis\b", r"\bfibroatelecta", r"\bparenchymal scar"),
    "Pleural effusion": (
        r"\bpleural effusions?\b", r"\bpleural (or|and) pericardial effusion\b", r"\bpleural fluid\b",
        r"\beffusion in the (right |left )?(pleural|hemithorax)",
        r"\bthe effusion\b",
    ),
    "Mosaic attenuation pattern": (r"\bmosaic\b",),
    "Peribronchial thickening": (
        r"\bperibronchial (wall )?thickening", r"\bbronchial wall thickening", r"\bperibronchial cuffing\b",
    ),
    "Consolidation": (r"\bconsolidat",),
    "Bronchiectasis": (r"\bbronchiecta",),
    "Interlobular septal thickening": (
        r"\bseptal thickening", r"\bthickening of the (interlobular )?septa\b", r"\binterlobular septa\b",
    ),
}

# A mention whose clause matches one of these belongs to another organ or is not the label.
_EXCLUSIONS: dict[str, tuple[str, ...]] = {
    "Lung nodule": (r"\bthyroid\b", r"\bkidney\b", r"\brenal\b", r"\bliver\b", r"\badrenal\b", r"\bbreast\b"),
    "Arterial wall calcification": (r"\bcostal cartilages?\b",),
    "Lymphadenopathy": (r"\bintrapulmonary lymph node\b",),
}

_PRE_NEGATION = re.compile(
    r"\b(no|without|absence of|free of|negative for|neither|nor|there (is|are|was|were) no|not)\b(?! (observed|detected|seen|found|noted|identified|present|reach))"
)
_POST_NEGATION = re.compile(
    r"\b((is|are|was|were) not (observed|detected|seen|found|noted|identified|present)"
    r"|(is|are|was|were) absent"
    r"|(did not|does not|do not|not) reach(ing|ed)? (the )?pathologic(al)? (size|dimension)s?"
    r"|below pathologic(al)? (size|dimension)s?)\b"
)
_CLAUSE_BREAK = re.compile(r";|:|\b(but|however|although|though|whereas|except|apart from)\b|,\s*(?=which\b)")
_HEDGE = re.compile(r"\([^()]*\?[^()]*\)")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")

_COMPILED = {label: tuple(re.compile(c) for c in cues) for label, cues in LABEL_CUES.items()}
_COMPILED_EXCL = {label: tuple(re.compile(c) for c in ex) for label, ex in _EXCLUSIONS.items()}


def _clauses(text: str) -> list[str]:
    out = []
    for sentence in _SENTENCE_SPLIT.split(text.lower()):
        sentence = _HEDGE.sub(" ", sentence)
        pos = 0
        for m in _CLAUSE_BREAK.finditer(sentence):
            out.append(sentence[pos:m.start()])
            pos = m.end()
        out.append(sentence[pos:])
    return [c.strip() for c in out if c.strip()]


def _negated(clause: str, start: int) -> bool:
    for m in _PRE_NEGATION.finditer(clause):
        if m.start() < start:
            return True
    # A post-negation may sit inside a two-part cue ("calcification was not detected in the
    # aorta"), so anything after the start of the mention counts.
    for m in _POST_NEGATION.finditer(clause):
        if m.start() > start:
            return True
    return False


def find_mentions(text: str) -> list[dict]:
    """Every cue-phrase mention in ``text`` with its label, clause and negation status.

    Args:
        text: report text (any sections concatenated).

    Returns:
        list of ``{"label", "cue", "clause", "negated", "excluded"}`` in reading order.
    """
    mentions = []
    for clause in _clauses(text):
        for label in CTRATE_PATHOLOGIES:
            excluded = any(p.search(clause) for p in _COMPILED_EXCL.get(label, ()))
            for pattern in _COMPILED[label]:
                for m in pattern.finditer(clause):
                    mentions.append({
                        "label": label, "cue": m.group(0), "clause": clause,
                        "negated": _negated(clause, m.start()), "excluded": excluded,
                    })
    return mentions


def labels_from_report(text: str) -> dict[str, int]:
    """The 18 CT-RATE labels read from report text with negation handling.

    Args:
        text: report text, typically ``Findings_EN + " " + Impressions_EN``; ``"Not given."`` and
            empty text give all zeros.

    Returns:
        ``{pathology: 0 | 1}`` for every name of :data:`ctclip_contract.CTRATE_PATHOLOGIES`, in that order.
    """
    positive = {m["label"] for m in find_mentions(text or "") if not m["negated"] and not m["excluded"]}
    return {name: int(name in positive) for name in CTRATE_PATHOLOGIES}
