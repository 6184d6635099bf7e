"""Hyperparameter sweeps with Ray Tune over the `train` stage's own keys.

best.py    best_params.yaml: written by the sweep, applied by the `train` stage when `tune.apply` is on
sweep.py   the sweep itself (imports Ray): one trial = one call of pipeline.training.engine.train
runs.py    its MLflow side: the sweep's parent run, each trial's run closed with the trial's outcome

The `tune.space` spec (parsing, validation, conversion to Ray sample objects) is pipeline/search_space.py, on the
ground floor beside config.py, which validates params with it.
"""
