"""Offline ViT pretraining: distil the packaged ImageNet EfficientNet-Lite0 into a timm ViT on unlabeled images.

pool.py gathers the licence-clean unlabeled images (and where each came from), distill.py trains and exports the
student (safetensors + model card), probe.py measures frozen features with a linear probe on the embedded set.
"""
