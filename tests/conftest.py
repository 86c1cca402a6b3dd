"""Shared test set-up: offline albumentations, deterministic torch, few threads, and the miniature
DAG that the tests under tests/dag/ (and tests/test_ablation.py) check."""

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.dag.miniature import DIR_ENV, SKIP_ENV, DagUnavailable, MiniDag, run_miniature_dag  # noqa: E402

# Under pytest-xdist the workers share the cores: each gets its share, so that two workers'
# thread pools do not oversubscribe a 2-core machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


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


def pytest_itemcollected(item: pytest.Item) -> None:
    """Every test that reads the miniature DAG is ``slow`` too (it waits for a whole ``dvc repro``),
    so ``pytest -m "not slow"`` never starts the DAG without each such test having to say so.

    Under pytest-xdist (``-n 2 --dist loadgroup``, the project's default) those tests form one
    group, run by a single worker, so that the DAG is built once per run; every other module is a
    group of its own, so that its module fixtures (a prepared data set, a Ray instance, a sweep, a
    cluster, the stages' imports) are built once too. Tests on the two workers overlap: each
    starts its own Ray instances and clusters on free loopback ports, in its own temporary
    folders, and never reads another's. (Marked as each item is collected: that
    comes before every plugin's ``pytest_collection_modifyitems``, where ``-m`` deselects and
    xdist reads the groups.)"""
    if "miniature_dag" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group("miniature_dag"))
    else:
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
