"""Model side of the pipeline: 3D CT encoders, the CLIP model, classifiers, losses and checkpoint loading.

Model configs are read by :mod:`ctclip_contract`; the names re-exported here (``load_model_config``,
``merge_config``, ``image_input_shape``, ``list_model_configs``) are that one definition, for convenience.
"""

from ctclip_contract import image_input_shape, list_model_configs, load_model_config, merge_config

from .checkpoint import extract_state_dict, load_checkpoint, load_state_dict_file, save_reference_checkpoint
from .classifiers import ClassFineClassifier, ImageReportLatents, ZeroShotClassifier, classfine_head_input
from .ct_specialised import CTSpecialisedEncoder
from .ctclip import CTCLIP
from .ctvit import CTViT, HUBandPatchEmbedding
from .factory import create_model
from .image_encoders import reads_segmentation
from .losses import ClipLoss, clip_loss
from .slice_fusion import SliceFusionEncoder
from .text_encoder import build_text_encoder, build_tokenizer, build_wordpiece_tokenizer, resolve_pretrained

__all__ = [
    "list_model_configs", "load_model_config", "create_model", "image_input_shape", "merge_config",
    "CTViT", "HUBandPatchEmbedding", "SliceFusionEncoder", "CTSpecialisedEncoder", "CTCLIP", "ClassFineClassifier", "classfine_head_input", "ZeroShotClassifier", "ImageReportLatents", "ClipLoss", "clip_loss",
    "load_checkpoint", "load_state_dict_file", "extract_state_dict", "save_reference_checkpoint",
    "build_text_encoder", "build_tokenizer", "build_wordpiece_tokenizer", "resolve_pretrained", "reads_segmentation",
]
