"""The ``train`` stage: Ray Train's ``TorchTrainer`` over :func:`uml.train.worker.train_loop_per_worker`.

The driver resolves the effective params (the tuned values of ``best_params.yaml``, only when
they were tuned for this model, data, search space and code), names the run from everything that
determines its result (:func:`run_inputs`: the params of :func:`train_identity_keys`, the data
set's content hash and the fingerprint of the code the stage runs), and runs the trainer.
Rerunning after an interruption resumes the same run from its last checkpoint; a change to any of
the three starts a fresh run, and the log says which it is and what changed. The result is
written as ``model.pt``: the best epoch's weights by the published selection score, plus the
config that rebuilds them.

Beside this module: :mod:`uml.train.tuned` (applying ``best_params.yaml``), :mod:`uml.train.live`
(dvclive and ``progress.png``), :mod:`uml.train.checkpoints` (reading checkpoints back) and
:mod:`uml.train.worker` (the loop each worker runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, UserCallback
from ray.train.torch import TorchTrainer

from uml.config import Params, Paths, TrainParams
from uml.data.store import open_prepared, shared_copy
from uml.errors import ClusterError, ConfigError, UMLError
from uml.models import ModelConfig, save_model
from uml.models.config import resolve_config
from uml.provenance import RunInputs, announce, code_files, run_exists, select_params
from uml.train.checkpoints import SCORE_KEY, best_state
from uml.train.cluster import check_storage_trust, ray_session
from uml.train.entry import worker_entry
from uml.train.live import LiveLogger, write_live_log
from uml.train.preflight import preflight, scaling_config
from uml.train.rendezvous import BoundTorchConfig
from uml.train.tuned import effective_params

log = logging.getLogger(__name__)

# TrainParams fields that do not change what is trained: loader processes, how checkpoints are
# uploaded, whether tuned values are used (a run is named by the values it trains with
# instead), and cudnn_benchmark (which of cuDNN's kernels compute the same convolutions on a
# GPU: the results differ by float rounding only, and a run interrupted on one setting resumes
# on the other). Every other train key, including any added later, is part of a run's identity
# (train.checkpoint_every is: the best model is chosen among the checkpointed epochs).
TRAIN_KEYS_NOT_IN_IDENTITY = ("loader_workers", "checkpoint_upload", "use_tuned", "cudnn_benchmark")


def train_identity_keys() -> list[str]:
    """The params that determine a training run's result: they name the run, and they (plus
    ``train.use_tuned``, which acts through the values it selects) are the train stage's DVC
    param deps. Ray addresses, storage, failure budget, collective timeout and per-worker
    resources are not."""
    return ["data.augment", "model", "loss",
            *(f"train.{key}" for key in TrainParams.model_fields if key not in TRAIN_KEYS_NOT_IN_IDENTITY),
            "ray.num_workers", "ray.use_gpu"]


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


def run_trainer(params: Params, *, name: str, model_cfg: ModelConfig, epochs: int,
                callbacks: Sequence[UserCallback] = (), num_workers: int | None = None,
                train_loop: Callable[[dict], None] = worker_entry) -> ray.train.Result:
    """Fit a ``TorchTrainer`` (Ray must be initialised). Reusing ``name`` in the same storage
    resumes that run from its last checkpoint."""
    paths = Paths(params)
    workers = num_workers or params.ray.num_workers
    if params.train.batch_size % workers:
        raise ConfigError(f"train.batch_size ({params.train.batch_size}) is the global batch and must be divisible by the "
                          f"number of training workers ({workers}: ray.num_workers, or tune.workers_per_trial in a sweep)")
    if not paths.ray_storage_uri:
        paths.ray_storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        # Python-mode dump: strict validation in the workers must get back the same types (a JSON
        # dump would turn data.mask_values' int keys into strings).
        train_loop_config={"params": params.model_dump(), "model": model_cfg.to_dict(),
                           "store": paths.shared_dataset, "epochs": epochs},
        # The DDP rendezvous store listens on rank 0's node address only (Ray's TorchConfig
        # leaves it on every interface).
        torch_config=BoundTorchConfig(backend="nccl" if params.ray.use_gpu else "gloo",
                                      timeout_s=params.ray.collective_timeout_s),
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


def train(params: Params) -> Path:
    """The ``train`` stage: write ``data/models/model.pt``; return its path."""
    params = params.resolved()
    paths = Paths(params)
    check_storage_trust(params)
    data = open_prepared(paths.dataset)
    shared_copy(paths.dataset, paths.shared_dataset)
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
        preflight(params, params.ray.num_workers)
        try:
            result = run_trainer(params, name=name, model_cfg=cfg, epochs=params.train.epochs,
                                 callbacks=[LiveLogger(paths.train_dir, logged_params)])
        except ray.train.TrainingFailedError as exc:
            raise ClusterError(f"training run '{name}' failed: {exc}") from exc
    from uml.models import UMLNet

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
