"""Shared test set-up: offline albumentations, deterministic torch, few threads, and the miniature
DAG that the tests under tests/dag/ (and tests/test_ablation.py) check."""

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.dag.miniature import DIR_ENV, SKIP_ENV, DagUnavailable, MiniDag, run_miniature_dag  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def miniature_dag(tmp_path_factory: pytest.TempPathFactory) -> MiniDag:
    """``dvc repro`` of the whole pipeline on tiny params in a temporary copy of the repository,
    once per test session (about 2-3 minutes on 2 cores). A missing git or DVC is a failure, not a
    skip; only ``UML_TESTS_SKIP_DAG=1`` (never set in CI) turns it off."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1 switches the miniature DAG off (CI never sets it)")
    try:
        kept = os.environ.get(DIR_ENV)  # development only: reuse a copy across sessions
        return run_miniature_dag(Path(kept).absolute() if kept else tmp_path_factory.mktemp("dag") / "repo")
    except DagUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
