"""Models built by name: `build_model(method, model_name, num_classes, weights, img_size)`."""

from pipeline.models.factory import build_model, load_checkpoint, save_checkpoint

__all__ = ["build_model", "load_checkpoint", "save_checkpoint"]
