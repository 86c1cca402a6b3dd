"""The training loop that every Ray Train worker runs (nanoGPT-plain: one loop, one resume path).

Per epoch: train on this worker's shard (DDP, gradients all-reduced), validate on a disjoint
share of the validation split, gather the predictions, compute the same metrics on every rank,
and ``ray.train.report`` them. Every ``train.checkpoint_every`` epochs and at the last, rank 0
attaches a checkpoint holding everything needed to continue: model, optimiser, LR scheduler, grad
scaler, epoch and the metric history (uploaded in the background with
``train.checkpoint_upload: async``). Randomness (dropout, shuffling, augmentation) is reseeded
from ``(seed, epoch, rank)`` at every epoch. So a resumed run draws exactly the numbers that an
uninterrupted run would have drawn, without saving RNG state.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from uml import metrics
from uml.config import Params, parse_params
from uml.data.dataset import EpochSampler, SegClsDataset, StepSampler, to_model_input, worker_init_fn
from uml.data.store import open_prepared
from uml.losses import kl_annealing, uml_loss
from uml.models import ModelConfig, UMLNet
from uml.train.checkpoints import HISTORY_FILE, SCORE_KEY, STATE_FILE
from uml.train.schedule import build_scheduler

# Ray Train tees print() in workers to stdout and to the root logger (two copies); log instead.
log = logging.getLogger("uml.train")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One torch seed per (seed, epoch, rank), so resume replays the same random stream."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def selection_score(val: dict[str, float]) -> float:
    """The published model-selection score ``(ACC + F1 + Dice_disc + Dice_cup) / 4``, restricted to
    the terms a single-task model has (and to the structures of non-fundus masks)."""
    terms = [val[k] for k in sorted(val) if k in ("cls/acc", "cls/f1") or k.startswith("seg/dice_")]
    terms = [t for t in terms if not math.isnan(t)]
    return float(np.mean(terms)) if terms else float("nan")


def replica_drift(model: torch.nn.Module) -> float:
    """Largest difference between ranks of per-tensor parameter checksums (0 when DDP keeps the
    replicas identical, as it must): two small all-reduces, once per epoch."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0.0
    with torch.no_grad():
        sums = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()]).flatten()
        high, low = sums.clone(), sums.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).abs().max())


def validation_share(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's disjoint share of the validation split (the shares cover it exactly)."""
    return indices[rank::world]


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX on x86, the BF16 extension on
    Arm), read from ``/proc/cpuinfo``. oneDNN also runs bf16 on plain AVX-512 CPUs, emulated and
    slower than fp32, so its own check is not enough. False where the flags cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device``, or None for fp32.

    GPUs: bf16 or fp16 as asked. CPUs: bf16 only where it is native (measured on an AVX512-BF16
    CPU: 1.49x the fp32 training throughput of the small preset, 1.92x with channels-last;
    ``benchmarks/train_speed.py``); fp16 never (no fast CPU kernels).
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.bfloat16 if precision == "bf16" and cpu_has_native_bf16() else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _unwrap(model: torch.nn.Module) -> UMLNet:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# The classification metrics of a validation row (the evaluation stage computes them all): the
# selection score's, and how well calibrated the class output is as training goes on.
VALIDATION_CLASSIFICATION_METRICS = ("acc", "auc", "f1", "nll", "brier", "ece")
# Pixels per validation image kept for the pixel-error AUROCs (a fixed, seeded sample).
VALIDATION_PIXELS_PER_IMAGE = 2048


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    # A rank whose share is empty contributes an empty 1-D array, which the others' (n, K) class
    # probabilities cannot be joined with.
    filled = [p for p in parts if p.size]
    return np.concatenate(filled) if filled else np.zeros(0)


def loader_options(workers: int, device: torch.device, seed: int) -> dict[str, Any]:
    """DataLoader settings shared by the training and validation loaders: ``workers`` processes
    that persist across epochs (the default re-forks them at every epoch; each re-opens the store
    lazily, see :mod:`uml.data.dataset`), and page-locked batches for a GPU, so that the
    host-to-device copy can run asynchronously. Each worker keeps torch's default of two batches
    in flight; Ray Train's loader wrapper copies one more batch to the GPU ahead of the step.

    With workers, the loader draws their base seed from its own generator (seeded with
    ``seed``): from torch's global one it would draw at the first epoch of a process only
    (persistent workers are not re-seeded), so a resumed run's dropout would be shifted by one
    draw against the uninterrupted run's. Without workers the loader draws from the global
    generator at every epoch, in a resumed run as in an uninterrupted one, and the numbers of
    the runs before persistent workers stay as they were."""
    return {"num_workers": workers, "worker_init_fn": worker_init_fn, "persistent_workers": workers > 0,
            "pin_memory": device.type == "cuda",
            "generator": torch.Generator().manual_seed(seed) if workers > 0 else None}


def validation_loader(store: str, indices: np.ndarray, rank: int, world: int, batch_size: int, workers: int,
                      device: torch.device) -> DataLoader:
    """A loader over this rank's share of the validation split (:func:`validation_share`), read
    in order, built once and used at every epoch."""
    dataset = SegClsDataset(store, validation_share(indices, rank, world))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(workers, device, rank))


@torch.no_grad()
def validate(model: UMLNet, loader: DataLoader, mask_classes: list[str], device: torch.device,
             dtype: torch.dtype | None = None) -> dict[str, float]:
    """Validation metrics over the validation split, each worker reading its disjoint share
    through ``loader`` (:func:`validation_loader`).

    The per-image results are gathered to every rank, so all ranks report identical metrics, all
    from :mod:`uml.metrics` as in the evaluation stage (with the data set's declared positive
    class), on the uncalibrated outputs (temperatures of 1):

    - :func:`uml.metrics.task_metrics`: classification (with NLL, Brier and ECE), Dice, and the
      mean class and pixel uncertainties of the deployment outputs (``1 - max p``, the entropy of
      the delivered mask) and, under ``raw/``, of the paper's ``u`` and ``U``;
    - ``unc/error_auroc`` and ``raw/unc/error_auroc``: the class uncertainties against errors;
    - ``unc/pixel_error_auroc`` and ``raw/unc/pixel_error_auroc``: the pixel maps against wrong
      pixels, on :data:`VALIDATION_PIXELS_PER_IMAGE` pixels per image drawn with a generator seeded
      by the image's index (the same pixels at every epoch and on any number of ranks).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    dataset: SegClsDataset = loader.dataset
    rows: dict[str, list] = {name: [] for name in ("label", "prob", "class_unc", "class_unc_raw", "pixel_unc",
                                                   "pixel_unc_raw", "sample_unc", "sample_unc_raw", "sample_error")}
    seg_rows: list[dict[str, np.ndarray]] = []
    model.eval()
    for batch in loader:
        with _autocast(device, dtype):
            out = model.infer(to_model_input(batch["image"], device))
        rows["label"].append(batch["label"].numpy())
        if "class_prob" in out:
            rows["prob"].append(out["class_prob"].float().cpu().numpy())
            # float64 from here on: means over float32 values would depend on how ranks split the set.
            rows["class_unc"].append(out["class_uncertainty"].double().cpu().numpy()[:, 0])
            rows["class_unc_raw"].append(out["class_uncertainty_raw"].double().cpu().numpy()[:, 0])
        if "seg_prob" in out:
            # Per-image values and a pixel sample, not masks, cross the ranks.
            pred_masks = out["seg_prob"].argmax(1).cpu().numpy().astype(np.uint8)
            gt_masks = batch["mask"].numpy()
            seg_rows.append(metrics.segmentation_per_image(pred_masks, gt_masks, mask_classes, distances=False))
            maps = {"sample_unc": out["seg_uncertainty"].float()[:, 0].cpu().numpy(),
                    "sample_unc_raw": out["seg_uncertainty_raw"].float()[:, 0].cpu().numpy()}
            rows["pixel_unc"].append(maps["sample_unc"].mean(axis=(1, 2), dtype=np.float64))
            rows["pixel_unc_raw"].append(maps["sample_unc_raw"].mean(axis=(1, 2), dtype=np.float64))
            for j, index in enumerate(batch["index"].numpy()):
                sampled = metrics.sample_pixels(VALIDATION_PIXELS_PER_IMAGE, np.random.default_rng(int(index)),
                                                sample_unc=maps["sample_unc"][j], sample_unc_raw=maps["sample_unc_raw"][j],
                                                sample_error=pred_masks[j] != gt_masks[j])
                for name, values in sampled.items():
                    rows[name].append(values)
    local = {k: _concat(v) for k, v in rows.items()}
    local["seg"] = {k: _concat([r[k] for r in seg_rows]) for k in (seg_rows[0] if seg_rows else {})}
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        # A rank whose share is empty has no segmentation keys: take them from any rank that has.
        seg_keys = next((list(g["seg"]) for g in gathered if g["seg"]), [])
        local = {k: _concat([g[k] for g in gathered]) for k in rows}
        local["seg"] = {k: _concat([g["seg"].get(k, np.zeros(0)) for g in gathered]) for k in seg_keys}
    has_cls, has_seg = local["prob"].size > 0, bool(local["seg"])
    prob = local["prob"].reshape(len(local["label"]), -1) if has_cls else None
    result = metrics.task_metrics(
        local["label"], prob, local["seg"] or None, positive=dataset.positive_class,
        classification=VALIDATION_CLASSIFICATION_METRICS,
        class_uncertainty=local["class_unc"] if has_cls else None,
        pixel_uncertainty=local["pixel_unc"] if has_seg else None,
    )
    raw = metrics.task_metrics(local["label"], None, None, positive=dataset.positive_class,
                               class_uncertainty=local["class_unc_raw"] if has_cls else None,
                               pixel_uncertainty=local["pixel_unc_raw"] if has_seg else None)
    result.update({f"raw/{key}": value for key, value in raw.items()})
    if has_cls:
        error = metrics.predicted_class(prob) != local["label"]
        result["unc/error_auroc"] = metrics.error_auroc(local["class_unc"], error)
        result["raw/unc/error_auroc"] = metrics.error_auroc(local["class_unc_raw"], error)
    if has_seg:
        result["unc/pixel_error_auroc"] = metrics.error_auroc(local["sample_unc"], local["sample_error"])
        result["raw/unc/pixel_error_auroc"] = metrics.error_auroc(local["sample_unc_raw"], local["sample_error"])
    result["score"] = selection_score(result)
    return result


@dataclass
class TrainingState:
    """Everything a checkpoint holds and a resume restores: the model (DDP-wrapped), optimiser,
    LR scheduler, grad scaler, and the metric rows of the epochs done."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def net(self) -> UMLNet:
        """The model without its DDP wrapper (what is saved, loaded and validated)."""
        return _unwrap(self.model)


@dataclass
class WorkerData:
    """This worker's training shard (a loader over it) and the validation split."""

    train_set: SegClsDataset
    sampler: EpochSampler
    loader: DataLoader
    batch_size: int  # per worker: train.batch_size / world
    val_loader: DataLoader  # this rank's share of the validation split
    mask_classes: list[str]


def configure_worker(params: Params) -> tuple[int, int, torch.device]:
    """This worker's rank, the world size and the device; torch uses the worker's CPUs, and on a
    GPU cuDNN benchmarks its convolution algorithms when ``train.cudnn_benchmark`` (left alone on
    a CPU, where it has no effect)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = int(params.ray.resources_per_worker.get("CPU", 1))
    torch.set_num_threads(max(threads, 1))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = params.train.cudnn_benchmark
    return rank, world, device


def build_state(params: Params, model_cfg: dict[str, Any], epochs: int, device: torch.device) -> TrainingState:
    """A fresh model prepared for DDP, with its optimiser, the LR schedule over ``epochs`` and the
    grad scaler (active for fp16 on GPUs only)."""
    tp = params.train
    torch.manual_seed(tp.seed)  # identical initial weights on every rank
    model = UMLNet(ModelConfig.from_dict(model_cfg))
    if tp.channels_last:
        # oneDNN's (and cuDNN's) preferred layout for convolutions: 1.28x on this CPU.
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    scheduler = build_scheduler(optimizer, epochs, tp.constant_epochs, tp.poly_power, tp.lr, tp.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and tp.precision == "fp16")
    return TrainingState(model, optimizer, scheduler, scaler)


def save_state(state: TrainingState, epoch: int, directory: Path) -> None:
    """Write what continuing after ``epoch`` needs to ``directory``: :data:`STATE_FILE`, and the
    history alone as :data:`HISTORY_FILE` (the driver reads it without fetching the weights)."""
    torch.save({
        "epoch": epoch,
        "model": state.net.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "history": state.history,
    }, directory / STATE_FILE)
    (directory / HISTORY_FILE).write_text(json.dumps(state.history))


def load_state(state: TrainingState, directory: Path) -> int:
    """Restore ``state`` from a directory :func:`save_state` wrote; returns the next epoch to run.

    The file is read onto the CPU and each ``load_state_dict`` copies onto the device of what it
    fills: the weights and Adam's moments follow the parameters, while Adam's ``step`` counters
    stay on the CPU, where a fresh optimiser keeps them (with ``capturable=False`` Adam reads the
    counter with ``.item()`` at every step: a blocking sync per parameter if it lived on a GPU, as
    ``map_location=<device>`` would put it).
    """
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    state.net.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    state.history = saved["history"]
    return int(saved["epoch"]) + 1


def open_worker_data(params: Params, store: str, rank: int, world: int, device: torch.device) -> WorkerData:
    """The training loader over this rank's shard of the train split, and the validation loader
    over its share of the validation split; both with ``train.loader_workers`` persistent workers."""
    tp = params.train
    data = open_prepared(store)
    if rank == 0:
        log.info("reading the prepared store %r", data)
    train_idx, val_idx = data.split("train"), data.split("val")
    if tp.max_val_images:
        val_idx = val_idx[: tp.max_val_images]
    mask_classes = list(data.mask_classes)
    del data  # workers re-open lazily; no handle crosses a fork
    train_set = SegClsDataset(store, train_idx, augment=params.data.augment, seed=tp.seed)
    # train.batch_size is the global batch; the driver checked that the workers divide it.
    batch_size = tp.batch_size // world
    # Our own DistributedSampler (Ray keeps a sampler that is already distributed) so that the
    # shuffle follows train.seed; its keys carry the epoch (or pass) to the persistent workers'
    # copies of the dataset. train.steps_per_epoch: a fixed number of batches per epoch from a
    # stream of passes; null: one pass per epoch, the shards padded to equal length as DDP needs.
    sampler: EpochSampler
    if tp.steps_per_epoch is None:
        sampler = EpochSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=tp.seed, drop_last=False)
    else:
        sampler = StepSampler(train_set, num_replicas=world, rank=rank, seed=tp.seed, batch_size=batch_size,
                              steps=tp.steps_per_epoch)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                        **loader_options(tp.loader_workers, device, epoch_seed(tp.seed, 0, rank)))
    # A fixed number of steps always has batches to draw: still refuse a split that cannot fill one.
    if len(loader) == 0 or (tp.steps_per_epoch is not None and len(train_idx) < tp.batch_size):
        raise ValueError(
            f"the training split ({len(train_idx)} images over {world} workers) is smaller than one global batch of "
            f"train.batch_size={tp.batch_size}: lower the batch size"
        )
    val_loader = validation_loader(store, val_idx, rank, world, batch_size, tp.loader_workers, device)
    return WorkerData(train_set, sampler, ray.train.torch.prepare_data_loader(loader), batch_size, val_loader,
                      mask_classes)


# Rank 0 logs a progress line within an epoch at most this often (seconds).
PROGRESS_SECONDS = 30.0


def format_progress(epoch: int, epochs: int | None, steps: int, total: int, images_per_second: float,
                    loss: float) -> str:
    """One progress line within an epoch (``epoch`` counted from 0)."""
    of = f"/{epochs}" if epochs else ""
    return (f"epoch {epoch + 1:>3}{of}  step {steps}/{total}  {images_per_second:.1f} img/s  "
            f"loss {loss:.3f} (running mean, rank 0)")


def train_one_epoch(state: TrainingState, data: WorkerData, params: Params, epoch: int, rank: int,
                    device: torch.device, dtype: torch.dtype | None,
                    epochs: int | None = None) -> tuple[dict[str, float], float, int]:
    """One epoch on this rank's shard (one pass over it, or ``train.steps_per_epoch`` batches
    from its sampler), then one LR scheduler step.

    Dropout, shuffling and augmentation are reseeded from ``(train.seed, epoch, rank)`` first, so a
    resumed run draws what an uninterrupted one would have. Returns this rank's mean losses
    (``train/loss``, ``train/loss_<part>``), the learning rate the epoch ran at and the steps taken.

    Rank 0 logs a progress line (steps done of the epoch's, images/s over all ranks, its running
    mean loss) every :data:`PROGRESS_SECONDS`. The losses are summed on the device and read back
    only when a line is logged: a step costs no host sync and nothing crosses the ranks for it.
    ``epochs`` (the run's length) is only shown.
    """
    channels_last = params.train.channels_last
    torch.manual_seed(epoch_seed(params.train.seed, epoch, rank))
    data.sampler.set_epoch(epoch)
    data.train_set.set_epoch(epoch, rank)
    model, evidential = state.model, state.net.evidential
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    total = len(data.loader)
    images_per_step = data.batch_size * data.sampler.num_replicas
    started = last_line = time.perf_counter()
    for batch in data.loader:
        # uint8 in the batch (Ray Train's loader has already copied it to a GPU); float on the device.
        images = to_model_input(batch["image"], device, channels_last)
        masks = batch["mask"].to(device, non_blocking=True).long()
        labels = batch["label"].to(device, non_blocking=True)
        with _autocast(device, dtype):
            outputs = model(images)
        loss, parts = uml_loss(outputs, masks, labels, params.loss, epoch, evidential)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        for key, value in {"total": loss.detach(), **parts}.items():
            sums[key] = sums.get(key, 0.0) + value.float()
        steps += 1
        if rank == 0 and steps < total and time.perf_counter() - last_line >= PROGRESS_SECONDS:
            # The line's one read-back: it waits for the device, so the rate below is what it did.
            running = float(sums["total"]) / steps
            last_line = time.perf_counter()
            log.info(format_progress(epoch, epochs, steps, total, steps * images_per_step / (last_line - started),
                                     running))
    lr = state.optimizer.param_groups[0]["lr"]
    state.scheduler.step()
    losses = {f"train/loss_{k}" if k != "total" else "train/loss": float(v) / max(steps, 1) for k, v in sums.items()}
    return losses, lr, steps


def mean_over_ranks(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (one all-reduce); as is for a single worker."""
    if world == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], device=device)
    dist.all_reduce(tensor)
    return {k: float(v) / world for k, v in zip(keys, tensor.tolist())}


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    """Whether ``epoch`` (counted from 0) saves a checkpoint: every ``every``-th and the last."""
    return (epoch + 1) % every == 0 or epoch == epochs - 1


def report_epoch(state: TrainingState, row: dict[str, float], epochs: int, rank: int,
                 params: Params) -> None:
    """``ray.train.report`` the epoch's row from every rank; on the epochs of
    ``train.checkpoint_every`` (and the last) rank 0 attaches a checkpoint.

    ``train.checkpoint_upload: async`` hands the checkpoint to Ray Train's background upload
    (``CheckpointUploadMode.ASYNC``): the state is written to a local folder now, Ray copies it
    to ``ray.storage_path`` while the next epoch trains and then deletes the folder; the reports
    still reach the driver in order, and the run waits for the last upload before it ends.
    """
    tp = params.train
    mode = ray.train.CheckpointUploadMode.ASYNC if tp.checkpoint_upload == "async" else ray.train.CheckpointUploadMode.SYNC
    epoch = int(row["epoch"])
    if rank == 0:
        log.info(format_epoch(row, epochs))
    if rank != 0 or not checkpoint_due(epoch, epochs, tp.checkpoint_every):
        ray.train.report(row, checkpoint=None, checkpoint_upload_mode=mode)
        return
    if mode is ray.train.CheckpointUploadMode.SYNC:
        with tempfile.TemporaryDirectory(prefix="uml-checkpoint-") as tmp:
            save_state(state, epoch, Path(tmp))
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_upload_mode=mode)
        return
    # Outlives this call: Ray deletes it after the background upload.
    directory = Path(tempfile.mkdtemp(prefix="uml-checkpoint-"))
    save_state(state, epoch, directory)
    ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(str(directory)), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``params`` (raw dict, already tuned), ``model`` (the
    ModelConfig dict), ``store`` (absolute path of dataset.zarr), ``epochs``."""
    params: Params = parse_params(config["params"], source="train config")
    log.setLevel(logging.INFO)
    _quiet_report_logging()
    tp = params.train
    rank, world, device = configure_worker(params)
    epochs = int(config["epochs"])
    state = build_state(params, config["model"], epochs, device)
    dtype = autocast_dtype(device, tp.precision)
    if rank == 0:
        log.info("training in %s on %s%s%s", "fp32" if dtype is None else str(dtype).removeprefix("torch."), device.type,
                 " (this CPU has no native bf16: fp32)" if dtype is None and tp.precision == "bf16" and device.type == "cpu" else "",
                 " with cudnn.benchmark" if device.type == "cuda" and torch.backends.cudnn.benchmark else "")
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            start_epoch = load_state(state, Path(ckpt_dir))
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d (%d/%d epochs done)", start_epoch, start_epoch, epochs)
    data = open_worker_data(params, config["store"], rank, world, device)

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        losses, lr, steps = train_one_epoch(state, data, params, epoch, rank, device, dtype, epochs=epochs)
        # The gradients are already averaged over the ranks; the logged losses are averaged here.
        losses = mean_over_ranks(losses, world, device)
        drift = replica_drift(state.model)
        if drift > 1e-6 and rank == 0:
            log.warning("DDP replicas diverged: parameter checksums differ by %.3g across ranks", drift)
        val = validate(state.net, data.val_loader, data.mask_classes, device, dtype)
        row = {
            "epoch": epoch,
            **losses,
            **{f"val/{k}": v for k, v in val.items()},
            "lr": lr,
            "ddp/param_drift": drift,
            "kl_weight": kl_annealing(epoch, params.loss.kl_annealing_epochs),
            "epoch_seconds": time.perf_counter() - started,
            "images_per_second": steps * data.batch_size * world / (time.perf_counter() - started),
        }
        state.history.append(row)
        report_epoch(state, row, epochs, rank, params)


def _quiet_report_logging() -> None:
    """Ray Train logs every reported metrics dict at INFO, through a logger named after its source
    file that RunConfig's LoggingConfig does not reach; our workers log one line per epoch."""
    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # a Ray release without that module does not have the noise either
        return
    ray_context.logger.setLevel(logging.WARNING)


def format_epoch(row: dict[str, float], epochs: int) -> str:
    """One progress line per epoch."""
    keys = [("train/loss", "loss"), ("val/cls/acc", "acc"), ("val/cls/auc", "auc"), ("val/cls/ece", "ece"),
            ("val/seg/dice_disc", "disc"), ("val/seg/dice_cup", "cup"), ("val/raw/unc/mean_class_uncertainty", "u"),
            ("val/unc/pixel_error_auroc", "pix_err_auroc"), ("val/score", "score")]
    shown = "  ".join(f"{short} {row[k]:.3f}" for k, short in keys if k in row and not math.isnan(row[k]))
    return (f"epoch {int(row['epoch']) + 1:>3}/{epochs}  {shown}  lr {row['lr']:.1e}  "
            f"{row['epoch_seconds']:.1f}s  {row['images_per_second']:.1f} img/s")
