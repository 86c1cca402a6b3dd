"""The tune stage: a 3-trial ASHA sweep (the baseline and two sampled trials) through the training
code, its outputs, and restore."""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from uml.config import Paths, load_params
from uml.data.prepare import prepare
from uml.data.store import open_prepared
from uml.provenance import code_fingerprint
from uml.train.cluster import ray_session
from uml.train.sweep import sweep
from uml.train.worker import SCORE_KEY

from tests.train.tiny import write_tiny_params

pytestmark = pytest.mark.slow


SEARCH_SPACE = {"loss.cls_weight": {"uniform": [0.2, 0.8]}, "loss.kl_annealing_epochs": {"randint": [1, 10]}}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    path = write_tiny_params(
        root,
        # One trial at a time makes ASHA's decisions independent of which trial finishes first.
        tune={"num_samples": 3, "epochs": 2, "grace_period": 1, "reduction_factor": 2,
              "max_concurrent_trials": 1, "workers_per_trial": 1, "seed": 1, "min_improvement": 0.01,
              "search_space": SEARCH_SPACE},
    )
    params = load_params(path)
    prepare(params)
    with ray_session(params):
        best = sweep(params)
        yield params, best


def test_sweep_writes_every_trial_and_asha_stops_some_early(swept):
    params, _ = swept
    paths = Paths(params)
    table = pd.read_csv(paths.tune_results)
    keys = list(params.tune.search_space)
    assert len(table) == 3 and set(keys) <= set(table.columns)  # num_samples counts the baseline
    assert set(table["status"]) <= {"completed", "stopped early"}
    assert (table["status"] == "stopped early").sum() >= 1, table
    assert table.loc[table["status"] == "completed", "epochs"].eq(2).all()
    assert table.loc[table["status"] == "stopped early", "epochs"].lt(2).all()
    # Each sampled value lies in its declared range.
    assert table["loss.cls_weight"].between(0.2, 0.8).all() and table["loss.kl_annealing_epochs"].between(1, 9).all()
    assert (paths.tune_dir / "scores.png").stat().st_size > 5_000


def test_one_trial_is_the_baseline_of_the_params_file(swept):
    params, _ = swept
    table = pd.read_csv(Paths(params).tune_results)
    baseline = table[table["baseline"]]
    assert len(baseline) == 1
    written = yaml.safe_load(Path(params._source).read_text())["loss"]  # the values as the user wrote them
    for key in params.tune.search_space:
        assert baseline.iloc[0][key] == pytest.approx(written[key.split(".", 1)[1]])
    assert (table.loc[~table["baseline"], "loss.cls_weight"] != written["cls_weight"]).all()


def _ray_records(params, sweep_name: str) -> dict[str, tuple[dict, list[float]]]:
    """Ray Tune's own record of each trial (``<storage>/<sweep>/<trial>/params.json`` and one
    ``result.json`` line per reported epoch): trial id -> (config, validation scores)."""
    records = {}
    for trial_dir in sorted((Paths(params).ray_storage / sweep_name).glob("_trial_*")):
        lines = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
        records[lines[0]["trial_id"]] = (json.loads((trial_dir / "params.json").read_text()), [r[SCORE_KEY] for r in lines])
    return records


def test_results_table_agrees_with_ray_tunes_own_trial_records(swept):
    params, _ = swept
    paths = Paths(params)
    table = pd.read_csv(paths.tune_results, dtype={"trial_id": str}).set_index("trial_id")
    records = _ray_records(params, yaml.safe_load(paths.best_params.read_text())["tuned_for"]["sweep"])
    assert sorted(records) == sorted(table.index)
    for trial_id, (config, scores) in records.items():
        row = table.loc[trial_id]
        assert row["score"] == pytest.approx(max(scores)) and row["last_score"] == pytest.approx(scores[-1]), trial_id
        assert row["epochs"] == len(scores)
        for key in params.tune.search_space:
            assert row[key] == pytest.approx(config[key]), (trial_id, key)


def test_best_params_hold_the_winner_over_the_baseline_and_what_they_were_tuned_for(swept):
    params, best = swept
    paths = Paths(params)
    table = pd.read_csv(paths.tune_results)
    assert np.isfinite(table["score"]).all()
    written = yaml.safe_load(paths.best_params.read_text())
    selection, tuned_for = written.pop("selection"), written.pop("tuned_for")
    baseline_score = table.loc[table["baseline"], "score"].max()
    best_sampled = table[~table["baseline"]].sort_values("score", ascending=False).iloc[0]
    beats = best_sampled["score"] > baseline_score + 0.01  # tune.min_improvement
    expected = best_sampled if beats else table[table["baseline"]].iloc[0]
    assert selection["chosen"] == ("sampled" if beats else "baseline")
    assert selection["baseline_score"] == pytest.approx(baseline_score) and selection["trials"] == 3
    for key in params.tune.search_space:
        # Both what the stage returns and what it wrote hold the winner's values from the table.
        assert written["loss"][key.split(".", 1)[1]] == pytest.approx(expected[key])
        assert best["loss"][key.split(".", 1)[1]] == pytest.approx(expected[key])
    data_hash = open_prepared(paths.dataset).content_hash
    assert tuned_for["data_hash"] == data_hash and tuned_for["search_space"] == SEARCH_SPACE
    assert tuned_for["model"] == params.model.model_dump(mode="json") and tuned_for["code"] == code_fingerprint("tune")
    assert tuned_for["sweep"].startswith("tune-")


def test_a_rerun_restores_the_sweep_instead_of_starting_over(swept, caplog):
    params, best = swept
    before = pd.read_csv(Paths(params).tune_results)
    # Neither concurrency nor train-only keys rename the sweep (issue 14: they did).
    rerun = params.with_overrides({"tune.max_concurrent_trials": 2, "train.use_tuned": False, "train.epochs": 9})
    with caplog.at_level(logging.INFO), ray_session(params):
        again = sweep(rerun)
    assert "restoring sweep" in caplog.text and "continues the earlier sweep of the same params, data and code" in caplog.text
    after = pd.read_csv(Paths(params).tune_results)
    assert again == best
    pd.testing.assert_frame_equal(before, after)  # same trials, nothing retrained
