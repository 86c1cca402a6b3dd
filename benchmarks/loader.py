"""Loader throughput of ``SegClsDataset`` (the training loader) at the training size.

Two tables, both printed as markdown:

1. **Transport and workers** (the GPU question: how many loader CPUs keep one GPU busy). The
   dataset with ``data.augment``'s defaults, read by a DataLoader with persistent workers at each
   ``--workers`` count, as the training loader is. Two transports of the same samples: uint8 as
   stored (what ``SegClsDataset`` returns; ``uml.data.dataset.to_model_input`` scales on the
   device) against float32 (3, H, W) images and int64 masks (what it returned before), with the
   bytes of one batch of each. Per worker, samples/s divided by the worker count; with
   ``--model-rate NAME=IMG_PER_S`` (repeatable) the loader workers that model's training rate
   needs, at the per-worker rate of the largest count whose workers each had a core of their own
   (at most the CPU count minus one, for the training process).
2. **Store against image files** (``--files``): the zarr store against the plain-PyTorch way of
   reading a segmentation set, a ``Dataset`` that decodes one PNG/JPEG image and mask per sample
   (``--original-size`` px) and resizes them, in the main process (no workers).

    python benchmarks/loader.py                                    # 256 px, 0/1/2 workers, ~1 min on 2 cores
    python benchmarks/loader.py --workers 0 4 8 --model-rate paper-bf16=550   # a GPU node
    python benchmarks/loader.py --files --workers 0                # with the file baselines

A worker's rate depends on the CPU: measure on the nodes that will feed the GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from _machine import command_line, cpu_name  # noqa: E402
from uml.config import AugmentParams, SplitParams, SyntheticParams  # noqa: E402
from uml.data.dataset import SegClsDataset, build_augmentation, worker_init_fn  # noqa: E402
from uml.data.records import Record  # noqa: E402
from uml.data.store import write_dataset  # noqa: E402
from uml.data.synthetic import generate_sample  # noqa: E402
from uml.fundus import FUNDUS_CLASS_NAMES, FUNDUS_MASK_CLASSES, FUNDUS_POSITIVE_CLASS  # noqa: E402
from uml.image_io import PIXEL_MAX  # noqa: E402


class FileDataset(Dataset):
    """Decode + resize image and mask files on every access (the usual torchvision-style loader);
    items as ``SegClsDataset``'s (uint8), so that only the reading differs."""

    def __init__(self, images: list[Path], masks: list[Path], labels: list[int], size: int,
                 augment: AugmentParams | None = None):
        self.images, self.masks, self.labels, self.size = images, masks, labels, size
        self.transform = build_augmentation(augment)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        with Image.open(self.images[i]) as img:
            image = np.asarray(img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR))
        with Image.open(self.masks[i]) as m:
            mask = np.asarray(m.resize((self.size, self.size), Image.Resampling.NEAREST))
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {  # copies: Pillow's arrays are read-only
            "image": torch.from_numpy(np.array(image)),
            "mask": torch.from_numpy(np.array(mask)),
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }


class Float32Items(Dataset):
    """``SegClsDataset``'s items as it returned them before the uint8 transport: the image float32
    (3, H, W) divided by 255 in the loader worker, the mask int64."""

    def __init__(self, base: SegClsDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.base[i]
        image = torch.from_numpy(np.ascontiguousarray(item["image"].numpy().transpose(2, 0, 1))).float().div_(PIXEL_MAX)
        return {**item, "image": image, "mask": item["mask"].long()}


def build(root: Path, n: int, size: int, original: int,
          files: bool) -> tuple[Path, list[Path], list[Path], list[Path], list[int]]:
    """Render ``n`` synthetic images at ``original`` px; write the store (and the PNG/JPEG files)."""
    params = SyntheticParams(num_images=n, render_size=original)
    records, pngs, jpgs, masks, labels = [], [], [], [], []
    for i in range(n):
        s = generate_sample(i, params, original, seed=0)
        stem = f"img{i:04d}"
        if files:
            cv2.imwrite(str(root / f"{stem}.png"), cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(root / f"{stem}.jpg"), cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(root / f"{stem}_mask.png"), s.mask)
            pngs.append(root / f"{stem}.png")
            jpgs.append(root / f"{stem}.jpg")
            masks.append(root / f"{stem}_mask.png")
        labels.append(s.label)
        records.append(Record(stem, cv2.resize(s.image, (size, size), interpolation=cv2.INTER_AREA),
                              cv2.resize(s.mask, (size, size), interpolation=cv2.INTER_NEAREST_EXACT), s.label, stem))
    store = root / "dataset.zarr"
    # The benchmark reads every image, so the split only has to exist: small shares keep each
    # split non-empty down to a handful of images.
    write_dataset(records, store, class_names=list(FUNDUS_CLASS_NAMES), mask_classes=list(FUNDUS_MASK_CLASSES),
                  positive_class=FUNDUS_POSITIVE_CLASS, source="synthetic", image_size=size,
                  split=SplitParams(val=0.1, test=0.1, calib=0.1), seed=0)
    return store, pngs, jpgs, masks, labels


def throughput(ds: Dataset, *, batch_size: int, workers: int, epochs: int) -> float:
    """Samples per second over ``epochs`` passes, after one warm-up pass (worker start, first
    store opens), with persistent workers as in training."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        worker_init_fn=worker_init_fn if workers else None, persistent_workers=workers > 0)
    for _ in loader:
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += batch["image"].shape[0]
    rate = count / (time.perf_counter() - start)
    del loader  # stops the persistent workers
    return rate


def batch_bytes(ds: Dataset, batch_size: int) -> int:
    """Bytes of the image and mask tensors of one batch."""
    batch = next(iter(DataLoader(ds, batch_size=batch_size)))
    return batch["image"].nbytes + batch["mask"].nbytes


def parse_rate(text: str) -> tuple[str, float]:
    name, _, rate = text.partition("=")
    try:
        return name, float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=IMAGES_PER_SECOND, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="training size (store resolution)")
    parser.add_argument("--original-size", type=int, default=512, help="resolution of the image files (--files)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    parser.add_argument("--epochs", type=int, default=10, help="timed passes per case")
    parser.add_argument("--model-rate", type=parse_rate, action="append", default=[], metavar="NAME=IMG_PER_S",
                        help="a model's training images/s, to size the loader for it (repeatable)")
    parser.add_argument("--files", action="store_true", help="also measure the PNG/JPEG file baselines")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # loaders are measured, not intra-op parallelism

    with tempfile.TemporaryDirectory(prefix="uml-loader-bench-") as tmp:
        t0 = time.perf_counter()
        store, pngs, jpgs, masks, labels = build(Path(tmp), args.num_images, args.size, args.original_size, args.files)
        print(f"{command_line()}\n{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; built "
              f"{args.num_images} synthetic images ({args.size} px store) in {time.perf_counter() - t0:.1f} s; "
              f"batch {args.batch_size}, {args.epochs} timed passes per case\n")
        aug = AugmentParams()
        idx = np.arange(args.num_images)
        uint8 = SegClsDataset(store, idx, augment=aug)
        float32 = Float32Items(SegClsDataset(store, idx, augment=aug))
        rates = {w: (throughput(uint8, batch_size=args.batch_size, workers=w, epochs=args.epochs),
                     throughput(float32, batch_size=args.batch_size, workers=w, epochs=args.epochs))
                 for w in args.workers}
        sizes = batch_bytes(uint8, args.batch_size), batch_bytes(float32, args.batch_size)

        print(f"**Transport and workers** ({args.size} px, augmentation on, batch {args.batch_size}; batch images + "
              f"masks: uint8 {sizes[0] / 2**20:.2f} MiB, float32/int64 {sizes[1] / 2**20:.2f} MiB, "
              f"{sizes[1] / sizes[0]:.1f}x)\n")
        print("| workers | uint8 samples/s | per worker | float32 samples/s | uint8 / float32 |")
        print("|---:|---:|---:|---:|---:|")
        for w, (u, f) in rates.items():
            print(f"| {w} | {u:.0f} | {u / w:.0f} |" if w else f"| {w} (main process) | {u:.0f} | - |", end="")
            print(f" {f:.0f} | {u / f:.2f}x |")
        # Size by the largest count whose workers each had a core of their own (the main process
        # keeps one): more workers than cores share them, which says nothing about a bigger node.
        sized = [w for w in rates if 0 < w <= max(1, (os.cpu_count() or 1) - 1)]
        if args.model_rate and sized:
            w = max(sized)
            per_worker = rates[w][0] / w
            print(f"\nLoader workers per model at {per_worker:.0f} samples/s per worker (measured with {w}, "
                  "each with a core of its own):\n")
            print("| model | training images/s | loader workers |")
            print("|---|---:|---:|")
            for name, rate in args.model_rate:
                print(f"| {name} | {rate:g} | {int(np.ceil(rate / per_worker))} |")

        if args.files:
            cases = [
                ("files: PNG decode + resize", FileDataset(pngs, masks, labels, args.size)),
                ("files: JPEG decode + resize", FileDataset(jpgs, masks, labels, args.size)),
                ("files: PNG decode + resize + augment", FileDataset(pngs, masks, labels, args.size, aug)),
                ("zarr store (`SegClsDataset`)", SegClsDataset(store, idx)),
                ("zarr store + augment (`SegClsDataset`)", SegClsDataset(store, idx, augment=aug)),
            ]
            file_rates = {name: throughput(ds, batch_size=args.batch_size, workers=0, epochs=args.epochs)
                          for name, ds in cases}
            base = file_rates[cases[0][0]]
            print(f"\n**Store against image files** ({args.original_size} px files, {args.size} px training size, "
                  "main process)\n")
            print("| loader | samples/s | vs PNG files |")
            print("|---|---:|---:|")
            for name, rate in file_rates.items():
                print(f"| {name} | {rate:.0f} | {rate / base:.1f}x |")


if __name__ == "__main__":
    main()
