"""How the prepare stage's wall time and peak memory grow with the data set, with 1 and 2
decoding processes (``data.prepare_workers``).

For each N of ``--sizes`` (synthetic images at ``--image-size``, rendered at ``--render-size``)
and each count of ``--processes``, a fresh Python process runs the prepare stage
(:func:`uml.data.prepare.prepare`) into a temporary folder and reports:

- the wall time of ``prepare`` (listing, decoding, writing, hashing, the split; not the start-up
  of the Python process);
- the peak RSS of the stage's own process (``ru_maxrss``, exact), and the peak of the summed RSS
  of its worker processes and of everything together (sampled every 50 ms with psutil, so a
  spike shorter than that can be missed);
- the CPU seconds of the stage's own process and of its workers;
- the store's content hash, which must not depend on the process count (the script says so when
  it does).

Then, per N, the speed-up of each process count over one, measured and bounded from the CPU
times (what idle cores would allow: the wall time cannot be below the stage's own CPU time, nor
below the workers' divided by their count); and from the smallest N to the
largest, the growth of time per image and of peak RSS, with the exponent of a least-squares fit
of log(time) and log(RSS) against log(N) (1: linear, 0: flat).

With ``--evaluate``, also the evaluate stage's wall time and peak RSS (``ru_maxrss`` of a
process that runs it alone) on the test split of each N (prepared at ``--image-size``), with the
toy model of ``tests/toy_onnx.py`` exported at that size (its own cost is negligible, so the
numbers are the stage's), three ways: ``stream``, the stage with the store read a batch at a time
in every pass, in one process (what it does with a test split over
``uml.evaluate.IN_MEMORY_BYTES``; a smaller one it reads once); ``ray x2``, the same stage with ``evaluate.workers: 2`` (the passes'
shards as Ray tasks on a local instance; its peak RSS is the driver's, and the sampled peak of
everything, Ray's own processes included, is shown beside it); and ``whole``, the split loaded
into memory first and evaluated from arrays (what the stage did before it streamed).

With ``--train``, also one epoch of the train stage on each N's store (the default params: the
``small`` model, ``train.steps_per_epoch`` steps of the global batch on ``ray.num_workers``
workers, then validation on the whole validation split), in a fresh process with a local Ray
instance: the wall time of the stage after Ray has started, the driver's peak RSS and the sampled
peak of everything (the training workers included).

    python benchmarks/scale.py                                        # N = 200, 400, 800 at 128 px
    python benchmarks/scale.py --sizes 1000 4000 16000 --image-size 256 --evaluate --train
    python benchmarks/scale.py --evaluate --processes 1               # evaluate's memory against N

Read the ratios of one run, not the absolute numbers: other work on the machine slows every
configuration, and the speed-up of 2 processes needs 2 idle cores (the stage's own process
writes the store beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _machine import command_line, cpu_name  # noqa: E402

MB = 1024 * 1024
EVALUATE_MODES = ("stream", "ray x2", "whole")


class PeakMemory:
    """Samples the RSS of this process and of all its descendants every ``interval`` seconds on a
    background thread; keeps the peaks of the descendants' sum and of the total, and the last CPU
    time seen of each descendant (``worker_cpu``: their sum)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.workers = 0
        self.total = 0
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        own = self.process.memory_info().rss
        others = 0
        for child in self.process.children(recursive=True):
            try:
                others += child.memory_info().rss
                times = child.cpu_times()
                self._cpu[child.pid] = times.user + times.system
            except psutil.Error:  # ended between the listing and the reading
                continue
        self.workers = max(self.workers, others)
        self.total = max(self.total, own + others)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def worker_cpu(self) -> float:
        return sum(self._cpu.values())


def one_run(num_images: int, processes: int, image_size: int, render_size: int) -> dict:
    """The prepare stage once, in this process; what it took."""
    from uml.config import parse_params
    from uml.data.prepare import prepare
    from uml.data.store import open_prepared

    with tempfile.TemporaryDirectory(prefix="uml-scale-") as folder:
        params = parse_params({"data": {"root": folder, "image_size": image_size, "prepare_workers": processes,
                                        "synthetic": {"num_images": num_images, "render_size": render_size}}})
        before = resource.getrusage(resource.RUSAGE_SELF)
        with PeakMemory() as memory:
            started = time.perf_counter()
            out = prepare(params)
            seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        content_hash = open_prepared(out, verify=False).content_hash
    # Linux reports ru_maxrss in KiB.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu_main = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"n": num_images, "processes": processes, "seconds": seconds, "rss_main": own,
            "rss_workers": memory.workers, "rss_total": max(memory.total, own), "hash": content_hash,
            "cpu_main": cpu_main, "cpu_workers": memory.worker_cpu}


def _child(*args: object) -> dict:
    """This script with ``args`` in a fresh Python process, so that each peak RSS is its run's own."""
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, timeout=24 * 3600)
    if out.returncode != 0:
        raise SystemExit(f"the run {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(num_images: int, processes: int, image_size: int, render_size: int) -> dict:
    """:func:`one_run` in a fresh Python process."""
    return _child("--child", num_images, processes, image_size, render_size)


def evaluate_run(root: str, mode: str, image_size: int) -> dict:
    """The evaluate stage on the store under ``root`` with the toy model, in this process:
    ``stream`` (the stage) or ``whole`` (the test split loaded first, then evaluated from arrays)."""
    from uml.config import Paths, parse_params
    from uml.data.store import load_split, open_prepared
    import uml.evaluate
    from uml.evaluate import evaluate, evaluate_arrays
    from uml.onnx_model import OnnxModel

    workers = 2 if mode == "ray x2" else 0
    params = parse_params({"data": {"root": root, "image_size": image_size},
                           "evaluate": {"provider": "cpu", "workers": workers}})
    paths = Paths(params)
    with PeakMemory() as memory:
        started = time.perf_counter()
        if mode in ("stream", "ray x2"):
            # The streamed path at every N: the stage reads a test split of at most
            # IN_MEMORY_BYTES once (N = 1000 at 256 px is one), which is not what grows with N.
            uml.evaluate.IN_MEMORY_BYTES = 0
            evaluate(params)
        else:
            model = OnnxModel(paths.model_onnx, provider="cpu")
            images, masks, labels, ids = load_split(open_prepared(paths.dataset), "test")
            evaluate_arrays(model, images, masks, labels, params.evaluate, plots_dir=paths.plots, ids=ids)
        seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "rss": own, "rss_total": max(memory.total, own),
            "test_images": len(open_prepared(paths.dataset, verify=False).split("test"))}


def train_run(root: str, image_size: int) -> dict:
    """One epoch of the train stage on the store under ``root``, in this process, with a local Ray
    instance started first (its start-up is not in the time)."""
    from uml.config import Paths, parse_params
    from uml.data.store import open_prepared
    from uml.train.cluster import ray_session
    from uml.train.trainer import train

    params = parse_params({"data": {"root": root, "image_size": image_size},
                           "train": {"epochs": 1, "use_tuned": False}})
    with ray_session(params), PeakMemory() as memory:
        started = time.perf_counter()
        train(params)
        seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    store = open_prepared(Paths(params).dataset, verify=False)
    return {"seconds": seconds, "rss": own, "rss_total": max(memory.total, own),
            "train_images": len(store.split("train")), "val_images": len(store.split("val")),
            "steps": params.train.steps_per_epoch, "batch": params.train.batch_size, "workers": params.ray.num_workers}


def stage_tables(sizes: list[int], image_size: int, render_size: int, with_evaluate: bool, with_train: bool,
                 modes: Sequence[str] = EVALUATE_MODES) -> None:
    """Prepare a store per N (2 decoding processes; not measured here), with the toy model beside
    it for evaluate, then measure evaluate the ``modes`` ways and one training epoch, each in a
    fresh process."""
    from tests.toy_onnx import export_toy
    from uml.config import EvaluateParams

    defaults = EvaluateParams()
    noisy = len(defaults.gaussian_sigmas) + len(defaults.salt_pepper_amounts)

    evaluations, trainings = [], []
    with tempfile.TemporaryDirectory(prefix="uml-scale-stages-") as folder:
        for n in sizes:
            root = Path(folder) / f"n{n}"
            _child("--prepare-only", n, image_size, render_size, root)
            if with_evaluate:
                export_toy(root / "models", image_size=image_size)
                for mode in modes:
                    evaluations.append({"n": n, "mode": mode, **_child("--evaluate-child", root, mode, image_size)})
            if with_train:
                trainings.append({"n": n, **_child("--train-child", root, image_size)})
            shutil.rmtree(root)  # the next N's store beside it would double the disk needed
    if evaluations:
        print(f"\nevaluate (toy model, {image_size} px, 1 clean + {noisy} noisy passes, "
              f"{defaults.bootstrap_samples} bootstrap resamples)\n")
        print("| N | test images | mode | wall (s) | peak RSS, driver (MB) | peak RSS, all processes (MB) |")
        print("|---:|---:|---|---:|---:|---:|")
        for row in evaluations:
            print(f"| {row['n']} | {row['test_images']} | {row['mode']} | {row['seconds']:.1f} | {row['rss'] / MB:.0f} | "
                  f"{row['rss_total'] / MB:.0f} |")
        if len(sizes) > 1:
            print(f"\n| mode | time per image, N={sizes[-1]} vs {sizes[0]} | time exponent | peak RSS (driver), "
                  f"N={sizes[-1]} vs {sizes[0]} | RSS exponent |")
            print("|---|---:|---:|---:|---:|")
            for mode in modes:
                chosen = [row for row in evaluations if row["mode"] == mode]
                per_image = (chosen[-1]["seconds"] / chosen[-1]["test_images"]) / (chosen[0]["seconds"] / chosen[0]["test_images"])
                print(f"| {mode} | {per_image:.2f}x | {exponent(sizes, [row['seconds'] for row in chosen]):.2f} | "
                      f"{chosen[-1]['rss'] / chosen[0]['rss']:.2f}x | {exponent(sizes, [row['rss'] for row in chosen]):.2f} |")
            stream = {row["n"]: row for row in evaluations if row["mode"] == "stream"}
        if len(sizes) > 1 and {"stream", "ray x2"} <= set(modes):
            print("\n| N | ray x2 vs stream: speed-up |")
            print("|---:|---:|")
            for row in (r for r in evaluations if r["mode"] == "ray x2"):
                print(f"| {row['n']} | {stream[row['n']]['seconds'] / row['seconds']:.2f}x |")
    if trainings:
        first = trainings[0]
        print(f"\none training epoch (default params: {first['steps']} steps of batch {first['batch']} on {first['workers']} "
              f"Ray workers, then validation; {image_size} px; Ray's start-up not included)\n")
        print("| N | train images | val images | wall (s) | peak RSS, driver (MB) | peak RSS, all processes (MB) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for row in trainings:
            print(f"| {row['n']} | {row['train_images']} | {row['val_images']} | {row['seconds']:.1f} | "
                  f"{row['rss'] / MB:.0f} | {row['rss_total'] / MB:.0f} |")
        if len(sizes) > 1:
            print(f"\n| time exponent | peak RSS (all), N={sizes[-1]} vs {sizes[0]} | RSS exponent (all) |")
            print("|---:|---:|---:|")
            print(f"| {exponent(sizes, [row['seconds'] for row in trainings]):.2f} | "
                  f"{trainings[-1]['rss_total'] / trainings[0]['rss_total']:.2f}x | "
                  f"{exponent(sizes, [row['rss_total'] for row in trainings]):.2f} |")


def exponent(sizes: list[int], values: list[float]) -> float:
    """The slope of log(value) against log(N), least squares."""
    import numpy as np

    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 400, 800], help="numbers of images N")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="data.prepare_workers values")
    parser.add_argument("--image-size", type=int, default=128, help="data.image_size (default %(default)s)")
    parser.add_argument("--render-size", type=int, default=256, help="data.synthetic.render_size (default %(default)s)")
    parser.add_argument("--evaluate", action="store_true", help="also measure the evaluate stage (toy model)")
    parser.add_argument("--evaluate-modes", nargs="+", choices=EVALUATE_MODES, default=list(EVALUATE_MODES),
                        help="which ways to run evaluate (default: all three)")
    parser.add_argument("--train", action="store_true", help="also measure one epoch of the train stage")
    parser.add_argument("--child", nargs=4, type=int, metavar=("N", "PROCESSES", "SIZE", "RENDER"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare-only", nargs=4, metavar=("N", "SIZE", "RENDER", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("--evaluate-child", nargs=3, metavar=("ROOT", "MODE", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--train-child", nargs=2, metavar=("ROOT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(*args.child)))
        return
    if args.prepare_only:
        from uml.config import parse_params
        from uml.data.prepare import prepare

        n, size, render, root = args.prepare_only
        prepare(parse_params({"data": {"root": root, "image_size": int(size), "prepare_workers": 2,
                                       "synthetic": {"num_images": int(n), "render_size": int(render)}}}))
        print("{}")
        return
    if args.evaluate_child:
        root, mode, size = args.evaluate_child
        print(json.dumps(evaluate_run(root, mode, int(size))))
        return
    if args.train_child:
        root, size = args.train_child
        print(json.dumps(train_run(root, int(size))))
        return

    sizes, counts = sorted(args.sizes), sorted(args.processes)
    runs = {(n, p): measure(n, p, args.image_size, args.render_size) for n in sizes for p in counts}
    print(f"prepare of the synthetic set at {args.image_size} px (rendered at {args.render_size}); {cpu_name()}, "
          f"{os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} at the end; `{command_line()}`\n")
    print("| N | processes | wall (s) | images/s | CPU s, main | CPU s, workers | peak RSS main (MB) | workers (MB) | "
          "total (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (n, p), run in runs.items():
        print(f"| {n} | {p} | {run['seconds']:.1f} | {n / run['seconds']:.1f} | {run['cpu_main']:.1f} | "
              f"{run['cpu_workers']:.1f} | {run['rss_main'] / MB:.0f} | {run['rss_workers'] / MB:.0f} | "
              f"{run['rss_total'] / MB:.0f} |")
    base = counts[0]
    # The wall-time ratio needs idle cores. The CPU times bound it without them: with p worker
    # processes on as many idle cores, the stage's process (writing) and the workers (decoding)
    # overlap, so the wall time is at least max(main, workers / p) CPU seconds.
    print(f"\n| N | " + " | ".join(f"{p} vs {base}: wall | {p} vs {base}: bound from CPU time" for p in counts[1:]) + " |")
    print("|---:|" + "---:|---:|" * len(counts[1:]))
    for n in sizes:
        cells = []
        for p in counts[1:]:
            run = runs[n, p]
            serial = runs[n, base]["cpu_main"] + runs[n, base]["cpu_workers"]
            cells.append(f"{runs[n, base]['seconds'] / run['seconds']:.2f}x | "
                         f"{serial / max(run['cpu_main'], run['cpu_workers'] / p):.2f}x")
        print(f"| {n} | " + " | ".join(cells) + " |")
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        print(f"\n| processes | time per image, N={last} vs {first} | time exponent | peak RSS main, N={last} vs {first} | "
              "RSS exponent (main) | peak RSS total, ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        for p in counts:
            per_image = (runs[last, p]["seconds"] / last) / (runs[first, p]["seconds"] / first)
            print(f"| {p} | {per_image:.2f}x | {exponent(sizes, [runs[n, p]['seconds'] for n in sizes]):.2f} | "
                  f"{runs[last, p]['rss_main'] / runs[first, p]['rss_main']:.2f}x | "
                  f"{exponent(sizes, [runs[n, p]['rss_main'] for n in sizes]):.2f} | "
                  f"{runs[last, p]['rss_total'] / runs[first, p]['rss_total']:.2f}x |")
    differing = [n for n in sizes if len({runs[n, p]["hash"] for p in counts}) > 1]
    print("\ncontent hash: " + (f"DIFFERS between process counts at N = {differing}" if differing
                                else "the same for every process count at each N"))
    if args.evaluate or args.train:
        stage_tables(sizes, args.image_size, args.render_size, args.evaluate, args.train, args.evaluate_modes)
    if differing:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
