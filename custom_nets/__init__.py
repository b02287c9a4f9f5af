"""Model side of the pipeline: 3D CT encoders, the CLIP model, classifiers, losses and configs."""

from .model_config import list_model_configs, load_model_config
