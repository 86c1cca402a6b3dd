"""Inside a trained model under input noise: how the final and the mutual masks, the pixel
uncertainty U and the navigator's gate exp(-U) change from clean to noisy test images.

    python benchmarks/inspect_noise.py data          # data.root of a finished `dvc repro`

Reads ``<root>/models/model.pt`` and the test split of ``<root>/prepared/dataset.zarr`` and
prints a markdown table (one column per input corruption; the noise is seeded).
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

import uml.models as M  # noqa: E402
from uml.data.store import load_split  # noqa: E402
from uml.noise import gaussian_noise, salt_and_pepper  # noqa: E402

if len(sys.argv) != 2:
    raise SystemExit("usage: python benchmarks/inspect_noise.py DATA_ROOT")
root = Path(sys.argv[1])
model = M.load_model(root / "models" / "model.pt").eval()
images, masks, labels, _ = load_split(root / "prepared" / "dataset.zarr", "test")
x01 = images.astype(np.float32) / 255.0
rng = np.random.default_rng(0)

def dice(pred, gt):
    inter = (pred & gt).sum((1, 2)); den = pred.sum((1, 2)) + gt.sum((1, 2))
    return float(np.mean(np.where(den > 0, 2 * inter / np.maximum(den, 1), 1.0)))

rows = {}
for name, fn in [("clean", lambda a: a), ("gauss0.1", lambda a: gaussian_noise(a, 0.1, rng)),
                 ("gauss0.2", lambda a: gaussian_noise(a, 0.2, rng)), ("s&p0.1", lambda a: salt_and_pepper(a, 0.1, rng))]:
    xb = torch.from_numpy(fn(x01)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        out = model(xb)
    if "seg_logits" not in out:
        raise SystemExit(f"{root}/models/model.pt has no segmentation head (model.tasks without seg)")
    r = {}
    seg = out["seg_logits"].argmax(1).numpy()
    r["dice_disc"] = dice(seg >= 1, masks >= 1); r["dice_cup"] = dice(seg == 2, masks == 2)
    if "mutual_logits" in out:
        mut = out["mutual_logits"].argmax(1).numpy()
        r["mutual_dice_disc"] = dice(mut >= 1, masks >= 1); r["mutual_dice_cup"] = dice(mut == 2, masks == 2)
    if "uncertainty_map" in out:
        U = out["uncertainty_map"]
        r["mean_U"] = float(U.mean()); r["mean_gate_exp(-U)"] = float(torch.exp(-U).mean())
        r["mean_mutual_evidence_sum"] = float(out["mutual_evidence"].sum(1).mean())
        r["p99_mutual_evidence_sum"] = float(out["mutual_evidence"].sum(1).flatten().quantile(0.99))
    if "class_logits" in out:
        r["class_prob_pos_mean"] = float(torch.softmax(out["class_logits"], 1)[:, 1].mean())
    rows[name] = r
keys = sorted({k for r in rows.values() for k in r})
print("| measure | " + " | ".join(rows) + " |"); print("|---|" + "---:|" * len(rows))
for k in keys:
    print(f"| {k} | " + " | ".join(f"{rows[n].get(k, float('nan')):.3f}" for n in rows) + " |")
