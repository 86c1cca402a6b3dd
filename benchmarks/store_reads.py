"""Reading a split's scattered images from the prepared store: zarr's orthogonal selection against
one integer index per image (what ``uml.data.store.take_images`` does).

A random split's store indices are scattered over the whole store. The calibrate stage reads its
splits whole (``load_split``) and evaluate reads the test split a batch at a time in every pass
(``SplitReader.read``), so the read path is paid once per image per pass. The two ways are
timed alternately over ``--rounds`` rounds on the same store; the table gives medians and the
ratio against orthogonal selection.

    python benchmarks/store_reads.py                          # a 2100-image synthetic store at 128 px
    python benchmarks/store_reads.py --store data/prepared/dataset.zarr --split test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _machine import command_line, cpu_name  # noqa: E402
from uml.data.store import PreparedData, open_prepared, take_images  # noqa: E402


def orthogonal(data: PreparedData, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(data.images.get_orthogonal_selection((idx,))),
            np.asarray(data.masks.get_orthogonal_selection((idx,))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="a prepared store (default: a synthetic one, prepared in a temporary folder)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-images", type=int, default=2100, help="synthetic store size")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="images per read in the batched case (evaluate.batch_size)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            from uml.config import parse_params
            from uml.data.prepare import prepare

            params = parse_params({"data": {"root": tmp, "image_size": args.image_size,
                                            "synthetic": {"num_images": args.num_images}}})
            store = prepare(params)
        data = open_prepared(store, verify=False)
        idx = data.split(args.split)
        assert all(np.array_equal(a, b) for a, b in zip(orthogonal(data, idx[:32]), take_images(data, idx[:32])))

        def whole(read) -> None:
            read(data, idx)

        def batched(read) -> None:
            for first in range(0, len(idx), args.batch):
                read(data, idx[first:first + args.batch])

        rows = []
        for case, run in (("whole split (calibrate)", whole), (f"batches of {args.batch} (evaluate)", batched)):
            times: dict[str, list[float]] = {"orthogonal selection": [], "one index per image": []}
            for _ in range(args.rounds):
                for name, read in (("orthogonal selection", orthogonal), ("one index per image", take_images)):
                    start = time.perf_counter()
                    run(read)
                    times[name].append(time.perf_counter() - start)
            base = statistics.median(times["orthogonal selection"])
            for name, values in times.items():
                median = statistics.median(values)
                rows.append((case, name, median / len(idx) * 1000, base / median))

    print(f"{cpu_name()}; {command_line()}; {len(idx)} images of split '{args.split}' at {data.image_size} px, "
          f"median of {args.rounds} rounds\n")
    print("| read | way | ms per image | speed-up |\n|---|---|---:|---:|")
    for case, name, ms, speedup in rows:
        print(f"| {case} | {name} | {ms:.2f} | {speedup:.1f}× |")


if __name__ == "__main__":
    main()
