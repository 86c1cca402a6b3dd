"""Run identity: the code fingerprint of a stage, what names train runs and sweeps, the log that
says whether a run resumes or starts fresh and why, and the sweep's baseline selection."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from uml import provenance
from uml.config import Params
from uml.provenance import RunInputs, announce, code_files, code_fingerprint, stage_sources
from uml.train.sweep import baseline_values, select, sweep_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A copy of uml/ and pipeline/ that the fingerprint reads instead of the shared tree."""
    for package in ("uml", "pipeline"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    provenance.stage_sources.cache_clear()
    yield tmp_path
    provenance.stage_sources.cache_clear()


def test_editing_code_the_stage_runs_changes_its_fingerprint_and_other_code_does_not(repo_copy):
    before = {stage: code_fingerprint(stage) for stage in ("train", "tune", "evaluate")}
    with (repo_copy / "uml" / "losses.py").open("a") as f:
        f.write("\n# an edit\n")
    after = {stage: code_fingerprint(stage) for stage in ("train", "tune", "evaluate")}
    # Issue 14: editing the loss must retrain (and re-tune); evaluation runs no loss code.
    assert after["train"] != before["train"] and after["tune"] != before["tune"]
    assert after["evaluate"] == before["evaluate"]
    with (repo_copy / "uml" / "train" / "sweep.py").open("a") as f:
        f.write("\n# an edit\n")
    assert code_fingerprint("train") == after["train"] and code_fingerprint("tune") != after["tune"]


def test_code_files_hash_the_sources_the_stage_imports():
    files = code_files("train")
    # Imported directly, through a package __init__, or lazily inside a function: all listed.
    assert {"pipeline/train.py", "uml/train/trainer.py", "uml/train/worker.py", "uml/losses.py",
            "uml/models/uml_net.py", "uml/data/store.py", "uml/config.py"} <= set(files)
    assert "uml/train/sweep.py" not in files and "uml/evaluate.py" not in files
    for rel, digest in files.items():
        assert hashlib.sha256((REPO / rel).read_bytes()).hexdigest() == digest
    assert "uml/onnx_model.py" in stage_sources("evaluate") and "uml/plots.py" in stage_sources("evaluate")


def test_sweep_name_tracks_what_the_trials_run_but_not_concurrency():
    params, code = Params(), {"uml/losses.py": "aa"}
    name = sweep_name(params, "abc", code)
    assert name.startswith("tune-") and name == sweep_name(Params(), "abc", dict(code))
    # Issue 14: max_concurrent_trials was hashed although it was meant to be left out.
    for same in ({"tune.max_concurrent_trials": 3}, {"train.use_tuned": False}, {"train.epochs": 99},
                 {"train.loader_workers": 2}, {"ray.num_workers": 4}, {"ray.max_failures": 0},
                 {"train.checkpoint_every": 3}, {"train.checkpoint_upload": "async"}):
        assert sweep_name(params.with_overrides(same), "abc", code) == name, same
    for other in ({"tune.num_samples": 9}, {"tune.epochs": 7}, {"loss.cls_weight": 0.3}, {"train.lr": 0.01},
                  {"tune.search_space": {"loss.cls_weight": {"uniform": [0.1, 0.9]}}}, {"model.preset": "paper"}):
        assert sweep_name(params.with_overrides(other), "abc", code) != name, other
    assert sweep_name(params, "abd", code) != name
    assert sweep_name(params, "abc", {"uml/losses.py": "ab"}) != name


def _inputs(**params) -> RunInputs:
    return RunInputs("train", {"loss.cls_weight": 0.5, "train.lr": 0.001, **params}, "d" * 64,
                     {"uml/losses.py": "1", "uml/train/worker.py": "2"})


def test_the_log_says_fresh_or_resumed_and_what_changed(tmp_path, caplog):
    storage = str(tmp_path / "ray")
    first = _inputs()
    with caplog.at_level(logging.INFO, logger="uml.provenance"):
        assert announce(storage, first, resumes=False) == (
            f"fresh run '{first.name}': no earlier train run is recorded in {storage}")
        assert announce(storage, first, resumes=True).startswith(
            f"run '{first.name}' continues the earlier run of the same params, data and code")
        edited = RunInputs("train", {**first.params, "loss.cls_weight": 0.3}, "e" * 64,
                           {**first.code, "uml/losses.py": "9", "uml/new.py": "3"})
        message = announce(storage, edited, resumes=False)
    assert message == (f"fresh run '{edited.name}': the last one, '{first.name}', had other params "
                       "(loss.cls_weight 0.5 -> 0.3); data (content hash dddddddddddd -> eeeeeeeeeeee); "
                       "code (uml/losses.py, uml/new.py added)")
    assert message in caplog.text
    # Both are recorded beside the runs, readable back.
    assert {p.name for p in (tmp_path / "ray" / provenance.RECORDS_DIR).iterdir()} == {
        f"{first.name}.json", f"{edited.name}.json"}
    assert provenance.last_recorded(storage, "train") == edited
    assert provenance.last_recorded(storage, "tune") is None


def _table(scores: dict[str, float], baseline_id: str = "t0") -> pd.DataFrame:
    rows = [{"trial_id": trial, "loss.cls_weight": 0.5 if trial == baseline_id else 0.1 + i / 10,
             "baseline": trial == baseline_id, "score": score} for i, (trial, score) in enumerate(scores.items())]
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("scores", "chosen", "value", "reason"), [
    ({"t0": 0.70, "t1": 0.65, "t2": 0.60}, "baseline", 0.5, "no sampled trial beat the baseline (best sampled 0.6500 <= 0.7000)"),
    ({"t0": 0.70, "t1": 0.70}, "baseline", 0.5, "no sampled trial beat the baseline"),  # a tie keeps the baseline
    ({"t0": 0.70, "t1": 0.65, "t2": 0.72}, "sampled", 0.3, "trial t2 beat the baseline (0.7200 > 0.7000)"),
    ({"t0": float("nan"), "t1": 0.2}, "sampled", 0.2, "the baseline trial failed"),
    ({"t0": 0.4, "t1": float("nan")}, "baseline", 0.5, "every sampled trial failed"),
])
def test_the_sweep_falls_back_to_the_baseline_unless_a_sampled_trial_beats_it(scores, chosen, value, reason):
    values, record = select(_table(scores), ["loss.cls_weight"], {"loss.cls_weight": 0.5})
    assert values == {"loss.cls_weight": pytest.approx(value)}
    assert record["chosen"] == chosen and reason in record["reason"]
    assert record["trials"] == len(scores)
    assert record["baseline_score"] == (None if np.isnan(scores["t0"]) else scores["t0"])


@pytest.mark.parametrize(("margin", "chosen"), [(0.0, "sampled"), (0.019, "sampled"), (0.02, "baseline"), (0.05, "baseline")])
def test_a_sampled_trial_must_beat_the_baseline_by_the_margin(margin, chosen):
    values, record = select(_table({"t0": 0.70, "t1": 0.72}), ["loss.cls_weight"], {"loss.cls_weight": 0.5}, margin)
    assert record["chosen"] == chosen
    assert values == {"loss.cls_weight": pytest.approx(0.5 if chosen == "baseline" else 0.1 + 1 / 10)}
    if margin:
        assert f"0.7000 + {margin:g}" in record["reason"]


def test_the_baseline_is_the_value_the_params_give_each_searched_key():
    params = Params().with_overrides({"loss.cls_weight": 0.45, "loss.kl_annealing_epochs": 7})
    assert baseline_values(params, ["loss.cls_weight", "loss.kl_annealing_epochs", "loss.mut_weight"]) == {
        "loss.cls_weight": 0.45, "loss.kl_annealing_epochs": 7, "loss.mut_weight": 0.1}


def test_a_storage_where_records_cannot_be_written_only_loses_the_message(tmp_path, caplog):
    storage = tmp_path / "ray"
    storage.mkdir()
    (storage / provenance.RECORDS_DIR).write_text("a file where the records folder should be")
    with caplog.at_level(logging.WARNING, logger="uml.provenance"):
        message = announce(str(storage), _inputs(), resumes=False)
    assert message.startswith("fresh run") and "cannot" in caplog.text
