"""Inference on new images: `python -m pipeline predict` (predict.py), its inputs (inputs.py), GLSim explanations
(explain.py). Images go through the same steps as the training data: faces-stage crop (optional), clean's RGB
conversion, then the checkpoint's own evaluation transform."""
