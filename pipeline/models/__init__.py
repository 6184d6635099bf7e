"""Models built by name: `build_model(method, model_name, num_classes, weights, img_size, **model_options(cfg))`.

Methods: cnn, vit, linear (timm models as they are), glsim (glsim.GLSimViT) and ila (ila.ILAViT, variants ila / ila+ /
ila++); `python -m pipeline profile` (profile.py) reports their parameters, FLOPs, tokens, speed and memory.
"""

from pipeline.models.factory import METHODS, build_model, load_checkpoint, model_options, save_checkpoint

__all__ = ["METHODS", "build_model", "load_checkpoint", "model_options", "save_checkpoint"]
