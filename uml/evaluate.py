"""The evaluation stage: the exported ONNX model, in onnxruntime, on the test split.

:func:`evaluate` reads ``data/models/model.onnx`` + ``metadata.json`` and the test split of the
prepared store, and writes ``data/reports/metrics.json`` (flat keys, ``null`` for undefined values)
and the plots under ``data/reports/plots/``. :func:`evaluate_arrays` is the same evaluation on
numpy arrays and an :class:`~uml.onnx_model.OnnxModel`.

Each pass (the clean one, then one per noise level) reads the test split a batch of
``evaluate.batch_size`` images at a time and keeps per-image summaries only
(:class:`PassOutputs`): class outputs, per-image Dice and distances, vCDRs, mean uncertainties, a
pixel sample of bounded size and the few panel images. A test split of at most
:data:`IN_MEMORY_BYTES` is read from the store once (:func:`in_memory`); a larger one is read
from the store in every pass (:class:`uml.data.store.SplitReader`). Beyond that bounded copy,
memory grows with the number of test images by a few numbers per image, and every
metric is what the whole split at once would give (the per-image values are the same, and the
summaries are computed from them after the pass).

Keys (each only when the model has the outputs it needs; ``<s>`` is a structure of
:func:`uml.metrics.structures`, ``disc`` and ``cup`` for fundus masks):

- ``cls/acc``, ``cls/auc``, ``cls/kappa``, ``cls/sensitivity``, ``cls/specificity``, ``cls/f1``,
  ``cls/ece``, ``cls/nll``, ``cls/brier``, ``cls/ece_debiased``, ``cls/ece_equal_mass`` (all of
  :data:`uml.metrics.CLASSIFICATION_METRICS`), the ``seg/`` keys below and the two mean uncertainties:
  :func:`uml.metrics.task_metrics`, the function that validation uses too (the predicted class is
  the argmax of ``class_prob``; the positive class is the model metadata's ``positive_class``,
  copied from the prepared data set)
- ``cls/ece_debiased_null95`` and ``cls/ece_debiased_p_value`` (and ``raw/`` of each): the 95th
  percentile of the debiased ECE that a perfectly calibrated model with the same confidences
  measures on this many images, and the consistency p-value of the measured one
  (:func:`uml.metrics.ece_debiased_null`, :func:`uml.metrics.ece_consistency_p_value`; over
  :data:`CONSISTENCY_RESAMPLES` label draws): a debiased ECE below the first, or a large p-value,
  is within the measurement's own noise
- ``seg/dice_<s>``, ``seg/assd_<s>``, ``seg/hd95_<s>``: per-image values averaged over the test
  images (distances in pixels at model resolution); ``seg/dist_undefined_<s>``: how many images
  were left out of the distance means because exactly one of prediction and ground truth is empty
- ``clinical/vcdr_mae``, ``clinical/vcdr_auc`` (fundus masks only): the vCDR of the predicted
  masks against that of the ground truth, and as a glaucoma score
- ``reference/vcdr_auc`` (fundus masks only, any model): the AUC of the ground-truth masks' vCDR
  for the label, i.e. the ceiling of a vCDR-based classifier on this test split (on the synthetic
  data the label is drawn from the vCDR, so it is close to the best possible ``cls/auc``);
  ``reference/positive_fraction``: the share of the positive class among the test labels
- ``unc/error_auroc``, ``unc/referral_acc_<pct>`` (one per ``evaluate.referral_fractions``),
  ``unc/mean_class_uncertainty``, ``unc/pixel_error_auroc``, ``unc/mean_pixel_uncertainty``
- ``unc/noise_auroc_<kind>_<level>`` and ``unc/pixel_noise_auroc_<kind>_<level>`` (``<kind>`` is
  ``gaussian`` or ``salt_pepper``, one per level): the AUROC of the image's class uncertainty,
  respectively its mean pixel uncertainty, separating the corrupted copies from the clean images
  (1: every corrupted copy is more uncertain; 0.5: uncertainty ignores the noise)
- ``robust/gaussian_<sigma>/...`` and ``robust/salt_pepper_<amount>/...``: ``cls/acc``,
  ``cls/auc``, ``seg/dice_<s>``, ``unc/mean_class_uncertainty``, ``unc/mean_pixel_uncertainty``
  on corrupted copies of the test images.
- ``<key>_ci95_low`` and ``<key>_ci95_high`` beside each of ``cls/auc``, ``cls/acc``, ``cls/f1``,
  ``cls/sensitivity``, ``cls/ece``, ``seg/dice_<s>``, ``unc/error_auroc``,
  ``unc/pixel_error_auroc``, ``clinical/vcdr_auc`` and ``reference/vcdr_auc`` that is present: the
  95 % percentile bootstrap interval over ``evaluate.bootstrap_samples`` resamples of the test
  images (0 disables them), seeded by ``evaluate.seed`` and shared by all metrics (paired). The
  pixel AUROC resamples images and pools their sampled pixels. See :func:`uml.metrics.bootstrap_ci`.

Noise is drawn per image from a generator seeded by ``(evaluate.seed, noise kind, level, image
index)``: the corrupted images do not depend on the batch size or on which other levels run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from sklearn.metrics import roc_curve
from tqdm.auto import tqdm

from uml import metrics, objectstore, plots
from uml.atomic import write_text_replacing
from uml.config import EvaluateParams, Params, Paths
from uml.errors import DataError, ModelFileError
from uml.fundus import FUNDUS_MASK_CLASSES
from uml.model_card import model_card
from uml.noise import gaussian_noise, salt_and_pepper
from uml.objectstore import is_uri
from uml.onnx_model import ModelFiles, OnnxModel, model_files, open_model_files

if TYPE_CHECKING:
    from uml.data.store import SplitReader

log = logging.getLogger(__name__)

NOISE_KINDS: dict[str, tuple[int, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]]] = {
    # name -> (code mixed into the noise seed, corruption)
    "gaussian": (1, gaussian_noise),
    "salt_pepper": (2, salt_and_pepper),
}
# Referred fractions of the referral curve plot (the metrics use evaluate.referral_fractions).
REFERRAL_PLOT_FRACTIONS = tuple(np.round(np.arange(0.0, 0.91, 0.05), 2))
# Label draws behind the debiased ECE's null distribution: a p-value resolves steps of 1/2001, and
# the 95th percentile is steady to about 0.002 on a few hundred images.
CONSISTENCY_RESAMPLES = 2000


def level_name(level: float) -> str:
    """The noise level as it appears in metric keys: ``0.1`` -> ``"0.1"``."""
    return f"{level:g}"


def referral_key(fraction: float) -> str:
    """``0.1`` -> ``"unc/referral_acc_10"``."""
    return f"unc/referral_acc_{fraction * 100:g}"


# ------------------------------------------------------------------------ model passes
class TestSplit(Protocol):
    """A split as evaluation reads it: labels and ids in memory, images and masks a batch at a
    time. :class:`ArraySplit` holds arrays; :class:`uml.data.store.SplitReader` reads the store."""

    labels: np.ndarray  # (n,) int64
    ids: np.ndarray  # (n,) int64: seeds each image's noise and pixel sample

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (b, S, S, 3) and label masks (b, S, S) of positions ``start:stop``."""
        ...


@dataclass
class ArraySplit:
    """A split held in memory: uint8 images (n, S, S, 3), label masks (n, S, S), labels (n,) and
    ids (n,; default: the positions)."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.arange(len(self.images)) if self.ids is None else np.asarray(self.ids)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[start:stop], self.masks[start:stop]


@dataclass
class Panel:
    """What one panel figure shows of an image of the clean pass."""

    image: np.ndarray  # uint8 (S, S, 3)
    mask: np.ndarray  # uint8 (S, S) ground truth
    pred_mask: np.ndarray | None  # uint8 (S, S) the delivered mask
    maps: dict[str, np.ndarray]  # uncertainty map name -> (S, S)


@dataclass
class PassOutputs:
    """What one pass over the test images keeps: per-image summaries, a bounded pixel sample and
    the few panel images, never the images or masks themselves (``None`` where the model lacks
    the output, or the pass was not asked for it)."""

    class_prob: np.ndarray | None = None  # (n, K) calibrated
    class_uncertainty: np.ndarray | None = None  # (n,) calibrated 1 - max p
    class_prob_raw: np.ndarray | None = None  # (n, K) alpha/S
    class_uncertainty_raw: np.ndarray | None = None  # (n,) K/S
    # Per-image segmentation metrics (uml.metrics.segmentation_per_image): dice_<s>, with
    # distances also assd_<s> and hd95_<s>.
    seg: dict[str, np.ndarray] | None = None
    pred_vcdr: np.ndarray | None = None  # (n,) of the delivered masks (fundus masks, with vcdr)
    gt_vcdr: np.ndarray | None = None  # (n,) of the ground-truth masks (fundus masks, with vcdr)
    mean_pixel_uncertainty: np.ndarray | None = None  # (n,) of the delivered mask's error map
    mean_pixel_uncertainty_raw: np.ndarray | None = None  # (n,) of the paper's map U
    unusual_features: np.ndarray | None = None  # (n, F) the unusual-image rule's features
    # Pixel samples for the pixel-error AUROCs: keys uncertainty, uncertainty_raw, error, image.
    pixels: dict[str, np.ndarray] | None = None  # uniform over each image
    band: dict[str, np.ndarray] | None = None  # within evaluate.contour_band_px of the predicted contours
    panels: dict[int, Panel] = field(default_factory=dict)  # position -> panel


def _noise_rng(seed: int, kind: str, level: float, image_id: int) -> np.random.Generator:
    # Micro-units keep the level an integer for SeedSequence while telling 0.05 from 0.050001.
    return np.random.default_rng([seed, NOISE_KINDS[kind][0], int(round(level * 1e6)), int(image_id)])


def run_pass(
    model: OnnxModel,
    split: TestSplit,
    batch_size: int,
    *,
    noise: tuple[str, float] | None = None,
    seed: int = 0,
    distances: bool = False,
    pixels: bool = False,
    vcdr: bool = False,
    panel_positions: Sequence[int] = (),
    pixel_budget: int = metrics.PIXEL_AUROC_MAX_PIXELS,
    band_px: float = 3.0,
    desc: str = "clean",
    start: int = 0,
    stop: int | None = None,
    progress: bool = True,
) -> PassOutputs:
    """Run the model over ``split`` a batch at a time, optionally corrupted by ``noise``
    (``(kind, level)``, kind in :data:`NOISE_KINDS`), and keep per-image summaries only: memory
    grows with the number of images by a few numbers each (plus the bounded pixel samples).

    A segmentation model's predicted masks are scored against the batch's ground truth as they
    come (Dice; ``distances``: also ASSD and HD95). ``vcdr`` (fundus masks): the vCDR of the
    ground-truth masks and of the predicted ones. ``pixels``: two deterministic samples of at
    most ``pixel_budget`` pixels each (spread evenly over the images) keep each pixel's two
    uncertainties and whether its predicted class is wrong: one over whole images, one within
    ``band_px`` of the predicted contours. ``panel_positions`` keep those images, their masks
    and their full uncertainty maps.

    ``start``/``stop`` run the positions ``start:stop`` of the split only (one shard of a pass,
    :class:`RayPasses`): the per-image pixel budget, the panels' and pixels' positions and each
    image's noise and pixel sample stay those of the whole pass, so the shards' outputs, joined in
    order (:func:`join_passes`), equal the whole pass's when the shards start at multiples of
    ``batch_size`` (then every batch is the same).
    """
    n = len(split)
    stop = n if stop is None else min(stop, n)
    ids = np.asarray(split.ids)
    out = PassOutputs()
    parts: dict[str, list[np.ndarray]] = {}
    seg_parts: dict[str, list[np.ndarray]] = {}
    pixel_parts: list[dict[str, np.ndarray]] = []
    band_parts: list[dict[str, np.ndarray]] = []
    panel_set = set(int(p) for p in panel_positions)
    per_image_pixels = max(1, pixel_budget // max(n, 1))
    mask_classes = len(model.mask_classes)

    def keep(name: str, value: np.ndarray) -> None:
        parts.setdefault(name, []).append(value)

    with tqdm(total=stop - start, desc=f"evaluate [{desc}]", unit="img", leave=False, mininterval=1.0,
              disable=not progress) as bar:
        for first in range(start, stop, batch_size):
            last = min(first + batch_size, stop)
            images, gt_masks = split.read(first, last)
            if model.has_seg and gt_masks.size and gt_masks.max() >= mask_classes:
                raise DataError(f"test masks hold class {gt_masks.max()} but the model has {mask_classes} mask classes")
            batch = _corrupted(model.scale_images(images), noise, seed, ids[first:last])
            result = model.run(model.to_input(batch))
            if model.has_cls:
                for name in ("class_prob", "class_prob_raw"):
                    keep(name, result[name].astype(np.float64))
                for name in ("class_uncertainty", "class_uncertainty_raw"):
                    keep(name, result[name].reshape(last - first).astype(np.float64))
            keep("unusual_features", model.unusual_features(batch, result.get("seg_uncertainty")))
            if vcdr:
                keep("gt_vcdr", np.array([metrics.vertical_cdr(m) for m in gt_masks]))
            pred = maps = None
            if model.has_seg:
                pred = result["seg_prob"].argmax(axis=1).astype(np.uint8)
                for name, values in metrics.segmentation_per_image(pred, gt_masks, model.mask_classes, distances).items():
                    seg_parts.setdefault(name, []).append(values)
                if vcdr:
                    keep("pred_vcdr", np.array([metrics.vertical_cdr(m) for m in pred]))
                maps = {"uncertainty": result["seg_uncertainty"][:, 0].astype(np.float32),
                        "uncertainty_raw": result["seg_uncertainty_raw"][:, 0].astype(np.float32)}
                keep("mean_pixel_uncertainty", maps["uncertainty"].reshape(last - first, -1).mean(axis=1, dtype=np.float64))
                keep("mean_pixel_uncertainty_raw", maps["uncertainty_raw"].reshape(last - first, -1).mean(axis=1, dtype=np.float64))
            for j in range(last - first):
                position = first + j
                if position in panel_set:
                    out.panels[position] = Panel(images[j].copy(), gt_masks[j].copy(),
                                                 pred[j].copy() if pred is not None else None,
                                                 {name: values[j].copy() for name, values in (maps or {}).items()})
                if not pixels or pred is None:
                    continue
                image_maps = {"uncertainty": maps["uncertainty"][j], "uncertainty_raw": maps["uncertainty_raw"][j],
                              "error": pred[j] != gt_masks[j]}
                rng = np.random.default_rng([seed, 0, int(ids[position])])
                sampled = metrics.sample_pixels(per_image_pixels, rng, **image_maps)
                pixel_parts.append({**sampled, "image": np.full(sampled["error"].size, position)})
                near = metrics.contour_band(pred[j], model.mask_classes, band_px)
                sampled = metrics.sample_pixels(per_image_pixels, rng, where=near, **image_maps)
                band_parts.append({**sampled, "image": np.full(sampled["error"].size, position)})
            bar.update(last - first)
    for name, values in parts.items():
        setattr(out, name, np.concatenate(values))
    if seg_parts:
        out.seg = {name: np.concatenate(values) for name, values in seg_parts.items()}
    if pixel_parts:
        out.pixels = {key: np.concatenate([p[key] for p in pixel_parts]) for key in pixel_parts[0]}
        out.band = {key: np.concatenate([p[key] for p in band_parts]) for key in band_parts[0]}
    return out


def join_passes(shards: Sequence[PassOutputs]) -> PassOutputs:
    """One pass's outputs from its shards' (:func:`run_pass` with ``start``/``stop``), in position
    order: per-image arrays and pixel samples concatenated, panels merged."""
    joined = PassOutputs()
    for name in ("class_prob", "class_uncertainty", "class_prob_raw", "class_uncertainty_raw", "pred_vcdr", "gt_vcdr",
                 "mean_pixel_uncertainty", "mean_pixel_uncertainty_raw", "unusual_features"):
        parts = [getattr(shard, name) for shard in shards if getattr(shard, name) is not None]
        if parts:
            setattr(joined, name, np.concatenate(parts))
    for name in ("seg", "pixels", "band"):
        parts = [getattr(shard, name) for shard in shards if getattr(shard, name) is not None]
        if parts:
            setattr(joined, name, {key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
    for shard in shards:
        joined.panels.update(shard.panels)
    return joined


# A pass: run_pass's keyword arguments besides the model, the split and the batch size.
PassArgs = dict


class PassRunner(Protocol):
    """Runs named passes over the test split and returns their outputs by name."""

    def __call__(self, passes: dict[str, PassArgs]) -> dict[str, PassOutputs]: ...


@dataclass
class LocalPasses:
    """The passes one after the other, in this process."""

    model: OnnxModel
    split: TestSplit
    batch_size: int

    def __call__(self, passes: dict[str, PassArgs]) -> dict[str, PassOutputs]:
        return {name: run_pass(self.model, self.split, self.batch_size, **args) for name, args in passes.items()}


def shard_ranges(n: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """``start, stop`` of at most ``shards`` contiguous ranges covering ``0:n``, each starting at a
    multiple of ``batch_size`` (so the shards' batches are the whole pass's batches)."""
    batches = math.ceil(n / batch_size)
    per_shard = max(1, math.ceil(batches / max(shards, 1))) * batch_size
    return [(first, min(first + per_shard, n)) for first in range(0, n, per_shard)]


def _run_pass_shard(files: ModelFiles, provider: str, dataset: str, split_name: str,
                    batch_size: int, start: int, stop: int, args: PassArgs) -> tuple[PassOutputs, str]:
    """One shard of a pass, in a Ray task. The model's files come through Ray's object store
    (:func:`uml.onnx_model.open_model_files`), so no node needs the driver's folder; the task
    opens the store itself (the driver verified it; a folder every node mounts, or the copy on
    object storage when ``data.root`` is a bucket)."""
    import ray

    from uml.data.store import SplitReader, open_prepared

    model = open_model_files(files, threads=1, provider=provider, setting="evaluate.provider")
    split = SplitReader(open_prepared(dataset, verify=False), split_name)

    outputs = run_pass(model, split, batch_size, start=start, stop=stop, progress=False, **args)
    return outputs, ray.get_runtime_context().get_node_id()


@dataclass
class RayPasses:
    """The passes split into shards of whole batches, run as Ray tasks (one CPU each, and
    ``gpus_per_worker`` GPUs, without which Ray hides the GPUs from a task) on the connected Ray
    instance or cluster, spread over its nodes; each pass is split into ``workers`` shards, and
    every shard of every pass is submitted at once, so the cluster's free CPUs (or GPUs) bound how
    many run together. The driver joins each pass's shards in order (:func:`join_passes`): the
    metrics are those of :class:`LocalPasses`, computed from the same per-image values and pixel
    samples."""

    model: OnnxModel
    dataset: str  # the store as every node reaches it (uml.data.store.shared_copy)
    split_name: str
    num_images: int
    batch_size: int
    workers: int
    gpus_per_worker: float = 0.0
    provider: str = "auto"

    def __call__(self, passes: dict[str, PassArgs]) -> dict[str, PassOutputs]:
        import ray

        # SPREAD: the shards go to every node, not first to fill the driver's. A task lost with its
        # node is run again elsewhere (max_retries): a shard's result depends on its inputs only.
        task = ray.remote(num_cpus=1, num_gpus=self.gpus_per_worker, max_retries=2,
                          scheduling_strategy="SPREAD")(_run_pass_shard)
        ranges = shard_ranges(self.num_images, self.batch_size, self.workers)
        # Put once, fetched by each node that runs a shard.
        shipped = ray.put(model_files(self.model))
        pending = {}
        for name, args in passes.items():
            for index, (start, stop) in enumerate(ranges):
                ref = task.remote(shipped, self.provider, self.dataset, self.split_name, self.batch_size, start,
                                  stop, args)
                pending[ref] = (name, index, stop - start)
        log.info("evaluating %d passes as %d Ray tasks (%d shards of at most %d images each) reading %s",
                 len(passes), len(pending), len(ranges), ranges[0][1] - ranges[0][0] if ranges else 0,
                 objectstore.describe(self.dataset) if is_uri(self.dataset) else self.dataset)
        done: dict[str, dict[int, PassOutputs]] = {name: {} for name in passes}
        nodes: set[str] = set()
        with tqdm(total=self.num_images * len(passes), desc="evaluate [ray]", unit="img", mininterval=1.0) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    name, index, size = pending.pop(ref)
                    done[name][index], node = ray.get(ref)
                    nodes.add(node)
                    bar.update(size)
        log.info("the %d evaluation tasks ran on %d Ray node(s)", sum(len(s) for s in done.values()), len(nodes))
        return {name: join_passes([shards[i] for i in range(len(ranges))]) for name, shards in done.items()}


def _corrupted(batch: np.ndarray, noise: tuple[str, float] | None, seed: int, ids: np.ndarray) -> np.ndarray:
    """The scaled batch, each image corrupted by ``noise`` with its own generator (none: as is)."""
    if noise is None:
        return batch
    kind, level = noise
    corrupt = NOISE_KINDS[kind][1]
    return np.stack([corrupt(img, level, _noise_rng(seed, kind, level, image_id)) for img, image_id in zip(batch, ids)])


# ------------------------------------------------------------------------------ metrics
def _robust_metrics(model: OnnxModel, outputs: PassOutputs, labels: np.ndarray) -> dict[str, float]:
    seg = {key: values for key, values in outputs.seg.items() if key.startswith("dice_")} if outputs.seg is not None else None
    return metrics.task_metrics(labels, outputs.class_prob, seg, positive=model.positive_class, classification=("acc", "auc"),
                                class_uncertainty=outputs.class_uncertainty, pixel_uncertainty=outputs.mean_pixel_uncertainty)


def _panel_positions(n: int, count: int) -> list[int]:
    # Evenly spread over the split, so the panels are not all from one end of it.
    if count <= 0 or n == 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))


def selective_scores(outputs: PassOutputs) -> dict[str, np.ndarray]:
    """The confidence scores whose selective prediction is reported (as uncertainties: refer the
    highest first): ``calibrated`` (the deployment's ``1 - max p``), ``raw_maxprob``
    (``1 - max alpha/S``) and ``raw_uncertainty`` (the paper's ``K/S``; the normalised entropy for
    a softmax model)."""
    return {"calibrated": outputs.class_uncertainty, "raw_maxprob": 1.0 - outputs.class_prob_raw.max(axis=1),
            "raw_uncertainty": outputs.class_uncertainty_raw}


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in values.items()}


def evaluate_arrays(
    model: OnnxModel,
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    cfg: EvaluateParams,
    plots_dir: str | Path | None = None,
    ids: np.ndarray | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on uint8 images (N, S, S, 3), label masks (N, S, S) and labels (N,) held
    in memory: :func:`evaluate_split` of an :class:`ArraySplit`."""
    images, masks, labels = np.asarray(images), np.asarray(masks), np.asarray(labels)
    n = len(images)
    if not (len(masks) == len(labels) == n):
        raise DataError(f"images, masks and labels differ in length: {n}, {len(masks)}, {len(labels)}")
    size = model.image_size
    if n and (images.shape[1:] != (size, size, 3) or masks.shape[1:] != (size, size)):
        raise DataError(
            f"the model expects {size}x{size} RGB images, the test split has images {images.shape[1:]} and masks "
            f"{masks.shape[1:]}: re-run prepare and export with the same data.image_size"
        )
    return evaluate_split(model, ArraySplit(images, masks, labels, ids), cfg, plots_dir)


def evaluate_split(model: OnnxModel, split: TestSplit, cfg: EvaluateParams,
                   plots_dir: str | Path | None = None, runner: PassRunner | None = None) -> dict[str, float]:
    """Evaluate ``model`` on ``split`` (its images at the model's resolution), reading it a batch
    at a time in each pass (:func:`run_pass`). ``runner`` runs the passes (default
    :class:`LocalPasses`: in this process; :class:`RayPasses`: sharded over Ray tasks).

    Returns the flat metrics (``nan`` where undefined). With ``plots_dir``, also writes the plot
    data files and figures there (see :func:`write_plots`).
    """
    labels = np.asarray(split.labels)
    n = len(split)
    if n == 0:
        raise DataError("the test split is empty")
    if model.has_cls and (labels.min() < 0 or labels.max() >= len(model.class_names)):
        raise DataError(f"test labels span [{labels.min()}, {labels.max()}] but the model has {len(model.class_names)} classes")

    calibration = model.calibration
    fundus = tuple(model.mask_classes) == FUNDUS_MASK_CLASSES
    panels = _panel_positions(n, cfg.num_panels) if plots_dir is not None else []
    passes: dict[str, PassArgs] = {"clean": dict(seed=cfg.seed, distances=True, pixels=True, vcdr=fundus,
                                                 panel_positions=panels, band_px=cfg.contour_band_px)}
    noise_levels = [(kind, level) for kind, levels in (("gaussian", cfg.gaussian_sigmas),
                                                       ("salt_pepper", cfg.salt_pepper_amounts)) for level in levels]
    for kind, level in noise_levels:
        passes[f"{kind}_{level_name(level)}"] = dict(noise=(kind, level), seed=cfg.seed, desc=f"{kind} {level_name(level)}")
    outputs = (runner or LocalPasses(model, split, cfg.batch_size))(passes)
    clean = outputs["clean"]

    result = metrics.task_metrics(labels, clean.class_prob, clean.seg, positive=model.positive_class, bins=cfg.calibration_bins,
                                  class_uncertainty=clean.class_uncertainty, pixel_uncertainty=clean.mean_pixel_uncertainty)
    # The paper's outputs, side by side (classification metrics of alpha/S, K/S and U).
    result.update(_prefixed("raw/", metrics.task_metrics(
        labels, clean.class_prob_raw, None, positive=model.positive_class, bins=cfg.calibration_bins,
        class_uncertainty=clean.class_uncertainty_raw, pixel_uncertainty=clean.mean_pixel_uncertainty_raw)))

    gt_vcdr, pred_vcdr = clean.gt_vcdr, clean.pred_vcdr
    if pred_vcdr is not None:
        result["clinical/vcdr_mae"] = metrics.vcdr_mae(pred_vcdr, gt_vcdr)
        result["clinical/vcdr_auc"] = metrics.vcdr_auc(labels, pred_vcdr, model.positive_class)
        result.update(_vcdr_interval_metrics(model, pred_vcdr, gt_vcdr, labels, vcdr_halfwidths(model, clean)))
    if gt_vcdr is not None:
        result["reference/vcdr_auc"] = metrics.vcdr_auc(labels, gt_vcdr, model.positive_class)
    result["reference/positive_fraction"] = float(np.mean(labels == model.positive_class))

    error = None
    if clean.class_prob is not None:
        for prefix, prob in (("", clean.class_prob), ("raw/", clean.class_prob_raw)):
            null = metrics.ece_debiased_null(prob, cfg.calibration_bins, CONSISTENCY_RESAMPLES, cfg.seed)
            result[f"{prefix}cls/ece_debiased_null95"] = float(np.quantile(null, 0.95))
            result[f"{prefix}cls/ece_debiased_p_value"] = metrics.ece_consistency_p_value(
                labels, prob, cfg.calibration_bins, null=null)
        error = metrics.predicted_class(clean.class_prob) != labels
        result["unc/error_auroc"] = metrics.error_auroc(clean.class_uncertainty, error)
        result["raw/unc/error_auroc"] = metrics.error_auroc(clean.class_uncertainty_raw, error)
        for fraction in cfg.referral_fractions:
            result[referral_key(fraction)] = metrics.referral_acc(~error, clean.class_uncertainty, fraction)
        target = calibration.referral.risk if calibration.referral is not None else math.nan
        for score, uncertainty in selective_scores(clean).items():
            result[f"sel/aurc_{score}"] = metrics.aurc(uncertainty, error)
            result[f"sel/eaurc_{score}"] = metrics.eaurc(uncertainty, error)
            result[f"sel/augrc_{score}"] = metrics.augrc(uncertainty, error)
            result[f"sel/coverage_at_risk_{score}"] = metrics.coverage_at_risk(uncertainty, error, target)
    if clean.pixels is not None:
        for prefix, key in (("", "uncertainty"), ("raw/", "uncertainty_raw")):
            result[f"{prefix}unc/pixel_error_auroc"] = metrics.error_auroc(clean.pixels[key], clean.pixels["error"])
            result[f"{prefix}unc/pixel_error_auroc_band"] = metrics.error_auroc(clean.band[key], clean.band["error"])

    unusual = calibration.unusual
    clean_unusual = unusual.score(clean.unusual_features)
    flagged = unusual.flag(clean.unusual_features)
    result["unusual/flagged"] = float(flagged.mean())
    if error is not None and calibration.referral is not None:
        result.update(_referral_metrics(calibration.referral.accept(clean.class_uncertainty), flagged, error))

    robust_tables: dict[str, list[dict[str, float]]] = {}
    clean_robust = _robust_metrics(model, clean, labels)
    for kind, levels in (("gaussian", cfg.gaussian_sigmas), ("salt_pepper", cfg.salt_pepper_amounts)):
        table = [{"level": 0.0, **_columns(clean_robust)}]
        for level in levels:
            name = f"{kind}_{level_name(level)}"
            noisy = outputs[name]
            values = _robust_metrics(model, noisy, labels)
            result.update({f"robust/{name}/{k}": v for k, v in values.items()})
            result.update(_noise_detection(clean, noisy, name))
            result[f"unusual/noise_auroc_{name}"] = metrics.noise_auroc(clean_unusual, unusual.score(noisy.unusual_features))
            result[f"unusual/flagged_{name}"] = float(unusual.flag(noisy.unusual_features).mean())
            table.append({"level": float(level), **_columns(values)})
        robust_tables[kind] = table

    if cfg.bootstrap_samples:
        intervals = _bootstrap_intervals(model, clean, labels, gt_vcdr, pred_vcdr, flagged, cfg)
        result = _with_intervals(result, intervals)
    if plots_dir is not None:
        write_plots(Path(plots_dir), model, clean, labels, cfg, panels, robust_tables, pred_vcdr, gt_vcdr)
    return result


def vcdr_halfwidths(model: OnnxModel, outputs: PassOutputs) -> np.ndarray | None:
    """Each image's vCDR interval half-width (that of its predicted class; ``nan`` where the
    calibration split had too few images), or None without a fitted interval."""
    interval = model.calibration.vcdr_interval
    if interval is None or outputs.pred_vcdr is None:
        return None
    if outputs.class_prob is None:
        return np.full(len(outputs.pred_vcdr), np.nan if interval.halfwidth is None else interval.halfwidth)
    names = [model.class_names[k] for k in metrics.predicted_class(outputs.class_prob)]
    return np.array([np.nan if (h := interval.halfwidth_for(name)) is None else h for name in names])


def _vcdr_interval_metrics(model: OnnxModel, pred_vcdr: np.ndarray, gt_vcdr: np.ndarray, labels: np.ndarray,
                           halfwidths: np.ndarray | None) -> dict[str, float]:
    """How often the calibrated vCDR interval holds the true vCDR on the test split, overall and
    per true class (the promise holds per predicted class; per true class it can differ), and the
    mean half-width, overall and per predicted class."""
    if halfwidths is None:
        return {}
    defined = np.isfinite(pred_vcdr) & np.isfinite(gt_vcdr) & np.isfinite(halfwidths)
    covered = np.abs(pred_vcdr - gt_vcdr) <= halfwidths
    result = {"clinical/vcdr_interval_halfwidth": float(halfwidths[defined].mean()) if defined.any() else math.nan,
              "clinical/vcdr_interval_coverage": float(covered[defined].mean()) if defined.any() else math.nan}
    for k, name in enumerate(model.class_names):
        chosen = defined & (labels == k)
        result[f"clinical/vcdr_interval_coverage_{name}"] = float(covered[chosen].mean()) if chosen.any() else math.nan
    return result


def _referral_metrics(accept_class: np.ndarray, flagged: np.ndarray, error: np.ndarray) -> dict[str, float]:
    """The referral rule as deployed, on the test split: ``refer/coverage`` and ``refer/risk`` of the
    class rule alone (what its promise is about), ``refer/combined_*`` with unusual images referred too."""
    result = {}
    for prefix, accepted in (("refer/", accept_class), ("refer/combined_", accept_class & ~flagged)):
        result[f"{prefix}coverage"] = float(accepted.mean())
        result[f"{prefix}risk"] = float(error[accepted].mean()) if accepted.any() else math.nan
    return result


def _noise_detection(clean: PassOutputs, noisy: PassOutputs, noise: str) -> dict[str, float]:
    """Do the corrupted copies carry more uncertainty than the clean images? For the deployment's
    class uncertainty and mean pixel uncertainty, and (``raw/``) the paper's ``u`` and ``U``."""
    result: dict[str, float] = {}
    for prefix, suffix in (("", ""), ("raw/", "_raw")):
        clean_class, noisy_class = getattr(clean, f"class_uncertainty{suffix}"), getattr(noisy, f"class_uncertainty{suffix}")
        if clean_class is not None:
            result[f"{prefix}unc/noise_auroc_{noise}"] = metrics.noise_auroc(clean_class, noisy_class)
        clean_pixel = getattr(clean, f"mean_pixel_uncertainty{suffix}")
        if clean_pixel is not None:
            result[f"{prefix}unc/pixel_noise_auroc_{noise}"] = metrics.noise_auroc(
                clean_pixel, getattr(noisy, f"mean_pixel_uncertainty{suffix}"))
    return result


def _bootstrap_intervals(
    model: OnnxModel,
    clean: PassOutputs,
    labels: np.ndarray,
    gt_vcdr: np.ndarray | None,
    pred_vcdr: np.ndarray | None,
    flagged: np.ndarray,
    cfg: EvaluateParams,
) -> dict[str, tuple[float, float]]:
    """Metric key -> 95 % bootstrap interval, for the headline metrics the model has (see the module docstring)."""
    n = len(labels)
    every_image = np.ones(n)
    positive = labels == model.positive_class
    # Each statistic is built only when its interval is computed, so the per-image arrays of one
    # statistic at a time are held beside the resamples (an AUC's pair table is never whole either).
    statistics: dict[str, Callable[[], metrics.ResampledStatistic]] = {}
    if clean.class_prob is not None:
        pred = metrics.predicted_class(clean.class_prob)
        correct = pred == labels
        statistics["cls/auc"] = partial(metrics.resampled_class_auc, labels, clean.class_prob, model.positive_class)
        statistics["cls/acc"] = partial(metrics.resampled_ratio, correct, every_image)
        statistics["cls/f1"] = partial(metrics.resampled_f1, labels, pred, model.positive_class, clean.class_prob.shape[1])
        statistics["cls/sensitivity"] = partial(metrics.resampled_ratio, positive & correct, positive)
        for prefix, prob in (("", clean.class_prob), ("raw/", clean.class_prob_raw)):
            statistics[f"{prefix}cls/ece"] = partial(metrics.resampled_ece, labels, prob, cfg.calibration_bins)
            statistics[f"{prefix}cls/nll"] = partial(metrics.resampled_nll, labels, prob)
            statistics[f"{prefix}cls/brier"] = partial(metrics.resampled_brier, labels, prob)
            statistics[f"{prefix}cls/ece_debiased"] = partial(metrics.resampled_ece_debiased, labels, prob, cfg.calibration_bins)
        statistics["unc/error_auroc"] = partial(metrics.resampled_auc, clean.class_uncertainty, ~correct)
        statistics["raw/unc/error_auroc"] = partial(metrics.resampled_auc, clean.class_uncertainty_raw, ~correct)
        for score, uncertainty in selective_scores(clean).items():
            statistics[f"sel/aurc_{score}"] = partial(metrics.resampled_aurc, uncertainty, ~correct)
            statistics[f"sel/augrc_{score}"] = partial(metrics.resampled_augrc, uncertainty, ~correct)
        if model.calibration.referral is not None:
            accepted = model.calibration.referral.accept(clean.class_uncertainty)
            statistics["refer/coverage"] = partial(metrics.resampled_ratio, accepted, every_image)
            statistics["refer/risk"] = partial(metrics.resampled_ratio, accepted & ~correct, accepted)
            combined = accepted & ~flagged
            statistics["refer/combined_coverage"] = partial(metrics.resampled_ratio, combined, every_image)
            statistics["refer/combined_risk"] = partial(metrics.resampled_ratio, combined & ~correct, combined)
    if clean.seg is not None:
        for name in metrics.structures(model.mask_classes):
            statistics[f"seg/dice_{name}"] = partial(metrics.resampled_ratio, clean.seg[f"dice_{name}"], every_image)
    if clean.pixels is not None:
        for prefix, key in (("", "uncertainty"), ("raw/", "uncertainty_raw")):
            for suffix, sample in (("", clean.pixels), ("_band", clean.band)):
                statistics[f"{prefix}unc/pixel_error_auroc{suffix}"] = partial(
                    metrics.resampled_auc, sample[key], sample["error"], group=sample["image"], n_groups=n)
    if pred_vcdr is not None:
        statistics["clinical/vcdr_auc"] = partial(metrics.resampled_auc, pred_vcdr, positive)
        halfwidths = vcdr_halfwidths(model, clean)
        if halfwidths is not None:
            defined = np.isfinite(pred_vcdr) & np.isfinite(gt_vcdr) & np.isfinite(halfwidths)
            covered = defined & (np.abs(pred_vcdr - gt_vcdr) <= halfwidths)
            statistics["clinical/vcdr_interval_coverage"] = partial(metrics.resampled_ratio, covered, defined)
    if gt_vcdr is not None:
        statistics["reference/vcdr_auc"] = partial(metrics.resampled_auc, gt_vcdr, positive)
    return {key: metrics.bootstrap_ci(build(), n, cfg.bootstrap_samples, cfg.seed, confidence=0.95)
            for key, build in statistics.items()}


def _with_intervals(result: dict[str, float], intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    # Each interval right after its metric, so that metrics.json reads "value, low, high".
    out: dict[str, float] = {}
    for key, value in result.items():
        out[key] = value
        if key in intervals:
            out[f"{key}_ci95_low"], out[f"{key}_ci95_high"] = intervals[key]
    return out


def _columns(values: dict[str, float]) -> dict[str, float]:
    # CSV column names for dvc plots: "cls/acc" -> "cls_acc", "unc/mean_class_uncertainty" -> "unc_mean_class_uncertainty".
    return {k.replace("/", "_"): v for k, v in values.items()}


# -------------------------------------------------------------------------------- plots
def write_plots(
    plots_dir: Path,
    model: OnnxModel,
    clean: PassOutputs,
    labels: np.ndarray,
    cfg: EvaluateParams,
    panels: Sequence[int],
    robust_tables: dict[str, list[dict[str, float]]],
    pred_vcdr: np.ndarray | None = None,
    gt_vcdr: np.ndarray | None = None,
) -> list[Path]:
    """Write the plot data files (CSV, for ``dvc plots``) and PNG figures; returns the paths written.

    ``roc`` (positive class vs rest), ``reliability`` (calibrated and raw), ``risk_coverage`` (one
    CSV per score of :func:`selective_scores`) and ``referral`` need the class outputs;
    ``vcdr.png`` the fundus masks; ``robustness_<kind>.csv`` always; ``panels/case_<position>.png``
    per panel (the images the clean pass kept in ``clean.panels``).
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if clean.class_prob is not None:
        positive = (labels == model.positive_class).astype(int)
        score = clean.class_prob[:, model.positive_class]
        if 0 < positive.sum() < len(positive):
            fpr, tpr, thresholds = roc_curve(positive, score)
            # The first threshold is +inf ("predict nothing positive"); scores are probabilities,
            # so 1.0 is the same cut for the plot and keeps the file valid CSV/JSON numbers.
            thresholds = np.minimum(thresholds, 1.0)
            rows = [{"fpr": f, "tpr": t, "threshold": th} for f, t, th in zip(fpr, tpr, thresholds)]
            written.append(plots.write_csv(plots_dir / "roc.csv", rows))
            written.append(plots.roc_figure(plots_dir / "roc.png", fpr, tpr, metrics.auc(labels, clean.class_prob, model.positive_class),
                                            title=f"ROC ({model.class_names[model.positive_class]} vs rest)"))
        else:
            log.warning("the test split holds one class only: no ROC curve")
        diagrams = {}
        for name, suffix, prob in (("calibrated", "", clean.class_prob), ("raw", "_raw", clean.class_prob_raw)):
            stats = metrics.reliability_diagram(labels, prob, cfg.calibration_bins)
            filled = stats["count"] > 0
            rows = [
                {"bin_lower": lo, "bin_upper": hi, "confidence": c, "accuracy": a, "count": k}
                for lo, hi, c, a, k in zip(*(stats[key][filled] for key in ("lower", "upper", "confidence", "accuracy", "count")))
            ]
            written.append(plots.write_csv(plots_dir / f"reliability{suffix}.csv", rows))
            diagrams[name] = (stats, metrics.ece(labels, prob, cfg.calibration_bins))
        written.append(plots.reliability_comparison_figure(plots_dir / "reliability.png", diagrams,
                                                           title=f"reliability on the test split ({len(labels)} images)"))
        error = metrics.predicted_class(clean.class_prob) != labels
        curves = {}
        for name, uncertainty in selective_scores(clean).items():
            curve = metrics.risk_coverage_curve(uncertainty, error)
            curves[name] = curve
            rows = [{"coverage": c, "risk": r, "threshold": t} for c, r, t in zip(curve["coverage"], curve["risk"], curve["threshold"])]
            written.append(plots.write_csv(plots_dir / f"risk_coverage_{name}.csv", rows))
        referral = model.calibration.referral
        chosen = None
        if referral is not None and referral.threshold is not None:
            accepted = referral.accept(clean.class_uncertainty)
            chosen = (float(accepted.mean()), float(error[accepted].mean()) if accepted.any() else math.nan)
        written.append(plots.risk_coverage_figure(plots_dir / "risk_coverage.png", curves,
                                                  target=referral.risk if referral else None, chosen=chosen))
        curve = metrics.referral_curve(~error, clean.class_uncertainty, REFERRAL_PLOT_FRACTIONS)
        rows = [{"referred_fraction": f, "accuracy": a, "retained": r} for f, a, r in zip(curve["fraction"], curve["accuracy"], curve["retained"])]
        written.append(plots.write_csv(plots_dir / "referral.csv", rows))
        written.append(plots.referral_figure(plots_dir / "referral.png", curve))
    if pred_vcdr is not None and gt_vcdr is not None:
        interval = model.calibration.vcdr_interval
        written.append(plots.vcdr_figure(plots_dir / "vcdr.png", pred_vcdr, gt_vcdr, labels, model.class_names,
                                         vcdr_halfwidths(model, clean), interval.coverage if interval is not None else None))
    for kind, table in robust_tables.items():
        written.append(plots.write_csv(plots_dir / f"robustness_{kind}.csv", table))
    written.append(plots.robustness_figure(plots_dir / "robustness.png", robust_tables,
                                           {"gaussian": "Gaussian noise sigma", "salt_pepper": "salt-and-pepper amount"}))
    map_titles = {"uncertainty": "error map of the mask (calibrated entropy)", "uncertainty_raw": "paper's U (mutual branch)"}
    for position in panels:
        panel = clean.panels[position]
        written.append(plots.panel_figure(
            plots_dir / "panels" / f"case_{position:03d}.png",
            panel.image,
            panel.mask,
            panel.pred_mask,
            {map_titles[name]: values for name, values in panel.maps.items()},
            model.mask_classes,
            _panel_title(model, clean, labels, position),
        ))
    return written


def _panel_title(model: OnnxModel, clean: PassOutputs, labels: np.ndarray, position: int) -> str:
    names = model.class_names or [str(i) for i in range(int(labels.max()) + 1)]
    parts = [f"#{position}  label: {names[labels[position]]}"]
    if clean.class_prob is not None:
        k = int(clean.class_prob[position].argmax())
        parts.append(f"pred: {names[k]} p={clean.class_prob[position, k]:.2f} (raw {clean.class_prob_raw[position, k]:.2f})")
        parts.append(f"u={clean.class_uncertainty_raw[position]:.2f}")
    return "   ".join(parts)


# -------------------------------------------------------------------------------- stage
def _evaluate_store(params: Params, model: OnnxModel, split, paths: Paths, plots_dir: Path) -> dict[str, float]:
    """:func:`evaluate_split` of the store's test split, its passes in this process or, with
    ``evaluate.workers``, sharded over Ray tasks."""
    cfg = params.evaluate
    if cfg.workers == 0:
        return evaluate_split(model, in_memory(split), cfg, plots_dir=plots_dir)
    from uml.train.cluster import ray_session

    from uml.data.store import shared_copy

    dataset = shared_copy(paths.dataset, paths.shared_dataset)
    with ray_session(params):
        runner = RayPasses(model, dataset, split.name, len(split), cfg.batch_size, cfg.workers,
                           cfg.gpus_per_worker, cfg.provider)
        return evaluate_split(model, split, cfg, plots_dir=plots_dir, runner=runner)


# A test split up to this size is read from the store once, not once per pass (the default's
# 693 images at 128 px: 45 MB, read in 1.8 s instead of 9 s over its 5 passes); a larger one
# is read a batch at a time in every pass, so evaluation's memory does not grow with it.
IN_MEMORY_BYTES = 256 * 1024**2


def in_memory(split: SplitReader) -> TestSplit:
    """``split`` as an :class:`ArraySplit` when its images and masks take at most
    :data:`IN_MEMORY_BYTES`, else as it is (read a batch at a time)."""
    from uml.data.store import take_images

    size = split.image_size
    if len(split) == 0 or len(split) * size * size * 4 > IN_MEMORY_BYTES:
        return split
    images, masks = take_images(split.data, split.ids)
    return ArraySplit(images, masks, split.labels, split.ids)


def to_json_ready(values: dict[str, float]) -> dict[str, float | None]:
    """Plain floats in key order; ``nan``/``inf`` become ``None`` (JSON ``null``)."""
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in values.items()}


def write_metrics(path: str | Path, values: dict[str, float]) -> dict[str, float | None]:
    """Write the flat metrics JSON atomically (a reader never sees half a file)."""
    ready = to_json_ready(values)
    write_text_replacing(path, json.dumps(ready, indent=2, allow_nan=False) + "\n")
    return ready


def evaluate(params: Params) -> dict[str, float | None]:
    """The ``evaluate`` stage: metrics.json and plots for the exported model on the test split."""
    from uml.data.store import SplitReader, open_prepared

    paths = Paths(params)
    model = OnnxModel(paths.model_onnx, paths.metadata, provider=params.evaluate.provider, setting="evaluate.provider")
    if not paths.dataset.exists():
        raise DataError(f"{paths.dataset}: prepared data set not found (run the prepare stage)")
    prepared = open_prepared(paths.dataset)
    if model.has_cls and len(prepared.class_names) != len(model.class_names):
        raise ModelFileError(
            f"{paths.metadata}: the model has {len(model.class_names)} classes {model.class_names}, "
            f"the data set {paths.dataset} has {len(prepared.class_names)} {list(prepared.class_names)}"
        )
    if model.has_cls and prepared.positive_class != model.positive_class:
        raise ModelFileError(
            f"{paths.metadata}: positive class {model.positive_class} differs from the data set's "
            f"{prepared.positive_class} ({paths.dataset}): re-run the export stage"
        )
    if model.has_seg and list(prepared.mask_classes) != model.mask_classes:
        raise ModelFileError(
            f"{paths.metadata}: mask classes {model.mask_classes} differ from the data set's {list(prepared.mask_classes)}"
        )
    if prepared.image_size != model.image_size:
        raise DataError(
            f"the model expects {model.image_size}x{model.image_size} RGB images, the test split of {paths.dataset} has "
            f"{prepared.image_size}x{prepared.image_size}: re-run prepare and export with the same data.image_size"
        )
    split = SplitReader(prepared, "test")  # verified once, above
    log.info("evaluating %s on %d test images (%s)", paths.model_onnx, len(split), ", ".join(model.outputs))

    # The outputs are built under staging names and replace the old ones only once all are
    # complete: a failure keeps the previous metrics.json, model card and plots/ together. The new
    # plots folder replaces the old one whole, dropping files of an earlier model (e.g. an ROC
    # curve that a segmentation-only model does not produce).
    staging_plots = paths.plots.with_name(f".{paths.plots.name}.partial")
    staging_metrics = paths.metrics.with_name(f".{paths.metrics.name}.partial")
    staging_card = paths.model_card.with_name(f".{paths.model_card.name}.partial")
    old_plots = paths.plots.with_name(f".{paths.plots.name}.old")
    for stale in (staging_plots, old_plots):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        values = _evaluate_store(params, model, split, paths, staging_plots)
        ready = write_metrics(staging_metrics, values)
        write_text_replacing(staging_card, model_card(ready, model.metadata, prepared.attrs))
    except BaseException:
        shutil.rmtree(staging_plots, ignore_errors=True)
        staging_metrics.unlink(missing_ok=True)
        staging_card.unlink(missing_ok=True)
        raise
    if paths.plots.exists():
        paths.plots.rename(old_plots)
    staging_plots.rename(paths.plots)
    os.replace(staging_card, paths.model_card)
    os.replace(staging_metrics, paths.metrics)
    shutil.rmtree(old_plots, ignore_errors=True)
    for key in ("cls/acc", "cls/auc", "cls/ece_debiased", "seg/dice_disc", "seg/dice_cup", "unc/error_auroc",
                "unc/pixel_error_auroc", "refer/coverage", "refer/risk"):
        if key in ready:
            log.info("%s = %s", key, ready[key])
    log.info("wrote %s, %s and %s", paths.metrics, paths.model_card, paths.plots)
    return ready
