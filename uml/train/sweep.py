"""The ``tune`` stage: a Ray Tune sweep of the loss weights (or anything ``tune.search_space``
names), each trial running the same training code as the ``train`` stage.

Current Ray's Train-inside-Tune pattern: a function trainable launches a ``TorchTrainer`` whose
reports reach Tune through ``TuneReportCallback``. ASHA stops weak trials early on the validation
selection score. The sweep's name is derived from its params and the data hash, so rerunning an
interrupted sweep restores it (finished trials kept, unfinished ones resumed) instead of starting
over.

Search-space grammar (``tune.search_space`` in params.yaml), one distribution per dotted key::

    loss.cls_weight: {uniform: [low, high]}
    loss.mut_weight: {loguniform: [low, high]}      # low > 0
    loss.kl_annealing_epochs: {randint: [low, high]}  # integers in [low, high), as Ray's randint
    model.dropout: {choice: [0.0, 0.1, 0.2]}
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from uml.config import Params, Paths, get_dotted, parse_params
from uml.data.store import open_prepared
from uml.errors import ClusterError, ConfigError
from uml.train.cluster import ray_session
from uml.train.trainer import model_config, run_name, run_trainer
from uml.train.worker import SCORE_KEY

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
TRIAL_DRIVER_MEMORY = 64 * 1024**2  # bytes


def _check_range(key: str, dist: str, args: Any) -> tuple[float, float]:
    if not (isinstance(args, (list, tuple)) and len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"tune.search_space.{key}: {dist} needs [low, high] numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"tune.search_space.{key}: {dist} needs low < high, got [{low}, {high}]")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"tune.search_space.{key}: loguniform needs low > 0, got {low}")
    if dist == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"tune.search_space.{key}: randint needs integer bounds, got {args!r}")
    return low, high


def build_search_space(params: Params) -> dict[str, Any]:
    """Validate ``tune.search_space`` and turn it into Ray Tune sampling objects.

    Every key must be an existing params key, and the extreme values of every distribution must
    pass the params validation, so a sweep can't fail hours in on an out-of-range sample.
    """
    space = params.tune.search_space
    if not space:
        raise ConfigError("tune.search_space is empty: name at least one params key to search")
    raw = params.model_dump()
    result: dict[str, Any] = {}
    for key, spec in space.items():
        try:
            get_dotted(raw, key)
        except KeyError:
            raise ConfigError(f"tune.search_space: '{key}' is not a params key (e.g. loss.cls_weight)") from None
        if key.split(".")[0] in ("tune", "ray", "data"):
            raise ConfigError(f"tune.search_space: '{key}' cannot be searched (only model, loss, train and evaluate keys)")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"tune.search_space.{key}: expected one distribution like {{uniform: [0.1, 0.9]}}, got {spec!r}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"tune.search_space.{key}: unknown distribution '{dist}'; use one of {list(DISTRIBUTIONS)}")
        if dist == "choice":
            if not isinstance(args, list) or not args:
                raise ConfigError(f"tune.search_space.{key}: choice needs a non-empty list, got {args!r}")
            extremes = list(args)
            sampler = tune.choice(args)
        else:
            low, high = _check_range(key, dist, args)
            extremes = [low, high - 1] if dist == "randint" else [low, high]
            sampler = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dist](low, high)
        for value in extremes:
            try:
                params.with_overrides({key: value}, source=f"tune.search_space.{key}")
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{key}: {dist} {args!r} reaches an invalid value {value!r}:\n{exc}") from None
        result[key] = sampler
    return result


def max_concurrent(params: Params) -> int:
    """Trials that fit at once: cluster CPUs (or GPUs) over what one trial's workers take."""
    if params.tune.max_concurrent_trials:
        return params.tune.max_concurrent_trials
    total = ray.cluster_resources()
    per_worker = dict(params.ray.resources_per_worker)
    if params.ray.use_gpu:
        per_worker.setdefault("GPU", 1)
    fits = [total.get(name, 0.0) / (amount * params.tune.workers_per_trial) for name, amount in per_worker.items() if amount > 0]
    return max(1, int(math.floor(min(fits)))) if fits else 1


def _trial(config: dict[str, Any], base: dict[str, Any], experiment: str, model_cfg: dict[str, Any]) -> None:
    """One trial: the base params with this trial's sampled values, trained by the train stage's code."""
    from uml.models import ModelConfig

    params = parse_params(base, source="tune base params").with_overrides(config, source="tune trial")
    trial_id = tune.get_context().get_trial_id()
    cfg = ModelConfig.from_dict(model_cfg)
    run_trainer(params, name=f"{experiment}-{trial_id}", model_cfg=cfg, epochs=params.tune.epochs,
                num_workers=params.tune.workers_per_trial, callbacks=[TuneReportCallback()])


def sweep_name(params: Params, data_hash: str) -> str:
    tune_cfg = params.tune.model_dump(mode="json")
    tune_cfg.pop("max_concurrent_trials")  # how many run at once does not change the results
    return f"tune-{params.section_hash('model', 'loss', 'tune', extra={'data': data_hash, 'base': run_name(params, data_hash)})}"


def results_table(result_grid: tune.ResultGrid, keys: list[str], epochs: int) -> pd.DataFrame:
    """One row per trial: its sampled values, best and last score, epochs reached, status."""
    rows = []
    for result in result_grid:
        history = result.metrics_dataframe
        scores = history[SCORE_KEY].to_numpy(dtype=float) if history is not None and SCORE_KEY in history else np.array([])
        row: dict[str, Any] = {"trial_id": (result.metrics or {}).get("trial_id", Path(result.path).name)}
        row.update({k: result.config.get(k) for k in keys})
        finite = scores[np.isfinite(scores)]
        row["score"] = float(finite.max()) if finite.size else float("nan")
        row["last_score"] = float(scores[-1]) if scores.size else float("nan")
        row["epochs"] = int(scores.size)
        row["status"] = "error" if result.error else ("completed" if scores.size >= epochs else "stopped early")
        rows.append(row)
    return pd.DataFrame(rows)


def write_outputs(table: pd.DataFrame, keys: list[str], paths: Paths) -> dict[str, Any]:
    """results.csv, best_params.yaml (nested like params.yaml) and the score-vs-weight plot."""
    paths.tune_dir.mkdir(parents=True, exist_ok=True)
    table = table.sort_values("score", ascending=False, na_position="last").reset_index(drop=True)
    ok = table[np.isfinite(table["score"])]
    if ok.empty:
        raise ClusterError("every tune trial failed or reported no score; see the Ray logs above")
    best = ok.iloc[0]
    nested: dict[str, Any] = {}
    for key in keys:
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        value = best[key]
        node[leaf] = value.item() if hasattr(value, "item") else value
    tmp_csv = paths.tune_results.with_suffix(".csv.tmp")
    table.to_csv(tmp_csv, index=False)
    tmp_csv.replace(paths.tune_results)
    tmp_yaml = paths.best_params.with_suffix(".yaml.tmp")
    tmp_yaml.write_text(f"# Best of {len(table)} trials (val score {best['score']:.4f}, trial {best['trial_id']}).\n"
                        + yaml.safe_dump(nested, sort_keys=False))
    tmp_yaml.replace(paths.best_params)
    plot_scores(table, keys, paths.tune_dir / "scores.png")
    return nested


def plot_scores(table: pd.DataFrame, keys: list[str], path: Path) -> None:
    """Validation score against each searched value, the best trial highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    ok = table[np.isfinite(table["score"])]
    for ax, key in zip(axes[0], keys):
        stopped = ok["status"] != "completed"
        ax.scatter(ok.loc[~stopped, key], ok.loc[~stopped, "score"], label="completed")
        ax.scatter(ok.loc[stopped, key], ok.loc[stopped, "score"], marker="x", label="stopped early")
        ax.scatter([ok.iloc[0][key]], [ok.iloc[0]["score"]], s=160, facecolors="none", edgecolors="red", label="best")
        ax.set(xlabel=key, ylabel="val score")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Tune: validation score per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(params: Params) -> dict[str, Any]:
    """The ``tune`` stage; returns the best values (nested like params.yaml)."""
    params = params.resolved()
    paths = Paths(params)
    space = build_search_space(params)
    keys = list(space)
    data = open_prepared(paths.dataset)
    cfg = model_config(params, data.class_names, data.mask_classes, data.image_size)
    name = sweep_name(params, data.content_hash)
    experiment_path = f"{paths.storage.rstrip('/')}/{name}"
    tp = params.tune
    with ray_session(params):
        trainable = tune.with_parameters(_trial, base=params.model_dump(mode="json"), experiment=name, model_cfg=cfg.to_dict())
        # The trial function only waits on its TorchTrainer, whose workers hold the CPUs/GPUs. It
        # asks for a little memory instead (a resource every node has): Tune refuses an empty
        # request, and any CPU fraction would leave the last worker of a full node unplaceable.
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
        if tune.Tuner.can_restore(experiment_path):
            log.info("restoring sweep %s: finished trials are kept, unfinished ones resume", experiment_path)
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            concurrent = max_concurrent(params)
            log.info("sweep %s: %d trials of %d epochs, %d at a time, ASHA grace %d / reduction %g, searching %s",
                     name, tp.num_samples, tp.epochs, concurrent, tp.grace_period, tp.reduction_factor, ", ".join(keys))
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=SCORE_KEY,
                    mode="max",
                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=tp.epochs,
                                            grace_period=min(tp.grace_period, tp.epochs), reduction_factor=tp.reduction_factor),
                    # The random-search generator limits concurrency itself (Tune ignores
                    # max_concurrent_trials for it).
                    search_alg=BasicVariantGenerator(random_state=tp.seed, max_concurrent=concurrent),
                    num_samples=tp.num_samples,
                ),
                run_config=tune.RunConfig(name=name, storage_path=paths.storage, verbose=1),
            )
        result_grid = tuner.fit()
    table = results_table(result_grid, keys, tp.epochs)
    errors = [r.error for r in result_grid if r.error]
    if errors:
        log.warning("%d of %d trials failed; first error: %s", len(errors), len(table), errors[0])
    best = write_outputs(table, keys, paths)
    if not paths.ray_storage_uri:
        # The trials' own checkpoints (optimiser state included) are of no further use once the
        # results are written, and they take gigabytes on long sweeps.
        for run_dir in Path(paths.storage).glob(f"{name}-*"):
            shutil.rmtree(run_dir, ignore_errors=True)
    log.info("best trial: %s (val score %.4f) -> %s", best, float(table["score"].max()), paths.best_params)
    return best
