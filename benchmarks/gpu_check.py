"""One-GPU check for the README: the paper model's training speed, the loader that feeds it, the
exported model in onnxruntime's CUDA provider, one NCCL rank without Ray, and the train stage on
the GPU with a resume. Run it once on a machine with one NVIDIA GPU (H100/H200
class); it takes about 5-8 minutes and stops with an error when CUDA is not available (it never
falls back to the CPU).

    python benchmarks/gpu_check.py                                   # everything, JSON in benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --sections model --batch-size 16  # one section, other sizes
    python benchmarks/gpu_check.py --dry-run                         # the plumbing on a CPU: tiny sizes, 1-2 steps

Sections (each prints a markdown table; every number also goes to the ``--out`` JSON file):

``model``
    The ``paper`` preset at 256 px (``--size``), full training steps on a fixed batch already on
    the GPU (forward, ``uml_loss``, backward, Adam), as ``benchmarks/train_speed.py`` does: fp32
    and bf16 autocast, each with and without ``channels_last`` and with ``cudnn.benchmark`` off and
    on (8 variants, ``--variants``). PyTorch's cuDNN plan cache lives as long as the process and
    ignores the benchmark flag (the first setting to meet a convolution picks its algorithm for
    both), so each ``cudnn.benchmark`` setting is measured in a fresh spawned process. Within it,
    timed rounds alternate between the variants (A B C D A B C D ...) and the table shows the
    median, each round between ``torch.cuda.synchronize()`` calls, after ``--warmup`` untimed steps
    (where cuDNN's benchmarking happens). Per variant: images/s and the ratio to fp32 measured in
    the same run; peak memory (``torch.cuda.max_memory_allocated`` over the variant's own steps
    less the other variants' resident tensors: its weights, gradients, Adam state, batch and
    activations); MFU, the achieved FLOP/s over the GPU's peak: FLOPs per step from
    ``torch.utils.flop_counter.FlopCounterMode`` over one step, peak from ``--peak-tflops``
    (default: H100/H200 SXM dense Tensor Core throughput from NVIDIA's datasheets, bf16 989 and
    tf32 494 TFLOP/s, half the datasheets' with-sparsity 1,979 and 989). fp32 variants are rated
    against the tf32 peak: PyTorch runs cuDNN convolutions in TF32 by default
    (``torch.backends.cudnn.allow_tf32``; the JSON records the flags). Host syncs per step: one
    step under ``torch.cuda.set_sync_debug_mode("warn")``, counting the warnings.

``loader``
    ``uml.data.SegClsDataset`` with the default augmentation over a synthetic store prepared at
    256 px (``--loader-size``) by the repository's own ``prepare`` (in a temporary folder), read by
    a ``DataLoader`` at 0/4/8 workers (``--workers``; batch ``--batch-size``, pinned memory,
    persistent workers; one pass of ``--loader-samples`` after a warm-up batch, the store's images
    repeated): samples/s, per worker, and next to the fastest model variant's images/s,
    so the README can say how many loader CPUs one GPU needs.

``onnx``
    The ``--preset`` model (randomly initialised) exported by ``uml.export.export_onnx`` as the
    export stage does, run by onnxruntime's ``CUDAExecutionProvider`` at batch 1 and
    ``--batch-size`` against eager torch fp32 on the GPU, numpy in and numpy out on both sides
    (median of ``--onnx-iters`` after ``--onnx-warmup``), with the largest output difference. Where
    ``onnxruntime.get_available_providers()`` lacks the CUDA provider (the CPU-only ``onnxruntime``
    package) it records that and exports nothing; a listed provider whose session fails or falls
    back to the CPU is recorded too. None of these is a failed check. The dry run times the CPU
    provider.

``nccl``
    A smoke test of the NCCL path without Ray: one rank (world size 1) in a spawned process, a
    ``torch.distributed.TCPStore`` on 127.0.0.1 (port chosen by the OS), ``init_process_group("nccl",
    device_id=cuda:0)``, all-reduces of 4 KiB (median of 20) and 64 MiB checked for their result,
    a barrier and ``destroy_process_group``. The dry run uses gloo on the CPU. A wrong result, an
    error or no answer in ``--nccl-timeout`` seconds is a failed check.

``train``
    ``python -m pipeline.train`` with ``ray.use_gpu: true`` (one worker, NCCL) on a tiny prepared
    synthetic set (``--train-images`` at ``--train-size`` px, preset ``--train-preset``) in a
    temporary folder with its own params file. The first run is held after epoch 1's checkpoint
    (``tests/train/blocked_train.py``) and killed with SIGKILL, process group and local Ray
    instance included; a plain rerun of the same params must log ``continues the earlier run``
    and ``resuming from the checkpoint of epoch 1`` and train only epoch 2 (the run name hashes
    ``train.epochs``, so a rerun with other epochs would be a fresh run, not a resume). Then two
    ranks on the one GPU (``resources_per_worker: {GPU: 0.5}``, ``max_failures: 0``): the stage
    must refuse it before training starts (NCCL cannot run two ranks on one device).

``--dry-run`` runs every section on the CPU with tiny sizes (the ``small`` preset at 64 px, 1-2
steps, a 16-image store, gloo instead of NCCL, no two-ranks check) to test the plumbing; its
numbers mean nothing. A failed check (no resume, two ranks on one GPU not refused, a section that
crashed, the one-rank all-reduce wrong) makes the exit status 1 after the tables and the JSON are
written. The JSON is rewritten after each section (``meta.complete`` is true once all have run), so
a run killed part-way keeps what it measured. Only the ``train`` section needs Ray; the others run
where it is not installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from _machine import command_line, cpu_name  # noqa: E402
from uml.config import LossParams, Paths, parse_params  # noqa: E402

# The model (timm) and the loader (albumentations, zarr) are imported where they are used: the
# spawned model processes need no loader, and a machine without CUDA hears so before any of it.

SECTIONS = ("model", "loader", "onnx", "nccl", "train")
# Dense Tensor Core peaks of the H100 / H200 SXM (NVIDIA's datasheets give 1,979 bf16 and 989 tf32
# TFLOP/s "with sparsity"; dense is half). The same figures hold for both GPUs.
PEAK_TFLOPS_BF16 = 989.0
PEAK_TFLOPS_TF32 = 494.0
SYNC_WARNING = "synchronizing"  # set_sync_debug_mode("warn") warns "called a synchronizing CUDA operation"
RESUME_LINE = "continues the earlier run of the same params, data and code"
GIB = 1024 ** 3

# Sizes per mode; an option given on the command line wins.
DEFAULTS = {
    False: dict(preset="paper", size=256, batch_size=8, warmup=5, steps=10, rounds=5,
                loader_size=256, loader_images=256, loader_samples=1024, workers=[0, 4, 8],
                onnx_warmup=3, onnx_iters=20, nccl_timeout=120,
                train_preset="paper", train_size=64, train_images=48, train_timeout=300),
    True: dict(preset="small", size=64, batch_size=2, warmup=1, steps=1, rounds=1,
               loader_size=64, loader_images=16, loader_samples=32, workers=[0, 2],
               onnx_warmup=0, onnx_iters=1, nccl_timeout=120,
               train_preset="small", train_size=64, train_images=48, train_timeout=400),
}

_T0 = time.time()  # a spawned process gets the parent's


def progress(message: str) -> None:
    print(f"[{time.time() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


# -- section 1: the model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    precision: str  # "fp32" | "bf16"
    channels_last: bool
    cudnn_benchmark: bool

    @property
    def name(self) -> str:
        return "+".join([self.precision] + ["channels_last"] * self.channels_last
                        + ["cudnn_benchmark"] * self.cudnn_benchmark)


VARIANTS = {v.name: v for v in (Variant(p, cl, bench) for p in ("fp32", "bf16")
                                for bench in (False, True) for cl in (False, True))}


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One model + Adam + fixed batch on ``device`` for one variant."""

    def __init__(self, variant: Variant, preset: str, size: int, batch: int, device: torch.device, seed: int = 0):
        self.variant, self.device, self.batch = variant, device, batch
        from uml.losses import uml_loss
        from uml.models import build_model

        before = allocated(device)
        torch.manual_seed(seed)  # the same initial weights for every variant
        model = build_model(preset, image_size=size).train()
        generator = torch.Generator().manual_seed(seed)
        x = torch.rand(batch, 3, size, size, generator=generator)
        mask = torch.randint(0, model.cfg.num_mask_classes, (batch, size, size), generator=generator)
        label = torch.randint(0, model.cfg.num_classes, (batch,), generator=generator)
        if variant.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.model = model.to(device)
        self.x, self.mask, self.label = x.to(device), mask.to(device), label.to(device)  # .to keeps the layout
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, weight_decay=1e-5)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if variant.precision == "bf16"
                         else nullcontext())
        self.weights = LossParams()
        self.loss = uml_loss
        self.allocated_before = before
        self.resident = 0  # bytes of weights, grads, Adam state and batch, known after the warm-up
        self.rates: list[float] = []
        self.peak = 0

    def step(self) -> None:
        with self.autocast:
            out = self.model(self.x)
        loss, _ = self.loss(out, self.mask, self.label, self.weights, epoch=1, evidential=self.model.evidential)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def warm_up(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        self.resident = allocated(self.device) - self.allocated_before

    def time_round(self, steps: int) -> None:
        synchronize(self.device)
        others = allocated(self.device) - self.resident
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        self.rates.append(self.batch * steps / (time.perf_counter() - start))
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - others)

    def count_syncs(self) -> int:
        """Host syncs in one step: the warnings of ``set_sync_debug_mode("warn")`` (none on a CPU)."""
        synchronize(self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                self.step()
            finally:
                if self.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        synchronize(self.device)
        return sum(SYNC_WARNING in str(w.message).lower() for w in caught)

    def count_flops(self) -> int:
        """FLOPs of one training step (forward, loss, backward) as FlopCounterMode counts them."""
        with FlopCounterMode(display=False) as counter:
            self.step()
        synchronize(self.device)
        return int(counter.get_total_flops())


def measure_group(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the variants of one ``cudnn.benchmark`` setting, in alternating rounds."""
    global _T0
    from uml.models import count_parameters

    _T0 = job["t0"]
    torch.set_num_threads(job["threads"])
    torch.backends.cudnn.benchmark = job["cudnn_benchmark"]
    device = torch.device(job["device"])
    runners: dict[str, Runner] = {}
    for name in job["variants"]:
        progress(f"model: building {job['preset']} at {job['size']} px for {name}, {job['warmup']} warm-up steps")
        runners[name] = Runner(VARIANTS[name], job["preset"], job["size"], job["batch_size"], device)
        runners[name].warm_up(job["warmup"])
    first = next(iter(runners.values()))
    flops = first.count_flops()
    progress(f"model: {flops / job['batch_size'] / 1e9:.1f} GFLOP per training image; counting host syncs")
    syncs = {name: runner.count_syncs() for name, runner in runners.items()}
    for r in range(job["rounds"]):
        for runner in runners.values():
            runner.time_round(job["steps"])
        progress(f"model: cudnn.benchmark {job['cudnn_benchmark']}: round {r + 1}/{job['rounds']} "
                 f"({job['steps']} steps per variant) done")
    if device.type != "cuda":  # dry run: the process's peak RSS stands in for GPU memory
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        for runner in runners.values():
            runner.peak = rss
    return {"flops": flops, "params": count_parameters(first.model),
            "variants": {name: {"rates": r.rates, "peak": r.peak, "syncs": syncs[name]} for name, r in runners.items()}}


def section_model(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    names = [name for name in VARIANTS if name == "fp32" or name in args.variants]
    # PyTorch's cuDNN plan cache lives for the process and ignores the benchmark flag: the first
    # setting to meet a convolution decides its algorithm for both. Each setting therefore gets a
    # fresh process (spawned, so CUDA starts clean); its variants alternate within it.
    measured: dict[str, dict[str, Any]] = {}
    flops = params = 0
    for benchmark in (False, True):
        group = [name for name in names if VARIANTS[name].cudnn_benchmark == benchmark]
        if not group:
            continue
        job = {"t0": _T0, "threads": torch.get_num_threads(), "cudnn_benchmark": benchmark, "device": device.type,
               "variants": group, **{k: getattr(args, k) for k in ("preset", "size", "batch_size", "warmup", "steps", "rounds")}}
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out = pool.submit(measure_group, job).result()
        flops, params = out["flops"], out["params"]
        measured.update(out["variants"])

    base = statistics.median(measured["fp32"]["rates"])
    variants = {}
    for name in names:
        variant, m = VARIANTS[name], measured[name]
        rate = statistics.median(m["rates"])
        peak_tflops = args.peak_tflops[0] if variant.precision == "bf16" else args.peak_tflops[1]
        achieved = flops * rate / args.batch_size
        variants[name] = {
            "precision": variant.precision, "channels_last": variant.channels_last,
            "cudnn_benchmark": variant.cudnn_benchmark,
            "images_per_s": rate, "rounds_images_per_s": m["rates"], "vs_fp32": rate / base,
            "peak_memory_bytes": m["peak"], "syncs_per_step": m["syncs"],
            "achieved_tflops": achieved / 1e12, "peak_tflops": peak_tflops, "mfu": achieved / (peak_tflops * 1e12),
        }
    result = {
        "preset": args.preset, "size": args.size, "batch_size": args.batch_size, "warmup": args.warmup,
        "steps": args.steps, "rounds": args.rounds, "params": params,
        "flops_per_step": flops, "flops_per_image": flops / args.batch_size,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "variants": variants,
    }

    memory = "peak memory (GiB)" if device.type == "cuda" else "peak RSS (GiB, dry run)"
    print(f"\n**Model** (`{args.preset}` preset, {args.size} px, batch {args.batch_size}, "
          f"{result['params'] / 1e6:.1f}M parameters, {result['flops_per_image'] / 1e9:.1f} GFLOP per training image; "
          f"median of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps)\n")
    print(f"| variant | training images/s | vs fp32 | {memory} | TFLOP/s | MFU | host syncs/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, v in variants.items():
        peak_name = "bf16" if v["precision"] == "bf16" else "tf32"
        print(f"| {name} | {v['images_per_s']:.1f} | {v['vs_fp32']:.2f}x | {v['peak_memory_bytes'] / GIB:.1f} | "
              f"{v['achieved_tflops']:.3g} | {100 * v['mfu']:.3g} % of {peak_name} {v['peak_tflops']:g} | "
              f"{v['syncs_per_step']} |")
    return result


# -- section 2: the loader -----------------------------------------------------------------------


def base_params(root: Path, **dotted: Any):
    """The repository's params.yaml with ``data.root`` under ``root`` and ``dotted`` overrides."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = parse_params(raw, source=str(REPO / "params.yaml"))
    return params.with_overrides({"data.root": str(root / "data"), **dotted}, source="gpu_check")


def loader_rate(dataset: Any, *, batch_size: int, workers: int, pin: bool) -> float:
    """Samples per second over one pass, after one warm-up batch (worker start)."""
    from uml.data.dataset import worker_init_fn

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False,
                        worker_init_fn=worker_init_fn if workers else None, persistent_workers=workers > 0,
                        pin_memory=pin)
    next(iter(loader))
    count, start = 0, time.perf_counter()
    for batch in loader:
        count += batch["image"].shape[0]
    rate = count / (time.perf_counter() - start)
    del loader  # stops persistent workers
    return rate


def section_loader(args: argparse.Namespace, device: torch.device, model: dict[str, Any] | None) -> dict[str, Any]:
    from uml.data.dataset import SegClsDataset
    from uml.data.prepare import prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loader is measured, not intra-op parallelism
    try:
        with tempfile.TemporaryDirectory(prefix="uml-gpu-check-loader-") as tmp:
            params = base_params(Path(tmp), **{"data.image_size": args.loader_size,
                                               "data.synthetic.num_images": args.loader_images,
                                               "data.synthetic.render_size": max(args.loader_size, 128)})
            progress(f"loader: preparing {args.loader_images} synthetic images at {args.loader_size} px")
            store = prepare(params)
            # Each image several times per pass, so that a pass is long against the workers' start-up.
            indices = np.resize(np.arange(args.loader_images), args.loader_samples)
            dataset = SegClsDataset(store, indices, augment=params.data.augment, seed=0)
            rates = {}
            for workers in args.workers:
                rates[workers] = loader_rate(dataset, batch_size=args.batch_size, workers=workers,
                                             pin=device.type == "cuda")
                progress(f"loader: {workers} workers: {rates[workers]:.0f} samples/s")
    finally:
        torch.set_num_threads(threads)

    best_name, best_rate = None, None
    if model:
        best_name, best = max(model["variants"].items(), key=lambda kv: kv[1]["images_per_s"])
        best_rate = best["images_per_s"]
    per_worker = {w: r / w for w, r in rates.items() if w > 0}
    needed = math.ceil(best_rate / min(per_worker.values())) if best_rate and per_worker else None
    result = {
        "size": args.loader_size, "num_images": args.loader_images, "batch_size": args.batch_size,
        "samples": args.loader_samples, "augment": params.data.augment.model_dump(mode="json"),
        "pin_memory": device.type == "cuda",
        "workers": {str(w): {"samples_per_s": r, **({"per_worker": r / w} if w else {}),
                             **({"vs_model": r / best_rate} if best_rate else {})} for w, r in rates.items()},
        "model_variant": best_name, "model_images_per_s": best_rate, "workers_for_model": needed,
    }

    against = f" | vs {best_name} ({best_rate:.0f} img/s)" if best_rate else ""
    print(f"\n**Loader** (`SegClsDataset` + augmentation, {args.loader_size} px store, batch {args.batch_size}, "
          f"{args.loader_samples} samples of {args.loader_images} images; {cpu_name()}, {os.cpu_count()} logical CPUs)\n")
    print(f"| DataLoader workers | samples/s | per worker{against} |")
    print("|---:|---:|---:|" + ("---:|" if best_rate else ""))
    for w, r in rates.items():
        print(f"| {w} | {r:.0f} | {f'{r / w:.0f}' if w else '(main process)'} |"
              + (f" {r / best_rate:.2f}x |" if best_rate else ""))
    if needed:
        print(f"\nAt the slowest measured rate per worker, {best_name}'s {best_rate:.0f} img/s needs about "
              f"{needed} loader worker{'s' if needed != 1 else ''} (CPUs) per GPU.")
    return result


# -- section 3: the exported model in onnxruntime ------------------------------------------------

CUDA_EP = "CUDAExecutionProvider"


def section_onnx(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The ``--preset`` model exported as the export stage does, timed in onnxruntime's CUDA
    execution provider where this onnxruntime has it, next to eager torch on the same device.
    Both take a float32 numpy batch and return numpy outputs (host copies included on both sides).
    Without the CUDA provider (the CPU-only ``onnxruntime`` package) the section only records so;
    a dry run times the CPU provider instead, to test the plumbing."""
    import onnxruntime as ort

    from uml.export import INPUT_NAME, export_onnx
    from uml.models import build_model

    available = ort.get_available_providers()
    result: dict[str, Any] = {"onnxruntime": ort.__version__, "available_providers": available,
                              "preset": args.preset, "size": args.size, "cuda_provider_installed": CUDA_EP in available}
    provider = CUDA_EP if CUDA_EP in available else ("CPUExecutionProvider" if args.dry_run else None)
    # What `uml predict` and the evaluate stage choose on this machine with provider auto.
    from uml.onnx_model import choose_providers, gpu_visible

    choice = choose_providers("auto")
    result["uml_auto_provider"] = {"gpu_visible": gpu_visible(), "device": choice.device, "reason": choice.reason}
    header = (f"\n**ONNX** (`{args.preset}` preset at {args.size} px, onnxruntime {ort.__version__}; "
              f"`evaluate.provider: auto` runs on {choice.reason})\n")
    if provider is None:
        result["status"] = "not installed"
        result["reason"] = (f"{CUDA_EP} is not among onnxruntime {ort.__version__}'s available providers "
                            f"{available}: the CPU-only onnxruntime package (onnxruntime-gpu has it)")
        print(header + f"\nNot timed: {result['reason']}.")
        return result

    torch.manual_seed(0)
    model = build_model(args.preset, image_size=args.size).eval()
    with tempfile.TemporaryDirectory(prefix="uml-gpu-check-onnx-") as tmp:
        path = Path(tmp) / f"{args.preset}.onnx"
        progress(f"onnx: exporting {args.preset} at {args.size} px")
        started = time.perf_counter()
        export_onnx(model, path)
        result["export_seconds"] = time.perf_counter() - started
        result["onnx_bytes"] = path.stat().st_size
        providers = [(CUDA_EP, {"device_id": 0}), "CPUExecutionProvider"] if provider == CUDA_EP else [provider]
        try:
            sess = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # listed, but its libraries (CUDA, cuDNN) did not load
            result["status"] = "failed"
            result["reason"] = f"{provider} is listed but the session failed: {type(exc).__name__}: {exc}"
            print(header + f"\nNot timed: {result['reason'][:500]}")
            return result
    result["session_providers"] = sess.get_providers()
    if sess.get_providers()[0] != provider:
        result["status"] = "fell back"
        result["reason"] = f"asked for {provider}, the session runs on {sess.get_providers()}"
        print(header + f"\nNot timed: {result['reason']}.")
        return result
    result["status"] = "timed"
    result["provider"] = provider

    names = [o.name for o in sess.get_outputs()]
    model = model.to(device)
    rows = []
    for batch in sorted({1, args.batch_size}):
        x = np.random.default_rng(batch).random((batch, 3, args.size, args.size), dtype=np.float32)

        def run_torch() -> dict[str, np.ndarray]:
            with torch.no_grad():
                out = model.infer(torch.from_numpy(x).to(device))
                return {k: v.cpu().numpy() for k, v in out.items()}  # .cpu() synchronises

        def run_ort() -> list[np.ndarray]:
            return sess.run(names, {INPUT_NAME: x})

        reference = run_torch()
        got = dict(zip(names, run_ort()))
        diff = max(float(np.abs(got[n] - reference[n]).max()) for n in names)
        times = {}
        for engine, fn in (("ort", run_ort), ("torch", run_torch)):  # one after the other, not interleaved
            for _ in range(args.onnx_warmup):
                fn()
            samples = []
            for _ in range(args.onnx_iters):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            times[engine] = statistics.median(samples)
        rows.append({"batch": batch, "max_abs_diff": diff, "ort_ms": 1e3 * times["ort"], "torch_ms": 1e3 * times["torch"],
                     "ort_images_per_s": batch / times["ort"], "torch_images_per_s": batch / times["torch"],
                     "torch_over_ort": times["torch"] / times["ort"]})
        progress(f"onnx: batch {batch}: onnxruntime {1e3 * times['ort']:.2f} ms, torch {1e3 * times['torch']:.2f} ms")
    result.update(warmup=args.onnx_warmup, iters=args.onnx_iters, rows=rows)

    print(header.rstrip("\n") + f": {provider} against eager torch fp32 on {device.type}, numpy in and out; "
          f"median of {args.onnx_iters} after {args.onnx_warmup} warm-up runs; export {result['export_seconds']:.0f} s\n")
    print("| batch | onnxruntime (ms) | torch (ms) | onnxruntime images/s | torch images/s | torch / onnxruntime time | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['ort_ms']:.2f} | {r['torch_ms']:.2f} | {r['ort_images_per_s']:.0f} | "
              f"{r['torch_images_per_s']:.0f} | {r['torch_over_ort']:.2f}x | {r['max_abs_diff']:.1e} |")
    return result


# -- section 4: one NCCL rank without Ray ---------------------------------------------------------


def _collective_child(conn: Any, backend: str, device_type: str, t0: float) -> None:
    """In a fresh process: one rank of ``backend`` over a TCP store on 127.0.0.1 (world size 1)."""
    global _T0
    import datetime

    import torch.distributed as dist

    _T0 = t0
    out: dict[str, Any] = {"ok": False}
    try:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.zeros(1, device=device)  # the CUDA context, so that init times the backend alone
        started = time.perf_counter()
        store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=datetime.timedelta(seconds=60))
        out["store_port"] = store.port
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60),
                                **({"device_id": device} if device.type == "cuda" else {}))
        small = torch.arange(1024, dtype=torch.float32, device=device)
        dist.all_reduce(small)
        synchronize(device)
        out["init_and_first_all_reduce_seconds"] = time.perf_counter() - started
        out["small_correct"] = bool(torch.equal(small.cpu(), torch.arange(1024, dtype=torch.float32)))
        samples = []
        for _ in range(20):
            start = time.perf_counter()
            dist.all_reduce(small)
            synchronize(device)
            samples.append(time.perf_counter() - start)
        out["small_all_reduce_us"] = 1e6 * statistics.median(samples)
        big = torch.full((16 * 1024 * 1024,), 2.0, device=device)  # 64 MiB of float32
        start = time.perf_counter()
        dist.all_reduce(big)
        synchronize(device)
        out["big_all_reduce_ms"] = 1e3 * (time.perf_counter() - start)
        out["big_bytes"] = big.numel() * big.element_size()
        out["big_correct"] = bool((big == 2.0).all().item())
        dist.barrier()
        out["backend"] = dist.get_backend()
        dist.destroy_process_group()
        out["ok"] = out["small_correct"] and out["big_correct"]
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    conn.send(out)
    conn.close()


def section_nccl(args: argparse.Namespace, device: torch.device, problems: list[str]) -> dict[str, Any]:
    """A smoke test of the NCCL path without Ray: one rank (world size 1) in a spawned process,
    a TCP store on 127.0.0.1, ``init_process_group("nccl")``, all-reduces of 4 KiB and 64 MiB,
    a barrier. The dry run does the same with gloo on the CPU."""
    backend = "gloo" if device.type == "cpu" else "nccl"
    version = torch.cuda.nccl.version() if backend == "nccl" else None  # a tuple in recent torch, an int before
    result: dict[str, Any] = {"backend": backend, "world_size": 1,
                              "nccl_version": ".".join(map(str, version)) if isinstance(version, tuple) else version}
    progress(f"nccl: one {backend} rank, TCP store on 127.0.0.1")
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_collective_child, args=(send, backend, device.type, _T0))
    started = time.perf_counter()
    child.start()
    send.close()
    out = receive.recv() if receive.poll(args.nccl_timeout) else {"ok": False, "error": f"no answer in {args.nccl_timeout} s"}
    child.join(10)
    if child.is_alive():
        child.kill()
        child.join()
    result.update(out, seconds=time.perf_counter() - started, exit_status=child.exitcode)
    if not result["ok"]:
        problems.append(f"nccl: {result.get('error', 'wrong all-reduce result')}\n{result.get('traceback', '')}")

    print(f"\n**Collectives without Ray** (`torch.distributed`, {backend}"
          + (f" {result['nccl_version']}" if result["nccl_version"] else "") + ", world size 1, TCP store on 127.0.0.1)\n")
    print("| check | result |")
    print("|---|---|")
    if "error" in result:
        print(f"| init + all-reduce | FAILED: `{result['error'][:300]}` |")
    else:
        print(f"| init_process_group + first all-reduce | {result['init_and_first_all_reduce_seconds']:.2f} s |")
        print(f"| 4 KiB all-reduce (median of 20) | {result['small_all_reduce_us']:.0f} µs, "
              f"{'correct' if result['small_correct'] else 'WRONG'} |")
        print(f"| 64 MiB all-reduce | {result['big_all_reduce_ms']:.2f} ms, {'correct' if result['big_correct'] else 'WRONG'} |")
        print(f"| barrier, destroy_process_group | {'done' if result['ok'] else '-'} |")
    return result


# -- section 5: the train stage on the GPU -------------------------------------------------------


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, str]:
    """Run ``cmd`` in the repository in its own process group, output to ``log``; kill the group on
    timeout (returns None as the exit status then)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, log.read_text(errors="replace")


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def epoch_lines(text: str) -> list[str]:
    """The stage's progress lines, without Ray's "(RayTrainWorker pid=...)" prefix."""
    return [line[line.index("epoch "):].strip() for line in text.splitlines() if "epoch " in line and " img/s" in line]


def section_train(args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    from tests.train.blocked_train import marker  # the held train stage of the crash-and-resume test

    gpu = not args.dry_run
    env = {**os.environ, "RAY_ADDRESS": "", "NO_ALBUMENTATIONS_UPDATE": "1"}  # own local Ray instance
    result: dict[str, Any] = {"use_gpu": gpu, "backend": "nccl" if gpu else "gloo", "preset": args.train_preset,
                              "size": args.train_size, "num_images": args.train_images, "epochs": 2}
    with tempfile.TemporaryDirectory(prefix="uml-gpu-check-train-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        raw["data"].update(root=str(root / "data"), image_size=args.train_size, split={"val": 0.2, "test": 0.2, "calib": 0.2})
        raw["data"]["synthetic"].update(num_images=args.train_images, render_size=max(args.train_size, 128))
        raw["model"].update(preset=args.train_preset)
        raw["train"].update(epochs=2, batch_size=4, constant_epochs=2, use_tuned=False, precision="bf16",
                            channels_last=True, loader_workers=2 if gpu else 0)
        raw["loss"].update(kl_annealing_epochs=2)
        raw["ray"].update(num_workers=1, use_gpu=gpu, resources_per_worker={"CPU": 2, "GPU": 1} if gpu else {"CPU": 1})
        path = root / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        params = parse_params(raw, source=str(path))
        data_root, metrics = Path(params.data.root), Paths(params).train_dir / "metrics.json"

        progress("train: pipeline.prepare (tiny synthetic set)")
        rc, text = run_logged([sys.executable, "-m", "pipeline.prepare", "--params", str(path)],
                              root / "prepare.log", args.train_timeout, env)
        if rc != 0:
            problems.append(f"train: pipeline.prepare failed (exit {rc}):\n{tail(text)}")
            return result

        # 1. A run held after epoch 1's checkpoint, then killed like a crash.
        progress("train: pipeline.train, held after epoch 1 and then killed (SIGKILL)")
        held = [sys.executable, "-m", "tests.train.blocked_train", "--block-after", "1", "--params", str(path)]
        started = time.perf_counter()
        with (root / "held.log").open("w") as out:
            proc = subprocess.Popen(held, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

            def logged_step() -> int | None:
                try:
                    return json.loads(metrics.read_text())["step"]
                except (OSError, ValueError, KeyError):
                    return None

            try:
                deadline = time.time() + args.train_timeout
                while proc.poll() is None and time.time() < deadline and not (
                        marker(data_root, 1).exists() and logged_step() == 0):
                    time.sleep(0.5)
                reached = proc.poll() is None and marker(data_root, 1).exists() and logged_step() == 0
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = (root / "held.log").read_text(errors="replace")
        result["held"] = {"seconds": time.perf_counter() - started, "reached_epoch_1": reached,
                          "epochs": epoch_lines(text), "device_line": _device_line(text)}
        if not reached:
            problems.append(f"train: the held run did not reach epoch 1's checkpoint:\n{tail(text)}")
            return result
        time.sleep(2)  # let the killed Ray processes go

        # 2. The plain rerun resumes from epoch 1's checkpoint and trains epoch 2 only.
        progress("train: pipeline.train again (must resume from epoch 1)")
        started = time.perf_counter()
        rc, text = run_logged([sys.executable, "-m", "pipeline.train", "--params", str(path)],
                              root / "resume.log", args.train_timeout, env)
        resumed = text.split("resuming from the checkpoint", 1)[-1]
        checks = {
            "exit_0": rc == 0,
            "continues_the_earlier_run": RESUME_LINE in text,
            "resumed_from_epoch_1": "resuming from the checkpoint of epoch 1 (1/2 epochs done)" in text,
            "trained_only_epoch_2": "epoch   2/2" in resumed and "epoch   1/2" not in resumed,
            "on_the_expected_device": (" on cuda" if gpu else " on cpu") in (_device_line(text) or ""),
        }
        result["resume"] = {"seconds": time.perf_counter() - started, "exit_status": rc, "checks": checks,
                            "epochs": epoch_lines(text), "device_line": _device_line(text)}
        failed = [k for k, ok in checks.items() if not ok]
        if failed:
            problems.append(f"train: the rerun did not resume as expected ({', '.join(failed)}):\n{tail(text)}")

        # 3. Two ranks on the one GPU: refused before training starts?
        if gpu:
            progress("train: two ranks on one GPU (resources_per_worker GPU 0.5)")
            raw["train"].update(epochs=1, seed=1)
            raw["ray"].update(num_workers=2, max_failures=0, resources_per_worker={"CPU": 1, "GPU": 0.5})
            shared = root / "two-ranks.yaml"
            shared.write_text(yaml.safe_dump(raw, sort_keys=False))
            started = time.perf_counter()
            rc, text = run_logged([sys.executable, "-m", "pipeline.train", "--params", str(shared)],
                                  root / "two-ranks.log", min(args.train_timeout, 120), env)
            errors = [line for line in text.splitlines() if "error" in line.lower()]
            refused = rc not in (0, None) and not epoch_lines(text)
            result["two_ranks_one_gpu"] = {
                "seconds": time.perf_counter() - started, "exit_status": rc, "refused_before_training": refused,
                "message": errors[-1].strip() if errors else tail(text, 3).replace("\n", " / ")}
            if not refused:
                problems.append(f"train: two ranks on one GPU were not refused before training (exit {rc}):\n{tail(text)}")

    print(f"\n**Train stage** (`pipeline.train`, {'1 GPU, NCCL' if gpu else 'CPU, gloo (dry run)'}; "
          f"`{args.train_preset}` preset, {args.train_images} synthetic images at {args.train_size} px, 2 epochs)\n")
    print("| run | wall time (s) | result |")
    print("|---|---:|---|")
    held_run = result["held"]
    print(f"| held after epoch 1, then SIGKILL | {held_run['seconds']:.0f} | "
          f"{'; '.join(held_run['epochs']) or '-'} |")
    resume = result.get("resume")
    if resume:
        ok = all(resume["checks"].values())
        print(f"| rerun, same params | {resume['seconds']:.0f} | {'resumed from epoch 1' if ok else 'NOT resumed as expected'}: "
              f"{'; '.join(resume['epochs']) or '-'} |")
    two = result.get("two_ranks_one_gpu")
    if two:
        verdict = "refused before training" if two["refused_before_training"] else f"exit {two['exit_status']}, not refused"
        print(f"| 2 ranks on 1 GPU | {two['seconds']:.0f} | {verdict}: `{two['message'][:200]}` |")
    return result


def _device_line(text: str) -> str | None:
    lines = [line[line.index("training in "):].strip() for line in text.splitlines() if "training in " in line]
    return lines[-1] if lines else None


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU with tiny sizes (plumbing only)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/gpu_check.json, "
                                                 "gpu_check-dry-run.json with --dry-run)")
    parser.add_argument("--peak-tflops", type=float, nargs=2, metavar=("BF16", "TF32"),
                        default=(PEAK_TFLOPS_BF16, PEAK_TFLOPS_TF32),
                        help="the GPU's dense peak TFLOP/s for MFU (default: H100/H200 SXM, NVIDIA datasheet: %(default)s)")
    model = parser.add_argument_group("model (GPU default / --dry-run default)")
    model.add_argument("--preset", choices=("paper", "small"), help="paper / small")
    model.add_argument("--size", type=int, help="image size: 256 / 64")
    model.add_argument("--batch-size", type=int, help="model and loader batch: 8 (the published batch) / 2")
    model.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                       help=f"default: all of {', '.join(VARIANTS)}; fp32 (the baseline) is always measured")
    model.add_argument("--warmup", type=int, help="untimed steps per variant (cudnn.benchmark tunes here): 5 / 1")
    model.add_argument("--steps", type=int, help="timed steps per round: 10 / 1")
    model.add_argument("--rounds", type=int, help="rounds over all variants (the median is shown): 5 / 1")
    loader = parser.add_argument_group("loader (GPU default / --dry-run default)")
    loader.add_argument("--loader-size", type=int, help="store resolution: 256 / 64")
    loader.add_argument("--loader-images", type=int, help="images in the store: 256 / 16")
    loader.add_argument("--loader-samples", type=int, help="samples read per worker count (the images repeated): 1024 / 32")
    loader.add_argument("--workers", type=int, nargs="+", help="DataLoader worker counts: 0 4 8 / 0 2")
    onnx = parser.add_argument_group("onnx and nccl (GPU default / --dry-run default)")
    onnx.add_argument("--onnx-warmup", type=int, help="untimed runs per engine and batch: 3 / 0")
    onnx.add_argument("--onnx-iters", type=int, help="timed runs per engine and batch (the median is shown): 20 / 1")
    onnx.add_argument("--nccl-timeout", type=int, help="seconds the one-rank process may take: 120 / 120")
    train = parser.add_argument_group("train (GPU default / --dry-run default)")
    train.add_argument("--train-preset", choices=("paper", "small"), help="paper / small")
    train.add_argument("--train-size", type=int, help="image size of the tiny set: 64 / 64")
    train.add_argument("--train-images", type=int, help="images in the tiny set: 48 / 48")
    train.add_argument("--train-timeout", type=int, help="seconds per stage run: 300 / 400")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.dry_run].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / ("gpu_check-dry-run.json" if args.dry_run else "gpu_check.json")
    return args


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available (torch.cuda.is_available() is False: "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}). This check measures a GPU and never "
              "falls back to the CPU; run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
              "or pass --dry-run to test the plumbing on the CPU.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)  # frugal on a shared CPU; the numbers mean nothing anyway
        gpu_name = "none (dry run on the CPU)"
    else:
        gpu_name = torch.cuda.get_device_name(device)
        if not any(kind in gpu_name for kind in ("H100", "H200")) and list(args.peak_tflops) == [PEAK_TFLOPS_BF16, PEAK_TFLOPS_TF32]:
            progress(f"warning: {gpu_name} is not an H100/H200: pass its peaks with --peak-tflops for a meaningful MFU")

    meta = {
        "command": command_line(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run, "device": gpu_name, "cpu": cpu_name(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if not args.dry_run else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if not args.dry_run else None,
        "peak_tflops": {"bf16": args.peak_tflops[0], "tf32": args.peak_tflops[1],
                        "source": "NVIDIA H100/H200 SXM datasheets, dense (half the with-sparsity figures)"},
        "sections": args.sections,
    }
    if not args.dry_run:
        meta["multiprocessors"] = torch.cuda.get_device_properties(device).multi_processor_count
        try:  # the driver and clocks, as nvidia-smi reports them
            meta["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            meta["nvidia_smi"] = f"not available: {exc}"
    print(f"`{meta['command']}`\n\nGPU: {gpu_name}; torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}; "
          f"CPU: {meta['cpu']}, {meta['cpus']} logical CPUs; {meta['date']}"
          + ("\n\n**Dry run on the CPU: the numbers below test the plumbing and mean nothing.**" if args.dry_run else ""))
    results: dict[str, Any] = {"meta": meta}
    problems: list[str] = []
    sections = {"model": lambda: section_model(args, device),
                "loader": lambda: section_loader(args, device, results.get("model")),
                "onnx": lambda: section_onnx(args, device),
                "nccl": lambda: section_nccl(args, device, problems),
                "train": lambda: section_train(args, problems)}
    for name, run_section in sections.items():
        if name not in args.sections:
            continue
        try:
            results[name] = run_section()
        except Exception as exc:  # one section's failure keeps the others' numbers
            traceback.print_exc()
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
        meta["seconds"] = time.time() - _T0
        meta["problems"] = problems
        write_json(args.out, results)  # after each section: a run killed later keeps what it measured
    meta["seconds"] = time.time() - _T0
    meta["problems"] = problems
    meta["complete"] = True
    write_json(args.out, results)
    print(f"\n{meta['seconds']:.0f} s in all; numbers in {os.path.relpath(args.out)}")
    for problem in problems:
        print(f"\ngpu_check: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
