"""Data side of the pipeline: MONAI dictionary transforms for chest CT and CT-RATE table readers."""

from ctclip_contract import CTRATE_PATHOLOGIES, NOT_GIVEN, NUM_PATHOLOGIES, pathology_index  # re-exported for bundle configs

from .hu import HUDecisionError, RescaleToHU, RescaleToHUd
from .qc import CheckInputd, CTQualityCheck, CTQualityCheckd, QualityCheckError, check_dicom_series, check_input
from .model_input import HUWindow, ToModelInput, ToModelInputd
from .preprocessing import StreamedPreprocessing, build_preprocessing, inference_transforms, raw_to_model_input_transforms
from .augmentation import view_transforms
from .discovery import discover_inputs, evaluation_items, inference_items, load_datalist
from .labels import SelectLabelsd
from .io import CastToHUInt16d, CTVolumeReader, ITKVolumeReader, ResampleToSpacing, ResampleToSpacingd, save_nifti_atomic
from .ctrate import datalist_from_records, patient_id, read_labels_csv, read_metadata_csv, read_reports_csv, split_patients
from .report_text import ReportTextd, SentenceRegionsd, TokenizeReportd, report_sections_from_config
