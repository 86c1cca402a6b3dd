"""Inference with the exported ONNX model: the model wrapper shared with the evaluation stage, and
``uml predict`` on image files.

:class:`OnnxModel` opens ``model.onnx`` in onnxruntime together with the ``metadata.json`` written
next to it, and checks that the pair honours the export contract (input ``image`` (B, 3, S, S)
float32 in [0, 1]; outputs ``class_prob``, ``class_uncertainty``, ``seg_prob``,
``seg_uncertainty``, of which a single-task model has only its own pair). Anything else is a
:class:`~uml.errors.ModelFileError` that names the file.

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

The ONNX file must be the one its ``metadata.json`` describes: ``onnx_sha256`` in the metadata is
checked against the file (:class:`OnnxModel`), so a model and metadata of different exports are
refused instead of run with the wrong class names or preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from uml import metrics
from uml.errors import DataError, ModelFileError
from uml.image_io import RESAMPLING, read_rgb, resize_image

INPUT_NAME = "image"
CLASS_OUTPUTS = ("class_prob", "class_uncertainty")
SEG_OUTPUTS = ("seg_prob", "seg_uncertainty")
KNOWN_OUTPUTS = CLASS_OUTPUTS + SEG_OUTPUTS

# The overlay figure is 500 px per panel; a copy this size keeps it sharp and its memory small.
OVERLAY_MAX_SIDE = 1024
METADATA_SHA256_KEY = "onnx_sha256"


def _default_threads() -> int:
    # The machine is shared; two intra-op threads is what one stage may take.
    return max(1, min(2, os.cpu_count() or 1))


class OnnxModel:
    """An exported model in onnxruntime, checked against its ``metadata.json``.

    Attributes: ``path``, ``metadata_path``, ``metadata`` (the parsed JSON), ``outputs`` (the
    present output names, in session order), ``image_size``, ``class_names``, ``mask_classes``,
    ``positive_class``, ``has_cls``, ``has_seg``, ``has_class_uncertainty``,
    ``has_seg_uncertainty``.
    """

    def __init__(self, path: str | Path, metadata_path: str | Path | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.metadata_path = Path(metadata_path) if metadata_path is not None else self.path.with_name("metadata.json")
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: model file not found (run the export stage, or pass --model)")
        if not self.metadata_path.is_file():
            raise ModelFileError(f"{self.metadata_path}: metadata file not found (the export stage writes it next to model.onnx)")
        try:
            self.metadata: dict[str, Any] = json.loads(self.metadata_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"{self.metadata_path}: not valid JSON: {exc}") from None
        if not isinstance(self.metadata, dict):
            raise ModelFileError(f"{self.metadata_path}: expected a JSON object")

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: onnxruntime's warnings are not actionable here
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for every load failure
            raise ModelFileError(f"{self.path}: not a loadable ONNX model: {exc}") from None
        self._check_contract()
        check_model_hash(self.path, self.metadata, self.metadata_path)

    # ------------------------------------------------------------------ contract checks
    def _meta(self, *keys: str) -> Any:
        node: Any = self.metadata
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                raise ModelFileError(f"{self.metadata_path}: missing key '{'.'.join(keys)}'")
            node = node[key]
        return node

    def _check_contract(self) -> None:
        where = f"{self.path}"
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            names = [i.name for i in inputs]
            raise ModelFileError(f"{where}: expected one input named '{INPUT_NAME}', the model has {names}")
        shape = inputs[0].shape
        if inputs[0].type != "tensor(float)" or len(shape) != 4 or shape[1] not in (3, "3"):
            raise ModelFileError(f"{where}: input '{INPUT_NAME}' must be float32 (batch, 3, H, W), got {inputs[0].type} {shape}")
        if self._meta("input", "name") != INPUT_NAME:
            raise ModelFileError(f"{self.metadata_path}: input.name must be '{INPUT_NAME}', got {self._meta('input', 'name')!r}")

        try:
            self.image_size = int(self._meta("preprocessing", "image_size"))
        except (TypeError, ValueError):
            raise ModelFileError(f"{self.metadata_path}: preprocessing.image_size must be an integer") from None
        for dim in shape[2:]:
            if isinstance(dim, int) and dim != self.image_size:
                raise ModelFileError(f"{where}: input is {shape[2]}x{shape[3]} but metadata says image_size {self.image_size}")
        resize = self.metadata["preprocessing"].get("resize", "area")
        if resize not in RESAMPLING:
            raise ModelFileError(f"{self.metadata_path}: unknown preprocessing.resize {resize!r} (known: {sorted(RESAMPLING)})")
        self.resize = resize
        self.scale = float(self.metadata["preprocessing"].get("scale", 1.0 / 255.0))
        channels = self.metadata["preprocessing"].get("channels", "RGB")
        if channels not in ("RGB", "BGR"):
            raise ModelFileError(f"{self.metadata_path}: preprocessing.channels must be RGB or BGR, got {channels!r}")
        self.bgr = channels == "BGR"

        session_outputs = {o.name: o for o in self.session.get_outputs()}
        self.outputs = tuple(name for name in session_outputs if name in KNOWN_OUTPUTS)
        if "class_prob" not in session_outputs and "seg_prob" not in session_outputs:
            raise ModelFileError(
                f"{where}: has neither 'class_prob' nor 'seg_prob' among its outputs {list(session_outputs)}; "
                "not a model exported by uml"
            )
        declared = self._meta("outputs")
        if not isinstance(declared, dict):
            raise ModelFileError(f"{self.metadata_path}: 'outputs' must map output names to their description")
        missing = sorted(set(declared) - set(session_outputs))
        if missing:
            raise ModelFileError(f"{self.metadata_path}: lists outputs {missing} that {self.path.name} does not have")

        self.has_cls = "class_prob" in session_outputs
        self.has_seg = "seg_prob" in session_outputs
        self.has_class_uncertainty = self.has_cls and "class_uncertainty" in session_outputs
        self.has_seg_uncertainty = self.has_seg and "seg_uncertainty" in session_outputs
        self.class_names = [str(c) for c in self.metadata.get("class_names") or []]
        self.mask_classes = [str(c) for c in self.metadata.get("mask_classes") or []]
        self.positive_class = int(self.metadata.get("positive_class", 1))
        if self.has_cls:
            self._check_classes("class_prob", 1, self.class_names, "class_names", session_outputs)
            if not 0 <= self.positive_class < len(self.class_names):
                raise ModelFileError(f"{self.metadata_path}: positive_class {self.positive_class} is not a class index")
        if self.has_seg:
            self._check_classes("seg_prob", 1, self.mask_classes, "mask_classes", session_outputs)

    def _check_classes(self, output: str, axis: int, names: list[str], key: str, session_outputs: dict[str, Any]) -> None:
        if not names:
            raise ModelFileError(f"{self.metadata_path}: '{key}' is missing or empty, but the model has '{output}'")
        size = session_outputs[output].shape[axis] if len(session_outputs[output].shape) > axis else None
        if isinstance(size, int) and size != len(names):
            raise ModelFileError(f"{self.path}: '{output}' has {size} classes but metadata {key} lists {len(names)}")

    # ------------------------------------------------------------------------ inference
    def scale_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images (N, S, S, 3) at model resolution -> float32 NHWC in the model's value range."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"expected uint8 images (N, {self.image_size}, {self.image_size}, 3), got {images.shape}")
        return images.astype(np.float32) * np.float32(self.scale)

    def to_input(self, images: np.ndarray) -> np.ndarray:
        """Scaled float NHWC RGB images (from :meth:`scale_images`, possibly corrupted) -> the NCHW model input."""
        batch = np.asarray(images, dtype=np.float32)
        if self.bgr:
            batch = batch[..., ::-1]
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images (N, S, S, 3) at model resolution -> the float32 NCHW input."""
        return self.to_input(self.scale_images(images))

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One forward pass of a float32 (B, 3, S, S) batch; returns the present outputs by name."""
        values = self.session.run(list(self.outputs), {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(self.outputs, values))


def file_sha256(path: str | Path) -> str:
    with Path(path).open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def check_model_hash(model_path: Path, metadata: dict[str, Any], metadata_path: Path) -> None:
    """Raise :class:`ModelFileError` unless ``metadata`` records ``model_path``'s SHA-256: the export
    stage writes the pair together, and a pair from different exports (an interrupted export, a
    file copied from elsewhere) would otherwise run with the wrong names or preprocessing."""
    recorded = metadata.get(METADATA_SHA256_KEY)
    if not isinstance(recorded, str):
        raise ModelFileError(f"{metadata_path}: has no '{METADATA_SHA256_KEY}' (written by an older export); "
                             "re-run the export stage so that the model and its metadata are checked as a pair")
    actual = file_sha256(model_path)
    if actual != recorded:
        raise ModelFileError(f"{model_path}: its SHA-256 {actual[:16]}... is not the {recorded[:16]}... that "
                             f"{metadata_path} describes: the two files come from different exports (an interrupted "
                             "export?); re-run the export stage")


# -------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """One image's model outputs at model resolution (``None`` where the model lacks the output)."""

    size: tuple[int, int]  # (width, height) of the original image
    display: np.ndarray  # uint8 (h, w, 3): the image, at most OVERLAY_MAX_SIDE on its longer side
    class_prob: np.ndarray | None  # (K,)
    class_uncertainty: float | None
    mask: np.ndarray | None  # uint8 (S, S) argmax of seg_prob
    seg_uncertainty: np.ndarray | None  # float32 (S, S)


def display_copy(image: np.ndarray, max_side: int = OVERLAY_MAX_SIDE) -> np.ndarray:
    """``image`` shrunk (area averaging) so that its longer side is at most ``max_side``."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)


def predict_array(model: OnnxModel, image: np.ndarray) -> Prediction:
    """Run the model on one uint8 RGB image of any size. The prediction keeps a display-sized copy
    of the image, not the image itself."""
    small = resize_image(image, model.image_size, model.resize)
    out = model.run(model.preprocess(small[None]))
    return Prediction(
        size=(int(image.shape[1]), int(image.shape[0])),
        display=display_copy(image),
        class_prob=out["class_prob"][0].astype(np.float64) if model.has_cls else None,
        class_uncertainty=float(out["class_uncertainty"].reshape(-1)[0]) if model.has_class_uncertainty else None,
        mask=out["seg_prob"][0].argmax(axis=0).astype(np.uint8) if model.has_seg else None,
        seg_uncertainty=out["seg_uncertainty"][0, 0].astype(np.float32) if model.has_seg_uncertainty else None,
    )


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def summarize(model: OnnxModel, prediction: Prediction, source: str | Path) -> dict[str, Any]:
    """The ``<stem>.json`` record of one prediction."""
    width, height = prediction.size
    record: dict[str, Any] = {"image": str(source), "size": [width, height], "model_resolution": model.image_size}
    if prediction.class_prob is not None:
        index = int(prediction.class_prob.argmax())
        record.update(
            {
                "class": model.class_names[index],
                "class_index": index,
                "probability": float(prediction.class_prob[index]),
                "probabilities": {name: float(p) for name, p in zip(model.class_names, prediction.class_prob)},
            }
        )
        if prediction.class_uncertainty is not None:
            record["class_uncertainty"] = prediction.class_uncertainty
    if prediction.mask is not None:
        total = prediction.mask.size
        if tuple(model.mask_classes) == metrics.FUNDUS_MASK_CLASSES:
            record["vcdr"] = _finite_or_none(metrics.vertical_cdr(prediction.mask))
        for name, select in metrics.structures(model.mask_classes).items():
            pixels = int(select(prediction.mask).sum())
            record[f"{name}_area_pixels"] = pixels
            record[f"{name}_area_fraction"] = pixels / total
        if prediction.seg_uncertainty is not None:
            record["mean_pixel_uncertainty"] = float(prediction.seg_uncertainty.mean())
    return record


def _title(model: OnnxModel, record: dict[str, Any]) -> str:
    parts = []
    if "class" in record:
        parts.append(f"{record['class']}  p={record['probability']:.3f}")
        if "class_uncertainty" in record:
            parts.append(f"u={record['class_uncertainty']:.3f}")
    if record.get("vcdr") is not None:
        parts.append(f"vCDR={record['vcdr']:.2f}")
    return "   ".join(parts) or Path(record["image"]).name


def save_overlay(model: OnnxModel, prediction: Prediction, record: dict[str, Any], path: str | Path | IO[bytes]) -> None:
    """Write the overlay PNG (to a path or a binary stream): the image with translucent structure
    masks and contours, and the pixel-uncertainty heat map beside it when the model has one. It is
    drawn from the display copy of the image."""
    from matplotlib.figure import Figure

    from uml.plots import STRUCTURE_COLORS, draw_mask_overlay

    panels = 2 if prediction.seg_uncertainty is not None else 1
    fig = Figure(figsize=(5 * panels, 5.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    height, width = prediction.display.shape[:2]
    # Masks are at model resolution; the extent stretches them over the image.
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    axes[0].imshow(prediction.display)
    axes[0].set_title("prediction")
    if prediction.mask is not None:
        draw_mask_overlay(axes[0], prediction.mask, model.mask_classes, extent=extent)
        handles = [
            _legend_patch(STRUCTURE_COLORS[i % len(STRUCTURE_COLORS)], name)
            for i, name in enumerate(metrics.structures(model.mask_classes))
        ]
        axes[0].legend(handles=handles, loc="lower right", fontsize=8)
    if prediction.seg_uncertainty is not None:
        axes[1].imshow(prediction.display)
        heat = axes[1].imshow(prediction.seg_uncertainty, cmap="magma", vmin=0.0, vmax=1.0, alpha=0.7, extent=extent)
        axes[1].set_title("pixel uncertainty")
        fig.colorbar(heat, ax=axes[1], shrink=0.8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(_title(model, record))
    fig.savefig(path, dpi=100, format="png")


def _print_error(message: str) -> None:
    print(message, file=sys.stderr)


def _legend_patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor=color, alpha=0.6, label=label)


def write_replacing(folder: Path, name: str, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``folder/name`` through a new temporary file in ``folder`` renamed over it.

    The temporary file is created exclusively (it never opens an existing file or link), and the
    rename replaces whatever entry ``name`` was, a symbolic link included, without following it.
    A failed write leaves the old file and no temporary one."""
    target = folder / name
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary new file would be, not mkstemp's 0600
        with os.fdopen(fd, "wb") as stream:
            write(stream)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


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
    stems: dict[str, Path] = {}
    for image in map(Path, images):
        if image.stem in stems and stems[image.stem] != image:
            raise DataError(f"{image}: has the same name stem as {stems[image.stem]}; their outputs would overwrite each other")
        stems[image.stem] = image
    out_dir = output_folder(out_dir)
    records, errors = [], []
    for i, image_path in enumerate(stems.values(), start=1):
        try:
            prediction = predict_array(model, read_rgb(image_path))
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
