"""Training-speed levers for the CPU default, each as a ratio against plain fp32 in the same run.

    python benchmarks/train_speed.py                        # small preset, 128 px, batch 8 (~3 min on 2 cores)
    python benchmarks/train_speed.py --variants fp32 channels_last --repeats 5
    python benchmarks/train_speed.py --steps 1 --warmup 1 --repeats 1 --variants fp32 bf16   # smoke test

Variants (full training steps: forward, ``uml_loss``, backward, Adam, in train mode):

- ``fp32``: the baseline, NCHW tensors;
- ``channels_last``: model and input in ``torch.channels_last`` memory format (oneDNN's preferred
  layout for convolutions on CPU);
- ``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward pass; only fast on
  CPUs with native bf16 matrix units (AMX, or AVX-512 BF16);
- ``bf16_channels_last``: both;
- ``compile``: ``torch.compile`` (inductor). Its one-off compile time is reported separately
  because every training process pays it again.

Timings alternate between the variants (A B C A B C ...) for ``--repeats`` rounds and the table
shows the median per variant, so slow phases of a shared machine hit every variant alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from _machine import command_line, cpu_name  # noqa: E402
from uml.config import LossParams  # noqa: E402
from uml.losses import uml_loss  # noqa: E402
from uml.models import build_model  # noqa: E402

VARIANTS = ("fp32", "channels_last", "bf16", "bf16_channels_last", "compile")


class Runner:
    """One model + optimiser + fixed batch per variant; ``time(steps)`` returns images/s."""

    def __init__(self, variant: str, preset: str, size: int, batch: int, seed: int = 0):
        torch.manual_seed(seed)
        self.variant = variant
        self.model = build_model(preset, image_size=size).train()
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.rand(batch, 3, size, size, generator=generator)
        self.mask = torch.randint(0, self.model.cfg.num_mask_classes, (batch, size, size), generator=generator)
        self.label = torch.randint(0, self.model.cfg.num_classes, (batch,), generator=generator)
        if variant in ("channels_last", "bf16_channels_last"):
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, weight_decay=1e-5)
        self.forward = torch.compile(self.model) if variant == "compile" else self.model
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16) if variant.startswith("bf16") else nullcontext()
        self.weights = LossParams()
        self.batch = batch
        self.compile_seconds = 0.0

    def step(self) -> None:
        with self.autocast:
            out = self.forward(self.x)
        loss, _ = uml_loss(out, self.mask, self.label, self.weights, epoch=1, evidential=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def warm_up(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.variant == "compile":
            self.compile_seconds = time.perf_counter() - start

    def time(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return self.batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=("small", "paper"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compile happens here)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants")
    args = parser.parse_args()
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")
    torch.set_num_threads(args.threads)

    runners = {v: Runner(v, args.preset, args.size, args.batch_size) for v in args.variants}
    for runner in runners.values():
        runner.warm_up(args.warmup)
    rates: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):
        for variant, runner in runners.items():
            rates[variant].append(runner.time(args.steps))

    base = statistics.median(rates["fp32"])
    print(f"\n{args.preset} preset, {args.size} px, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, "
          f"{cpu_name()}; median of {args.repeats} rounds x {args.steps} steps\n")
    print("| variant | training images/s | vs fp32 | note |")
    print("|---|---:|---:|---|")
    for variant in args.variants:
        rate = statistics.median(rates[variant])
        note = f"compile + warm-up {runners[variant].compile_seconds:.0f} s" if variant == "compile" else ""
        print(f"| {variant} | {rate:.2f} | {rate / base:.2f}x | {note} |")
    print(f"\n`{command_line()}`")


if __name__ == "__main__":
    main()
