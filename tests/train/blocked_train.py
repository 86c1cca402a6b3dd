"""``python -m pipeline.train`` whose rank 0 stops after a given epoch's checkpoint is reported
and waits there until it is killed: a run held at a known point, for the crash-and-resume test
(tests/train/test_ray_training.py).

Usage: ``python -m tests.train.blocked_train --params FILE --block-after EPOCH`` (1-based). Once the
checkpoint of that epoch is reported, rank 0 writes ``<data.root>/blocked-after-epoch-<EPOCH>`` and
sleeps. Everything else is the train stage's own code: the same run name (so a plain
``python -m pipeline.train`` resumes it), the same training loop, DDP, checkpoints and logging.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from uml.stage import run_stage
from uml.train import trainer, worker


def marker(data_root: str | Path, epoch: int) -> Path:
    return Path(data_root) / f"blocked-after-epoch-{epoch}"


def _blocking_loop(config: dict) -> None:
    """The real training loop; rank 0 blocks after reporting epoch ``config['block_after']``."""
    import ray.train as ray_train

    block_after = int(config["block_after"])
    real_report = ray_train.report

    def report_then_block(metrics, checkpoint=None, **kwargs):
        real_report(metrics, checkpoint=checkpoint, **kwargs)
        if int(metrics["epoch"]) + 1 == block_after and ray_train.get_context().get_world_rank() == 0:
            marker(config["params"]["data"]["root"], block_after).write_text("rank 0 reported this epoch's checkpoint\n")
            while True:  # held here until the test kills the process group
                time.sleep(1)

    ray_train.report = report_then_block
    try:
        worker.train_loop_per_worker(config)
    finally:
        ray_train.report = real_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block-after", type=int, required=True)
    args, rest = parser.parse_known_args(argv)
    real_run_trainer = trainer.run_trainer

    def run_trainer(params, **kwargs):
        # The loop's config is built by run_trainer; the epoch to block after rides along in it.
        loop = lambda config: _blocking_loop({**config, "block_after": args.block_after})  # noqa: E731
        return real_run_trainer(params, **{**kwargs, "train_loop": loop})

    trainer.run_trainer = run_trainer  # train() looks it up in the module at call time
    return run_stage("train", "train, held after an epoch", trainer.train, rest)


if __name__ == "__main__":
    sys.exit(main())
