"""Ray Train throughput: 1 worker x 2 threads against 2 workers x 1 thread (DDP over gloo).

    python benchmarks/train_ddp.py                           # small preset, 128 px, 3 epochs
    python benchmarks/train_ddp.py --preset paper --size 256 --images 24 --epochs 2   # hours on a CPU

Runs the real train stage code (``run_trainer`` + the worker loop) on a synthetic data set
prepared in a temporary folder, and reads the per-epoch ``images_per_second`` the workers
report, leaving out the first (warm-up) epoch. DDP efficiency = throughput(2 x 1) / throughput(1 x 2):
the same two cores, split into two data-parallel processes instead of two threads of one.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import torch
import yaml

from uml.config import Paths, load_params
from uml.data.prepare import prepare
from uml.data.store import open_prepared
from uml.train.cluster import ray_session
from uml.train.trainer import model_config, read_history, run_trainer

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["small", "paper"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=120, help="synthetic images (about 65 %% train)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="uml-ddp-bench-"))
    try:
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["data"].update(root=str(tmp / "data"), image_size=args.size)
        raw["data"]["synthetic"]["num_images"] = args.images
        raw["model"]["preset"] = args.preset
        raw["train"].update(epochs=args.epochs, batch_size=args.batch_size, use_tuned=False, max_val_images=8)
        results = {}
        for label, workers, cpus in (("1 worker x 2 threads", 1, 2), ("2 workers x 1 thread", 2, 1)):
            raw["ray"].update(num_workers=workers, resources_per_worker={"CPU": cpus})
            (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
            params = load_params(tmp / "params.yaml").resolved()
            if not Paths(params).dataset.exists():
                prepare(params)
            data = open_prepared(Paths(params).dataset)
            cfg = model_config(params, data.class_names, data.mask_classes, data.image_size)
            print(f"training {label} ...", file=sys.stderr, flush=True)
            with ray_session(params):
                result = run_trainer(params, name=f"bench-{uuid.uuid4().hex[:8]}", model_cfg=cfg, epochs=args.epochs)
            history = read_history(result.checkpoint)
            results[label] = statistics.mean(r["images_per_second"] for r in history[1:] or history)
        base, ddp = results["1 worker x 2 threads"], results["2 workers x 1 thread"]
        print(f"\n`python benchmarks/train_ddp.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
              f"({os.cpu_count()} CPUs, torch {torch.__version__}, GPU: {torch.cuda.is_available()})\n")
        print("| preset | input | layout | training images/s |")
        print("|---|---|---|---|")
        for label, value in results.items():
            print(f"| {args.preset} | {args.size}² | {label} | {value:.1f} |")
        print(f"\nDDP efficiency (2 x 1 / 1 x 2): {ddp / base:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
