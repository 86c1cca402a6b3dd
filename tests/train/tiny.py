"""Tiny params for tests that run real stages: 64 px synthetic images, a few epochs."""

from pathlib import Path

import yaml

from uml.config import Params

REPO = Path(__file__).resolve().parents[2]


def write_tiny_params(root: Path, **sections) -> Path:
    """Write a params.yaml under ``root`` (data under ``root/data``) and return its path.

    Starts from the schema's defaults (what params.yaml holds as committed; never the working
    copy, which a user may have changed); ``sections`` update them per section, e.g.
    ``train={"epochs": 2}``.
    """
    raw = Params().model_dump()
    raw["data"].update(root=str(root / "data"), image_size=64, split={"val": 0.2, "test": 0.2, "calib": 0.2})
    raw["data"]["synthetic"].update(num_images=60, render_size=128)
    # 6 steps per epoch: one pass over the 24 training images at the global batch of 4 over 2 workers.
    raw["train"].update(epochs=4, steps_per_epoch=6, batch_size=4, constant_epochs=2, loader_workers=0)
    raw["loss"].update(kl_annealing_epochs=2)
    raw["ray"].update(num_workers=2, include_dashboard=True)
    raw["tune"].update(num_samples=3, epochs=2, steps_per_epoch=None, workers_per_trial=1)  # trials: the 6-step epoch
    raw["export"].update(parity_images=4)
    raw["evaluate"].update(num_panels=2, gaussian_sigmas=[0.1], salt_pepper_amounts=[0.05])
    for section, values in sections.items():
        raw[section].update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
