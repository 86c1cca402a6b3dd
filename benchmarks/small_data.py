"""A small data set trained with the default params: does the budget hold when the data shrinks?

    python benchmarks/small_data.py --out /tmp/small100                      # 100 images, ~8 min on 2 cores
    python benchmarks/small_data.py --out /tmp/small100-pass --set train.steps_per_epoch=null

Writes ``--images`` images of the synthetic generator (the default's settings, seed 0, rendered at
256 px) as a ``folder`` data set (``images/``, ``masks/``, ``labels.csv``) under ``<out>/raw``,
then runs the stages ``prepare``, ``train``, ``export`` and ``evaluate`` on it, each as
``python -m pipeline.<stage> --params <out>/params.yaml`` from this checkout: the default params
but for the data source, ``data.root`` (``<out>/data``) and ``--set`` overrides. The sweep is not
run (train uses the params' loss weights). Prints the test split's headline metrics with their
95 % intervals and the wall time of each stage, and writes them to ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from uml.config import Params, SyntheticParams, dump_params  # noqa: E402
from uml.data.synthetic import generate_sample  # noqa: E402
from uml.fundus import FUNDUS_CLASS_NAMES  # noqa: E402

STAGES = ("prepare", "train", "export", "evaluate")
SHOWN = ("seg/dice_disc", "seg/dice_cup", "cls/auc", "cls/acc", "clinical/vcdr_mae")


def write_folder(root: Path, count: int, seed: int = 0) -> None:
    """``count`` synthetic images with their masks and labels, as a folder data set."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    from PIL import Image

    synthetic = SyntheticParams()
    rows = ["id,label"]
    for index in range(count):
        sample = generate_sample(index, synthetic, synthetic.render_size, seed)
        Image.fromarray(sample.image).save(root / "images" / f"img{index:04d}.png")
        Image.fromarray(sample.mask).save(root / "masks" / f"img{index:04d}.png")
        rows.append(f"img{index:04d},{FUNDUS_CLASS_NAMES[sample.label]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (raw data, outputs, summary)")
    parser.add_argument("--images", type=int, default=100, help="images in the data set (default %(default)s)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides (YAML values)")
    parser.add_argument("--from", dest="first", choices=STAGES, default=STAGES[0],
                        help="start at this stage (the ones before it ran already in --out)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    raw = out / "raw"
    if not (raw / "labels.csv").is_file():
        write_folder(raw, args.images)
    overrides = {"data.source": "folder", "data.path": str(raw), "data.root": str(out / "data"),
                 "data.class_names": list(FUNDUS_CLASS_NAMES)}
    overrides |= {item.partition("=")[0]: yaml.safe_load(item.partition("=")[2]) for item in args.set}
    params = Params().with_overrides(overrides)
    params_file = out / "params.yaml"
    params_file.write_text(dump_params(params, header=f"benchmarks/small_data.py: defaults + {overrides}"))

    env = os.environ | {"PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_ADDRESS": ""}
    seconds: dict[str, float] = {}
    for stage in STAGES[STAGES.index(args.first):]:
        start = time.perf_counter()
        with open(out / f"{stage}.log", "w") as log:
            proc = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--params", str(params_file)], cwd=REPO,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        seconds[stage] = time.perf_counter() - start
        print(f"{stage}: {seconds[stage]:.0f} s (exit {proc.returncode}; log {out / f'{stage}.log'})", flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"{stage} failed; see {out / f'{stage}.log'}")

    metrics = json.loads((out / "data" / "reports" / "metrics.json").read_text())
    prepared = yaml.safe_load((out / "data" / "prepared" / "dataset.zarr" / "zarr.json").read_text())["attributes"]
    summary = {"images": args.images, "split_sizes": prepared["split_sizes"], "overrides": args.set, "seconds": seconds,
               "metrics": {key: [metrics.get(key), metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")]
                           for key in SHOWN}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{args.images} images (split {prepared['split_sizes']}), overrides {args.set or 'none'}\n")
    print("| metric | value | 95 % interval |")
    print("|---|---:|---|")
    for key, (value, low, high) in summary["metrics"].items():
        interval = f"[{low:.3f}, {high:.3f}]" if low is not None else ""
        print(f"| `{key}` | {value:.3f} | {interval} |" if value is not None else f"| `{key}` | n/a | |")


if __name__ == "__main__":
    main()
