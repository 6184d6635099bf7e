"""The `tune` stage: a Ray Tune sweep whose trials are calls of the `train` stage's engine (one engine, no copy).

- Trials: `tune.space` overrides train keys; each trial trains `tune.epochs` epochs into its own folder
  `<results_dir>/<sweep>/trials/<trial id>/` and reports every epoch to Tune (ASHA stops the weak ones early).
- Resuming: the sweep's name hashes what decides its results (train + tune params, seed, device, split md5), so
  running the same sweep again restores its Ray experiment (`Tuner.restore`): finished and failed trials are kept,
  unfinished ones continue, and the engine resumes each of them from its last epoch.
- MLflow: one parent run per sweep, one child run per trial (the engine's own run, nested by `mlflow.parentRunId`),
  all in the pipeline's store. The tracking URI reaches the trials through the object store (`tune.with_parameters`),
  never through the trial config, so it is not written into Ray's result files.
- A cluster: with RAY_ADDRESS set the sweep joins that cluster instead of starting a local Ray.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from pipeline import search_space as tune_space
from pipeline import tracking
from pipeline.config import Params, TrainParams, flatten, validate_section
from pipeline.io import md5_file, write_json
from pipeline.search_space import plain
from pipeline.training import checkpoint
from pipeline.tuning.best import write_best
from pipeline.tuning.runs import TrialRuns, finish_parent, parent_run

# Besides checkpoint.NOT_IN_RUN_KEY, params that do not change a sweep's results; everything else in train/tune (and
# the seed and device) names it.
_NOT_IN_NAME = ("tune.apply", "tune.results_dir", "train.epochs")


class SweepError(ValueError):
    """No trial produced a result (a ValueError, so the stage ends with exit code 2 and this message)."""


@dataclass(frozen=True)
class SweepInputs:
    """What every trial needs besides its config; shipped once through Ray's object store."""

    params: Params
    split_manifest: Path
    image_root: Path
    root: Path
    tracking_uri: str  # explicit: the driver's environment does not reach workers on other nodes
    parent_run_id: str
    trials_dir: Path
    sweep: str


def sweep_name(params: Params, split_manifest: Path) -> str:
    flat = checkpoint.result_params(flatten(params), ("train.", "tune."), _NOT_IN_NAME)
    return "sweep-" + checkpoint.run_key(flat, md5_file(split_manifest))[:12]


def trial_params(params: Params, config: dict, folder: Path) -> Params:
    """The train stage's params with the trial's values, its epoch budget, its folder and its resources."""
    overrides = {k.removeprefix("train."): plain(v) for k, v in config.items()}
    train = validate_section(
        TrainParams,
        {
            **params.train.model_dump(),
            **overrides,
            "epochs": params.tune.epochs,
            "resume": True,
            "checkpoint_dir": str(folder / "checkpoints"),
        },
        "the trial config",
        prefix="train.",
    )
    res = params.tune.resources
    # Ray hides the GPUs a trial did not reserve, so a CPU-only trial must not ask for CUDA; a GPU trial sees only its
    # own GPU (CUDA_VISIBLE_DEVICES), as cuda:0 whatever its id on the node.
    device = params.base.device if res.gpu > 0 else "cpu"
    base = params.base.model_copy(
        update={"threads": max(1, math.floor(res.cpu)), "device": "cuda" if device.startswith("cuda") else device}
    )
    return params.model_copy(update={"train": train, "base": base})


def check_trial_device(device: str, gpu_share: float, gpu_ids: list[str]) -> None:
    """A trial that asks for CUDA where torch sees none fails here, with what Ray gave it (a fake or a missing GPU:
    `ray start --num-gpus` without a driver, a node whose CUDA_VISIBLE_DEVICES hides it). base.device auto follows
    torch instead: such a trial trains on the CPU."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        import socket

        raise RuntimeError(
            f"base.device={device!r}: Ray gave this trial GPU {','.join(gpu_ids) or 'none'} (tune.resources.gpu="
            f"{gpu_share}) but torch sees no CUDA device on {socket.gethostname()} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); set base.device: auto to train it on the CPU"
        )


def train_trial(config: dict, inputs: SweepInputs) -> None:
    """One trial = one engine run; every epoch's row goes to Tune (the scheduler decides on `tune.metric`)."""
    import ray

    from pipeline.training.engine import TrainOutputs, train

    trial_id = tune.get_context().get_trial_id()
    folder = inputs.trials_dir / trial_id
    params = trial_params(inputs.params, config, folder)
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]  # the node's GPU ids Ray reserved for this trial
    check_trial_device(params.base.device, inputs.params.tune.resources.gpu, gpu_ids)
    os.environ["MLFLOW_TRACKING_URI"] = inputs.tracking_uri  # tracking.setup() prefers it over the project path
    outputs = TrainOutputs(folder / "model", folder / "train.json", folder / "history.csv")
    tags = {
        "mlflow.parentRunId": inputs.parent_run_id,
        "stage": "tune",
        "tune_sweep": inputs.sweep,
        "tune_trial_id": trial_id,
        "tune_gpu_ids": ",".join(gpu_ids) or "none",
    }
    train(
        params,
        inputs.split_manifest,
        inputs.image_root,
        outputs,
        inputs.root,
        on_epoch=lambda row: _report(row, params.train.epochs),
        run_name=f"trial-{trial_id}",
        tags=tags,
    )


def _report(row: dict, epochs: int) -> None:
    try:
        tune.report(dict(row))
    except SystemExit:
        # Tune ends a trial its scheduler stopped by raising SystemExit in report(). End the MLflow run here as a
        # normal finish; otherwise the engine's `with mlflow.start_run()` would record the stop as a failure.
        # (ASHA may also "stop" a trial at its last epoch, when it has nothing left to train.)
        tracking.set_tags({"tune_outcome": "completed" if row["epoch"] >= epochs else "stopped_early"})
        tracking.end_run("FINISHED")
        raise


def run_sweep(
    params: Params, split_manifest: Path, image_root: Path, root: Path, best_file: Path, metrics_file: Path
) -> dict:
    """Run (or resume) the sweep, write best_params + metrics, return the summary."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Save the experiment state every second (Ray's default: every 10 s or more), so that a killed sweep re-runs
    # no trial that had finished more than a second before the kill.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    import ray

    t0 = time.perf_counter()
    root, split_manifest, image_root = root.resolve(), split_manifest.resolve(), image_root.resolve()
    cfg = params.tune
    name = sweep_name(params, split_manifest)
    storage = (root / cfg.results_dir).resolve()
    experiment_id = tracking.setup(params.base, root)  # store + experiment made once here, before parallel trials
    store = tracking.Store.of(params.base, root)
    uri = store.uri
    parent = parent_run(store, experiment_id, name, params, root)
    inputs = SweepInputs(params, split_manifest, image_root, root, uri, parent, storage / name / "trials", name)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, inputs=inputs), {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu}
    )
    started_ray = _init_ray()
    try:
        trials = _outcomes(_tuner(trainable, params, root, storage, name).fit(), cfg.metric, cfg.mode, cfg.epochs)
        summary, best = _summarize(trials, cfg.metric, cfg.mode, name)
        # No trial id in the file: a sweep re-run from scratch gets new ids, and train must not re-run for that.
        write_best(
            best_file,
            best["values"],
            f"sweep {name}: best of {summary['trials']} trials, {cfg.metric} "
            f"{best['value']:.4f} at epoch {best['epoch']}",
        )
        write_json(metrics_file, summary)  # no seconds in the DVC metrics: they change every rerun's hash
        finish_parent(
            store, parent, {**summary, "sweep_seconds": round(time.perf_counter() - t0, 1)}, best["values"], best_file
        )
    except BaseException as exc:
        store.end(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()
    _print_table(trials, cfg.metric, best_file)
    return summary


def _tuner(trainable, params: Params, root: Path, storage: Path, name: str) -> tune.Tuner:
    """The sweep's Tuner: restored when Ray's experiment folder exists (a killed or finished run), else new."""
    if tune.Tuner.can_restore(storage / name):
        print(f"tune: resuming {storage / name} (finished and failed trials are kept)", flush=True)
        return tune.Tuner.restore(str(storage / name), trainable, resume_unfinished=True, resume_errored=False)
    cfg = params.tune
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage),
        verbose=0,  # trials print their epochs
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        callbacks=[TrialRuns(params.base, root, name, storage / name / "trials")],
    )
    return tune.Tuner(
        trainable, param_space=tune_space.to_ray(cfg.space), tune_config=_tune_config(params), run_config=run_config
    )


def _init_ray() -> bool:
    """Join RAY_ADDRESS's cluster when set, else start a private local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local": never attach to a cluster that an earlier `ray start` left on this machine.
        ray.init(address="local", include_dashboard=False)
    return True


def _tune_config(params: Params) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    cfg = params.tune
    seed = params.base.seed if cfg.seed is None else cfg.seed
    if cfg.scheduler == "asha":
        # time_attr "epoch" (not Ray's iteration count): rungs stay right when a trial resumes mid-way.
        # stop_last_trials=False: a trial that reaches max_t ends by itself, so the engine writes its outputs.
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.epochs,
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
            stop_last_trials=False,
        )
    elif cfg.scheduler == "median":
        scheduler = MedianStoppingRule(time_attr="epoch", grace_period=cfg.grace_period)
    else:
        scheduler = FIFOScheduler()
    # Ray applies max_concurrent_trials to Searchers (optuna, hyperopt) only; the random search takes it itself.
    limit = cfg.max_concurrent if cfg.search != "random" else None
    return tune.TuneConfig(
        metric=cfg.metric,
        mode=cfg.mode,
        num_samples=cfg.num_samples,
        scheduler=scheduler,
        search_alg=_search_alg(cfg.search, seed, cfg.max_concurrent),
        max_concurrent_trials=limit,
    )


def _search_alg(name: str, seed: int, max_concurrent: int | None):
    if name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    if name == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0)


def _outcomes(grid, metric: str, mode: str, epochs: int) -> list[dict]:
    """One row per trial: status, epochs trained, best metric (and its epoch), config."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        row = {
            "trial_id": (result.metrics or {}).get("trial_id", "?"),
            "config": result.config,
            "status": "failed" if result.error else "completed",
            "epochs": 0,
            "value": None,
            "epoch": None,
        }
        if df is not None and metric in df.columns and len(df):
            best = df.loc[df[metric].idxmax() if mode == "max" else df[metric].idxmin()]
            row.update(epochs=int(df["epoch"].max()), value=float(best[metric]), epoch=int(best["epoch"]))
            if not result.error and row["epochs"] < epochs:
                row["status"] = "stopped_early"
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def _summarize(trials: list[dict], metric: str, mode: str, name: str) -> tuple[dict, dict]:
    ok = [t for t in trials if t["status"] != "failed" and t["value"] is not None]  # sorted by trial id
    if not ok:
        raise SweepError(
            f"tune: all {len(trials)} trials of {name} failed; their errors are in Ray's trial "
            f"folders (tune.results_dir) and in MLflow (tag tune_error)"
        )
    sign = 1 if mode == "max" else -1
    best = max(ok, key=lambda t: sign * t["value"])  # ties: the first trial id wins (max keeps the first)
    summary = {
        "trials": len(trials),
        **{s: sum(t["status"] == s for t in trials) for s in ("completed", "stopped_early", "failed")},
        f"best_{metric}": best["value"],
        "best_epoch": best["epoch"],
        "epochs_trained": sum(t["epochs"] for t in trials),
    }
    values = {k.removeprefix("train."): plain(v) for k, v in best["config"].items()}
    return summary, {**best, "values": values}


def _print_table(trials: list[dict], metric: str, best_file: Path) -> None:
    print(f"tune: {len(trials)} trials ({metric}, best epoch of each):")
    for t in trials:
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        config = ", ".join(
            f"{k.removeprefix('train.')}={plain(v):.4g}"
            if isinstance(plain(v), float)
            else f"{k.removeprefix('train.')}={v}"
            for k, v in sorted(t["config"].items())
        )
        print(f"  {t['trial_id']:<14} {t['status']:<14} epochs {t['epochs']}  {value}  {config}")
    print(f"tune: best values -> {best_file}")
