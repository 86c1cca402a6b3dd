"""Reading a training run's checkpoints back on the driver (the workers write them with
:func:`uml.train.worker.save_state`)."""

from __future__ import annotations

import json
from pathlib import Path

import ray.train
import torch

from uml.errors import UMLError
from uml.train.worker import HISTORY_FILE, SCORE_KEY, STATE_FILE


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
