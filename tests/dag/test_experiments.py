"""Settings changed the DVC way leave the test suite passing: a real `dvc exp run -S` on a copy of
the miniature DAG (only the evaluate stage re-runs), then the README's GPU-recipe command, each
followed by the config tests run in that copy, whose params.yaml is then the user's edit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.dag.miniature import MiniDag, stage_env


def _copy(miniature_dag: MiniDag, dest: Path) -> Path:
    """The miniature repository as it is after its run (git, dvc.lock, outputs), sharing its DVC
    cache; Ray's run storage and DVC's temporary state stay behind."""
    shutil.copytree(miniature_dag.root, dest, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if (Path(folder) / n).as_posix().endswith(
                        (".dvc/cache", ".dvc/tmp", "data/ray"))])
    (dest / ".dvc" / "cache").symlink_to(miniature_dag.root / ".dvc" / "cache", target_is_directory=True)
    return dest


def _config_tests(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py"],
                          cwd=root, env=env, text=True, capture_output=True, timeout=300)


def test_dvc_exp_run_and_the_gpu_recipe_leave_the_suite_passing(miniature_dag: MiniDag, tmp_path: Path) -> None:
    root = _copy(miniature_dag, tmp_path / "repo")
    env = stage_env(root)
    before = (root / "params.yaml").read_text()

    run = subprocess.run([miniature_dag.dvc, "exp", "run", "-S", "evaluate.bootstrap_samples=200", "--name", "boot200"],
                         cwd=root, env=env, text=True, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    # Only the stage whose params changed ran; the others were up to date.
    ran = [line for line in run.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'evaluate':"], run.stdout[-4000:]
    shown = subprocess.run([miniature_dag.dvc, "exp", "show", "--json"], cwd=root, env=env, text=True,
                           capture_output=True, check=True).stdout
    revs = {rev.get("name"): rev for entry in json.loads(shown[shown.index("["):])
            for exp in entry.get("experiments") or [] for rev in exp.get("revs") or []}
    params = revs["boot200"]["data"]["params"]["params.yaml"]["data"]
    assert params["evaluate"]["bootstrap_samples"] == 200 and params["train"]["epochs"] == 6  # the tiny run's
    # The working copy holds the experiment's params; the committed defaults are untouched.
    assert yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["bootstrap_samples"] == 200
    assert (root / "params.yaml").read_text() != before
    assert subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "params.yaml"], cwd=root).returncode == 1
    assert subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=root).returncode == 0

    tests = _config_tests(root, env)
    assert tests.returncode == 0, tests.stdout[-4000:]
    assert " passed" in tests.stdout and "failed" not in tests.stdout

    # The README's command for the published recipe overwrites the working copy in full.
    written = subprocess.run([sys.executable, "-m", "uml.cli", "params", "configs/paper-gpu.yaml", "--out", "params.yaml"],
                             cwd=root, env=env, text=True, capture_output=True, timeout=120)
    assert written.returncode == 0, written.stderr
    assert yaml.safe_load((root / "params.yaml").read_text())["model"]["preset"] == "paper"
    tests = _config_tests(root, env)
    assert tests.returncode == 0, tests.stdout[-4000:]
