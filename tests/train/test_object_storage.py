"""``ray.storage_path`` on object storage: an S3-compatible server (moto) on 127.0.0.1 holds the
checkpoints and run records of a real train stage, and a rerun resumes from it.

The bucket is reached through the URI's own options (pyarrow's ``endpoint_override`` and
``scheme``), the way a user points Ray at MinIO or another S3-compatible store."""

from __future__ import annotations

import logging

import pyarrow.fs
import pytest
import torch

from uml.config import Paths, load_params
from uml.data.prepare import prepare
from uml.models import load_model
from uml.train.cluster import ray_session
from uml.train.trainer import train

from tests.s3 import s3_server
from tests.train.tiny import write_tiny_params

pytestmark = pytest.mark.slow
BUCKET = "uml-runs"


@pytest.fixture
def s3_storage(monkeypatch):
    """The loopback S3 server with one empty bucket; the storage URI that points at it."""
    with s3_server(monkeypatch, BUCKET) as server:
        yield server.uri("uml"), server.fs


def test_a_run_checkpoints_to_s3_and_a_rerun_resumes_from_it(tmp_path, s3_storage, caplog):
    uri, fs = s3_storage
    path = write_tiny_params(tmp_path, train={"epochs": 1, "use_tuned": False}, ray={"storage_path": uri})
    params = load_params(path)
    prepare(params)
    paths = Paths(params)
    assert paths.ray_storage_uri == uri

    with ray_session(params):  # one local Ray instance for both runs
        first = train(params)
        saved = load_model(first)
        run = saved.extra["run"]
        # The run lives in the bucket: Ray's checkpoints and the run record; nothing under data.root/ray.
        keys = [info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/uml", recursive=True))]
        assert any(key.startswith(f"{BUCKET}/uml/{run}/") and "/checkpoint_" in key for key in keys), keys
        assert f"{BUCKET}/uml/uml-run-inputs/{run}.json" in keys
        assert not (paths.root / "ray").exists()

        # The rerun finds the run in the bucket and resumes it: already complete, it trains no epoch
        # and writes no checkpoint (a fresh run would write checkpoints of its own).
        first_weights = {k: v.clone() for k, v in saved.state_dict().items()}
        checkpoints = {key for key in keys if "/checkpoint_" in key}
        paths.model_pt.unlink()
        with caplog.at_level(logging.INFO):
            second = train(params)
        assert f"run '{run}' continues the earlier run" in caplog.text
        after = [info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/uml", recursive=True))]
        assert {key for key in after if "/checkpoint_" in key} == checkpoints
        resumed = load_model(second)
        assert resumed.extra["run"] == run and resumed.extra["best_epoch"] == saved.extra["best_epoch"]
        for key, value in resumed.state_dict().items():
            assert torch.equal(value, first_weights[key]), key
