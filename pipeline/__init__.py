"""Reproducible fine-grained image recognition pipeline (DVC stages + MLflow tracking + timm models)."""

import os

# Offline-first defaults, set before huggingface_hub / albumentations / ray are imported anywhere.
# A user who is online overrides them in the environment (e.g. HF_HUB_OFFLINE=0 to download hub weights).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",  # otherwise pretrained=True retries the hub for ~46 s before failing
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations checks PyPI for updates on import
    "RAY_USAGE_STATS_ENABLED": "0",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
