"""Model cost of the two presets on CPU: parameter counts, forward latency, training throughput.

    python benchmarks/model.py                                  # small at 128 + paper at 256, 2 threads (~2-3 min on 2 cores)
    python benchmarks/model.py --skip-paper --iters 20          # small preset only (< 1 min)
    python benchmarks/model.py --iters 2 --train-steps 1 --paper-iters 1 --paper-train-steps 1   # smoke test

What is measured, per preset (``small`` at its default 128 px, ``paper`` at 256 px):

- parameters: total and per part (cls_encoder, seg_encoder, mixers, mutual_decoder, navigator,
  instructor), counted with ``uml.models.count_parameters``;
- forward latency: ``model(x)`` in eval mode under ``torch.no_grad()``, batch 1 and batch 8, the
  median of ``--iters`` timed runs after ``--warmup`` untimed ones;
- training throughput: images/s of full steps (forward, ``uml_loss``, backward, Adam step) in
  train mode, after ``--warmup`` untimed steps.

The paper preset trains at well under 1 img/s on a 2-core CPU (measured: 0.13 img/s at batch 2),
so it has its own, minimal iteration counts (``--paper-*``; default 1 warm-up + 2 timed steps at
batch 2). Everything runs with ``torch.set_num_threads(--threads)``. The last column of each table
is the ratio paper / small measured in the same run (the machine is noisy; compare ratios).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from _machine import command_line, cpu_name  # noqa: E402
from uml.config import LossParams  # noqa: E402
from uml.losses import uml_loss  # noqa: E402
from uml.models import PRESETS, build_model, count_parameters  # noqa: E402

PARTS = ("cls_encoder", "seg_encoder", "mixers", "mutual_decoder", "navigator", "instructor")


def forward_latency(model: torch.nn.Module, batch: int, size: int, warmup: int, iters: int) -> float:
    """Median seconds of one eval-mode, no-grad forward pass at ``batch``."""
    model.eval()
    x = torch.rand(batch, 3, size, size)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_throughput(model: torch.nn.Module, batch: int, size: int, warmup: int, steps: int) -> float:
    """Images per second of full training steps (forward, uml_loss, backward, Adam)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=generator)
    mask = torch.randint(0, model.cfg.num_mask_classes, (batch, size, size), generator=generator)
    label = torch.randint(0, model.cfg.num_classes, (batch,), generator=generator)
    weights = LossParams()

    def step() -> None:
        loss, _ = uml_loss(model(x), mask, label, weights, epoch=1, evidential=model.evidential)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def measure(preset: str, size: int, *, warmup: int, iters: int, train_batch: int, train_steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(preset, image_size=size)
    parts = {p: count_parameters(m) if (m := getattr(model, p, None)) is not None else 0 for p in PARTS}
    row = {"size": size, "params": count_parameters(model), "parts": parts, "train_batch": train_batch}
    for batch in (1, 8):
        print(f"  {preset}: forward, batch {batch} ...", file=sys.stderr, flush=True)
        row[f"fwd{batch}"] = forward_latency(model, batch, size, warmup, iters)
    print(f"  {preset}: training, batch {train_batch} ...", file=sys.stderr, flush=True)
    row["train"] = train_throughput(model, train_batch, size, warmup, train_steps)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    parser.add_argument("--small-size", type=int, default=PRESETS["small"]["image_size"])
    parser.add_argument("--iters", type=int, default=10, help="small: timed forward passes per batch size")
    parser.add_argument("--train-batch", type=int, default=8, help="small: training batch")
    parser.add_argument("--train-steps", type=int, default=5, help="small: timed training steps")
    parser.add_argument("--skip-paper", action="store_true", help="measure the small preset only")
    parser.add_argument("--paper-size", type=int, default=256)
    parser.add_argument("--paper-iters", type=int, default=2, help="paper: timed forward passes per batch size")
    parser.add_argument("--paper-train-batch", type=int, default=2, help="paper: training batch")
    parser.add_argument("--paper-train-steps", type=int, default=2, help="paper: timed training steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    rows = {"small": measure("small", args.small_size, warmup=args.warmup, iters=args.iters,
                             train_batch=args.train_batch, train_steps=args.train_steps)}
    if not args.skip_paper:
        rows["paper"] = measure("paper", args.paper_size, warmup=args.warmup, iters=args.paper_iters,
                                train_batch=args.paper_train_batch, train_steps=args.paper_train_steps)
    elapsed = time.perf_counter() - started

    print(f"\n`{command_line()}`\n")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {elapsed:.0f} s\n")
    paper = rows.get("paper")
    ratio_head, ratio_sep = (" paper / small |", "---:|") if paper else ("", "")

    def ratio(key_fn) -> str:
        if not paper:
            return ""
        small_value, paper_value = key_fn(rows["small"]), key_fn(paper)
        return f" {paper_value / small_value:.3g}x |" if small_value else " — |"

    # Parameters: one row per part, one column per preset.
    print("| parameters | " + " | ".join(f"{p} ({r['size']} px)" for p, r in rows.items()) + " |" + ratio_head)
    print("|---|" + "---:|" * len(rows) + ratio_sep)
    for part in PARTS:
        print(f"| {part} | " + " | ".join(f"{r['parts'][part] / 1e6:.2f}M" for r in rows.values()) + " |"
              + ratio(lambda r: r["parts"][part]))
    other = {p: r["params"] - sum(r["parts"].values()) for p, r in rows.items()}
    if any(other.values()):
        print("| (other) | " + " | ".join(f"{v / 1e6:.2f}M" for v in other.values()) + " |" + ("  |" if paper else ""))
    print("| **total** | " + " | ".join(f"**{r['params'] / 1e6:.2f}M**" for r in rows.values()) + " |"
          + ratio(lambda r: r["params"]))

    # Time: one row per measurement.
    print(f"\n| CPU, {args.threads} threads | " + " | ".join(f"{p} ({r['size']} px)" for p, r in rows.items()) + " |" + ratio_head)
    print("|---|" + "---:|" * len(rows) + ratio_sep)
    print("| forward, batch 1 (ms) | " + " | ".join(f"{r['fwd1'] * 1e3:.0f}" for r in rows.values()) + " |"
          + ratio(lambda r: r["fwd1"]))
    print("| forward, batch 8 (ms) | " + " | ".join(f"{r['fwd8'] * 1e3:.0f}" for r in rows.values()) + " |"
          + ratio(lambda r: r["fwd8"]))
    print("| forward, batch 8 (img/s) | " + " | ".join(f"{8 / r['fwd8']:.3g}" for r in rows.values()) + " |"
          + ratio(lambda r: 8 / r["fwd8"]))
    print("| training (img/s) | " + " | ".join(f"{r['train']:.3g} (batch {r['train_batch']})" for r in rows.values())
          + " |" + ratio(lambda r: r["train"]))
    if paper:
        print(f"\npaper vs small: {paper['params'] / rows['small']['params']:.1f}x the parameters, "
              f"{paper['fwd1'] / rows['small']['fwd1']:.0f}x the batch-1 latency, "
              f"{rows['small']['train'] / paper['train']:.0f}x slower training "
              f"(batch {paper['train_batch']} vs {rows['small']['train_batch']}).")


if __name__ == "__main__":
    main()
