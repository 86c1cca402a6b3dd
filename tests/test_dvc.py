"""dvc.yaml against the code: each stage's deps cover the ``uml``/``pipeline`` sources it imports
(and name no others), and its params are the keys that determine its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uml.config import Params, get_dotted
from uml.provenance import stage_sources
from uml.train.sweep import sweep_identity_keys
from uml.train.trainer import train_identity_keys

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "tune", "train", "calibrate", "export", "evaluate")
CODE_ROOTS = ("uml", "pipeline")
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

_LIST_IMPORTED = """
import json, sys
from pathlib import Path
import pipeline.{stage}
repo = Path.cwd().resolve()
files = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and Path(path).resolve().is_relative_to(repo) and Path(path).resolve().relative_to(repo).parts[0] in {roots}:
        files.add(Path(path).resolve().relative_to(repo).as_posix())
print(json.dumps(sorted(files)))
"""


@pytest.fixture(scope="module")
def imported() -> dict[str, set[str]]:
    """Per stage: the repository source files that importing ``pipeline.<stage>`` loads, seen in
    a fresh interpreter (an independent check of the static list the code fingerprint uses)."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    found = {}
    for stage in STAGES:
        out = subprocess.run([sys.executable, "-c", _LIST_IMPORTED.format(stage=stage, roots=set(CODE_ROOTS))],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        found[stage] = set(json.loads(out.stdout.strip().splitlines()[-1]))
    return found


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def _code_deps(stage: str) -> list[str]:
    return [dep for dep in DVC[stage]["deps"] if dep.split("/")[0] in CODE_ROOTS]


@pytest.mark.parametrize("stage", STAGES)
def test_the_fingerprinted_sources_include_everything_the_stage_imports(stage, imported):
    assert imported[stage], "the subprocess saw no repository modules"
    missing = imported[stage] - set(stage_sources(stage))
    assert not missing, f"pipeline.{stage} imports {sorted(missing)}, which its code fingerprint leaves out"


@pytest.mark.parametrize("stage", STAGES)
def test_deps_cover_every_source_the_stage_imports(stage, imported):
    needed = imported[stage] | set(stage_sources(stage))
    uncovered = sorted(f for f in needed if not _covered(f, _code_deps(stage)))
    assert not uncovered, f"dvc.yaml stage '{stage}' does not list {uncovered} among its deps"


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_name_only_sources_the_stage_imports(stage):
    sources = set(stage_sources(stage))
    for dep in _code_deps(stage):
        path = REPO / dep
        assert path.exists(), f"dvc.yaml stage '{stage}': dep {dep} does not exist"
        files = {p.relative_to(REPO).as_posix() for p in path.rglob("*.py")} if path.is_dir() else {dep}
        extra = sorted(files - sources)
        assert not extra, f"dvc.yaml stage '{stage}': dep {dep} includes {extra}, which the stage does not import"


def test_prepare_depends_on_the_raw_data_it_reads_and_every_later_stage_on_the_store():
    # dvc.yaml interpolates data.path from params.yaml: whatever folder the importers read
    # (uml.data.importers resolves data.path) is what DVC hashes for `dvc status`.
    raw_deps = [dep for dep in DVC["prepare"]["deps"] if dep.split("/")[0] not in CODE_ROOTS]
    assert raw_deps == ["${data.path}"]
    assert "data.path" in DVC["prepare"]["params"]
    assert Params().data.path == "data/raw" and (REPO / "data" / "raw" / "README.md").is_file()
    store = "data/prepared/dataset.zarr"
    assert DVC["prepare"]["outs"] == [store]
    for stage in STAGES[1:]:
        assert store in DVC[stage]["deps"], f"dvc.yaml stage '{stage}' reads the prepared store but does not depend on it"


def test_dvc_renders_the_raw_data_dependency_from_params(tmp_path):
    """DVC's own parser, on this dvc.yaml and a params file that names another folder."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    for name in ("dvc.yaml", ".dvcignore"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"path": "data/raw/my-scans"}}))
    # An empty DVC repository by hand: Repo.init would log through whatever stream DVC's logging
    # was first set up with (a closed capture of an earlier test, in a full run).
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n    analytics = false\n")
    with Repo(str(tmp_path)) as repo:
        [prepare] = [s for s in repo.index.stages if s.name == "prepare"]
        files = [d.def_path for d in prepare.deps if not isinstance(d, ParamsDependency)]
        assert [path for path in files if not path.startswith(CODE_ROOTS)] == ["data/raw/my-scans"]


def test_train_and_tune_params_are_the_keys_that_name_their_runs():
    assert set(DVC["train"]["params"]) == set(train_identity_keys()) | {"train.use_tuned"}
    assert set(DVC["tune"]["params"]) == set(sweep_identity_keys())
    # The examples of issue 14: flipping use_tuned or the concurrency does not rerun the sweep.
    assert "train.use_tuned" not in DVC["tune"]["params"] and "train" not in DVC["tune"]["params"]
    assert "tune.max_concurrent_trials" not in DVC["tune"]["params"]
    # The budget's unit is part of what a run and a sweep are: steps per epoch name both.
    assert "train.steps_per_epoch" in train_identity_keys() and "train.steps_per_epoch" in sweep_identity_keys()


def test_every_param_dep_is_a_params_key():
    raw = Params().model_dump()
    for stage, spec in DVC.items():
        for key in spec.get("params", []):
            get_dotted(raw, key)  # KeyError names a key that params.yaml does not have


def test_stage_commands_are_the_pipeline_modules():
    for stage in STAGES:
        assert DVC[stage]["cmd"] == f"python -m pipeline.{stage}"


def test_repository_config_keeps_dvc_offline(monkeypatch):
    """DVC phones home by default (usage analytics and an update check, both over the network);
    the repository's own `.dvc/config` turns both off, as DVC itself reads it."""
    from dvc.analytics import is_enabled
    from dvc.config import Config

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("DVC_NO_ANALYTICS", raising=False)
    monkeypatch.delenv("DVC_TEST", raising=False)
    core = Config.from_cwd(validate=True)["core"]
    assert core["analytics"] is False and core["check_update"] is False
    assert is_enabled() is False
