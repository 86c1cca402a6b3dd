"""Loader throughput: ``SegClsDataset`` over the prepared zarr store vs. decoding image files.

The baseline is the plain-PyTorch way of reading a segmentation data set: a ``Dataset`` that opens
each image and mask file on every access, decodes it (PNG or JPEG at the original resolution) and
resizes it to the training size. The same synthetic fundus images are written both ways, the
files at ``--original-size`` and the store at ``--size``.

    python benchmarks/loader.py                       # small defaults, well under a minute
    python benchmarks/loader.py --workers 2 --num-images 256

Prints a markdown table of samples/s and the ratio to the PNG-file baseline.
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

from uml.config import AugmentParams, SplitParams, SyntheticParams  # noqa: E402
from uml.data.dataset import SegClsDataset, build_augmentation, worker_init_fn  # noqa: E402
from uml.data.records import FUNDUS_CLASS_NAMES, FUNDUS_MASK_CLASSES, FUNDUS_POSITIVE_CLASS, Record  # noqa: E402
from uml.data.store import write_dataset  # noqa: E402
from uml.data.synthetic import generate_sample  # noqa: E402


class FileDataset(Dataset):
    """Decode + resize image and mask files on every access (the usual torchvision-style loader)."""

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
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }


def build(root: Path, n: int, size: int, original: int) -> tuple[Path, list[Path], list[Path], list[Path], list[int]]:
    """Render ``n`` synthetic images at ``original`` px; write the store and PNG/JPEG files."""
    params = SyntheticParams(num_images=n, render_size=original)
    records, pngs, jpgs, masks, labels = [], [], [], [], []
    for i in range(n):
        s = generate_sample(i, params, original, seed=0)
        stem = f"img{i:04d}"
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
    write_dataset(records, store, class_names=list(FUNDUS_CLASS_NAMES), mask_classes=list(FUNDUS_MASK_CLASSES),
                  positive_class=FUNDUS_POSITIVE_CLASS, source="synthetic", image_size=size, split=SplitParams(), seed=0)
    return store, pngs, jpgs, masks, labels


def throughput(ds: Dataset, *, batch_size: int, workers: int, epochs: int) -> float:
    """Samples per second over ``epochs`` passes (after one warm-up batch)."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        worker_init_fn=worker_init_fn if workers else None, persistent_workers=workers > 0)
    next(iter(loader))  # warm-up: worker start, first file opens
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--size", type=int, default=128, help="training size (store resolution)")
    parser.add_argument("--original-size", type=int, default=512, help="resolution of the image files")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # loaders are measured, not intra-op parallelism

    with tempfile.TemporaryDirectory(prefix="uml-loader-bench-") as tmp:
        t0 = time.perf_counter()
        store, pngs, jpgs, masks, labels = build(Path(tmp), args.num_images, args.size, args.original_size)
        print(f"built {args.num_images} images ({args.original_size} px files, {args.size} px store) "
              f"in {time.perf_counter() - t0:.1f} s; batch {args.batch_size}, workers {args.workers}\n")
        aug = AugmentParams()
        idx = np.arange(args.num_images)
        cases = [
            ("files: PNG decode + resize", FileDataset(pngs, masks, labels, args.size)),
            ("files: JPEG decode + resize", FileDataset(jpgs, masks, labels, args.size)),
            ("files: PNG decode + resize + augment", FileDataset(pngs, masks, labels, args.size, aug)),
            ("zarr store (SegClsDataset)", SegClsDataset(store, idx)),
            ("zarr store + augment (SegClsDataset)", SegClsDataset(store, idx, augment=aug)),
        ]
        rates = {name: throughput(ds, batch_size=args.batch_size, workers=args.workers, epochs=args.epochs)
                 for name, ds in cases}
    base = rates[cases[0][0]]
    print("| loader | samples/s | vs PNG files |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.1f}x |")


if __name__ == "__main__":
    main()
