"""Training step time of the real loop, this checkout against another (e.g. the commit before a
change to ``uml.train.worker.train_one_epoch``), each in its own process, alternating.

    git worktree add /tmp/wt-before 9221619
    python benchmarks/step_time.py --before /tmp/wt-before                 # ~5 min on 2 cores
    python benchmarks/step_time.py --before /tmp/wt-before --rounds 5 --steps 40

Each measurement is a fresh process that imports ``uml`` from one tree, prepares a small
synthetic store (the default's 128 px images and small preset), builds the training state as a
worker of the default run does (one CPU thread, the per-worker batch of 4 that the default global
batch of 8 gives each of 2 workers, bf16 autocast where the CPU has it natively) and times
``train_one_epoch`` over batches already in memory (the loader is not measured), after warm-up
steps. ``--progress-every-step`` adds a variant of this checkout that logs a progress line after
every step (each line reads the running loss back: a host sync), the cost of a line at its most
frequent. Rounds alternate the variants (A B C A B C ...) and the table shows the median per
variant, so slow phases of a shared machine hit every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent


def measure(tree: Path, steps: int, warmup: int, progress_every_step: bool) -> dict[str, float]:
    """Seconds per training step of ``tree``'s ``train_one_epoch`` (run in this process)."""
    sys.path.insert(0, str(tree))
    import uml

    if not Path(uml.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"uml was imported from {uml.__file__}, not from {tree}")
    import ray.train.torch
    import torch

    from uml.config import Paths, parse_params
    from uml.data.prepare import prepare
    from uml.data.store import open_prepared
    from uml.train import worker
    from uml.train.trainer import model_config

    # One worker in this process: Ray Train's model and loader preparation are the identity.
    ray.train.torch.prepare_model = lambda model: model
    ray.train.torch.prepare_data_loader = lambda loader: loader
    torch.set_num_threads(1)  # ray.resources_per_worker: {CPU: 1}
    cpu = torch.device("cpu")
    if progress_every_step:
        worker.PROGRESS_SECONDS = 0.0
    with tempfile.TemporaryDirectory(prefix="uml-step-time-") as tmp:
        params = parse_params({"data": {"root": str(Path(tmp) / "data"), "synthetic": {"num_images": 40}},
                               "train": {"batch_size": 4, "loader_workers": 0}}, source="step_time")
        prepare(params)
        data = open_prepared(Paths(params).dataset)
        cfg = model_config(params, data.class_names, data.mask_classes, data.image_size).to_dict()
        worker_data = worker.open_worker_data(params, str(Paths(params).dataset), 0, 1, cpu)
        batches = [batch for _, batch in zip(range(4), worker_data.loader)]
        state = worker.build_state(params, cfg, 2, cpu)
        dtype = worker.autocast_dtype(cpu, params.train.precision)
        worker_data.loader = (batches * warmup)[:warmup]
        worker.train_one_epoch(state, worker_data, params, 0, 0, cpu, dtype)
        worker_data.loader = (batches * steps)[:steps]
        start = time.perf_counter()
        worker.train_one_epoch(state, worker_data, params, 1, 0, cpu, dtype)
        seconds = (time.perf_counter() - start) / steps
    return {"step_seconds": seconds, "dtype": str(dtype)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="checkout to compare with (e.g. a git worktree); required")
    parser.add_argument("--after", type=Path, default=HERE.parent, help="checkout measured against it (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--progress-every-step", action="store_true",
                        help="also measure this checkout logging a progress line after every step")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one measurement of this tree, as JSON
    parser.add_argument("--every-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker.resolve(), args.steps, args.warmup, args.every_step)))
        return
    if args.before is None:
        parser.error("--before is required")

    variants = {"before": (args.before.resolve(), False), "after": (args.after.resolve(), False)}
    if args.progress_every_step:
        variants["after, a progress line every step"] = (args.after.resolve(), True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    dtype = ""
    for round_ in range(args.rounds):
        for name, (tree, every_step) in variants.items():
            cmd = [sys.executable, __file__, "--worker", str(tree), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   *(["--every-step"] if every_step else [])]
            # The measured tree's uml only: no PYTHONPATH from the calling shell.
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
            if proc.returncode != 0:
                raise SystemExit(f"{name} ({tree}) failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            times[name].append(result["step_seconds"])
            dtype = result["dtype"]
            print(f"round {round_ + 1}/{args.rounds}  {name:<36} {1000 * result['step_seconds']:.1f} ms/step", flush=True)

    sys.path.insert(0, str(HERE))
    from _machine import command_line, cpu_name

    base = statistics.median(times["before"])
    print(f"\n{cpu_name()}; 1 thread; small preset, 128 px, batch 4 per worker, autocast {dtype}; "
          f"{args.steps} timed steps after {args.warmup}, {args.rounds} rounds; `{command_line()}`\n")
    print("| variant | median ms/step | min | max | vs before |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {1000 * min(values):.1f} | {1000 * max(values):.1f} | "
              f"{median / base:.3f}x |")


if __name__ == "__main__":
    main()
