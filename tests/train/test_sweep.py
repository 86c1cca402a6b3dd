"""The tune stage: a 3-trial ASHA sweep through the training code, its outputs, and restore."""

import logging

import numpy as np
import pandas as pd
import pytest
import yaml

from uml.config import Paths, load_params
from uml.data.prepare import prepare
from uml.train.cluster import ray_session
from uml.train.sweep import sweep

from tests.train.tiny import write_tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    path = write_tiny_params(
        root,
        # One trial at a time makes ASHA's decisions independent of which trial finishes first.
        tune={"num_samples": 3, "epochs": 2, "grace_period": 1, "reduction_factor": 2,
              "max_concurrent_trials": 1, "workers_per_trial": 1, "seed": 1},
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
    assert len(table) == 3 and set(keys) <= set(table.columns)
    assert set(table["status"]) <= {"completed", "stopped early"}
    assert (table["status"] == "stopped early").sum() >= 1, table
    assert table.loc[table["status"] == "completed", "epochs"].eq(2).all()
    assert table.loc[table["status"] == "stopped early", "epochs"].lt(2).all()
    # Each sampled value lies in its declared range.
    assert table["loss.cls_weight"].between(0.2, 0.8).all() and table["loss.kl_annealing_epochs"].between(1, 9).all()
    assert (paths.tune_dir / "scores.png").stat().st_size > 5_000


def test_best_params_equal_the_best_row(swept):
    params, best = swept
    paths = Paths(params)
    table = pd.read_csv(paths.tune_results)
    row = table.loc[table["score"].idxmax()]
    written = yaml.safe_load(paths.best_params.read_text())
    assert written == best
    for dotted, value in row.items():
        if dotted.startswith("loss."):
            assert written["loss"][dotted.split(".", 1)[1]] == pytest.approx(value)
    assert np.isfinite(table["score"]).all()


def test_a_rerun_restores_the_sweep_instead_of_starting_over(swept, caplog):
    params, best = swept
    before = pd.read_csv(Paths(params).tune_results)
    with caplog.at_level(logging.INFO, logger="uml.train.sweep"), ray_session(params):
        again = sweep(params)
    assert "restoring sweep" in caplog.text
    after = pd.read_csv(Paths(params).tune_results)
    assert again == best
    pd.testing.assert_frame_equal(before, after)  # same trials, nothing retrained
