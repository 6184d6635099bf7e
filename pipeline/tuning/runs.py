"""The sweep's MLflow side: one parent run per sweep, and each trial's run closed with the trial's outcome.

Trials log through the engine itself (its run, nested by `mlflow.parentRunId`); the driver only opens the parent and,
as a Ray Tune callback, closes what the trials could not: a run whose process ended before the engine did, a trial
that failed before its run started.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

from ray import tune

from pipeline import tracking
from pipeline.config import BaseParams, Params, flatten
from pipeline.search_space import plain


def parent_run(store: tracking.Store, experiment_id: str, name: str, params: Params, root: Path) -> str:
    """The sweep's run: found again by its tags when a killed sweep resumes, else created with the params."""
    found = store.runs(experiment_id, f"tags.tune_sweep = '{name}' and tags.tune_role = 'parent'", max_results=1)
    if found:
        store.reopen(found[0].info.run_id)
        return found[0].info.run_id
    tags = {"stage": "tune", "tune_role": "parent", "tune_sweep": name, **tracking.provenance(root, "tune")}
    flat = {k: v for k, v in flatten(params).items() if k.startswith(("base.", "train.", "tune."))}
    return store.create_run(experiment_id, name, tags, flat)


def finish_parent(store: tracking.Store, run_id: str, summary: dict, best: dict, best_file: Path) -> None:
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    store.log(run_id, metrics=metrics, tags={f"best.train.{k}": v for k, v in best.items()})
    store.log_artifact(run_id, best_file)
    store.end(run_id, "FINISHED")


class TrialRuns(tune.Callback):
    """Driver side: each trial's MLflow run ends with the trial's outcome (tag tune_outcome).

    Holds no tracking URI (callbacks are pickled into Ray's experiment state): the driver's store is looked up when
    needed.
    """

    def __init__(self, base: BaseParams, root: Path, sweep: str, trials_dir: Path):
        self.base, self.root, self.sweep, self.trials_dir = base, root, sweep, trials_dir

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "FINISHED", None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", _error_line(trial, tracking.tracking_uri(self.base, self.root)))

    def _close(self, trial, status: str, error: str | None) -> None:
        store = tracking.Store.of(self.base, self.root)
        exp_id = store.experiment_id(self.base.experiment)
        runs = store.runs(exp_id, f"tags.tune_trial_id = '{trial.trial_id}'")
        if not runs:  # failed before the engine started its run: record the trial anyway
            runs = [self._failed_run(store, exp_id, trial)]
        *older, latest = sorted(runs, key=lambda r: r.info.start_time)
        for run in older:
            # A killed sweep interrupted this attempt before its first epoch; the trial went on in a newer run.
            if run.info.status == "RUNNING":
                store.log(run.info.run_id, tags={"tune_outcome": "interrupted"})
                store.end(run.info.run_id, "KILLED")
        last_epoch = (trial.last_result or {}).get("epoch", 0)
        tags = {"tune_outcome": "failed" if error else _outcome(latest, last_epoch)}
        if error:
            tags["tune_error"] = error
        store.log(latest.info.run_id, tags=tags)
        if latest.info.status != status:  # RUNNING when the trial's process ended before the engine closed its run
            store.end(latest.info.run_id, status)
        # A stopped or failed trial is never resumed: its resumable state (~50 MB for the default model) can go.
        shutil.rmtree(self.trials_dir / trial.trial_id / "checkpoints", ignore_errors=True)

    def _failed_run(self, store: tracking.Store, exp_id: str, trial):
        parent = store.runs(exp_id, f"tags.tune_sweep = '{self.sweep}' and tags.tune_role = 'parent'", max_results=1)
        tags = {"stage": "tune", "tune_sweep": self.sweep, "tune_trial_id": trial.trial_id}
        if parent:
            tags["mlflow.parentRunId"] = parent[0].info.run_id
        params = {k: plain(v) for k, v in trial.config.items()}
        return store.get_run(store.create_run(exp_id, f"trial-{trial.trial_id}", tags, params))


def _outcome(run, last_epoch: int) -> str:
    epochs = int(run.data.params.get("train.epochs", last_epoch))  # the trial's budget (tune.epochs)
    return "completed" if last_epoch >= epochs else "stopped_early"


def _error_line(trial, uri: str) -> str:
    """The exception's last line (type: message), without a password the tracking URI may carry."""
    # Ray has written the error to the trial's local folder when it calls back (the copy in storage comes later).
    path = trial.error_file
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = (lines[-1] if lines else "unknown error")[:500]
    password = urlsplit(uri).password
    return line.replace(password, "***") if password else line
