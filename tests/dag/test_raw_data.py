"""Raw data as a DVC dependency, with the real DVC: a `folder` data set brought in with `dvc add`
under data/raw, one mask edited, `dvc status` and `dvc repro` of the prepare stage.

Only prepare runs (three times, a few seconds each): that the stages after it re-run when the
store changes is checked on the miniature DAG, which has run them all
(tests/dag/test_dvc_state.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.committed import committed_text
from tests.dag.miniature import copy_repository, stage_env
from tests.data.helpers import make_folder
from uml.data.store import open_prepared

RAW = "data/raw/scans"
FOLDER_PARAMS = {"source": "folder", "path": RAW, "image_size": 32}


def _run(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=root, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


def _status(root: Path, env: dict[str, str], dvc: str, *stages: str) -> dict:
    out = _run(root, env, dvc, "status", "--json", *stages).stdout
    return json.loads(out[out.index("{"):])


@pytest.mark.slow
def test_an_edited_mask_makes_dvc_rebuild_the_store(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    copy_repository(root)
    env = stage_env(root)
    dvc = shutil.which("dvc", path=env["PATH"])
    assert dvc, "no dvc next to the test's python"
    raw = yaml.safe_load(committed_text("params.yaml"))
    raw["data"].update(FOLDER_PARAMS)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    make_folder(root / RAW, {f"s{i:02d}": str(i % 2) for i in range(12)}, size=(32, 32))
    _run(root, env, "git", "init", "-q")
    _run(root, env, dvc, "add", "-q", RAW)
    _run(root, env, "git", "add", "-A")
    assert _run(root, env, "git", "status", "--porcelain").stdout.count(".png") == 0  # DVC's, not git's
    _run(root, env, "git", "commit", "-q", "-m", "a folder data set under data/raw")

    log = _run(root, env, dvc, "repro", "prepare").stdout
    assert "Running stage 'prepare'" in log, log
    store = root / "data" / "prepared" / "dataset.zarr"
    before = open_prepared(store).content_hash
    assert _status(root, env, dvc, "prepare") == {}

    mask_file = root / RAW / "masks" / "s03.png"
    original = mask_file.read_bytes()
    mask = np.asarray(Image.open(mask_file)).copy()
    mask[:4] = 2  # a few rows of cup
    Image.fromarray(mask).save(mask_file)
    status = _status(root, env, dvc, "prepare")
    assert status == {"prepare": [{"changed deps": {RAW: "modified"}}]}, status

    log = _run(root, env, dvc, "repro", "prepare").stdout
    assert "Running stage 'prepare'" in log, log
    rebuilt = open_prepared(store)
    assert rebuilt.content_hash != before
    assert np.array_equal(rebuilt.masks[rebuilt.ids.index("s03")], mask)  # the store holds the edit
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]
    assert [d["path"] for d in lock["deps"] if d["path"].startswith("data/")] == [RAW]

    # Back to the committed mask: DVC's run-cache restores the first store instead of running prepare.
    mask_file.write_bytes(original)
    log = _run(root, env, dvc, "repro", "prepare").stdout
    assert "Running stage 'prepare'" not in log, log
    assert open_prepared(store).content_hash == before
