"""The wording of the CT-RATE-style reports: every phrase :mod:`chest_phantom.reports` may write.

Data only; :mod:`.reports` decides which phrase is drawn when. Phrases are the project's own wording in
the CT-RATE register (translated from Turkish, passive voice). Templates use ``str.format`` fields that
the writer fills in:

    {where}    location of a lung finding ("the right upper lobe", "both lungs")
    {sev}      severity word ("mild"); {Sev} the same capitalised
    {d}        a length in mm as text ("6.5"); {long_axis} a node's long axis
    {side}     "right" / "left"; {Side} the same capitalised
    ...        the few others are named where they are used

The order of the options in a tuple matters: the writer draws an index into it, so reordering a tuple
changes every report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ctclip_contract import NOT_GIVEN

__all__ = [
    "FINDING_PHRASES", "FindingPhrases", "INCIDENTAL", "INCIDENTAL_BLOCK", "INDICATIONS", "NEGATION_NAMES", "NORMAL",
    "NORMAL_IMPRESSIONS", "NO_CONTRAST", "SEVERITY_WORDS", "STATION_TEXT", "TECHNIQUE",
    "TECHNIQUE_THICKNESSES", "UNSPECIFIED_INDICATIONS", "VERTEBRAE",
]

SEVERITY_WORDS = {
    "minimal": ("minimal", "minimal", "slight"),
    "mild": ("mild", "mild", "minimal"),
    "moderate": ("moderate", "moderate", "significant"),
    "marked": ("marked", "prominent", "widespread"),
}

#: Node station names of the record → as the reports write them.
STATION_TEXT = {
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

@dataclass(frozen=True)
class FindingPhrases:
    """How one positive finding is written.

    ``sentences`` and ``impressions`` map a variant (usually the finding's subtype; ``None`` is the
    default variant) to the options one phrase is drawn from. A plain string is a fixed phrase: nothing
    is drawn for it. The remaining fields are read by the writer of the simple findings only
    (``reports._simple_finding``): what is drawn, in this order, before the sentence.
    """

    sentences: Mapping[str | None, tuple[str, ...]]
    impressions: Mapping[str | None, tuple[str, ...] | str]
    #: draw a severity word first ({sev}, {Sev})
    severity: bool = False
    #: location fields, one location drawn for each, in this order
    locations: tuple[str, ...] = ()
    #: the location when the finding names neither lobes nor a side
    default_location: str = "both lungs"


#: Positive statements, by CT-RATE label; "calcification" covers the arterial and the coronary label together.
FINDING_PHRASES: dict[str, FindingPhrases] = {
    "Medical material": FindingPhrases(
        sentences={
            "sternotomy wires": (
                "Sternotomy wires are observed secondary to previous surgery.",
                "Median sternotomy wires were noted in the sternum.",
                "Postoperative changes and sternotomy wires were observed in the sternum.",
                "Sternal wire sutures related to the previous operation are seen.",
            ),
            "central venous catheter": (
                "A catheter extending from the {side} internal jugular vein to the superior vena cava was observed.",
                "A central venous catheter was observed, entering from the {side} subclavian vein with its tip in the superior vena cava.",
                "A central venous catheter inserted through the {side} jugular vein is observed, its distal end at the cavoatrial junction.",
            ),
            "port catheter": (
                "A port catheter is observed in the {side} anterior chest wall, its tip extending to the superior vena cava.",
                "A port catheter placed in the subcutaneous tissue of the {side} hemithorax was observed.",
                "Port catheter reservoir in the {side} pectoral region and the catheter extending to the superior vena cava were noted.",
            ),
            "pacemaker": (
                "A pacemaker generator in the {side} pectoral region and its leads extending to the right heart chambers were observed.",
                "A cardiac pacemaker is present in the {side} infraclavicular region with leads in the right atrium and ventricle.",
                "Pacemaker and its electrodes are observed.",
            ),
            None: (  # surgical clips, and any other device
                "Surgical clips are observed in the mediastinum.",
                "Metallic surgical clips related to previous surgery were noted.",
                "Surgical clips compatible with the previous operation are seen.",
            ),
        },
        impressions={
            "sternotomy wires": "Sternotomy wires (postoperative).",
            "central venous catheter": "Central venous catheter.",
            "port catheter": "Port catheter.",
            "pacemaker": "Pacemaker.",
            None: "Surgical clips.",
        },
    ),
    "calcification": FindingPhrases(  # variants: which of the two calcification labels are present
        sentences={
            "aorta and coronary": (
                "There are calcific atheroma plaques in the aorta and coronary arteries.",
                "Atherosclerotic calcifications were observed in the thoracic aorta and coronary arteries.",
                "Calcified atheromatous plaques are observed in the aortic wall and in the coronary arteries.",
            ),
            "aorta": (
                "There are calcific atheroma plaques in the aorta.",
                "Atherosclerotic calcifications were observed in the thoracic aorta.",
                "Calcified plaques are observed in the wall of the aortic arch and descending aorta.",
                "Mural calcifications were observed in the thoracic aorta.",
            ),
            "coronary": (
                "There are calcific plaques in the coronary arteries.",
                "Coronary artery calcifications were observed.",
                "Calcified atheromas are observed along the course of the coronary arteries.",
            ),
        },
        impressions={
            "aorta and coronary": ("Atherosclerotic changes in the aorta and coronary arteries.", "Aortic and coronary artery calcifications."),
            "aorta": ("Atherosclerotic changes in the aorta.", "Aortic calcification."),
            "coronary": ("Coronary artery calcification.", "Coronary atherosclerosis."),
        },
    ),
    "Cardiomegaly": FindingPhrases(
        sentences={None: (
            "Heart size increased.",
            "Cardiothoracic index increased in favor of the heart (cardiomegaly).",
            "The heart is enlarged.",
            "Cardiomegaly was observed.",
            "Heart dimensions are increased.",
            "Heart size is increased, mediastinal main vascular structures are of normal width.",
        )},
        impressions={None: ("Cardiomegaly.", "Heart size increased.", "Cardiomegaly")},
    ),
    "Pericardial effusion": FindingPhrases(  # variant "measured": the record gives the thickness {d}
        sentences={
            None: ("There is {sev} pericardial effusion.", "{Sev} pericardial effusion was observed."),
            "measured": (
                "There is {sev} pericardial effusion.",
                "{Sev} pericardial effusion was observed.",
                "There is {sev} pericardial effusion, which is {d} mm in its thickest part.",
                "Pericardial effusion reaching {d} mm in thickness was observed.",
                "Effusion in the pericardium measuring {d} mm at its thickest point was observed.",
            ),
        },
        impressions={None: ("Pericardial effusion.", "{Sev} pericardial effusion.")},
    ),
    "Hiatal hernia": FindingPhrases(
        sentences={None: (
            "Sliding type hiatal hernia was observed at the lower end of the esophagus.",
            "Hiatal hernia is observed.",
            "A sliding hiatal hernia is present.",
            "Herniation of the stomach through the esophageal hiatus (hiatal hernia) was observed.",
            "At the distal end of the esophagus, a hiatal hernia was observed.",
        )},
        impressions={None: ("Hiatal hernia.", "Sliding type hiatal hernia.")},
    ),
    "Lymphadenopathy": FindingPhrases(  # {where}: "in the subcarinal station"; variant "measured": short axis {d}
        sentences={
            None: ("Lymphadenopathies were observed {where}.", "Enlarged lymph nodes were observed {where}."),
            "measured": (
                "Lymph nodes with a short axis reaching {d} mm are observed {where}.",
                "Enlarged lymph nodes, the largest measuring {long_axis}x{d} mm, were observed {where}.",
                "A lymph node measuring {long_axis}x{d} mm is observed {where}.",
                "Lymph nodes reaching pathological size ({d} mm in short axis) were detected {where}.",
                "Lymphadenopathy with a short axis of {d} mm was observed {where}.",
            ),
        },
        impressions={None: ("Mediastinal lymphadenopathy.", "Lymphadenopathy.", "Enlarged mediastinal lymph nodes.")},
    ),
    "Emphysema": FindingPhrases(  # {extra}: ", the largest bulla measuring 20 mm," or ""
        sentences={
            "bullous": (
                "Bullous emphysematous changes{extra} are observed in {where}.",
                "There are bullae and emphysematous areas in {where}.",
            ),
            "paraseptal": (
                "Paraseptal emphysema is observed in {where}.",
                "There are {sev} paraseptal emphysematous changes in the subpleural areas of {where}.",
            ),
            "panlobular": ("Panlobular emphysema was observed in {where}.", "There are {sev} panlobular emphysematous changes in {where}."),
            None: (  # centrilobular
                "There are {sev} emphysematous changes in {where}.",
                "Centrilobular emphysema is observed in {where}.",
                "{Sev} centrilobular emphysematous changes were observed, predominantly in the upper lobes.",
                "Emphysematous areas are noted in {where}.",
            ),
        },
        impressions={"bilateral": ("Emphysematous changes in both lungs.", "Emphysema."), None: ("Emphysema.", "Emphysema.")},
    ),
    "Atelectasis": FindingPhrases(
        sentences={
            "passive, with effusion": (
                "Passive atelectasis secondary to the pleural effusion is observed in {where}.",
                "Compressive atelectasis adjacent to the pleural effusion was observed in {where}.",
            ),
            "passive": ("Passive atelectasis is observed in {where}.", "Compressive atelectatic changes are observed in {where}."),
            None: (
                "There are subsegmental atelectasis in {where}.",
                "Linear atelectasis was observed in {where}.",
                "Plate-like atelectasis is observed in {where}.",
                "Subsegmental atelectatic changes are observed in {where}.",
            ),
        },
        impressions={None: ("Atelectasis.", "Subsegmental atelectasis.", "Atelectatic changes.")},
        locations=("where",),
        default_location="the lower lobes of both lungs",
    ),
    "Lung nodule": FindingPhrases(  # {kind}: "solid", "ground-glass", "calcified" or ""; {Kind} capitalised
        sentences={
            "millimetric": (
                "There are millimetric nonspecific nodules in {where}.",
                "Millimetric nodules were observed in {where}.",
                "Several nonspecific nodules, the largest {largest} mm in diameter, are observed in {where}.",
            ),
            "several": (
                "There are {count} {kind} nodules in {where}, the largest being {largest} mm.",
                "{Kind} nodules, the largest measuring {largest} mm, were observed in {where}.",
            ),
            "several, two sizes": (  # {sizes}: "4 and 6.5"
                "There are {count} {kind} nodules in {where}, the largest being {largest} mm.",
                "{Kind} nodules, the largest measuring {largest} mm, were observed in {where}.",
                "{Kind} nodules measuring {sizes} mm were observed in {where}.",
                "Nodules with diameters of {sizes} mm are observed in {where}.",
            ),
            "single": (
                "A {d} mm {kind} nodule is observed in {where}.",
                "A {kind} nodule of {d} mm was observed in {where}.",
                "In {where}, a {kind} nodule {d} mm in diameter is observed.",
                "A nodule measuring {d} mm is observed in {where}.",
            ),
        },
        impressions={
            "millimetric, bilateral": ("Millimetric nodules in both lungs.", "Nonspecific pulmonary nodules."),
            "millimetric": ("Millimetric nodules.", "Nonspecific pulmonary nodules."),
            "several": "Pulmonary nodules.",
            "single": ("{d} mm nodule in {where}.", "Pulmonary nodule."),
            "calcified": "Calcified nodule (granuloma?).",
        },
    ),
    "Lung opacity": FindingPhrases(
        sentences={
            "dependent": (
                "Dependent density increases are observed in the posterior parts of {where}.",
                "Gravity-dependent ground-glass density increases were observed in the posterior segments of {where}.",
            ),
            None: (
                "Ground-glass opacities were observed in {where}.",
                "Patchy ground-glass density increases are observed in {where}.",
                "There are ground-glass areas in {where}.",
                "Opacities with ground-glass density were detected in {where}.",
                "Infiltrative areas in ground-glass density were observed in {where}.",
            ),
        },
        impressions={None: ("Ground-glass opacities.", "Density increases in the lung parenchyma.", "Lung opacities.")},
        locations=("where",),
    ),
    "Consolidation": FindingPhrases(
        sentences={None: (
            "Patchy areas of consolidation are observed in {where}.",
            "Consolidation with air bronchograms was observed in {where}.",
            "There are consolidative changes in {where}.",
            "A consolidated area is observed in {where}.",
        )},
        impressions={None: ("Consolidation (pneumonia?).", "Consolidation.", "Pneumonic consolidation.")},
        locations=("where",),
    ),
    "Pulmonary fibrotic sequela": FindingPhrases(
        sentences={
            "basal reticular": (
                "Reticular fibrotic changes are observed in the basal segments of {where}.",
                "Fibrotic changes with a reticular pattern were observed in the lower lobes of {where}.",
            ),
            None: (  # apical
                "Sequelae changes are observed at the apical level in both lungs.",
                "Pleuroparenchymal sequelae changes were observed in the apical parts of {where}.",
                "Fibrotic bands are observed in {where}.",
                "Linear sequelae fibrotic densities are observed in {where}.",
                "Fibroatelectatic sequelae bands were observed in {where}.",
            ),
        },
        impressions={None: ("Sequelae fibrotic changes.", "Pulmonary fibrotic sequelae.", "Apical sequelae changes.")},
        locations=("where",),
    ),
    "Pleural effusion": FindingPhrases(
        sentences={
            "bilateral": ("There is bilateral {sev} pleural effusion.", "Bilateral {sev} pleural effusion was observed."),
            None: (
                "There is {sev} pleural effusion on the {side}.",
                "{Sev} pleural effusion was observed in the {side} hemithorax.",
                "{Side}-sided {sev} pleural effusion is present.",
            ),
            "thickness": (  # a second sentence when the record gives the thickness {d}
                "The pleural effusion measured approximately {d} mm at its thickest point.",
                "The thickest part of the effusion was {d} mm.",
            ),
        },
        impressions={"bilateral": ("Pleural effusion.", "Bilateral pleural effusion."), None: ("Pleural effusion.", "Pleural effusion.")},
    ),
    "Mosaic attenuation pattern": FindingPhrases(
        sentences={None: (
            "Mosaic attenuation pattern was observed in both lungs (small airway disease? small vessel disease?).",
            "There is a mosaic attenuation pattern in {where}.",
            "Mosaic attenuation areas were observed in both lungs.",
        )},
        impressions={None: ("Mosaic attenuation pattern.", "Mosaic attenuation in both lungs.")},
        locations=("where",),
    ),
    "Peribronchial thickening": FindingPhrases(
        sentences={None: (
            "Bilateral peribronchial thickenings are observed.",
            "Peribronchial thickening is observed in {where}.",
            "Bronchial wall thickening is observed in {where_2}.",
            "There are peribronchial thickenings in {where_3}.",
        )},
        impressions={None: ("Peribronchial thickening.", "Bronchial wall thickening.")},
        locations=("where", "where_2", "where_3"),  # each option drew its own location: kept so that reports do not change
    ),
    "Bronchiectasis": FindingPhrases(
        sentences={
            "traction": ("Traction bronchiectasis is observed in {where}.", "There are traction bronchiectases in {where}."),
            None: (  # cylindrical
                "There is {sev} bronchiectasis in the central parts of {where}.",
                "Cylindrical bronchiectasis was observed in {where}.",
                "Bronchiectatic changes are observed in {where}.",
            ),
        },
        impressions={None: ("Bronchiectasis.", "Bronchiectatic changes.")},
        severity=True,
        locations=("where",),
    ),
    "Interlobular septal thickening": FindingPhrases(
        sentences={None: (
            "There are interlobular septal thickenings in {where}.",
            "Interlobular septal thickening is observed in {where}.",
            "Thickening of the interlobular septa was observed in {where}.",
            "Smooth septal thickenings are observed in the peripheral parts of {where}.",
        )},
        impressions={None: ("Interlobular septal thickening.", "Septal thickenings.")},
        locations=("where",),
    ),
}

#: Incidental, non-label findings: sentence options for the findings, optional impression phrase.
INCIDENTAL = {
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
#: The findings block each incidental finding is written in.
INCIDENTAL_BLOCK = {
    "thyroid nodule": "mediastinum",
    "hepatosteatosis": "abdomen",
    "renal cyst": "abdomen",
    "scoliosis": "bones",
    "degenerative osteophytes": "bones",
    "costal cartilage calcification": "bones",
}

#: Normal statements, several surface forms each. Both negation forms appear.
NORMAL = {
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
#: Fixed sentences, added at random (nothing is drawn among them).
NO_CONTRAST = "Mediastinal structures cannot be evaluated optimally because contrast material is not given."
VERTEBRAE = "Vertebral corpus heights are preserved."

#: Lung-window labels named in grouped negations ("No emphysema, bronchiectasis or consolidation was detected.").
NEGATION_NAMES = {
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

#: Impressions of a study without positive findings.
NORMAL_IMPRESSIONS = ("Thoracic CT examination within normal limits.", "Findings within normal limits.", NOT_GIVEN)

#: Clinical information by latent factor of the record, and when none is quoted.
INDICATIONS = {
    "infection": ("Cough, fever.", "covid?", "Fever, cough, shortness of breath.", "Pneumonia?"),
    "heart_failure": ("Shortness of breath.", "Dyspnea, leg swelling.", "Chest pain"),
    "post_op": ("Postoperative control.", "Follow-up after surgery."),
    "smoker": ("Cough.", "Smoker, cough.", "Follow-up of known lung nodule."),
    "airway_disease": ("Chronic cough.", "Asthma?", "Shortness of breath."),
    "prior_infection": ("History of tuberculosis.", "Cough, fatigue."),
}
UNSPECIFIED_INDICATIONS = (NOT_GIVEN, NOT_GIVEN, "Cough.", "Shortness of breath.", "Chest pain")

#: Technique section; {t} is the slice thickness in mm, one of ``TECHNIQUE_THICKNESSES`` when the caller gives none.
TECHNIQUE = (
    "Non-contrast images were taken in the axial plane with a section thickness of {t} mm.",
    "Sections were taken without contrast medium and there were no reconstructions at the workstation.",
    "Non-contrast axial sections of {t} mm thickness were obtained and reconstruction was performed at the workstation.",
    "Thorax CT was performed without contrast material with {t} mm slice thickness.",
    NOT_GIVEN,
)
TECHNIQUE_THICKNESSES = ("1", "1.5", "2")
