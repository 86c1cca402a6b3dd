"""A training run's checkpoint files, and reading them back on the driver (the workers write them
with :func:`uml.train.worker.save_state`).

Light on purpose: Ray Train's controller imports this module (through
:class:`uml.train.live.LiveLogger`), and importing the training loop's module there would load
the model, timm and the metrics into a process that only rewrites the live log (4 s of CPU at
every start on a 2-core machine, while the workers start beside it)."""

from __future__ import annotations

import json
from pathlib import Path

import ray.train
import torch

from uml.errors import UMLError

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
# The reported metric that chooses the best checkpoint: the published selection score on validation.
SCORE_KEY = "val/score"


def read_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, float]]:
    """The per-epoch metrics stored beside a checkpoint (read without fetching the weights)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{HISTORY_FILE}") as stream:
        return json.loads(stream.read().decode())


def best_state(result: ray.train.Result) -> tuple[dict[str, torch.Tensor], list[dict[str, float]], dict[str, float]]:
    """Weights of the best epoch, the full history (from the latest checkpoint) and best metrics."""
    best = result.get_best_checkpoint(SCORE_KEY, "max") or result.checkpoint
    if best is None:
        raise UMLError(f"training run '{result.path}' produced no checkpoint")
    with best.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    history = read_history(result.checkpoint) if result.checkpoint else state["history"]
    best_row = next(r for r in state["history"] if int(r["epoch"]) == int(state["epoch"]))
    return state["model"], history, best_row
