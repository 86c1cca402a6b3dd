"""The miniature DAG: this repository's tracked files copied into a temporary git + DVC repository,
``params.yaml`` as committed there, then changed to tiny values in the working tree (as a user
changes it), and ``dvc repro`` run there, once per test session.

The tests under ``tests/dag/`` (and ``tests/test_ablation.py``, which reuses its DVC cache) check
what the real pipeline wrote. Nothing is a stand-in: the stages are the repository's own
``python -m pipeline.<stage>`` commands as ``dvc.yaml`` declares them, run by the venv's DVC, with
their own local Ray instances.

It cannot be skipped by accident: without git, DVC or a git checkout the fixture fails with a
message that says what is missing. ``UML_TESTS_SKIP_DAG=1`` is the one explicit opt-out (for a
quick local run; CI never sets it).

``UML_TESTS_DAG_DIR=<folder>`` (for development, never in CI) keeps the copy in that folder across
sessions: each session refreshes its tracked files from the working tree and re-runs
``dvc repro``, which re-runs only the stages whose code, data or params changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.committed import NotACheckout, committed_text

REPO = Path(__file__).resolve().parents[2]
SKIP_ENV = "UML_TESTS_SKIP_DAG"
DIR_ENV = "UML_TESTS_DAG_DIR"

# "key=value" overrides of params.yaml, values parsed as YAML (the syntax of `dvc exp run -S`, so
# tests/test_ablation.py passes the same list to benchmarks/ablation.py --set).
#
# 60 images at 64 px (24 train, 12 val, 12 test, 12 calib). vcdr_softness=0.2: with the default the test
# split holds almost no glaucoma images and every AUC would be undefined.
# Training: 6 epochs of 15 steps (2.5 passes over the 24 training images at batch 4, drawn by the
# fixed-steps sampler) at lr 3e-3 without decay, 2-3 s each here. With 6 steps per epoch the
# segmentation was still near its initial state on some machines (disc Dice 0.45 and a test pixel
# NLL of 0.74 against 1.15 untrained on one, ~0.8 and ~0.13 on another: floating-point kernels
# differ between CPUs and a short run amplifies it), so nothing could tell a trained model from a
# broken train stage with margin; 90 steps reach the trained regime on every seed and precision tried
# (tests/dag/test_model.py).
# Sweep: 2 one-epoch trials (the baseline and one sampled), 1 worker each, and a sampled trial is
# never chosen (tune.min_improvement=1): which of two one-epoch trials on 12 validation images
# scores higher differs between machines, and the model the tests check must not. Evaluate: one noise
# level per kind and the smallest valid number of bootstrap resamples. Calibrate: a promised risk,
# delta and unusual-image share that 12 calibration images can certify or reach, and the class
# temperature alone (the tests recompute it by hand; the class power is tested in tests/test_calibration.py
# and tests/test_export.py).
TINY_DAG: tuple[str, ...] = (
    "data.image_size=64", "data.synthetic.num_images=60", "data.synthetic.render_size=128",
    "data.synthetic.vcdr_softness=0.2", "data.split.val=0.2", "data.split.test=0.2", "data.split.calib=0.2",
    "train.epochs=6", "train.steps_per_epoch=15", "train.lr=0.003", "train.constant_epochs=6", "train.batch_size=4",
    "tune.num_samples=2", "tune.epochs=1", "tune.steps_per_epoch=15", "tune.min_improvement=1.0", "ray.num_workers=1",
    "export.parity_images=4", "evaluate.num_panels=1", "evaluate.gaussian_sigmas=[0.1]",
    "evaluate.salt_pepper_amounts=[0.05]", "evaluate.bootstrap_samples=100",
    "calibrate.risk=0.3", "calibrate.delta=0.3", "calibrate.unusual_alpha=0.1", "calibrate.class_power=false",
)
STAGES = ("prepare", "tune", "train", "calibrate", "export", "evaluate")
REPRO_TIMEOUT_S = 900


@dataclass(frozen=True)
class MiniDag:
    """A finished miniature DAG run."""

    root: Path  # the temporary repository
    env: dict[str, str]  # the environment DVC and the stages ran with
    dvc: str  # the DVC executable
    repro_log: str  # stdout + stderr of `dvc repro`
    status_after: str  # stdout of `dvc status` right after the run
    params_text: str  # the working tree's params.yaml the run used (the committed one has the defaults)
    code_origin: str  # where `import uml` resolves inside the copy's environment
    seconds: float  # wall time of `dvc repro`

    @property
    def data(self) -> Path:
        return self.root / "data"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A command in the copy with the stages' environment (not checked)."""
        return subprocess.run(args, cwd=self.root, env=self.env, text=True, capture_output=True, timeout=timeout)


class DagUnavailable(RuntimeError):
    """The miniature DAG cannot run here; the message says why."""


def apply_overrides(raw: dict, overrides: tuple[str, ...] | list[str]) -> dict:
    """Set each dotted ``key=value`` in the nested params; a key that does not exist is an error
    (a misspelt override would otherwise leave the default silently in place)."""
    for item in overrides:
        key, _, text = item.partition("=")
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        if last not in node:
            raise KeyError(f"{key}: not a key of params.yaml")
        node[last] = yaml.safe_load(text)
    return raw


def stage_env(root: Path) -> dict[str, str]:
    """The venv's bin/ first on PATH (``dvc`` and the stages' ``python`` are the venv's), the copy
    first on PYTHONPATH (the stages and their Ray workers import the copy's ``uml``, not the
    editable install's), a local Ray instance per stage, and nothing sent anywhere."""
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir)])
    env["PYTHONPATH"] = str(root)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env["RAY_ADDRESS"] = ""  # each stage starts its own local instance, as in a user's `dvc repro`
    env["DVC_NO_ANALYTICS"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for key, value in (("NAME", "uml tests"), ("EMAIL", "tests@localhost")):
        env.setdefault(f"GIT_AUTHOR_{key}", value)
        env.setdefault(f"GIT_COMMITTER_{key}", value)
    return env


def _check(args: list[str], cwd: Path, env: dict[str, str], what: str, timeout: float = 120) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise DagUnavailable(f"miniature DAG: {what} failed (exit {proc.returncode}): {' '.join(args)}\n"
                             f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def copy_repository(dest: Path) -> None:
    """The tracked files of this checkout, as they are in the working tree (so the DAG runs the
    code the rest of the suite tests, committed or not), in a fresh git repository with one commit.
    Untracked and ignored files (data/, dvc.lock, .venv) stay behind: a new source file takes part
    once it is `git add`ed."""
    if shutil.which("git") is None:
        raise DagUnavailable("miniature DAG: `git` is not on PATH; the DAG test needs git (DVC tracks a git repository)")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    if listing.returncode != 0:
        raise DagUnavailable(f"miniature DAG: {REPO} is not a git checkout (`git ls-files` failed: "
                             f"{listing.stderr.decode(errors='replace').strip()}); the DAG test copies the tracked files")
    dest.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, listing.stdout.decode().split("\0")):
        source = REPO / rel
        if not source.is_file():  # deleted in the working tree but not yet in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def run_miniature_dag(dest: Path, overrides: tuple[str, ...] = (), env_vars: dict[str, str] | None = None) -> MiniDag:
    """Copy the repository to ``dest`` with its committed ``params.yaml`` (the defaults, whatever
    the working copy holds), commit that, change ``params.yaml`` to the tiny values (then
    ``overrides``) in the working tree only, and run ``dvc repro`` (with ``env_vars`` over
    :func:`stage_env`'s, e.g. a ``RAY_ADDRESS``)."""
    if not (REPO / ".git").exists():
        raise DagUnavailable(f"miniature DAG: {REPO} has no .git; the DAG test needs a git checkout of the repository")
    reuse = (dest / ".git").is_dir()
    copy_repository(dest)
    env = {**stage_env(dest), **(env_vars or {})}
    dvc = shutil.which("dvc", path=env["PATH"])
    if dvc is None:
        raise DagUnavailable(f"miniature DAG: no `dvc` next to {sys.executable} or on PATH; install the project "
                             "(`pip install -e '.[test]'` brings DVC)")
    params = dest / "params.yaml"
    try:
        defaults = committed_text("params.yaml")
    except NotACheckout as exc:
        raise DagUnavailable(f"miniature DAG: {exc}") from None
    params.write_text(defaults)
    if not reuse:
        _check(["git", "init", "-q"], dest, env, "git init")
    # dvc.lock (left by an earlier run in a kept copy) is the run's record, not part of the baseline.
    _check(["git", "add", "-A", "--", ".", ":(exclude)dvc.lock"], dest, env, "git add")
    staged = subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=dest, env=env, timeout=60).returncode != 0
    if not reuse or staged:
        _check(["git", "commit", "-q", "-m", "miniature DAG baseline (the committed defaults)"], dest, env, "git commit")
    # The tiny values as a user's edit of the working copy: committed defaults, changed params.yaml.
    tiny = yaml.safe_dump(apply_overrides(yaml.safe_load(defaults), (*TINY_DAG, *overrides)), sort_keys=False)
    params.write_text(tiny)
    origin = _check([sys.executable, "-c", "import uml; print(uml.__file__)"], dest, env, "importing uml").strip()

    start = time.perf_counter()
    try:
        proc = subprocess.run([dvc, "repro"], cwd=dest, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=REPRO_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        raise DagUnavailable(f"miniature DAG: `dvc repro` in {dest} did not finish in {REPRO_TIMEOUT_S} s:\n"
                             f"{output[-6000:]}") from None
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise DagUnavailable(f"miniature DAG: `dvc repro` failed in {dest} (exit {proc.returncode}) after {seconds:.0f} s:\n"
                             f"{proc.stdout[-6000:]}")
    status = _check([dvc, "status"], dest, env, "dvc status")
    return MiniDag(root=dest, env=env, dvc=dvc, repro_log=proc.stdout, status_after=status, params_text=tiny,
                   code_origin=origin, seconds=seconds)
