"""Data side of the pipeline: MONAI dictionary transforms for chest CT and CT-RATE table readers."""

from ctclip_contract import CTRATE_PATHOLOGIES, NOT_GIVEN, NUM_PATHOLOGIES, pathology_index  # re-exported for bundle configs

from .hu import HUDecisionError, RescaleToHU, RescaleToHUd
from .qc import CheckInputd, CTQualityCheck, CTQualityCheckd, QualityCheckError, check_dicom_series, check_input
from .model_input import ToModelInput, ToModelInputd
from .preprocessing import build_preprocessing, raw_to_model_input_transforms
from .io import CastToHUInt16d, ITKVolumeReader, ResampleToSpacing, ResampleToSpacingd, save_nifti_atomic
from .ctrate import build_datalist, patient_id, read_labels_csv, read_metadata_csv, read_reports_csv, split_patients
from .text import ReportTextd, TokenizeReportd, report_sections_from_config
