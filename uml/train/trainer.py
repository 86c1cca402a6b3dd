"""The ``train`` stage: Ray Train's ``TorchTrainer`` over :func:`uml.train.worker.train_loop_per_worker`.

The driver resolves the effective params (the tuned values of ``best_params.yaml``, only when
they were tuned for this model, data, search space and code), names the run from everything that
determines its result (:func:`run_inputs`: the params of :func:`train_identity_keys`, the data
set's content hash and the fingerprint of the code the stage runs), and runs the trainer.
Rerunning after an interruption resumes the same run from its last checkpoint; a change to any of
the three starts a fresh run, and the log says which it is and what changed. The result is
written as ``model.pt``: the best epoch's weights by the published selection score, plus the
config that rebuilds them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import yaml
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from uml.config import Params, Paths, TrainParams
from uml.data.store import open_prepared
from uml.errors import ClusterError, ConfigError, UMLError
from uml.models import ModelConfig, UMLNet, save_model
from uml.models.config import resolve_config
from uml.provenance import RunInputs, announce, code_files, flatten, run_exists, select_params, tuning_mismatch, tuning_target
from uml.train.cluster import alive_nodes, check_storage, check_storage_trust, ray_session
from uml.train.rendezvous import BoundTorchConfig
from uml.train.worker import HISTORY_FILE, SCORE_KEY, STATE_FILE, train_loop_per_worker

log = logging.getLogger(__name__)

# TrainParams fields that do not change what is trained: loader processes, and whether tuned
# values are used (a run is named by the values it trains with instead). Every other train key,
# including any added later, is part of a run's identity.
TRAIN_KEYS_NOT_IN_IDENTITY = ("loader_workers", "use_tuned")
# Top-level keys of best_params.yaml that describe the values rather than being params sections.
TUNED_META_KEYS = ("tuned_for", "selection")


def train_identity_keys() -> list[str]:
    """The params that determine a training run's result: they name the run, and they (plus
    ``train.use_tuned``, which acts through the values it selects) are the train stage's DVC
    param deps. Ray addresses, storage, failure budget and per-worker resources are not."""
    return ["data.augment", "model", "loss",
            *(f"train.{key}" for key in TrainParams.model_fields if key not in TRAIN_KEYS_NOT_IN_IDENTITY),
            "ray.num_workers", "ray.use_gpu"]


def load_tuned(path: Path) -> tuple[dict[str, Any], Any]:
    """The flat overrides of a ``best_params.yaml`` (same keys as ``params.yaml``) and its
    ``tuned_for`` record (None when the file has none)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read tuned params: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of params sections (e.g. loss: {{cls_weight: ...}})")
    values = {key: value for key, value in raw.items() if key not in TUNED_META_KEYS}
    if not values:
        raise ConfigError(f"{path}: holds no tuned values (expected params sections such as loss: {{cls_weight: ...}})")
    return flatten(values), raw.get("tuned_for")


def effective_params(params: Params, data_hash: str) -> tuple[Params, dict[str, Any]]:
    """Params with the tuned values applied when ``train.use_tuned``, the sweep has run, and its
    ``best_params.yaml`` was tuned for this model, data (``data_hash``), search space and code.
    Otherwise a warning says why, and the params are used as written.

    Returns the params and the overrides that were applied (empty when none)."""
    paths = Paths(params)
    if not params.train.use_tuned:
        return params, {}
    if not paths.best_params.is_file():
        log.warning("train.use_tuned is true but %s does not exist (run the tune stage first); "
                    "using the params as written", paths.best_params)
        return params, {}
    overrides, tuned_for = load_tuned(paths.best_params)
    mismatch = tuning_mismatch(tuned_for, tuning_target(params, data_hash))
    if mismatch:
        log.warning("not using the tuned values of %s: %s. Using the params as written; run the tune stage for "
                    "this configuration, or set train.use_tuned: false to silence this", paths.best_params, mismatch)
        return params, {}
    tuned = params.with_overrides(overrides, source=str(paths.best_params))
    log.info("using tuned values from %s: %s", paths.best_params, ", ".join(f"{k}={v}" for k, v in overrides.items()))
    return tuned, overrides


def model_config(params: Params, class_names: Sequence[str], mask_classes: Sequence[str], image_size: int) -> ModelConfig:
    """The architecture from ``model:`` plus what the data set decides (classes, image size)."""
    return resolve_config(params.model.preset, **params.model.overrides(), num_classes=len(class_names),
                          num_mask_classes=len(mask_classes), image_size=image_size)


def run_inputs(params: Params, data_hash: str, code: Mapping[str, str] | None = None) -> RunInputs:
    """Everything that determines a training run's result: the params of
    :func:`train_identity_keys`, the data's content hash, and the train stage's source files
    (``code``: path -> sha256; default: read now)."""
    return RunInputs("train", select_params(params, train_identity_keys()), data_hash,
                     dict(code) if code is not None else code_files("train"))


def run_name(params: Params, data_hash: str, code: Mapping[str, str] | None = None) -> str:
    """``train-<hash>``: the same params, data and code give the same name (and resume)."""
    return run_inputs(params, data_hash, code).name


def scaling_config(params: Params, num_workers: int | None = None) -> ScalingConfig:
    resources = dict(params.ray.resources_per_worker)
    if params.ray.use_gpu:
        resources.setdefault("GPU", 1)
    return ScalingConfig(num_workers=num_workers or params.ray.num_workers, use_gpu=params.ray.use_gpu,
                         resources_per_worker=resources)


def read_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, float]]:
    """The per-epoch metrics stored beside a checkpoint (read without fetching the weights)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{HISTORY_FILE}") as stream:
        return json.loads(stream.read().decode())


class LiveLogger(UserCallback):
    """dvclive metrics + an nnU-Net style progress plot, written on the driver's node.

    Ray Train runs callbacks in its controller, which it places on the node of the driver, so
    the files land where ``dvc repro`` runs, whichever node holds rank 0. Each report rewrites
    the log from the checkpoint's full history, so a resumed run still has every epoch.
    """

    def __init__(self, out_dir: Path, params_to_log: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.params_to_log = params_to_log

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is None:
            return
        write_live_log(self.out_dir, read_history(checkpoint), self.params_to_log)


def write_live_log(out_dir: Path, history: list[dict[str, float]], params_to_log: dict[str, Any]) -> None:
    """(Re)write dvclive's metrics/plots and ``progress.png`` from the per-epoch history."""
    from dvclive import Live

    out_dir.mkdir(parents=True, exist_ok=True)
    with Live(dir=str(out_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None) as live:
        live.log_params(params_to_log)
        for row in history:
            live.step = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and not math.isnan(value):
                    live.log_metric(key, value, plot=True)
            live.next_step()
    plot_progress(history, out_dir / "progress.png")


def plot_progress(history: list[dict[str, float]], path: Path) -> None:
    """Losses and validation metrics against the epoch, best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) + 1 for r in history]  # 1-based, as the progress lines
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train/loss", "-"), ("train/loss_cls", "--"), ("train/loss_seg", "--"), ("train/loss_mut", ":")):
        if key in history[0]:
            ax_loss.plot(epochs, [r[key] for r in history], style, label=key.removeprefix("train/"))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_loss.legend()
    for key in sorted(history[0]):
        if key.startswith("val/") and key != "val/score":
            ax_val.plot(epochs, [r[key] for r in history], label=key.removeprefix("val/"))
    scores = [r.get(SCORE_KEY, float("nan")) for r in history]
    ax_val.plot(epochs, scores, "k-", linewidth=2, label="score")
    if any(not math.isnan(s) for s in scores):
        best = max(range(len(scores)), key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])
        ax_val.axvline(epochs[best], color="grey", linestyle=":", label=f"best (epoch {epochs[best]})")
    ax_val.set(xlabel="epoch", ylabel="value", title="Validation", ylim=(0, 1.02))
    ax_val.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def run_trainer(params: Params, *, name: str, model_cfg: ModelConfig, epochs: int,
                callbacks: Sequence[UserCallback] = (), num_workers: int | None = None,
                train_loop: Callable[[dict], None] = train_loop_per_worker) -> ray.train.Result:
    """Fit a ``TorchTrainer`` (Ray must be initialised). Reusing ``name`` in the same storage
    resumes that run from its last checkpoint."""
    paths = Paths(params)
    workers = num_workers or params.ray.num_workers
    if params.train.batch_size % workers:
        raise ConfigError(f"train.batch_size ({params.train.batch_size}) is the global batch and must be divisible by the "
                          f"number of training workers ({workers}: ray.num_workers, or tune.workers_per_trial in a sweep)")
    check_storage(params, alive_nodes())
    if not paths.ray_storage_uri:
        paths.ray_storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        # Python-mode dump: strict validation in the workers must get back the same types (a JSON
        # dump would turn data.mask_values' int keys into strings).
        train_loop_config={"params": params.model_dump(), "model": model_cfg.to_dict(),
                           "store": str(paths.dataset), "epochs": epochs},
        # The DDP rendezvous store listens on rank 0's node address only (Ray's TorchConfig
        # leaves it on every interface).
        torch_config=BoundTorchConfig(backend="nccl" if params.ray.use_gpu else "gloo"),
        scaling_config=scaling_config(params, num_workers),
        run_config=RunConfig(
            name=name,
            storage_path=paths.storage,
            failure_config=FailureConfig(max_failures=params.ray.max_failures),
            # Ray always keeps the latest checkpoint (for resume) besides the best one.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE_KEY,
                                               checkpoint_score_order="max"),
            callbacks=list(callbacks),
            # Ray Train's own INFO logs repeat every reported metric dict; our workers log a line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()


def best_state(result: ray.train.Result) -> tuple[dict[str, torch.Tensor], list[dict[str, float]], dict[str, float]]:
    """Weights of the best epoch, the full history (from the latest checkpoint) and best metrics."""
    best = result.get_best_checkpoint(SCORE_KEY, "max") or result.checkpoint
    if best is None:
        raise UMLError(f"training run '{result.path}' produced no checkpoint")
    with best.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    history = read_history(result.checkpoint) if result.checkpoint else state["history"]
    best_row = next(r for r in state["history"] if int(r["epoch"]) == int(state["epoch"]))
    return state["model"], history, best_row


def train(params: Params) -> Path:
    """The ``train`` stage: write ``data/models/model.pt``; return its path."""
    params = params.resolved()
    paths = Paths(params)
    check_storage_trust(params)
    data = open_prepared(paths.dataset)
    params, tuned = effective_params(params, data.content_hash)
    cfg = model_config(params, data.class_names, data.mask_classes, data.image_size)
    inputs = run_inputs(params, data.content_hash)
    name = inputs.name
    announce(paths.storage, inputs, resumes=run_exists(paths.storage, name))
    logged_params = {"loss": params.loss.model_dump(), "tuned_from": str(paths.best_params) if tuned else None,
                     "model": cfg.to_dict(), "train": params.train.model_dump(), "run": name,
                     "workers": params.ray.num_workers}
    log.info("run '%s' in %s: %d epochs, %d worker(s), preset %s, loss weights cls %.3g seg %.3g mut %.3g, KL annealing %d",
             name, paths.storage, params.train.epochs, params.ray.num_workers, params.model.preset,
             params.loss.cls_weight, params.loss.seg_weight, params.loss.mut_weight, params.loss.kl_annealing_epochs)
    with ray_session(params):
        try:
            result = run_trainer(params, name=name, model_cfg=cfg, epochs=params.train.epochs,
                                 callbacks=[LiveLogger(paths.train_dir, logged_params)])
        except ray.train.TrainingFailedError as exc:
            raise ClusterError(f"training run '{name}' failed: {exc}") from exc
    state_dict, history, best_row = best_state(result)
    if len(history) < params.train.epochs:
        raise UMLError(f"run '{name}' stopped after {len(history)} of {params.train.epochs} epochs")
    model = UMLNet(cfg)
    model.load_state_dict(state_dict)
    # The driver writes the final log too: a run that was already complete reports nothing new.
    write_live_log(paths.train_dir, history, logged_params)
    save_model(model, paths.model_pt, extra={
        "class_names": list(data.class_names), "mask_classes": list(data.mask_classes),
        "data_hash": data.content_hash, "code_fingerprint": inputs.code_fingerprint, "run": name,
        "best_epoch": int(best_row["epoch"]),
        "best_metrics": {k: float(v) for k, v in best_row.items() if isinstance(v, (int, float))},
        "loss": params.loss.model_dump(), "tuned": tuned,
    })
    log.info("best epoch %d of %d (val score %.4f) -> %s", int(best_row["epoch"]) + 1, len(history),
             best_row.get(SCORE_KEY, float("nan")), paths.model_pt)
    return paths.model_pt
