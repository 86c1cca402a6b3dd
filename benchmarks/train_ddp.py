"""Ray Train DDP efficiency on CPU: 1 worker x 2 threads against 2 workers x 1 thread.

    python benchmarks/train_ddp.py                                     # small preset, 128 px, 96 images, 4 epochs (~2 min on 2 cores)
    python benchmarks/train_ddp.py --repeats 3                          # alternate the layouts 3 times, report medians (~5 min)
    python benchmarks/train_ddp.py --epochs 2 --images 48               # smoke test (~1 min)
    python benchmarks/train_ddp.py --preset paper --images 32 --batch-size 2 --epochs 2   # ~15 min on a 2-core CPU

The same ``--cpus`` cores (default 2) are used two ways: one Ray Train worker with ``--cpus``
torch threads (``ray.num_workers: 1, resources_per_worker: {CPU: cpus}``) and ``--cpus`` DDP
workers (gloo) with one thread each (``num_workers: cpus, resources_per_worker: {CPU: 1}``).
DDP efficiency = throughput(cpus x 1) / throughput(1 x cpus): 1.0 means data parallelism over
processes uses the cores as well as intra-op threads do.

It runs the real train stage code: a synthetic data set is prepared (``uml.data.prepare``) in a
temporary folder at the preset's image size, and ``uml.train.trainer.run_trainer`` fits it inside
``uml.train.cluster.ray_session`` (one local Ray instance for all runs, unless ``ray.address`` /
``RAY_ADDRESS`` names a cluster). Throughput is the ``images_per_second`` that the workers report
per epoch (read back with ``read_history``), the first epoch left out as warm-up; the table shows
the mean over the remaining epochs, and the median over ``--repeats`` runs of each layout. Every run
gets a fresh name, so nothing resumes an older run; the temporary folder is removed at the end.

Notes on what ``images_per_second`` covers: ``train.batch_size`` is per worker (2 workers process
twice the images per step), training images are counted as steps x batch x workers (DDP pads the
shards and drops the last partial batch), and the epoch time includes the epoch's validation pass
(kept small here with ``--max-val-images``). The paper preset at 256 px trains at ~0.13 img/s on a
2-core CPU (``benchmarks/model.py``), so ``--preset paper`` is for many-core hosts (raise ``--cpus``)
or patient users: lower ``--images`` and ``--batch-size`` as above (about 15 minutes on 2 cores,
estimated from the per-step cost) and expect ~4 GB of memory per worker at batch 2. The layouts
are CPU layouts; a GPU, if present, is not used.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402
import yaml  # noqa: E402

from _machine import command_line, cpu_name  # noqa: E402
from uml.config import Params, Paths, load_params  # noqa: E402
from uml.data.prepare import prepare  # noqa: E402
from uml.data.store import open_prepared  # noqa: E402
from uml.models import PRESETS  # noqa: E402
from uml.train.cluster import cluster_address, ray_session  # noqa: E402
from uml.train.checkpoints import read_history  # noqa: E402
from uml.train.trainer import model_config, run_trainer  # noqa: E402


def gpu_name() -> str:
    if not torch.cuda.is_available():
        return "none"
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) + " (not used: CPU layouts)"


def write_params(root: Path, args: argparse.Namespace, size: int) -> Path:
    """A params.yaml like tests/train/tiny.py's, at the preset's image size, data under ``root``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(root=str(root / "data"), image_size=size)
    raw["data"]["synthetic"].update(num_images=args.images, render_size=max(size, 128))
    raw["model"]["preset"] = args.preset
    raw["train"].update(epochs=args.epochs, batch_size=args.batch_size, use_tuned=False,
                        loader_workers=args.loader_workers, max_val_images=args.max_val_images)
    raw["ray"].update(use_gpu=False, storage_path=None, num_workers=1, resources_per_worker={"CPU": args.cpus})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def layout_params(base: Params, workers: int, threads: int) -> Params:
    return base.with_overrides({"ray.num_workers": workers, "ray.resources_per_worker": {"CPU": threads}},
                               source=f"{workers} x {threads} layout")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--size", type=int, default=None, help="image size (default: the preset's, small 128, paper 256)")
    parser.add_argument("--images", type=int, default=96, help="synthetic images (about 65%% go to the training split)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is left out as warm-up")
    parser.add_argument("--batch-size", type=int, default=8, help="train.batch_size (per worker)")
    parser.add_argument("--cpus", type=int, default=2, help="cores split as 1 worker x cpus threads vs cpus workers x 1 thread")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each layout, alternating; medians are reported")
    parser.add_argument("--max-val-images", type=int, default=8, help="train.max_val_images (validation is inside the epoch time)")
    parser.add_argument("--loader-workers", type=int, default=0, help="train.loader_workers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data set, Ray runs) and print its path")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is left out as warm-up)")
    if args.cpus < 2:
        parser.error("--cpus must be >= 2 (two layouts of the same cores)")
    size = args.size or PRESETS[args.preset]["image_size"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    layouts = [(f"1 worker x {args.cpus} threads", 1, args.cpus), (f"{args.cpus} workers x 1 thread", args.cpus, 1)]
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="uml-ddp-bench-"))
    try:
        base = load_params(write_params(tmp, args, size)).resolved()
        print(f"preparing {args.images} synthetic images at {size} px in {tmp} ...", file=sys.stderr, flush=True)
        prepare(base)
        data = open_prepared(Paths(base).dataset)
        cfg = model_config(base, data.class_names, data.mask_classes, data.image_size)
        num_train = len(data.split("train"))
        if num_train // args.cpus < args.batch_size:
            raise SystemExit(f"{num_train} training images over {args.cpus} workers is less than one batch of "
                             f"{args.batch_size} per worker: raise --images or lower --batch-size")
        if cluster_address(base):
            print(f"note: joining the Ray cluster at {cluster_address(base)}; the layouts run wherever Ray places them",
                  file=sys.stderr)
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in layouts}
        with ray_session(base):
            for repeat in range(args.repeats):
                for label, workers, threads in layouts:
                    params = layout_params(base, workers, threads)
                    name = f"bench-ddp-{workers}x{threads}-{uuid.uuid4().hex[:10]}"
                    print(f"[{repeat + 1}/{args.repeats}] training {label}: {args.epochs} epochs ...", file=sys.stderr, flush=True)
                    run_start = time.perf_counter()
                    result = run_trainer(params, name=name, model_cfg=cfg, epochs=args.epochs)
                    wall = time.perf_counter() - run_start
                    if result.checkpoint is None:
                        raise SystemExit(f"run {name} ({label}) left no checkpoint: {result.error}")
                    measured = read_history(result.checkpoint)[1:]
                    if len(measured) < args.epochs - 1:
                        raise SystemExit(f"run {name} ({label}) reported {len(measured) + 1} of {args.epochs} epochs")
                    runs[label].append({
                        "ips": statistics.mean(r["images_per_second"] for r in measured),
                        "epoch_s": statistics.mean(r["epoch_seconds"] for r in measured),
                        "wall": wall,
                    })
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - started

    summary = {label: {key: statistics.median(r[key] for r in rs) for key in ("ips", "epoch_s", "wall")}
               for label, rs in runs.items()}
    (base_label, *_), (ddp_label, *_) = layouts
    print(f"\n`{command_line()}`\n")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; GPU: {gpu_name()}; torch {torch.__version__}, "
          f"threads per worker = its CPUs; {elapsed:.0f} s in all\n")
    print(f"{args.preset} preset, {size} px, {num_train} training images, batch {args.batch_size} per worker, "
          f"{args.epochs} epochs (first left out), validation on {args.max_val_images} images per epoch, "
          f"{args.repeats} run(s) per layout\n")
    print("| layout | training images/s | epoch (s) | run wall time (s) | vs 1 worker |")
    print("|---|---:|---:|---:|---:|")
    for label, s in summary.items():
        print(f"| {label} | {s['ips']:.2f} | {s['epoch_s']:.1f} | {s['wall']:.0f} | "
              f"{s['ips'] / summary[base_label]['ips']:.2f}x |")
    print(f"\nDDP efficiency = throughput({ddp_label}) / throughput({base_label}) = "
          f"{summary[ddp_label]['ips'] / summary[base_label]['ips']:.2f}")


if __name__ == "__main__":
    main()
