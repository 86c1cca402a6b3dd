"""Inside a trained model under input noise: how the final and the mutual masks, the pixel
uncertainty U and the navigator's gate exp(-U) change from clean to noisy test images, and where
U is high: on the pixels that S_0 (or the mutual branch) gets wrong, on the disc, on the rest.

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
from uml.image_io import PIXEL_MAX  # noqa: E402
from uml.models import load_model  # noqa: E402
from uml.noise import gaussian_noise, salt_and_pepper  # noqa: E402


def mean_dice(logits: torch.Tensor, gt_masks: np.ndarray, structure: Callable[[np.ndarray], np.ndarray]) -> float:
    pred = structure(logits.argmax(1).numpy())
    return float(np.mean([metrics.dice(p, g) for p, g in zip(pred, structure(gt_masks))]))


def probe(model: torch.nn.Module, images01: np.ndarray, gt_masks: np.ndarray, mask_classes: list[str],
          batch_size: int = 32) -> dict[str, float]:
    outs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(images01), batch_size):
            x = torch.from_numpy(images01[start:start + batch_size]).permute(0, 3, 1, 2).contiguous()
            for key, value in model(x).items():
                if isinstance(value, torch.Tensor) and key in ("seg_logits", "mutual_logits", "uncertainty_map", "mutual_evidence"):
                    outs.setdefault(key, []).append(value)
    out = {key: torch.cat(values) for key, values in outs.items()}
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
        # Where U is high: an evidential map is useful when it is high where the masks are wrong.
        u_map = u[:, 0].numpy()
        wrong = out["seg_logits"].argmax(1).numpy() != gt_masks
        wrong_mutual = out["mutual_logits"].argmax(1).numpy() != gt_masks
        row["U_on_wrong_S0_pixels"] = float(u_map[wrong].mean()) if wrong.any() else float("nan")
        row["U_on_right_S0_pixels"] = float(u_map[~wrong].mean())
        row["U_on_disc"] = float(u_map[gt_masks > 0].mean())
        every = slice(None, None, 5)  # a fixed subsample keeps the AUROC cheap
        row["pixel_error_auroc_S0"] = metrics.error_auroc(u_map.ravel()[every], wrong.ravel()[every])
        row["pixel_error_auroc_mutual"] = metrics.error_auroc(u_map.ravel()[every], wrong_mutual.ravel()[every])
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
    images01 = images.astype(np.float32) / PIXEL_MAX
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
