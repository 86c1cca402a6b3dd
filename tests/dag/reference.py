"""Independent references for the miniature DAG's checks: the exported model run in onnxruntime
directly (not through uml.predict), the store read with zarr directly (not through uml.data), and
the metrics written out from their definitions with numpy, scipy's cdist and scikit-learn, never
by calling uml.metrics. A test that compares uml's value with one of these can fail."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import zarr
from scipy.spatial.distance import cdist


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (n, S, S, 3)
    masks: np.ndarray  # uint8 (n, S, S)
    labels: np.ndarray  # int64 (n,)
    index: np.ndarray  # int64 (n,) positions in the store


def read_split(store: Path, name: str | None) -> Split:
    """A split of the prepared store (``None``: every image), read with zarr alone."""
    group = zarr.open_group(store, mode="r")
    index = np.arange(group["labels"].shape[0]) if name is None else np.asarray(group[f"splits/{name}"][:])
    return Split(np.asarray(group["images"][:])[index], np.asarray(group["masks"][:])[index],
                 np.asarray(group["labels"][:])[index], index)


def onnx_outputs(model_path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """The ONNX model in a plain onnxruntime session on uint8 RGB images at model resolution,
    preprocessed as docs/reference/onnx.md states: divided by 255, NCHW."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    batch = np.ascontiguousarray(images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": batch})))


# --------------------------------------------------------------------------- classification
def rank_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(tie), over all pairs (Mann-Whitney)."""
    score, positive = np.asarray(score, np.float64), np.asarray(positive, bool)
    pos, neg = score[positive], score[~positive]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def cohen_kappa(labels: np.ndarray, pred: np.ndarray) -> float:
    """(p_observed - p_chance) / (1 - p_chance) for two binary raters."""
    p_o = np.mean(labels == pred)
    p_e = np.mean(labels == 1) * np.mean(pred == 1) + np.mean(labels == 0) * np.mean(pred == 0)
    return math.nan if p_e == 1 else float((p_o - p_e) / (1 - p_e))


def ece(labels: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-width right-closed bins (0, 0.1], ..., (0.9, 1] of the
    predicted class's probability, looped over bin by bin."""
    confidence, correct = prob.max(axis=1), prob.argmax(axis=1) == labels
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (confidence > low) & (confidence <= high) if b else (confidence <= high)
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return total / len(labels)


# ----------------------------------------------------------------------------- segmentation
def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def surface_points(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.argwhere(mask & ~interior)


def assd_hd95(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(ASSD, HD95) from all pairwise distances of the two surfaces; nan when one mask is empty."""
    if not a.any() and not b.any():
        return 0.0, 0.0
    if not a.any() or not b.any():
        return math.nan, math.nan
    d = cdist(surface_points(a), surface_points(b))
    a_to_b, b_to_a = d.min(axis=1), d.min(axis=0)
    return (a_to_b.mean() + b_to_a.mean()) / 2, max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))


def vertical_cdr(mask: np.ndarray) -> float:
    """Rows spanned by the cup / rows spanned by the disc (rim and cup); nan without a disc."""
    def rows(binary: np.ndarray) -> int:
        hit = np.nonzero(binary.any(axis=1))[0]
        return 0 if hit.size == 0 else int(hit.max() - hit.min() + 1)

    disc = rows(mask >= 1)
    return math.nan if disc == 0 else rows(mask == 2) / disc


STRUCTURES = {"disc": lambda m: m >= 1, "cup": lambda m: m == 2}  # REFUGE: the disc is rim and cup
