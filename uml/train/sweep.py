"""The ``tune`` stage: a Ray Tune sweep of the loss weights (or anything ``tune.search_space``
names), each trial running the same training code as the ``train`` stage.

Current Ray's Train-inside-Tune pattern: a function trainable launches a ``TorchTrainer`` whose
reports reach Tune through ``TuneReportCallback``. ASHA stops weak trials early on the validation
selection score.

Baseline: the first trial always runs the values the params file gives the searched keys (the
published loss weights 0.5 / 0.4 / 0.1 and KL annealing length by default), through Tune's
``points_to_evaluate``. It counts toward ``tune.num_samples``: a sweep runs ``num_samples``
trials, the baseline and ``num_samples - 1`` sampled ones (hence ``num_samples >= 2``), so the
budget is what the params say. A sampled trial (any trial whose values differ from the
baseline's) is chosen only when its validation score beats the baseline's; otherwise
``best_params.yaml`` holds the baseline values, so tuning never hands train worse values than the
ones it started from (on validation).

Identity: the sweep is named by everything that determines its result (:func:`sweep_inputs`: the
params of :func:`sweep_identity_keys`, the data's content hash, the fingerprint of the tune
stage's code). ``tune.max_concurrent_trials`` is not part of it. Rerunning an interrupted sweep
restores it (finished trials kept, unfinished ones resumed); any change starts a fresh sweep, and
the log says which and what changed.

``best_params.yaml``: the chosen values as params sections (``loss: {cls_weight: ...}``), plus
``selection`` (``chosen: baseline | sampled``, the reason, the scores, the trial) and
``tuned_for`` (the model section, data content hash, search space and tune-code fingerprint they
were tuned for, and the sweep's name). The train stage applies the values only when
``tuned_for`` matches its own configuration.

Search-space grammar (``tune.search_space`` in params.yaml; typed by the ``*Distribution`` models of
:mod:`uml.config`, so a malformed entry stops the params from loading), one distribution per dotted key::

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

from uml import objectstore
from uml.config import Params, Paths, TrainParams, TuneParams, get_dotted, parse_params
from uml.data.store import open_prepared, shared_copy
from uml.errors import ClusterError, ConfigError
from uml.objectstore import is_uri
from uml.provenance import RunInputs, announce, code_files, select_params, tuning_target
from uml.train.checkpoints import SCORE_KEY
from uml.train.cluster import check_storage_trust, ray_session
from uml.train.preflight import bundle, preflight, scaling_config
from uml.train.trainer import TRAIN_KEYS_NOT_IN_IDENTITY, model_config, run_trainer

log = logging.getLogger(__name__)

TRIAL_DRIVER_MEMORY = 64 * 1024**2  # bytes
# Train keys a trial does not read (it runs tune.epochs; its score comes from the reported
# metrics, whichever epochs are checkpointed) besides those no training run hashes.
TRAIN_KEYS_NOT_IN_SWEEP = ("epochs", "checkpoint_every", *TRAIN_KEYS_NOT_IN_IDENTITY)
# How many trials run at once changes the wall time, not what is searched.
TUNE_KEYS_NOT_IN_IDENTITY = ("max_concurrent_trials",)


# Ray Tune's sampler for each distribution of uml.config's typed search space.
SAMPLERS = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint, "choice": tune.choice}


def build_search_space(params: Params) -> dict[str, Any]:
    """Check ``tune.search_space`` against the params and turn it into Ray Tune sampling objects.

    The distributions themselves were validated with the params file (:mod:`uml.config`). Here
    every key must be an existing, searchable params key, and the extreme values of every
    distribution must pass the params validation, so a sweep can't fail hours in on an
    out-of-range sample.
    """
    space = params.tune.search_space
    if not space:
        raise ConfigError("tune.search_space is empty: name at least one params key to search")
    raw = params.model_dump()
    result: dict[str, Any] = {}
    for key, dist in space.items():
        try:
            get_dotted(raw, key)
        except KeyError:
            raise ConfigError(f"tune.search_space: '{key}' is not a params key (e.g. loss.cls_weight)") from None
        if key.split(".")[0] in ("tune", "ray", "data"):
            raise ConfigError(f"tune.search_space: '{key}' cannot be searched (only model, loss, train and evaluate keys)")
        for value in dist.extremes():
            try:
                params.with_overrides({key: value}, source=f"tune.search_space.{key}")
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{key}: {dist.name} {dist.args!r} reaches an invalid value {value!r}:\n{exc}") from None
        result[key] = SAMPLERS[dist.name](dist.args) if dist.name == "choice" else SAMPLERS[dist.name](*dist.args)
    return result


def max_concurrent(params: Params) -> int:
    """Trials that fit at once: cluster CPUs (or GPUs) over what one trial's workers take."""
    if params.tune.max_concurrent_trials:
        return params.tune.max_concurrent_trials
    total = ray.cluster_resources()
    per_worker = bundle(scaling_config(params, params.tune.workers_per_trial))
    fits = [total.get(name, 0.0) / (amount * params.tune.workers_per_trial) for name, amount in per_worker.items()]
    return max(1, int(math.floor(min(fits)))) if fits else 1


def trial_params(config: dict[str, Any], base: dict[str, Any]) -> Params:
    """A trial's params: the base params with the trial's sampled values, and an epoch of
    ``tune.steps_per_epoch`` steps where that is set."""
    params = parse_params(base, source="tune base params").with_overrides(config, source="tune trial")
    if params.tune.steps_per_epoch is not None:
        params = params.with_overrides({"train.steps_per_epoch": params.tune.steps_per_epoch}, source="tune.steps_per_epoch")
    return params


def _trial(config: dict[str, Any], base: dict[str, Any], experiment: str, model_cfg: dict[str, Any]) -> None:
    """One trial: :func:`trial_params`, trained by the train stage's code for ``tune.epochs``."""
    from uml.models import ModelConfig

    params = trial_params(config, base)
    trial_id = tune.get_context().get_trial_id()
    cfg = ModelConfig.from_dict(model_cfg)
    run_trainer(params, name=f"{experiment}-{trial_id}", model_cfg=cfg, epochs=params.tune.epochs,
                num_workers=params.tune.workers_per_trial, callbacks=[TuneReportCallback()])


def sweep_identity_keys() -> list[str]:
    """The params that determine a sweep's result: they name the sweep and are the tune stage's
    DVC param deps. The trials train with ``tune.workers_per_trial`` workers, so ``ray.num_workers``
    is not among them; the loss values are, as the base of every trial and the baseline."""
    return ["data.augment", "model", "loss",
            *(f"train.{key}" for key in TrainParams.model_fields if key not in TRAIN_KEYS_NOT_IN_SWEEP),
            *(f"tune.{key}" for key in TuneParams.model_fields if key not in TUNE_KEYS_NOT_IN_IDENTITY),
            "ray.use_gpu"]


def sweep_inputs(params: Params, data_hash: str, code: dict[str, str] | None = None) -> RunInputs:
    """Everything that determines a sweep's result (``code``: source path -> sha256, default: read now)."""
    return RunInputs("tune", select_params(params, sweep_identity_keys()), data_hash,
                     code if code is not None else code_files("tune"))


def sweep_name(params: Params, data_hash: str, code: dict[str, str] | None = None) -> str:
    """``tune-<hash>``: the same params, data and code give the same name (and restore)."""
    return sweep_inputs(params, data_hash, code).name


def baseline_values(params: Params, keys: list[str]) -> dict[str, Any]:
    """The values the params file gives the searched keys: the sweep's first trial."""
    raw = params.model_dump()
    return {key: get_dotted(raw, key) for key in keys}


def results_table(result_grid: tune.ResultGrid, keys: list[str], epochs: int, baseline: dict[str, Any]) -> pd.DataFrame:
    """One row per trial: its values, whether they are the baseline's, best and last score, epochs
    reached, status."""
    rows = []
    for result in result_grid:
        history = result.metrics_dataframe
        scores = history[SCORE_KEY].to_numpy(dtype=float) if history is not None and SCORE_KEY in history else np.array([])
        row: dict[str, Any] = {"trial_id": (result.metrics or {}).get("trial_id", Path(result.path).name)}
        row.update({k: result.config.get(k) for k in keys})
        row["baseline"] = all(result.config.get(k) == v for k, v in baseline.items())
        finite = scores[np.isfinite(scores)]
        row["score"] = float(finite.max()) if finite.size else float("nan")
        row["last_score"] = float(scores[-1]) if scores.size else float("nan")
        row["epochs"] = int(scores.size)
        row["status"] = "error" if result.error else ("completed" if scores.size >= epochs else "stopped early")
        rows.append(row)
    return pd.DataFrame(rows)


def select(table: pd.DataFrame, keys: list[str], baseline: dict[str, Any],
           min_improvement: float = 0.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flat values to use and a record of the choice: the best sampled trial when its score
    beats the baseline's by more than ``min_improvement`` (``tune.min_improvement``: a margin for
    the noise of a short trial's validation score), else the baseline values."""
    ok = table[np.isfinite(table["score"])].sort_values("score", ascending=False)
    if ok.empty:
        raise ClusterError("every tune trial failed or reported no score; see the Ray logs above")
    baseline_rows, sampled = ok[ok["baseline"]], ok[~ok["baseline"]]
    baseline_score = float(baseline_rows["score"].max()) if not baseline_rows.empty else None
    best_sampled = sampled.iloc[0] if not sampled.empty else None
    record: dict[str, Any] = {"trials": int(len(table)), "baseline_score": baseline_score,
                              "best_sampled_score": float(best_sampled["score"]) if best_sampled is not None else None}
    margin = f" + {min_improvement:g}" if min_improvement else ""
    if best_sampled is not None and (baseline_score is None or best_sampled["score"] > baseline_score + min_improvement):
        values = {key: _plain(best_sampled[key]) for key in keys}
        record.update(chosen="sampled", trial_id=str(best_sampled["trial_id"]), score=float(best_sampled["score"]),
                      reason="the baseline trial failed" if baseline_score is None else
                      f"trial {best_sampled['trial_id']} beat the baseline ({best_sampled['score']:.4f} > {baseline_score:.4f}{margin})")
    else:
        values = dict(baseline)
        record.update(chosen="baseline", trial_id=str(baseline_rows.iloc[0]["trial_id"]), score=baseline_score,
                      reason="every sampled trial failed" if best_sampled is None else
                      f"no sampled trial beat the baseline (best sampled {best_sampled['score']:.4f} <= {baseline_score:.4f}{margin})")
    return values, record


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"loss.cls_weight": 0.3}`` -> ``{"loss": {"cls_weight": 0.3}}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def write_outputs(table: pd.DataFrame, keys: list[str], paths: Paths, baseline: dict[str, Any],
                  tuned_for: dict[str, Any], min_improvement: float = 0.0) -> dict[str, Any]:
    """results.csv, best_params.yaml and the score-vs-value plot; returns the chosen values (nested
    like params.yaml). ``tuned_for`` is recorded in best_params.yaml as is."""
    paths.tune_dir.mkdir(parents=True, exist_ok=True)
    table = table.sort_values("score", ascending=False, na_position="last").reset_index(drop=True)
    values, selection = select(table, keys, baseline, min_improvement)
    nested = nest(values)
    tmp_csv = paths.tune_results.with_suffix(".csv.tmp")
    table.to_csv(tmp_csv, index=False)
    tmp_csv.replace(paths.tune_results)
    tmp_yaml = paths.best_params.with_suffix(".yaml.tmp")
    tmp_yaml.write_text(
        f"# Tuned values ({selection['chosen']}: {selection['reason']}). train applies the params sections when\n"
        "# train.use_tuned is true and tuned_for matches its model, data, search space and code.\n"
        + yaml.safe_dump({**nested, "selection": selection, "tuned_for": tuned_for}, sort_keys=False))
    tmp_yaml.replace(paths.best_params)
    plot_scores(table, keys, paths.tune_dir / "scores.png", chosen=selection["trial_id"])
    log.info("%s values %s (%s) -> %s", selection["chosen"], values, selection["reason"], paths.best_params)
    return nested


def plot_scores(table: pd.DataFrame, keys: list[str], path: Path, chosen: str) -> None:
    """Validation score against each searched value; the baseline and the chosen trial marked.
    A ``matplotlib.figure.Figure`` of its own, never pyplot (as :mod:`uml.plots`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)
    ok = table[np.isfinite(table["score"])]
    for ax, key in zip(axes[0], keys):
        stopped = ok["status"] != "completed"
        ax.scatter(ok.loc[~stopped, key], ok.loc[~stopped, "score"], label="completed")
        ax.scatter(ok.loc[stopped, key], ok.loc[stopped, "score"], marker="x", label="stopped early")
        base = ok[ok["baseline"]]
        ax.scatter(base[key], base["score"], marker="s", s=80, facecolors="none", edgecolors="black", label="baseline")
        pick = ok[ok["trial_id"] == chosen]
        ax.scatter(pick[key], pick["score"], s=160, facecolors="none", edgecolors="red", label="chosen")
        ax.set(xlabel=key, ylabel="val score")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Tune: validation score per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def sweep(params: Params) -> dict[str, Any]:
    """The ``tune`` stage; returns the best values (nested like params.yaml)."""
    params = params.resolved()
    paths = Paths(params)
    space = build_search_space(params)
    keys = list(space)
    baseline = baseline_values(params, keys)
    data = open_prepared(paths.dataset)
    shared_copy(paths.dataset, paths.shared_dataset)
    cfg = model_config(params, data.class_names, data.mask_classes, data.image_size)
    inputs = sweep_inputs(params, data.content_hash)
    name = inputs.name
    experiment_path = objectstore.join(paths.storage, name) if is_uri(paths.storage) else f"{paths.storage.rstrip('/')}/{name}"
    # Restoring unpickles tuner.pkl and the searcher state from there.
    check_storage_trust(params, Path(experiment_path))
    tp = params.tune
    with ray_session(params):
        preflight(params, tp.workers_per_trial)
        trainable = tune.with_parameters(_trial, base=params.model_dump(), experiment=name, model_cfg=cfg.to_dict())
        # The trial function only waits on its TorchTrainer, whose workers hold the CPUs/GPUs. It
        # asks for a little memory instead (a resource every node has): Tune refuses an empty
        # request, and any CPU fraction would leave the last worker of a full node unplaceable.
        trainable = tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
        restoring = tune.Tuner.can_restore(experiment_path)
        announce(paths.storage, inputs, resumes=restoring, what="sweep")
        if restoring:
            log.info("restoring sweep %s: finished trials are kept, unfinished ones resume", experiment_path)
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            concurrent = max_concurrent(params)
            log.info("sweep %s: %d trials (the baseline %s, then %d sampled) of %d epochs, %d at a time, ASHA grace %d / "
                     "reduction %g, searching %s", name, tp.num_samples, baseline, tp.num_samples - 1, tp.epochs,
                     concurrent, tp.grace_period, tp.reduction_factor, ", ".join(keys))
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=SCORE_KEY,
                    mode="max",
                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=tp.epochs,
                                            grace_period=min(tp.grace_period, tp.epochs), reduction_factor=tp.reduction_factor),
                    # The random-search generator limits concurrency itself (Tune ignores
                    # max_concurrent_trials for it). The baseline replaces its first sample.
                    search_alg=BasicVariantGenerator(random_state=tp.seed, max_concurrent=concurrent,
                                                     points_to_evaluate=[baseline]),
                    num_samples=tp.num_samples,
                ),
                run_config=tune.RunConfig(name=name, storage_path=paths.storage, verbose=1),
            )
        result_grid = tuner.fit()
    table = results_table(result_grid, keys, tp.epochs, baseline)
    errors = [r.error for r in result_grid if r.error]
    if errors:
        log.warning("%d of %d trials failed; first error: %s", len(errors), len(table), errors[0])
    # The code the sweep ran (read when it was named), not what may have been edited since.
    tuned_for = {**tuning_target(params, data.content_hash), "code": inputs.code_fingerprint, "sweep": name}
    best = write_outputs(table, keys, paths, baseline, tuned_for=tuned_for, min_improvement=tp.min_improvement)
    if not paths.ray_storage_uri:
        # The trials' own checkpoints (optimiser state included) are of no further use once the
        # results are written, and they take gigabytes on long sweeps.
        for run_dir in Path(paths.storage).glob(f"{name}-*"):
            shutil.rmtree(run_dir, ignore_errors=True)
    return best
