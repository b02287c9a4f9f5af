"""The CT-RATE table layout: column names of the metadata, report and label tables, and report sections.

One definition for the readers (``transforms.ctrate``) and the writer of the synthetic cohort
(``chest_phantom``), so that a generated cohort and the real dataset cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "METADATA_COLUMNS", "METADATA_REQUIRED", "METADATA_LIST_COLUMNS", "REPORT_COLUMNS", "REPORT_REQUIRED",
    "NOT_GIVEN", "REPORT_SECTION_KEYS", "SECTION_PRESETS", "normalise_report_sections",
]

#: Header of CT-RATE's ``*_metadata.csv`` (one row per reconstruction), in the published order.
METADATA_COLUMNS: tuple[str, ...] = tuple((
    "VolumeName,Manufacturer,SeriesDescription,ManufacturerModelName,PatientSex,PatientAge,"
    "ReconstructionDiameter,DistanceSourceToDetector,DistanceSourceToPatient,GantryDetectorTilt,"
    "TableHeight,RotationDirection,ExposureTime,XRayTubeCurrent,Exposure,FilterType,GeneratorPower,"
    "FocalSpots,ConvolutionKernel,PatientPosition,RevolutionTime,SingleCollimationWidth,"
    "TotalCollimationWidth,TableSpeed,TableFeedPerRotation,SpiralPitchFactor,DataCollectionCenterPatient,"
    "ReconstructionTargetCenterPatient,ExposureModulationType,CTDIvol,ImagePositionPatient,"
    "ImageOrientationPatient,SliceLocation,SamplesPerPixel,PhotometricInterpretation,Rows,Columns,"
    "XYSpacing,RescaleIntercept,RescaleSlope,RescaleType,NumberofSlices,ZSpacing,StudyDate"
).split(","))
#: The metadata columns the pipeline uses; only these must be present.
METADATA_REQUIRED = ("VolumeName", "RescaleIntercept", "RescaleSlope", "XYSpacing", "ZSpacing")
#: Metadata columns that hold a list written as text (``"[0.75, 0.75]"``).
METADATA_LIST_COLUMNS = ("XYSpacing", "ImagePositionPatient", "ImageOrientationPatient",
                         "DataCollectionCenterPatient", "ReconstructionTargetCenterPatient")
#: Header of CT-RATE's ``*_reports.csv``.
REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
REPORT_REQUIRED = ("VolumeName", "Findings_EN", "Impressions_EN")
#: How CT-RATE marks a missing report section; never training text.
NOT_GIVEN = "Not given."

#: Report columns (as model configs name them) -> the datalist keys ``ct_preprocess`` writes.
REPORT_SECTION_KEYS = {
    "Findings_EN": "findings",
    "Impressions_EN": "impressions",
    "ClinicalInformation_EN": "clinical_information",
    "Technique_EN": "technique",
}
#: Named choices accepted wherever a list of sections is expected.
SECTION_PRESETS = {
    "findings": ("findings",),
    "findings_impressions": ("findings", "impressions"),
    "impressions": ("impressions",),
    # impressions first: token truncation then cuts the long findings, not the short pathology list
    "impressions_findings": ("impressions", "findings"),
}


def normalise_report_sections(sections: str | Sequence[str]) -> tuple[str, ...]:
    """Datalist keys of report sections given as a preset, CT-RATE column names or datalist keys.

    Raises:
        ValueError: when no section is given.
    """
    if isinstance(sections, str):
        if sections in SECTION_PRESETS:
            return SECTION_PRESETS[sections]
        sections = [sections]
    out = tuple(REPORT_SECTION_KEYS.get(s, s) for s in sections)
    if not out:
        raise ValueError("at least one report section is required (e.g. 'findings')")
    return out
