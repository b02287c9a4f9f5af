"""Model side of the pipeline: 3D CT encoders, the CLIP model, classifiers, losses and configs."""
