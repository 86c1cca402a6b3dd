"""Inside a trained model under input noise: how the final and the mutual masks, the pixel
uncertainty U and the navigator's gate exp(-U) change from clean to noisy test images.

    python benchmarks/inspect_noise.py data          # data.root of a finished `dvc repro`

Reads ``<root>/models/model.pt`` and the test split of ``<root>/prepared/dataset.zarr`` and
prints a markdown table (one column per input corruption; the noise is seeded). Dice uses the
evaluate stage's structures (disc = rim ∪ cup for fundus masks).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from uml import metrics  # noqa: E402
from uml.data.store import load_split, open_prepared  # noqa: E402
from uml.models import load_model  # noqa: E402
from uml.noise import gaussian_noise, salt_and_pepper  # noqa: E402


def mean_dice(logits: torch.Tensor, gt_masks: np.ndarray, structure: Callable[[np.ndarray], np.ndarray]) -> float:
    pred = structure(logits.argmax(1).numpy())
    return float(np.mean([metrics.dice(p, g) for p, g in zip(pred, structure(gt_masks))]))


def probe(model: torch.nn.Module, images01: np.ndarray, gt_masks: np.ndarray, mask_classes: list[str]) -> dict[str, float]:
    x = torch.from_numpy(images01).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        out = model(x)
    row: dict[str, float] = {}
    for name, structure in metrics.structures(mask_classes).items():
        row[f"dice_{name}"] = mean_dice(out["seg_logits"], gt_masks, structure)
        if "mutual_logits" in out:
            row[f"mutual_dice_{name}"] = mean_dice(out["mutual_logits"], gt_masks, structure)
    if "uncertainty_map" in out:
        u, evidence_sum = out["uncertainty_map"], out["mutual_evidence"].sum(1)
        row["mean_U"] = float(u.mean())
        row["mean_gate_exp(-U)"] = float(torch.exp(-u).mean())
        row["mean_mutual_evidence_sum"] = float(evidence_sum.mean())
        row["p99_mutual_evidence_sum"] = float(evidence_sum.flatten().quantile(0.99))
    return row


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python benchmarks/inspect_noise.py DATA_ROOT")
    root = Path(argv[0])
    model = load_model(root / "models" / "model.pt").eval()
    if not model.has_seg:
        raise SystemExit(f"{root / 'models' / 'model.pt'} has no segmentation head (model.tasks without seg)")
    data = open_prepared(root / "prepared" / "dataset.zarr")
    images, gt_masks, _, _ = load_split(data, "test")
    images01 = images.astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    corruptions = {
        "clean": lambda a: a,
        "gauss0.1": lambda a: gaussian_noise(a, 0.1, rng),
        "gauss0.2": lambda a: gaussian_noise(a, 0.2, rng),
        "s&p0.1": lambda a: salt_and_pepper(a, 0.1, rng),
    }
    rows = {name: probe(model, corrupt(images01), gt_masks, data.mask_classes) for name, corrupt in corruptions.items()}
    keys = sorted({k for row in rows.values() for k in row})
    print("| measure | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{rows[n].get(key, float('nan')):.3f}" for n in rows) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
