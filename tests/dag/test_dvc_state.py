"""What DVC recorded for the miniature DAG: a lock file for the five stages whose hashes are those
of the files on disk and whose params are the tiny ones, a clean ``dvc status``, and nothing
written outside data/ besides dvc.lock."""

from __future__ import annotations

import hashlib
import json

import yaml

from tests.dag.miniature import STAGES, TINY_DAG, MiniDag


def test_dvc_status_is_clean_after_the_run(miniature_dag: MiniDag):
    # Recorded right after `dvc repro`, before any test touched the copy.
    assert miniature_dag.status_after.strip() == "Data and pipelines are up to date.", miniature_dag.status_after


def test_the_lock_file_records_every_stage_with_the_outputs_on_disk(miniature_dag: MiniDag):
    lock = yaml.safe_load((miniature_dag.root / "dvc.lock").read_text())
    assert list(lock["stages"]) == list(STAGES)
    for stage, entry in lock["stages"].items():
        assert entry["cmd"] == f"python -m pipeline.{stage}"
        for out in entry.get("outs", []):
            path = miniature_dag.root / out["path"]
            assert path.exists(), out["path"]
            if path.is_file():  # DVC 3 hashes a file's bytes with MD5
                assert out["md5"] == hashlib.md5(path.read_bytes()).hexdigest(), out["path"]
    # The params DVC recorded are the tiny ones: every override that some stage declares as a param.
    recorded: dict = {}
    for entry in lock["stages"].values():
        for key, value in entry.get("params", {}).get("params.yaml", {}).items():
            recorded.update(_flatten(value, key) if isinstance(value, dict) else {key: value})
    checked = 0
    for item in TINY_DAG:
        key, _, text = item.partition("=")
        if key in recorded:
            assert recorded[key] == yaml.safe_load(text), (key, recorded[key])
            checked += 1
    assert checked == len(TINY_DAG), [item for item in TINY_DAG if item.partition("=")[0] not in recorded]


def _flatten(nested: dict, prefix: str) -> dict:
    flat = {}
    for key, value in nested.items():
        flat.update(_flatten(value, f"{prefix}.{key}") if isinstance(value, dict) else {f"{prefix}.{key}": value})
    return flat


def test_the_stages_write_only_under_data(miniature_dag: MiniDag):
    tracked = miniature_dag.run("git", "status", "--porcelain", "--untracked-files=all")
    assert tracked.returncode == 0, tracked.stderr
    # data/ is git-ignored; the lock file is the one new file; params.yaml is the fixture's edit of
    # the committed defaults, as it wrote it; no other tracked file was changed.
    assert tracked.stdout.splitlines() == [" M params.yaml", "?? dvc.lock"], tracked.stdout
    assert (miniature_dag.root / "params.yaml").read_text() == miniature_dag.params_text


def _status(miniature_dag: MiniDag) -> dict:
    proc = miniature_dag.run(miniature_dag.dvc, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_a_changed_raw_file_or_store_makes_dvc_rerun_what_depends_on_it(miniature_dag: MiniDag):
    # The raw data folder (data.path) is a dependency of prepare, even for the synthetic source ...
    raw = miniature_dag.root / "data" / "raw" / "README.md"
    text = raw.read_text()
    try:
        raw.write_text(text + "edited\n")
        assert _status(miniature_dag) == {"prepare": [{"changed deps": {"data/raw": "modified"}}]}
    finally:
        raw.write_text(text)
    # ... and a rebuilt store makes every stage after prepare stale. One byte of the store's
    # metadata stands in for a rebuild (tests/dag/test_raw_data.py rebuilds one from edited raw data).
    metadata = miniature_dag.data / "prepared" / "dataset.zarr" / "labels" / "zarr.json"
    original = metadata.read_bytes()
    try:
        metadata.write_bytes(original + b"\n")
        status = _status(miniature_dag)
    finally:
        metadata.write_bytes(original)
    assert status.pop("prepare") == [{"changed outs": {"data/prepared/dataset.zarr": "modified"}}]
    assert set(status) == {"tune", "train", "calibrate", "export", "evaluate"}, status
    for stage, changes in status.items():
        assert {"changed deps": {"data/prepared/dataset.zarr": "modified"}} in changes, (stage, changes)
    assert _status(miniature_dag) == {}
