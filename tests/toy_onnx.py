"""A tiny deterministic model with the ONNX export contract, and matching fundus-like test data.

The toy model reads pixel brightness (channel mean) ``b``: background below 0.45, disc rim
between 0.45 and 0.75, cup above 0.75, with evidence growing with the distance from those
thresholds (so pixels near a threshold are uncertain). Its glaucoma evidence grows with
``sqrt(cup area / disc area) - 0.5`` (the cup-to-disc radius ratio for circles). On the images of
:func:`fundus_set` it therefore segments perfectly and classifies by the drawn cup/disc ratio,
which makes every metric predictable.

Its outputs follow the export contract with temperatures of 1 (the calibrated outputs are the raw
ones): ``class_prob`` = ``class_prob_raw`` = alpha/S, ``class_uncertainty`` = 1 - max p,
``class_uncertainty_raw`` = K/S, ``seg_prob`` = alpha/S per pixel, ``seg_uncertainty`` its
normalised entropy, ``seg_uncertainty_raw`` = C/S. The metadata's calibration carries a referral
threshold (:data:`REFERRAL_THRESHOLD`), an unusual-image rule fitted on :func:`fundus_set` and a
vCDR interval (:data:`VCDR_HALFWIDTH`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

BACKGROUND = (0.30, 0.20, 0.10)  # channel mean 0.2
RIM = (0.80, 0.60, 0.40)  # 0.6
CUP = (1.00, 0.90, 0.80)  # 0.9
CLASS_NAMES = ["non-glaucoma", "glaucoma"]
MASK_CLASSES = ["background", "disc", "cup"]
# Cup/disc radius ratios of the 20 test images; 0.48 and 0.53 (nearest to the 0.5 decision
# threshold, hence the most uncertain) get flipped labels.
RATIOS = [0.20, 0.24, 0.28, 0.32, 0.36, 0.40, 0.43, 0.48, 0.53, 0.57,
          0.60, 0.64, 0.68, 0.72, 0.76, 0.80, 0.22, 0.34, 0.66, 0.78]
FLIPPED = (0.48, 0.53)
DISC_RADIUS = 20
REFERRAL_THRESHOLD = 0.2
VCDR_HALFWIDTH = 0.05


class ToyUML(nn.Module):
    def __init__(self, tasks: tuple[str, ...] = ("cls", "seg"), sharpness: float = 40.0):
        super().__init__()
        self.tasks = tasks
        self.k = sharpness

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = image.mean(dim=1, keepdim=True)
        logits = torch.cat([0.45 - b, torch.minimum(b - 0.45, 0.75 - b), b - 0.75], dim=1) * self.k
        evidence = 5.0 * F.softplus(logits)
        strength = (evidence + 1.0).sum(dim=1, keepdim=True)
        seg_prob, seg_unc = (evidence + 1.0) / strength, 3.0 / strength
        seg_entropy = -(seg_prob * torch.log(seg_prob)).sum(dim=1, keepdim=True) / math.log(3.0)

        disc = torch.sigmoid(self.k * (b - 0.45)).sum(dim=(1, 2, 3))
        cup = torch.sigmoid(self.k * (b - 0.75)).sum(dim=(1, 2, 3))
        z = self.k * (torch.sqrt(cup / (disc + 1e-6)) - 0.5)
        class_evidence = F.softplus(torch.stack([-z, z], dim=1))
        class_strength = (class_evidence + 1.0).sum(dim=1, keepdim=True)
        class_prob, class_unc = (class_evidence + 1.0) / class_strength, 2.0 / class_strength

        outputs = []
        if "cls" in self.tasks:
            outputs += [class_prob, 1.0 - class_prob.amax(dim=1, keepdim=True), class_prob, class_unc]
        if "seg" in self.tasks:
            outputs += [seg_prob, seg_entropy, seg_unc]
        return tuple(outputs)


def output_names(tasks: tuple[str, ...]) -> list[str]:
    names = []
    if "cls" in tasks:
        names += ["class_prob", "class_uncertainty", "class_prob_raw", "class_uncertainty_raw"]
    if "seg" in tasks:
        names += ["seg_prob", "seg_uncertainty", "seg_uncertainty_raw"]
    return names


def calibration(tasks: tuple[str, ...], image_size: int) -> dict:
    """The toy's metadata ``calibration``: no temperatures (1), a referral threshold, an
    unusual-image rule centred on the toy's own :func:`fundus_set` and a vCDR interval.

    The drawn images hardly vary, so the rule's scales are set by hand (0.05 for every statistic,
    0.01 for the noise) rather than fitted: a drawn fundus of another size or ratio stays ordinary,
    noise of standard deviation 0.1 or more lies beyond the threshold of 5."""
    from uml.calibration import ReferralRule, UnusualRule
    from uml.quality import unusual_features

    images = fundus_set(image_size)[0].astype(np.float32) / 255.0
    seg_uncertainty = None
    if "seg" in tasks:
        with torch.no_grad():
            seg_uncertainty = ToyUML(tasks)(torch.from_numpy(images.transpose(0, 3, 1, 2)))[-2].numpy()
    features, names = unusual_features(images, seg_uncertainty)
    scale = [0.01 if name == "noise" else 0.05 for name in names]
    unusual = UnusualRule(statistics=names, center=np.median(features, axis=0).tolist(), scale=scale, threshold=5.0,
                          alpha=0.05, calibration_images=20)
    referral = (ReferralRule(threshold=REFERRAL_THRESHOLD, risk=0.1, delta=0.1, calibration_images=20,
                             calibration_coverage=0.5, calibration_risk=0.0) if "cls" in tasks else None)
    return {"format": "uml-calibration/1", "split": "calib", "num_images": 20, "model_sha256": "toy",
            "referral": referral.model_dump() if referral else None, "unusual": unusual.model_dump(),
            "vcdr_interval": ({"coverage": 0.9, "halfwidth": VCDR_HALFWIDTH, "by_class": {}, "calibration_images": 20}
                              if "seg" in tasks else None),
            "min_image_side": 16}


def metadata(image_size: int, tasks: tuple[str, ...]) -> dict:
    shapes = {
        "class_prob": ["batch", 2],
        "class_uncertainty": ["batch", 1],
        "class_prob_raw": ["batch", 2],
        "class_uncertainty_raw": ["batch", 1],
        "seg_prob": ["batch", 3, image_size, image_size],
        "seg_uncertainty": ["batch", 1, image_size, image_size],
        "seg_uncertainty_raw": ["batch", 1, image_size, image_size],
    }
    return {
        "format": "uml-onnx/2",
        "input": {"name": "image", "dtype": "float32", "shape": ["batch", 3, image_size, image_size], "range": [0.0, 1.0]},
        "outputs": {n: {"shape": shapes[n], "dtype": "float32", "range": [0, 1]} for n in output_names(tasks)},
        "class_names": CLASS_NAMES,
        "mask_classes": MASK_CLASSES,
        "preprocessing": {"image_size": image_size, "channels": "RGB", "layout": "NCHW",
                          "scale": 1.0 / 255.0, "resize": "area"},
        "tasks": list(tasks),
        "uncertainty": True,
        "positive_class": 1,
        "calibration": calibration(tasks, image_size),
    }


def export_toy(folder: Path, image_size: int = 64, tasks: tuple[str, ...] = ("cls", "seg"),
               input_name: str = "image", names: list[str] | None = None) -> Path:
    """Export :class:`ToyUML` to ``folder/model.onnx`` with ``folder/metadata.json``; returns the model path.

    ``input_name`` and ``names`` (output names) can be changed to build contract-breaking models.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    names = names or output_names(tasks)
    dynamic = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    torch.onnx.export(ToyUML(tasks).eval(), (torch.rand(1, 3, image_size, image_size),), str(path),
                      dynamo=False, input_names=[input_name], output_names=names, dynamic_axes=dynamic,
                      opset_version=17)
    # The pair is checked by the SHA-256 of the model, as the export stage records it.
    meta = {**metadata(image_size, tasks), "onnx_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return path


def draw_fundus(size: int, disc_radius: float, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 RGB image and its label mask: a centred disc with a cup of ``ratio * disc_radius``."""
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2
    mask = np.zeros((size, size), np.uint8)
    mask[r2 <= disc_radius**2] = 1
    mask[r2 <= (ratio * disc_radius) ** 2] = 2
    palette = np.round(np.array([BACKGROUND, RIM, CUP]) * 255).astype(np.uint8)
    return palette[mask], mask


def fundus_set(size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20 images, masks and labels (label 1 when ratio > 0.5, flipped for :data:`FLIPPED`)."""
    images, masks, labels = [], [], []
    for ratio in RATIOS:
        image, mask = draw_fundus(size, DISC_RADIUS * size / 64, ratio)
        images.append(image)
        masks.append(mask)
        label = int(ratio > 0.5)
        labels.append(1 - label if ratio in FLIPPED else label)
    return np.stack(images), np.stack(masks), np.array(labels, dtype=np.int64)


def imperfect_set(n: int = 24, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drawn fundus images the toy gets partly wrong: discs of varied size and ratio, each image
    shifted against its mask and every third blurred, so that Dice, distances, vCDR errors and
    the pixel AUROCs all take non-trivial values."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    images, masks, labels = [], [], []
    for i in range(n):
        ratio = rng.uniform(0.2, 0.8)
        image, mask = draw_fundus(size, rng.uniform(14, 24), ratio)
        image = np.roll(image, rng.integers(-6, 7), axis=1)
        if i % 3 == 0:
            image = ndimage.gaussian_filter(image.astype(np.float32), sigma=(1.5, 1.5, 0)).round().astype(np.uint8)
        images.append(image)
        masks.append(mask)
        labels.append(int((ratio > 0.5) ^ (rng.random() < 0.1)))
    return np.stack(images), np.stack(masks), np.array(labels, dtype=np.int64)


def write_toy_root(tmp_path: Path, toy_dir: Path, data) -> Path:
    """A data root under ``tmp_path`` holding a prepared store of ``data`` (images, masks, labels:
    half of them the test split) and a copy of the exported toy in ``toy_dir``."""
    import shutil

    from uml.data.records import Record
    from uml.data.store import write_dataset

    images, masks, labels = data
    root = tmp_path / "data"
    records = [Record(id=f"toy-{i:02d}", image=im, mask=m, label=int(y), origin=f"toy #{i}")
               for i, (im, m, y) in enumerate(zip(images, masks, labels))]
    write_dataset(records, root / "prepared" / "dataset.zarr", class_names=["non-glaucoma", "glaucoma"],
                  mask_classes=["background", "disc", "cup"], positive_class=1, source="toy", image_size=64,
                  split={"val": 0.2, "test": 0.5, "calib": 0.1}, seed=0)
    shutil.copytree(toy_dir, root / "models")
    return root


def move_model_away_once_shipped(monkeypatch, module, folder: Path, away: Path) -> None:
    """Patch ``module.model_files`` (the driver reading the model's files to ship to Ray tasks) so
    that the model's ``folder`` moves to ``away`` right after: a task that opens the driver's path
    instead of the shipped bytes then fails, as it would on a node without that folder."""
    read = module.model_files

    def read_then_move(model):
        files = read(model)
        folder.rename(away)
        return files

    monkeypatch.setattr(module, "model_files", read_then_move)
