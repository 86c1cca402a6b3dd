"""Tiny on-disk fixtures for the data tests: folder and REFUGE layouts written in tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from uml.config import Params, parse_params


def rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth-ish random RGB image (so resizing is not just noise averaging)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3)).astype(np.uint8)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def disc_cup(h: int, w: int, seed: int) -> np.ndarray:
    """Class mask 0/1/2: a disc ellipse with a cup ellipse inside."""
    rng = np.random.default_rng(seed)
    cy, cx = int(h * rng.uniform(0.35, 0.65)), int(w * rng.uniform(0.35, 0.65))
    rd = int(min(h, w) * rng.uniform(0.2, 0.3))
    rc = max(1, int(rd * rng.uniform(0.3, 0.7)))
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (cx, cy), (rd, rd + 1), 0, 0, 360, 1, -1)
    cv2.ellipse(mask, (cx, cy), (rc, rc + 1), 0, 0, 360, 2, -1)
    return mask


def save(path: Path, arr: np.ndarray, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def make_folder(root: Path, labels: dict[str, str], *, size: tuple[int, int] = (40, 48), image_ext: str = ".png",
                header: str = "id,label") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """images/<id><ext>, masks/<id>.png (class indices), labels.csv; returns {id: (image, mask)}."""
    h, w = size
    written = {}
    for i, (item_id, _) in enumerate(sorted(labels.items())):
        image, mask = rgb(h, w, i), disc_cup(h, w, 100 + i)
        save(root / "images" / f"{item_id}{image_ext}", image, **({"quality": 95} if image_ext == ".jpg" else {}))
        save(root / "masks" / f"{item_id}.png", mask)
        written[item_id] = (image, mask)
    lines = [header] + [f"{k},{v}" for k, v in labels.items()]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return written


REFUGE_GREY = {0: 255, 1: 128, 2: 0}  # class -> REFUGE grey level


def refuge_mask(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for cls, grey in REFUGE_GREY.items():
        out[mask == cls] = grey
    return out


def make_refuge_training400(root: Path, ids: dict[str, int], size: tuple[int, int] = (32, 32)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """REFUGE-Training400 style: Training400/<class>/<id>.png, Annotation-Training400/Disc_Cup_Masks/<class>/<id>.bmp."""
    h, w = size
    written = {}
    for i, (item_id, label) in enumerate(sorted(ids.items())):
        cls = "Glaucoma" if label else "Non-Glaucoma"
        image, mask = rgb(h, w, i), disc_cup(h, w, 50 + i)
        save(root / "REFUGE-Training400" / "Training400" / cls / f"{item_id}.png", image)
        save(root / "Annotation-Training400" / "Disc_Cup_Masks" / cls / f"{item_id}.bmp", refuge_mask(mask))
        written[item_id] = (image, mask)
    # The overlay pictures of the release must not be taken for inputs.
    save(root / "Annotation-Training400" / "Disc_Cup_Fovea_Illustration" / "g0001.jpg", rgb(h, w, 99))
    return written


def make_refuge_flat(root: Path, ids: dict[str, str], size: tuple[int, int] = (32, 32),
                     header: str = "ImgName,Glaucoma Label", images: str = "REFUGE-Validation400",
                     gt: str = "REFUGE-Validation400-GT", seed: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """REFUGE-Validation400 style: <images>/<id>.png, <gt>/Disc_Cup_Masks/<id>.bmp, <gt>/Glaucoma_label.csv."""
    h, w = size
    written = {}
    for i, item_id in enumerate(sorted(ids)):
        image, mask = rgb(h, w, seed + i), disc_cup(h, w, seed + 50 + i)
        save(root / images / f"{item_id}.png", image)
        save(root / gt / "Disc_Cup_Masks" / f"{item_id}.bmp", refuge_mask(mask))
        written[item_id] = (image, mask)
    rows = [header] + [f"{k}.jpg,{v}" for k, v in ids.items()]
    (root / gt / "Glaucoma_label.csv").write_text("\n".join(rows) + "\n")
    return written


def make_refuge_challenge(root: Path, train: dict[str, int], validation: dict[str, int],
                          test: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three parts of the challenge release as REFUGE ships them: Training400 in class folders,
    Validation400 and Test400 flat with a label CSV each (``{id: 1 glaucoma / 0 not}``)."""
    written = make_refuge_training400(root, train)
    written |= make_refuge_flat(root, {k: str(v) for k, v in validation.items()})
    written |= make_refuge_flat(root, {k: str(v) for k, v in test.items()}, images="REFUGE-Test400/Test400",
                                gt="REFUGE-Test-GT", seed=500)
    return written


def params_for(tmp_path: Path, **data: Any) -> Params:
    """Params with data.root under tmp_path and small sizes; ``data`` overrides the data section.

    The split shares are fixed here (val 0.07, test 0.25, calib 0.25; a ``split`` override updates
    them) because the tests' hand-counted split sizes follow from them, while the schema's defaults
    are sized for the synthetic default's 2100 images and leave a few-image set's val split empty."""
    raw: dict[str, Any] = {"root": str(tmp_path / "out"), "image_size": 32}
    split = {"val": 0.07, "test": 0.25, "calib": 0.25, **data.pop("split", {})}
    raw.update(data, split=split)
    return parse_params({"data": raw}, source="<test>")


def store_path(tmp_path: Path) -> Path:
    return tmp_path / "out" / "prepared" / "dataset.zarr"


def leftovers(tmp_path: Path) -> list[Path]:
    """Anything prepare left in the prepared/ folder (a failed run must leave nothing)."""
    folder = tmp_path / "out" / "prepared"
    return sorted(folder.iterdir()) if folder.exists() else []
