"""The contract every stage shares, without torch: model configs, the 18 pathologies, prompts, the input contract,
the CT-RATE table layout, and the files every stage writes (atomic writer, JSON reader, output-folder lock, gzip at
ISA-L speed).

The lowest layer: ``custom_nets``, ``transforms``, ``chest_phantom`` and ``workflows`` import it; it imports
none of them, nor torch, MONAI or transformers (``tests/test_layering.py`` keeps it so).
"""

from .files import (GZIP_LEVEL, HAVE_ISAL, OutputFolderLocked, atomic_path, atomic_write_bytes, atomic_write_json,
                    atomic_write_text, file_sha256, gzip_compress, gzip_decompress, gzip_open, gzip_stream_size,
                    is_environment_fault, output_folder_lock, read_json, route_nibabel_gzip)
from .ctrate_format import (METADATA_COLUMNS, NOT_GIVEN, REPORT_COLUMNS, REPORT_SECTION_KEYS,
                            normalise_report_sections)
from .model_config import (CONFIG_DIR, DEFAULT_TEMPLATES, IMAGE_POOLINGS, PROMPT_SCORINGS, TEXT_POOLINGS,
                           InputContract, ModelConfig, ModelConfigError, PromptConfig, TextContract,
                           image_input_shape, list_model_configs, load_model_config, merge_config)
from .bundle import (FILES_SHA256_KEY, METADATA_SCHEMA, PACKAGES_KEY, BundleError, release, verify_bundle,
                     version_in_range)
from .pathologies import CTRATE_PATHOLOGIES, NUM_PATHOLOGIES, pathology_index
from .errors import install_bundle_excepthook

# under `python -m monai.bundle` only: an error the project raises on purpose ends in one line, not a traceback
install_bundle_excepthook()

__all__ = [
    "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "file_sha256",
    "is_environment_fault", "read_json", "OutputFolderLocked", "output_folder_lock", "install_bundle_excepthook",
    "GZIP_LEVEL", "HAVE_ISAL", "gzip_compress", "gzip_decompress", "gzip_open", "gzip_stream_size", "route_nibabel_gzip",
    "METADATA_COLUMNS", "NOT_GIVEN", "REPORT_COLUMNS", "REPORT_SECTION_KEYS", "normalise_report_sections",
    "CONFIG_DIR", "DEFAULT_TEMPLATES", "IMAGE_POOLINGS", "PROMPT_SCORINGS", "TEXT_POOLINGS",
    "InputContract", "ModelConfig", "ModelConfigError", "PromptConfig", "TextContract",
    "image_input_shape", "list_model_configs", "load_model_config", "merge_config",
    "CTRATE_PATHOLOGIES", "NUM_PATHOLOGIES", "pathology_index",
    "BundleError", "FILES_SHA256_KEY", "METADATA_SCHEMA", "PACKAGES_KEY", "release", "verify_bundle",
    "version_in_range",
]
