"""A miniature of the ablation study (benchmarks/ablation.py): the ``uml`` variant x 1 seed on tiny
params, as a real DVC experiment in a clone of the miniature DAG's repository
(tests/dag/miniature.py), then the table. (One variant: a second one trained and swept its own
model for about 110 s of the suite's time; the variants differ only in the ``--set`` list that
every experiment goes through.)

The clone shares the miniature DAG's DVC cache, and the study runs on exactly the DAG's params
(the same ``--set`` list, seed 0): DVC's run-cache restores ``prepare`` and ``tune`` of ``uml-s0``
from the DAG's run instead of running them again. That is what a real
study does for its ``prepare`` stage, and it saves one whole pipeline run of the suite's time.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dag.miniature import TINY_DAG, MiniDag

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "ablation.py"
VARIANTS = ["uml"]


def _flatten(nested: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in nested.items():
        flat.update(_flatten(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _number(text: str) -> float:
    value = float(text.split()[0])  # "mean [low, high] ± std" or "mean"
    assert math.isfinite(value), text
    return value


@pytest.mark.slow
def test_ablation_miniature(miniature_dag: MiniDag, tmp_path: Path) -> None:
    repo, out = tmp_path / "repo", tmp_path / "results"
    # The DAG's environment without its PYTHONPATH: each experiment runs the code of its own
    # temporary copy (the working directory of its stages).
    env = {k: v for k, v in miniature_dag.env.items() if k != "PYTHONPATH"}
    subprocess.run(["git", "clone", "-q", str(miniature_dag.root), str(repo)], check=True, env=env)
    # The DAG's cache as the clone's own .dvc/cache (a link, not `dvc cache dir`: the runner reads
    # each experiment's best_params.yaml from <repo>/.dvc/cache).
    (repo / ".dvc" / "cache").symlink_to(miniature_dag.root / ".dvc" / "cache", target_is_directory=True)
    cmd = [sys.executable, str(RUNNER), "--repo", str(repo), "--variants", *VARIANTS, "--out", str(out)]

    run = subprocess.run([*cmd, "--seeds", "1", "--set", *TINY_DAG], text=True, capture_output=True, timeout=900, env=env)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    for name in ("uml-s0",):  # progress per experiment, with its time
        assert f"{name}: running" in run.stdout and f"{name}: finished" in run.stdout, run.stdout[-3000:]
    # uml-s0 has the miniature DAG's params: its data set and its sweep come from the run-cache
    # (train and evaluate have `cache: false` outputs, which DVC's run-cache does not store, so
    # they run again).
    for stage in ("prepare", "tune"):
        assert f"uml-s0: stage {stage} (restored from the run-cache)" in run.stdout, (stage, run.stdout[-3000:])
    assert "uml-s0: stage train at" in run.stdout, run.stdout[-3000:]

    # It is a DVC experiment of the clone's HEAD, and the clone's tracked files are as committed.
    shown = subprocess.run([miniature_dag.dvc, "exp", "show", "--json"], cwd=repo, text=True, capture_output=True,
                           check=True, env=env).stdout
    revs = {rev.get("name"): rev for entry in json.loads(shown[shown.index("["):])
            for exp in entry.get("experiments") or [] for rev in exp.get("revs") or []}
    assert "uml-s0" in set(revs), list(revs)
    # Each experiment's metrics as DVC itself reports them.
    recorded = {name: _flatten(revs[f"{name}-s0"]["data"]["metrics"]["data/reports/metrics.json"]["data"])
                for name in VARIANTS}
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, text=True,
                          capture_output=True, check=True).stdout == ""

    with open(out / "ablation.csv", newline="") as fh:
        rows = {row["variant"]: row for row in csv.DictReader(fh)}
    assert list(rows) == VARIANTS
    # The table's uml row holds the miniature DAG's metrics: the same params, data and code, trained
    # again in the experiment, give the same model on this CPU (seeded data order, augmentation
    # and initialisation), read back from the DVC cache by the runner.
    dag_metrics = json.loads((miniature_dag.data / "reports" / "metrics.json").read_text())
    for row in rows.values():
        assert row["runs"] == "1"
        for key in ("cls/auc", "seg/dice_disc", "robust/gaussian_0.1/cls/auc", "robust/salt_pepper_0.05/seg/dice_disc"):
            assert row[f"{key}_n"] == "1", key
            assert _number(row[f"{key}_mean"]) == pytest.approx(recorded[row["variant"]][key]), key
            if row["variant"] == "uml":
                assert _number(row[f"{key}_mean"]) == pytest.approx(dag_metrics[key]), key

    md = (out / "ablation.md").read_text()
    table = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    header = [h.strip() for h in table[0]]
    body = {cells[0].strip().strip("`"): [c.strip() for c in cells] for cells in table[1:]}
    for variant in VARIANTS:
        for column, key in (("AUC ↑", "cls/auc"), ("Dice disc ↑", "seg/dice_disc")):
            cell = body[variant][header.index(column)]
            assert _number(cell) == pytest.approx(_number(rows[variant][f"{key}_mean"]), abs=0.0051), (variant, column, md)
            # The run's bootstrap interval from metrics.json surrounds its value.
            low, high = (float(x) for x in cell[cell.index("[") + 1:cell.index("]")].split(","))
            assert low - 0.005 <= _number(cell) <= high + 0.005, cell
    # The values each run's sweep chose, read back from the DVC cache.
    runs = [line for line in md.splitlines() if line.startswith("| `uml-s0`")]
    assert len(runs) == 1 and all(("baseline: " in r or "sampled: " in r) and "cls_weight" in r for r in runs), runs
    dag_choice = yaml.safe_load((miniature_dag.data / "tune" / "best_params.yaml").read_text())["selection"]["chosen"]
    assert f"{dag_choice}: " in runs[0], (dag_choice, runs[0])  # uml-s0 restored the DAG's sweep
    for text in ("Command: `python ", "--set", "Date: ", "logical CPUs", "torch ", "GPU: "):
        assert text in md, text

    # --collect-only rebuilds the same table from the experiments alone.
    before = (out / "ablation.csv").read_text()
    again = subprocess.run([*cmd, "--collect-only"], text=True, capture_output=True, timeout=300, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (out / "ablation.csv").read_text() == before
