"""Parameter counts, CPU forward latency and training-step throughput of the two presets.

    python benchmarks/model.py                      # small at 128 and paper at 256, 2 threads
    python benchmarks/model.py --threads 2 --iters 5 --paper-iters 2

Forward latency: eval mode, no_grad, median of ``--iters`` timed runs after one warm-up, batch 1 and
8. Training: forward + backward + Adam step with the UML loss, images/s over the timed steps. The
paper preset is slow on a CPU (tens of seconds per training step), so it gets ``--paper-iters``.
Prints markdown tables with the paper/small ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from uml.config import LossParams
from uml.losses import uml_loss
from uml.models import build_model, count_parameters

PARTS = ("cls_encoder", "seg_encoder", "mixers", "mutual_decoder", "navigator", "instructor")


def forward_latency(model: torch.nn.Module, batch: int, size: int, iters: int) -> float:
    """Median seconds per forward pass."""
    model.eval()
    x = torch.rand(batch, 3, size, size)
    times = []
    with torch.no_grad():
        model.infer(x)  # warm-up
        for _ in range(iters):
            start = time.perf_counter()
            model.infer(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_throughput(model: torch.nn.Module, batch: int, size: int, iters: int) -> float:
    """Images per second of full training steps (after one warm-up step)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size)
    mask = torch.randint(0, 3, (batch, size, size))
    label = torch.randint(0, 2, (batch,))
    weights = LossParams()

    def step() -> None:
        loss, _ = uml_loss(model(x), mask, label, weights, epoch=1, evidential=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return batch * iters / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations for the small preset")
    parser.add_argument("--paper-iters", type=int, default=2, help="timed iterations for the paper preset")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    presets = [("small", 128, args.iters)] + ([] if args.skip_paper else [("paper", 256, args.paper_iters)])
    rows = {}
    for preset, size, iters in presets:
        model = build_model(preset, image_size=size)
        parts = {p: count_parameters(getattr(model, p)) for p in PARTS}
        print(f"measuring {preset} at {size} px ...", file=sys.stderr, flush=True)
        rows[preset] = {
            "size": size,
            "params": count_parameters(model),
            "parts": parts,
            "fwd1": forward_latency(model, 1, size, iters),
            "fwd8": forward_latency(model, 8, size, max(1, iters // 2 if preset == "paper" else iters)),
            "train": train_throughput(model, args.train_batch if preset == "small" else 2, size, iters),
        }

    print(f"\n`python benchmarks/model.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
          f"(torch {torch.__version__}, {args.threads} threads)\n")
    print("| preset | input | parameters | " + " | ".join(PARTS) + " |")
    print("|---|---|---|" + "---|" * len(PARTS))
    for preset, r in rows.items():
        print(f"| {preset} | {r['size']}² | {r['params'] / 1e6:.1f}M | " + " | ".join(f"{r['parts'][p] / 1e6:.2f}M" for p in PARTS) + " |")
    print("\n| preset | forward, batch 1 | forward, batch 8 (per image) | training, images/s |")
    print("|---|---|---|---|")
    for preset, r in rows.items():
        print(f"| {preset} | {r['fwd1'] * 1e3:.0f} ms | {r['fwd8'] / 8 * 1e3:.0f} ms | {r['train']:.2f} |")
    if "paper" in rows:
        s, p = rows["small"], rows["paper"]
        print(f"\npaper / small: {p['params'] / s['params']:.1f}x parameters, {p['fwd1'] / s['fwd1']:.1f}x forward latency "
              f"(batch 1), {s['train'] / p['train']:.0f}x slower training")


if __name__ == "__main__":
    main()
