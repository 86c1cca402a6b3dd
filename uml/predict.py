"""``uml predict`` on image files, with an exported model opened by
:class:`uml.onnx_model.OnnxModel` (which checks the model against its ``metadata.json``).

Accepted image files (:func:`uml.image_io.read_rgb`): anything Pillow reads as one 2-D frame with
1 (grayscale), 2 (grayscale + alpha), 3 (RGB) or 4 (RGBA) channels, 8-bit, or 16-bit grayscale
(scaled to 8 bit, as the data importers do). Grayscale is replicated to the three RGB channels, alpha is dropped (not
composited), palette images are expanded to RGB. Rejected, with an error naming the file: files
Pillow cannot read, multi-frame files (TIFF stacks, animations: a 4-D image), TIFFs whose samples
per pixel do not match a supported layout (e.g. a 2-channel TIFF without an alpha channel, which
Pillow would otherwise silently read as grayscale), and floating-point images (their value range
is unknown).

``uml predict`` on a batch of files: each file that cannot be read (not an image, a decompression
bomb, an unsupported layout) or written is reported with its name and skipped, the others are
still predicted, and the exit status is 1 if any failed. Memory stays bounded by the decoded
image: files above Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` x 2, about 179
million pixels) are refused before decoding, and the overlay is drawn from a copy at most
``OVERLAY_MAX_SIDE`` pixels on its longer side, never at full size. Outputs are written to a
temporary file in the output folder and renamed over ``<stem>.json`` / ``<stem>_overlay.png``, so a
symbolic link already there is replaced, never followed, and no half-written file is left.

The overlay figure is drawn by :func:`uml.plots.overlay_figure`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from uml import metrics
from uml.atomic import write_replacing
from uml.errors import DataError
from uml.fundus import FUNDUS_MASK_CLASSES
from uml.image_io import read_rgb, resize_image
from uml.onnx_model import ModelFiles, OnnxModel, model_files, open_model_files

# The overlay figure is 500 px per panel; a copy this size keeps it sharp and its memory small.
OVERLAY_MAX_SIDE = 1024


# -------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """One image's model outputs at model resolution (``None`` where the model lacks the output)."""

    size: tuple[int, int]  # (width, height) of the original image
    display: np.ndarray  # uint8 (h, w, 3): the image, at most OVERLAY_MAX_SIDE on its longer side
    outputs: dict[str, np.ndarray]  # every model output for this image, batch axis dropped
    unusual_features: np.ndarray  # (F,) the unusual-image rule's features

    @property
    def mask(self) -> np.ndarray | None:
        """uint8 (S, S): the delivered mask, the argmax of ``seg_prob``."""
        return self.outputs["seg_prob"].argmax(axis=0).astype(np.uint8) if "seg_prob" in self.outputs else None

    @property
    def seg_uncertainty(self) -> np.ndarray | None:
        """float32 (S, S): the delivered mask's error map."""
        return self.outputs["seg_uncertainty"][0] if "seg_uncertainty" in self.outputs else None


def display_copy(image: np.ndarray, max_side: int = OVERLAY_MAX_SIDE) -> np.ndarray:
    """``image`` shrunk (area averaging) so that its longer side is at most ``max_side``."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)


def predict_array(model: OnnxModel, image: np.ndarray, source: str | Path = "image") -> Prediction:
    """Run the model on one uint8 RGB image of any size at least ``calibration.min_image_side`` on
    its shorter side (a smaller one is a :class:`DataError` naming ``source``). The prediction
    keeps a display-sized copy of the image, not the image itself."""
    height, width = image.shape[:2]
    smallest = model.calibration.min_image_side
    if min(height, width) < smallest:
        raise DataError(f"{source}: {width}x{height} px is too small to hold a fundus photograph: the model needs at "
                        f"least {smallest} px on the shorter side (metadata.json calibration.min_image_side)")
    small = resize_image(image, model.image_size, model.resize)
    scaled = model.scale_images(small[None])
    out = model.run(model.to_input(scaled))
    return Prediction(
        size=(int(width), int(height)),
        display=display_copy(image),
        outputs={name: value[0] for name, value in out.items()},
        unusual_features=model.unusual_features(scaled, out.get("seg_uncertainty"))[0],
    )


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def referral(model: OnnxModel, prediction: Prediction, vcdr: float | None) -> list[str]:
    """Why this image goes to a human (empty: the model's answer is accepted): the referral rule
    on the calibrated class uncertainty, the unusual-image rule, and a fundus mask without a disc."""
    calibration, reasons = model.calibration, []
    rule = calibration.referral
    if rule is not None and "class_uncertainty" in prediction.outputs:
        uncertainty = float(prediction.outputs["class_uncertainty"][0])
        promise = (f"the rule keeps the error rate among accepted cases <= {rule.risk:g} with probability >= "
                   f"{1 - rule.delta:g}")
        if rule.threshold is None:
            reasons.append(f"every case is referred: no threshold could be certified on the calibration split ({promise})")
        elif not rule.accept(np.array([uncertainty]))[0]:
            reasons.append(f"uncertain classification: estimated error probability {uncertainty:.3f} > threshold "
                           f"{rule.threshold:.3f} ({promise})")
    if calibration.unusual.flag(prediction.unusual_features[None])[0]:
        reasons.append(calibration.unusual.reason(prediction.unusual_features))
    if prediction.mask is not None and tuple(model.mask_classes) == FUNDUS_MASK_CLASSES and vcdr is None:
        reasons.append("no optic disc found in the segmentation")
    return reasons


def summarize(model: OnnxModel, prediction: Prediction, source: str | Path) -> dict[str, Any]:
    """The ``<stem>.json`` record of one prediction."""
    width, height = prediction.size
    out = prediction.outputs
    record: dict[str, Any] = {"image": str(source), "size": [width, height], "model_resolution": model.image_size}
    raw: dict[str, Any] = {}
    if "class_prob" in out:
        prob = out["class_prob"].astype(np.float64)
        index = int(prob.argmax())
        record.update(
            {
                "class": model.class_names[index],
                "class_index": index,
                "probability": float(prob[index]),
                "probabilities": {name: float(p) for name, p in zip(model.class_names, prob)},
                "class_uncertainty": float(out["class_uncertainty"][0]),
            }
        )
        raw["probabilities"] = {name: float(p) for name, p in zip(model.class_names, out["class_prob_raw"])}
        raw["class_uncertainty"] = float(out["class_uncertainty_raw"][0])
    vcdr = None
    mask = prediction.mask
    if mask is not None:
        total = mask.size
        if tuple(model.mask_classes) == FUNDUS_MASK_CLASSES:
            vcdr = _finite_or_none(metrics.vertical_cdr(mask))
            record["vcdr"] = vcdr
            interval = model.calibration.vcdr_interval
            bounds = interval.interval(vcdr, record.get("class")) if interval is not None and vcdr is not None else None
            record["vcdr_interval"] = list(bounds) if bounds is not None else None
            record["vcdr_interval_coverage"] = interval.coverage if interval is not None else None
        for name, select in metrics.structures(model.mask_classes).items():
            pixels = int(select(mask).sum())
            record[f"{name}_area_pixels"] = pixels
            record[f"{name}_area_fraction"] = pixels / total
        record["mean_pixel_uncertainty"] = float(out["seg_uncertainty"].mean())
        raw["mean_pixel_uncertainty"] = float(out["seg_uncertainty_raw"].mean())
    record["raw"] = raw
    unusual = model.calibration.unusual
    record["unusual_score"] = float(unusual.score(prediction.unusual_features[None])[0])
    record["unusual_threshold"] = unusual.threshold
    reasons = referral(model, prediction, vcdr)
    record["refer"] = bool(reasons)
    record["refer_reasons"] = reasons
    return record


def _title(model: OnnxModel, record: dict[str, Any]) -> str:
    parts = []
    if "class" in record:
        parts.append(f"{record['class']}  p={record['probability']:.3f}")
    if record.get("vcdr") is not None:
        interval = record.get("vcdr_interval")
        bounds = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        parts.append(f"vCDR={record['vcdr']:.2f}{bounds}")
    parts.append("REFER" if record.get("refer") else "accept")
    return "   ".join(parts) or Path(record["image"]).name


def save_overlay(model: OnnxModel, prediction: Prediction, record: dict[str, Any], path: str | Path | IO[bytes]) -> None:
    """Write the overlay PNG of one prediction (to a path or a binary stream); see
    :func:`uml.plots.overlay_figure`. It is drawn from the display copy of the image."""
    # matplotlib is imported only when a figure is drawn, not when the CLI starts.
    from uml.plots import overlay_figure

    overlay_figure(path, prediction.display, prediction.mask, prediction.seg_uncertainty, model.mask_classes,
                   _title(model, record))


def _print_error(message: str) -> None:
    print(message, file=sys.stderr)


def output_folder(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed; a :class:`DataError` when it is a file or cannot be made."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out must be a folder, but a file of that name exists")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out}: cannot create the output folder: {exc.strerror or exc}") from None
    return out


def _unique_stems(images: Sequence[str | Path]) -> dict[str, Path]:
    """Stem -> file, in order; a :class:`DataError` for two files whose outputs would collide."""
    stems: dict[str, Path] = {}
    for image in map(Path, images):
        if image.stem in stems and stems[image.stem] != image:
            raise DataError(f"{image}: has the same name stem as {stems[image.stem]}; their outputs would overwrite each other")
        stems[image.stem] = image
    return stems


def predict_files(
    model: OnnxModel,
    images: Sequence[str | Path],
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    log_error: Callable[[str], None] = _print_error,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Predict every image file into ``out_dir`` (``<stem>.json`` and ``<stem>_overlay.png``).

    ``log`` gets one progress line per image, ``log_error`` the message of each file that cannot
    be read or whose outputs cannot be written; such a file is skipped, so one bad file does not
    lose the rest. Returns the records written and the error messages. A bad ``out_dir`` (a file,
    or not creatable) or two images with the same stem raise :class:`DataError` before anything is
    predicted."""
    stems = _unique_stems(images)
    out_dir = output_folder(out_dir)
    records, errors = [], []
    for i, image_path in enumerate(stems.values(), start=1):
        try:
            prediction = predict_array(model, read_rgb(image_path), image_path)
            record = summarize(model, prediction, image_path)
            json_path = write_replacing(out_dir, f"{image_path.stem}.json",
                                        lambda stream: stream.write((json.dumps(record, indent=2) + "\n").encode()))
            write_replacing(out_dir, f"{image_path.stem}_overlay.png",
                            lambda stream: save_overlay(model, prediction, record, stream))
        except DataError as exc:
            errors.append(str(exc))
            log_error(f"[{i}/{len(stems)}] error: {exc}")
            continue
        except OSError as exc:  # the output folder: full, read-only, a folder where a file should go
            message = f"{image_path}: cannot write its outputs to {out_dir}: {exc}"
            errors.append(message)
            log_error(f"[{i}/{len(stems)}] error: {message}")
            continue
        records.append(record)
        log(f"[{i}/{len(stems)}] {image_path}: {_title(model, record)} -> {json_path}")
    return records, errors


# ------------------------------------------------------------------------ over Ray tasks
def _predict_shard(files: ModelFiles, provider: str, images: list[str],
                   out_dir: str) -> tuple[list[dict[str, Any]], list[str], str]:
    """One shard of :func:`predict_files_on_ray`, in a Ray task: the task opens the model from the
    files that came through Ray's object store (one onnxruntime thread: the task holds one CPU)
    and writes its images' outputs into the shared output folder."""
    import ray

    model = open_model_files(files, threads=1, provider=provider, setting="--provider")
    records, errors = predict_files(model, images, out_dir, log=lambda line: None, log_error=lambda line: None)
    return records, errors, ray.get_runtime_context().get_node_id()


def predict_files_on_ray(
    model: OnnxModel,
    images: Sequence[str | Path],
    out_dir: str | Path,
    workers: int,
    gpus_per_worker: float = 0.0,
    provider: str = "auto",
    log: Callable[[str], None] = print,
    log_error: Callable[[str], None] = _print_error,
) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`predict_files` with the files cut into ``workers`` contiguous shards, each run as a
    Ray task (one CPU, ``gpus_per_worker`` GPUs) on the connected Ray instance or cluster, spread
    over its nodes. Every file and ``out_dir`` must be reachable at the same path from every node
    (shared storage); the tasks get absolute paths (a Ray task does not run in the driver's
    folder), so each record's ``source`` is the file's absolute path. The model travels through
    Ray's object store (:func:`uml.onnx_model.model_files`), put once. Otherwise each
    file's outputs are those :func:`predict_files` writes for it. Returns the records in the
    files' order and the error messages; ``log`` gets a line per finished shard, ``log_error``
    each file's error."""
    import ray

    stems = _unique_stems(images)  # the same checks as one process, before any task starts
    out_dir = output_folder(out_dir)
    files = [str(path.resolve()) for path in stems.values()]
    size = max(1, math.ceil(len(files) / max(workers, 1)))
    shards = [files[first:first + size] for first in range(0, len(files), size)]
    # SPREAD: the shards go to every node. A task lost with its node runs again elsewhere
    # (max_retries): its outputs are replaced atomically, file by file.
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_worker, max_retries=2, scheduling_strategy="SPREAD")(_predict_shard)
    shipped = ray.put(model_files(model))
    pending = {task.remote(shipped, provider, shard, str(out_dir.resolve())): index for index, shard in enumerate(shards)}
    log(f"predicting {len(files)} images as {len(shards)} Ray tasks of at most {size} images each")
    done: dict[int, list[dict[str, Any]]] = {}
    errors: list[str] = []
    nodes: set[str] = set()
    finished = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ready[0])
        done[index], shard_errors, node = ray.get(ready[0])
        nodes.add(node)
        for message in shard_errors:
            log_error(f"error: {message}")
        errors += shard_errors
        finished += len(shards[index])
        log(f"[{finished}/{len(files)}] shard {index + 1} of {len(shards)}: {len(done[index])} predicted, "
            f"{len(shard_errors)} failed")
    log(f"the {len(shards)} tasks ran on {len(nodes)} Ray node(s); outputs in {out_dir}")
    return [record for index in range(len(shards)) for record in done[index]], errors

