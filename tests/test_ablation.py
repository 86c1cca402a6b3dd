"""A miniature of the ablation study (benchmarks/ablation.py): 2 variants x 1 seed on tiny params,
as real DVC experiments in a clone of this repository (its committed files), then the table."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "ablation.py"

# 48 images at 64 px, 2 one-epoch tune trials, 1 training epoch on 1 worker, one noise level each.
# vcdr_softness=0.2: with the default 0.04 only 2 of the 48 images are glaucomatous and the test
# split holds none, so AUC would be undefined; 0.2 gives 16 (4 of the 12 test images).
TINY = [
    "data.image_size=64", "data.synthetic.num_images=48", "data.synthetic.render_size=128",
    "data.synthetic.vcdr_softness=0.2", "data.split.val=0.25", "data.split.test=0.25",
    "train.epochs=1", "train.batch_size=4", "tune.num_samples=2", "tune.epochs=1", "ray.num_workers=1",
    "export.parity_images=4", "evaluate.num_panels=1", "evaluate.gaussian_sigmas=[0.1]",
    "evaluate.salt_pepper_amounts=[0.05]",
]
VARIANTS = ["uml", "softmax"]


def _dvc() -> str | None:
    return shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")


def _number(text: str) -> float:
    value = float(text.split()[0])  # "mean [low, high] ± std" or "mean"
    assert math.isfinite(value), text
    return value


@pytest.mark.slow
def test_ablation_miniature(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the repository")
    if _dvc() is None:
        pytest.skip("needs dvc")
    repo, out = tmp_path / "repo", tmp_path / "results"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    cmd = [sys.executable, str(RUNNER), "--repo", str(repo), "--variants", *VARIANTS, "--out", str(out)]

    run = subprocess.run([*cmd, "--seeds", "1", "--set", *TINY], text=True, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    for name in ("uml-s0", "softmax-s0"):  # progress per experiment, with its time
        assert f"{name}: running" in run.stdout and f"{name}: finished" in run.stdout, run.stdout[-3000:]

    # Both are DVC experiments of the clone's HEAD, and the clone's tracked files are as committed.
    shown = subprocess.run([_dvc(), "exp", "show", "--json"], cwd=repo, text=True, capture_output=True,
                           check=True).stdout
    names = {rev.get("name") for entry in json.loads(shown[shown.index("["):])
             for exp in entry.get("experiments") or [] for rev in exp.get("revs") or []}
    assert {"uml-s0", "softmax-s0"} <= names, names
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, text=True,
                          capture_output=True, check=True).stdout == ""

    with open(out / "ablation.csv", newline="") as fh:
        rows = {row["variant"]: row for row in csv.DictReader(fh)}
    assert list(rows) == VARIANTS
    for row in rows.values():
        assert row["runs"] == "1"
        for key in ("cls/auc", "seg/dice_disc"):
            assert 0.0 <= _number(row[f"{key}_mean"]) <= 1.0 and row[f"{key}_n"] == "1"
        for key in ("robust/gaussian_0.1/cls/auc", "robust/salt_pepper_0.05/seg/dice_disc"):
            _number(row[f"{key}_mean"])

    md = (out / "ablation.md").read_text()
    table = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    header = [h.strip() for h in table[0]]
    body = {cells[0].strip().strip("`"): [c.strip() for c in cells] for cells in table[1:]}
    for variant in VARIANTS:
        for column in ("AUC ↑", "Dice disc ↑"):
            cell = body[variant][header.index(column)]
            assert 0.0 <= _number(cell) <= 1.0, (variant, column, md)
            # The run's bootstrap interval from metrics.json surrounds its value.
            low, high = (float(x) for x in cell[cell.index("[") + 1:cell.index("]")].split(","))
            assert low - 0.005 <= _number(cell) <= high + 0.005, cell
    # The values each run's sweep chose, read back from the DVC cache.
    runs = [line for line in md.splitlines() if line.startswith("| `uml-s0`") or line.startswith("| `softmax-s0`")]
    assert len(runs) == 2 and all(("baseline: " in r or "sampled: " in r) and "cls_weight" in r for r in runs), runs
    for text in ("Command: `python ", "--set", "Date: ", "logical CPUs", "torch ", "GPU: "):
        assert text in md, text

    # --collect-only rebuilds the same table from the experiments alone.
    before = (out / "ablation.csv").read_text()
    again = subprocess.run([*cmd, "--collect-only"], text=True, capture_output=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (out / "ablation.csv").read_text() == before
