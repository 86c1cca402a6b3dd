"""The function Ray Train runs in each training worker.

Ray pickles the training function by reference: every process that hands it to a trainer (the
``train`` stage's driver, a sweep trial's driver) and every worker that runs it imports the
function's module. This module imports nothing, and its function imports the training loop
(:mod:`uml.train.worker`: the model, timm, the metrics, the augmentation) when it runs, so only
the workers pay for that, and they pay nothing more (importing :mod:`uml.train.trainer` would add
0.7 CPU-seconds to each worker's start on the cores the other workers start on).
"""

from __future__ import annotations

from typing import Any


def worker_entry(config: dict[str, Any]) -> None:
    """Run :func:`uml.train.worker.train_loop_per_worker` with ``config``."""
    from uml.train.worker import train_loop_per_worker

    train_loop_per_worker(config)
