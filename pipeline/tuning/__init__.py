"""Hyperparameter sweeps with Ray Tune over the `train` stage's own keys.

space.py   the `tune.space` spec: parsing, validation, conversion to Ray sample objects (no Ray import at load)
best.py    best_params.yaml: written by the sweep, applied by the `train` stage when `tune.apply` is on
sweep.py   the sweep itself (imports Ray): one trial = one call of pipeline.training.engine.train
runs.py    its MLflow side: the sweep's parent run, each trial's run closed with the trial's outcome

Kept import-free on purpose: pipeline.config imports space.py, so this package must not import config back.
"""
