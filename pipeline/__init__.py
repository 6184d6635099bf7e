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
    # The same bits on every x86 CPU: oneDNN (convolutions, matmuls) and MKL pick their kernels, and so the order of
    # floating-point sums, by CPU model; two AVX-512 machines gave the CNN 66.5 % and 60.1 %. Pinned to their AVX2
    # code paths both gave 56.65 % to the last bit (README "Same results on another machine"). Read when the
    # libraries first run, i.e. after this import; set ONEDNN_MAX_CPU_ISA=ALL to let them use AVX-512 again.
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
